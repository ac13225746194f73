"""compile(): load -> canonicalize -> pass pipeline -> emit, the Python face of the CLI."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nmcompile.passes.adaprune import (
    MASK_SCORES,
    Calibrate,
    SequentialCalibration,
)
from nmcompile.passes.base import CompileContext, PassManager
from nmcompile.passes.canonicalize import canonicalize_passes
from nmcompile.passes.quantize import Quantize
from nmcompile.passes.targets import FindTargets

from . import graphio
from .errors import UserError
from .patterns import Pattern, parse_pattern


@dataclass
class CompileOptions:
    pattern: Pattern | None = field(default_factory=lambda: Pattern(2, 4))
    sequential: bool = False
    transposable: bool = False
    solver: str = "auto"
    exclude: tuple[str, ...] = ()
    progress: bool = False
    calib: str | None = None
    calib_batch: int = 32
    adaprune: bool = True
    mask_score: str | None = None  # None: obs with --calib, magnitude without
    sequential_calib: bool = False
    damp: float = 0.01
    stats_budget_mb: float | None = None  # None: as much as the model's weights (64-512 MiB)
    quant_sensitivity: bool | None = None  # None: measured only when max_error needs it
    calib_table: bool = False
    permute: bool = False
    quantize: str | None = None
    bits: int = 4
    calib_method: str = "minmax"
    max_error: float | None = None
    float16_params: bool = True  # log / lut: biases and norm parameters stored as float16 where within 2^-11
    quantize_tables: bool = True  # log / lut: code large Gather tables (embeddings) like weights
    weight_rounding: str = "nearest"  # int8: nearest, or gptq (error-compensating, from the calibration Grams)

    def __post_init__(self) -> None:
        """Option combinations that cannot work are the user's to fix: fail before any work."""
        if isinstance(self.pattern, str):
            self.pattern = parse_pattern(self.pattern)
        if self.solver not in ("exact", "approx", "auto"):
            raise UserError(f"solver {self.solver!r}: expected exact, approx or auto")
        if self.transposable and self.sequential:
            raise UserError("--transposable and --sequential cannot be combined")
        if self.stats_budget_mb is not None and not self.stats_budget_mb > 0:
            raise UserError("--stats-budget must be a positive number of MiB")
        if self.calib_batch < 1:
            raise UserError("--calib-batch must be at least 1")
        if self.mask_score is None:
            self.mask_score = MASK_SCORES[0] if self.calib is not None else "magnitude"
        if self.mask_score not in MASK_SCORES:
            raise UserError(f"--mask-score {self.mask_score!r}: expected one of {', '.join(MASK_SCORES)}")
        needs_calib = {
            "--mask-score " + self.mask_score: self.mask_score != "magnitude",
            "--sequential-calib": self.sequential_calib,
            "--calib-table": self.calib_table,
            "--quantize int8": self.quantize == "int8",
        }
        for flag, used in needs_calib.items():
            if used and self.calib is None:
                raise UserError(f"{flag} needs --calib DATA")
        if self.quantize not in (None, "int8", "log", "lut"):
            raise UserError(f"--quantize {self.quantize!r}: expected int8, log or lut")
        if self.max_error is not None and not self.max_error > 0:
            raise UserError("--max-error must be a positive number")
        if self.max_error is not None and self.quantize is None:
            raise UserError("--max-error needs --quantize")
        if self.quant_sensitivity and self.quantize is None:
            raise UserError("--sensitivity needs --quantize")
        if self.quant_sensitivity and self.calib is None:
            raise UserError("--sensitivity needs --calib DATA (it measures each layer on the data)")
        if self.calib_table and self.quantize == "int8":
            raise UserError("--calib-table is for implicit int8 builds of a float model; --quantize int8 writes explicit QDQ instead")

    def describe(self) -> dict:
        return {
            "pattern": str(self.pattern) if self.pattern else "none",
            "sequential": self.sequential,
            "transposable": self.transposable,
            "solver": self.solver,
            "permute": self.permute,
            "quantize": None
            if self.quantize is None
            else {"mode": self.quantize, "bits": 8 if self.quantize == "int8" else self.bits, "calib_method": self.calib_method, "max_error": self.max_error}
            | ({"weight_rounding": self.weight_rounding} if self.quantize == "int8" else {"float16_params": self.float16_params, "quantize_tables": self.quantize_tables}),
            "exclude": list(self.exclude),
            "calibration": None
            if self.calib is None
            else {
                "data": Path(self.calib).name,
                "batch": self.calib_batch,
                "adaprune": self.adaprune,
                "mask_score": self.mask_score,
                "sequential": self.sequential_calib,
                "damp": self.damp,
            },
        }


