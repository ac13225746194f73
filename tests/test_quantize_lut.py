"""Weight-only codes: tighter N:M position storage, uint8 scales, coded Gather tables, float16 parameters, file sizes."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_quantize import MODELS, digits_calib, float_copy, initializers, numpy_decode, ort_values, quantize

from nmcompile import modelzoo
from nmcompile.passes.nm_mask import prune_nm
from nmcompile.passes.quantize import _fits_half, pack_planar, pack_radix, packed_bytes, radix_word, unpack_radix
from nmcompile.patterns import Pattern
from evaluate import accuracy  # noqa: E402  (models/ is on sys.path through test_quantize)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("quantize_lut")


def test_radix_packing_roundtrip_and_planar_equivalence():
    rng = np.random.default_rng(0)
    for radix, word in ((2, (1, 8)), (4, (1, 4)), (6, (1, 3)), (8, (3, 8)), (16, (1, 2)), (32, (5, 8)), (64, (3, 4)),
                        (128, (7, 8)), (70, (7, 9)), (256, (1, 1))):
        assert radix_word(radix) == word
        k, f = word
        assert radix**f <= 256**k  # the word holds its digits
        for n in (1, 5, 64, 1001):
            v = rng.integers(0, radix, size=n)
            v[: min(n, 3)] = radix - 1  # the largest digits: the top byte of a word is used
            p = pack_radix(v, radix)
            assert p.dtype == np.uint8 and p.size == k * -(-n // f)
            assert np.array_equal(unpack_radix(p, n, radix), v)
    for width in (2, 4, 8):  # a power-of-two radix in one-byte words is the planar nibble / crumb packing
        v = rng.integers(0, 1 << width, size=333)
        assert np.array_equal(pack_radix(v, 1 << width), pack_planar(v.astype(np.uint8), width))
    with pytest.raises(ValueError):
        pack_radix([6], 6)


def test_radix_words_against_brute_force():
    # the fewest bits per digit over words of 1..7 bytes, the shortest word among equals
    for radix in range(2, 257):
        best = None
        for k in range(1, 8):
            f = max(f for f in range(1, 64) if radix**f <= 256**k)
            if best is None or 8 * k / f < 8 * best[0] / best[1] - 1e-12:
                best = (k, f)
        assert radix_word(radix) == best, radix


@pytest.mark.parametrize("opset", [11, 17])
def test_graph_unpacks_every_word_size_exactly(opset):
    # the decoding subgraph against pack_radix, the largest digits included (7-byte words
    # reach 2^56, where a float64 sum would round: ORT's int64 ReduceSum does)
    import onnxruntime as ort
    from onnx import TensorProto

    from nmcompile.passes.quantize import _Body

    rng = np.random.default_rng(1)
    for radix in (2, 6, 8, 16, 32, 64, 70, 128, 200, 256):
        b = _Body(opset)
        out = b.digits("x", radix, "n")
        graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [None]),
                                                 helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
                                  [helper.make_tensor_value_info(out, TensorProto.INT32, [None])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
        v = rng.integers(0, radix, size=101)
        v[::3] = radix - 1
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": pack_radix(v, radix), "n": np.array([v.size])})[0]
        assert np.array_equal(got, v), radix


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_odd_code_widths_cost_their_bits(work, bits):
    # 3, 5, 6 and 7-bit codes decode exactly from multi-byte words, and take bits/8 bytes a code
    model = modelzoo.matmul_model(k=96, n=40)
    src = work / f"mm_bits{bits}.onnx"
    onnx.save(model, str(src))
    x = modelzoo.random_inputs(model, batch=2, dims={"S": 4})
    for path, tag in ((src, "17"), (work / f"mm_bits{bits}_o11.onnx", "11")):
        if tag == "11":  # the same at opset 11 (Slice, Gather and integer Div/Mod as they were then)
            onnx.save(modelzoo.matmul_model(k=96, n=40, opset=11), str(path))
        out = work / f"mm_bits{bits}_{tag}_lut.onnx"
        ctx = quantize(path, out, None, quantize="lut", bits=bits, pattern=None, lut_granularity="tensor")
        inits = initializers(out)
        got = ort_values(out, [t.weight for t in ctx.artifacts["targets"]], x)
        for t in ctx.artifacts["targets"]:
            q = ctx.layers[t.name]["quant"]
            ref = numpy_decode(inits, q, got[t.weight].shape)
            assert np.array_equal(got[t.weight].view(np.uint32), ref.view(np.uint32))
            a, b = q["packing"]["sections"]["codes"]
            assert b - a == packed_bytes(got[t.weight].size, 1 << bits)
            assert (b - a) <= got[t.weight].size * bits / 8 + 8  # a partial last word at most


@pytest.mark.parametrize("n,m,positions", [(2, 4, "pattern"), (4, 8, "pattern"), (1, 4, "positional"), (31, 32, "pattern")])
def test_nm_position_storage_decodes_exactly(work, n, m, positions):
    """2:4 stores one of 6 patterns per group (3 groups a byte), 4:8 one of 70 (9 groups in 7 bytes); 1:4 a 2-bit position;
    31:32 one of 32 (a base-32 key of 31 positions overflows int64)."""
    model = modelzoo.matmul_model(k=64, n=32)
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim == 2:
            t.CopyFrom(numpy_helper.from_array(prune_nm(a, n, m, 0)[0], t.name))
    src = work / f"mm{n}of{m}.onnx"
    onnx.save(model, str(src))
    x = modelzoo.random_inputs(model, batch=2, dims={"S": 4})
    original = initializers(src)
    out = work / f"mm{n}of{m}_lut.onnx"
    ctx = quantize(src, out, None, quantize="lut", bits=4, pattern=Pattern(n, m), nm_storage="compressed")
    inits = initializers(out)
    got = ort_values(out, [t.weight for t in ctx.artifacts["targets"]], x)
    for t in ctx.artifacts["targets"]:
        q = ctx.layers[t.name]["quant"]
        w = original[t.weight]
        assert q["storage"] == "nm-compressed"
        assert ("position_patterns" in q["packing"]) == (positions == "pattern")
        ref = numpy_decode(inits, q, w.shape)
        assert np.array_equal(got[t.weight].view(np.uint32), ref.view(np.uint32))
        assert np.all(ref[w == 0] == 0)
        groups = w.size // m
        pos_bytes = q["packing"]["sections"]["positions"]
        pos_bytes = pos_bytes[1] - pos_bytes[0]
        if positions == "pattern":
            k, f = radix_word(q["packing"]["position_patterns"])
            assert q["packing"]["position_word"] == [k, f]
            assert pos_bytes == k * -(-groups // f)
        else:
            assert pos_bytes == -(-groups * n // 4)  # 2-bit positions, four a byte


def test_uint8_scales_and_codebook_unit(work):
    """lut "tensor": one codebook (holding the unit) over per-channel uint8 scales in the code data."""
    out = work / "cnn_lut_tensor.onnx"
    ctx = quantize(MODELS / "digits_cnn.onnx", out, None, quantize="lut", bits=4, lut_granularity="tensor")
    inits = initializers(out)
    original = initializers(float_copy(MODELS / "digits_cnn.onnx", work / "cnn_fp32.onnx"))
    got = ort_values(out, [t.weight for t in ctx.artifacts["targets"]], {"input": digits_calib()["input"][:1]})
    for t in ctx.artifacts["targets"]:
        q = ctx.layers[t.name]["quant"]
        w = original[t.weight]
        a, b = q["packing"]["sections"]["scale"]
        scales = inits[q["initializers"]["codes"]][a:b]
        assert scales.dtype == np.uint8 and scales.size == w.shape[q["channel_axis"]] and scales.max() == 255
        assert np.array_equal(got[t.weight], numpy_decode(inits, q, w.shape))
        assert q["weight_scale_max"] == pytest.approx(float(np.abs(w).max()), rel=1e-6)
        assert q["weight_sqnr_db"] > 17  # 4-bit codes


def test_gather_table_is_coded_like_a_weight(work):
    model = modelzoo.bert_encoder(layers=1, hidden=64, heads=2, vocab=512)
    src = work / "bert1.onnx"
    onnx.save(model, str(src))
    feeds = [modelzoo.random_inputs(model, batch=2, dims={"S": 16}, seed=i) for i in range(2)]
    table = next(t.name for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] == 512)
    out = work / "bert1_lut.onnx"
    ctx = quantize(src, out, lambda: iter(feeds), quantize="lut", bits=4)
    s = ctx.artifacts["quantization"]
    (row,) = [r for r in s["tables"] if r["tensor"] == table]
    assert row["table"] == {"gather_axis": 0} and row["channel_axis"] == 0 and row["bits"] == 4
    inits = initializers(out)
    assert table not in inits
    got = ort_values(out, [table], feeds[0])[table]
    assert np.array_equal(got, numpy_decode(inits, row, (512, 64)))
    assert s["output_error"]["one_minus_cosine"] < 0.05
    # opt out: the table stays float (float16 storage as a parameter read by Gather)
    out2 = work / "bert1_lut_notable.onnx"
    ctx2 = quantize(src, out2, None, quantize="lut", bits=4, quantize_tables=False)
    assert ctx2.artifacts["quantization"]["tables"] == []
    assert table in ctx2.artifacts["quantization"]["float16_parameters"]["names"]
    assert os.path.getsize(out) < os.path.getsize(out2)


def test_float16_parameters(work):
    src = float_copy(MODELS / "digits_encoder.onnx", work / "enc_fp32.onnx")
    original = initializers(src)
    out = work / "enc_lut.onnx"
    ctx = quantize(src, out, None, quantize="lut", bits=4)
    params = ctx.artifacts["quantization"]["float16_parameters"]
    names = params["names"]
    assert {"blocks.0.attn.q.bias", "blocks.0.ln1.weight", "blocks.0.ln1.bias", "pos_embed"} <= set(names)
    assert "attn_scale" not in names and "head.bias" not in names  # fewer than 16 values stay float32
    inits = initializers(out)
    assert not set(names) & set(inits)
    blob = [a for a in inits.values() if a.dtype == np.float16 and a.size == params["values"]]
    assert len(blob) == 1 and params["bytes_after"] == blob[0].nbytes
    x = {"input": np.load(MODELS / "digits_encoder_calib.npz")["input"][:2]}
    got = ort_values(out, names, x)
    for n in names:  # the model computes exactly the float16 rounding of each parameter
        assert got[n].dtype == np.float32 and got[n].shape == original[n].shape
        assert np.array_equal(got[n], original[n].astype(np.float16).astype(np.float32))
    plain = work / "enc_lut_f32params.onnx"
    ctx2 = quantize(src, plain, None, quantize="lut", bits=4, float16_params=False)
    assert ctx2.artifacts["quantization"]["float16_parameters"] is None
    assert all(initializers(plain)[n].dtype == np.float32 for n in names)
    assert os.path.getsize(out) < os.path.getsize(plain) - params["bytes_after"] // 2
    # the rule: additive tensors within 2^-11 of their largest value, multiplicative ones value by value
    v = np.array([1.0, 1e-7, -0.5], np.float32)
    assert _fits_half(v) and not _fits_half(v, relative=True)
    assert not _fits_half(np.array([1e5], np.float32)) and not _fits_half(np.array([np.inf], np.float32))


@pytest.mark.parametrize("opset", [11, 17])  # Split's sizes: an attribute below opset 13, an input from 13
def test_float16_parameters_leave_other_tensors_alone(work, opset):
    """Only float32 tensors read solely in parameter slots become float16; everything else stays as it was."""
    from onnx import TensorProto as TP

    rng = np.random.default_rng(0)
    k = 32
    vals = {
        "w": rng.standard_normal((k, k)).astype(np.float32) * 0.1,
        "bias": rng.standard_normal(k).astype(np.float32),  # these two convert (one Split, a Reshape for the 2-D one)
        "bias2": rng.standard_normal((1, k)).astype(np.float32),
        "tiny_gain": np.where(np.arange(k) == 3, 1e-7, 1.0).astype(np.float32),  # a Mul operand: never converted
        "big": np.full(k, 1e5, np.float32),  # beyond float16's range
        "positions": np.arange(2040, 2040 + k).astype(np.float32),  # integers float16 cannot hold
        "relu_read": np.ones(k, np.float32),  # also read by a non-parameter op
        "if_read": np.ones(k, np.float32),  # also read inside a subgraph
        "as_input": np.ones(k, np.float32),  # an initializer that is also a graph input
        "as_output": np.ones(k, np.float32),  # a graph output
    }
    chain = ["bias", "bias2", "tiny_gain", "big", "positions", "relu_read", "if_read", "as_input", "as_output"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h0"])]
    for i, name in enumerate(chain):
        nodes.append(helper.make_node("Mul" if name == "tiny_gain" else "Add", [f"h{i}", name], [f"h{i + 1}"]))
    nodes.append(helper.make_node("Relu", ["relu_read"], ["r"]))
    branch = [helper.make_tensor_value_info("b", TP.FLOAT, [k])]
    then_g = helper.make_graph([helper.make_node("Identity", ["if_read"], ["b"])], "then", [], branch)
    else_g = helper.make_graph([helper.make_node("Identity", ["if_read"], ["b"])], "else", [], branch)
    nodes.append(helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True))))
    nodes.append(helper.make_node("If", ["cond"], ["i"], then_branch=then_g, else_branch=else_g))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["N", k]), helper.make_tensor_value_info("as_input", TP.FLOAT, [k])],
        [helper.make_tensor_value_info(n, TP.FLOAT, s) for n, s in ((f"h{len(chain)}", ["N", k]), ("as_output", [k]), ("r", [k]), ("i", [k]))],
        [numpy_helper.from_array(v, n) for n, v in vals.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    src = work / f"params{opset}.onnx"
    onnx.save(model, str(src))
    out = work / f"params{opset}_lut.onnx"
    ctx = quantize(src, out, None, quantize="lut", bits=4)
    onnx.checker.check_model(str(out), full_check=True)  # Split's form for the opset
    assert ctx.artifacts["quantization"]["float16_parameters"]["names"] == ["bias", "bias2"]
    inits = initializers(out)
    for n in chain[2:]:
        assert inits[n].dtype == np.float32 and np.array_equal(inits[n], vals[n])
    feed = {"x": rng.standard_normal((2, k)).astype(np.float32), "as_input": vals["as_input"]}
    got = ort_values(out, ["bias", "bias2", "positions"], feed)
    for n in ("bias", "bias2"):
        assert got[n].shape == vals[n].shape and np.array_equal(got[n], vals[n].astype(np.float16).astype(np.float32))
    assert np.array_equal(got["positions"], vals["positions"])


def test_encoder_lut_file_sizes_and_accuracy(work):
    """The issue's targets on the digits encoder: 4-bit LUT <= 0.2x the fp32 file; 2:4 smaller still."""
    from nmcompile.pipeline import compile_model

    test = MODELS / "digits_encoder_test.npz"
    dense_src = float_copy(MODELS / "digits_encoder.onnx", work / "enc_fp32b.onnx")
    dense = work / "enc_lut4.onnx"
    quantize(dense_src, dense, None, quantize="lut", bits=4)
    assert os.path.getsize(dense) <= 0.2 * os.path.getsize(dense_src)
    assert accuracy(dense, test) >= accuracy(MODELS / "digits_encoder.onnx", test) - 0.01
    sparse_src = work / "enc24.onnx"
    compile_model(MODELS / "digits_encoder.onnx", output=sparse_src, pattern="2:4")
    sizes = {}
    for storage in ("auto", "compressed", "dense"):
        out = work / f"enc24_lut4_{storage}.onnx"
        quantize(sparse_src, out, None, quantize="lut", bits=4, pattern=Pattern(2, 4), nm_storage=storage)
        sizes[storage] = os.path.getsize(out)
    # auto counts each decoding function once: never larger than either fixed choice
    assert sizes["auto"] <= min(sizes["compressed"], sizes["dense"])
    assert sizes["auto"] <= 0.15 * os.path.getsize(sparse_src)  # the 2:4 target


