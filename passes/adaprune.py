"""Calibration passes: activation statistics, calibration-aware mask scores, AdaPrune.

The statistics are Gram matrices H = X Xᵀ of each target layer's input (im2col
patches for Conv) and their means, streamed batch by batch through ONNX Runtime
(see statistics.py). With them the mask is chosen by the damage a weight's
removal does to the layer's output, and the surviving weights are re-fitted by
the exact least-squares solve of the AdaPrune objective, then the bias absorbs
the shift of the output mean.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import onnx

from nmcompile.graph import GraphIndex, attr

from .adaprune_solver import (
    adaprune_rows,
    bias_correction,
    quadratic_trace,
    saliency,
    trace_of_product,
)
from .base import CompileContext, Pass, PassResult
from .statistics import LayerSpec, LayerStats, collect_statistics, require_features, spec_from_node, token_mask
from .targets import Target, Use, WeightView

# The first is the default with calibration data.
MASK_SCORES = ("sparsegpt", "obs", "activation", "magnitude")


# -- the [rows, reduction] view the solver works on ------------------------------------


def row_blocks(eff: np.ndarray, use: Use) -> list[np.ndarray]:
    """The weight as one (O_g, K_g) matrix per conv group: rows are outputs, columns in im2col order."""
    if use.op == "Conv":
        out = eff.shape[0]
        flat = eff.reshape(out, -1)
        per = out // use.groups
        return [flat[g * per : (g + 1) * per] for g in range(use.groups)]
    return [np.moveaxis(eff, use.out_axis, 0).reshape(eff.shape[use.out_axis], -1)]


def from_row_blocks(blocks: list[np.ndarray], use: Use) -> np.ndarray:
    """Inverse of row_blocks: the effective-layout array."""
    shape = use.eff_shape
    if use.op == "Conv":
        return np.concatenate(blocks, axis=0).reshape(shape)
    moved = [shape[use.out_axis]] + [d for i, d in enumerate(shape) if i != use.out_axis]
    return np.moveaxis(blocks[0].reshape(moved), 0, use.out_axis)


def layer_input(use: Use) -> str:
    """The tensor whose vectors the weight multiplies."""
    return use.node.input[1] if (use.op == "MatMul" and use.slot == 0) else use.node.input[0]


def calibratable(target: Target, loaded=None) -> str | None:
    """Why a target cannot be re-fitted from statistics (None: it can). ``loaded``: the
    model, to tell a layer input that is a constant (a product of two weights)."""
    use = target.primary
    if loaded is not None and any(loaded.initializer(layer_input(u)) is not None for u in target.uses):
        return "its layer input is a constant as well (a product of two weights): no data flows through it"
    if target.transposable and len(target.uses) > 1:
        return "shared weight read transposed: no single layer input to fit against"
    if use.op != "Conv" and len(use.eff_shape) != 2:
        return "batched (3-D or more) MatMul weight"
    if use.op == "Gemm" and attr(use.node, "transA", 0):
        return "Gemm with transA"
    if any(u.eff_shape != use.eff_shape or u.op != use.op for u in target.uses[1:]):
        return "shared by layers of different shapes"
    return None


def layer_spec(use: Use, name: str) -> LayerSpec:
    if use.op == "MatMul" and use.slot == 0:  # Y = W X: features on X's second-to-last axis
        return LayerSpec(name, use.node.input[1], "dense", feature_axis=-2)
    return spec_from_node(use.node, use.eff_shape, name=name)


# -- passes ------------------------------------------------------------------------------


class CollectStatistics(Pass):
    """Gram matrices and means of every calibratable target's input, one streamed pass."""

    name = "collect-statistics"
    requires = ("targets", "calib_batches")
    provides = ("stats",)

    def __init__(self, only: list[Target] | None = None, source=None):
        self.only = only
        self.source = source  # (ModelProto, overrides) to run instead of the model as it stands

    def run(self, ctx: CompileContext) -> PassResult:
        targets = self.only if self.only is not None else [t for t in ctx.artifacts["targets"] if not t.skip]
        specs, owners = [], []
        for target in targets:
            reason = calibratable(target, ctx.model)
            if reason:
                ctx.layer(target.name)["calibration"] = f"skipped: {reason}"
                continue
            for i, use in enumerate(target.uses):
                specs.append(layer_spec(use, f"{target.name}#{i}"))
                owners.append((target.name, i))
        loaded = ctx.model
        model, overrides = self.source or (loaded.model, loaded.overrides())
        raw = collect_statistics(
            model,
            specs,
            ctx.artifacts["calib_batches"](),
            progress=bool(getattr(ctx.options, "progress", False)),
            base_dir=str(loaded.base_dir),
            overrides=overrides,
            float32_sums_from=FLOAT32_FROM_K,
        )
        stats: dict[str, list[LayerStats]] = ctx.artifacts.setdefault("stats", {})
        by_name = {t.name: t for t in targets}
        for spec, (name, i) in zip(specs, owners):
            require_features(spec, raw[spec.name].features, gram_shape(by_name[name])[1])
            stats.setdefault(name, [])
            stats[name].append(raw[spec.name])
        return PassResult(False)


