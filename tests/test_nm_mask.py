import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nmcompile.passes.nm_mask import group_max_nonzeros, nm_mask


def reference_topn(scores, n, m):
    """Plain numpy: stable argsort per group, keep the n best (lower index wins ties)."""
    groups = scores.reshape(-1, m)
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return keep.reshape(scores.shape)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (8, 16), (16, 32), (1, 2), (5, 7)])
def test_matches_argsort_reference(n, m):
    rng = np.random.default_rng(n * 100 + m)
    scores = np.abs(rng.standard_normal((37, 3 * m))).astype(np.float32)
    scores[::5] = np.round(scores[::5])  # plenty of ties
    scores[3] = 0
    assert np.array_equal(nm_mask(scores, n, m), reference_topn(scores, n, m))


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([(2, 4), (1, 4), (4, 8), (3, 8), (8, 16), (16, 32)]),
    st.integers(1, 5),
    st.integers(1, 4),
    st.data(),
)
def test_mask_invariants(nm, rows, groups, data):
    n, m = nm
    scores = data.draw(hnp.arrays(np.float32, (rows, groups * m), elements=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.25, 7.0])))
    keep = nm_mask(scores, n, m)
    per_group = keep.reshape(-1, m).sum(axis=1)
    assert np.all(per_group == n)
    # optimal: the kept total equals the sum of the n largest of each group
    best = np.sort(scores.reshape(-1, m), axis=1)[:, ::-1][:, :n].sum(axis=1)
    assert np.allclose((scores * keep).reshape(-1, m).sum(axis=1), best)


def test_axis_is_the_reduction_axis():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 12, 3, 3)).astype(np.float32)  # Conv [O, I, kh, kw]
    keep = nm_mask(np.abs(w), 2, 4, axis=1)
    counts = np.moveaxis(keep, 1, -1).reshape(-1, 4).sum(axis=1)
    assert np.all(counts == 2)
    assert group_max_nonzeros(np.where(keep, w, 0), 4, 1) == 2


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (6, 8), (8, 16)])
def test_sequential_prunes_consecutive_window_of_least_score(n, m):
    rng = np.random.default_rng(m)
    scores = np.abs(rng.standard_normal((50, 2 * m))).astype(np.float32)
    keep = nm_mask(scores, n, m, sequential=True)
    for group, kept in zip(scores.reshape(-1, m), keep.reshape(-1, m)):
        pruned = np.flatnonzero(~kept)
        assert len(pruned) == m - n
        assert np.all(np.diff(pruned) == 1)
        windows = [group[s : s + m - n].sum() for s in range(n + 1)]
        assert np.isclose(group[pruned].sum(), min(windows))


def test_brute_force_small():
    # every 2:4 group: the kept pair has the largest sum among all 6 pairs
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 4, size=(200, 4)).astype(np.float32)
    keep = nm_mask(scores, 2, 4)
    for s, k in zip(scores, keep):
        best = max(s[list(c)].sum() for c in itertools.combinations(range(4), 2))
        assert s[k].sum() == best


def test_rejects_length_not_multiple():
    with pytest.raises(ValueError):
        nm_mask(np.ones((2, 6)), 2, 4)


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (8, 16)])
def test_prune_in_blocks_equals_one_block(monkeypatch, sequential, n, m):
    # a conv-like weight whose groups have a stride (inner = 9), cut into many blocks
    from nmcompile.passes import nm_mask as mod

    rng = np.random.default_rng(m)
    w = rng.standard_normal((6, 2 * m, 3, 3)).astype(np.float32)
    w[0] = np.round(w[0])  # ties
    whole = mod.prune_nm(w, n, m, axis=1, sequential=sequential)
    monkeypatch.setattr(mod, "_BLOCK_ELEMENTS", 5 * m * 9)  # blocks of 5 of the 12 group rows: 5, 5, 2
    blocked = mod.prune_nm(w, n, m, axis=1, sequential=sequential)
    for a, b in zip(whole[:2], blocked[:2]):
        assert np.array_equal(a, b)
    pruned, keep, kept, total = blocked
    assert np.array_equal(pruned, np.where(keep, w, np.float32(0)))
    assert not np.signbit(pruned[~keep]).any()  # dropped weights are +0.0, whatever their sign
    assert np.isclose(kept, np.abs(w[keep], dtype=np.float64).sum(), rtol=1e-12)
    assert np.isclose(total, np.abs(w, dtype=np.float64).sum(), rtol=1e-12)


def test_plain_compiles_do_not_load_numba(tmp_path):
    # numba holds ~110 MB of resident memory once a kernel is loaded (more than
    # ResNet-50's weights): only transposable masks and permutations need it
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, onnx\n"
        "from nmcompile import modelzoo\n"
        "from nmcompile.pipeline import compile_model\n"
        f"d = {str(tmp_path)!r}\n"
        "onnx.save(modelzoo.conv_model(), d + '/m.onnx')\n"
        "np.savez(d + '/c.npz', x=np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))\n"
        "compile_model(d + '/m.onnx', d + '/a.onnx', pattern='2:4')\n"
        "compile_model(d + '/m.onnx', d + '/b.onnx', pattern='4:8', sequential=True, calib=d + '/c.npz')\n"
        "print('numba' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_non_finite_weights_are_zeroed_not_nan():
    from nmcompile.passes.nm_mask import prune_nm

    w = np.array([[np.inf, 1.0, -np.inf, 2.0, 0.5, -0.25, 3.0, 1.0]], np.float32)
    scores = np.array([[0, 1, 0, 2, 1, 0, 3, 1]], np.float32)  # the infinities lose
    pruned, keep, kept, total = prune_nm(w, 2, 4, axis=1, scores=scores)
    assert np.array_equal(keep, [[False, True, False, True, True, False, True, False]])
    assert np.array_equal(pruned, np.where(keep, w, 0)) and not np.isnan(pruned).any()
    assert kept == 6.5 and total == np.inf


@pytest.mark.parametrize("sequential", [False, True])
def test_nan_scores_or_weights_still_keep_exactly_n(sequential):
    from nmcompile.passes.nm_mask import prune_nm

    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    scores = np.abs(w).copy()
    scores[rng.random(scores.shape) < 0.2] = np.nan  # e.g. [1, nan, 2]: a cycle for pairwise ranks
    for s, weights in ((scores, w), (None, np.where(np.isnan(scores), np.float32(np.nan), w))):
        _, keep, _, _ = prune_nm(weights, 2, 4, axis=1, sequential=sequential, scores=s)
        assert (keep.reshape(64, 4, 4).sum(axis=2) == 2).all()
        if not sequential:  # a NaN is dropped before any number in its group (the same places in both cases)
            groups_nan = np.isnan(scores).reshape(64, 4, 4)
            assert (groups_nan.sum(axis=2) <= 2).any()
            assert not (keep.reshape(64, 4, 4) & groups_nan & (groups_nan.sum(axis=2) <= 2)[..., None]).any()
