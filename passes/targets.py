"""Finding the weights to prune, and the axis their N:M groups run along.

A target is one initializer, pruned once however many nodes use it. Each use
records the chain of layout ops (Transpose, Reshape, ...) and value ops (Cast,
DequantizeLinear) between the initializer and the MatMul/Gemm/Conv that
multiplies by it. Layout ops are replayed on an index array, so a mask chosen
on the weight as the product executes it maps back onto the stored tensor
exactly, whatever the chain did to its layout.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx

from nmcompile.graph import GraphIndex, attr
from nmcompile.graphio import iter_graphs

from .base import CompileContext, Pass, PassResult

LAYOUT_OPS = {"Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"}
VALUE_OPS = {"Cast", "DequantizeLinear"}
TARGET_OPS = ("MatMul", "Gemm", "Conv")
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


@dataclass
class Use:
    """One node multiplying by the weight, and how the stored tensor reaches it."""

    node: onnx.NodeProto
    chain: list[onnx.NodeProto]
    eff_shape: tuple[int, ...]
    red_axis: int  # reduction (input-channel) axis of the effective weight
    out_axis: int  # output-channel axis of the effective weight
    groups: int = 1
    slot: int = 1  # which node input carries the weight (MatMul may have it on the left)

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def reduction(self) -> int:
        return self.eff_shape[self.red_axis]


@dataclass
class Target:
    name: str  # the first using node's name: how reports and --exclude refer to it
    weight: str  # initializer name
    uses: list[Use]
    skip: str | None = None
    notes: list[str] = field(default_factory=list)
    transposable: bool = False  # forced: a use multiplies by the weight's transpose

    @property
    def primary(self) -> Use:
        return self.uses[0]

    @property
    def op(self) -> str:
        ops = sorted({u.op for u in self.uses})
        return "+".join(ops)


class WeightView:
    """The weight as the product sees it, and the way back to the stored initializer."""

    def __init__(self, loaded, weight: str, use: Use):
        self.loaded = loaded
        self.weight = weight
        self.use = use
        self._index: np.ndarray | None = None
        self._index_done = False

    @property
    def dq(self) -> onnx.NodeProto | None:
        chain = self.use.chain
        return chain[0] if chain and chain[0].op_type == "DequantizeLinear" else None

    def index_map(self) -> np.ndarray | None:
        """Flat positions in the stored tensor of each effective element (None: same layout)."""
        if not self._index_done:
            layout = [n for n in self.use.chain if n.op_type in LAYOUT_OPS and n.op_type != "Identity"]
            if layout:
                stored = self.loaded.initializer(self.weight)
                size = int(np.prod(stored.dims, dtype=np.int64))
                dtype = np.int32 if size < 2**31 else np.int64
                idx = np.arange(size, dtype=dtype).reshape(tuple(stored.dims))
                for node in layout:
                    idx = apply_layout(node, idx, self.loaded)
                self._index = np.ascontiguousarray(idx)
            self._index_done = True
        return self._index

    def decoded(self) -> np.ndarray:
        """The stored tensor after value ops (dequantized, cast), still in stored layout."""
        raw = self.loaded.array(self.weight)
        dq = self.dq
        if dq is None:
            return np.asarray(raw, dtype=np.float32)
        scale, zp = dq_params(dq, self.loaded, raw.shape)
        return ((np.asarray(raw, dtype=np.float32) - zp) * scale).astype(np.float32)

    def effective(self) -> np.ndarray:
        dec = self.decoded()
        idx = self.index_map()
        if idx is None:
            return dec.reshape(self.use.eff_shape)
        return dec.reshape(-1)[idx]

    def stored_positions(self, eff_bool: np.ndarray) -> np.ndarray:
        """Flat stored positions where the effective boolean array is True."""
        idx = self.index_map()
        if idx is None:
            return np.flatnonzero(eff_bool)
        return idx[eff_bool]

    def zero(self, eff_pruned: np.ndarray) -> None:
        """Set the pruned weights to exactly zero in the stored tensor."""
        stored = np.array(self.loaded.array(self.weight))  # writable copy
        flat = stored.reshape(-1)
        pos = self.stored_positions(eff_pruned)
        dq = self.dq
        if dq is None:
            flat[pos] = 0
        else:
            _, zp = dq_params(dq, self.loaded, stored.shape)
            flat[pos] = np.broadcast_to(zp, stored.shape).reshape(-1)[pos].astype(stored.dtype)
        self.loaded.set_array(self.weight, stored)

    def write(self, eff_values: np.ndarray) -> None:
        """Store new effective values (re-fitted weights), re-quantizing behind a DequantizeLinear."""
        stored = self.loaded.array(self.weight)  # shape and dtype only: it may be a read-only map of the file
        dec = np.array(self.decoded(), dtype=np.float32).reshape(-1)  # a writable copy, for the same reason
        idx = self.index_map()
        if idx is None:
            dec[:] = eff_values.reshape(-1)
        else:
            dec[idx.reshape(-1)] = eff_values.reshape(-1)
        dec = dec.reshape(stored.shape)
        dq = self.dq
        if dq is None:
            new = dec.astype(stored.dtype)
        else:
            scale, zp = dq_params(dq, self.loaded, stored.shape)
            info = np.iinfo(stored.dtype)
            new = np.clip(np.rint(dec / scale) + zp, info.min, info.max).astype(stored.dtype)
        self.loaded.set_array(self.weight, new)


def dq_params(node: onnx.NodeProto, loaded, shape: tuple[int, ...]):
    scale = np.asarray(loaded.array(node.input[1]), dtype=np.float32)
    zp = np.asarray(loaded.array(node.input[2]), dtype=np.float32) if len(node.input) > 2 and node.input[2] else np.zeros((), np.float32)
    if scale.ndim == 1 and len(shape) > 0:
        axis = attr(node, "axis", 1)
        axis = axis + len(shape) if axis < 0 else axis
        bshape = [1] * len(shape)
        bshape[axis] = scale.shape[0]
        scale = scale.reshape(bshape)
        zp = zp.reshape(bshape) if zp.ndim == 1 else zp
    return scale, zp


def apply_layout(node: onnx.NodeProto, x: np.ndarray, loaded) -> np.ndarray:
    """Replay one layout op with numpy (on values or on an index array)."""
    op = node.op_type
    if op == "Transpose":
        perm = attr(node, "perm")
        return np.transpose(x, perm if perm is not None else None)
    if op == "Reshape":
        shape = [int(s) for s in np.asarray(loaded.array(node.input[1])).reshape(-1)]
        if not attr(node, "allowzero", 0):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    if op == "Flatten":
        axis = attr(node, "axis", 1)
        axis = axis + x.ndim if axis < 0 else axis
        lead = int(np.prod(x.shape[:axis], dtype=np.int64))
        return x.reshape(lead, -1)
    if op in ("Squeeze", "Unsqueeze"):
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = [int(a) for a in np.asarray(loaded.array(node.input[1])).reshape(-1)]
        if op == "Squeeze":
            if axes is None:
                return x.reshape([d for d in x.shape if d != 1])
            return np.squeeze(x, axis=tuple(a + x.ndim if a < 0 else a for a in axes))
        out_rank = x.ndim + len(axes)
        return np.expand_dims(x, axis=tuple(sorted(a + out_rank if a < 0 else a for a in axes)))
    if op == "Identity":
        return x
    raise ValueError(f"not a layout op: {op}")


def trace_weight(name: str, index: GraphIndex, loaded) -> tuple[str, list[onnx.NodeProto]] | None:
    """Walk back from a node input to the initializer behind it, through see-through ops."""
    chain: list[onnx.NodeProto] = []
    while name not in index.initializers:
        node = index.producer.get(name)
        if node is None or node.op_type not in LAYOUT_OPS | VALUE_OPS or node.domain not in ("", "ai.onnx"):
            return None
        if any(extra and extra not in index.initializers for extra in node.input[1:]):
            return None
        chain.append(node)
        name = node.input[0]
    chain.reverse()
    return name, chain


def chain_problem(chain: list[onnx.NodeProto], stored: onnx.TensorProto) -> str | None:
    for i, node in enumerate(chain):
        if node.op_type == "DequantizeLinear":
            if i != 0:
                return "DequantizeLinear that does not read the initializer directly"
            if attr(node, "block_size", 0):
                return "blocked DequantizeLinear"
        if node.op_type == "Cast" and attr(node, "to") not in FLOAT_TYPES:
            return "weight cast to a non-float type"
    if (not chain or chain[0].op_type != "DequantizeLinear") and stored.data_type not in FLOAT_TYPES:
        return f"weight is {onnx.TensorProto.DataType.Name(stored.data_type)}, not floating point"
    return None


def effective_shape(loaded, stored: onnx.TensorProto, chain: list[onnx.NodeProto]) -> tuple[int, ...]:
    probe = np.empty(tuple(stored.dims), dtype=np.bool_)
    for node in chain:
        if node.op_type in LAYOUT_OPS:
            probe = apply_layout(node, probe, loaded)
    return tuple(probe.shape)


def find_targets(loaded, pattern_m: int | None = None, exclude: tuple[str, ...] = ()) -> list[Target]:
    """Every MatMul, Gemm and Conv with a constant weight, grouped by the initializer they use."""
    graph = loaded.model.graph
    index = GraphIndex(graph)
    by_weight: dict[str, Target] = {}
    order: list[str] = []
    for node in graph.node:
        if node.op_type not in TARGET_OPS or node.domain not in ("", "ai.onnx"):
            continue
        found = _weight_use(node, index, loaded)
        if found is None:
            continue
        weight, use, problem = found
        if weight not in by_weight:
            by_weight[weight] = Target(name=node.name, weight=weight, uses=[])
            order.append(weight)
        target = by_weight[weight]
        target.uses.append(use)
        if problem and not target.skip:
            target.skip = problem
    targets = [by_weight[w] for w in order]
    for target in targets:
        _decide_skip(target, index, pattern_m, exclude)
    return targets


def _weight_use(node: onnx.NodeProto, index: GraphIndex, loaded):
    """(initializer, Use, skip reason or None) for a node whose weight is constant, else None."""
    op = node.op_type
    inputs = list(node.input)
    if op == "MatMul":
        b = trace_weight(inputs[1], index, loaded)
        a = None if b is not None else trace_weight(inputs[0], index, loaded)
        if b is not None:
            weight, chain = b
            slot = 1
        elif a is not None:
            weight, chain = a
            slot = 0
        else:
            return None
    elif op == "Gemm":
        if len(inputs) < 2:
            return None
        b = trace_weight(inputs[1], index, loaded)
        if b is None:
            return None
        weight, chain = b
        slot = 1
    else:  # Conv
        w = trace_weight(inputs[1], index, loaded) if len(inputs) > 1 else None
        if w is None:
            return None
        weight, chain = w
        slot = 1
    stored = loaded.initializer(weight)
    problem = chain_problem(chain, stored)
    try:
        shape = effective_shape(loaded, stored, chain)
    except Exception:  # a chain we cannot replay: leave the weight alone
        return None
    groups = 1
    if op == "MatMul":
        if len(shape) < 2:
            return None
        red, out = (len(shape) - 2, len(shape) - 1) if slot == 1 else (len(shape) - 1, len(shape) - 2)
    elif op == "Gemm":
        if len(shape) != 2:
            return None
        trans_b = attr(node, "transB", 0)
        red, out = (1, 0) if trans_b else (0, 1)
    else:
        if len(shape) < 3:
            return None
        red, out = 1, 0
        groups = attr(node, "group", 1)
    use = Use(node=node, chain=chain, eff_shape=shape, red_axis=red, out_axis=out, groups=groups, slot=slot)
    return weight, use, problem


def group_keys(view: WeightView, m: int) -> tuple[np.ndarray, np.ndarray]:
    """For each stored element: the id of its N:M group and its position within it."""
    use = view.use
    shape = use.eff_shape
    moved = list(shape)
    red = moved.pop(use.red_axis)
    moved.append(red)
    ngroups = int(np.prod(moved, dtype=np.int64)) // m
    gid = np.repeat(np.arange(ngroups, dtype=np.int64), m).reshape(moved)
    pos = np.tile(np.arange(m, dtype=np.int64), ngroups).reshape(moved)
    gid = np.moveaxis(gid, -1, use.red_axis)
    pos = np.moveaxis(pos, -1, use.red_axis)
    idx = view.index_map()
    if idx is None:
        return gid.reshape(-1), pos.reshape(-1)
    g = np.empty(gid.size, np.int64)
    p = np.empty(pos.size, np.int64)
    g[idx.reshape(-1)] = gid.reshape(-1)
    p[idx.reshape(-1)] = pos.reshape(-1)
    return g, p


def uses_agree(loaded, target: Target, m: int) -> bool:
    """True when every use of a shared weight puts the same weights in the same N:M groups."""
    first = target.uses[0]
    rest = target.uses[1:]
    if all(_same_geometry(first, u) for u in rest):
        return True
    g0, p0 = group_keys(WeightView(loaded, target.weight, first), m)
    for use in rest:
        g1, p1 = group_keys(WeightView(loaded, target.weight, use), m)
        if not np.array_equal(p0, p1):
            return False
        pairs = np.unique(g0 * (g1.max() + 1) + g1).size
        if pairs != np.unique(g0).size or pairs != np.unique(g1).size:
            return False
    return True


def stored_axis(view: WeightView, eff_axis: int) -> int | None:
    """The stored tensor's axis that an effective axis walks along (None if it mixes axes)."""
    idx = view.index_map()
    if idx is None:
        return eff_axis
    if idx.shape[eff_axis] < 2:
        return None
    delta = np.unique(np.take(idx, 1, axis=eff_axis).astype(np.int64) - np.take(idx, 0, axis=eff_axis))
    dims = [int(d) for d in view.loaded.initializer(view.weight).dims]
    for axis in range(len(dims)):
        stride = int(np.prod(dims[axis + 1 :], dtype=np.int64))
        if delta.size == 1 and delta[0] == stride and dims[axis] == idx.shape[eff_axis]:
            return axis
    return None


