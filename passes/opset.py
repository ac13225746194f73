"""Bring an old model to the opset a later pass needs, without changing what it computes.

int8 per-channel weights need DequantizeLinear's ``axis``, which arrived in opset 13.
Raising the opset import alone is safe only when no op of the model changed
meaning in between (``quantize._can_raise_opset``); paddle2onnx and older PyTorch
exports sit at opsets 11-12 with Softmax, Squeeze or Split, whose definitions did
change. Those models are converted with onnx's version converter (as ONNX
Runtime's own quantizer does) and the result is kept only if ONNX Runtime gives
the same outputs on the first calibration batch; otherwise int8 falls back to
per-tensor weight scales, and the report says which happened. Measured: the
PP-OCRv4 text recognizer (opset 12) with per-tensor scales had layers at 9-11 dB
weight SQNR (its report) and read none of the lines it reads per-channel.
"""

from __future__ import annotations

import numpy as np

from .base import CompileContext, Pass, PassResult


class UpgradeOpset(Pass):
    """Convert the model to ``target`` before any pass holds its nodes (the converter
    returns a new graph); a no-op where a plain opset raise suffices or is not needed."""

    name = "upgrade-opset"

    def __init__(self, target: int):
        self.target = target

    def run(self, ctx: CompileContext) -> PassResult:
        import onnx
        from onnx import version_converter

        from .quantize import _can_raise_opset, opset_version

        loaded = ctx.model
        old = opset_version(loaded.model)
        if old >= self.target or old <= 0 or _can_raise_opset(loaded.model, self.target):
            return PassResult(False)
        try:
            converted = version_converter.convert_version(loaded.model, self.target)
            onnx.checker.check_model(converted, full_check=False)
        except Exception as exc:  # the converter's adapters do not cover every op and pattern
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return PassResult(False, [f"opset {old} could not be converted to {self.target} ({first[:160]}): "
                                      "int8 weights get per-tensor scales"])
        batches = ctx.artifacts.get("calib_batches")
        batch = next(iter(batches()), None) if batches is not None else None
        if batch is not None and not same_outputs(loaded, converted, batch):
            return PassResult(False, [f"opset {old} converted to {self.target} gave different outputs on a calibration "
                                      "batch: kept as it was, int8 weights get per-tensor scales"])
        loaded.model = converted
        loaded.refresh_index()
        return PassResult(True, [f"converted from opset {old} to {self.target} (onnx version converter, the same outputs "
                                 "on a calibration batch) for per-channel int8 weight scales"])


def same_outputs(loaded, converted, batch) -> bool:
    """Whether ONNX Runtime computes the same outputs from both models on ``batch``."""
    from .statistics import _Runner

    names = [o.name for o in loaded.model.graph.output]
    got = []
    for model in (loaded.model, converted):
        runner = _Runner(model, names, str(loaded.base_dir), loaded.overrides())
        got.append(runner(batch))
        del runner
    for name in names:
        a, b = np.asarray(got[0][name]), np.asarray(got[1][name])
        if a.shape != b.shape:
            return False
        if np.issubdtype(a.dtype, np.floating):
            scale = float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0))
            if not np.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30), equal_nan=True):
                return False
        elif not np.array_equal(a, b):
            return False
    return True
