"""The `nmcompile` command: compile (the default verb), inspect, verify, bench.

Exit codes: 0 success, 2 bad input or usage, 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback

from . import __version__
from .errors import UserError

VERBS = ("compile", "inspect", "verify", "bench")

EPILOG = """verbs:
  nmcompile MODEL.onnx [options]          compile (same as 'nmcompile compile MODEL.onnx')
  nmcompile inspect MODEL.onnx            per-layer sparsity and the N:M patterns already followed
  nmcompile verify ORIGINAL COMPILED      compare outputs of a compiled model with its original
  nmcompile bench MODEL [--baseline ORIG] latency and throughput on the configured providers

exit codes: 0 success, 2 bad input or usage, 1 internal error (--debug shows the traceback)
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{message} (see '{self.prog} --help')")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary table")


def _compile_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Compile an ONNX model: N:M-prune the weights of MatMul, Gemm and Conv along their reduction axis.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="input ONNX model (.onnx); external data files are read from its folder")
    p.add_argument("-o", "--output", help="output model path (default: MODEL.nm.onnx beside the input; never the input)")
    p.add_argument("--pattern", default="2:4", help="N:M: keep at most N nonzeros in every M along the reduction axis, 0<N<M<=32; 'none' to skip pruning (default 2:4)")
    p.add_argument("--sequential", action="store_true", help="sequential N:M: the M-N pruned weights of each group are consecutive")
    p.add_argument("--transposable", action="store_true", help="transposable N:M: every MxM tile (outputs x inputs) keeps N per row and per column, so W and W^T are both N:M")
    p.add_argument("--solver", choices=("exact", "approx", "auto"), help="transposable mask solver: exact optimum per tile, fast approximation (greedy + repair), or auto (default)")
    cal = p.add_argument_group("calibration (AdaPrune)")
    cal.add_argument("--calib", metavar="DATA", help="calibration data: an .npz whose arrays are named after the model inputs (samples on axis 0), or a folder of .npz; turns on calibration-aware masks and AdaPrune")
    cal.add_argument("--calib-batch", type=int, default=32, metavar="B", help="samples per calibration batch (default 32; models with a fixed batch dimension use theirs)")
    cal.add_argument("--no-adaprune", action="store_true", help="with --calib: choose masks from the statistics but do not re-fit the weights")
    cal.add_argument("--mask-score", choices=("sparsegpt", "obs", "activation", "magnitude"), help="how each group's N of M is chosen: sparsegpt (all C(M,N) keep sets per group inside SparseGPT's compensating sweep; the default with --calib), obs (w^2/[H^-1]_ii per weight), activation (|w|*||x||), magnitude (|w|, the default without)")
    cal.add_argument("--sequential-calib", action="store_true", help="take each layer's statistics from the model whose earlier layers are already compressed, fitting to the dense outputs (slower, one calibration pass per layer wave)")
    cal.add_argument("--stats-budget", type=float, default=None, metavar="MIB", help="memory for Gram statistics at once (default: the size of the model's weights, 64-512 MiB); layers are calibrated in chunks that fit, each chunk one pass over the data")
    cal.add_argument("--calib-table", action="store_true", help="also write a legacy TensorRT calibration table (trt_cache/OUT.calibration.cache, absolute-max ranges) for implicit int8 builds of the float model; deprecated by TensorRT 10.1, prefer --quantize int8")
    q = p.add_argument_group("quantization")
    q.add_argument("--quantize", choices=("int8", "log", "lut"), help="int8: explicit QDQ (per-channel int8 weights, calibrated per-tensor activations; needs --calib); log: weight-only sign + power-of-two codes; lut: weight-only k-means codebook")
    q.add_argument("--bits", type=int, help="code width for --quantize log/lut (2-8, default 4)")
    q.add_argument("--calib-method", choices=("kl", "minmax", "percentile", "auto"), help="activation thresholds for int8: min/max (default: clips nothing; on the real PP-OCRv4 text recognizer it reads 64.8%% of the lines, float 68.8%%, auto 35.2%%, ORT's quantize_static 47.7%%), TensorRT's KL search, percentile, or auto (per tensor, lowest quantization error, checked against min/max on the model's output)")
    q.add_argument("--max-error", type=float, metavar="E", help="output error budget (1 - cosine to the unquantized model on the calibration data): keep the most sensitive layers in float until it is met")
    q.add_argument("--no-float16-params", action="store_true", help="log/lut: keep biases and normalization parameters in float32 (by default they are stored as float16 where that is within 2^-11)")
    q.add_argument("--no-code-tables", action="store_true", help="log/lut: keep Gather tables (embeddings) in float (by default large ones are coded like weights)")
    q.add_argument("--weight-rounding", choices=("nearest", "gptq"), help="int8 weight codes: nearest (default; each weight rounded alone) or gptq (error-compensating rounding that keeps each layer's output on the calibration data: 15-22%% lower output error, up to 4x the quantize time on the bench models)")
    q.add_argument("--sensitivity", action="store_true", help="measure each quantized layer's effect on the output on the calibration data and rank them in the report (one run per layer; always on with --max-error)")
    p.add_argument("--permute", action="store_true", help="permute each layer's input channels (absorbed into the producing layer, so the function is unchanged) to keep more weight under plain N:M")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="keep layers dense whose node or weight name matches GLOB (repeatable)")
    p.add_argument("--version", action="version", version=f"nmcompile {__version__}")
    _add_common(p)
    return p