def transposed_pair(loaded, target: Target) -> bool:
    """True when a 2-D weight is reduced along one axis by some uses and along the other by the rest."""
    if any(len(u.eff_shape) != 2 for u in target.uses):
        return False
    axes = {stored_axis(WeightView(loaded, target.weight, u), u.red_axis) for u in target.uses}
    return axes == {0, 1}


def _same_geometry(a: Use, b: Use) -> bool:
    return (
        a.red_axis == b.red_axis
        and a.eff_shape == b.eff_shape
        and [(n.op_type, list(n.input[1:]), [x.SerializeToString() for x in n.attribute]) for n in a.chain if n.op_type in LAYOUT_OPS]
        == [(n.op_type, list(n.input[1:]), [x.SerializeToString() for x in n.attribute]) for n in b.chain if n.op_type in LAYOUT_OPS]
    )


def _graph_outputs_of(weight: str, index: GraphIndex) -> list[str]:
    """Graph outputs that are the weight, or the weight through layout and value ops."""
    outputs = {o.name for o in index.graph.output}
    found, stack, seen = [], [weight], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in outputs:
            found.append(name)
        stack.extend(o for n, _ in index.uses(name) if n.op_type in LAYOUT_OPS | VALUE_OPS for o in n.output if o)
    return sorted(found)