class CalibrationScores(Pass):
    """Per-weight saliency from the statistics, in the effective layout, for the mask passes."""

    name = "calibration-scores"
    requires = ("targets", "stats")
    provides = ("scores",)

    def __init__(self, kind: str = "obs", damp: float = 0.01, only: list[Target] | None = None):
        self.kind = kind
        self.damp = damp
        self.only = only

    def run(self, ctx: CompileContext) -> PassResult:
        scores = ctx.artifacts.setdefault("scores", {})
        if self.kind == "magnitude":
            return PassResult(False)
        for target in self.only if self.only is not None else ctx.artifacts["targets"]:
            stats = ctx.artifacts["stats"].get(target.name)
            if target.skip or not stats:
                continue
            use = target.primary
            weight = WeightView(ctx.model, target.weight, use).effective()
            blocks = row_blocks(weight, use)
            gram_of = stats_gram(stats)
            scores[target.name] = from_row_blocks(block_scores(self.kind, blocks, gram_of, target, ctx.options, self.damp), use)
        return PassResult(False)


# A Gram matrix source: gram_of(g, order=None, dtype=float64) -> a new (K, K) array
# of group g, rows and columns permuted by order, that the caller may overwrite.
GramSource = Callable[..., np.ndarray]

# Layers at least this wide get float32 K×K solver matrices (SparseGPT's own
# precision) and sum their Grams in float32: half the memory of the largest
# transient, which for a ResNet-50 3×3×512 conv is 170 MB in float64, and of the
# largest statistics (85 -> 42 MB). A Gram sums a few tens of float32 chunk
# products, each already a float32 GEMM: the sums' relative error stays ~1e-6,
# far below the sampling noise of a few hundred calibration samples.
FLOAT32_FROM_K = 2048


def solver_dtype(k: int) -> type:
    return np.float32 if k >= FLOAT32_FROM_K else np.float64


def target_weights(h: np.ndarray, target: np.ndarray, damp: float, dense: np.ndarray) -> np.ndarray:
    """(O, K) W̃ minimising ‖W̃ X_s − W X_d‖² + λ‖W̃ − W‖², i.e. (H + λI) W̃ᵀ = target + λWᵀ
    (``dense`` = W, (O, K); ``target`` = Σ x_s (W x_d)ᵀ), by a Cholesky factorisation done
    in h's place (float32 for wide layers, like the other solves), single-threaded so
    the rounding does not depend on the core count.

    The damping pulls toward the dense weights, not toward zero: where the data says
    nothing (inputs that never vary, fewer samples than K) W̃ stays W, and with
    X_s = X_d (the first layers) W̃ is W exactly. Inputs that are always zero keep W."""
    import scipy.linalg

    from .adaprune_solver import blas_single_thread, damp_in_place, damping

    lam = damping(h, damp)
    dead = np.diagonal(h) + lam <= 0  # damp_in_place gives these a unit diagonal
    # the right-hand side in h's dtype (float32 for wide layers: the solve's own precision)
    rhs = np.array(target, dtype=h.dtype, copy=True)
    rhs += lam * dense.T
    rhs[dead] = dense.T[dead]
    # only an undamped H can fail to factor (collinear inputs): keep it for least squares
    undamped = h.astype(np.float64) if lam == 0 else None
    with blas_single_thread():
        try:
            # h is C-ordered and symmetric: its transpose is a Fortran-ordered view that
            # LAPACK factors in place (a C-ordered array would be copied first)
            c = scipy.linalg.cho_factor(damp_in_place(h, damp).T, lower=True, overwrite_a=True, check_finite=False)
            return np.ascontiguousarray(scipy.linalg.cho_solve(c, rhs, overwrite_b=True, check_finite=False).T)
        except np.linalg.LinAlgError:
            if undamped is None:
                raise
            undamped[dead, dead] = 1.0  # as damp_in_place: dead inputs keep W through rhs
            return np.linalg.lstsq(undamped, rhs.astype(np.float64), rcond=None)[0].T


def stats_gram(stats: list[LayerStats]) -> GramSource:
    """H of a shared weight is the sum over its uses: the objective adds their output errors."""

    def gram_of(g: int, order: np.ndarray | None = None, dtype=np.float64) -> np.ndarray:
        out = stats[0].gram_group(g, order, dtype)
        for extra in stats[1:]:
            extra.gram_group(g, order, dtype, out=out)
        return out

    return gram_of


