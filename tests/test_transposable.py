"""Transposable N:M mask solvers (nmcompile.passes.transposable)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nmcompile.passes import transposable as tp
from nmcompile.passes.transposable import (
    check_transposable,
    mask_diversity,
    solve_tiles,
    tile_optimality_gap,
    transposable_mask,
)
from scipy.optimize import linprog

PATTERNS = [(2, 4), (4, 8), (8, 16)]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def lp_optimum(tiles: np.ndarray, n: int) -> np.ndarray:
    """Per-tile optimum of the transportation LP, all tiles in one
    block-diagonal HiGHS solve (the blocks are independent, so the optimal
    solution is optimal on every block)."""
    T, m, _ = tiles.shape
    nv = T * m * m
    var = np.arange(nv)
    ones = np.ones(nv)
    row_con = var // m  # (tile, row)
    col_con = (var // (m * m)) * m + var % m  # (tile, col)
    a_rows = sp.csr_matrix((ones, (row_con, var)), shape=(T * m, nv))
    a_cols = sp.csr_matrix((ones, (col_con, var)), shape=(T * m, nv))
    a_eq = sp.vstack([a_rows, a_cols]).tocsr()
    b_eq = np.full(2 * T * m, float(n))
    c = -tiles.reshape(-1).astype(np.float64)
    res = linprog(c, A_eq=a_eq, b_eq=b_eq, bounds=(0, 1), method="highs")
    assert res.status == 0, res.message
    x = res.x.reshape(T, m, m)
    return (tiles.astype(np.float64) * x).sum(axis=(1, 2))


def kept_per_tile(tiles: np.ndarray, masks: np.ndarray) -> np.ndarray:
    return np.where(masks, tiles.astype(np.float64), 0.0).sum(axis=(1, 2))


def tile_batches(m: int, rng: np.random.Generator, t: int) -> np.ndarray:
    """Random |gaussian| tiles, small-integer tiles (many ties), tiles with
    many zeros, all-zero and constant tiles."""
    parts = [
        np.abs(rng.standard_normal((t, m, m))),
        rng.integers(0, 4, (t, m, m)).astype(np.float64),
        np.where(rng.random((t, m, m)) < 0.6, 0.0, np.abs(rng.standard_normal((t, m, m)))),
        rng.integers(0, 2, (t // 4, m, m)).astype(np.float64),
        np.zeros((2, m, m)),
        np.full((2, m, m), 3.0),
    ]
    return np.concatenate(parts)


def assert_exact_n(masks: np.ndarray, n: int) -> None:
    assert (masks.sum(axis=2) == n).all()
    assert (masks.sum(axis=1) == n).all()


# --------------------------------------------------------------------------
# exact solver against LP and brute force
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n,m,t", [(2, 4, 1000), (4, 8, 500), (8, 16, 120)])
def test_exact_equals_lp(n, m, t):
    rng = np.random.default_rng(1000 + m)
    tiles = tile_batches(m, rng, t)
    masks = solve_tiles(tiles, n, "exact")
    assert_exact_n(masks, n)
    got = kept_per_tile(tiles, masks)
    ref = lp_optimum(tiles, n)
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("n,m", [(1, 4), (3, 4), (2, 5), (1, 5), (3, 8), (2, 6)])
def test_exact_equals_lp_other_patterns(n, m):
    rng = np.random.default_rng(7 * m + n)
    tiles = tile_batches(m, rng, 150)
    masks = solve_tiles(tiles, n, "exact")
    assert_exact_n(masks, n)
    np.testing.assert_allclose(kept_per_tile(tiles, masks), lp_optimum(tiles, n),
                               rtol=1e-7, atol=1e-7)


def test_exact_with_negative_and_large_scores():
    # not needed by the compiler (scores are magnitudes), but the solvers
    # maximise any finite scores
    rng = np.random.default_rng(77)
    for n, m in [(2, 4), (4, 8), (5, 8)]:
        tiles = np.concatenate([rng.standard_normal((200, m, m)),
                                1e12 * rng.standard_normal((50, m, m))])
        masks = solve_tiles(tiles, n, "exact")
        assert_exact_n(masks, n)
        np.testing.assert_allclose(kept_per_tile(tiles, masks), lp_optimum(tiles, n),
                                   rtol=1e-7, atol=1e-6)
        assert_exact_n(solve_tiles(tiles, n, "approx"), n)


def brute_force_patterns_24() -> np.ndarray:
    """All 4x4 0/1 matrices with row and column sums 2, in lexicographic
    order of their rows' column pairs (independent of the module)."""
    pairs = list(itertools.combinations(range(4), 2))
    out = []
    for rows in itertools.product(pairs, repeat=4):
        mat = np.zeros((4, 4), dtype=bool)
        for i, (a, b) in enumerate(rows):
            mat[i, a] = mat[i, b] = True
        if (mat.sum(axis=0) == 2).all():
            out.append(mat)
    return np.array(out)


