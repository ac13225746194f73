"""`nmcompile inspect`: which N:M patterns a model's weights already follow."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nmcompile.passes.base import CompileContext
from nmcompile.passes.canonicalize import ConstantsToInitializers, NameNodes
from nmcompile.passes.nm_mask import group_max_nonzeros
from nmcompile.passes.targets import WeightView, find_targets

from . import graphio
from .patterns import Pattern

INSPECT_M = (4, 8, 16, 32)
CODED_DOMAIN = "nmcompile"  # the domain of the decode functions --quantize log/lut writes
TRANSPOSABLE_M = (4, 8)
# (n, m, transposable, unstructured, label)
DIVERSITY_PATTERNS = (
    (1, 2, False, True, "unstructured 50%"),
    (4, 8, False, False, "4:8"),
    (2, 4, False, False, "2:4"),
    (4, 8, True, False, "4:8-T"),
    (2, 4, True, False, "2:4-T"),
)


def as_tiles_matrix(weight: np.ndarray, out_axis: int, red_axis: int) -> np.ndarray:
    """The weight as a stack of [outputs, reductions] matrices, one per remaining index (kernel position)."""
    moved = np.moveaxis(weight, (out_axis, red_axis), (-2, -1))
    return moved.reshape((-1,) + moved.shape[-2:])


def transposable_n(weight: np.ndarray, m: int, out_axis: int, red_axis: int) -> int | None:
    """Smallest N such that every m×m tile has at most N nonzeros per row and per column."""
    mats = as_tiles_matrix(weight != 0, out_axis, red_axis)
    p, rows, cols = mats.shape
    if rows % m or cols % m or mats.size == 0:
        return None
    tiles = mats.reshape(p, rows // m, m, cols // m, m)
    return int(max(tiles.sum(axis=4).max(), tiles.sum(axis=2).max()))


def decode_coded_weights(loaded: graphio.LoadedModel) -> set[str]:
    """Weights a --quantize log/lut output stores as codes behind decode functions,
    computed by ONNX Runtime as at inference and put in place of the decode nodes
    (in memory only), so a coded model inspects like any other. Returns their names."""
    graph = loaded.model.graph
    coded = [n for n in graph.node if n.domain == CODED_DOMAIN]
    if not coded:
        return set()
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    inits = {t.name for t in graph.initializer}
    decoder = helper.make_graph(
        list(coded), "decode", [], [onnx.ValueInfoProto(name=o) for n in coded for o in n.output],
        [numpy_helper.from_array(np.asarray(loaded.array(i)), i) for i in dict.fromkeys(i for n in coded for i in n.input if i in inits)])
    model = helper.make_model(decoder, opset_imports=list(loaded.model.opset_import), ir_version=loaded.model.ir_version)
    model.functions.extend(loaded.model.functions)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        values = dict(zip((o.name for o in sess.get_outputs()), sess.run(None, {})))
    except Exception as exc:  # decode nodes that read more than stored codes: not ours to interpret
        from .errors import UserError

        raise UserError(f"{loaded.path.name}: its coded weights could not be decoded: {str(exc).splitlines()[0]}") from None
    for node in coded:
        graph.node.remove(node)
    for name, value in values.items():
        loaded.add_initializer(name, value)
    return set(values)


def distinct_per_channel(weight: np.ndarray, out_axis: int) -> int:
    """The most distinct values any output channel holds (a 4-bit code: at most 16)."""
    rows = np.moveaxis(weight, out_axis, 0).reshape(weight.shape[out_axis], -1)
    return max((len(np.unique(r)) for r in rows), default=0)


def inspect_model(path: str | os.PathLike) -> dict:
    """Per-layer sparsity and the N:M patterns each target weight satisfies."""
    from nmcompile.passes.transposable import mask_diversity  # numba kernels: only when inspecting

    from .pipeline import trt_row

    loaded = graphio.load_model(Path(path))
    ctx = CompileContext(model=loaded, options=None)
    NameNodes()(ctx)
    ConstantsToInitializers()(ctx)
    decoded = decode_coded_weights(loaded)
    layers = []
    for target in find_targets(loaded):
        use = target.primary
        weight = WeightView(loaded, target.weight, use).effective()
        row = {
            "name": target.name,
            "op": target.op,
            "weight": target.weight,
            "shape": list(use.eff_shape),
            "sparsity": float(np.count_nonzero(weight == 0) / weight.size) if weight.size else 0.0,
            "smallest_n": {str(m): group_max_nonzeros(weight, m, use.red_axis) for m in INSPECT_M},
            "transposable": {},
        }
        for m in TRANSPOSABLE_M:
            n = transposable_n(weight, m, use.out_axis, use.red_axis)
            row["transposable"][str(m)] = n
        n4 = row["smallest_n"]["4"]
        followed = Pattern(n4, 4) if n4 is not None and n4 < 4 else None
        row["trt_sparse"] = trt_row(target, followed, "fp16")
        if target.weight in decoded:
            row["coded"] = {"distinct_values_per_channel": distinct_per_channel(weight, use.out_axis)}
        layers.append(row)
    diversity = []
    for n, m, transposable, unstructured, label in DIVERSITY_PATTERNS:
        count = mask_diversity(n, m, transposable, weights=64, unstructured=unstructured)
        diversity.append({"pattern": label, "masks_per_64_weights": count})
    return {"model": Path(path).name, "layers": layers, "mask_diversity": diversity}


def format_inspect(result: dict) -> str:
    coded = any("coded" in layer for layer in result["layers"])
    header = ["layer", "op", "shape", "sparsity"] + [f"N:{m}" for m in INSPECT_M] + ["transposable", "TRT sparse (fp16)"]
    header += ["coded (values/channel)"] if coded else []
    rows = []
    for layer in result["layers"]:
        cells = [layer["name"], layer["op"], "x".join(map(str, layer["shape"])), f"{layer['sparsity']:.1%}"]
        for m in INSPECT_M:
            n = layer["smallest_n"][str(m)]
            cells.append("-" if n is None else "none" if n >= m else f"{n}:{m}")
        t = []
        for m in TRANSPOSABLE_M:
            n = layer["transposable"][str(m)]
            if n is not None and n < m:
                t.append(f"{n}:{m}-T")
        cells.append(", ".join(t) if t else "no")
        cells.append("yes" if layer["trt_sparse"]["eligible"] else "no")
        if coded:
            cells.append(str(layer["coded"]["distinct_values_per_channel"]) if "coded" in layer else "no")
        rows.append(cells)
    out = [format_table(header, rows)]
    out.append("TRT sparse: 2:4 along input channels, fp16/int8, >= 256 channels, not grouped (the rule and its sources: --json, trt_sparse.reason)")
    out.append("")
    out.append("mask diversity (valid masks per 64 weights):")
    out.append(format_table(["pattern", "masks"], [[d["pattern"], f"{d['masks_per_64_weights']:.3g}"] for d in result["mask_diversity"]]))
    return "\n".join(out)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in header]
    for r in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, r)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