def block_scores(kind: str, blocks: list[np.ndarray], gram_of: GramSource, target: Target, opts, damp: float) -> list[np.ndarray]:
    """Per-group score matrices for the mask pass (the joint SparseGPT choice only fits plain N:M)."""
    plain = not (getattr(opts, "sequential", False) or getattr(opts, "transposable", False) or target.transposable)
    if kind == "sparsegpt" and plain:
        n, m = opts.pattern.n, opts.pattern.m
        return [joint_mask_score(w, gram_of, g, target.primary, n, m, damp) for g, w in enumerate(blocks)]
    kind = "obs" if kind == "sparsegpt" else kind
    return [saliency(w, gram_of(g), kind, damp).astype(np.float32) for g, w in enumerate(blocks)]


# The joint choice tries every keep set of a group: C(M, N) small solves per group.
# Up to 70 (4:8) that costs about what the sweep does anyway; 8:16 has 12870 and
# 8:32 10.5 million (hours), so there each weight is scored alone inside the sweep
# (SparseGPT's own choice).
JOINT_MAX_KEEP_SETS = 70


def joint_mask_score(w: np.ndarray, gram_of: GramSource, g: int, use: Use, n: int, m: int, damp: float) -> np.ndarray:
    """Keep-scores (1 kept, 0 pruned) from SparseGPT's sweep choosing each group's N of M jointly.

    The sweep picks, group by group, the keep set whose pruning costs least after
    compensating on the columns still to come: the mask measured to re-fit best
    (0.5-0.9x the error of magnitude masks after the exact re-fit). Conv columns
    are put channel-last first so the groups are consecutive. The Gram matrix is
    built in that order and factored in place: one K×K array per layer.
    """
    from .adaprune_solver import channel_last_order, sparsegpt_mask_and_update

    select = "group" if math.comb(m, n) <= JOINT_MAX_KEEP_SETS else "obs"
    spatial = int(np.prod(use.eff_shape[2:], dtype=np.int64)) if use.op == "Conv" else 1
    # dense layers and 1×1 convs: the groups are already consecutive
    order = None if spatial == 1 else channel_last_order(use.eff_shape[1], use.eff_shape[2:])
    h = gram_of(g, order, solver_dtype(w.shape[1]))
    # the sweep works on its own copy of w (float32 for wide layers)
    mask, _ = sparsegpt_mask_and_update(w if order is None else w[:, order], h, n, m, damp,
                                        select=select, safeguard=False, overwrite_h=True)
    if order is not None:
        keep = np.empty_like(mask)
        keep[:, order] = mask
        mask = keep
    return mask.astype(np.float32)


class AdaPrune(Pass):
    """Re-fit every pruned layer's surviving weights to its dense output, then correct the bias."""

    name = "adaprune"
    requires = ("targets", "masks", "stats")

    def __init__(self, damp: float = 0.01, only: list[Target] | None = None, release_stats: bool = False):
        self.damp = damp
        self.only = only
        # The caller's promise that nothing reads these targets' Grams afterwards:
        # each is dropped once its last group's matrix is built, before the solve.
        self.release_stats = release_stats

    def run(self, ctx: CompileContext) -> PassResult:
        targets = self.only if self.only is not None else ctx.artifacts["targets"]
        dense = ctx.artifacts.get("dense_weights", {})
        changed = False
        todo = [t for t in targets if not t.skip and ctx.artifacts["stats"].get(t.name) and t.name in ctx.artifacts["masks"]]
        for target in ctx.progress(todo, desc="adaprune"):
            start = time.perf_counter()
            use = target.primary
            view = WeightView(ctx.model, target.weight, use)
            original = dense.get(target.name)
            if original is None:
                raise RuntimeError(f"dense weights of {target.name} were not kept for AdaPrune")
            stats = ctx.artifacts["stats"][target.name]
            gram_of = stats_gram(stats)
            keep_blocks = row_blocks(ctx.artifacts["masks"][target.name], use)
            w_blocks = row_blocks(original, use)
            new_blocks, err_masked, err_fit = [], 0.0, 0.0
            energy = 0.0
            for g, (w, keep) in enumerate(zip(w_blocks, keep_blocks)):
                h = gram_of(g, None, solver_dtype(w.shape[1]))
                if self.release_stats and g == len(w_blocks) - 1:
                    for s in stats:  # the means stay for the bias correction
                        s.packed = None
                # float32 in and out, as the weights are stored: the solver keeps its own float64 work
                fitted = adaprune_rows(w, keep, h, damp=self.damp)
                masked = np.where(keep, w, np.float32(0.0))
                # ‖(W − W')X‖² summed over the groups, over Σ‖WX‖²: one output energy per group
                energy += quadratic_trace(w, h)
                err_masked += max(quadratic_trace(w, h, masked), 0.0)
                err_fit += max(quadratic_trace(w, h, fitted), 0.0)
                new_blocks.append(fitted)
                del h
            new = from_row_blocks(new_blocks, use).astype(np.float32)
            view.write(new)
            for i, u in enumerate(target.uses):
                mean = stats[i].mean
                delta = np.concatenate(
                    [bias_correction(w, nb, mean[g]) for g, (w, nb) in enumerate(zip(w_blocks, new_blocks))]
                )
                add_to_bias(ctx, u, delta.astype(np.float64))
            changed = True
            row = ctx.layer(target.name)
            row["reconstruction_error_masked"] = err_masked / energy if energy > 0 else 0.0
            row["reconstruction_error_adaprune"] = err_fit / energy if energy > 0 else 0.0
            note_few_vectors(row, sum(s.count for s in stats), w_blocks[0].shape[1])
            ctx.timings[target.name] = time.perf_counter() - start
        return PassResult(changed)


