"""Who produces and who consumes each tensor of the main graph; small helpers over NodeProto."""

from __future__ import annotations

from collections import defaultdict

import onnx


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    for op in model.opset_import:
        if op.domain in (domain, "ai.onnx" if domain == "" else domain):
            return op.version
    return 0


class GraphIndex:
    """Producer and consumer maps of a graph; rebuild after structural edits."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, i))
        # Tensors read inside subgraphs by name count as consumed too.
        for node in graph.node:
            for a in node.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
                for sub in subs:
                    for name in names_read(sub.node):
                        self.consumers[name].append((node, -1))
        self.graph_outputs = {o.name for o in graph.output}
        self.initializers = {t.name for t in graph.initializer}

    def uses(self, name: str) -> list[tuple[onnx.NodeProto, int]]:
        return self.consumers.get(name, [])

    def is_graph_output(self, name: str) -> bool:
        return name in self.graph_outputs


def names_read(nodes) -> set[str]:
    """Every tensor name the nodes read, their subgraphs included."""
    names: set[str] = set()
    for node in nodes:
        names.update(i for i in node.input if i)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= names_read(a.g.node)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    names |= names_read(g.node)
    return names


def upstream(nodes, wanted) -> tuple[list[int], set[str]]:
    """Indices (in graph order) of the nodes needed to compute `wanted`, and every name they read."""
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                producer[out] = i
    keep: set[int] = set()
    used: set[str] = set()
    stack = list(wanted)
    while stack:
        name = stack.pop()
        if name in used:
            continue
        used.add(name)
        i = producer.get(name)
        if i is None or i in keep:
            continue
        keep.add(i)
        stack.extend(names_read([nodes[i]]))
    return sorted(keep), used
