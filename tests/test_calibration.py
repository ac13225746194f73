"""Calibration data, streamed activation statistics and the AdaPrune solvers."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nmcompile.calibdata import iter_batches, load_calibration, validate_calibration
from nmcompile.errors import UserError
from nmcompile.passes import adaprune_solver as ap
from nmcompile.passes.statistics import (
    LayerSpec,
    collect_statistics,
    conv_output_shape,
    fixed_batch_size,
    im2col,
    spec_from_node,
)

# --------------------------------------------------------------------------- helpers


def make_model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def well_conditioned_x(rng, K, N):
    A = np.eye(K) + 0.3 * rng.standard_normal((K, K)) / np.sqrt(K)
    return A @ rng.standard_normal((K, N)) + 0.2


def correlated_h(rng, K, N=None):
    N = N or 3 * K
    X = rng.standard_normal((K, K)) @ rng.standard_normal((K, N)) / np.sqrt(K)
    X *= rng.lognormal(0, 0.5, (K, 1))
    return X @ X.T, X


def per_row_lstsq(W, S, X):
    out = np.zeros_like(W)
    for r in range(W.shape[0]):
        s = S[r]
        if s.any():
            out[r, s] = np.linalg.lstsq(X[s].T, W[r] @ X, rcond=None)[0]
    return out


def random_support_mask(rng, O, K, sizes):
    S = np.zeros((O, K), bool)
    for r in range(O):
        S[r, rng.choice(K, sizes[r], replace=False)] = True
    return S


def explicit_error(W, Wn, X):
    return float(np.sum(((W - Wn) @ X) ** 2) / np.sum((W @ X) ** 2))


# --------------------------------------------------------------------------- solver


@pytest.mark.parametrize("O,K,n,m", [(6, 16, 2, 4), (5, 24, 4, 8), (7, 12, 1, 4)])
def test_direct_equals_lstsq_nm(O, K, n, m):
    rng = np.random.default_rng(O * K)
    X = well_conditioned_x(rng, K, 4 * K)
    W = rng.standard_normal((O, K))
    S = ap.nm_mask_from_scores(np.abs(W), n, m)
    Wn = ap.adaprune_rows(W, S, X @ X.T, damp=0.0, method="direct")
    np.testing.assert_allclose(Wn, per_row_lstsq(W, S, X), atol=1e-9, rtol=1e-9)
    assert not np.any(Wn[~S])


def test_direct_equals_lstsq_varying_supports():
    rng = np.random.default_rng(1)
    O, K = 9, 14
    X = well_conditioned_x(rng, K, 60)
    W = rng.standard_normal((O, K))
    S = random_support_mask(rng, O, K, [0, 1, 3, 3, 7, 7, 7, 13, 14])
    Wn = ap.adaprune_rows(W, S, X @ X.T, damp=0.0, method="direct")
    np.testing.assert_allclose(Wn, per_row_lstsq(W, S, X), atol=1e-9)
    np.testing.assert_array_equal(Wn[8], W[8])  # full support: unchanged


def test_cg_matches_direct():
    rng = np.random.default_rng(2)
    O, K = 40, 64
    H, _ = correlated_h(rng, K)
    W = rng.standard_normal((O, K))
    S = ap.nm_mask_from_scores(np.abs(W), 2, 4)
    Wd = ap.adaprune_rows(W, S, H, damp=0.01, method="direct")
    # tight tolerance: float64 products, essentially exact
    Wc = ap.adaprune_rows(W, S, H, damp=0.01, method="cg", tol=1e-14)
    np.testing.assert_allclose(Wc, Wd, atol=1e-7 * np.abs(Wd).max())
    # default tolerance (float32 products): same objective to ~1e-6
    info = {}
    Wf = ap.adaprune_rows(W, S, H, damp=0.01, method="cg", info=info)
    ed, ef = ap.reconstruction_error(W, Wd, H), ap.reconstruction_error(W, Wf, H)
    assert abs(ef - ed) <= 1e-4 * ed
    assert info["method"] == "cg" and info["iterations"] > 0


def test_cg_low_rank_preconditioner_large_k():
    rng = np.random.default_rng(3)
    O, K = 16, 384
    H, _ = correlated_h(rng, K, 2 * K)
    W = rng.standard_normal((O, K))
    S = ap.nm_mask_from_scores(np.abs(W), 2, 4)
    info = {}
    Wc = ap.adaprune_rows(W, S, H, method="cg", info=info)
    assert info["rank"] > 0
    Wd = ap.adaprune_rows(W, S, H, method="direct")
    ed, ec = ap.reconstruction_error(W, Wd, H), ap.reconstruction_error(W, Wc, H)
    assert abs(ec - ed) <= 1e-4 * ed


@pytest.mark.parametrize("seed", range(6))
def test_refit_never_worse_than_masking(seed):
    rng = np.random.default_rng(100 + seed)
    K = int(rng.choice([8, 16, 32]))
    O = 5
    N = int(rng.choice([K // 2, K, 4 * K]))  # N < K: rank-deficient H
    X = rng.standard_normal((K, N)) * rng.lognormal(0, 1, (K, 1))
    X += rng.standard_normal() * X[[0]]
    H = X @ X.T
    W = rng.standard_normal((O, K)) * rng.lognormal(0, 1, (1, K))
    for S in (ap.nm_mask_from_scores(np.abs(W), 2, 4),
              ap.nm_mask_from_scores(rng.random((O, K)), 2, 4)):
        e_mask = explicit_error(W, W * S, X)
        for damp in (0.0, 0.01) if N >= K else (0.01,):
            for Wn in (ap.adaprune_rows(W, S, H, damp=damp, method="direct"),
                       ap.adaprune_rows(W, S, H, damp=damp, method="cg"),
                       ap.obs_prune_update(W, S, H, damp=damp)):
                assert not np.any(Wn[~S])
                assert explicit_error(W, Wn, X) <= e_mask * (1 + 1e-6) + 1e-12


def test_obs_equals_exact_when_pruned_columns_come_first():
    # The sweep freezes columns once passed; with every pruned column left of
    # every kept one nothing is frozen too early and OBS is the exact optimum.
    rng = np.random.default_rng(4)
    O, K = 6, 20
    H, _ = correlated_h(rng, K)
    W = rng.standard_normal((O, K))
    S = np.ones((O, K), bool)
    S[:, :7] = False
    for damp in (0.0, 0.01):
        np.testing.assert_allclose(ap.obs_prune_update(W, S, H, damp=damp, blocksize=4),
                                   ap.adaprune_rows(W, S, H, damp=damp, method="direct"),
                                   atol=1e-9)


def test_obs_single_pruned_weight_is_exact():
    rng = np.random.default_rng(5)
    K = 12
    H, _ = correlated_h(rng, K)
    W = rng.standard_normal((3, K))
    S = np.ones((3, K), bool)
    S[0, 0] = S[1, 5] = S[2, 11] = False  # one per row, anywhere
    Wo = ap.obs_prune_update(W, S, H, damp=0.01)
    Wd = ap.adaprune_rows(W, S, H, damp=0.01, method="direct")
    # row 0 prunes column 0: all kept columns are to its right → exact
    np.testing.assert_allclose(Wo[0], Wd[0], atol=1e-9)
    # last column pruned: nothing to its right, OBS = masking (safeguard or not)
    np.testing.assert_allclose(Wo[2], W[2] * S[2], atol=1e-12)


def test_inverse_cholesky_upper():
    rng = np.random.default_rng(6)
    H, _ = correlated_h(rng, 10)
    Hd = H + np.eye(10)
    U = ap.inverse_cholesky_upper(Hd)
    assert np.allclose(np.tril(U, -1), 0)
    np.testing.assert_allclose(U.T @ U, np.linalg.inv(Hd), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n,m,K", [(2, 4, 32), (4, 8, 48), (2, 4, 30)])
def test_sparsegpt_mask_and_update(n, m, K):
    rng = np.random.default_rng(7)
    H, X = correlated_h(rng, K)
    W = rng.standard_normal((6, K))
    S, Wn = ap.sparsegpt_mask_and_update(W, H, n, m, blocksize=5)
    full = (K // m) * m
    assert np.all(S[:, :full].reshape(6, -1, m).sum(axis=2) == n)
    assert np.all(S[:, full:].sum(axis=1) == min(n, K - full))
    assert not np.any(Wn[~S])
    assert explicit_error(W, Wn, X) <= explicit_error(W, W * S, X) * (1 + 1e-9)
    # the exact re-fit on SparseGPT's mask is better still
    We = ap.adaprune_rows(W, S, H, method="direct")
    assert explicit_error(W, We, X) <= explicit_error(W, Wn, X) * (1 + 1e-9)


def test_nm_mask_from_scores_and_tail():
    s = np.array([[4, 3, 2, 1, 9, 0, 0, 8, 1, 2]], float)
    S = ap.nm_mask_from_scores(s, 2, 4)
    assert S.tolist() == [[True, True, False, False, True, False, False, True, True, True]]
    ties = ap.nm_mask_from_scores(np.ones((1, 4)), 2, 4)
    assert ties.tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError):
        ap.nm_mask_from_scores(s, 5, 4)


def test_saliency_kinds():
    rng = np.random.default_rng(8)
    H, _ = correlated_h(rng, 8)
    W = rng.standard_normal((3, 8))
    np.testing.assert_allclose(ap.saliency(W, None, "magnitude"), np.abs(W))
    Hd = H + 0.01 * np.mean(np.diag(H)) * np.eye(8)
    np.testing.assert_allclose(ap.saliency(W, H, "activation"), np.abs(W) * np.sqrt(np.diag(Hd)))
    dead = H.copy()
    dead[:4, :] = dead[:, :4] = 0  # inputs the data never moves: their weights still rank by |w|
    act = ap.saliency(W, dead, "activation")
    np.testing.assert_allclose(act[:, :4] / np.abs(W[:, :4]), np.sqrt(0.01 * np.mean(np.diag(dead))))
    np.testing.assert_allclose(ap.saliency(W, H, "obs"),
                               W**2 / np.diag(np.linalg.inv(Hd)), rtol=1e-8)
    with pytest.raises(ValueError):
        ap.saliency(W, H, "nope")


def test_best_group_mask_exact_is_optimal_for_block_diagonal_h():
    # With H block-diagonal over the groups, groups do not interact and the
    # group-local error is the true error after re-fit: the choice is optimal.
    rng = np.random.default_rng(9)
    m, n, G = 4, 2, 3
    K = m * G
    H = np.zeros((K, K))
    for g in range(G):
        B, _ = correlated_h(rng, m)
        H[g * m:(g + 1) * m, g * m:(g + 1) * m] = B
    W = rng.standard_normal((2, K))
    combos = list(itertools.combinations(range(m), n))
    masks = [_mask_from_choice(ch, K, m) for ch in itertools.product(combos, repeat=G)]
    for r in range(2):  # rows are independent: brute force row by row
        w = W[r:r + 1]
        best = min(ap.reconstruction_error(w, ap.adaprune_rows(w, T, H, method="direct"), H)
                   for T in masks)
        for local in ("h", "hinv"):
            S = ap.best_group_mask_exact(w, H, n, m, damp=0.01, local=local)
            assert np.all(S.reshape(G, m).sum(axis=1) == n)
            got = ap.reconstruction_error(w, ap.adaprune_rows(w, S, H, method="direct"), H)
            assert got <= best * (1 + 1e-6) + 1e-12


def _mask_from_choice(choice, K, m):
    T = np.zeros((1, K), bool)
    for g, keep in enumerate(choice):
        T[0, [g * m + j for j in keep]] = True
    return T


def test_reconstruction_error_and_bias_correction():
    rng = np.random.default_rng(10)
    K, N = 10, 200
    X = rng.standard_normal((K, N)) + rng.standard_normal((K, 1))
    W = rng.standard_normal((4, K))
    S = ap.nm_mask_from_scores(np.abs(W), 2, 4)
    Wn = ap.adaprune_rows(W, S, X @ X.T)
    assert ap.reconstruction_error(W, Wn, X @ X.T) == pytest.approx(
        explicit_error(W, Wn, X), rel=1e-10)
    assert ap.reconstruction_error(W, W, X @ X.T) == 0.0
    db = ap.bias_correction(W, Wn, X.mean(axis=1))
    np.testing.assert_allclose((Wn @ X).mean(axis=1) + db, (W @ X).mean(axis=1), atol=1e-10)


def test_solver_edge_cases():
    W = np.arange(8.0).reshape(2, 4)
    S = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
    Z = np.zeros((4, 4))
    # no signal at all: keep the masked weights
    np.testing.assert_array_equal(ap.adaprune_rows(W, S, Z), W * S)
    np.testing.assert_array_equal(ap.adaprune_rows(W, np.ones_like(S), np.eye(4)), W)
    assert ap.adaprune_rows(W.astype(np.float32), S, np.eye(4)).dtype == np.float32
    with pytest.raises(ValueError):
        ap.adaprune_rows(W, S, np.eye(3))
    # dead input (ReLU never fires) with damp=0: solvable, weight stays finite
    rng = np.random.default_rng(11)
    X = rng.standard_normal((4, 30))
    X[1] = 0
    Wn = ap.adaprune_rows(W, S, X @ X.T, damp=0.0, method="direct")
    assert np.all(np.isfinite(Wn))
    Wo = ap.obs_prune_update(W, S, X @ X.T, damp=0.0)
    assert np.all(np.isfinite(Wo))


# --------------------------------------------------------------------------- statistics


def naive_patches(x, W_shape, kernel, strides, dil, pads_b, pads_e, group):
    """Explicit loops: (G, rows, K) with K order (c, kh, kw)."""
    N, C, Hh, Ww = x.shape
    kh, kw = kernel
    xp = np.zeros((N, C, Hh + pads_b[0] + pads_e[0], Ww + pads_b[1] + pads_e[1]))
    xp[:, :, pads_b[0]:pads_b[0] + Hh, pads_b[1]:pads_b[1] + Ww] = x
    oh = (xp.shape[2] - ((kh - 1) * dil[0] + 1)) // strides[0] + 1
    ow = (xp.shape[3] - ((kw - 1) * dil[1] + 1)) // strides[1] + 1
    Cg = C // group
    out = np.zeros((group, N * oh * ow, Cg * kh * kw))
    for g in range(group):
        r = 0
        for n in range(N):
            for i in range(oh):
                for j in range(ow):
                    col = 0
                    for c in range(Cg):
                        for a in range(kh):
                            for b in range(kw):
                                out[g, r, col] = xp[n, g * Cg + c, i * strides[0] + a * dil[0],
                                                    j * strides[1] + b * dil[1]]
                                col += 1
                    r += 1
    return out


def conv_model(rng, C, O, kernel, group, attrs, spatial=("H", "W")):
    W = rng.standard_normal((O, C // group, *kernel)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, *spatial])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("Conv", ["h", "W"], ["y"], name="conv", group=group,
                              kernel_shape=list(kernel), **attrs)]
    return make_model(nodes, [x], [y], [numpy_helper.from_array(W, "W")]), W


CONV_CASES = [
    ("stride2", 4, 4, (3, 3), 1, dict(strides=[2, 2])),
    ("dilation2_asym_pads", 4, 6, (3, 3), 1, dict(dilations=[2, 2], pads=[1, 0, 2, 1])),
    ("same_upper_stride2", 4, 4, (3, 3), 1, dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    ("same_lower", 4, 4, (2, 3), 1, dict(auto_pad="SAME_LOWER", strides=[2, 3])),
    ("valid", 4, 4, (3, 2), 1, dict(auto_pad="VALID")),
    ("groups2", 4, 6, (3, 3), 2, dict(pads=[1, 1, 1, 1])),
    ("depthwise", 4, 8, (3, 3), 4, dict(strides=[1, 2], pads=[0, 1, 1, 0])),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_gram_matches_naive_and_onnxruntime(case):
    _, C, O, kernel, group, attrs = case
    rng = np.random.default_rng(12)
    model, W = conv_model(rng, C, O, kernel, group, attrs)
    node = model.graph.node[1]
    spec = spec_from_node(node, W.shape)
    assert spec.group == group and spec.kernel_shape == kernel
    X = rng.standard_normal((3, C, 7, 8)).astype(np.float32)
    Xr = np.maximum(X, 0)

    # padding as ONNX Runtime resolves it
    y = ort.InferenceSession(model.SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    assert list(y.shape[2:]) == conv_output_shape(spec, X.shape[2:])
    from nmcompile.passes.statistics import conv_pads
    pb, pe = conv_pads(spec, X.shape[2:])
    P_ref = naive_patches(Xr.astype(np.float64), W.shape, kernel, spec.strides,
                          spec.dilations, pb, pe, group)
    P = im2col(Xr, spec)
    np.testing.assert_allclose(P, P_ref, atol=0)
    # the patches times the weight are the conv output
    Og = O // group
    out = np.stack([P_ref[g] @ W[g * Og:(g + 1) * Og].reshape(Og, -1).T.astype(np.float64)
                    for g in range(group)])
    oh, ow = y.shape[2:]
    out = out.reshape(group, 3, oh, ow, Og).transpose(1, 0, 4, 2, 3).reshape(y.shape)
    np.testing.assert_allclose(out, y, atol=1e-4)

    H_ref = np.einsum("grk,grl->gkl", P_ref, P_ref)
    # two batches, tiny chunks (forces the split along output rows), float64
    st = collect_statistics(model, [spec], [{"x": X[:2]}, {"x": X[2:]}], progress=False,
                            precision="float64", chunk_bytes=64)[spec.name]
    assert st.count == P_ref.shape[1]
    np.testing.assert_allclose(st.gram, H_ref, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(st.mean, P_ref.mean(axis=1), atol=1e-12)
    # default float32 products: close
    st32 = collect_statistics(model, [spec], [{"x": X}], progress=False)[spec.name]
    np.testing.assert_allclose(st32.gram, H_ref, rtol=1e-5, atol=1e-4)


def test_conv1d_statistics():
    rng = np.random.default_rng(13)
    W = rng.standard_normal((3, 2, 3)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "L"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = make_model([helper.make_node("Conv", ["x", "W"], ["y"], strides=[2],
                                         pads=[1, 2])], [x], [y],
                       [numpy_helper.from_array(W, "W")])
    spec = spec_from_node(model.graph.node[0], W.shape, name="c1")
    X = rng.standard_normal((2, 2, 9)).astype(np.float32)
    yv = ort.InferenceSession(model.SerializeToString(),
                              providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    P = im2col(X, spec)[0]  # (rows, K)
    np.testing.assert_allclose(
        (P @ W.reshape(3, -1).T).reshape(2, -1, 3).transpose(0, 2, 1), yv, atol=1e-5)
    st = collect_statistics(model, [spec], [{"x": X}], progress=False,
                            precision="float64")["c1"]
    np.testing.assert_allclose(st.gram[0], P.astype(np.float64).T @ P, rtol=1e-10)


def dense_model(rng, K=16, T=5, K2=320):
    """x[N,T,K] → MatMul(W1) → Relu → h ; h → MatMul(Wq) ; h → MatMul(Wk) ;
    z[K, M] → Gemm(transA=1). W1 (16×320 float32, 20 KiB) is large enough to be
    handed to ONNX Runtime by reference."""
    W1 = rng.standard_normal((K, K2)).astype(np.float32)
    Wq = rng.standard_normal((K2, 8)).astype(np.float32)
    Wk = rng.standard_normal((K2, 8)).astype(np.float32)
    Wg = rng.standard_normal((3, K)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, K])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [K, "M"])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
            for n in ("q", "k", "g")]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Relu", ["h0"], ["h"]),
        helper.make_node("MatMul", ["h", "Wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["h", "Wk"], ["k"], name="k"),
        helper.make_node("Gemm", ["z", "Wg"], ["g"], name="g", transA=1, transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((W1, "W1"), (Wq, "Wq"),
                                                        (Wk, "Wk"), (Wg, "Wg"))]
    return make_model(nodes, [x, z], outs, inits), W1


def test_dense_statistics_streamed_equals_all_at_once():
    rng = np.random.default_rng(14)
    model, W1 = dense_model(rng)
    specs = [spec_from_node(n) for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert [s.feature_axis for s in specs] == [-1, -1, -1, 0]
    X = rng.standard_normal((10, 5, 16)).astype(np.float32)
    Z = rng.standard_normal((10, 16, 4)).astype(np.float32)  # z is [K, M] per "sample"
    # z has no batch axis in the graph: feed it whole per batch, samples = M columns
    batches = [{"x": X[i:i + 3], "z": Z[i]} for i in range(0, 10, 3)]
    st = collect_statistics(model, specs, batches, progress=False, precision="float64")
    assert st["q"] is st["k"]  # shared input → one accumulator
    # h itself comes from ORT's float32 MatMul: compare at float32 accuracy
    h = np.maximum(X.astype(np.float64) @ W1, 0).reshape(-1, W1.shape[1])
    H = h.T @ h
    np.testing.assert_allclose(st["q"].gram[0], H, rtol=1e-5, atol=1e-6 * np.abs(H).max())
    np.testing.assert_allclose(st["q"].mean[0], h.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert st["q"].count == 50 and st["q"].groups == 1 and st["q"].features == 320
    x2 = X.reshape(-1, 16).astype(np.float64)
    np.testing.assert_allclose(st["fc1"].gram[0], x2.T @ x2, rtol=1e-10)
    zs = [Z[i] for i in range(0, 10, 3)]
    zc = np.concatenate([z.T for z in zs]).astype(np.float64)  # (samples, K)
    np.testing.assert_allclose(st["g"].gram[0], zc.T @ zc, rtol=1e-10)
    # all at once, and with tiny chunks (float32 products) → same numbers
    once = collect_statistics(model, specs[:3], [{"x": X, "z": Z[0]}], progress=False,
                              chunk_bytes=1)
    np.testing.assert_allclose(once["q"].gram, st["q"].gram, rtol=1e-5)
    assert once["q"].count == st["q"].count


def test_statistics_overrides_and_external_data(tmp_path):
    rng = np.random.default_rng(15)
    model, W1 = dense_model(rng)
    spec = LayerSpec("q", "h", "dense")
    X = rng.standard_normal((4, 5, 16)).astype(np.float32)
    feed = [{"x": X, "z": np.zeros((16, 1), np.float32)}]
    base = collect_statistics(model, [spec], feed, progress=False)["q"]
    W1b = W1 * (rng.random(W1.shape) > 0.5)
    over = collect_statistics(model, [spec], feed, progress=False,
                              overrides={"W1": W1b})["q"]
    h = np.maximum(X.reshape(-1, 16) @ W1b, 0).astype(np.float64)
    np.testing.assert_allclose(over.gram[0], h.T @ h, rtol=1e-4, atol=1e-5)
    assert not np.allclose(over.gram, base.gram)
    # external data left on disk: memory-mapped from base_dir
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="w.bin",
                    size_threshold=1024)
    lazy = onnx.load_model(str(path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in lazy.graph.initializer)
    ext = collect_statistics(lazy, [spec], feed, progress=False, base_dir=str(tmp_path))["q"]
    np.testing.assert_allclose(ext.gram, base.gram, rtol=1e-6)
    with pytest.raises(ValueError):
        collect_statistics(lazy, [spec], feed, progress=False)


def test_statistics_bad_specs():
    rng = np.random.default_rng(16)
    model, _ = dense_model(rng)
    feed = [{"x": np.zeros((1, 5, 16), np.float32), "z": np.zeros((16, 1), np.float32)}]
    with pytest.raises(ValueError):
        collect_statistics(model, [LayerSpec("a", "nope")], feed, progress=False)
    with pytest.raises(ValueError):
        collect_statistics(model, [LayerSpec("a", "W1")], feed, progress=False)
    with pytest.raises(ValueError):
        LayerSpec("c", "x", "conv")  # no kernel_shape
    with pytest.raises(ValueError):
        collect_statistics(model, [LayerSpec("a", "h")], [], progress=False)


def test_packed_gram_roundtrip():
    from nmcompile.passes.statistics import LayerStats, pack_upper, unpack_upper
    rng = np.random.default_rng(21)
    for K in (1, 5, 600):  # 600: the row-slice path of the accumulator too
        A = rng.standard_normal((2, K, K))
        A = A + A.transpose(0, 2, 1)
        np.testing.assert_array_equal(unpack_upper(pack_upper(A), K), A)
        st = LayerStats.from_gram(A, np.zeros((2, K)), 3)
        np.testing.assert_array_equal(st.gram_group(1), A[1])
        assert st.groups == 2 and st.features == K
    X = rng.standard_normal((700, 600)).astype(np.float32)
    model = make_model([helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 600])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    st = collect_statistics(model, [LayerSpec("d", "x")], [{"x": X[:300]}, {"x": X[300:]}],
                            progress=False, precision="float64", chunk_bytes=1)["d"]
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(st.gram[0], X64.T @ X64, rtol=1e-12, atol=1e-9)


# --------------------------------------------------------------------------- calibdata


def io_model(first_dim="N"):
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [first_dim, 3, "T"])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, [first_dim, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((2,), np.float32), "w")
    wi = helper.make_tensor_value_info("w", TensorProto.FLOAT, [2])  # IR<4 style
    return make_model([helper.make_node("Identity", ["a"], ["y"])], [a, b, wi], [y], [w])


def good_data(n=5):
    return {"a": np.zeros((n, 3, 7), np.float32), "b": np.zeros((n, 2), np.int64)}


def test_load_calibration_file_and_folder(tmp_path):
    d = good_data()
    np.savez(tmp_path / "c.npz", **d)
    got = load_calibration(tmp_path / "c.npz")
    assert set(got) == {"a", "b"} and got["a"].shape == (5, 3, 7)
    folder = tmp_path / "dir"
    folder.mkdir()
    np.savez(folder / "2.npz", a=np.full((2, 3, 7), 2, np.float32), b=np.zeros((2, 2), np.int64))
    np.savez(folder / "1.npz", a=np.full((1, 3, 7), 1, np.float32), b=np.zeros((1, 2), np.int64))
    (folder / "notes.txt").write_text("ignored")
    got = load_calibration(str(folder))
    assert got["a"][:, 0, 0].tolist() == [1, 2, 2]


def test_load_calibration_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_calibration(tmp_path / "missing.npz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no .npz"):
        load_calibration(empty)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip file")
    with pytest.raises(UserError):
        load_calibration(bad)
    np.savez(tmp_path / "ok.npz", **good_data())
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError):
        load_calibration(tmp_path / "trunc.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(UserError):
        load_calibration(tmp_path / "text.npz")
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}, None], dtype=object))
    with pytest.raises(UserError, match="object"):
        load_calibration(tmp_path / "obj.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(UserError):
        load_calibration(tmp_path / "single.npy")
    np.savez(tmp_path / "none.npz")
    with pytest.raises(UserError):
        load_calibration(tmp_path / "none.npz")
    import zipfile
    with zipfile.ZipFile(tmp_path / "weird.npz", "w") as z:
        z.writestr("notes.txt", "hello")
    with pytest.raises(UserError):
        load_calibration(tmp_path / "weird.npz")
    np.savez(tmp_path / "cplx.npz", a=np.zeros(3, np.complex64))
    with pytest.raises(UserError, match="dtype"):
        load_calibration(tmp_path / "cplx.npz")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.savez(mixed / "1.npz", a=np.zeros((1, 3)))
    np.savez(mixed / "2.npz", b=np.zeros((1, 3)))
    with pytest.raises(UserError):
        load_calibration(mixed)


def test_validate_calibration():
    m = io_model()
    validate_calibration(m, good_data())
    d = good_data()
    d["a"] = np.zeros((5, 3, 11), np.float32)  # symbolic T: anything goes
    validate_calibration(m, d)
    with pytest.raises(UserError, match="missing b"):
        validate_calibration(m, {"a": good_data()["a"]})
    with pytest.raises(UserError, match="unknown c"):
        validate_calibration(m, {**good_data(), "c": np.zeros((5,))})
    with pytest.raises(UserError, match="dtype"):
        validate_calibration(m, {**good_data(), "a": np.zeros((5, 3, 7), np.float64)})
    with pytest.raises(UserError, match="shape"):
        validate_calibration(m, {**good_data(), "a": np.zeros((5, 4, 7), np.float32)})
    with pytest.raises(UserError):
        validate_calibration(m, {**good_data(), "a": np.zeros((5, 3), np.float32)})
    with pytest.raises(UserError, match="numbers of samples"):
        validate_calibration(m, {**good_data(), "b": np.zeros((4, 2), np.int64)})
    with pytest.raises(UserError, match="no samples"):
        validate_calibration(m, good_data(0))
    with pytest.raises(UserError, match="exactly 8"):
        validate_calibration(io_model(8), good_data(5))


def test_iter_batches():
    data = {k: np.arange(10 * np.prod(v.shape[1:])).reshape((10,) + v.shape[1:]).astype(v.dtype)
            for k, v in good_data(10).items()}
    one = iter_batches(io_model(1), data, 4)
    assert len(one) == 10
    got = list(one)
    assert len(got) == 10 and all(b["a"].shape[0] == 1 for b in got)
    assert list(one)[3]["b"][0, 0] == data["b"][3, 0]  # re-iterable
    four = list(iter_batches(io_model(4), data, 3))
    assert [b["a"].shape[0] for b in four] == [4, 4]  # remainder dropped
    dyn = list(iter_batches(io_model(), data, 4))
    assert [b["a"].shape[0] for b in dyn] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["a"] for b in dyn]), data["a"])
    assert fixed_batch_size(io_model(1)) == 1 and fixed_batch_size(io_model()) is None
    with pytest.raises(UserError):
        iter_batches(io_model(), data, 0)
    it = iter_batches(io_model(), data, 4)
    assert next(it)["a"].shape[0] == 4 and next(it)["a"].shape[0] == 4


def test_sparsegpt_group_selection():
    rng = np.random.default_rng(17)
    K = 32
    H, X = correlated_h(rng, K)
    W = rng.standard_normal((8, K))
    S, Wn = ap.sparsegpt_mask_and_update(W, H, 2, 4, select="group")
    assert np.all(S.reshape(8, -1, 4).sum(axis=2) == 2)
    assert not np.any(Wn[~S])
    assert explicit_error(W, Wn, X) <= explicit_error(W, W * S, X) * (1 + 1e-9)
    # one group, one row: the joint OBS error with F = all columns is the error
    # of the exact re-fit, so the chosen keep set is the best of the C(4,2)
    w = rng.standard_normal((1, 4))
    h, _ = correlated_h(rng, 4)
    hd = h + 0.01 * np.mean(np.diag(h)) * np.eye(4)
    S1, _ = ap.sparsegpt_mask_and_update(w, h, 2, 4, select="group")
    masks = [_mask_from_choice([c], 4, 4) for c in itertools.combinations(range(4), 2)]
    errs = [ap.reconstruction_error(w, ap.adaprune_rows(w, m, h, method="direct"), hd)
            for m in masks]
    best = masks[int(np.argmin(errs))]
    np.testing.assert_array_equal(S1, best)


def test_statistics_do_not_depend_on_thread_count():
    rng = np.random.default_rng(18)
    model, W = conv_model(rng, 8, 8, (3, 3), 1, dict(pads=[1, 1, 1, 1]))
    spec = spec_from_node(model.graph.node[1], W.shape)
    batches = [{"x": rng.standard_normal((2, 8, 9, 9)).astype(np.float32)}
               for _ in range(3)]
    a = collect_statistics(model, [spec], batches, progress=False, threads=1,
                           chunk_bytes=2048)[spec.name]
    b = collect_statistics(model, [spec], batches, progress=False, threads=3,
                           chunk_bytes=2048)[spec.name]
    assert a.gram.tobytes() == b.gram.tobytes() and a.mean.tobytes() == b.mean.tobytes()


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st_
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=25, deadline=None)
    @given(kh=st_.integers(1, 3), kw=st_.integers(1, 3), sh=st_.integers(1, 3),
           sw=st_.integers(1, 2), dh=st_.integers(1, 2), dw=st_.integers(1, 2),
           pads=st_.lists(st_.integers(0, 2), min_size=4, max_size=4),
           auto=st_.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]),
           group=st_.sampled_from([1, 2]), hw=st_.tuples(st_.integers(5, 8),
                                                         st_.integers(5, 8)))
    def test_im2col_property(kh, kw, sh, sw, dh, dw, pads, auto, group, hw):
        spec = LayerSpec("c", "x", "conv", kernel_shape=(kh, kw), strides=(sh, sw),
                         dilations=(dh, dw), pads=pads if auto == "NOTSET" else None,
                         group=group, auto_pad=auto)
        from nmcompile.passes.statistics import conv_pads
        x = np.random.default_rng(0).standard_normal((2, 4, *hw))
        pb, pe = conv_pads(spec, hw)
        ref = naive_patches(x, None, (kh, kw), (sh, sw), (dh, dw), pb, pe, group)
        np.testing.assert_array_equal(im2col(x, spec), ref)


def test_cg_row_blocks(monkeypatch):
    rng = np.random.default_rng(19)
    O, K = 150, 64
    H, _ = correlated_h(rng, K)
    W = rng.standard_normal((O, K))
    S = ap.nm_mask_from_scores(np.abs(W), 2, 4)
    whole = ap.adaprune_rows(W, S, H, method="cg", tol=1e-12)
    monkeypatch.setattr(ap, "_CG_BLOCK_BYTES", 1)  # blocks of 64 rows
    info = {}
    blocked = ap.adaprune_rows(W, S, H, method="cg", tol=1e-12, info=info)
    assert info["row_iterations"] > 0
    np.testing.assert_allclose(blocked, whole, atol=1e-8)


def test_parallel_matmul():
    rng = np.random.default_rng(20)
    A = rng.standard_normal((301, 257))
    B = rng.standard_normal((257, 129))
    np.testing.assert_allclose(ap.parallel_matmul(A, B, workers=3), A @ B, rtol=1e-12)
    out = np.empty((301, 129))
    assert ap.parallel_matmul(A, B, out=out) is out


def test_channel_last_order_for_conv_groups():
    rng = np.random.default_rng(22)
    W = rng.standard_normal((5, 8, 3, 2))
    perm = ap.channel_last_order(8, (3, 2))
    np.testing.assert_array_equal(W.reshape(5, -1)[:, perm],
                                  W.transpose(0, 2, 3, 1).reshape(5, -1))
    # a 2:4 mask chosen in channel-last order is 2:4 along input channels
    S = ap.nm_mask_from_scores(np.abs(W.reshape(5, -1)[:, perm]), 2, 4)
    back = np.empty_like(S)
    back[:, perm] = S
    assert np.all(back.reshape(5, 2, 4, 3, 2).sum(axis=2) == 2)
    np.testing.assert_array_equal(ap.channel_last_order(6, (1, 1)), np.arange(6))


def test_calibration_stays_in_its_file_and_is_read_by_slices(tmp_path):
    from nmcompile.calibdata import StoredRows

    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 3, 4)).astype(np.float32)
    b = rng.integers(0, 9, size=(7, 2)).astype(np.int64)
    np.savez(tmp_path / "plain.npz", a=a, b=b)
    got = load_calibration(tmp_path / "plain.npz")
    assert isinstance(got["a"], StoredRows) and got["a"].shape == a.shape and got["a"].dtype == a.dtype
    assert np.array_equal(got["a"][2:5], a[2:5]) and np.array_equal(got["b"][5:99], b[5:])
    assert np.array_equal(got["a"][-1], a[-1]) and np.array_equal(np.asarray(got["b"]), b)
    batch = got["a"][0:3]
    batch[:] = 0  # a fresh array per slice: the file is never written
    assert np.array_equal(load_calibration(tmp_path / "plain.npz")["a"][0:3], a[0:3])
    # a folder of plain files is still read a slice at a time, across file boundaries
    folder = tmp_path / "dir"
    folder.mkdir()
    np.savez(folder / "1.npz", a=a[:3], b=b[:3])
    np.savez(folder / "2.npz", a=a[3:], b=b[3:])
    joined = load_calibration(folder)
    assert isinstance(joined["a"], StoredRows) and np.array_equal(joined["a"][1:6], a[1:6])
    # compressed or Fortran-ordered members are loaded as before
    np.savez_compressed(tmp_path / "small.npz", a=a, b=b)
    np.savez(tmp_path / "fortran.npz", a=np.asfortranarray(a), b=b)
    for name in ("small.npz", "fortran.npz"):
        loaded = load_calibration(tmp_path / name)
        assert isinstance(loaded["a"], np.ndarray) and np.array_equal(loaded["a"], a)
    # the batches a compile sees are the same either way
    model = make_model([helper.make_node("Identity", ["a"], ["y"])],
                       [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])])
    lazy = [x["a"] for x in iter_batches(model, {"a": got["a"]}, 3)]
    eager = [x["a"] for x in iter_batches(model, {"a": a}, 3)]
    assert len(lazy) == 3 and all(np.array_equal(x, y) for x, y in zip(lazy, eager))


def test_calibration_member_shorter_than_its_header(tmp_path):
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros((10, 3), np.float32))
    raw = buf.getvalue()
    header = raw[: len(raw) - 10 * 3 * 4].replace(b"(10, 3)", b"(99, 3)")
    with zipfile.ZipFile(tmp_path / "short.npz", "w", zipfile.ZIP_STORED) as z:
        z.writestr("a.npy", header + raw[len(header):])
    with pytest.raises(UserError, match="shorter"):
        load_calibration(tmp_path / "short.npz")
    np.savez(tmp_path / "gone.npz", a=np.zeros((4, 3), np.float32))
    data = load_calibration(tmp_path / "gone.npz")
    (tmp_path / "gone.npz").unlink()  # deleted between loading and reading
    with pytest.raises(UserError, match="cannot read calibration file"):
        data["a"][0:2]


def test_parallel_matmul_rounding_does_not_depend_on_workers():
    rng = np.random.default_rng(21)
    A = rng.standard_normal((300, 600)).astype(np.float32)
    B = rng.standard_normal((600, 500)).astype(np.float32)
    results = [ap.parallel_matmul(A, B, workers=w) for w in (1, 2, 3, 8)]
    for r in results[1:]:
        assert np.array_equal(r, results[0])


def test_joint_keep_set_choice_only_where_the_sets_are_few(monkeypatch):
    from nmcompile.passes import adaprune as ad

    rng = np.random.default_rng(11)
    W = rng.standard_normal((4, 64))
    H, _ = correlated_h(rng, 64)
    use = type("Use", (), {"op": "MatMul", "eff_shape": (64, 4)})()
    calls = []
    real = ap._group_choice
    monkeypatch.setattr(ap, "_group_choice", lambda *a: calls.append(1) or real(*a))
    for n, m, joint in ((2, 4, True), (4, 8, True), (8, 16, False), (8, 32, False)):
        calls.clear()
        keep = ad.joint_mask_score(W, lambda g, order, dtype: H.astype(dtype), 0, use, n, m, 0.01)
        assert (keep.reshape(4, -1, m).sum(axis=2) == n).all()
        assert bool(calls) == joint  # 8:16 would try 12870 keep sets per group, 8:32 10.5 million


def _ledoit_wolf(X: np.ndarray) -> float:
    """Ledoit-Wolf's shrinkage intensity of S = XᵀX/n toward mean(diag S)·I, written out."""
    n, K = X.shape
    S = X.T @ X / n
    mu = np.trace(S) / K
    d2 = np.sum((S - mu * np.eye(K)) ** 2)
    b2 = sum(np.sum((np.outer(x, x) - S) ** 2) for x in X) / n**2
    return float(min(1.0, max(0.0, b2 / d2)))


