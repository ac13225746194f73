"""permute-channels: the permuted graph computes the same function, and N:M keeps more."""

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nmcompile import graphio, modelzoo
from nmcompile.passes.base import CompileContext, PassManager
from nmcompile.passes.canonicalize import canonicalize_passes
from nmcompile.passes.nm_mask import NMMask
from nmcompile.passes.permute import PermuteChannels, retained, search_permutation
from nmcompile.passes.targets import FindTargets, WeightView
from nmcompile.patterns import Pattern

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits_cnn.onnx"


def options(n=2, m=4, permute=True):
    return SimpleNamespace(
        pattern=Pattern(n, m), permute=permute, exclude=(), progress=False, sequential=False, transposable=False, solver="auto"
    )


def permute_model(src: Path, tmp_path: Path, canonicalize=True, n=2, m=4, scores=None, prune=False, permute=True):
    loaded = graphio.load_model(src)
    ctx = CompileContext(model=loaded, options=options(n, m, permute))
    passes = (canonicalize_passes() if canonicalize else []) + [FindTargets()]
    PassManager(passes)(ctx)
    if scores is not None:
        ctx.artifacts["scores"] = scores(ctx)
    PermuteChannels()(ctx)
    if prune:
        NMMask()(ctx)
    out = tmp_path / (src.stem + (".perm" if permute else ".plain") + (".pruned" if prune else "") + ".onnx")
    with graphio.AtomicWriter() as w:
        graphio.save_model(loaded, out, w)
    return ctx, out