def note_few_vectors(row: dict, vectors: int, inputs: int) -> None:
    """Record how many input vectors the fit saw; fewer than the layer's inputs leave
    directions the data never shows, where a re-fit can do worse than plain masking
    on new data (measured: 8 samples for 64 inputs, held-out error 0.41 vs 0.36)."""
    row["calibration_vectors"] = int(vectors)
    if vectors < inputs:
        row["calibration_warning"] = (f"{vectors} calibration vectors for {inputs} inputs: "
                                      "the re-fit can overfit (more samples, or --no-adaprune)")


# -- bias correction ---------------------------------------------------------------------


def add_to_bias(ctx: CompileContext, use: Use, delta: np.ndarray) -> None:
    """Add delta (one value per output channel) to the layer's bias, creating one where there is none."""
    if not np.any(delta):
        return
    loaded = ctx.model
    graph = loaded.model.graph
    index = GraphIndex(graph)
    node = use.node
    out_c = delta.shape[0]
    if node.op_type == "Gemm":  # Y = alpha·A·B + beta·C: the weight's share of the output is scaled by alpha
        delta = delta * attr(node, "alpha", 1.0)
    if node.op_type in ("Conv", "Gemm"):
        if len(node.input) > 2 and node.input[2] and node.input[2] in index.initializers and len(index.uses(node.input[2])) == 1:
            bias = np.asarray(loaded.array(node.input[2]))
            scale = attr(node, "beta", 1.0) if node.op_type == "Gemm" else 1.0
            if bias.size in (1, out_c) and bias.ndim <= 2 and scale != 0:
                full = np.broadcast_to(bias.reshape(-1), (out_c,)).astype(np.float64) + delta / scale
                loaded.set_array(node.input[2], full.astype(bias.dtype).reshape((1, out_c) if bias.ndim == 2 else (out_c,)))
                return
        if len(node.input) <= 2 or not node.input[2]:
            name = _fresh(index, f"{node.name}_bias")
            loaded.add_initializer(name, delta.astype(_weight_dtype(loaded, use)))
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = name
            if node.op_type == "Gemm":
                from nmcompile.graph import set_attr

                set_attr(node, "beta", 1.0)
            return
    else:  # MatMul: a following Add of a constant vector is the bias
        consumers = index.uses(node.output[0])
        if len(consumers) == 1 and consumers[0][0].op_type == "Add" and not index.is_graph_output(node.output[0]):
            add = consumers[0][0]
            other = add.input[1 - consumers[0][1]]
            if other in index.initializers and len(index.uses(other)) == 1:
                bias = np.asarray(loaded.array(other))
                along = _bias_shape(use, out_c)  # the output channels' axis: last, or second-to-last for Y = W·X
                if bias.shape[-len(along):] == along and bias.size == out_c:
                    loaded.set_array(other, (bias.astype(np.float64) + delta.reshape(bias.shape)).astype(bias.dtype))
                    return
    # No bias to fold into: a new Add after the node.
    name = _fresh(index, f"{node.name}_bias")
    loaded.add_initializer(name, delta.astype(_weight_dtype(loaded, use)).reshape(_bias_shape(use, out_c)))
    out = node.output[0]
    mid = _fresh(index, f"{out}_pre_bias")
    node.output[0] = mid
    new_node = onnx.helper.make_node("Add", [mid, name], [out], name=_fresh(index, f"{node.name}_bias_add"))
    graph.node.insert(_position(graph, node) + 1, new_node)