@pytest.mark.parametrize("float32_sums", [False, True])
def test_shrinkage_equals_ledoit_wolf(float32_sums):
    # from the streamed Σ‖x‖⁴ and the packed Gram, against the textbook formula on the vectors
    rng = np.random.default_rng(3)
    mixing = rng.standard_normal((12, 12))
    X = (rng.standard_normal((40, 12)) @ mixing).astype(np.float32)  # correlated inputs
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [inp], [out])
    spec = LayerSpec("L", "x", "dense", feature_axis=-1)
    batches = [{"x": X[i:i + 7]} for i in range(0, 40, 7)]
    stats = collect_statistics(model, [spec], batches, progress=False, precision="float64",
                               float32_sums_from=1 if float32_sums else None)["L"]
    assert stats.fourth[0] == pytest.approx(float(np.sum(np.sum(X.astype(np.float64) ** 2, axis=1) ** 2)), rel=1e-9)
    assert stats.shrinkage() == pytest.approx(_ledoit_wolf(X.astype(np.float64)), rel=1e-4 if float32_sums else 1e-9)
    # a conv's groups: each group's patches, the mean over groups
    x = rng.standard_normal((3, 4, 6, 6)).astype(np.float32)
    conv = LayerSpec("C", "x", "conv", kernel_shape=(3, 3), group=2)
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [inp], [out])
    stats = collect_statistics(model, [conv], [{"x": x}], progress=False, precision="float64")["C"]
    patches = im2col(x.astype(np.float64), conv)  # (G, rows, K)
    assert stats.shrinkage() == pytest.approx(np.mean([_ledoit_wolf(p) for p in patches]), rel=1e-9)


def test_isotropic_inputs_are_not_fitted_to_noise(tmp_path):
    # 64 isotropic vectors for 32 inputs: nothing to learn but sampling noise. The
    # shrinkage is ~1, the re-fit stays near the masked weights and the held-out error is
    # no worse than magnitude pruning's (a fixed 1% damping fitted the noise: ~40% worse)
    from nmcompile.pipeline import compile_model

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [inp], [out], [numpy_helper.from_array(w, "w")])
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((64, 32)).astype(np.float32))
    held_out = rng.standard_normal((2000, 32)).astype(np.float32)
    dense = held_out @ w

    def error(path):
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": held_out})[0]
        return float(np.sum((got - dense) ** 2) / np.sum(dense**2))

    magnitude = error(compile_model(tmp_path / "m.onnx", tmp_path / "mag.onnx").paths.model)
    for sequential in (False, True):
        result = compile_model(tmp_path / "m.onnx", tmp_path / "cal.onnx", calib=tmp_path / "c.npz", sequential_calib=sequential)
        (row,) = result.report["layers"]
        assert row["shrinkage"] > 0.9 and row["damping"] > 1.0
        assert any("say little about its inputs" in n for n in row["notes"])
        assert error(result.paths.model) <= magnitude * 1.02
