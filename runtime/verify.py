"""Compare a compiled model's outputs with its original's on the same inputs.

Metrics per output, accumulated batch by batch (outputs are never all kept in
memory):

* ``cosine``: cosine similarity of the whole output (all batches flattened);
* ``worst_sample_cosine``: the lowest per-sample cosine (axis 0 = samples),
  for outputs of rank >= 2;
* ``max_abs`` / ``mean_abs``: absolute error;
* ``top1``: agreement of the arg-max, for outputs that look like a
  classifier's logits (float, 2-D [N, C] with C >= 2), else None;
* ``exact``: fraction of equal elements, for integer and boolean outputs
  (cosine is then None);
* ``nonfinite``: NaN/inf elements in the compiled model's output that are
  finite in the original's;
* ``padded_positions``: (batch, sequence) positions left out because the
  batch's 0/1 ``attention_mask`` marks them as padding (outputs whose first two
  axes are the mask's): their values are computed but no prediction reads them,
  and the compile's calibration does not fit them either.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from nmcompile.errors import UserError
from nmcompile.passes.statistics import token_mask

from .bench import conform_feed, make_inputs
from .providers import CPU, config_path_for
from .session import create_session, load

__all__ = ["compare_outputs", "verify_models", "format_verify_table", "OutputStats"]


class OutputStats:
    """Streaming comparison of one output across batches."""

    def __init__(self, name: str):
        self.name = name
        self.shape: list[int] | None = None
        self.dtype: str | None = None
        self.is_float = True
        self.count = 0
        self.samples = 0
        self.dot = 0.0
        self.ref_sq = 0.0
        self.test_sq = 0.0
        self.abs_sum = 0.0
        self.max_abs = 0.0
        self.equal = 0
        self.nonfinite = 0
        self.top1_hits = 0
        self.top1_total = 0
        self.top1_ok = True
        self.worst_cos: float | None = None
        self.label_hits = [0, 0]  # original, compiled
        self.label_total = 0
        self.padded = 0

    def add_labels(self, ref, test, labels: np.ndarray) -> None:
        """Top-1 accuracy of both models against the data's labels (classifier outputs)."""
        ref, test = np.asarray(ref), np.asarray(test)
        if not (self.is_float and ref.ndim == 2 and ref.shape[1] >= 2 and ref.shape[0] == labels.shape[0]):
            return
        self.label_hits[0] += int(np.count_nonzero(ref.argmax(axis=1) == labels))
        self.label_hits[1] += int(np.count_nonzero(test.argmax(axis=1) == labels))
        self.label_total += int(labels.shape[0])

    def add(self, ref, test, tokens: np.ndarray | None = None) -> None:
        """``tokens``: the batch's real-token mask (statistics.token_mask); padded positions
        of outputs laid out (batch, sequence, ...) are set to zero in both and not counted."""
        ref = np.asarray(ref)
        test = np.asarray(test)
        if ref.shape != test.shape:
            raise UserError(
                f"output {self.name!r}: the compiled model gives shape {list(test.shape)}, "
                f"the original {list(ref.shape)}"
            )
        left_out = 0
        if tokens is not None and ref.ndim >= 2 and ref.shape[:2] == tokens.shape and not tokens.all():
            keep = tokens.reshape(tokens.shape + (1,) * (ref.ndim - 2))
            ref, test = np.where(keep, ref, 0).astype(ref.dtype), np.where(keep, test, 0).astype(test.dtype)
            self.padded += int(tokens.size - tokens.sum())
            left_out = int(tokens.size - tokens.sum()) * math.prod(ref.shape[2:])
        if self.shape is None:
            self.shape = list(ref.shape)
            self.dtype = str(ref.dtype)
            self.is_float = bool(
                np.issubdtype(ref.dtype, np.floating) or np.issubdtype(ref.dtype, np.complexfloating)
            )
        r = ref.astype(np.float64).ravel()
        t = test.astype(np.float64).ravel()
        finite_ref = np.isfinite(r)
        bad = ~np.isfinite(t) & finite_ref
        self.nonfinite += int(bad.sum())
        self.count += r.size - left_out
        self.samples += int(ref.shape[0]) if ref.ndim >= 1 else 1
        self.equal += int(np.count_nonzero(ref == test)) - left_out  # the zeroed positions are equal
        diff = np.abs(r - t)
        if diff.size:
            self.abs_sum += float(diff.sum())
            self.max_abs = float(np.max([self.max_abs, diff.max()]))  # NaN stays NaN (Python's max would drop it)
        self.dot += float(r @ t)
        self.ref_sq += float(r @ r)
        self.test_sq += float(t @ t)
        if self.is_float and ref.ndim >= 2 and ref.shape[0] > 0:
            r2 = ref.reshape(ref.shape[0], -1).astype(np.float64)
            t2 = test.reshape(test.shape[0], -1).astype(np.float64)
            cos = _cosine_rows(r2, t2)
            w = float(np.min(cos))
            self.worst_cos = w if self.worst_cos is None else min(self.worst_cos, w)
        if self.is_float and ref.ndim == 2 and ref.shape[1] >= 2:
            self.top1_hits += int(np.count_nonzero(ref.argmax(axis=1) == test.argmax(axis=1)))
            self.top1_total += int(ref.shape[0])
        else:
            self.top1_ok = False

    def result(self) -> dict:
        n = max(self.count, 1)
        out = {
            "shape": self.shape,
            "dtype": self.dtype,
            "elements": self.count,
            "samples": self.samples,
            "cosine": _cosine(self.dot, self.ref_sq, self.test_sq) if self.is_float else None,
            "worst_sample_cosine": self.worst_cos,
            "max_abs": self.max_abs,
            "mean_abs": self.abs_sum / n,
            "top1": (self.top1_hits / self.top1_total) if (self.top1_ok and self.top1_total) else None,
            "exact": None if self.is_float else self.equal / n,
            "nonfinite": self.nonfinite,
            "padded_positions": self.padded,
        }
        if self.label_total and self.label_total == self.samples:
            out["accuracy"] = {"original": self.label_hits[0] / self.label_total,
                               "compiled": self.label_hits[1] / self.label_total, "samples": self.label_total}
        return out