def _inspect_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nmcompile inspect", description="Per-layer sparsity of a model and the N:M patterns its weights already follow.")
    p.add_argument("model", help="ONNX model to inspect")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_common(p)
    return p


def refuse_unused_options(args) -> None:
    """An option the rest of the command line makes do nothing is a mistake to say, not to
    ignore: the user expects it to change the output."""
    pruning = str(args.pattern).strip().lower() != "none"
    coded = args.quantize in ("log", "lut")
    unused = [
        ("--bits", args.bits is not None and not coded, "it sets the code width of --quantize log/lut (int8 is 8 bits)"),
        ("--calib-method", args.calib_method is not None and args.quantize != "int8", "it chooses activation thresholds for --quantize int8"),
        ("--weight-rounding", args.weight_rounding is not None and args.quantize != "int8", "it rounds the weights of --quantize int8"),
        ("--no-float16-params", args.no_float16_params and not coded, "it applies to --quantize log/lut"),
        ("--no-code-tables", args.no_code_tables and not coded, "it applies to --quantize log/lut"),
        ("--solver", args.solver is not None and not args.transposable, "it picks the --transposable mask solver"),
        ("--no-adaprune", args.no_adaprune and args.calib is None, "the re-fit runs only with --calib"),
        ("--stats-budget", args.stats_budget is not None and args.calib is None, "statistics are taken only with --calib"),
    ]
    unused += [(flag, used and not pruning, "it shapes the N:M pruning, which --pattern none turns off")
               for flag, used in (("--sequential", args.sequential), ("--transposable", args.transposable),
                                  ("--permute", args.permute), ("--mask-score", args.mask_score is not None),
                                  ("--sequential-calib", args.sequential_calib), ("--no-adaprune", args.no_adaprune),
                                  ("--stats-budget", args.stats_budget is not None))]
    for flag, is_unused, why in unused:
        if is_unused:
            raise UserError(f"{flag} would change nothing here: {why}")


def run_compile(args) -> int:
    from .pipeline import compile_model
    from .summary import format_summary

    refuse_unused_options(args)
    result = compile_model(
        args.model,
        output=args.output,
        pattern=args.pattern,
        sequential=args.sequential,
        transposable=args.transposable,
        solver=args.solver or "auto",
        exclude=args.exclude,
        progress=not args.quiet and sys.stderr.isatty(),
        calib=args.calib,
        calib_batch=args.calib_batch,
        adaprune=not args.no_adaprune,
        mask_score=args.mask_score,
        sequential_calib=args.sequential_calib,
        calib_table=args.calib_table,
        permute=args.permute,
        quantize=args.quantize,
        bits=4 if args.bits is None else args.bits,
        calib_method=args.calib_method or "minmax",
        max_error=args.max_error,
        stats_budget_mb=args.stats_budget,
        sensitivity=args.sensitivity,
        float16_params=not args.no_float16_params,
        quantize_tables=not args.no_code_tables,
        weight_rounding=args.weight_rounding or "nearest",
    )
    if not args.quiet:
        print(format_summary(result))
    return 0


def run_inspect(args) -> int:
    from .inspect import format_inspect, inspect_model

    result = inspect_model(args.model)
    print(json.dumps(result, indent=2) if args.json else format_inspect(result))
    return 0


def _quiet_libraries() -> None:
    """ONNX Runtime's own log lines (warnings, and errors that reach us as exceptions
    anyway) and numpy's overflow warnings from data it cannot sum would drown our
    one-line messages."""
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)
    except Exception:  # pragma: no cover - onnxruntime is a dependency
        pass


class Terminated(BaseException):
    """SIGTERM / SIGHUP (a container or service stop): unwinds like Ctrl-C, so the
    temporary output files are removed on the way out."""


def _on_terminate(signum, frame):
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _on_terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str]) -> int:
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="nmcompile: %(message)s", stream=sys.stderr)
    if not debug:
        _quiet_libraries()
    try:
        verb = argv[0] if argv and argv[0] in VERBS else "compile"
        rest = argv[1:] if argv and argv[0] in VERBS else argv
        if verb == "compile":
            args = _compile_parser("nmcompile").parse_args(rest)
            return run_compile(args)
        if verb == "inspect":
            return run_inspect(_inspect_parser().parse_args(rest))
        from . import cli_runtime

        return cli_runtime.main(verb, rest)
    except UserError as exc:
        print(f"nmcompile: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nmcompile: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print("nmcompile: terminated", file=sys.stderr)
        return 128 + int(exc.args[0])
    except BrokenPipeError:  # `nmcompile inspect ... | head`: the reader has all it wanted
        # Python would report the pipe again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # internal error: short by default
        if debug:
            traceback.print_exc()
        msg = str(exc).splitlines()[0] if str(exc) else ""
        print(f"nmcompile: internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