def test_24_brute_force_and_tie_break():
    pats = brute_force_patterns_24()
    assert len(pats) == 90
    assert np.array_equal(tp.enumerate_transposable_tiles(2, 4), pats)
    rng = np.random.default_rng(24)
    tiles = np.concatenate([
        np.abs(rng.standard_normal((3000, 4, 4))),
        rng.integers(0, 3, (3000, 4, 4)).astype(np.float64),  # exact ties
        np.zeros((1, 4, 4)),
    ])
    scores = tiles.reshape(-1, 16) @ pats.reshape(90, 16).T.astype(np.float64)
    best = scores.argmax(axis=1)  # lowest pattern index among ties
    want = pats[best]
    for dtype in (np.float64, np.float32):
        got = solve_tiles(tiles.astype(dtype), 2, "exact")
        assert np.array_equal(got, want)


def test_pattern_counts():
    assert tp.count_transposable_tiles(2, 4) == 90
    assert tp.count_transposable_tiles(1, 4) == 24
    assert tp.count_transposable_tiles(3, 4) == 24
    assert tp.count_transposable_tiles(4, 8) == 116963796250
    assert tp.count_transposable_tiles(1, 8) == math.factorial(8)
    assert tp.count_transposable_tiles(3, 8) == tp.count_transposable_tiles(5, 8) == 24046189440
    with pytest.raises(ValueError):
        tp.count_transposable_tiles(16, 32)  # too expensive for the DP
    for n, m in [(1, 4), (2, 4), (3, 4), (1, 5), (2, 5), (1, 6)]:
        pats = tp.enumerate_transposable_tiles(n, m)
        assert len(pats) == tp.count_transposable_tiles(n, m)
        assert (pats.sum(axis=1) == n).all() and (pats.sum(axis=2) == n).all()
        assert len({p.tobytes() for p in pats}) == len(pats)


# --------------------------------------------------------------------------
# greedy and approx
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", PATTERNS + [(1, 4), (3, 8)])
def test_greedy_bound_and_approx_quality(n, m):
    rng = np.random.default_rng(50 + m + n)
    tiles = tile_batches(m, rng, 400)
    opt = kept_per_tile(tiles, solve_tiles(tiles, n, "exact"))
    g_mask = solve_tiles(tiles, n, "greedy")
    a_mask = solve_tiles(tiles, n, "approx")
    assert (g_mask.sum(axis=2) <= n).all() and (g_mask.sum(axis=1) <= n).all()
    assert_exact_n(a_mask, n)
    g = kept_per_tile(tiles, g_mask)
    a = kept_per_tile(tiles, a_mask)
    eps = 1e-9 * (1 + opt)
    assert (g >= 0.5 * opt - eps).all()  # the 2-approximation, every tile
    assert (a <= opt + eps).all()
    # approx >= greedy on totals.  Not per tile: greedy's "at most n" tile can
    # beat the exactly-n optimum when completing it needs dropping a kept entry
    assert a.sum() >= g.sum()
    assert a.sum() >= 0.98 * opt.sum()


def test_greedy_can_beat_exactly_n_optimum():
    # row 1 and column 0 end under-full with x[1, 0] already kept: completing
    # the greedy tile to exactly 2 per row/column must drop a kept entry
    tile = np.array([[0.47181315, 1.37795095, 0.13573073, 2.31036349],
                     [0.78719274, 0.58028442, 0.19550583, 0.56581785],
                     [0.00721136, 0.56119811, 0.86761676, 3.06603674],
                     [0.07734506, 2.01666069, 0.64860061, 0.67803973]])[None]
    g = kept_per_tile(tile, solve_tiles(tile, 2, "greedy"))[0]
    e = kept_per_tile(tile, solve_tiles(tile, 2, "exact"))[0]
    a = kept_per_tile(tile, solve_tiles(tile, 2, "approx"))[0]
    assert g > e >= a
    assert e == pytest.approx(lp_optimum(tile, 2)[0])


