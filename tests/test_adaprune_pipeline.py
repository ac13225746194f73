"""Calibration end to end: accuracy kept on the shipped models, errors reduced, conversion, bad data."""

import json

import numpy as np
import onnx
import pytest

from conftest import MODELS
from nmcompile import modelzoo as zoo
from nmcompile.pipeline import compile_model


def accuracy(path, test_npz):
    import sys

    sys.path.insert(0, str(MODELS))
    from evaluate import accuracy as acc

    return acc(str(path), str(test_npz))


@pytest.mark.parametrize(
    "model,calib,test",
    [
        ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"),
        ("digits_encoder.onnx", "digits_encoder_calib.npz", "digits_encoder_test.npz"),
    ],
)
def test_calibrated_2_4_keeps_accuracy_where_magnitude_loses(tmp_path, model, calib, test):
    src = MODELS / model
    dense = accuracy(src, MODELS / test)
    magnitude = compile_model(src, output=tmp_path / "mag.onnx", pattern="2:4")
    calibrated = compile_model(src, output=tmp_path / "cal.onnx", pattern="2:4", calib=MODELS / calib)
    acc_mag = accuracy(magnitude.paths.model, MODELS / test)
    acc_cal = accuracy(calibrated.paths.model, MODELS / test)
    assert acc_cal >= dense - 0.005, (dense, acc_cal)
    assert acc_mag < acc_cal and dense - acc_mag > 0.005, (dense, acc_mag)
    for layer in calibrated.report["layers"]:
        if layer["skipped"] is None:
            assert layer["reconstruction_error_adaprune"] <= layer["reconstruction_error_masked"] + 1e-9
            assert 0 <= layer["reconstruction_error_adaprune"] < 1
            # real data pins the statistics down: little shrinkage, the 1% damping floor mostly
            assert layer["shrinkage"] < 0.1 and layer["damping"] == pytest.approx(max(0.01, layer["shrinkage"] / (1 - layer["shrinkage"])))
    # the pattern holds on the re-fitted weights
    from test_compile_layouts import effective_weights
    from nmcompile.passes.nm_mask import group_max_nonzeros

    for name, (w, axis) in effective_weights(calibrated.paths.model).items():
        layer = {l["name"]: l for l in calibrated.report["layers"]}[name]
        if layer["skipped"] is None:
            assert group_max_nonzeros(w, 4, axis) <= 2


def test_sequential_calibration_keeps_accuracy(tmp_path):
    src = MODELS / "digits_encoder.onnx"
    dense = accuracy(src, MODELS / "digits_encoder_test.npz")
    result = compile_model(src, output=tmp_path / "seq.onnx", calib=MODELS / "digits_encoder_calib.npz", sequential_calib=True)
    assert accuracy(result.paths.model, MODELS / "digits_encoder_test.npz") >= dense - 0.005
    assert result.report["options"]["calibration"]["sequential"] is True


def test_no_adaprune_chooses_masks_only(tmp_path):
    src = MODELS / "digits_cnn.onnx"
    result = compile_model(src, output=tmp_path / "m.onnx", calib=MODELS / "digits_calib.npz", adaprune=False)
    layer = [l for l in result.report["layers"] if l["skipped"] is None][0]
    assert "reconstruction_error_adaprune" not in layer and "retained_score" in layer