def _weight_dtype(loaded, use: Use) -> np.dtype:
    """The float type the layer multiplies in (a new bias must match it: ONNX's Add
    and Conv take one type): what the last Cast or DequantizeLinear on the weight's
    way to the node makes of it, else the stored weight's own type."""
    def float_type(onnx_type: int) -> np.dtype | None:
        try:
            dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))
        except Exception:
            return None
        return dt if np.issubdtype(dt, np.floating) else None

    for n in reversed(use.chain):
        if n.op_type == "Cast":
            dt = float_type(attr(n, "to", 0))
            return dt if dt is not None else np.dtype(np.float32)
        if n.op_type == "DequantizeLinear":
            scale = loaded.initializer(n.input[1]) if len(n.input) > 1 else None
            dt = float_type(scale.data_type) if scale is not None else None
            return dt if dt is not None else np.dtype(np.float32)
    stored = loaded.initializer(use.chain[0].input[0] if use.chain else use.node.input[use.slot])
    dt = float_type(stored.data_type) if stored is not None else None
    return dt if dt is not None else np.dtype(np.float32)


def _bias_shape(use: Use, out_c: int) -> tuple[int, ...]:
    if use.op == "Conv":
        return (out_c,) + (1,) * (len(use.eff_shape) - 2)
    if use.op == "MatMul" and use.slot == 0:  # Y = W·X: outputs run along Y's second-to-last axis
        return (out_c, 1)
    return (out_c,)


def _position(graph: onnx.GraphProto, node: onnx.NodeProto) -> int:
    for i, n in enumerate(graph.node):
        if n.name == node.name and list(n.output) == list(node.output):
            return i
    raise RuntimeError(f"node {node.name} not in graph")


def _fresh(index: GraphIndex, base: str) -> str:
    taken = index.initializers | set(index.producer) | set(index.consumers) | {n.name for n in index.graph.node}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    index.initializers.add(name)
    return name


class KeepDenseWeights(Pass):
    """Keeps each calibratable target's dense effective weight: AdaPrune fits to the dense outputs."""

    name = "keep-dense-weights"
    requires = ("targets",)
    provides = ("dense_weights",)

    def __init__(self, only: list[Target] | None = None):
        self.only = only

    def run(self, ctx: CompileContext) -> PassResult:
        kept = ctx.artifacts.setdefault("dense_weights", {})
        for target in self.only if self.only is not None else ctx.artifacts["targets"]:
            if not target.skip and calibratable(target, ctx.model) is None and target.name not in kept:
                kept[target.name] = WeightView(ctx.model, target.weight, target.primary).effective().copy()
        return PassResult(False)


# -- one-pass calibration within a memory budget -------------------------------------------


def gram_shape(target: Target) -> tuple[int, int]:
    """(groups, features per group) of the target's input statistics."""
    use = target.primary
    if use.op == "Conv":
        return use.groups, int(np.prod(use.eff_shape[1:], dtype=np.int64))
    return 1, use.reduction


def dense_snapshot(loaded):
    """The model as it stands (the dense model), kept for statistics while later passes edit it."""
    model = onnx.ModelProto()
    model.CopyFrom(loaded.model)
    return model, loaded.overrides()