def test_greedy_is_the_seed_paper_greedy():
    """Reference greedy in plain Python: descending score, ties by lower
    row-major index, keep while row and column hold fewer than n."""
    rng = np.random.default_rng(3)
    tiles = np.concatenate([np.abs(rng.standard_normal((60, 8, 8))),
                            rng.integers(0, 3, (60, 8, 8)).astype(np.float64)])
    got = solve_tiles(tiles, 4, "greedy")
    for t in range(len(tiles)):
        flat = tiles[t].reshape(-1)
        order = sorted(range(64), key=lambda k: (-flat[k], k))
        want = np.zeros(64, dtype=bool)
        rc = [0] * 8
        cc = [0] * 8
        for k in order:
            i, j = divmod(k, 8)
            if rc[i] < 4 and cc[j] < 4:
                want[k] = True
                rc[i] += 1
                cc[j] += 1
        assert np.array_equal(got[t].reshape(-1), want)


def test_approx_quality_on_random_scores():
    rng = np.random.default_rng(9)
    for n, m in PATTERNS:
        s = np.abs(rng.standard_normal((512, 512))).astype(np.float32)
        a = transposable_mask(s, n, m, "approx")
        assert check_transposable(a, n, m)
        assert tile_optimality_gap(s, a, n, m) >= 0.995


# --------------------------------------------------------------------------
# constraints on every solver (property tests)
# --------------------------------------------------------------------------

NM = st.sampled_from([(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (6, 8), (8, 16), (2, 5), (4, 5)])


@st.composite
def score_matrices(draw):
    n, m = draw(NM)
    rt = draw(st.integers(1, 3))
    ct = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["int", "float", "zeros", "sparse"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shape = (rt * m, ct * m)
    if kind == "int":
        s = rng.integers(0, draw(st.integers(1, 5)), shape).astype(np.float64)
    elif kind == "float":
        s = np.abs(rng.standard_normal(shape))
    elif kind == "zeros":
        s = np.zeros(shape)
    else:
        s = np.where(rng.random(shape) < 0.7, 0.0, rng.random(shape))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return n, m, s.astype(dtype)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(score_matrices())
def test_all_solvers_satisfy_constraints(case):
    n, m, s = case
    exact = transposable_mask(s, n, m, "exact")
    opt = s[exact].sum(dtype=np.float64)
    for solver in ("exact", "approx", "auto"):
        mk = transposable_mask(s, n, m, solver)
        assert mk.dtype == np.bool_ and mk.shape == s.shape
        assert check_transposable(mk, n, m)
        assert check_transposable(mk.T, n, m)
        assert s[mk].sum(dtype=np.float64) <= opt + 1e-6 * (1 + abs(opt))
    g = transposable_mask(s, n, m, "greedy")
    assert check_transposable(g, n, m, exact=False)
    # determinism
    assert np.array_equal(transposable_mask(s, n, m, "exact"), exact)
    assert np.array_equal(transposable_mask(s, n, m, "greedy"), g)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([np.float32, np.float64]))
def test_float32_and_float64_same_optimum(seed, dtype):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, (16, 32)).astype(dtype)
    for n, m in [(2, 4), (4, 8), (8, 16)]:
        a = transposable_mask(s.astype(np.float32), n, m)
        b = transposable_mask(s.astype(np.float64), n, m)
        assert s[a].sum() == s[b].sum()