def outputs(path: Path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_same_function(src: Path, out: Path, feeds=None):
    feeds = feeds or modelzoo.random_inputs(onnx.load(str(src)))
    for a, b in zip(outputs(src, feeds), outputs(out, feeds)):
        scale = float(np.max(np.abs(a))) or 1.0
        assert np.max(np.abs(a - b)) <= 2e-5 * scale


def permute_rows(ctx):
    return {name: row["permute"] for name, row in ctx.layers.items() if "permute" in row}


def check_rows(ctx, expect_applied=()):
    rows = permute_rows(ctx)
    for name in expect_applied:
        assert rows[name]["applied"], (name, rows[name])
    for name, row in rows.items():
        assert set(row) >= {"applied", "retained_before", "retained_after", "producer", "reason"}
        if row["applied"] and row["retained_before"] is not None:
            assert row["retained_after"] > row["retained_before"]
            assert row["producer"]
            assert row["reason"] is None
            assert name in ctx.artifacts["permutations"]
        if not row["applied"]:
            assert row["reason"], name
            assert name not in ctx.artifacts["permutations"]
    return rows


def save(model, path):
    onnx.save(model, str(path))
    return path


# -- the search ------------------------------------------------------------------


def _partitions(items, m):
    if not items:
        yield []
        return
    first = items[0]
    for rest in itertools.combinations(items[1:], m - 1):
        group = (first,) + rest
        left = [x for x in items if x not in group]
        for tail in _partitions(left, m):
            yield [group] + tail


def brute_force(S, n, m):
    best = -1.0
    for part in _partitions(list(range(S.shape[0])), m):
        best = max(best, retained(S, n, m, np.array([c for g in part for c in g])))
    return best


def random_scores(rng, k, rows):
    return np.abs(rng.standard_normal((k, rows)) * rng.uniform(0.2, 2.0, size=(k, 1))).astype(np.float32)


def test_search_finds_the_optimum_for_two_groups():
    """K=8, 2:4: every split into two groups is one move of the search, so it must be optimal."""
    rng = np.random.default_rng(0)
    for _ in range(25):
        S = random_scores(rng, 8, int(rng.integers(1, 20)))
        res = search_permutation(S, 2, 4)
        assert res.after == pytest.approx(brute_force(S, 2, 4), rel=1e-6)
        assert sorted(res.perm.tolist()) == list(range(8))


@pytest.mark.parametrize("n,m,k,cases,max_gap,mean_gap", [(2, 4, 12, 12, 0.01, 0.003), (4, 8, 16, 4, 0.02, 0.01), (1, 4, 12, 6, 0.02, 0.006)])
def test_search_is_close_to_brute_force(n, m, k, cases, max_gap, mean_gap):
    """Three or more groups: pairwise moves can miss the optimum; the gap stays small (printed)."""
    rng = np.random.default_rng(k + n)
    gaps, gains = [], []
    for _ in range(cases):
        S = random_scores(rng, k, int(rng.integers(2, 12)))
        res = search_permutation(S, n, m)
        best = brute_force(S, n, m)
        assert res.before <= res.after <= best * (1 + 1e-6)
        assert res.after == pytest.approx(retained(S, n, m, res.perm), rel=1e-6)
        gaps.append((best - res.after) / best)
        gains.append((res.after - res.before) / res.before)
    print(f"{n}:{m} K={k}: gap to optimum max {max(gaps):.4%} mean {np.mean(gaps):.4%}; gain over identity mean {np.mean(gains):.3%}")
    assert max(gaps) <= max_gap and np.mean(gaps) <= mean_gap


def test_search_improves_random_weights_and_is_deterministic():
    rng = np.random.default_rng(1)
    gains = []
    for k, rows in [(32, 64), (64, 9 * 16), (128, 32), (256, 256)]:
        S = np.abs(rng.standard_normal((k, rows))).astype(np.float32)
        a = search_permutation(S, 2, 4)
        b = search_permutation(S.copy(), 2, 4)
        assert np.array_equal(a.perm, b.perm)
        assert a.after >= a.before
        assert a.after == pytest.approx(retained(S, 2, 4, a.perm), rel=1e-6)
        gains.append(a.after / a.before - 1)
    assert min(gains) > 0 and np.mean(gains) > 0.003


def test_search_degenerate_inputs():
    S = np.ones((8, 3), np.float32)  # all ties: nothing to gain, identity kept
    res = search_permutation(S, 2, 4)
    assert res.after == res.before and np.array_equal(res.perm, np.arange(8))
    res = search_permutation(np.zeros((4, 5), np.float32), 2, 4)  # one group
    assert np.array_equal(res.perm, np.arange(4))
    with pytest.raises(ValueError):
        search_permutation(np.ones((6, 2), np.float32), 2, 4)


# -- whole models: same function ---------------------------------------------------------


@pytest.mark.parametrize(
    "build,applied",
    [
        (lambda: modelzoo.conv_model(bn=True), ["conv", "head"]),
        (lambda: modelzoo.conv_model(group=2), ["conv", "head"]),
        (lambda: modelzoo.conv_model(depthwise=True), ["head"]),  # through the depthwise conv
        (lambda: modelzoo.matmul_model(), ["mm2"]),
        (lambda: modelzoo.bert_encoder(layers=1, hidden=64), ["layer0.output"]),  # through GELU's diamond
    ],
    ids=["conv_bn", "conv_grouped", "conv_depthwise", "matmul_relu_matmul", "bert_mlp"],
)
def test_small_models_keep_their_function(tmp_path, build, applied):
    src = save(build(), tmp_path / "m.onnx")
    ctx, out = permute_model(src, tmp_path)
    rows = check_rows(ctx, applied)
    assert_same_function(src, out)
    if "layer0.output" in applied:
        assert rows["layer0.output"]["producer"] == "layer0.intermediate"
        assert "LayerNormalization" in rows["layer0.intermediate"]["reason"]
        assert "Reshape" in rows["layer0.attention.output"]["reason"]
    if "mm2" in applied:
        assert "graph input" in rows["mm1"]["reason"]


@pytest.mark.parametrize("fold", [True, False], ids=["bn_folded", "bn_kept"])
def test_resnet_keeps_its_function(tmp_path, fold):
    src = save(modelzoo.resnet50(width=0.25, image=32, classes=16), tmp_path / "r.onnx")
    ctx, out = permute_model(src, tmp_path, canonicalize=fold)
    rows = check_rows(ctx, ["layer1.0.conv2", "layer1.0.conv3", "layer4.2.conv3"])
    assert_same_function(src, out)
    # conv2/conv3 of every block (16 x 2) and the first block's conv1 + downsample, which share conv1's output
    assert sum(r["applied"] for r in rows.values()) == 34
    perms = ctx.artifacts["permutations"]
    assert np.array_equal(perms["layer1.0.conv1"]["perm"], perms["layer1.0.downsample"]["perm"])
    assert rows["layer1.0.downsample"]["producer"] == "conv1"
    assert "residual" in rows["layer2.1.conv1"]["reason"]
    assert "Flatten" in rows["fc"]["reason"]


def test_digits_cnn_keeps_its_function_and_prunes_better(tmp_path):
    ctx, out = permute_model(DIGITS, tmp_path)
    rows = check_rows(ctx, ["/conv2/Conv", "/conv3/Conv", "/fc2/Gemm"])  # conv3 is grouped (2 groups)
    assert "Flatten" in rows["/fc1/Gemm"]["reason"]
    data = np.load(ROOT / "models" / "digits_test.npz")
    x = data[data.files[0]][:64].astype(np.float32).reshape(-1, 1, 8, 8)
    assert_same_function(DIGITS, out, {"input": x})
    # and N:M after the permutation keeps more L1 than without it, layer by layer
    ctx_p, _ = permute_model(DIGITS, tmp_path, prune=True)
    ctx_0, _ = permute_model(DIGITS, tmp_path, prune=True, permute=False)
    for name in ["/conv2/Conv", "/conv3/Conv", "/fc2/Gemm"]:
        assert ctx_p.layers[name]["retained_l1"] > ctx_0.layers[name]["retained_l1"]
        assert ctx_p.layers[name]["retained_l1"] == pytest.approx(rows[name]["retained_after"], rel=1e-5)


def test_four_of_eight(tmp_path):
    src = save(modelzoo.conv_model(bn=True), tmp_path / "c.onnx")
    ctx, out = permute_model(src, tmp_path, n=4, m=8)
    check_rows(ctx, ["conv", "head"])
    assert_same_function(src, out)


# -- hand-built graphs: who agrees, who refuses -------------------------------------------


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _model(nodes, inits, outputs, k=32):
    graph = helper.make_graph(nodes, "g", [_vi("x", ["N", k])], [_vi(o, ["N", f"d_{o}"]) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _w(rng, *shape, name):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def test_two_readers_get_the_same_permutation(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="p"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "wa"], ["ya"], name="a"),
        helper.make_node("Gemm", ["r", "wb"], ["yb"], name="b", transB=1),
    ]
    inits = [_w(rng, 32, 16, name="w1"), _w(rng, 16, name="b1"), _w(rng, 16, 8, name="wa"), _w(rng, 12, 16, name="wb")]
    src = save(_model(nodes, inits, ["ya", "yb"]), tmp_path / "two.onnx")
    ctx, out = permute_model(src, tmp_path)
    rows = check_rows(ctx, ["a", "b"])
    assert rows["a"]["producer"] == rows["b"]["producer"] == "p"
    perms = ctx.artifacts["permutations"]
    assert np.array_equal(perms["a"]["perm"], perms["b"]["perm"])
    assert_same_function(src, out)


@pytest.mark.parametrize("other", ["graph_output", "residual", "reshape"])
def test_producer_output_read_elsewhere_is_left_alone(tmp_path, other):
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="p"), helper.make_node("Relu", ["h"], ["r"], name="relu")]
    inits = [_w(rng, 32, 16, name="w1"), _w(rng, 16, 8, name="w2")]
    outs = ["y"]
    if other == "graph_output":
        nodes.append(helper.make_node("MatMul", ["r", "w2"], ["y"], name="l"))
        outs.append("r")
    elif other == "residual":
        nodes.append(helper.make_node("Add", ["r", "x16"], ["s"], name="res"))
        nodes.append(helper.make_node("MatMul", ["x", "w0"], ["x16"], name="side"))
        nodes.insert(0, nodes.pop())  # keep the graph topologically sorted
        nodes.append(helper.make_node("MatMul", ["s", "w2"], ["y"], name="l"))
        inits.append(_w(rng, 32, 16, name="w0"))
    else:
        nodes.append(helper.make_node("MatMul", ["r", "w2"], ["y"], name="l"))
        nodes.append(helper.make_node("Reshape", ["r", "shape"], ["flat"], name="flatten"))
        inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "shape"))
        outs.append("flat")
    src = save(_model(nodes, inits, outs), tmp_path / f"{other}.onnx")
    ctx, out = permute_model(src, tmp_path)
    rows = check_rows(ctx)
    assert not rows["l"]["applied"]
    assert {"graph_output": "graph output", "residual": "computed tensor", "reshape": "Reshape"}[other] in rows["l"]["reason"]
    assert ctx.artifacts["permutations"] == {}
    assert_same_function(src, out)