def return_large_blocks_to_os() -> None:
    """Have glibc serve blocks of 4 MiB and more by mmap, always.

    By default glibc raises its mmap threshold to the size of each large block
    freed (up to 32 MiB), so later Gram rows, patches and solver blocks land in
    the heap, where freed memory mostly stays with the process: measured +140 MB
    of RSS left after calibrating ResNet-50. A fixed threshold returns every
    large block on free. Process-wide, and harmless to anything else."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 4 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


def release_free_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps large freed blocks of a chunk's Grams otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def mask_uncalibratable(ctx: CompileContext) -> list[Target]:
    """Masks by magnitude the targets that cannot be fitted from statistics; returns the rest."""
    from .nm_mask import NMMask

    targets = [t for t in ctx.artifacts["targets"] if not t.skip]
    fit = [t for t in targets if calibratable(t, ctx.model) is None]
    for t in targets:
        if t not in fit:
            ctx.layer(t.name)["calibration"] = f"skipped: {calibratable(t, ctx.model)}"
    ctx.artifacts.setdefault("masks", {})
    NMMask(only=[t for t in targets if t not in fit]).run(ctx)
    return fit


PADDING_NOTE = ("calibration statistics count real tokens only: positions where the batch's "
                "attention mask is 0 (padding) are left out of the layers' Grams and means")


def note_padding(ctx: CompileContext) -> None:
    """Say in the report when the statistics leave padded tokens out (the first batch tells)."""
    first = next(iter(ctx.artifacts["calib_batches"]()), None)
    if first is not None and token_mask(first) is not None:
        ctx.notes.append(PADDING_NOTE)


SHRINK_CAP = 1e4  # the damping where the data says nothing: the masked weights, in effect


def layer_damp(stats: list[LayerStats], floor: float) -> tuple[float, float | None]:
    """(damping, shrinkage) for a layer's mask scores and re-fit: at least ``floor``, and
    Ledoit-Wolf's δ/(1−δ) of its input statistics (``LayerStats.shrinkage``), which is
    what shrinking S toward mean(diag S)·I by δ amounts to. On real data δ is ~0.001-0.07
    and the floor rules; where the vectors are too few or carry no structure (isotropic
    noise), δ → 1 and the solves fall back toward the masked weights instead of fitting
    sampling noise (bench_calibrate part 4: a 2:4 layer fitted on 64 isotropic vectors of
    32 inputs, held-out error 0.1882 at damping 0.01, 0.1331 so, 0.1319 by magnitude)."""
    distinct = list({id(s): s for s in stats}.values())
    deltas = [s.shrinkage() for s in distinct]
    if not deltas or any(d is None for d in deltas):
        return floor, None
    total = sum(s.count for s in distinct)
    delta = sum(d * s.count for d, s in zip(deltas, distinct)) / total if total else 1.0
    shrink = SHRINK_CAP if delta >= 1.0 else min(SHRINK_CAP, delta / (1.0 - delta))
    return max(floor, shrink), delta


def note_damping(ctx: CompileContext, t: Target, stats: list[LayerStats], floor: float) -> float:
    """The layer's damping (``layer_damp``), recorded in its report row."""
    damp, delta = layer_damp(stats, floor)
    row = ctx.layer(t.name)
    row["damping"] = damp
    if delta is not None:
        row["shrinkage"] = delta
        if delta >= 0.5:
            t.notes.append(f"its calibration vectors say little about its inputs (shrinkage {delta:.2f}): "
                           "the re-fit stays near the masked weights")
    return damp


def shares_stats(mine: list[LayerStats], others: list[LayerStats]) -> bool:
    """Whether a layer still to come reads one of these statistics objects (Q, K and V
    share one input's): then its packed Gram must not be released."""
    return any(a is b for a in mine for b in others)


def default_stats_budget(loaded) -> int:
    """As many bytes of statistics as the model has weights (64-512 MiB): peak memory
    then scales with the model, at one pass over the data per chunk."""
    from nmcompile.graphio import iter_tensors, tensor_nbytes

    weights = sum(tensor_nbytes(t) if t.name not in loaded.changed else loaded.array(t.name).nbytes for t in iter_tensors(loaded.model))
    return int(min(max(weights, 64 << 20), 512 << 20))


def plan_chunks(ordered: list[Target], budget: int) -> list[list[Target]]:
    """Consecutive runs of ``ordered`` whose statistics fit ``budget`` bytes. Layers
    reading the same input (Q, K and V) share one Gram, counted once per chunk."""
    from .statistics import stats_nbytes

    chunks, current, used, seen = [], [], 0, set()
    for t in ordered:
        keys = {layer_spec(u, t.name).key() for u in t.uses}
        cost = stats_nbytes(*gram_shape(t)) * len(keys - seen)
        if current and cost and used + cost > budget:  # a Gram already in the chunk costs nothing
            chunks.append(current)
            current, used, seen = [], 0, set()
            cost = stats_nbytes(*gram_shape(t)) * len(keys)
        current.append(t)
        used += cost
        seen |= keys
    if current:
        chunks.append(current)
    return chunks