@dataclass
class OutputPaths:
    model: Path
    report: Path
    ep: Path

    @classmethod
    def for_output(cls, output: Path) -> "OutputPaths":
        stem = output.name[: -len(".onnx")] if output.name.endswith(".onnx") else output.name
        return cls(output, output.with_name(stem + ".report.json"), output.with_name(stem + ".ep.json"))

    def all(self) -> list[Path]:
        return [self.model, self.model.with_name(self.model.name + ".data"), self.report, self.ep]


@dataclass
class CompileResult:
    paths: OutputPaths
    report: dict
    data_path: Path | None
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # per-layer re-fit seconds (not in the report: it is byte-stable)


def default_output(model_path: Path) -> Path:
    name = model_path.name
    stem = name[: -len(".onnx")] if name.endswith(".onnx") else name
    return model_path.with_name(stem + ".nm.onnx")


def check_output_paths(loaded: graphio.LoadedModel, out: OutputPaths, calib: str | None = None) -> None:
    """Refuse outputs that would overwrite the input, its data or the calibration data,
    that a folder stands in the way of, or that cannot be written."""
    inputs = {os.path.realpath(loaded.path)}
    for tensor in graphio.iter_tensors(loaded.model):
        if graphio.is_external(tensor):
            inputs.add(os.path.realpath(loaded.base_dir / graphio.external_ref(tensor).location))
    if calib is not None:
        calib_path = Path(calib)
        inputs.add(os.path.realpath(calib_path))
        if calib_path.is_dir():
            inputs |= {os.path.realpath(p) for p in calib_path.iterdir()}
    for path in out.all():
        if os.path.realpath(path) in inputs:
            raise UserError(f"output {path} would overwrite an input; choose another -o")
        if path.is_dir():
            raise UserError(f"output {path} is a folder; -o names the model file to write")
    folder = out.model.parent
    if not folder.is_dir():
        raise UserError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"output folder {folder} is not writable")


def build_pipeline(options: CompileOptions) -> PassManager:
    pruning = options.pattern is not None
    calibrated = pruning and options.calib is not None
    passes = canonicalize_passes() + [FindTargets()]
    if options.quantize == "int8":
        from nmcompile.passes.opset import UpgradeOpset
        from nmcompile.passes.quantize import INT8_OPSET

        passes.insert(0, UpgradeOpset(INT8_OPSET))  # first: the converter returns a new graph
    if pruning and options.permute:
        from nmcompile.passes.permute import PermuteChannels  # numba kernels: only with --permute

        passes.append(PermuteChannels())  # before statistics: they must see the permuted channels
    if calibrated and options.sequential_calib:
        passes.append(SequentialCalibration(options.mask_score, options.adaprune, options.damp))
    elif calibrated:
        passes.append(Calibrate(options.mask_score, options.adaprune, options.damp, None if options.stats_budget_mb is None else int(options.stats_budget_mb * 2**20)))
    elif pruning:
        from nmcompile.passes.nm_mask import NMMask

        passes.append(NMMask())
    if not pruning:
        from nmcompile.passes.nm_mask import RecordExistingPatterns

        passes.append(RecordExistingPatterns())  # before quantization recodes the weights
    if options.quantize is not None:
        passes.append(Quantize())
    return PassManager(passes, given=("calib_batches",) if options.calib is not None else ())


def calibration_batches(loaded: graphio.LoadedModel, options: CompileOptions, notes: list[str] | None = None):
    """A callable giving a fresh pass over the calibration batches (validated up front).
    A fixed batch dimension wins over ``calib_batch``: the options then record the size
    that ran, and ``notes`` the samples a fixed size leaves over."""
    from .calibdata import iter_batches, load_calibration, pop_labels, validate_calibration

    data = load_calibration(options.calib)
    pop_labels(loaded.model, data)  # verify's class indices: the same file serves both
    validate_calibration(loaded.model, data)
    batches = iter_batches(loaded.model, data, options.calib_batch)
    options.calib_batch = batches.batch_size
    samples = min((a.shape[0] for a in data.values()), default=0)
    if notes is not None and batches.stop < samples:
        notes.append(f"{samples - batches.stop} of {samples} calibration samples left out: "
                     f"the model takes batches of exactly {batches.batch_size}")
    return lambda: batches