def _cosine(dot, a2, b2) -> float:
    if a2 == 0.0 and b2 == 0.0:
        return 1.0
    if a2 == 0.0 or b2 == 0.0:
        return 0.0
    v = dot / math.sqrt(a2 * b2)
    return float(min(1.0, max(-1.0, v))) if math.isfinite(v) else math.nan


def _cosine_rows(a, b) -> np.ndarray:
    dot = np.einsum("ij,ij->i", a, b)
    na = np.einsum("ij,ij->i", a, a)
    nb = np.einsum("ij,ij->i", b, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / np.sqrt(na * nb)
    cos = np.where((na == 0) & (nb == 0), 1.0, cos)
    cos = np.where((na == 0) ^ (nb == 0), 0.0, cos)
    return np.clip(np.nan_to_num(cos, nan=-1.0), -1.0, 1.0)


def _accumulate(stats: dict[str, OutputStats], ref: Mapping, test: Mapping, tokens: np.ndarray | None = None) -> None:
    missing = [k for k in ref if k not in test]
    if missing:
        raise UserError(f"the compiled model has no output {missing[0]!r}: are these the same model?")
    for name, value in ref.items():
        stats.setdefault(name, OutputStats(name)).add(value, test[name], tokens)


def compare_outputs(
    ref: Sequence[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray],
    test: Sequence[Mapping[str, np.ndarray]] | Mapping[str, np.ndarray],
) -> dict[str, dict]:
    """Compare outputs batch by batch: ``ref`` and ``test`` are lists (one
    dict of output name -> array per batch, same order) or single dicts.

    Returns ``{output name: metrics}`` with the metrics listed in the module
    docstring. Different batch counts, missing outputs or shapes raise ``UserError``.
    """
    if isinstance(ref, Mapping):
        ref = [ref]
    if isinstance(test, Mapping):
        test = [test]
    ref, test = list(ref), list(test)
    if len(ref) != len(test):
        raise UserError(f"{len(ref)} reference batches but {len(test)} test batches")
    stats: dict[str, OutputStats] = {}
    for r, t in zip(ref, test):
        _accumulate(stats, r, t)
    return {name: s.result() for name, s in stats.items()}


def verify_models(
    original,
    compiled,
    batches: Iterable[Mapping[str, np.ndarray]] | None = None,
    compiled_session=None,
    *,
    original_session=None,
    config_path=None,
    random_batches: int = 4,
    batch_size: int = 1,
    seed: int = 0,
    labels: np.ndarray | None = None,
) -> dict:
    """Run the original and the compiled model on the same batches and compare.

    The original runs on the CPU provider (the reference); the compiled one
    through :func:`nmcompile.runtime.session.load` when it has a configuration
    (``config_path`` or ``MODEL.ep.json``), else on CPU; ``compiled_session`` /
    ``original_session`` replace those sessions. ``batches``: feeds (input name
    -> array, samples on axis 0); None: ``random_batches`` generated feeds of
    ``batch_size`` samples (:func:`~nmcompile.runtime.bench.make_inputs`, seeds
    ``seed, seed+1, ...``).

    Returns ``{"outputs": {name: metrics}, "batches", "samples",
    "providers": {"original": [...], "compiled": [...]},
    "dropped_providers": [...], "inputs": "data" | "random"}``.
    """
    if original_session is None:
        original_session = create_session(original, None, [CPU], label=f"{os.path.basename(os.fspath(original))} (original)")
    if compiled_session is None:
        has_cfg = config_path is not None or os.path.exists(config_path_for(compiled))
        if has_cfg:
            compiled_session = load(compiled, config_path)
        else:
            compiled_session = create_session(compiled, None, [CPU])
    source = "data"
    if batches is None:
        source = "random"
        batches = (
            make_inputs(compiled, batch_size, None, seed + i) for i in range(max(1, int(random_batches)))
        )
    ref_names = [o.name for o in original_session.get_outputs()]
    test_names = {o.name for o in compiled_session.get_outputs()}
    missing = [n for n in ref_names if n not in test_names]
    if missing:
        raise UserError(f"the compiled model has no output {missing[0]!r}: are these the same model?")

    stats: dict[str, OutputStats] = {name: OutputStats(name) for name in ref_names}
    count = 0
    samples = 0
    for feed in batches:
        f_ref = conform_feed(original_session, feed)
        f_test = conform_feed(compiled_session, feed)
        try:
            ref = original_session.run(ref_names, f_ref)
            test = compiled_session.run(ref_names, f_test)
        except Exception as e:  # onnxruntime's own exception types
            msg = str(e).strip().splitlines()
            raise UserError(f"inference failed: {msg[0] if msg else type(e).__name__}") from None
        _accumulate(stats, dict(zip(ref_names, ref)), dict(zip(ref_names, test)), token_mask(feed))
        count += 1
        first = next(iter(f_ref.values()), None)
        n = int(first.shape[0]) if first is not None and first.ndim >= 1 else 1
        if labels is not None:  # the batches are consecutive samples of the data, in order
            for name, r, t in zip(ref_names, ref, test):
                stats[name].add_labels(r, t, labels[samples:samples + n])
        samples += n
    if count == 0:
        raise UserError("no input batches to verify with")
    return {
        "outputs": {name: s.result() for name, s in stats.items()},
        "batches": count,
        "samples": samples,
        "inputs": source,
        "providers": {
            "original": list(original_session.get_providers()),
            "compiled": list(compiled_session.get_providers()),
        },
        "dropped_providers": list(getattr(compiled_session, "nm_dropped_providers", [])),
    }


def _f(v, spec) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def format_verify_table(result: Mapping) -> str:
    """A plain-text table of :func:`verify_models` (or :func:`compare_outputs`) results."""
    outputs = result.get("outputs", result)
    header = ["output", "shape", "cosine", "worst sample", "max abs", "mean abs", "top-1"]
    body = []
    for name, m in outputs.items():
        top1 = m.get("top1")
        exact = m.get("exact")
        body.append(
            [
                name,
                "x".join(str(d) for d in (m.get("shape") or [])) or "scalar",
                _f(m.get("cosine"), ".6f"),
                _f(m.get("worst_sample_cosine"), ".6f"),
                _f(m.get("max_abs"), ".4g"),
                _f(m.get("mean_abs"), ".4g"),
                (f"{100 * top1:.2f}%" if top1 is not None else (f"exact {100 * exact:.2f}%" if exact is not None else "-")),
            ]
        )
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths])] + [line(b) for b in body]
    for name, m in outputs.items():
        acc = m.get("accuracy")
        if acc:
            out.append(f"accuracy against the data's labels ({name}, {acc['samples']} samples): "
                       f"original {100 * acc['original']:.2f}%, compiled {100 * acc['compiled']:.2f}%")
    padded = [n for n, m in outputs.items() if m.get("padded_positions")]
    if padded:
        out.append(f"padded positions (attention_mask 0) left out of {', '.join(padded)}: "
                   f"{outputs[padded[0]]['padded_positions']}")
    bad = [n for n, m in outputs.items() if m.get("nonfinite")]
    if bad:
        out.append("non-finite values in the compiled model's output: " + ", ".join(
            f"{n} ({outputs[n]['nonfinite']})" for n in bad))
    if "batches" in result:
        prov = result.get("providers", {})
        out.append(
            f"{result['samples']} samples in {result['batches']} batches ({result.get('inputs', 'data')} inputs); "
            f"original on {', '.join(prov.get('original', []))}, compiled on {', '.join(prov.get('compiled', []))}"
        )
    return "\n".join(out)