class Calibrate(Pass):
    """Statistics, calibration-aware masks and AdaPrune, in chunks of layers whose Gram
    matrices fit the memory budget; a chunk's Grams are freed once its layers are re-fitted.

    Every chunk's statistics must come from the dense model (one-pass semantics).
    Chunks are taken deepest layers first: a chunk's inputs then depend only on
    layers not yet compressed, so the model as it stands serves, and no dense copy
    of the weights is kept beside the compressed ones. Only when shared weights tie
    layers into a cycle does a dense snapshot stand in."""

    name = "calibrate"
    requires = ("targets", "calib_batches")
    provides = ("masks", "stats", "dense_weights")

    def __init__(self, mask_score: str, refit: bool, damp: float = 0.01, budget_bytes: int | None = None):
        self.mask_score = mask_score
        self.refit = refit
        self.damp = damp
        self.budget_bytes = budget_bytes

    def run(self, ctx: CompileContext) -> PassResult:
        from .nm_mask import NMMask
        return_large_blocks_to_os()
        fit = mask_uncalibratable(ctx)
        ctx.artifacts.setdefault("stats", {})
        ctx.artifacts.setdefault("dense_weights", {})
        note_padding(ctx)
        budget = self.budget_bytes if self.budget_bytes is not None else default_stats_budget(ctx.model)
        upstream = upstream_targets(fit, ctx.model.model.graph)
        ordered = [t for wave in reversed(levels_from(fit, upstream)) for t in wave]
        chunks = plan_chunks(ordered, budget)
        # a chunk may not read through a layer an earlier chunk compressed
        done: set[str] = set()
        reads_compressed = False
        for chunk in chunks:
            reads_compressed |= any(upstream[t.name] & done for t in chunk)
            done |= {t.name for t in chunk}
        source = dense_snapshot(ctx.model) if reads_compressed else None
        for chunk in ctx.progress(chunks, desc="calibration chunks"):
            CollectStatistics(only=chunk, source=source).run(ctx)
            # layer by layer, each layer's statistics freed as soon as it is done, the
            # widest last: its K×K solver arrays then meet few other Grams
            for t in ctx.progress(sorted(chunk, key=lambda t: gram_shape(t)[1]), desc="calibrating layers"):
                damp = note_damping(ctx, t, ctx.artifacts["stats"].get(t.name, []), self.damp)
                CalibrationScores(self.mask_score, damp, only=[t]).run(ctx)
                KeepDenseWeights(only=[t]).run(ctx)
                NMMask(only=[t]).run(ctx)
                ctx.artifacts.get("scores", {}).pop(t.name, None)  # the mask is chosen: free them before the re-fit
                if self.refit:
                    others = [s for other, theirs in ctx.artifacts["stats"].items() if other != t.name for s in theirs]
                    shared = shares_stats(ctx.artifacts["stats"].get(t.name, []), others)
                    AdaPrune(damp, only=[t], release_stats=not shared).run(ctx)
                ctx.artifacts["stats"].pop(t.name, None)
                ctx.artifacts["dense_weights"].pop(t.name, None)
                release_free_memory()
        if chunks:
            ctx.notes.append(f"calibration in {len(chunks)} chunk(s) of layers within a {budget / 2**20:g} MiB statistics budget")
        return PassResult(True)


# -- sequential calibration ----------------------------------------------------------------


def upstream_targets(targets: list[Target], graph: onnx.GraphProto) -> dict[str, set[str]]:
    """For each target, the other targets its layer inputs are computed through."""
    index = GraphIndex(graph)
    node_target = {id(u.node): t.name for t in targets for u in t.uses}

    def ancestors(tensor: str) -> set[str]:
        stack, found, visited = [tensor], set(), set()
        while stack:
            name = stack.pop()
            if name in visited:
                continue
            visited.add(name)
            node = index.producer.get(name)
            if node is None:
                continue
            owner = node_target.get(id(node))
            if owner is not None:
                found.add(owner)
            stack.extend(i for i in node.input if i)
        return found

    upstream: dict[str, set[str]] = {}
    for t in targets:
        upstream[t.name] = set()
        for u in t.uses:
            upstream[t.name] |= ancestors(layer_input(u)) - {t.name}
    return upstream


def levels_from(targets: list[Target], upstream: dict[str, set[str]]) -> list[list[Target]]:
    """Targets in waves: each wave's inputs depend only on targets of earlier waves."""
    remaining = list(targets)
    levels = []
    while remaining:
        names = {t.name for t in remaining}
        wave = [t for t in remaining if not (upstream[t.name] & names)]
        if not wave:  # a cycle through shared weights: take the rest together
            wave = remaining
        levels.append(wave)
        taken = {t.name for t in wave}
        remaining = [t for t in remaining if t.name not in taken]
    return levels


def dependency_levels(targets: list[Target], graph: onnx.GraphProto) -> list[list[Target]]:
    return levels_from(targets, upstream_targets(targets, graph))


