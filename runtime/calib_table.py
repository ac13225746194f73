"""TensorRT's legacy int8 calibration cache (a "calibration table").

Legacy only: TensorRT 10.1 deprecated implicit quantization with calibration
tables and TensorRT 11 removes it; nmcompile's int8 output is an explicit QDQ
model, which needs no table (and TensorRT refuses a table for a model with
Q/DQ nodes). The table is for users who must run a *float* model in TensorRT's
implicit int8 mode, e.g. through ONNX Runtime's TensorRT provider with
``trt_int8_enable``, ``trt_int8_calibration_table_name`` and
``trt_int8_use_native_calibration_table=True``
(see :func:`nmcompile.runtime.providers.provider_config`).

Format written (TensorRT's own calibration cache text format, the one its
``IInt8EntropyCalibrator2::writeCalibrationCache`` produces and ONNX Runtime's
TensorRT provider reads with ``trt_int8_use_native_calibration_table``)::

    TRT-<version>-<Algorithm>
    <tensor name>: <scale>
    ...

* First line: ``TRT-8601-EntropyCalibration2`` by default (``trt_version`` is
  TensorRT's integer version, 8601 = 8.6.1; ``algorithm`` the calibrator's
  name). ONNX Runtime only checks that the line contains ``TRT-``.
* Then one line per tensor, sorted by name: the tensor name, ``": "``, and the
  scale as the 8 lower-case hex digits of its IEEE-754 float32 bit pattern
  (1.0 -> ``3f800000``). The scale is ``absmax / 127`` with
  ``absmax = max(|low|, |high|)``; readers recover the symmetric dynamic range
  as ``scale * 127`` (ONNX Runtime's ``ReadDynamicRange``).

Difference from ONNX Runtime's ``quantization.quant_utils.write_calibration_table``:
that writer stores ``max(high, low)`` *without* absolute values (so a range
(-10, 2) becomes 2, and the negative half of the tensor saturates); this one
uses ``max(|low|, |high|)`` (10 for that range). ONNX Runtime's writer also
emits its own formats (``calibration.flatbuffers`` with the range as decimal
text, read when ``trt_int8_use_native_calibration_table`` is False, plus
``calibration.json`` and a ``calibration.cache`` of ``name range`` lines);
nmcompile writes only TensorRT's native format.

Tensor names containing ``:`` or a line break cannot be represented (ONNX
Runtime splits each line at the first ``:``); they are skipped with a warning.
A zero range is written as the smallest normal float32 scale so that readers
never get a zero (division by zero) scale.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import tempfile
from collections.abc import Mapping

import numpy as np

from nmcompile.errors import UserError

__all__ = ["write_calibration_table", "format_calibration_table", "collect_ranges", "read_calibration_table", "float_to_hex", "hex_to_float"]

log = logging.getLogger("nmcompile")

_TINY = float(np.finfo(np.float32).tiny)


def float_to_hex(value: float) -> str:
    """The 8 hex digits of a float32's bit pattern (1.0 -> '3f800000')."""
    return "%08x" % struct.unpack("<I", struct.pack("<f", float(value)))[0]


def hex_to_float(text: str) -> float:
    """Inverse of :func:`float_to_hex`."""
    return struct.unpack("<f", struct.pack("<I", int(text.strip(), 16)))[0]


def format_calibration_table(
    ranges: Mapping[str, tuple[float, float]],
    *,
    trt_version: int = 8601,
    algorithm: str = "EntropyCalibration2",
) -> tuple[str, dict[str, float]]:
    """The table's text and the scales in it (name -> float32 scale = max(|low|, |high|) / 127).

    Raises ``UserError`` for a non-finite range.
    """
    scales: dict[str, float] = {}
    lines = [f"TRT-{int(trt_version)}-{algorithm}"]
    for name in sorted(ranges):
        low, high = (float(v) for v in ranges[name])
        if not (math.isfinite(low) and math.isfinite(high)):
            raise UserError(f"calibration range of tensor {name!r} is not finite: ({low}, {high})")
        if ":" in name or "\n" in name or "\r" in name:
            log.warning(
                "calibration table: skipping tensor %r (':' or a line break in its name "
                "cannot be written in TensorRT's calibration cache format)",
                name,
            )
            continue
        absmax = max(abs(low), abs(high))
        scale = float(np.float32(absmax / 127.0))
        if scale < _TINY:
            scale = _TINY
        scales[name] = scale
        lines.append(f"{name}: {float_to_hex(scale)}")
    return "\n".join(lines) + "\n", scales


