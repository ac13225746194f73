"""The nm-mask pass: which weights survive, N of every M along the reduction axis.

The per-group choice is a JIT-compiled kernel (numba): ranking M scores by
pairwise comparison is branch-light and cache-friendly, and for M = 4 it runs
several times faster than a numpy argsort over the same groups.
"""

from __future__ import annotations

import numba
import numpy as np

from .base import CompileContext, Pass, PassResult
from .targets import Use, WeightView


@numba.njit(cache=True)
def _nm_kernel(weight, scores, use_abs, n, m, sequential, keep, pruned, nchunks):
    """Mask and prune in place of the weight's own layout, viewed as [outer, K, inner].

    Groups are m consecutive entries along K (stride `inner`); nothing is transposed.
    Top-n: rank by pairwise comparison, the lower index winning ties. Sequential:
    drop the window of m-n consecutive entries with the least total score.
    Single-threaded on purpose: on a shared 2-core machine a parallel region
    waits for its slowest thread, and measured 3-5x slower than one thread
    whenever another process was busy (120 vs 35 M weights/s). Partial sums per
    chunk keep float summation short and its order fixed.
    """
    outer, k, inner = weight.shape
    ngroups = k // m
    jobs = outer * ngroups
    kept_parts = np.zeros(nchunks)
    total_parts = np.zeros(nchunks)
    for c in range(nchunks):
        buf = np.empty(m, dtype=np.float32)
        kept_l1 = 0.0
        total_l1 = 0.0
        for job in range(c * jobs // nchunks, (c + 1) * jobs // nchunks):
            a = job // ngroups
            base = (job % ngroups) * m
            for b in range(inner):
                for i in range(m):
                    v = scores[a, base + i, b]
                    buf[i] = abs(v) if use_abs else v
                if sequential:
                    width = m - n
                    best_start = 0
                    best = np.inf
                    for start in range(n + 1):
                        acc = 0.0
                        for t in range(start, start + width):
                            acc += buf[t]
                        if acc < best:
                            best = acc
                            best_start = start
                    for i in range(m):
                        keep[a, base + i, b] = not (best_start <= i < best_start + width)
                else:
                    for i in range(m):
                        si = buf[i]
                        rank = 0
                        for j in range(i):
                            rank += buf[j] >= si
                        for j in range(i + 1, m):
                            rank += buf[j] > si
                        keep[a, base + i, b] = rank < n
                for i in range(m):
                    w = weight[a, base + i, b]
                    aw = abs(w)
                    total_l1 += aw
                    if keep[a, base + i, b]:
                        kept_l1 += aw
                        pruned[a, base + i, b] = w
                    else:
                        pruned[a, base + i, b] = 0
        kept_parts[c] = kept_l1
        total_parts[c] = total_l1
    kept = 0.0
    total = 0.0
    for c in range(nchunks):
        kept += kept_parts[c]
        total += total_parts[c]
    return kept, total


# Groups per partial |w| sum.
_GROUPS_PER_CHUNK = 1 << 16


def _as_3d(array: np.ndarray, axis: int) -> np.ndarray:
    shape = array.shape
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1 :], dtype=np.int64))
    return array.reshape(outer, shape[axis], inner)


