"""`nmcompile verify` and `nmcompile bench`: the verbs that run models rather than rewrite them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import UserError


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    from .cli import _Parser, _add_common

    p = _Parser(prog=prog, description=description)
    _add_common(p)
    return p


def _require_file(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    return p


def _labelled_data(path: str | None, model):
    """(data, labels), checked against ``model`` (a ModelProto the caller has loaded
    already); labels: an array named ``labels`` that is not a model input (class
    indices to score classifier outputs against), None when absent."""
    if path is None:
        return None, None
    from .calibdata import load_calibration, pop_labels, validate_calibration

    data = load_calibration(path)
    labels = pop_labels(model, data)
    validate_calibration(model, data)
    return data, labels


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes {text!r}: expected numbers separated by commas, e.g. 1,8") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"--batch-sizes {text!r}: batch sizes must be positive")
    return values


def run_verify(argv: list[str]) -> int:
    p = _parser("nmcompile verify", "Compare a compiled model's outputs with its original's on calibration data (or random inputs).")
    p.add_argument("original", help="the original ONNX model")
    p.add_argument("compiled", help="the compiled model (its .ep.json is used when present)")
    p.add_argument("--calib", help="data: .npz named after the model inputs, or a folder of .npz; an extra array 'labels' (class indices) scores classifier outputs of both models")
    p.add_argument("--calib-batch", type=int, default=8, help="samples per batch (default 8)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    from . import graphio
    from .runtime.verify import format_verify_table, verify_models

    original = _require_file(args.original)
    compiled = _require_file(args.compiled)
    original_model = graphio.load_model(original).model
    graphio.load_model(compiled)
    if args.calib_batch <= 0:
        raise UserError("--calib-batch must be positive")
    batches = None
    data, labels = _labelled_data(args.calib, original_model)
    if data is not None:
        from .calibdata import iter_batches

        batches = list(iter_batches(original_model, data, args.calib_batch))
    result = verify_models(original, compiled, batches, labels=labels)
    print(json.dumps(result, indent=2, default=float) if args.json else format_verify_table(result))
    return 0


def run_bench(argv: list[str]) -> int:
    p = _parser("nmcompile bench", "Latency percentiles and throughput of a model on its configured providers, beside its original.")
    p.add_argument("model", help="the model to time (a compiled model's .ep.json is used when present)")
    p.add_argument("--baseline", help="the original model, timed alternately with the same inputs and settings")
    p.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up runs per model and batch size (default 10)")
    p.add_argument("--iterations", type=int, default=100, help="timed runs per model and batch size (default 100)")
    p.add_argument("--calib", help="take inputs from this calibration data instead of generating them")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    from . import graphio
    from .runtime.bench import bench_models, format_bench_table

    model = _require_file(args.model)
    inputs_of = graphio.load_model(model).model  # the model whose inputs the data must match
    baseline = None
    if args.baseline:
        baseline = _require_file(args.baseline)
        inputs_of = graphio.load_model(baseline).model
    if args.warmup < 0 or args.iterations <= 0:
        raise UserError("--warmup must be >= 0 and --iterations > 0")
    if args.threads is not None and args.threads <= 0:
        raise UserError("--threads must be positive")
    data, _ = _labelled_data(args.calib, inputs_of)  # labels: verify's, not timed
    rows = bench_models(
        model,
        baseline=baseline,
        batch_sizes=_positive_ints(args.batch_sizes),
        threads=args.threads,
        warmup=args.warmup,
        iterations=args.iterations,
        calib_data=data,
    )
    print(json.dumps(rows, indent=2, default=float) if args.json else format_bench_table(rows))
    return 0


def main(verb: str, argv: list[str]) -> int:
    if verb == "verify":
        return run_verify(argv)
    if verb == "bench":
        return run_bench(argv)
    raise UserError(f"unknown verb {verb!r}")