def write_calibration_table(
    ranges: Mapping[str, tuple[float, float]],
    path,
    *,
    trt_version: int = 8601,
    algorithm: str = "EntropyCalibration2",
) -> dict[str, float]:
    """Write ``ranges`` (tensor name -> (low, high)) as a TensorRT calibration
    cache at ``path`` (format: see the module docstring). The file appears
    whole or not at all (written to a temporary file, then renamed).

    Returns the scales written (name -> float32 scale = max(|low|, |high|) / 127).
    """
    text, scales = format_calibration_table(ranges, trt_version=trt_version, algorithm=algorithm)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".calib-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return scales


def collect_ranges(loaded, batches) -> dict[str, tuple[float, float]]:
    """(min, max) of every float tensor of the model as it stands (graph inputs included),
    over the calibration batches: one batch of activations in memory at a time."""
    from nmcompile.passes.statistics import _build_session, graph_input_names

    model = loaded.model
    inputs = graph_input_names(model)
    floats = {onnx_float for onnx_float in (1, 10, 11, 16)}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
    typed = {vi.name for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output) if vi.type.tensor_type.elem_type in floats}
    import onnx

    inferred = onnx.shape_inference.infer_shapes(_without_weights(model))
    typed |= {vi.name for vi in inferred.graph.value_info if vi.type.tensor_type.elem_type in floats}
    produced = [o for node in model.graph.node for o in node.output if o and o in typed]
    wanted = list(dict.fromkeys(produced))
    sess, weights = _build_session(model, wanted, str(loaded.base_dir), loaded.overrides())
    names = [o.name for o in sess.get_outputs()]
    ranges: dict[str, list[float]] = {}
    for batch in batches:
        feed = {i.name: batch[i.name] for i in sess.get_inputs() if i.name in batch}
        feed.update(weights)
        values = dict(zip(names, sess.run(names, feed)))
        values.update({k: v for k, v in batch.items() if k in inputs and k in typed})
        for name, value in values.items():
            if value.size == 0 or value.dtype.kind != "f":
                continue
            lo, hi = float(np.min(value)), float(np.max(value))
            if name in ranges:
                ranges[name][0] = min(ranges[name][0], lo)
                ranges[name][1] = max(ranges[name][1], hi)
            else:
                ranges[name] = [lo, hi]
    del sess, weights
    return {k: (v[0], v[1]) for k, v in ranges.items()}


def _without_weights(model):
    """A copy of the graph with initializers reduced to their type and shape, for shape inference."""
    import onnx

    graph = model.graph
    declared = {i.name for i in graph.input}
    inputs = list(graph.input) + [
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer if t.name not in declared
    ]
    stripped = onnx.helper.make_model(
        onnx.helper.make_graph(list(graph.node), graph.name or "graph", inputs, list(graph.output), value_info=list(graph.value_info)),
        opset_imports=list(model.opset_import),
    )
    stripped.ir_version = model.ir_version
    return stripped


def read_calibration_table(path) -> tuple[str, dict[str, float]]:
    """Read a TensorRT calibration cache: ``(header, {name: dynamic range})``,
    the dynamic range being ``scale * 127`` as ONNX Runtime computes it."""
    with open(os.fspath(path), encoding="utf-8") as f:
        text = f.read().splitlines()
    if not text or "TRT-" not in text[0]:
        raise UserError(f"{path}: not a TensorRT calibration cache (no 'TRT-' header)")
    out: dict[str, float] = {}
    for line in text[1:]:
        if not line.strip():
            continue
        name, _, value = line.partition(":")
        out[name] = hex_to_float(value) * 127.0
    return text[0], out
