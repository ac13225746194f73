"""The nm-mask pass: which weights survive, N of every M along the reduction axis.

The per-group choice is plain numpy over blocks of groups, in the weight's own
layout: a weight's rank in its group is the count of members that beat it, built
from the M(M-1)/2 pairwise comparisons, each one vectorised over a block. For
the usual M (4, 8) that is as fast as the JIT kernel it replaced (measured
within 1.0-2x per layer, and `benchmarks/bench_masks.py` prints it next to a
numpy argsort), and it keeps numba (~110 MB of resident memory once a kernel is
loaded: more than ResNet-50's weights) out of every compile that does not ask
for transposable masks or channel permutations.
"""

from __future__ import annotations

import numpy as np

from .base import CompileContext, Pass, PassResult
from .targets import Use, WeightView

# Elements per block of groups: bounds the rank counters and comparisons (a few MB)
# while keeping each numpy call long enough to run at memory speed.
_BLOCK_ELEMENTS = 1 << 20


def _keep_top_n(scores: np.ndarray, n: int, out: np.ndarray) -> None:
    """out[r, i, b] = scores[r, i, b] is among the n largest of its group scores[r, :, b].

    Ties go to the lower index, so every group keeps exactly n: for i < j, j beats
    i only when strictly larger. Pairwise counting up to M = 8; a stable sort
    (the same order) beyond, where M(M-1)/2 comparisons cost more."""
    rows, m, inner = scores.shape
    if m > 8:
        order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        out.fill(False)
        np.put_along_axis(out, order, True, axis=1)
        return
    rank = np.zeros(scores.shape, np.uint8)
    beats = np.empty((rows, inner), np.bool_)
    count = beats.view(np.uint8)
    for i in range(m):
        for j in range(i + 1, m):
            np.greater(scores[:, j], scores[:, i], out=beats)  # j beats i
            np.add(rank[:, i], count, out=rank[:, i])
            np.bitwise_xor(count, 1, out=count)  # otherwise i beats j
            np.add(rank[:, j], count, out=rank[:, j])
    np.less(rank, n, out=out)


def _keep_sequential(scores: np.ndarray, n: int, out: np.ndarray) -> None:
    """Drop the window of m-n consecutive members with the least total score (the first such window on ties)."""
    rows, m, inner = scores.shape
    width = m - n
    sums = np.zeros((n + 1, rows, inner))
    for start in range(n + 1):
        for t in range(start, start + width):  # summed in order, in float64
            sums[start] += scores[:, t]
    first = np.argmin(sums, axis=0)
    for i in range(m):
        # member i is dropped when first <= i < first + width
        np.logical_or(first > i, first + width <= i, out=out[:, i])


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
    # groups of m along `axis` with stride `inner`, stacked: [outer * K/m, m, inner] views
    outer, k, inner = _as_3d(weight, axis).shape
    as_groups = (outer * (k // m), m, inner)
    w3, keep3, pruned3 = (a.reshape(as_groups) for a in (weight, keep, pruned))
    s3 = None if scores is None else np.ascontiguousarray(scores, dtype=np.float32).reshape(as_groups)
    choose = _keep_sequential if sequential else _keep_top_n
    step = max(1, _BLOCK_ELEMENTS // (m * inner))
    kept = total = 0.0
    for r0 in range(0, as_groups[0], step):
        block = slice(r0, r0 + step)
        magnitude = np.abs(w3[block])
        block_total = float(magnitude.sum(dtype=np.float64))
        score = magnitude if s3 is None else s3[block]
        if (s3 is not None or not np.isfinite(block_total)) and np.isnan(score).any():
            # NaN compares false both ways, which breaks the ranking (a group could keep
            # more than n): a NaN score ranks below every number
            score = np.where(np.isnan(score), -np.inf, score).astype(np.float32)
        choose(score, n, keep3[block])
        out = pruned3[block]
        if np.isfinite(block_total):
            np.multiply(w3[block], keep3[block], out=out)
            out += np.float32(0.0)  # -0.0 + 0.0 = +0.0: every dropped weight is a plain zero
            np.multiply(magnitude, keep3[block], out=magnitude)
        else:  # inf or NaN weights: inf * 0 would be NaN, so select instead
            np.copyto(out, np.where(keep3[block], w3[block], np.float32(0.0)))
            magnitude = np.where(keep3[block], magnitude, np.float32(0.0))
        total += block_total
        kept += float(magnitude.sum(dtype=np.float64))
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


class RecordExistingPatterns(Pass):
    """With --pattern none, the pattern each layer's weights already follow (a model
    pruned earlier, say by a first nmcompile run): the report and TensorRT's
    sparse-kernel setting go by what the weights are, not by what was asked."""

    name = "existing-patterns"
    requires = ("targets",)
    provides = ()

    def run(self, ctx: CompileContext) -> PassResult:
        for target in ctx.artifacts["targets"]:
            if target.skip:
                continue
            use = target.primary
            weight = WeightView(ctx.model, target.weight, use).effective()
            if not np.count_nonzero(weight):
                continue
            existing = existing_pattern(weight, use.red_axis)
            if existing is not None:
                ctx.layer(target.name)["existing_pattern"] = f"{existing[0]}:{existing[1]}"
            n4 = group_max_nonzeros(weight, 4, use.red_axis)
            if n4 is not None and n4 < 4:  # TensorRT's rule is stated in fours
                ctx.artifacts.setdefault("existing_n4", {})[target.name] = n4
        return PassResult(False)