# --------------------------------------------------------------------------
# the matrix API
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("solver", ["exact", "approx", "auto"])
def test_matrix_mask_is_nm_both_ways(n, m, solver):
    rng = np.random.default_rng(m)
    R, C = 6 * m, 10 * m
    w = rng.standard_normal((R, C)).astype(np.float32)
    mask = transposable_mask(np.abs(w), n, m, solver)
    assert mask.shape == (R, C)
    pruned = np.where(mask, w, 0)
    # W: every group of m consecutive entries along the reduction axis (1)
    # holds exactly n nonzeros; so does W.T along its rows
    for mat in (pruned, pruned.T):
        groups = (mat != 0).reshape(mat.shape[0], -1, m).sum(axis=2)
        assert (groups == n).all()
    # tiles seen by solve_tiles are the same problem
    tiles = np.abs(w).reshape(R // m, m, C // m, m).transpose(0, 2, 1, 3).reshape(-1, m, m)
    tmask = solve_tiles(tiles, n, solver)
    assert np.array_equal(
        tmask.reshape(R // m, C // m, m, m).transpose(0, 2, 1, 3).reshape(R, C), mask)


def test_non_contiguous_and_integer_inputs():
    rng = np.random.default_rng(5)
    s = np.abs(rng.standard_normal((64, 48)))
    ref = transposable_mask(s.T.copy(), 4, 8)
    assert np.array_equal(transposable_mask(s.T, 4, 8), ref)  # Fortran-order view
    si = rng.integers(0, 9, (16, 16))
    mi = transposable_mask(si, 2, 4)
    assert np.array_equal(mi, transposable_mask(si.astype(np.float64), 2, 4))


def test_auto_is_exact_for_small_m():
    rng = np.random.default_rng(11)
    s = np.abs(rng.standard_normal((64, 64)))
    for n, m in PATTERNS:
        assert np.array_equal(transposable_mask(s, n, m, "auto"), transposable_mask(s, n, m, "exact"))


def test_deterministic_across_thread_counts():
    import numba

    rng = np.random.default_rng(12)
    s = np.abs(rng.standard_normal((512, 512))).astype(np.float32)
    before = numba.get_num_threads()
    try:
        outs = []
        for th in sorted({1, before}):
            numba.set_num_threads(th)
            outs.append([transposable_mask(s, 4, 8, sv) for sv in ("exact", "approx", "greedy")])
        for a, b in zip(outs[0], outs[-1]):
            assert np.array_equal(a, b)
    finally:
        numba.set_num_threads(before)


def test_optimality_gap():
    rng = np.random.default_rng(13)
    s = np.abs(rng.standard_normal((64, 64)))
    assert tile_optimality_gap(s, transposable_mask(s, 4, 8), 4, 8) == pytest.approx(1.0)
    g = tile_optimality_gap(s, transposable_mask(s, 4, 8, "greedy"), 4, 8)
    assert 0.5 <= g < 1.0
    assert tile_optimality_gap(np.zeros((8, 8)), np.zeros((8, 8), bool), 4, 8) == 1.0


def test_bad_arguments():
    s = np.ones((8, 8))
    with pytest.raises(ValueError):
        transposable_mask(np.ones((8, 12)), 4, 8)  # not tileable
    with pytest.raises(ValueError):
        transposable_mask(np.ones(64), 4, 8)
    with pytest.raises(ValueError):
        transposable_mask(s, 0, 8)
    with pytest.raises(ValueError):
        transposable_mask(s, 8, 8)
    with pytest.raises(ValueError):
        transposable_mask(np.ones((64, 64)), 4, 64)  # m > 32
    with pytest.raises(ValueError):
        transposable_mask(s, 4, 8, "nope")
    with pytest.raises(ValueError):
        transposable_mask(np.full((8, 8), np.nan), 4, 8)
    with pytest.raises(ValueError):
        solve_tiles(np.ones((3, 4, 8)), 2)


def test_empty_input():
    assert transposable_mask(np.zeros((0, 8)), 4, 8).shape == (0, 8)
    assert solve_tiles(np.zeros((0, 4, 4)), 2).shape == (0, 4, 4)


# --------------------------------------------------------------------------
# mask diversity
# --------------------------------------------------------------------------


def test_mask_diversity_values():
    assert mask_diversity(1, 2, False, unstructured=True) == math.comb(64, 32)
    assert f"{mask_diversity(1, 2, False, unstructured=True):.2e}" == "1.83e+18"
    assert mask_diversity(4, 8, False) == 70**8
    assert f"{mask_diversity(4, 8, False):.2e}" == "5.76e+14"
    assert mask_diversity(2, 4, False) == 6**16
    assert f"{mask_diversity(2, 4, False):.2e}" == "2.82e+12"
    assert mask_diversity(4, 8, True) == 116963796250
    assert f"{mask_diversity(4, 8, True):.2e}" == "1.17e+11"
    assert mask_diversity(2, 4, True) == 90**4
    assert f"{mask_diversity(2, 4, True):.2e}" == "6.56e+07"
    assert mask_diversity(16, 32, True) is None  # 1024 weights per tile
    assert mask_diversity(2, 4, True, weights=16) == 90
    assert mask_diversity(3, 8, False, weights=12) is None
    # transposable is always a subset of plain N:M
    for n, m in [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8)]:
        assert mask_diversity(n, m, True, weights=m * m) <= mask_diversity(n, m, False, weights=m * m)


def test_count_matches_enumeration_dp():
    # the DP against brute force over all 0/1 matrices for small sizes
    for m in (2, 3, 4):
        for n in range(1, m):
            brute = 0
            for bits in range(1 << (m * m)):
                mat = np.array([(bits >> k) & 1 for k in range(m * m)]).reshape(m, m)
                if (mat.sum(0) == n).all() and (mat.sum(1) == n).all():
                    brute += 1
            assert tp.count_transposable_tiles(n, m) == brute