def _decide_skip(target: Target, index: GraphIndex, m: int | None, exclude: tuple[str, ...]) -> None:
    if target.skip:
        return
    names = [u.node.name for u in target.uses] + [target.weight]
    for pat in exclude:
        if any(fnmatch.fnmatchcase(n, pat) for n in names):
            target.skip = f"excluded by --exclude {pat!r}"
            return
    use = target.primary
    if use.op == "Conv" and use.groups > 1 and use.reduction == 1:
        target.skip = "depthwise conv: one input channel per group, nothing to group"
        return
    if m is not None and use.reduction % m:
        target.skip = f"reduction length {use.reduction} is not a multiple of M={m}"
        return
    reds = {u.reduction for u in target.uses}
    if len(reds) > 1:
        target.skip = f"shared by uses with different reduction lengths {sorted(reds)}"
        return
    outputs = _graph_outputs_of(target.weight, index)
    if outputs:
        target.notes.append(f"also a graph output ({', '.join(outputs)}): pruned there too")
    others = sorted({n.op_type for n, _ in index.uses(target.weight)} - set(TARGET_OPS) - LAYOUT_OPS - VALUE_OPS)
    if others:
        target.notes.append(f"also read by {', '.join(others)}: pruned there too")


class FindTargets(Pass):
    """Collects the prunable weights into ctx.artifacts['targets']."""

    name = "find-targets"
    provides = ("targets",)

    def run(self, ctx: CompileContext) -> PassResult:
        opts = ctx.options
        m = opts.pattern.m if opts.pattern is not None else None
        targets = find_targets(ctx.model, m, tuple(opts.exclude))
        if m is not None:
            for t in targets:
                if not t.skip and len(t.uses) > 1 and not uses_agree(ctx.model, t, m):
                    names = ", ".join(u.node.name for u in t.uses)
                    dims = t.primary.eff_shape
                    if transposed_pair(ctx.model, t) and opts.sequential:
                        t.skip = f"shared by uses that read it transposed ({names}): no sequential mask holds both ways"
                    elif transposed_pair(ctx.model, t) and all(d % m == 0 for d in dims):
                        t.transposable = True
                        t.notes.append(f"shared by uses that read it transposed ({names}): transposable mask, N:M both ways")
                    else:
                        t.skip = f"shared weight whose uses group it along different axes ({names})"
        ctx.artifacts["targets"] = targets
        notes = []
        inner = [n for g in list(iter_graphs(ctx.model.model.graph))[1:] for n in g.node if n.op_type in TARGET_OPS]
        if inner:
            names = ", ".join(n.name or n.op_type for n in inner[:3]) + (", ..." if len(inner) > 3 else "")
            notes.append(f"{len(inner)} MatMul/Gemm/Conv node(s) inside If/Loop/Scan subgraphs left as they are "
                         f"({names}): nmcompile compiles the main graph's layers")
        return PassResult(False, notes)
