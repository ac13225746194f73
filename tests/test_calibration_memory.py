"""The memory-lean paths of calibration give the same answers as the plain ones.

In-place factorisations, Gram matrices built straight from the packed triangle,
float32 solver matrices for wide layers, blocked Gram accumulation, sub-batched
statistics runs, deepest-first calibration chunks without a dense snapshot, and
weights left in the model file at load.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from nmcompile.passes import adaprune as ad
from nmcompile.passes import adaprune_solver as ap
from nmcompile.passes import statistics as st

from nmcompile import graphio, modelzoo


def _gram(rng, K, rows=None):
    X = rng.standard_normal((rows or 2 * K, K))
    X[:, 1] = X[:, 0] + 0.01 * X[:, 1]  # correlated columns
    return X.T @ X


@pytest.mark.parametrize("K", [1, 2, 7, 64])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inverse_cholesky_in_place_matches_copying(K, dtype):
    rng = np.random.default_rng(K)
    Hd = ap._damped(_gram(rng, K) if K > 1 else np.array([[2.0]]), 0.01)
    U = ap.inverse_cholesky_upper(Hd)
    work = Hd.astype(dtype)
    V = ap.inverse_cholesky_upper(work, overwrite=True)
    assert np.shares_memory(V, work)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(V, U, rtol=tol, atol=tol * np.abs(U).max())
    assert np.allclose(np.tril(V, -1), 0)


def test_damp_in_place_equals_damped_copy():
    rng = np.random.default_rng(0)
    H = _gram(rng, 9)
    H[3, :] = H[:, 3] = 0.0  # a dead input
    ref = ap._damped(H, 0.0)
    work = H.copy()
    ap.damp_in_place(work, 0.0)
    np.testing.assert_array_equal(work, ref)
    assert work[3, 3] == 1.0


@pytest.mark.parametrize("select", ["obs", "group"])
def test_sparsegpt_overwrite_h_same_mask(select):
    rng = np.random.default_rng(1)
    K = 32
    H = _gram(rng, K)
    W = rng.standard_normal((12, K))
    ref, _ = ap.sparsegpt_mask_and_update(W, H, 2, 4, select=select, safeguard=False)
    work = H.copy()
    got, _ = ap.sparsegpt_mask_and_update(W, work, 2, 4, select=select, safeguard=False, overwrite_h=True)
    np.testing.assert_array_equal(got, ref)
    assert not np.array_equal(work, H)  # it really was the workspace
    with pytest.raises(ValueError):
        ap.sparsegpt_mask_and_update(W, H.copy(), 2, 4, overwrite_h=True)


def test_gram_group_permuted_and_summed():
    rng = np.random.default_rng(2)
    A = rng.standard_normal((3, 40, 11))
    H = np.einsum("gnk,gnj->gkj", A, A)
    stats = st.LayerStats.from_gram(H, A.mean(axis=1), 40)
    order = rng.permutation(11)
    np.testing.assert_array_equal(stats.gram_group(2), H[2])
    np.testing.assert_array_equal(stats.gram_group(1, order), H[1][np.ix_(order, order)])
    assert stats.gram_group(0, order, np.float32).dtype == np.float32
    gram_of = ad.stats_gram([stats, stats])  # a weight shared by two layers reading the same input
    np.testing.assert_allclose(gram_of(1, order), 2 * H[1][np.ix_(order, order)], rtol=1e-14)


def test_cg_with_float32_gram_reaches_the_float64_optimum():
    rng = np.random.default_rng(3)
    K, O = 640, 24  # supports of 320: the CG path
    H = _gram(rng, K, rows=3 * K)
    W = rng.standard_normal((O, K))
    mask = ap.nm_mask_from_scores(np.abs(W), 2, 4)
    exact = ap.adaprune_rows(W, mask, H, method="direct")
    got = ap.adaprune_rows(W, mask, H.astype(np.float32), method="cg")
    assert np.all(got[~mask] == 0)
    e_exact = ap.reconstruction_error(W, exact, H)
    e_got = ap.reconstruction_error(W, got, H)
    assert e_got <= e_exact * (1 + 1e-4) + 1e-12
    # the float32 error measure agrees with the float64 one
    assert ap.reconstruction_error(W, got, H.astype(np.float32)) == pytest.approx(e_got, rel=1e-4)


@pytest.mark.parametrize("threads", [None, 2])
def test_blocked_accumulation_equals_gram(threads):
    rng = np.random.default_rng(4)
    K = st.BLOCKED_FROM_K + 37
    X = rng.standard_normal((1500, K)).astype(np.float32)
    spec = st.LayerSpec("fc", "x", "dense", feature_axis=-1)
    acc = st._Accumulator(spec, np.float32, 2 << 20)
    pool = ThreadPoolExecutor(threads) if threads else None
    st._run_jobs([(acc, j) for j in acc.jobs(X)], pool, threads or 1)
    got = acc.result()
    X64 = X.astype(np.float64)
    ref = X64.T @ X64
    np.testing.assert_allclose(got.gram[0], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(got.mean[0], X64.mean(axis=0), atol=1e-6)
    # no thread count dependence: the blocks own disjoint parts of the sums
    acc1 = st._Accumulator(spec, np.float32, 2 << 20)
    st._run_jobs([(acc1, j) for j in acc1.jobs(X)], None, 1)
    np.testing.assert_array_equal(acc1.result().packed, got.packed)


@pytest.mark.parametrize("K", [300, st.BLOCKED_FROM_K + 37])  # merged partial products; blocked rows
def test_wide_inputs_sum_their_gram_in_float32(K):
    rng = np.random.default_rng(6)
    # a mean far from zero: the float32 sums' rounding then shows most
    X = (rng.standard_normal((3000, K)) + 3.0).astype(np.float32)
    spec = st.LayerSpec("fc", "x", "dense", feature_axis=-1)
    wide = st._Accumulator(spec, np.float32, 1 << 20, float32_sums_from=K)
    narrow = st._Accumulator(spec, np.float32, 1 << 20, float32_sums_from=K + 1)
    for acc in (wide, narrow):
        st._run_jobs([(acc, j) for j in acc.jobs(X)], None, 1)
    got, ref = wide.result(), narrow.result()
    assert got.packed.dtype == np.float32 and ref.packed.dtype == np.float64
    assert got.packed.nbytes == ref.packed.nbytes // 2
    np.testing.assert_allclose(got.packed, ref.packed, rtol=2e-6)
    assert got.mean.dtype == np.float64
    np.testing.assert_array_equal(got.mean, ref.mean)


def test_statistics_in_sub_batches_equal_whole_batches(monkeypatch):
    model = modelzoo.conv_model()
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.name == "conv")
    weight = next(t for t in model.graph.initializer if t.name == conv.input[1])
    spec = st.spec_from_node(conv, tuple(weight.dims), name="c")
    inputs = modelzoo.random_inputs(model, batch=12, seed=5)
    runs = []
    import onnxruntime as ort

    real_run = ort.InferenceSession.run

    def counting_run(self, *a, **k):
        out = real_run(self, *a, **k)
        runs.append(out[0].shape[0] if out else 0)
        return out

    whole = st.collect_statistics(model, [spec], [inputs], progress=False)
    monkeypatch.setattr(ort.InferenceSession, "run", counting_run)
    parts = st.collect_statistics(model, [spec], [inputs], progress=False, activation_bytes=1)
    name = spec.name
    assert len(runs) == 12 and set(runs) == {1}  # one sample per run
    np.testing.assert_allclose(parts[name].gram, whole[name].gram, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts[name].mean, whole[name].mean, rtol=1e-6, atol=1e-7)
    assert parts[name].count == whole[name].count


def _small_resnet(tmp_path):
    path = tmp_path / "resnet.onnx"
    onnx.save(modelzoo.resnet50(width=0.125, image=32, classes=10), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(6).standard_normal((16, 3, 32, 32)).astype(np.float32))
    return path, calib


def test_chunked_calibration_needs_no_dense_snapshot_and_matches_one_chunk(tmp_path, monkeypatch):
    from nmcompile.pipeline import compile_model

    path, calib = _small_resnet(tmp_path)
    compile_model(path, tmp_path / "one.onnx", pattern="2:4", calib=calib, stats_budget_mb=512)

    def no_snapshot(_):
        raise AssertionError("deepest-first chunks should not need a dense copy of the model")

    monkeypatch.setattr(ad, "dense_snapshot", no_snapshot)
    compile_model(path, tmp_path / "many.onnx", pattern="2:4", calib=calib, stats_budget_mb=1e-6)
    a, b = onnx.load(tmp_path / "one.onnx"), onnx.load(tmp_path / "many.onnx")
    assert len(a.graph.initializer) == len(b.graph.initializer)
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        assert ta.name == tb.name
        np.testing.assert_allclose(onnx.numpy_helper.to_array(ta), onnx.numpy_helper.to_array(tb), rtol=1e-4, atol=1e-5)


def test_load_leaves_large_weights_in_the_file(tmp_path):
    model = modelzoo.resnet50(width=0.25, image=32, classes=10)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded = graphio.load_model(path)
    assert not loaded.has_external_data  # the file has none; outputs stay inline
    assert loaded.model.ByteSize() < path.stat().st_size / 4
    for t in onnx.load(path).graph.initializer:
        np.testing.assert_array_equal(loaded.array(t.name), onnx.numpy_helper.to_array(t))
    out = tmp_path / "copy.onnx"
    with graphio.AtomicWriter() as writer:
        graphio.save_model(loaded, out, writer)
    assert not (tmp_path / "copy.onnx.data").exists()
    again = onnx.load(out)
    for t in again.graph.initializer:
        assert t.data_location != onnx.TensorProto.EXTERNAL
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), loaded.array(t.name))


def test_row_blocked_quadratic_forms_equal_plain(monkeypatch):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((300, 40)).astype(np.float32)
    Wn = np.where(rng.random(W.shape) < 0.5, W, 0).astype(np.float32)
    H = _gram(rng, 40)
    mean = rng.standard_normal(40)
    W64, Wn64 = W.astype(np.float64), Wn.astype(np.float64)
    D = W64 - Wn64
    plain_err = np.einsum("ij,jk,ik->", D, H, D) / np.einsum("ij,jk,ik->", W64, H, W64)
    monkeypatch.setattr(ap, "_row_slices", lambda rows, K, nbytes=0: [slice(r, r + 64) for r in range(0, rows, 64)])
    assert ap.reconstruction_error(W, Wn, H) == pytest.approx(plain_err, rel=1e-12)
    assert ap.quadratic_trace(W, H) == pytest.approx(np.einsum("ij,jk,ik->", W64, H, W64), rel=1e-12)
    np.testing.assert_allclose(ap.bias_correction(W, Wn, mean), D @ mean, rtol=1e-12)


def test_sweep_trailing_update_in_column_blocks(monkeypatch):
    rng = np.random.default_rng(4)
    W = rng.standard_normal((20, 256))
    H = _gram(rng, 256)
    mask, Wn = ap.sparsegpt_mask_and_update(W, H.copy(), 2, 4, select="group", safeguard=False)
    monkeypatch.setattr(ap, "_SWEEP_COLUMNS", 7)  # cuts across the 128-column sweep blocks
    mask_b, Wn_b = ap.sparsegpt_mask_and_update(W, H.copy(), 2, 4, select="group", safeguard=False)
    assert np.array_equal(mask, mask_b)
    np.testing.assert_allclose(Wn_b, Wn, rtol=1e-10, atol=1e-10)


def _stem_and_layer_model(kind: str) -> onnx.ModelProto:
    """x -> stem (Conv or MatMul) -> Relu -> the layer under test (output y)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(7)
    if kind == "conv":
        stem = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
        layer = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)  # 2 groups of 4 channels
        nodes = [helper.make_node("Conv", ["x", "stem_w"], ["s"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
                 helper.make_node("Relu", ["s"], ["r"]),
                 helper.make_node("Conv", ["r", "layer_w"], ["y"], name="layer", group=2, strides=[2, 2],
                                  pads=[0, 1, 1, 0], dilations=[1, 2], kernel_shape=[3, 3])]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 9])
    else:
        stem = rng.standard_normal((12, 16)).astype(np.float32)
        layer = rng.standard_normal((16, 5)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "stem_w"], ["s"]), helper.make_node("Relu", ["s"], ["r"]),
                 helper.make_node("MatMul", ["r", "layer_w"], ["y"], name="layer")]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7, 12])
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(stem, "stem_w"), onnx.numpy_helper.from_array(layer, "layer_w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_cross_statistics_equal_explicit_sums(kind, monkeypatch):
    # sequential calibration's statistics against explicit rows of the compressed (x_s)
    # and dense (x_d) inputs, with runs split one sample at a time and small chunks
    model = _stem_and_layer_model(kind)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    rng = np.random.default_rng(8)
    pruned_stem = np.where(rng.random(inits["stem_w"].shape) < 0.5, inits["stem_w"], 0).astype(np.float32)
    shape = (5, 3, 9, 9) if kind == "conv" else (5, 7, 12)
    data = rng.standard_normal(shape).astype(np.float32)
    batches = [{"x": data[:3]}, {"x": data[3:]}]

    node = model.graph.node[2]
    spec = st.spec_from_node(node, inits["layer_w"].shape, name="L") if kind == "conv" else \
        st.LayerSpec("L", "r", "dense", feature_axis=-1)
    W = inits["layer_w"]
    blocks = [b.reshape(b.shape[0], -1) for b in np.split(W, 2)] if kind == "conv" else [W.T]
    got = st.collect_cross_statistics((model, None), (model, {"stem_w": pruned_stem}), [spec], {"L": blocks},
                                      batches, chunk_bytes=1500, activation_bytes=1)["L"]

    def relu_stem(stem):
        if kind == "conv":
            from nmcompile.passes.statistics import im2col
            s_spec = st.LayerSpec("s", "x", "conv", kernel_shape=(3, 3), pads=(1, 1, 1, 1))
            P = im2col(data.astype(np.float64), s_spec)[0]  # (rows, 27)
            out = (P @ stem.reshape(8, -1).T.astype(np.float64)).reshape(5, 9, 9, 8).transpose(0, 3, 1, 2)
            return np.maximum(out, 0)
        return np.maximum(data.astype(np.float64) @ stem.astype(np.float64), 0)

    xs, xd = relu_stem(pruned_stem), relu_stem(inits["stem_w"])
    if kind == "conv":
        from nmcompile.passes.statistics import im2col
        Ps, Pd = im2col(xs, spec), im2col(xd, spec)  # (G, rows, K)
    else:
        Ps, Pd = xs.reshape(1, -1, 16), xd.reshape(1, -1, 16)
    for g, w in enumerate(blocks):
        y = Pd[g] @ w.T.astype(np.float64)  # (rows, O/G)
        np.testing.assert_allclose(got.target[g], Ps[g].T @ y, rtol=1e-4, atol=1e-3)
        assert got.energy[g] == pytest.approx(float((y * y).sum()), rel=1e-5)
        np.testing.assert_allclose(got.stats.gram_group(g), Ps[g].T @ Ps[g], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(got.stats.mean[g], Ps[g].mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.mean_dense[g], Pd[g].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert got.stats.count == Ps.shape[1]


def test_runs_are_sized_by_the_intermediates_ort_computes():
    model = modelzoo.conv_model()  # x [N, 3, 8, 8] -> stem (32 channels) -> relu -> conv (64) -> relu -> head
    stem_out = next(n.output[0] for n in model.graph.node if n.name == "stem")
    conv_out = next(n.output[0] for n in model.graph.node if n.name == "conv")
    assert st._largest_activation(model, [stem_out]) == 32 * 8 * 8 * 4
    assert st._largest_activation(model, [conv_out]) == 64 * 8 * 8 * 4  # the deeper request passes the wider map


def test_intermediates_with_a_symbolic_sequence_length_are_sized_from_the_data():
    from onnx import TensorProto, helper

    # x [N, S, 4]: the scores x xᵀ [N, S, S] pass through ORT on the way to the requested z
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x", "xt"], ["s"]), helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("MatMul", ["r", "x"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert st._largest_activation(model, ["z"]) == 0  # S unknown: nothing to size by
    assert st._largest_activation(model, ["z"], {"x": (3, 50, 4)}) == 50 * 50 * 4
    runner = st._Runner(model, ["z"], None, None)
    assert runner.largest({"x": np.zeros((1, 50, 4), np.float32)}) == 50 * 50 * 4
    assert model.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "S"  # the model is left alone


def test_chunks_count_a_shared_gram_once():
    from nmcompile.passes.base import CompileContext
    from nmcompile.passes.canonicalize import canonicalize_passes
    from nmcompile.passes.targets import FindTargets
    from nmcompile.pipeline import CompileOptions

    model = modelzoo.bert_encoder(layers=1, hidden=64, heads=4)
    ctx = CompileContext(model=_loaded(model), options=CompileOptions(pattern="2:4"))
    for p in canonicalize_passes() + [FindTargets()]:
        p(ctx)
    targets = [t for t in ctx.artifacts["targets"] if not t.skip and ad.calibratable(t) is None]
    qkv = [t for t in targets if gram_key(t) == gram_key(targets[0])]
    assert len(qkv) == 3  # the attention projections read one input
    one = st.stats_nbytes(*ad.gram_shape(qkv[0]))
    chunks = ad.plan_chunks(qkv, one)
    assert chunks == [qkv]  # one Gram's worth of budget holds all three
    assert ad.plan_chunks(qkv, one - 1) == [qkv]  # a chunk never comes out empty either
    other = [t for t in targets if gram_key(t) != gram_key(qkv[0]) and ad.gram_shape(t) == ad.gram_shape(qkv[0])][:1]
    assert other and ad.plan_chunks(qkv + other, one) == [qkv, other]  # another input: its own Gram


def gram_key(t):
    return ad.layer_spec(t.primary, t.name).key()


def _loaded(model):
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    onnx.save(model, str(folder / "m.onnx"))
    return graphio.load_model(folder / "m.onnx")


def test_runs_split_by_requested_outputs_and_ort_intermediates():
    class FakeRunner:  # requested outputs of 10 bytes per sample; ORT's largest intermediate 30 bytes
        dynamic, intermediate = True, 30

        def largest(self, part):
            return self.intermediate

        def __call__(self, part):
            return {"t": np.zeros((len(part["x"]), 10), np.uint8)}

    batches = [{"x": np.arange(7)}, {"x": np.arange(7, 12)}]
    # per sample 10 + 3 * 30 = 100 bytes: a 250-byte budget runs 2 samples at a time
    sizes = [len(part["x"]) for part, _ in st._runs([FakeRunner()], batches, 250, False, "")]
    assert sizes == [1, 2, 2, 2, 2, 2, 1]  # the first run sizes the rest
    got = np.concatenate([part["x"] for part, _ in st._runs([FakeRunner()], batches, 250, False, "")])
    assert np.array_equal(got, np.arange(12))
    FakeRunner.intermediate = 0  # without intermediates the outputs alone: 25 samples fit
    assert [len(p["x"]) for p, _ in st._runs([FakeRunner()], batches, 250, False, "")] == [1, 6, 5]


def test_trace_of_product_in_row_slices(monkeypatch):
    rng = np.random.default_rng(9)
    A = rng.standard_normal((70, 30)).astype(np.float32)
    B = rng.standard_normal((30, 70))
    want = float(np.trace(A.astype(np.float64) @ B))
    assert ap.trace_of_product(A, B) == pytest.approx(want, rel=1e-12)
    monkeypatch.setattr(ap, "_row_slices", lambda rows, K: [slice(r, r + 8) for r in range(0, rows, 8)])
    assert ap.trace_of_product(A, B) == pytest.approx(want, rel=1e-12)