def prune_nm(weight: np.ndarray, n: int, m: int, axis: int, sequential: bool = False, scores: np.ndarray | None = None):
    """(pruned weight, keep mask, kept |w| sum, total |w| sum): N of every M along `axis`, by score (default |w|)."""
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    axis = axis % weight.ndim
    if weight.shape[axis] % m:
        raise ValueError(f"axis length {weight.shape[axis]} is not a multiple of {m}")
    keep = np.empty(weight.shape, dtype=np.bool_)
    pruned = np.empty_like(weight)
    if weight.size == 0:
        return pruned, keep, 0.0, 0.0
    w3 = _as_3d(weight, axis)
    s3 = w3 if scores is None else _as_3d(np.ascontiguousarray(scores, dtype=np.float32), axis)
    groups = weight.size // m
    nchunks = max(1, min(256, groups // _GROUPS_PER_CHUNK))
    kept, total = _nm_kernel(w3, s3, scores is None, n, m, sequential, _as_3d(keep, axis), _as_3d(pruned, axis), nchunks)
    return pruned, keep, kept, total


def nm_mask(scores: np.ndarray, n: int, m: int, axis: int = -1, sequential: bool = False) -> np.ndarray:
    """Boolean keep-mask with at most n of every m consecutive entries along `axis` (higher score kept)."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    return prune_nm(scores, n, m, axis, sequential, scores=scores)[1]


def group_max_nonzeros(weight: np.ndarray, m: int, axis: int) -> int | None:
    """The largest number of nonzeros in any group of m along axis (None if it does not divide)."""
    axis = axis % weight.ndim
    if weight.shape[axis] % m or weight.size == 0:
        return None
    nz = _as_3d(np.ascontiguousarray(weight) != 0, axis)  # a view: no transposed copy
    outer, k, inner = nz.shape
    return int(nz.reshape(outer, k // m, m, inner).sum(axis=2, dtype=np.int32).max())


def existing_pattern(weight: np.ndarray, axis: int, ms=(4, 8, 16, 32)) -> tuple[int, int] | None:
    """The sparsest N:M (M in ms) the weight already follows along axis; None if it follows none."""
    best = None
    for m in ms:
        n = group_max_nonzeros(weight, m, axis)
        if n is not None and n < m and (best is None or n / m < best[0] / best[1]):
            best = (n, m)
    return best


def retained_fraction(scores: np.ndarray, keep: np.ndarray) -> float:
    total = float(np.sum(scores, dtype=np.float64))
    return float(np.sum(scores[keep], dtype=np.float64) / total) if total > 0 else 1.0


def transposable_keep(scores: np.ndarray, use: Use, n: int, m: int, solver: str) -> np.ndarray | None:
    """Transposable keep-mask on M×M tiles of [outputs, reductions] (per kernel position); None if it does not tile."""
    from .transposable import transposable_mask

    moved = np.moveaxis(scores, (use.out_axis, use.red_axis), (-2, -1))
    rows, cols = moved.shape[-2:]
    if cols % m or rows % m or (rows // use.groups) % m:
        return None
    mats = np.ascontiguousarray(moved, dtype=np.float32).reshape(-1, cols)
    mask = transposable_mask(mats, n, m, solver).reshape(moved.shape)
    return np.moveaxis(mask, (-2, -1), (use.out_axis, use.red_axis))


class NMMask(Pass):
    """Chooses each target's keep-mask from a score (|w| unless a calibration pass gave one) and zeroes the rest."""

    name = "nm-mask"
    requires = ("targets",)
    provides = ("masks",)

    def __init__(self, only=None):
        self.only = only  # a subset of targets (sequential calibration masks wave by wave)

    def run(self, ctx: CompileContext) -> PassResult:
        opts = ctx.options
        pattern = opts.pattern
        masks: dict[str, np.ndarray] = ctx.artifacts.setdefault("masks", {})
        scores_from = ctx.artifacts.get("scores", {})
        targets = [t for t in (self.only if self.only is not None else ctx.artifacts["targets"]) if not t.skip]
        changed = False
        for target in ctx.progress(targets, desc="masks"):
            use = target.primary
            view = WeightView(ctx.model, target.weight, use)
            weight = view.effective()
            scores = scores_from.get(target.name)
            row = ctx.layer(target.name)
            pruned, keep, kept_l1, total_l1 = prune_nm(weight, pattern.n, pattern.m, use.red_axis, opts.sequential, scores)
            if opts.transposable or target.transposable:
                score = np.abs(weight) if scores is None else scores
                t_keep = transposable_keep(score, use, pattern.n, pattern.m, opts.solver)
                if t_keep is None:
                    row["transposable"] = False
                    target.notes.append(f"does not tile into {pattern.m}x{pattern.m} (outputs x inputs): plain N:M instead")
                else:
                    from .transposable import _resolve_solver, tile_optimality_gap

                    row["retained_plain_nm"] = retained_fraction(score, keep)
                    keep = t_keep
                    pruned = np.where(keep, weight, np.float32(0))
                    kept_l1 = float(np.abs(pruned, dtype=np.float64).sum())
                    row["transposable"] = True
                    solver = _resolve_solver(opts.solver, pattern.n, pattern.m, weight.size)
                    row["solver"] = solver
                    if solver == "exact":
                        row["optimality"] = 1.0
                    else:
                        mats = np.moveaxis(score, (use.out_axis, use.red_axis), (-2, -1))
                        mask_m = np.moveaxis(keep, (use.out_axis, use.red_axis), (-2, -1))
                        row["optimality"] = tile_optimality_gap(mats.reshape(-1, mats.shape[-1]), mask_m.reshape(-1, mats.shape[-1]), pattern.n, pattern.m)
            zeros_before = int(weight.size - np.count_nonzero(weight))
            zeros_after = int(pruned.size - np.count_nonzero(pruned))
            if zeros_before * 32 >= weight.size:  # sparse enough to follow some N:M (31:32 at least)
                existing = existing_pattern(weight, use.red_axis)
                if existing is not None:
                    # converting: weights the old pattern kept that the new one drops
                    row["existing_pattern"] = f"{existing[0]}:{existing[1]}"
                    row["violations"] = int(np.count_nonzero((weight != 0) & ~keep))
            if zeros_after != zeros_before:
                changed = True
                if view.index_map() is None and view.dq is None:
                    ctx.model.set_array(target.weight, pruned.reshape(ctx.model.initializer(target.weight).dims))
                else:
                    view.zero(~keep)
            masks[target.name] = keep
            row["retained_l1"] = kept_l1 / total_l1 if total_l1 > 0 else 1.0
            row["_l1"] = (kept_l1, total_l1)
            if scores is not None:
                row["retained_score"] = retained_fraction(scores, keep)
            row["zeros_before"] = zeros_before
            row["zeros_after"] = zeros_after
        return PassResult(changed)
