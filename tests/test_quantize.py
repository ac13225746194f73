"""The quantize pass: int8 QDQ graphs that ORT fuses, calibration, sensitivity, log/LUT codebooks."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from nmcompile import graphio, modelzoo
from nmcompile.errors import UserError
from nmcompile.passes.base import CompileContext
from nmcompile.passes.canonicalize import ConstantsToInitializers, FoldBatchNorm, NameNodes, RemoveUnusedInitializers
from nmcompile.passes.nm_mask import group_max_nonzeros, prune_nm
from nmcompile.passes.quantize import Quantize, measure_output_error, pack_planar, unpack_planar
from nmcompile.passes.targets import FindTargets
from nmcompile.patterns import Pattern
from nmcompile.runtime.session import optimized_op_counts

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
sys.path.insert(0, str(MODELS))
from evaluate import accuracy  # noqa: E402

CANON = (NameNodes, ConstantsToInitializers, FoldBatchNorm, RemoveUnusedInitializers, FindTargets)


def batches_of(x: dict[str, np.ndarray], size: int = 32):
    n = len(next(iter(x.values())))
    return lambda: ({k: v[i : i + size] for k, v in x.items()} for i in range(0, n, size))


def digits_calib():
    with np.load(MODELS / "digits_calib.npz") as f:
        return {"input": f["input"]}


def quantize(model_path, out_path, calib=None, **opts):
    """Canonicalize, find targets, quantize, save: returns the context."""
    defaults = dict(pattern=None, exclude=(), progress=False, quantize="int8", bits=4, calib_method="auto", max_error=None)
    defaults.update(opts)
    loaded = graphio.load_model(model_path)
    ctx = CompileContext(model=loaded, options=SimpleNamespace(**defaults))
    if calib is not None:
        ctx.artifacts["calib_batches"] = calib
    for cls in CANON:
        cls()(ctx)
    Quantize()(ctx)
    with graphio.AtomicWriter() as writer:
        graphio.save_model(loaded, Path(out_path), writer)
    onnx.checker.check_model(str(out_path))
    return ctx


def float_copy(model_path, out_path):
    """The same canonicalized model without quantization (the fp32 reference file)."""
    loaded = graphio.load_model(model_path)
    ctx = CompileContext(model=loaded, options=SimpleNamespace(pattern=None, exclude=(), progress=False))
    for cls in CANON:
        cls()(ctx)
    with graphio.AtomicWriter() as writer:
        graphio.save_model(loaded, Path(out_path), writer)
    return out_path


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def cnn_int8(work):
    out = work / "cnn_int8.onnx"
    ctx = quantize(MODELS / "digits_cnn.onnx", out, batches_of(digits_calib()), quant_sensitivity=True)
    return ctx, out


@pytest.fixture(scope="module")
def cnn24(work):
    """The digits CNN pruned 2:4 by the compiler (magnitude), and its float file."""
    from nmcompile.pipeline import compile_model

    out = work / "cnn24.onnx"
    compile_model(MODELS / "digits_cnn.onnx", output=out, pattern="2:4")
    return out


# --------------------------------------------------------------------------- int8


def test_int8_cnn_is_fused_into_integer_kernels(cnn_int8):
    _, path = cnn_int8
    ops = optimized_op_counts(path)
    assert ops["QLinearConv"] == 3
    assert ops["QGemm"] == 2
    for float_op in ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul"):
        assert ops[float_op] == 0, ops


def test_int8_cnn_accuracy_within_one_point(cnn_int8):
    _, path = cnn_int8
    fp32 = accuracy(MODELS / "digits_cnn.onnx", MODELS / "digits_test.npz")
    q = accuracy(path, MODELS / "digits_test.npz")
    assert q >= fp32 - 0.01, (q, fp32)


def test_int8_graph_is_explicit_symmetric_qdq(cnn_int8):
    ctx, path = cnn_int8
    model = onnx.load(str(path))
    inits = initializers(path)
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert qs and dqs
    for n in qs + dqs:
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any()  # int8, zero point 0: what TensorRT takes
        assert np.all(inits[n.input[1]] > 0)
    for t in ctx.artifacts["targets"]:
        q = ctx.layers[t.name]["quant"]
        (names,) = q["initializers"]
        w = inits[names["weight"]]
        assert w.dtype == np.int8 and w.min() >= -127
        assert inits[names["scale"]].shape == (w.shape[names["axis"]],)
        assert names["axis"] == t.primary.out_axis
        node = next(n for n in model.graph.node if n.name == t.name)
        dq = next(n for n in model.graph.node if n.output and n.output[0] == node.input[1])
        assert dq.op_type == "DequantizeLinear" and dq.input[0] == names["weight"]
    # the float weights are gone: the file holds int8 weights
    assert all(t.weight not in inits for t in ctx.artifacts["targets"])


def test_int8_report_rows_and_summary(cnn_int8):
    ctx, _ = cnn_int8
    for t in ctx.artifacts["targets"]:
        q = ctx.layers[t.name]["quant"]
        assert q["bits"] == 8 and "float" not in q
        assert 0 < q["weight_scale_min"] <= q["weight_scale_max"]
        assert q["activation_threshold"] > 0
        assert q["activation_method"] == "kl" or q["activation_method"].startswith(("minmax", "percentile"))
        assert q["weight_sqnr_db"] > 30 and q["activation_sqnr_db"] > 25
        assert "output_error_if_float" in q["sensitivity"]
    # every conv output is quantized (QLinearConv); conv1's from conv2's input through Relu
    conv1 = ctx.layers["/conv1/Conv"]["quant"]["outputs"][0]
    assert conv1["threshold_from"] == "/relu1/Relu_output_0"
    assert conv1["threshold"] == ctx.layers["/conv2/Conv"]["quant"]["activation_threshold"]
    s = ctx.artifacts["quantization"]
    assert s["mode"] == "int8" and s["float_layers"] == []
    assert s["weight_bytes_after"] < 0.3 * s["weight_bytes_before"]
    assert 0 <= s["output_error"]["one_minus_cosine"] < 1e-3


def test_int8_output_error_is_measurable_independently(cnn_int8, work):
    ctx, path = cnn_int8
    ref = float_copy(MODELS / "digits_cnn.onnx", work / "cnn_fp32.onnx")
    err = measure_output_error(ref, path, batches_of(digits_calib())())
    # the pass measured on the same 128 samples with the same definition
    assert err["one_minus_cosine"] == pytest.approx(ctx.artifacts["quantization"]["output_error"]["one_minus_cosine"], rel=1e-6, abs=1e-12)
    assert err["rel_l2"] == pytest.approx(ctx.artifacts["quantization"]["output_error"]["rel_l2"], rel=1e-6)


def test_int8_keeps_nm_zeros(cnn24, work):
    out = work / "cnn24_int8.onnx"
    before = initializers(cnn24)
    ctx = quantize(cnn24, out, batches_of(digits_calib()), quant_sensitivity=False, pattern=Pattern(2, 4))
    inits = initializers(out)
    checked = 0
    for t in ctx.artifacts["targets"]:
        if t.skip:
            continue
        (names,) = ctx.layers[t.name]["quant"]["initializers"]
        q = inits[names["weight"]]
        w = before[t.weight]
        assert np.all(q[w == 0] == 0)  # every pruned weight is still exactly 0
        assert group_max_nonzeros(q, 4, t.primary.red_axis) <= 2
        checked += 1
    assert checked == 4


def test_int8_bert_matmuls_fused_softmax_and_layernorm_float(work):
    model = modelzoo.bert_encoder(layers=2, hidden=64, heads=4)
    src = work / "bert.onnx"
    onnx.save(model, str(src))
    feeds = [modelzoo.random_inputs(model, batch=4, dims={"S": 16}, seed=i) for i in range(4)]
    out = work / "bert_int8.onnx"
    ctx = quantize(src, out, lambda: iter(feeds), quant_sensitivity=False)
    ops = optimized_op_counts(out)
    assert ops["MatMulIntegerToFloat"] == 12  # q, k, v, attention.output, intermediate, output x 2
    g = onnx.load(str(out)).graph
    producer = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type in ("Softmax", "LayerNormalization"):
            src_node = producer.get(n.input[0])
            assert src_node is None or src_node.op_type != "DequantizeLinear", n.name
        if n.op_type == "MatMul" and all(i in producer for i in n.input[:2]):
            kinds = {producer[i].op_type for i in n.input[:2]}
            # the attention products (two activations) stay float; the weight products read DQs
            assert kinds == {"DequantizeLinear"} or "DequantizeLinear" not in kinds
    assert ctx.artifacts["quantization"]["output_error"]["one_minus_cosine"] < 0.01


def test_int8_without_sensitivity_measures_only_what_it_uses(cnn_int8, work):
    # Without a sensitivity pass or an error budget no layer can be kept float, so
    # the Conv outputs that reach the next quantized input through Relu / MaxPool /
    # Flatten need no statistics of their own (the digits CNN: all three). The graph
    # must be the one calibrated with every statistic (cnn_int8 runs the sensitivity
    # pass, which measures all Conv outputs), and its output error the same.
    ctx_all, path_all = cnn_int8
    out = work / "cnn_int8_nosens.onnx"
    ctx = quantize(MODELS / "digits_cnn.onnx", out, batches_of(digits_calib()), quant_sensitivity=False)
    assert out.read_bytes() == path_all.read_bytes()
    a, b = ctx.artifacts["quantization"], ctx_all.artifacts["quantization"]
    assert a["output_error"]["one_minus_cosine"] == pytest.approx(b["output_error"]["one_minus_cosine"], rel=1e-9)
    # two evaluations: auto's clipped thresholds, then min/max (the guard), on the model's output
    assert a["evaluations"] == 2 and b["evaluations"] > 2
    outputs = [o for t in ctx.artifacts["targets"] for o in ctx.layers[t.name]["quant"].get("outputs", [])]
    assert len(outputs) >= 3
    for o in outputs:
        assert o["threshold_from"] != o["tensor"]  # thresholds of the inputs they reach


def test_int8_gptq_rounding_lowers_output_error(cnn_int8, work):
    """gptq weight rounding: every layer's output error on the calibration inputs is below
    nearest rounding's (the default), and so is the model's; the scales (and so the graph) are the same."""
    ctx_n, _ = cnn_int8
    ctx = quantize(MODELS / "digits_cnn.onnx", work / "cnn_int8_gptq.onnx", batches_of(digits_calib()), quant_sensitivity=False, weight_rounding="gptq")
    for t in ctx.artifacts["targets"]:
        q, qn = ctx.layers[t.name]["quant"], ctx_n.layers[t.name]["quant"]
        assert q["weight_rounding"] == "gptq" and qn["weight_rounding"] == "nearest"
        assert 0 < q["weight_output_error_vs_nearest"] < 1
        assert (q["weight_scale_min"], q["weight_scale_max"]) == (qn["weight_scale_min"], qn["weight_scale_max"])
    err = ctx.artifacts["quantization"]["output_error"]["one_minus_cosine"]
    assert err < ctx_n.artifacts["quantization"]["output_error"]["one_minus_cosine"]
    with pytest.raises(UserError, match="--weight-rounding"):
        quantize(MODELS / "digits_cnn.onnx", work / "bad.onnx", batches_of(digits_calib()), weight_rounding="round")


def test_int8_gptq_shared_weight_fits_both_inputs(work):
    """A weight read by two MatMuls with different inputs: its codes are fitted to both (summed Grams)."""
    from onnx import TensorProto as TP

    rng = np.random.default_rng(0)
    k = 32
    w = rng.standard_normal((k, k)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h1"], name="mm1"),
        helper.make_node("Mul", ["x", "x"], ["x2"], name="sq"),
        helper.make_node("MatMul", ["x2", "w"], ["h2"], name="mm2"),
        helper.make_node("Add", ["h1", "h2"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, ["N", k])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = work / "shared_w.onnx"
    onnx.save(model, str(src))
    mix = rng.standard_normal((k, k)).astype(np.float32) * 0.5 + np.eye(k, dtype=np.float32)
    x = {"x": (rng.standard_normal((256, k)).astype(np.float32) @ mix)}
    ctx = {r: quantize(src, work / f"shared_w_{r}.onnx", batches_of(x), quant_sensitivity=False, weight_rounding=r)
           for r in ("gptq", "nearest")}
    (t,) = ctx["gptq"].artifacts["targets"]
    q = ctx["gptq"].layers[t.name]["quant"]
    assert q["weight_rounding"] == "gptq" and q["weight_output_error_vs_nearest"] < 1
    errs = {r: c.artifacts["quantization"]["output_error"]["one_minus_cosine"] for r, c in ctx.items()}
    assert errs["gptq"] < errs["nearest"]


def test_int8_needs_calibration(work):
    with pytest.raises(UserError, match="needs --calib"):
        quantize(MODELS / "digits_cnn.onnx", work / "nocalib.onnx", None)


def test_max_error_keeps_the_worst_layers_float(work, cnn_int8):
    ctx_all, _ = cnn_int8
    err_all = ctx_all.artifacts["quantization"]["output_error"]["one_minus_cosine"]
    sens = {t.name: ctx_all.layers[t.name]["quant"]["sensitivity"]["output_error_if_float"] for t in ctx_all.artifacts["targets"]}
    best = min(sens, key=sens.get)
    budget = (sens[best] + err_all) / 2  # met by keeping the one most sensitive layer float
    out = work / "cnn_budget.onnx"
    ctx = quantize(MODELS / "digits_cnn.onnx", out, batches_of(digits_calib()), max_error=budget)
    s = ctx.artifacts["quantization"]
    assert [f["name"] for f in s["float_layers"]] == [best]
    assert s["output_error"]["one_minus_cosine"] <= budget
    ref = float_copy(MODELS / "digits_cnn.onnx", work / "cnn_fp32b.onnx")
    assert measure_output_error(ref, out, batches_of(digits_calib())())["one_minus_cosine"] <= budget
    inits = initializers(out)
    for t in ctx.artifacts["targets"]:
        q = ctx.layers[t.name]["quant"]
        if t.name == best:
            assert q["float"].startswith("kept float") and q["bits"] is None
            assert inits[t.weight].dtype == np.float32  # the float weight stays
        else:
            assert q["bits"] == 8 and t.weight not in inits
    assert optimized_op_counts(out)["QLinearConv"] + optimized_op_counts(out)["QGemm"] == 4
    # a budget below every single-layer error keeps more layers float, down to none quantized
    tight = quantize(MODELS / "digits_cnn.onnx", work / "cnn_tight.onnx", batches_of(digits_calib()), max_error=err_all / 10)
    st = tight.artifacts["quantization"]
    assert len(st["float_layers"]) >= 2 and st["output_error"]["one_minus_cosine"] <= err_all / 10
    # a budget the all-quantized model meets keeps every layer quantized
    loose = quantize(MODELS / "digits_cnn.onnx", work / "cnn_loose.onnx", batches_of(digits_calib()), max_error=0.5, quant_sensitivity=False)
    assert loose.artifacts["quantization"]["float_layers"] == []


@pytest.mark.parametrize("method", ["minmax", "kl", "percentile"])
def test_calibration_methods(work, method):
    model = modelzoo.gemm_model(trans_b=1, k=64, n=32)
    src = work / f"gemm_{method}.onnx"
    onnx.save(model, str(src))
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, size=(256, 64)).astype(np.float32)  # long tails: the methods disagree
    ctx = quantize(src, work / f"gemm_{method}_q.onnx", batches_of({"x": x}, 64), calib_method=method, quant_sensitivity=False)
    q = ctx.layers["gemm"]["quant"]
    assert q["activation_method"] == method if method != "percentile" else q["activation_method"] == "percentile"
    t = q["activation_threshold"]
    amax = float(np.abs(x).max())
    if method == "minmax":
        assert t == pytest.approx(amax)
    else:
        assert 0 < t < amax
    if method == "percentile":
        assert np.mean(np.abs(x) <= t) >= 0.9999 - 1e-3
    # the Gemm is the graph output: its bias moves to an Add so ORT still fuses QGemm
    assert optimized_op_counts(work / f"gemm_{method}_q.onnx")["QGemm"] == 1


def test_opset_raised_when_safe_else_per_tensor(work):
    b = modelzoo.Builder(0, opset=12)
    h = b.conv("x", 3, 8, 3, name="c1")
    b.nodes.append(helper.make_node("Conv", [h, b.weight(4, 8, 1, 1)], ["y"], name="c2", kernel_shape=[1, 1]))
    conv_only = b.model([helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
                        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])])
    with_relu = modelzoo.conv_model(opset=12)  # Relu changed at opset 13 and 14: not raised
    rng = np.random.default_rng(0)
    x = {"x": rng.standard_normal((16, 3, 8, 8)).astype(np.float32)}
    for name, model, raised in (("conv_only", conv_only, True), ("with_relu", with_relu, False)):
        src = work / f"{name}12.onnx"
        onnx.save(model, str(src))
        out = work / f"{name}12_q.onnx"
        ctx = quantize(src, out, batches_of(x, 8), quant_sensitivity=False)
        m = onnx.load(str(out))
        version = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
        s = ctx.artifacts["quantization"]
        if raised:
            assert version == 13 and s["opset_raised_to"] == 13 and "per-channel" in s["weights"]
        else:
            assert version == 12 and "per-tensor" in s["weights"]
        err = measure_output_error(src, out, batches_of(x, 8)())
        assert err["one_minus_cosine"] < 1e-3


def test_bad_options(work):
    with pytest.raises(UserError, match="--quantize"):
        quantize(MODELS / "digits_cnn.onnx", work / "bad.onnx", batches_of(digits_calib()), quantize="int4")
    with pytest.raises(UserError, match="--calib-method"):
        quantize(MODELS / "digits_cnn.onnx", work / "bad.onnx", batches_of(digits_calib()), calib_method="mse2")
    with pytest.raises(UserError, match="--bits"):
        quantize(MODELS / "digits_cnn.onnx", work / "bad.onnx", None, quantize="lut", bits=1)
    assert not (work / "bad.onnx").exists()


# --------------------------------------------------------------------------- log / lut


def test_planar_packing_roundtrip():
    rng = np.random.default_rng(0)
    for width in (2, 4, 8):
        for n in (1, 7, 64, 1001):
            c = rng.integers(0, 1 << width, size=n).astype(np.uint8)
            p = pack_planar(c, width)
            assert p.size == -(-n * width // 8)
            assert np.array_equal(unpack_planar(p, n, width), c)


def numpy_decode(inits: dict, q: dict, shape: tuple[int, ...]) -> np.ndarray:
    """Decode the stored codes with numpy alone, from the names and layout in the report row."""
    import itertools

    names = q["initializers"]
    packing = q["packing"]
    width = packing["code_width"]
    data = inits[names["codes"]].reshape(-1)
    sections = {k: data[a:b] for k, (a, b) in packing["sections"].items()}

    def unpack(packed, count, radix):
        # base-radix digits in words of k bytes (byte planes): word i = sum_j v[j*P + i] * radix^j,
        # k and f the fewest bits per digit with radix^f <= 256^k, k <= 7, shortest word among equals
        words = [(k, max(f for f in range(1, 64) if radix**f <= 256**k)) for k in range(1, 8)]
        k, f = min(words, key=lambda kf: (kf[0] / kf[1], kf[0]))
        planes = packed.reshape(k, -1).astype(np.int64)
        p = sum(planes[b] * 256**b for b in range(k))
        return np.concatenate([(p // radix**j) % radix for j in range(f)])[:count]

    if q["storage"] == "dense":
        codes = unpack(sections["codes"], int(np.prod(shape)), 1 << width).reshape(shape)
    else:
        # the reduction axis r split into (groups, M); N codes and positions kept per group
        n, m, r = q["nm"]["n"], q["nm"]["m"], q["nm"]["axis"]
        g = shape[r] // m
        kept_shape = list(shape[:r]) + [g, n] + list(shape[r + 1 :])
        count = int(np.prod(kept_shape))
        kept = unpack(sections["codes"], count, 1 << width).reshape(kept_shape)
        if "position_width" in packing:
            pos = unpack(sections["positions"], count, 1 << packing["position_width"]).reshape(kept_shape)
        else:  # one index per group into the sorted patterns, groups in the kept layout without its N axis
            table = np.array(list(itertools.combinations(range(m), n)))
            assert len(table) == packing["position_patterns"]
            pattern = unpack(sections["positions"], count // n, len(table)).reshape(list(shape[:r]) + [g] + list(shape[r + 1 :]))
            pos = np.moveaxis(table[pattern], -1, r + 1)
        groups = np.zeros(list(shape[:r]) + [g, m] + list(shape[r + 1 :]), np.uint8)  # code 0 decodes to 0
        np.put_along_axis(groups, pos.astype(np.int64), kept, axis=r + 1)
        codes = groups.reshape(shape)
    book = inits[names["codebook"]].astype(np.float32)  # a float16 codebook is cast to float before use
    axis = q["channel_axis"]
    idx = codes.astype(np.int64)
    bshape = [-1 if i == axis else 1 for i in range(len(shape))]
    if book.size > (1 << q["bits"]):  # one codebook per channel
        idx = idx + (np.arange(shape[axis]) * (1 << q["bits"])).reshape(bshape)
    vals = book[idx]
    if "scale" in sections:  # uint8 per-channel scale in the data; the codebook holds the unit
        vals = vals * sections["scale"].astype(np.float32).reshape(bshape)
    elif "scale" in names:
        s = inits[names["scale"]].astype(np.float32)
        vals = vals * (s.reshape(bshape) if s.ndim else s)
    return vals.astype(np.float32)


def ort_values(path, names: list[str], feed: dict) -> dict[str, np.ndarray]:
    """Run the model with extra graph outputs (the decoded weights)."""
    m = onnx.load(str(path))
    for n in names:
        m.graph.output.append(onnx.ValueInfoProto(name=n))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, feed)))


@pytest.mark.parametrize(
    "mode,storage,granularity",
    [("lut", "dense", "auto"), ("lut", "compressed", "tensor"), ("lut", "compressed", "channel"), ("lut", "compressed", "layer"),
     ("lut", "dense", "layer"), ("log", "compressed", "auto"), ("log", "dense", "auto")],
)
def test_codebook_decodes_exactly_and_keeps_zeros(cnn24, work, mode, storage, granularity):
    out = work / f"cnn24_{mode}_{storage}_{granularity}.onnx"
    original = initializers(cnn24)
    ctx = quantize(cnn24, out, None, quantize=mode, bits=4, pattern=Pattern(2, 4), nm_storage=storage, lut_granularity=granularity)
    inits = initializers(out)
    targets = ctx.artifacts["targets"]
    feed = {"input": digits_calib()["input"][:2]}
    decoded = ort_values(out, [t.weight for t in targets], feed)
    from nmcompile.inspect import inspect_model

    inspected = {row["weight"]: row for row in inspect_model(out)["layers"]}
    compressed = 0
    for t in targets:
        q = ctx.layers[t.name]["quant"]
        w = original[t.weight]
        assert t.weight not in inits  # the float weight is gone, a subgraph makes it
        ref = numpy_decode(inits, q, w.shape)
        got = decoded[t.weight]
        assert got.dtype == np.float32 and got.shape == w.shape
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))  # bit-exact
        assert np.all(got[w == 0] == 0)  # N:M zeros stay exactly zero
        noise = float(np.sum((w.astype(np.float64) - got) ** 2))
        if noise == 0:  # e.g. 9 weights per channel and 15 codes: exact
            assert q["weight_sqnr_db"] is None
        else:
            sqnr = 10 * math.log10(float(np.sum(w.astype(np.float64) ** 2)) / noise)
            assert sqnr == pytest.approx(q["weight_sqnr_db"], abs=0.006)  # what the report claims
        per_channel = np.moveaxis(got, q["channel_axis"], 0).reshape(w.shape[q["channel_axis"]], -1)
        assert max(np.unique(row).size for row in per_channel) <= 16
        # `nmcompile inspect` sees the coded layer as the runtime computes it
        seen = inspected[t.weight]
        assert seen["coded"]["distinct_values_per_channel"] == max(np.unique(row).size for row in per_channel)
        assert seen["sparsity"] == pytest.approx(float(np.mean(ref == 0)))
        if mode == "log":
            scale = inits[q["initializers"]["scale"]].reshape(-1)
            assert scale.dtype == np.float32  # each channel's largest weight stays exact
            ratio = np.abs(per_channel) / scale[:, None]
            nz = ratio[ratio > 0]
            assert np.allclose(np.log2(nz), np.rint(np.log2(nz)))
        else:  # float16 side information for float32 weights, cast back in the graph
            assert inits[q["initializers"]["codebook"]].dtype == np.float16
            allowed = ("kmeans-channel", "kmeans-tensor") if granularity == "auto" else (f"kmeans-{granularity}",)
            assert q["codebook"] in allowed
            # one codebook over per-channel scales: a uint8 scale per channel in the code data
            assert ("scale" in q["packing"]["sections"]) == (q["codebook"] == "kmeans-tensor")
            assert "scale" not in q["initializers"]
        compressed += q["storage"] == "nm-compressed"
    assert compressed == (4 if storage == "compressed" else 0)  # conv1 (reduction 1) is not 2:4
    assert ctx.artifacts["quantization"]["weight_bytes_after"] < 0.2 * ctx.artifacts["quantization"]["weight_bytes_before"]


def test_codebook_levels_of_dense_and_pruned_weights(cnn24, work):
    # Code 0 is reserved for exact zeros only where the weight has zeros: a dense
    # weight gets 2^bits levels, an N:M pruned one 2^bits - 1 plus exact 0.
    for src, pattern, levels in ((MODELS / "digits_cnn.onnx", None, 16), (cnn24, Pattern(2, 4), 15)):
        out = work / f"levels_{levels}.onnx"
        ctx = quantize(src, out, None, quantize="lut", bits=4, pattern=pattern, lut_granularity="layer")
        t = next(t for t in ctx.artifacts["targets"] if t.name == "/fc1/Gemm")
        got = ort_values(out, [t.weight], {"input": digits_calib()["input"][:1]})[t.weight]
        nonzero = np.unique(got[got != 0])
        assert nonzero.size == levels
        assert (got == 0).any() == (pattern is not None)


def test_codebook_files_shrink(cnn24, work):
    fp32_dense = os.path.getsize(float_copy(MODELS / "digits_cnn.onnx", work / "cnn_fp32c.onnx"))
    fp32_24 = os.path.getsize(cnn24)
    dense = work / "cnn_lut4.onnx"
    quantize(MODELS / "digits_cnn.onnx", dense, None, quantize="lut", bits=4)
    sparse = work / "cnn24_lut4.onnx"
    quantize(cnn24, sparse, None, quantize="lut", bits=4, pattern=Pattern(2, 4))
    log24 = work / "cnn24_log4.onnx"
    quantize(cnn24, log24, None, quantize="log", bits=4, pattern=Pattern(2, 4))
    assert os.path.getsize(dense) <= 0.2 * fp32_dense
    assert os.path.getsize(sparse) <= 0.15 * fp32_24
    assert os.path.getsize(log24) <= 0.15 * fp32_24
    # and the models still classify
    assert accuracy(dense, MODELS / "digits_test.npz") >= accuracy(MODELS / "digits_cnn.onnx", MODELS / "digits_test.npz") - 0.02


def test_codebook_matmul_compressed_on_axis_0(work):
    """MatMul B [K, N]: the groups run along axis 0 (Conv and Gemm transB=1 above: axis 1)."""
    model = modelzoo.matmul_model(k=64, n=32)
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim == 2:
            t.CopyFrom(numpy_helper.from_array(prune_nm(a, 2, 4, 0)[0], t.name))
    src = work / "mm24.onnx"
    onnx.save(model, str(src))
    feeds = [modelzoo.random_inputs(model, batch=4, dims={"S": 8}, seed=i) for i in range(4)]
    original = initializers(src)
    for mode in ("lut", "log"):
        out = work / f"mm24_{mode}.onnx"
        ctx = quantize(src, out, lambda: iter(feeds), quantize=mode, bits=4, pattern=Pattern(2, 4), nm_storage="compressed")
        inits = initializers(out)
        targets = ctx.artifacts["targets"]
        got = ort_values(out, [t.weight for t in targets], feeds[0])
        for t in targets:
            q = ctx.layers[t.name]["quant"]
            assert q["storage"] == "nm-compressed" and q["nm"]["axis"] == 0
            ref = numpy_decode(inits, q, original[t.weight].shape)
            assert np.array_equal(got[t.weight], ref)
            assert np.all(ref[original[t.weight] == 0] == 0)
        assert ctx.artifacts["quantization"]["output_error"]["one_minus_cosine"] < 0.05


def test_codebook_max_error_keeps_layers_float(work):
    budget = 1e-3  # 4-bit LUT on the digits CNN: about 8e-3 with every layer coded
    out = work / "cnn_lut_budget.onnx"
    ctx = quantize(MODELS / "digits_cnn.onnx", out, batches_of(digits_calib()), quantize="lut", bits=4, max_error=budget)
    s = ctx.artifacts["quantization"]
    assert s["float_layers"] and s["quantized_layers"] > 0
    assert s["output_error"]["one_minus_cosine"] <= budget
    ref = float_copy(MODELS / "digits_cnn.onnx", work / "cnn_fp32d.onnx")
    assert measure_output_error(ref, out, batches_of(digits_calib())())["one_minus_cosine"] <= budget
    inits = initializers(out)
    for f in s["float_layers"]:
        t = next(t for t in ctx.artifacts["targets"] if t.name == f["name"])
        assert inits[t.weight].dtype == np.float32


@pytest.mark.parametrize("opset,width,note", [(9, 8, "one per byte"), (10, 4, "no N:M-compressed storage")])
def test_codebook_at_old_opsets(work, opset, width, note):
    model = modelzoo.conv_model(opset=opset)  # Conv changed at 11: the opset is not raised
    src = work / f"conv{opset}.onnx"
    onnx.save(model, str(src))
    out = work / f"conv{opset}_lut.onnx"
    ctx = quantize(src, out, None, quantize="lut", bits=4, pattern=Pattern(2, 4))
    assert any(note in n for n in ctx.notes)
    assert next(o.version for o in onnx.load(str(out)).opset_import if o.domain == "") == opset
    inits = initializers(out)
    original = initializers(src)
    x = modelzoo.random_inputs(model, batch=2)
    got = ort_values(out, [t.weight for t in ctx.artifacts["targets"]], x)
    for t in ctx.artifacts["targets"]:
        q = ctx.layers[t.name]["quant"]
        assert q["packing"]["code_width"] == width and q["storage"] == "dense"
        assert np.array_equal(got[t.weight], numpy_decode(inits, q, original[t.weight].shape))


def test_same_input_same_bytes(cnn24, work):
    a, b = work / "det_a.onnx", work / "det_b.onnx"
    for p in (a, b):
        quantize(cnn24, p, None, quantize="lut", bits=4, pattern=Pattern(2, 4))
    assert a.read_bytes() == b.read_bytes()
    model = modelzoo.gemm_model()
    src = work / "det_gemm.onnx"
    onnx.save(model, str(src))
    x = {"x": np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)}
    for p in (a, b):
        quantize(src, p, batches_of(x), quant_sensitivity=False)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("mode,granularity", [("lut", "tensor"), ("lut", "channel"), ("log", "auto")])
def test_float16_weights_decode_exactly_and_fold_at_load(work, mode, granularity):
    """float16 weights: the decode's product runs in float32 and rounds once, the same bits as
    a float16 product, and ORT folds the whole decode at load (its CPU has no float16 Mul)."""
    from onnx import TensorProto

    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((64, 128)).astype(np.float16)
    w2 = rng.standard_normal((128, 32)).astype(np.float16)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 32])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    src = work / f"f16_{mode}_{granularity}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    out = work / f"f16_{mode}_{granularity}_q.onnx"
    ctx = quantize(src, out, None, quantize=mode, bits=4, pattern=Pattern(2, 4), lut_granularity=granularity)
    inits = initializers(out)
    decoded = ort_values(out, ["w1", "w2"], {"x": np.ones((2, 64), np.float16)})
    for t in ctx.artifacts["targets"]:
        ref = numpy_decode(inits, ctx.layers[t.name]["quant"], decoded[t.weight].shape).astype(np.float16)
        assert decoded[t.weight].dtype == np.float16
        assert np.array_equal(decoded[t.weight].view(np.uint16), ref.view(np.uint16))
    ops = optimized_op_counts(out)
    assert not {"Mul", "Gather", "ScatterElements"} & set(ops), ops  # nothing of the decode is left to run


def _gemm_beta_model(folder, beta=2.0):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="fc", transB=1, beta=beta)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), folder / "m.onnx")
    np.savez(folder / "c.npz", x=rng.standard_normal((64, 32)).astype(np.float32))
    return folder / "m.onnx", folder / "c.npz"


def test_int8_gemm_beta_leaves_no_dead_bias_and_int8_twice_changes_nothing(tmp_path):
    from nmcompile.pipeline import compile_model

    src, calib = _gemm_beta_model(tmp_path)
    once = compile_model(src, output=tmp_path / "q.onnx", pattern=None, quantize="int8", calib=calib)
    m = onnx.load(once.paths.model)
    read = {x for n in m.graph.node for x in n.input}
    assert [t.name for t in m.graph.initializer if t.name not in read] == []  # B became B * beta in an Add
    twice = compile_model(once.paths.model, output=tmp_path / "q2.onnx", pattern=None, quantize="int8", calib=calib)
    (row,) = twice.report["layers"]
    assert "weight already quantized" in str(row)
    ops = lambda p: sorted(n.op_type for n in onnx.load(p).graph.node)
    assert ops(twice.paths.model) == ops(once.paths.model)  # no second Q/DQ pair


def test_sparse_initializer_weight_is_left_float(tmp_path):
    # a weight stored as a sparse_initializer is no target; the sessions the pass builds must still carry it
    from onnx import helper

    rng = np.random.default_rng(0)
    dense = rng.standard_normal((32, 16)).astype(np.float32)
    dense[np.abs(dense) < 0.5] = 0
    idx = np.flatnonzero(dense)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(dense.ravel()[idx], "ws"),
                                       numpy_helper.from_array(idx.astype(np.int64), "ws_idx"), [32, 16])
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "ws"], ["y"], name="mm")], "g",
                              [vi("x", 1, ["N", 32])], [vi("y", 1, ["N", 16])], sparse_initializer=[sparse])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    x = rng.standard_normal((8, 32)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    from nmcompile.pipeline import compile_model

    result = compile_model(src, tmp_path / "o.onnx", pattern=None, quantize="int8", calib=tmp_path / "c.npz")
    sess = ort.InferenceSession(str(result.paths.model), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("minmax_better", [True, False])
def test_auto_keeps_the_thresholds_with_the_lower_output_error(work, monkeypatch, minmax_better):
    # auto's clipped thresholds are measured against min/max on the model's output; the
    # evaluator is made to favour one or the other, and the report shows which was kept
    from nmcompile.passes import quantize as qz

    real = qz._Evaluator.error
    calls = []

    def error(self, edit):
        got = dict(real(self, edit))
        calls.append(got)
        if len(calls) <= 2:  # auto's, then min/max's (the guard)
            better = (len(calls) == 2) == minmax_better
            got["one_minus_cosine"] = 1e-6 if better else 1e-3
        return got

    monkeypatch.setattr(qz._Evaluator, "error", error)
    ctx = quantize(MODELS / "digits_cnn.onnx", work / f"guard_{minmax_better}.onnx", batches_of(digits_calib()),
                   calib_method="auto", quant_sensitivity=False)
    methods = [a["method"] for t in ctx.artifacts["targets"] for a in ctx.layers[t.name]["quant"]["activations"]]
    assert len(calls) == 2
    switched = [m for m in methods if m.startswith("minmax (auto's clipping")]
    if minmax_better:  # every clipped threshold raised to the tensor's max |x|
        assert switched
    else:
        assert not switched and any(m == "kl" or m.startswith("percentile") for m in methods)
    assert ctx.artifacts["quantization"]["output_error"]["one_minus_cosine"] == pytest.approx(1e-6)