def compile_model(
    model: str | os.PathLike,
    output: str | os.PathLike | None = None,
    pattern: str | Pattern | None = "2:4",
    sequential: bool = False,
    exclude: tuple[str, ...] | list[str] = (),
    progress: bool = False,
    transposable: bool = False,
    solver: str = "auto",
    calib: str | os.PathLike | None = None,
    calib_batch: int = 32,
    adaprune: bool = True,
    mask_score: str | None = None,
    sequential_calib: bool = False,
    calib_table: bool = False,
    permute: bool = False,
    quantize: str | None = None,
    bits: int = 4,
    calib_method: str = "minmax",
    max_error: float | None = None,
    stats_budget_mb: float | None = None,
    sensitivity: bool = False,
    float16_params: bool = True,
    quantize_tables: bool = True,
    weight_rounding: str = "nearest",
) -> CompileResult:
    """Compile MODEL to OUTPUT (default MODEL.nm.onnx): the same as `nmcompile MODEL --pattern ...`."""
    start = time.perf_counter()
    options = CompileOptions(
        pattern=parse_pattern(pattern) if isinstance(pattern, str) or pattern is None else pattern,
        sequential=sequential,
        transposable=transposable,
        solver=solver,
        exclude=tuple(exclude),
        progress=progress,
        calib=str(calib) if calib is not None else None,
        calib_batch=calib_batch,
        adaprune=adaprune,
        mask_score=mask_score,
        sequential_calib=sequential_calib,
        calib_table=calib_table,
        permute=permute,
        quantize=quantize,
        bits=bits,
        calib_method=calib_method,
        max_error=max_error,
        stats_budget_mb=stats_budget_mb,
        quant_sensitivity=True if sensitivity else None,
        float16_params=float16_params,
        quantize_tables=quantize_tables,
        weight_rounding=weight_rounding,
    )
    model_path = Path(model)
    if output is not None and not str(output).strip():
        raise UserError("-o needs a file name for the compiled model")
    loaded = graphio.load_model(model_path)
    out_model = Path(output) if output is not None else default_output(model_path)
    paths = OutputPaths.for_output(out_model)
    check_output_paths(loaded, paths, options.calib)

    ctx = CompileContext(model=loaded, options=options)
    if options.calib is not None:
        ctx.artifacts["calib_batches"] = calibration_batches(loaded, options, ctx.notes)
    build_pipeline(options)(ctx)
    report = build_report(ctx, model_path)
    if not report["layers"] and any(n.domain == "nmcompile" for n in loaded.model.graph.node):
        # a --quantize log/lut output: its weights are codes behind decode functions
        raise UserError(f"{model_path}: its weights are coded by an earlier nmcompile --quantize log/lut "
                        "(decode functions), so there is nothing left to prune or quantize; compile the original model")

    from nmcompile.runtime.providers import provider_config

    table = None
    if options.calib_table:
        from nmcompile.runtime.calib_table import (
            collect_ranges,
            format_calibration_table,
        )

        table_name = paths.model.name.removesuffix(".onnx") + ".calibration.cache"
        table_text, _ = format_calibration_table(collect_ranges(loaded, ctx.artifacts["calib_batches"]()))
        table = (paths.model.parent / "trt_cache" / table_name, table_text)
    # the sparsity TensorRT may use is what the weights follow, not what was asked for
    pattern = options.pattern if report["totals"]["pruned_layers"] else None
    if options.pattern is None:  # a model pruned before: enabled when a layer's weights qualify
        existing = ctx.artifacts.get("existing_n4", {})
        qualified = [existing[row["name"]] for row in report["layers"] if row["trt_sparse"]["eligible"] and row["name"] in existing]
        pattern = Pattern(max(qualified), 4) if qualified else None
    ep = provider_config(
        pattern=(pattern.n, pattern.m) if pattern else None,
        sequential=options.sequential,
        transposable=options.transposable,
        quantization=options.quantize,
        model_filename=paths.model.name,
        calibration_table=table[0].name if table else None,
    )
    try:
        with graphio.AtomicWriter() as writer:
            saved = graphio.save_model(loaded, paths.model, writer)
            report["totals"]["output_file_bytes"] = saved.model_bytes + saved.data_bytes
            report["outputs"] = {
                "model": paths.model.name,
                "external_data": saved.data_path.name if saved.data_path else None,
                "ep_config": paths.ep.name,
            }
            if table:
                report["outputs"]["calibration_table"] = f"{table[0].parent.name}/{table[0].name}"
                table[0].parent.mkdir(exist_ok=True)
                writer.write_bytes(table[0], table[1].encode())
            writer.write_bytes(paths.report, dumps(report))
            writer.write_bytes(paths.ep, dumps(ep))
    except OSError as exc:
        raise UserError(f"cannot write {exc.filename or paths.model.parent}: {exc.strerror or exc}") from None
    return CompileResult(paths, report, saved.data_path, time.perf_counter() - start, dict(ctx.timings))