def test_shared_reader_weight_is_left_alone(tmp_path):
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="p"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="l"),
        helper.make_node("MatMul", ["h", "w2"], ["z"], name="l2"),
    ]
    src = save(_model(nodes, [_w(rng, 32, 16, name="w1"), _w(rng, 16, 16, name="w2")], ["y", "z"]), tmp_path / "s.onnx")
    ctx, out = permute_model(src, tmp_path)
    rows = check_rows(ctx)
    assert not rows["l"]["applied"] and "shared" in rows["l"]["reason"]
    assert_same_function(src, out)


def test_weight_chains_and_per_channel_constants(tmp_path):
    """Weights behind Transpose and a per-channel DequantizeLinear; shared per-channel constants; Clip, pooling-free."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((32, 16)).astype(np.float32)
    scale = (np.abs(w1).max(axis=0) / 127).astype(np.float32)
    q = np.clip(np.rint(w1 / scale), -127, 127).astype(np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["w1"], name="dq", axis=1),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="p"),
        helper.make_node("Mul", ["h", "gamma"], ["g"], name="scale"),
        helper.make_node("Add", ["gamma", "g"], ["a"], name="shift"),  # constant first, and the same constant again
        helper.make_node("Clip", ["a", "lo", "hi"], ["c"], name="clip"),
        helper.make_node("Transpose", ["w2t"], ["w2"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["c", "w2"], ["y"], name="l"),
        helper.make_node("Mul", ["x2", "gamma"], ["other"], name="other_use"),  # gamma is shared with the rest of the graph
    ]
    inits = [
        numpy_helper.from_array(q, "q1"),
        numpy_helper.from_array(scale, "s1"),
        numpy_helper.from_array(np.zeros(16, np.int8), "z1"),
        numpy_helper.from_array(rng.uniform(0.1, 3, 16).astype(np.float32), "gamma"),
        numpy_helper.from_array(np.array(-1.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(2.0, np.float32), "hi"),
        _w(rng, 8, 16, name="w2t"),
    ]
    graph = helper.make_graph(nodes, "g", [_vi("x", ["N", 32]), _vi("x2", ["N", 16])], [_vi("y", ["N", 8]), _vi("other", ["N", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = save(model, tmp_path / "chains.onnx")
    ctx, out = permute_model(src, tmp_path)
    rows = check_rows(ctx, ["l"])
    assert rows["l"]["producer"] == "p"
    rng2 = np.random.default_rng(0)
    assert_same_function(src, out, {"x": rng2.standard_normal((4, 32)).astype(np.float32), "x2": rng2.standard_normal((4, 16)).astype(np.float32)})


def test_scores_are_permuted_with_their_weights(tmp_path):
    src = save(modelzoo.matmul_model(), tmp_path / "mm.onnx")

    def scores(ctx):
        out = {}
        for t in ctx.artifacts["targets"]:
            w = WeightView(ctx.model, t.weight, t.primary).effective()
            out[t.name] = np.abs(w) * np.float32(2.0)
        return out

    ctx, _ = permute_model(src, tmp_path, scores=scores)
    assert permute_rows(ctx)["mm2"]["applied"]
    for t in ctx.artifacts["targets"]:
        w = WeightView(ctx.model, t.weight, t.primary).effective()
        np.testing.assert_array_equal(ctx.artifacts["scores"][t.name], np.abs(w) * np.float32(2.0))


def test_disabled_or_dense_does_nothing(tmp_path):
    src = save(modelzoo.matmul_model(), tmp_path / "mm.onnx")
    loaded = graphio.load_model(src)
    ctx = CompileContext(model=loaded, options=options(permute=False))
    FindTargets()(ctx)
    assert not PermuteChannels()(ctx).changed
    assert ctx.artifacts["permutations"] == {} and not loaded.changed


@pytest.mark.parametrize("flag", ["sequential", "transposable"])
def test_stands_aside_for_other_pattern_kinds(tmp_path, flag):
    src = save(modelzoo.matmul_model(), tmp_path / "mm.onnx")
    loaded = graphio.load_model(src)
    opts = options()
    setattr(opts, flag, True)
    ctx = CompileContext(model=loaded, options=opts)
    FindTargets()(ctx)
    assert not PermuteChannels()(ctx).changed
    assert not loaded.changed
    assert flag in ctx.layers["mm2"]["permute"]["reason"]


def test_same_bytes_whatever_the_thread_count(tmp_path):
    src = save(modelzoo.resnet50(width=0.25, image=32, classes=16), tmp_path / "r.onnx")
    blobs = []
    for workers in (1, 2, 2):
        loaded = graphio.load_model(src)
        ctx = CompileContext(model=loaded, options=options())
        PassManager(canonicalize_passes() + [FindTargets(), PermuteChannels(workers=workers)])(ctx)
        out = tmp_path / f"r{len(blobs)}.onnx"
        with graphio.AtomicWriter() as w:
            graphio.save_model(loaded, out, w)
        blobs.append(out.read_bytes())
    assert blobs[0] == blobs[1] == blobs[2]
