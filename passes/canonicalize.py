"""Rewrites that put a graph into the form the pruning passes expect.

Folding BatchNormalization matters for correctness, not only speed: the
weights a Conv really multiplies by are W·γ/σ, and pruning W by its own
magnitudes would prune the wrong ones.
"""

from __future__ import annotations

import numpy as np
import onnx

from nmcompile.graph import GraphIndex, attr, set_attr

from .base import CompileContext, Pass, PassResult


class NameNodes(Pass):
    """Every node gets a unique name: reports, --exclude and masks refer to layers by it."""

    name = "name-nodes"

    def run(self, ctx: CompileContext) -> PassResult:
        graph = ctx.model.model.graph
        seen: set[str] = set()
        renamed = 0
        for i, node in enumerate(graph.node):
            name = node.name
            if not name or name in seen:
                base = node.name or f"{node.op_type}_{i}"
                name, k = base, 1
                while name in seen:
                    name, k = f"{base}_{k}", k + 1
                node.name = name
                renamed += 1
            seen.add(name)
        return PassResult(renamed > 0)


class ConstantsToInitializers(Pass):
    """Constant nodes holding a tensor become initializers, so weights are found one way."""

    name = "constants-to-initializers"

    def run(self, ctx: CompileContext) -> PassResult:
        graph = ctx.model.model.graph
        keep, moved = [], 0
        existing = {t.name for t in graph.initializer}
        outputs = {o.name for o in graph.output}
        for node in graph.node:
            value = attr(node, "value") if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
            if isinstance(value, onnx.TensorProto) and node.output[0] not in existing and node.output[0] not in outputs:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(value)
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                moved += 1
            else:
                keep.append(node)
        if moved:
            del graph.node[:]
            graph.node.extend(keep)
            ctx.model.refresh_index()
        return PassResult(moved > 0)


class FoldBatchNorm(Pass):
    """Conv/Gemm followed by inference BatchNormalization: scale the weight, shift the bias, drop the BN."""

    name = "fold-batchnorm"

    def run(self, ctx: CompileContext) -> PassResult:
        loaded = ctx.model
        graph = loaded.model.graph
        index = GraphIndex(graph)
        removed: set[int] = set()
        folded = []
        for bn in list(graph.node):
            if bn.op_type != "BatchNormalization" or attr(bn, "training_mode", 0):
                continue
            if any(o for o in bn.output[1:]):
                continue
            producer = index.producer.get(bn.input[0])
            if producer is None or producer.op_type not in ("Conv", "Gemm"):
                continue
            if len(index.uses(bn.input[0])) != 1 or index.is_graph_output(bn.input[0]):
                continue
            params = bn.input[1:5]
            if not all(p in index.initializers for p in params) or producer.input[1] not in index.initializers:
                continue
            if producer.op_type == "Gemm" and (attr(producer, "transA", 0) or len(producer.input) < 2):
                continue
            gamma, beta, mean, var = (loaded.array(p).astype(np.float64) for p in params)
            eps = attr(bn, "epsilon", 1e-5)
            scale = gamma / np.sqrt(var + eps)
            if not self._fold(loaded, index, producer, scale, beta, mean):
                continue
            producer.output[0] = bn.output[0]
            removed.add(id(bn))
            folded.append(producer.name)
        if removed:
            keep = [n for n in graph.node if id(n) not in removed]
            del graph.node[:]
            graph.node.extend(keep)
        notes = [f"folded BatchNormalization into {', '.join(folded)}"] if folded else []
        ctx.artifacts["bn_folded"] = folded
        return PassResult(bool(folded), notes)

    @staticmethod
    def _fold(loaded, index: GraphIndex, node: onnx.NodeProto, scale, beta, mean) -> bool:
        w_name = node.input[1]
        w = loaded.array(w_name)
        if w.dtype.kind != "f":
            return False
        if node.op_type == "Conv":
            channels = w.shape[0]
            w_new = w * scale.astype(w.dtype).reshape((-1,) + (1,) * (w.ndim - 1))
        else:
            trans_b = attr(node, "transB", 0)
            channels = w.shape[0] if trans_b else w.shape[1]
            factor = scale.astype(w.dtype)
            w_new = w * (factor[:, None] if trans_b else factor[None, :])
        if scale.shape[0] != channels:
            return False
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias_name is not None and bias_name not in index.initializers:
            return False
        bias = np.zeros(channels) if bias_name is None else loaded.array(bias_name).astype(np.float64)
        if node.op_type == "Gemm":
            bias = np.broadcast_to(bias * attr(node, "beta", 1.0), (channels,)) if bias.size in (1, channels) and bias.ndim <= 1 else None
            if bias is None:
                return False
            alpha = attr(node, "alpha", 1.0)
            w_new = w_new * w.dtype.type(alpha)
            set_attr(node, "alpha", 1.0)
            set_attr(node, "beta", 1.0)
        b_new = (bias - mean) * scale + beta
        shared = len(index.uses(w_name)) > 1
        if shared:
            w_name = _fresh_name(index, f"{w_name}_bnfold")
            loaded.add_initializer(w_name, w_new.astype(w.dtype))
            node.input[1] = w_name
        else:
            loaded.set_array(w_name, w_new.astype(w.dtype))
        if bias_name is None or len(index.uses(bias_name)) > 1:
            new_bias = _fresh_name(index, f"{node.name}_bias")
            loaded.add_initializer(new_bias, b_new.astype(w.dtype))
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = new_bias
        else:
            loaded.set_array(bias_name, b_new.astype(w.dtype))
        return True


class RemoveUnusedInitializers(Pass):
    """Drops initializers no node reads any more (BatchNorm parameters after folding)."""

    name = "remove-unused-initializers"

    def run(self, ctx: CompileContext) -> PassResult:
        graph = ctx.model.model.graph
        index = GraphIndex(graph)
        unused = [t.name for t in graph.initializer if not index.uses(t.name) and not index.is_graph_output(t.name)]
        for name in unused:
            ctx.model.remove_initializer(name)
        if unused:
            keep = [i for i in graph.input if i.name not in set(unused)]
            if len(keep) != len(graph.input):
                del graph.input[:]
                graph.input.extend(keep)
        return PassResult(bool(unused))


def _fresh_name(index: GraphIndex, base: str) -> str:
    taken = index.initializers | set(index.producer) | set(index.consumers)
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    index.initializers.add(name)
    return name


CANONICALIZE = (NameNodes, ConstantsToInitializers, FoldBatchNorm, RemoveUnusedInitializers)


def canonicalize_passes() -> list[Pass]:
    return [cls() for cls in CANONICALIZE]
