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