def test_matmul_without_bias_gets_one(tmp_path):
    """Bias correction adds an Add where the MatMul had no bias, and the graph still runs."""
    model = zoo.matmul_model(k=64, n=32)
    src = tmp_path / "mm.onnx"
    onnx.save(model, str(src))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=(rng.standard_normal((64, 4, 64)) + 0.5).astype(np.float32))
    result = compile_model(src, calib=tmp_path / "calib.npz")
    ops = [n.op_type for n in onnx.load(str(result.paths.model)).graph.node]
    assert ops.count("Add") == 2
    import onnxruntime as ort

    feeds = {"x": (rng.standard_normal((8, 4, 64)) + 0.5).astype(np.float32)}
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    out = ort.InferenceSession(str(result.paths.model), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    mag = compile_model(src, output=tmp_path / "mag.onnx")
    out_mag = ort.InferenceSession(str(mag.paths.model), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.linalg.norm(out - ref) < np.linalg.norm(out_mag - ref)
    # bias correction: the mean output matches the dense one better than without it
    assert abs((out - ref).mean()) < abs((out_mag - ref).mean()) + 1e-6


def test_pattern_conversion_counts_violations(tmp_path):
    src = MODELS / "digits_cnn.onnx"
    four_eight = compile_model(src, output=tmp_path / "48.onnx", pattern="4:8")
    result = compile_model(four_eight.paths.model, output=tmp_path / "24.onnx", pattern="2:4", calib=MODELS / "digits_calib.npz")
    before = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(four_eight.paths.model)).graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(result.paths.model)).graph.initializer}
    checked = 0
    for layer in result.report["layers"]:
        if layer["skipped"]:
            continue
        assert layer["existing_pattern"] == "4:8"
        w0, w1 = before[layer["weight"]], after[layer["weight"]]
        assert layer["violations"] == int(np.count_nonzero((w0 != 0) & (w1 == 0)))
        assert layer["violations"] > 0
        checked += 1
    assert checked == 4
    # AdaPrune recovers toward the 4:8 model it converts, better than converting by magnitude
    plain = compile_model(four_eight.paths.model, output=tmp_path / "24plain.onnx", pattern="2:4")
    test = MODELS / "digits_test.npz"
    acc_48, acc_cal, acc_plain = (accuracy(p, test) for p in (four_eight.paths.model, result.paths.model, plain.paths.model))
    assert acc_cal >= acc_48 - 0.01 and acc_cal >= acc_plain, (acc_48, acc_cal, acc_plain)


