"""Compile every weight layout, reload the saved file, check the pattern on the weights the graph computes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from nmcompile import modelzoo as zoo
from nmcompile.graphio import load_model
from nmcompile.passes.canonicalize import ConstantsToInitializers, NameNodes
from nmcompile.passes.base import CompileContext
from nmcompile.passes.nm_mask import group_max_nonzeros
from nmcompile.passes.targets import WeightView, find_targets
from nmcompile.pipeline import compile_model


def run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def stored(path, name):
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[name]


def effective_weights(path):
    """{layer: (effective weight, reduction axis)} read back from a saved model."""
    loaded = load_model(path)
    ctx = CompileContext(model=loaded, options=None)
    NameNodes()(ctx)
    ConstantsToInitializers()(ctx)
    out = {}
    for t in find_targets(loaded):
        out[t.name] = (WeightView(loaded, t.weight, t.primary).effective(), t.primary.red_axis)
    return out


def compile_and_check(tmp_path, model, pattern="2:4", expect_pruned=None, expect_dense=(), **kw):
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    result = compile_model(src, pattern=pattern, **kw)
    out = result.paths.model
    onnx.checker.check_model(str(out))
    feeds = zoo.random_inputs(model)
    ref, got = run(src, feeds), run(out, feeds)
    assert [r.shape for r in ref] == [g.shape for g in got]
    assert all(np.all(np.isfinite(g)) for g in got)
    n, m = (int(x) for x in pattern.split(":"))
    weights = effective_weights(out)
    layers = {l["name"]: l for l in result.report["layers"]}
    for name in expect_pruned or [l for l in layers if not layers[l]["skipped"]]:
        w, axis = weights[name]
        assert group_max_nonzeros(w, m, axis) <= n, name
        assert layers[name]["skipped"] is None
        assert layers[name]["sparsity"] >= 1 - n / m - 1e-9
    for name in expect_dense:
        assert layers[name]["skipped"], name
    return result, src, out


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_groups_along_k(tmp_path, trans_b):
    result, src, out = compile_and_check(tmp_path, zoo.gemm_model(trans_b=trans_b), expect_pruned=["gemm"])
    w = stored(out, onnx.load(str(out)).graph.node[0].input[1])
    k_axis = 1 if trans_b else 0
    assert group_max_nonzeros(w, 4, k_axis) == 2
    # the other axis is NOT grouped 2:4 in general: proves the axis choice matters
    assert w.shape[1 - k_axis] % 4 == 0 and group_max_nonzeros(w, 4, 1 - k_axis) > 2


def test_matmul(tmp_path):
    compile_and_check(tmp_path, zoo.matmul_model(), expect_pruned=["mm1", "mm2"])


@pytest.mark.parametrize("pattern", ["1:4", "4:8", "2:8", "8:16", "16:32"])
def test_other_patterns(tmp_path, pattern):
    compile_and_check(tmp_path, zoo.matmul_model(k=64, n=32), pattern=pattern, expect_pruned=["mm1", "mm2"])


def test_grouped_conv_groups_within_each_group(tmp_path):
    result, src, out = compile_and_check(tmp_path, zoo.conv_model(group=2), expect_pruned=["conv", "head"], expect_dense=["stem"])
    assert "not a multiple" in {l["name"]: l for l in result.report["layers"]}["stem"]["skipped"]


def test_depthwise_stays_dense(tmp_path):
    result, _, _ = compile_and_check(tmp_path, zoo.conv_model(depthwise=True), expect_pruned=["head"], expect_dense=["dw"])
    assert "depthwise" in {l["name"]: l for l in result.report["layers"]}["dw"]["skipped"]


def test_conv_bn_is_folded_before_pruning(tmp_path):
    model = zoo.conv_model(bn=True)
    src = tmp_path / "bn.onnx"
    onnx.save(model, str(src))
    dense = compile_model(src, output=tmp_path / "dense.onnx", pattern=None)
    ops = [n.op_type for n in onnx.load(str(dense.paths.model)).graph.node]
    assert "BatchNormalization" not in ops
    feeds = zoo.random_inputs(model)
    np.testing.assert_allclose(run(src, feeds)[0], run(dense.paths.model, feeds)[0], rtol=1e-4, atol=1e-4)
    # pruning then acts on the folded weight's magnitudes
    result, _, out = compile_and_check(tmp_path, model, expect_pruned=["conv", "head"])
    folded = effective_weights(dense.paths.model)["conv"][0]
    pruned = effective_weights(out)["conv"][0]
    groups = np.moveaxis(np.abs(folded), 1, -1).reshape(-1, 4)
    order = np.argsort(-groups, axis=1, kind="stable")[:, :2]
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order, True, axis=1)
    expected = np.moveaxis(keep.reshape(np.moveaxis(folded, 1, -1).shape), -1, 1)
    assert np.array_equal(pruned != 0, expected & (folded != 0))


@pytest.mark.parametrize("kind", ["transpose", "cast", "reshape", "identity", "dq", "transpose_reshape"])
def test_weight_behind_see_through_ops(tmp_path, kind):
    result, src, out = compile_and_check(tmp_path, zoo.chain_model(kind), expect_pruned=["mm"])
    # the stored initializer itself carries the zeros (for dq: the zero point)
    w_eff = effective_weights(out)["mm"][0]
    assert np.count_nonzero(w_eff == 0) == w_eff.size // 2


def test_transpose_weight_groups_along_stored_axis_1(tmp_path):
    _, _, out = compile_and_check(tmp_path, zoo.chain_model("transpose"), expect_pruned=["mm"])
    model = onnx.load(str(out))
    t = model.graph.node[0]
    assert t.op_type == "Transpose"
    w = stored(out, t.input[0])  # [N, K]: K is axis 1
    assert group_max_nonzeros(w, 4, 1) == 2


def test_shared_weight_pruned_once(tmp_path):
    result, _, out = compile_and_check(tmp_path, zoo.shared_weight_model(), expect_pruned=["use1"])
    layers = result.report["layers"]
    assert len(layers) == 1 and layers[0]["nodes"] == ["use1", "use2"]
    assert group_max_nonzeros(stored(out, "shared_w"), 4, 0) == 2


def test_shared_weight_with_conflicting_uses_stays_dense(tmp_path):
    """One [64, 32] weight: a MatMul reduces it along 64, a 1x1 Conv (through Reshape) along 32."""
    from onnx import helper

    b = zoo.Builder(0)
    w = b.weight(64, 32, fan_in=64, name="shared_w")
    mm = b.node("MatMul", ["x", w], name="mm")
    kernel = b.node("Reshape", [w, b.const(np.array([64, 32, 1, 1], np.int64))])
    b.nodes.append(helper.make_node("Conv", ["img", kernel], ["y2"], name="conv", kernel_shape=[1, 1]))
    b.nodes.append(helper.make_node("Identity", [mm], ["y1"], name="out"))
    model = b.model(
        [zoo._vi("x", ["N", 64]), zoo._vi("img", ["N", 32, 4, 4])],
        [zoo._vi("y1", ["N", 32]), zoo._vi("y2", ["N", 64, 4, 4])],
    )
    result, _, out = compile_and_check(tmp_path, model, expect_dense=["mm"])
    assert "different" in result.report["layers"][0]["skipped"]
    assert np.count_nonzero(stored(out, "shared_w") == 0) == 0


def test_constant_node_weight(tmp_path):
    compile_and_check(tmp_path, zoo.constant_node_model(), expect_pruned=["mm"])


def test_exclude_glob(tmp_path):
    result, _, _ = compile_and_check(tmp_path, zoo.matmul_model(), expect_pruned=["mm1"], expect_dense=["mm2"], exclude=["mm2*"])
    assert "exclude" in {l["name"]: l for l in result.report["layers"]}["mm2"]["skipped"]


def test_sequential_option(tmp_path):
    result, _, out = compile_and_check(tmp_path, zoo.gemm_model(trans_b=1), pattern="4:8", sequential=True)
    w = stored(out, onnx.load(str(out)).graph.node[0].input[1])
    for group in (w != 0).reshape(-1, 8):
        pruned = np.flatnonzero(~group)
        assert len(pruned) == 4 and np.all(np.diff(pruned) == 1)


@pytest.mark.parametrize("opset", [13, 17, 21])
def test_opsets(tmp_path, opset):
    compile_and_check(tmp_path, zoo.conv_model(bn=True, opset=opset), expect_pruned=["conv", "head"])


def test_external_data_in_and_out(tmp_path):
    model = zoo.matmul_model(k=256, n=128)
    src = tmp_path / "ext.onnx"
    zoo.save_with_external_data(model, src)
    assert (tmp_path / "ext.onnx.data").exists()
    result = compile_model(src)
    out = result.paths.model
    assert result.data_path is not None and result.data_path.exists()
    onnx.checker.check_model(str(out))
    feeds = zoo.random_inputs(model)
    assert run(out, feeds)[0].shape == run(src, feeds)[0].shape
    w = effective_weights(out)["mm1"][0]
    assert group_max_nonzeros(w, 4, 0) == 2
    # the input's files are untouched
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_resnet50_shaped(tmp_path):
    result, _, _ = compile_and_check(tmp_path, zoo.resnet50(width=0.25, image=32, classes=16), expect_dense=["conv1"])
    totals = result.report["totals"]
    assert totals["pruned_layers"] == 53 and totals["layers"] == 54
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(result.paths.model)).graph.node)


def test_bert_encoder(tmp_path):
    result, _, _ = compile_and_check(tmp_path, zoo.bert_encoder(layers=2, hidden=64, heads=4))
    assert result.report["totals"]["pruned_layers"] == 12


def test_shipped_models_compile(tmp_path):
    from conftest import MODELS

    for name in ("digits_cnn.onnx", "digits_encoder.onnx"):
        model = onnx.load(str(MODELS / name))
        compile_and_check(tmp_path, model)


def test_large_output_switches_to_external_data(tmp_path, monkeypatch):
    """Past the protobuf limit the output goes to external data; the limit is lowered here to test the path."""
    from nmcompile import graphio

    monkeypatch.setattr(graphio, "INLINE_LIMIT_BYTES", 10_000)
    model = zoo.matmul_model(k=128, n=64)
    src = tmp_path / "inline.onnx"
    onnx.save(model, str(src))
    result = compile_model(src)
    assert result.data_path is not None and result.data_path.stat().st_size > 10_000
    onnx.checker.check_model(str(result.paths.model))
    feeds = zoo.random_inputs(model)
    assert run(result.paths.model, feeds)[0].shape == run(src, feeds)[0].shape
    assert group_max_nonzeros(effective_weights(result.paths.model)["mm1"][0], 4, 0) == 2


def test_bfloat16_weight_behind_a_cast(tmp_path):
    # exporters store bfloat16 checkpoints as raw bytes, Cast to float before the MatMul
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)
    wb = helper.make_tensor("wb", TensorProto.BFLOAT16, [32, 16], vals=bits.tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("Cast", ["wb"], ["w"], to=TensorProto.FLOAT),
                               helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], [wb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((64, 32)).astype(np.float32))
    for kw in ({}, {"calib": tmp_path / "c.npz"}):
        _, _, out = compile_and_check(tmp_path, model, expect_pruned=["mm"], **kw)
        assert {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}["wb"] == TensorProto.BFLOAT16


def test_layers_inside_subgraphs_are_named_as_left_alone(tmp_path):
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    w = lambda *s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), f"w{len(s)}{s[0]}{rng.integers(1e6)}")
    then_w, else_w = w(32, 32), w(32, 32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", then_w.name], ["ty"], name="then_mm")], "then", [],
                               [vi("ty", TensorProto.FLOAT, ["N", 32])], [then_w])
    else_g = helper.make_graph([helper.make_node("Identity", ["h"], ["ey"])], "else", [], [vi("ey", TensorProto.FLOAT, ["N", 32])])
    outer = w(32, 32)
    graph = helper.make_graph([
        helper.make_node("MatMul", ["x", outer.name], ["h"], name="outer_mm"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
        "g", [vi("x", TensorProto.FLOAT, ["N", 32]), vi("cond", TensorProto.BOOL, [])], [vi("y", TensorProto.FLOAT, ["N", 32])], [outer, else_w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(tmp_path / "m.onnx"))
    result = compile_model(tmp_path / "m.onnx", tmp_path / "o.onnx")
    assert [row["name"] for row in result.report["layers"]] == ["outer_mm"]
    assert any("1 MatMul/Gemm/Conv node(s) inside If/Loop/Scan subgraphs left as they are (then_mm)" in n
               for n in result.report["notes"])


def test_sequential_keeps_a_transposed_shared_weight_dense(tmp_path):
    # no sequential mask holds along both axes: dense with the reason, not a transposable mask labelled -seq
    result = compile_model_to(tmp_path, zoo.shared_weight_model(transposed_second_use=True), sequential=True)
    (row,) = result.report["layers"]
    assert row["pattern"] is None and "no sequential mask holds both ways" in row["skipped"]
    assert row["sparsity"] == 0.0


def compile_model_to(tmp_path, model, **kw):
    onnx.save(model, str(tmp_path / "m.onnx"))
    return compile_model(tmp_path / "m.onnx", tmp_path / "o.onnx", **kw)


def test_weight_that_is_also_a_graph_output_is_noted(tmp_path):
    from onnx import helper

    vi = helper.make_tensor_value_info
    w = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
                               helper.make_node("Identity", ["W"], ["W_out"], name="idw")], "g",
                              [vi("x", 1, ["N", 32])], [vi("y", 1, ["N", 16]), vi("W_out", 1, [32, 16])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = compile_model_to(tmp_path, model)
    (row,) = result.report["layers"]
    assert "also a graph output (W_out): pruned there too" in row["notes"]
    from nmcompile.summary import format_summary

    assert "note: mm: also a graph output (W_out): pruned there too" in format_summary(result)