class SequentialCalibration(Pass):
    """Layer wave by wave: statistics from the model whose earlier layers are already
    compressed, fitted to the dense model's outputs (W' x_s ≈ W x_d), so errors do not pile up."""

    name = "sequential-calibration"
    requires = ("targets", "calib_batches")
    provides = ("masks",)

    def __init__(self, mask_score: str, refit: bool, damp: float = 0.01):
        self.mask_score = mask_score
        self.refit = refit
        self.damp = damp

    def run(self, ctx: CompileContext) -> PassResult:
        from .nm_mask import NMMask
        from .statistics import collect_cross_statistics

        return_large_blocks_to_os()
        loaded = ctx.model
        dense = dense_snapshot(loaded)
        fit = mask_uncalibratable(ctx)
        note_padding(ctx)
        levels = dependency_levels(fit, loaded.model.graph)
        dense_weights = ctx.artifacts.setdefault("dense_weights", {})
        for wave in ctx.progress(levels, desc="layer waves"):
            # the wave's dense weights only: the snapshot keeps the rest for the dense runs
            KeepDenseWeights(only=wave).run(ctx)
            specs, weights = [], {}
            for t in wave:
                dense_blocks = row_blocks(ctx.artifacts["dense_weights"][t.name], t.primary)
                for i, u in enumerate(t.uses):
                    specs.append(layer_spec(u, f"{t.name}#{i}"))
                    weights[specs[-1].name] = dense_blocks
            stats = collect_cross_statistics(dense, (loaded.model, loaded.overrides()), specs, weights,
                                             ctx.artifacts["calib_batches"](), base_dir=str(loaded.base_dir),
                                             float32_sums_from=FLOAT32_FROM_K)
            scores = ctx.artifacts.setdefault("scores", {})
            targets_w = {}
            for t in wave:
                use = t.primary
                per_use = [stats.pop(f"{t.name}#{i}") for i in range(len(t.uses))]
                gram_of = stats_gram([c.stats for c in per_use])
                damp = note_damping(ctx, t, [c.stats for c in per_use], self.damp)
                # W̃ solving Hd W̃ᵀ = Σ x_s (W x_d)ᵀ + λWᵀ: fitting W̃ on x_s reproduces W on x_d
                dense_blocks = weights[f"{t.name}#0"]
                wt = [target_weights(gram_of(g, None, solver_dtype(c.shape[0])),
                                     c if len(per_use) == 1 else sum(p.target[g] for p in per_use), damp, dense_blocks[g])
                      for g, c in enumerate(per_use[0].target)]
                targets_w[t.name] = (wt, per_use, damp)
                if self.mask_score != "magnitude":
                    scores[t.name] = from_row_blocks(block_scores(self.mask_score, wt, gram_of, t, ctx.options, damp), use)
            NMMask(only=wave).run(ctx)
            for t in wave:
                wt, per_use, damp = targets_w.pop(t.name)
                if self.refit:
                    shared = shares_stats([c.stats for c in per_use], [o.stats for _, rest, _ in targets_w.values() for o in rest])
                    self._refit(ctx, t, wt, per_use, damp, release_stats=not shared)
                scores.pop(t.name, None)
                dense_weights.pop(t.name, None)
            release_free_memory()
        return PassResult(True)

    def _refit(self, ctx: CompileContext, t: Target, wt: list[np.ndarray], per_use: list, damp: float,
               release_stats: bool) -> None:
        start = time.perf_counter()
        use = t.primary
        gram_of = stats_gram([c.stats for c in per_use])
        dense_blocks = row_blocks(ctx.artifacts["dense_weights"][t.name], use)
        keep_blocks = row_blocks(ctx.artifacts["masks"][t.name], use)
        new_blocks = []
        err_m = err_f = energy = 0.0
        for g, (w, k) in enumerate(zip(wt, keep_blocks)):
            h = gram_of(g, None, solver_dtype(w.shape[1]))
            if release_stats and g == len(wt) - 1:
                for c in per_use:  # the means stay for the bias correction
                    c.stats.packed = None
            new = adaprune_rows(w, k, h, damp=damp)
            # ‖W x_d − W' x_s‖² = Σ‖W x_d‖² − 2 tr(W' Σ x_s (W x_d)ᵀ) + tr(W' H_s W'ᵀ)
            base = sum(float(c.energy[g]) for c in per_use)
            target = per_use[0].target[g] if len(per_use) == 1 else sum(c.target[g] for c in per_use)
            masked = np.where(k, dense_blocks[g], np.float32(0.0))
            err_m += base - 2 * trace_of_product(masked, target) + quadratic_trace(masked, h)
            err_f += base - 2 * trace_of_product(new, target) + quadratic_trace(new, h)
            energy += base
            new_blocks.append(new)
            del h
        WeightView(ctx.model, t.weight, use).write(from_row_blocks(new_blocks, use).astype(np.float32))
        for c, u in zip(per_use, t.uses):
            # W x̄_d − W' x̄_s, as sums of products (no BLAS threads: rounding independent of the core count)
            delta = np.concatenate([np.einsum("ij,j->i", w.astype(np.float64), c.mean_dense[g])
                                    - np.einsum("ij,j->i", nb.astype(np.float64), c.stats.mean[g])
                                    for g, (w, nb) in enumerate(zip(dense_blocks, new_blocks))])
            add_to_bias(ctx, u, delta)
        row = ctx.layer(t.name)
        row["reconstruction_error_masked"] = max(err_m, 0.0) / energy if energy > 0 else 0.0
        row["reconstruction_error_adaprune"] = max(err_f, 0.0) / energy if energy > 0 else 0.0
        note_few_vectors(row, sum(c.stats.count for c in per_use), dense_blocks[0].shape[1])
        ctx.timings[t.name] = time.perf_counter() - start