def dumps(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode()


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(type(obj))


def trt_row(target, pattern: Pattern | None, precision: str) -> dict:
    """Whether TensorRT's sparse kernels can take this layer, by the rule runtime.providers states."""
    from nmcompile.runtime.providers import trt_sparse_eligibility

    use = target.primary
    shape = use.eff_shape
    if use.op == "Conv":
        out_c, in_c, kernel = shape[0], shape[1] * use.groups, tuple(shape[2:])
    else:
        out_c, in_c, kernel = shape[use.out_axis], shape[use.red_axis], None
    ok, reason = trt_sparse_eligibility(
        use.op, out_c, in_c, kernel, (pattern.n, pattern.m) if pattern else None, precision, group=use.groups
    )
    return {"eligible": ok, "reason": reason}


def build_report(ctx: CompileContext, model_path: Path) -> dict:
    opts: CompileOptions = ctx.options
    layers = []
    total_w = total_zero = 0
    pruned_layers = skipped = 0
    kept_l1 = all_l1 = 0.0
    for target in ctx.artifacts["targets"]:
        use = target.primary
        extra = ctx.layers.get(target.name, {})
        size = int(np.prod(use.eff_shape, dtype=np.int64))
        if "zeros_after" in extra:
            zeros = extra["zeros_after"]
        else:
            stored = ctx.model.array(target.weight)
            zeros = int(stored.size - np.count_nonzero(stored))
        row = {
            "name": target.name,
            "op": target.op,
            "nodes": [u.node.name for u in target.uses],
            "weight": target.weight,
            "shape": list(use.eff_shape),
            "reduction_axis": use.red_axis,
            "reduction_length": use.reduction,
            "pattern": None if target.skip or opts.pattern is None else str(opts.pattern) + ("-seq" if opts.sequential else "-T" if extra.get("transposable") else ""),
            "sparsity": zeros / size if size else 0.0,
            "skipped": target.skip,
        }
        followed = opts.pattern
        if opts.pattern is None and target.name in ctx.artifacts.get("existing_n4", {}):
            followed = Pattern(ctx.artifacts["existing_n4"][target.name], 4)  # pruned before: what the weights follow
        row["trt_sparse"] = trt_row(target, None if target.skip else followed, "int8" if opts.quantize == "int8" else "fp16")
        for key in (
            "retained_l1",
            "retained_score",
            "retained_plain_nm",
            "transposable",
            "solver",
            "optimality",
            "zeros_before",
            "existing_pattern",
            "violations",
            "reconstruction_error_masked",
            "reconstruction_error_adaprune",
            "calibration_vectors",
            "calibration_warning",
            "damping",
            "shrinkage",
            "calibration",
            "permute",
            "quant",
        ):
            if key in extra:
                row[key] = extra[key]
        if target.notes:
            row["notes"] = list(target.notes)
        layers.append(row)
        total_w += size
        total_zero += zeros
        if target.skip:
            skipped += 1
        elif opts.pattern is not None:
            pruned_layers += 1
        kept, total = extra.get("_l1", (0.0, 0.0))
        kept_l1 += kept
        all_l1 += total
    return {
        "tool": "nmcompile",
        "input": model_path.name,
        "options": opts.describe(),
        "canonicalize": {"batchnorm_folded_into": ctx.artifacts.get("bn_folded", [])},
        "quantization": ctx.artifacts.get("quantization"),
        "layers": layers,
        "totals": {
            "layers": len(layers),
            "pruned_layers": pruned_layers,
            "skipped_layers": skipped,
            "target_weights": int(total_w),
            "target_zeros": int(total_zero),
            "target_sparsity": total_zero / total_w if total_w else 0.0,
            "retained_l1": kept_l1 / all_l1 if all_l1 > 0 else None,
        },
        "sensitivity_ranking": sorted(
            (
                {"name": row["name"], "error": row["reconstruction_error_adaprune"]}
                for row in layers
                if row.get("reconstruction_error_adaprune") is not None
            ),
            key=lambda r: -r["error"],
        ),
        "notes": list(ctx.notes),
    }