@pytest.mark.parametrize(
    "arrays,expect",
    [
        ({"wrong_name": np.zeros((4, 1, 8, 8), np.float32)}, "input"),
        ({"input": np.zeros((4, 1, 8, 8), np.float64)}, "dtype"),
        ({"input": np.zeros((4, 3, 8, 8), np.float32)}, "shape"),
        ({"input": np.where(np.arange(256).reshape(4, 1, 8, 8) == 77, np.nan, 1).astype(np.float32)}, "nan or inf (sample 1)"),
        # finite data whose activations overflow float32 inside the model
        ({"input": np.full((4, 1, 8, 8), 3e38, np.float32)}, "not finite"),
    ],
)
def test_bad_calibration_data(run_cli, tmp_path, arrays, expect):
    np.savez(tmp_path / "bad.npz", **arrays)
    src = tmp_path / "m.onnx"
    src.write_bytes((MODELS / "digits_cnn.onnx").read_bytes())
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(src, "--calib", tmp_path / "bad.npz")
    assert code == 2 and err.startswith("nmcompile: error:") and err.count("\n") == 1, err
    assert expect in err.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_inputs_sharing_a_symbolic_dimension_must_agree_on_it(run_cli, tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"], name="fc")], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", "S", 8]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 8])], [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", a=np.ones((4, 16, 8), np.float32), b=np.ones((4, 12, 8), np.float32))
    code, _, err = run_cli(tmp_path / "m.onnx", "--calib", tmp_path / "c.npz")
    assert code == 2 and err.count("\n") == 1 and "'a' and 'b' disagree on the model's dimension 'S' (16 vs 12)" in err, err
    assert not (tmp_path / "m.nm.onnx").exists()


def test_calibration_file_problems(run_cli, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes((MODELS / "digits_cnn.onnx").read_bytes())
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    for path in (tmp_path / "missing.npz", tmp_path / "corrupt.npz"):
        code, _, err = run_cli(src, "--calib", path)
        assert code == 2 and err.count("\n") == 1, err
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    code, _, err = run_cli(src, "--calib", empty)
    assert code == 2, err
    code, _, err = run_cli(src, "--mask-score", "obs")
    assert code == 2 and "--calib" in err


def test_calibrated_outputs_deterministic(tmp_path):
    outs = []
    for name in ("a", "b"):
        r = compile_model(MODELS / "digits_cnn.onnx", output=tmp_path / f"{name}.onnx", calib=MODELS / "digits_calib.npz")
        outs.append((r.paths.model.read_bytes(), json.loads(r.paths.report.read_text())))
    assert outs[0][0] == outs[1][0]
    assert outs[0][1]["layers"] == outs[1][1]["layers"]


def test_calibration_table_uses_absolute_maxima(tmp_path):
    from nmcompile.runtime.calib_table import read_calibration_table

    data = np.load(MODELS / "digits_calib.npz")["input"].copy()
    data[0, 0, 0, 0] = -50.0  # a range like (-50, 1): the table must say 50, not 1
    np.savez(tmp_path / "calib.npz", input=data)
    result = compile_model(MODELS / "digits_cnn.onnx", output=tmp_path / "t.onnx", calib=tmp_path / "calib.npz", calib_table=True)
    table = tmp_path / "trt_cache" / "t.calibration.cache"
    header, ranges = read_calibration_table(table)
    assert header.startswith("TRT-")
    assert abs(ranges["input"] - 50.0) < 1e-3
    assert len(ranges) > 5 and all(v > 0 for v in ranges.values())
    ep = json.loads(result.paths.ep.read_text())
    trt = dict(ep["providers"])["TensorrtExecutionProvider"]
    assert trt["trt_int8_calibration_table_name"] == "t.calibration.cache" and trt["trt_int8_enable"] is True
    assert json.loads(result.paths.report.read_text())["outputs"]["calibration_table"] == "trt_cache/t.calibration.cache"


def test_prune_refit_quantize_compose(tmp_path):
    """--pattern 2:4 --calib D --quantize int8: pruned, re-fitted, QDQ; zeros survive; accuracy holds."""
    src = MODELS / "digits_cnn.onnx"
    result = compile_model(src, output=tmp_path / "q.onnx", pattern="2:4", calib=MODELS / "digits_calib.npz", quantize="int8")
    model = onnx.load(str(result.paths.model))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    int8_weights = [v for k, v in inits.items() if v.dtype == np.int8 and v.ndim >= 2]
    assert len(int8_weights) == 5
    from nmcompile.passes.nm_mask import group_max_nonzeros

    pruned = [w for w in int8_weights if w.shape[1] % 4 == 0 and group_max_nonzeros(w, 4, 1) <= 2]
    assert len(pruned) == 4  # every pruned layer keeps its 2:4 zeros as int8 zeros
    ep = json.loads(result.paths.ep.read_text())
    assert dict(ep["providers"])["TensorrtExecutionProvider"]["trt_int8_enable"] is True
    assert result.report["quantization"]["mode"] == "int8"
    dense = accuracy(src, MODELS / "digits_test.npz")
    assert accuracy(result.paths.model, MODELS / "digits_test.npz") >= dense - 0.01


def test_quantize_without_pruning_and_bad_combinations(run_cli, tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes((MODELS / "digits_cnn.onnx").read_bytes())
    code, _, err = run_cli(src, "--pattern", "none", "--quantize", "lut", "--bits", "4", "-q")
    assert code == 0, err
    assert (tmp_path / "m.nm.onnx").stat().st_size < 0.2 * src.stat().st_size
    for args, expect in (
        (["--quantize", "int8"], "--calib"),
        (["--quantize", "lut", "--max-error", "-1"], "max-error"),
        (["--max-error", "0.01"], "--quantize"),
        (["--quantize", "fp4"], "quantize"),
    ):
        code, _, err = run_cli(src, *args)
        assert code == 2 and expect in err, (args, err)


def test_statistics_budget_chunks_give_the_same_model(tmp_path):
    """Calibrating in many small chunks (each from the dense model) equals calibrating all at once."""
    src = MODELS / "digits_encoder.onnx"
    calib = MODELS / "digits_encoder_calib.npz"
    whole = compile_model(src, output=tmp_path / "whole.onnx", calib=calib)
    chunked = compile_model(src, output=tmp_path / "chunked.onnx", calib=calib, stats_budget_mb=0.1)
    assert any("chunk" in n and not n.startswith("calibration in 1 ") for n in chunked.report["notes"])
    # Same masks; weights equal up to float rounding (ONNX Runtime optimizes a graph with
    # other extra outputs a little differently, so the Gram sums round differently).
    a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(whole.paths.model)).graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(chunked.paths.model)).graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name] == 0, b[name] == 0), name
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5)