def test_created_names_are_short_and_the_graph_keeps_its_own(work):
    """What the pass creates is named short (bytes in the file); the user's names stay."""
    src = float_copy(MODELS / "digits_encoder.onnx", work / "enc_fp32_names.onnx")
    out = work / "enc_lut_names.onnx"
    ctx = quantize(src, out, None, quantize="lut", bits=4)
    m0, m1 = onnx.load(str(src)), onnx.load(str(out))
    assert [i.name for i in m1.graph.input] == [i.name for i in m0.graph.input]
    assert [o.name for o in m1.graph.output] == [o.name for o in m0.graph.output]
    old_nodes, new_nodes = {n.name for n in m0.graph.node}, {n.name for n in m1.graph.node}
    assert old_nodes <= new_nodes  # the report keys on them
    created = (new_nodes - old_nodes) | ({t.name for t in m1.graph.initializer} - {t.name for t in m0.graph.initializer})
    assert created and max(len(n) for n in created) <= 8
    fns = {f.name: f for f in m1.functions}
    assert sorted(fns) == [f"f{i}" for i in range(len(fns))]
    for t in ctx.artifacts["targets"]:
        q = ctx.layers[t.name]["quant"]
        assert q["decode_node"] in created and set(q["initializers"].values()) <= created
        assert fns[q["decode_function"].split(".", 1)[1]].doc_string == f"layout {q['decode_layout']}"
    assert ctx.artifacts["quantization"]["float16_parameters"]["initializer"] in created
