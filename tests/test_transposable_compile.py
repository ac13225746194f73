"""--transposable end to end: W and W^T of every compiled layer are N:M, read back from the saved model."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from nmcompile import modelzoo as zoo
from nmcompile.pipeline import compile_model
from test_compile_layouts import effective_weights


def tiles_ok(w, out_axis, red_axis, n, m):
    mats = np.moveaxis(w != 0, (out_axis, red_axis), (-2, -1))
    p, rows, cols = (-1,) + mats.shape[-2:]
    t = mats.reshape(-1, rows // m, m, cols // m, m)
    return t.sum(axis=4).max() <= n and t.sum(axis=2).max() <= n


@pytest.mark.parametrize("pattern,solver", [("2:4", "exact"), ("4:8", "exact"), ("4:8", "approx"), ("8:16", "auto")])
def test_transposable_layers_are_nm_both_ways(tmp_path, pattern, solver):
    n, m = map(int, pattern.split(":"))
    model = zoo.resnet50(width=0.25, image=32, classes=16)
    src = tmp_path / "rn.onnx"
    onnx.save(model, str(src))
    result = compile_model(src, pattern=pattern, transposable=True, solver=solver)
    weights = effective_weights(result.paths.model)
    layers = {l["name"]: l for l in result.report["layers"]}
    transposed = 0
    for name, layer in layers.items():
        if layer["skipped"]:
            continue
        w, red = weights[name]
        if layer.get("transposable"):
            transposed += 1
            assert tiles_ok(w, 0, red, n, m), name
            # W^T is N:M along its own reduction axis: groups of m output channels
            wt = np.moveaxis(w, 0, 1)
            assert np.moveaxis(wt != 0, 1, -1).reshape(-1, m).sum(axis=1).max() <= n
            assert layer["solver"] in ("exact", "approx")
            assert 0.9 < layer["optimality"] <= 1.0 + 1e-9
            assert layer["retained_l1"] <= layer["retained_plain_nm"] + 1e-9
        else:
            assert any("does not tile" in note for note in layer.get("notes", [])), name
    assert transposed >= 40
    feeds = zoo.random_inputs(model)
    out = ort.InferenceSession(str(result.paths.model), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert np.all(np.isfinite(out[0]))


def test_shared_weight_used_transposed_gets_transposable_mask(tmp_path):
    model = zoo.shared_weight_model(transposed_second_use=True)
    src = tmp_path / "shared.onnx"
    onnx.save(model, str(src))
    result = compile_model(src, pattern="2:4")
    layer = result.report["layers"][0]
    assert layer["skipped"] is None and layer["transposable"] is True
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(result.paths.model)).graph.initializer}["shared_w"]
    for axis in (0, 1):  # N:M along both axes: both uses are 2:4
        assert np.moveaxis(stored != 0, axis, -1).reshape(-1, 4).sum(axis=1).max() <= 2


def test_transposable_with_sequential_is_refused(run_cli, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(zoo.matmul_model(), str(src))
    code, _, err = run_cli(src, "--transposable", "--sequential")
    assert code == 2 and "cannot be combined" in err