def _two_layer_model(kind: str, alpha: float = 1.0) -> onnx.ModelProto:
    """x -> layer (output "a") -> Relu -> layer: weight-first MatMuls (Y = W·X), or Gemms with alpha."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((32, 16)).astype(np.float32)
    w2 = rng.standard_normal((8, 32)).astype(np.float32)
    if kind == "weight_first":  # x [N, 16, 6]: features on the second-to-last axis
        nodes = [helper.make_node("MatMul", ["w1", "x"], ["a"], name="mm1"), helper.make_node("Relu", ["a"], ["r"]),
                 helper.make_node("MatMul", ["w2", "r"], ["y"], name="mm2")]
        x, y = ["N", 16, 6], ["N", 8, 6]
    else:
        nodes = [helper.make_node("Gemm", ["x", "w1"], ["a"], name="g1", transB=1, alpha=alpha),
                 helper.make_node("Relu", ["a"], ["r"]),
                 helper.make_node("Gemm", ["r", "w2"], ["y"], name="g2", transB=1, alpha=alpha)]
        x, y = ["N", 16], ["N", 8]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
                              [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _with_output(path, name, out):
    m = onnx.load(str(path))
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(m, str(out))
    return out


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("kind,alpha", [("weight_first", 1.0), ("gemm", 0.5)])
def test_bias_correction_keeps_the_output_mean(tmp_path, kind, alpha, sequential):
    # the new bias runs along the output axis (second-to-last for Y = W·X) and
    # undoes Gemm's alpha: the compiled model loads and keeps the first layer's
    # mean output over the calibration data
    import onnxruntime as ort

    src = tmp_path / "m.onnx"
    onnx.save(_two_layer_model(kind, alpha), str(src))
    x = np.random.default_rng(4).standard_normal((64, 16, 6) if kind == "weight_first" else (256, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    out = compile_model(src, output=tmp_path / "o.onnx", calib=tmp_path / "c.npz", sequential_calib=sequential)
    first = next(row for row in out.report["layers"] if row["name"] in ("mm1", "g1"))
    assert first["reconstruction_error_adaprune"] < first["reconstruction_error_masked"]

    def first_layer_mean(path, probe):
        sess = ort.InferenceSession(str(_with_output(path, "a", probe)), providers=["CPUExecutionProvider"])
        a = sess.run(["a"], {"x": x})[0]
        return a.mean(axis=(0, 2)) if kind == "weight_first" else a.mean(axis=0)

    dense, compiled = first_layer_mean(src, tmp_path / "d.onnx"), first_layer_mean(out.paths.model, tmp_path / "p.onnx")
    np.testing.assert_allclose(compiled, dense, atol=1e-4 * np.abs(dense).max())


@pytest.mark.parametrize("op", ["MatMul", "Conv"])
def test_new_bias_of_a_float16_layer_is_float16(tmp_path, op):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if op == "MatMul":
        w = (rng.standard_normal((64, 32)) / 8).astype(np.float16)
        x = rng.standard_normal((64, 64)).astype(np.float16)
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")
        x_shape, y_shape = ["N", 64], ["N", 32]
    else:
        w = (rng.standard_normal((32, 16, 3, 3)) / 8).astype(np.float16)
        x = rng.standard_normal((16, 16, 8, 8)).astype(np.float16)
        node = helper.make_node("Conv", ["x", "W"], ["y"], name="fc", kernel_shape=[3, 3], pads=[1] * 4)
        x_shape, y_shape = ["N", 16, 8, 8], ["N", 32, 8, 8]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, y_shape)], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=x)
    out = compile_model(tmp_path / "m.onnx", output=tmp_path / "o.onnx", pattern="2:4", calib=tmp_path / "c.npz")
    compiled = onnx.load(out.paths.model)
    new = [t for t in compiled.graph.initializer if t.name != "W"]
    assert new and all(t.data_type == TensorProto.FLOAT16 for t in new)  # the bias the mean shift added
    onnx.checker.check_model(compiled, full_check=True)
    y = ort.InferenceSession(str(out.paths.model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert y.dtype == np.float16 and np.isfinite(y).all()


def test_sequential_targets_are_damped_toward_the_dense_weights():
    from nmcompile.passes import adaprune as ad

    rng = np.random.default_rng(1)
    K, O = 24, 5
    W = rng.standard_normal((O, K))
    X = rng.standard_normal((8, K))  # fewer samples than K: the data leaves most directions free
    H = X.T @ X
    # the compressed model's inputs equal the dense ones (a first layer): W itself
    np.testing.assert_allclose(ad.target_weights(H.copy(), H @ W.T, 0.01, W), W, rtol=1e-9, atol=1e-9)
    # no signal at all: W, not zero
    np.testing.assert_array_equal(ad.target_weights(np.zeros((K, K)), np.zeros((K, O)), 0.01, W), W)
    # otherwise the damped least squares toward W: (H + λI) W̃ᵀ = Σ x_s (W x_d)ᵀ + λWᵀ
    Xd = X + 0.1 * rng.standard_normal(X.shape)
    T = X.T @ (Xd @ W.T)
    lam = 0.01 * np.mean(np.diag(H))
    want = np.linalg.solve(H + lam * np.eye(K), T + lam * W.T).T
    np.testing.assert_allclose(ad.target_weights(H.copy(), T, 0.01, W), want, rtol=1e-8, atol=1e-10)
    # undamped with collinear inputs (a duplicated column): Cholesky fails, least squares on the intact H
    Xc = np.hstack([X[:, :K - 1], X[:, :1]])
    Hc = Xc.T @ Xc
    Tc = Xc.T @ (Xc @ W.T)
    got = ad.target_weights(Hc.copy(), Tc, 0.0, W)
    np.testing.assert_allclose(Hc @ got.T, Tc, rtol=1e-6, atol=1e-6 * np.abs(Tc).max())


def test_fewer_calibration_vectors_than_inputs_is_flagged(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from nmcompile.summary import format_summary

    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    for samples, flagged in ((8, True), (64, False)):
        np.savez(tmp_path / "c.npz", x=rng.standard_normal((samples, 64)).astype(np.float32))
        for seq in (False, True):
            result = compile_model(tmp_path / "m.onnx", output=tmp_path / "o.onnx", pattern="2:4", calib=tmp_path / "c.npz",
                                   sequential_calib=seq)
            (row,) = result.report["layers"]
            assert row["calibration_vectors"] == samples
            assert ("calibration_warning" in row) == flagged
            assert ("warning: 1 layer(s) saw fewer calibration vectors" in format_summary(result)) == flagged


def test_layers_calibration_cannot_fit_are_named_on_the_terminal(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from nmcompile.summary import format_summary

    w = np.random.default_rng(4).standard_normal((1, 16, 8)).astype(np.float32)  # a batched (3-D) MatMul weight
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="bmm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8])], [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.ones((8, 4, 16), np.float32))
    result = compile_model(tmp_path / "m.onnx", output=tmp_path / "o.onnx", pattern="2:4", calib=tmp_path / "c.npz")
    (row,) = result.report["layers"]
    assert row["calibration"].startswith("skipped") and row["sparsity"] == 0.5
    assert "note: 1 pruned layer(s) kept magnitude masks without a re-fit (e.g. bmm: batched" in format_summary(result)


@pytest.mark.parametrize("pattern,sequential", [("2:4", False), ("2:4", True), ("4:8", False)])
def test_refit_of_weights_that_already_follow_the_pattern(tmp_path, pattern, sequential):
    # weights read straight from the file (no BatchNorm folded, no zeros to set): the
    # re-fit must write a copy, not into the read-only map of the input
    from nmcompile.passes.nm_mask import prune_nm

    model = zoo.matmul_model(k=64, n=32)
    for t in model.graph.initializer:
        w = onnx.numpy_helper.to_array(t)
        if w.ndim == 2:
            t.CopyFrom(onnx.numpy_helper.from_array(prune_nm(w, 2, 4, 0)[0], t.name))
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((64, 5, 64)).astype(np.float32))
    before = src.read_bytes()
    result = compile_model(src, output=tmp_path / "o.onnx", pattern=pattern, calib=tmp_path / "c.npz", sequential_calib=sequential)
    assert src.read_bytes() == before
    fitted = [row for row in result.report["layers"] if row.get("reconstruction_error_adaprune") is not None]
    assert fitted and all(row["existing_pattern"] == "2:4" and row["violations"] == 0 for row in fitted)
    assert all(row["reconstruction_error_adaprune"] < 1e-3 for row in fitted)  # it already was what it fits
    after = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(result.paths.model)).graph.initializer}
    for t in model.graph.initializer:
        w = onnx.numpy_helper.to_array(t)
        if w.ndim == 2:
            assert np.array_equal(after[t.name] == 0, w == 0)  # the support is kept


def test_product_of_two_weights_is_masked_without_a_refit(tmp_path):
    # MatMul(A, B) of two initializers (a factored weight): no calibration data flows
    # through it, so it keeps a magnitude mask and says why (was an internal error)
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["AB"], name="constmm"),
                               helper.make_node("MatMul", ["x", "AB"], ["y"], name="mm")], "g",
                              [vi("x", 1, ["N", 32])], [vi("y", 1, ["N", 16])],
                              [numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "A"),
                               numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "B")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((64, 32)).astype(np.float32))
    for quantize in (None, "int8"):
        result = compile_model(tmp_path / "m.onnx", tmp_path / "o.onnx", calib=tmp_path / "c.npz", quantize=quantize)
        rows = {row["name"]: row for row in result.report["layers"]}
        assert rows["constmm"]["calibration"].startswith("skipped: its layer input is a constant as well")
        assert rows["constmm"]["sparsity"] == pytest.approx(0.5)
