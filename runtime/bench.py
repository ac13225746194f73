"""Latency and throughput of a compiled model, side by side with its original.

Measurements run both models in the same process, with the same inputs and
session settings, alternating between them in rounds (compiled first in even
rounds, baseline first in odd ones) so that a noisy machine slows both alike.
Quote medians and ratios, not single numbers. Latencies are wall-clock times
of ``session.run`` including host<->device copies on GPU providers.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from nmcompile.errors import UserError

from .providers import baseline_config
from .session import create_session, load, read_config

__all__ = [
    "input_specs",
    "make_inputs",
    "conform_feed",
    "bench_session",
    "bench_models",
    "format_bench_table",
]

log = logging.getLogger("nmcompile")

# Values chosen for symbolic dimensions other than the first (batch) one,
# by a substring of the dimension's name; anything else gets 1.
_NAMED_DIMS = (
    (("seq", "len", "token", "time", "step"), 128),
    (("height", "width"), 224),
)


def _load_header(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise UserError(f"model not found: {path}")
    try:
        # Only the graph's inputs are needed: leave external weights on disk.
        return onnx.load(path, load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends
        raise UserError(f"cannot read ONNX model {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None


def input_specs(model) -> list[tuple[str, np.dtype, list]]:
    """The model's real inputs (initializers excluded) as ``(name, numpy dtype,
    dims)``; a dim is an int, a symbolic name (str) or None (unknown)."""
    proto = _load_header(model)
    inits = {t.name for t in proto.graph.initializer}
    specs = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise UserError(f"input {vi.name!r} is not a tensor; nmcompile cannot feed it")
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            raise UserError(f"input {vi.name!r} has an unsupported element type {tt.elem_type}") from None
        dims: list = []
        if tt.HasField("shape"):
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param"):
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
        specs.append((vi.name, dtype, dims))
    return specs


def _concrete_dims(name, dims, batch_size, dim_overrides) -> list[int]:
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, int) and d > 0:
            out.append(d)
            continue
        if isinstance(d, str) and dim_overrides and d in dim_overrides:
            out.append(int(dim_overrides[d]))
            continue
        if i == 0:
            out.append(int(batch_size))
            continue
        value = 1
        if isinstance(d, str):
            low = d.lower()
            for keys, v in _NAMED_DIMS:
                if any(k in low for k in keys):
                    value = v
                    break
        if (name, i, d, value) not in _TOLD:  # once per process, not once per generated batch
            _TOLD.add((name, i, d, value))
            log.info("input %s: dimension %d (%s) set to %d", name, i, d or "unknown", value)
        out.append(value)
    return out


_TOLD: set = set()


def _generate(name, dtype, shape, rng) -> np.ndarray:
    low = name.lower()
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        if "mask" in low:
            return np.ones(shape, dtype=dtype)
        if "position" in low and len(shape) >= 1:
            return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        # Small values: valid indices for any embedding table with >= 2 rows.
        return rng.integers(0, 2, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if np.issubdtype(dtype, np.complexfloating):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    raise UserError(f"cannot generate data for input {name!r} of type {dtype}")


def _cast(name, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == dtype:
        return arr
    same_kind = (
        (np.issubdtype(arr.dtype, np.floating) and np.issubdtype(dtype, np.floating))
        or (np.issubdtype(arr.dtype, np.integer) and np.issubdtype(dtype, np.integer))
        or (arr.dtype == np.bool_ and dtype == np.bool_)
    )
    if not same_kind:
        raise UserError(f"input {name!r}: data of type {arr.dtype} does not match the model's {dtype}")
    return arr.astype(dtype)


def _take_rows(arr: np.ndarray, rows: int, offset: int = 0) -> np.ndarray:
    n = arr.shape[0]
    if n == 0:
        raise UserError("calibration data has no samples")
    idx = (np.arange(rows) + offset) % n  # slice, or repeat when there are fewer samples
    return arr[idx]


def make_inputs(
    model_path_or_proto,
    batch_size: int,
    calib_data: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    *,
    dim_overrides: Mapping[str, int] | None = None,
    offset: int = 0,
) -> dict[str, np.ndarray]:
    """One feed for the model, with ``batch_size`` samples.

    With ``calib_data`` (input name -> array of samples stacked on axis 0, as in
    a calibration ``.npz``): samples ``offset .. offset+batch_size`` (wrapping
    around, so fewer samples than the batch are repeated), cast to the input's
    type (float to float, int to int). A missing input, a rank or fixed-dimension
    mismatch raise ``UserError``; extra arrays are ignored (logged).

    Without it: generated data (seeded): normal floats; for integer inputs ones
    when the name contains "mask", 0..L-1 for "position", else 0/1 (valid
    indices for any embedding). Symbolic dimensions: the first one is the batch
    (``batch_size``); others come from ``dim_overrides`` (by name), else 128 for
    names with seq/len/token/time/step, 224 for height/width, else 1 (logged).
    A fixed first dimension wins over ``batch_size``.
    """
    if int(batch_size) < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    specs = input_specs(model_path_or_proto)
    feed: dict[str, np.ndarray] = {}
    if calib_data is not None:
        extra = sorted(set(calib_data) - {s[0] for s in specs})
        if extra:
            log.info("calibration data: ignoring arrays that are not model inputs: %s", ", ".join(extra))
        for name, dtype, dims in specs:
            if name not in calib_data:
                raise UserError(f"calibration data has no array for model input {name!r}")
            arr = np.asarray(calib_data[name])
            if dims and arr.ndim != len(dims):
                raise UserError(
                    f"calibration data for input {name!r} has rank {arr.ndim}, the model expects "
                    f"{len(dims)} (samples stacked on the first axis)"
                )
            if arr.ndim == 0:
                raise UserError(f"calibration data for input {name!r} is a scalar, not a batch of samples")
            for i, d in enumerate(dims[1:], start=1):
                if isinstance(d, int) and d > 0 and arr.shape[i] != d:
                    raise UserError(
                        f"calibration data for input {name!r} has shape {list(arr.shape)}, the model "
                        f"expects dimension {i} to be {d}"
                    )
            rows = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else int(batch_size)
            feed[name] = np.ascontiguousarray(_cast(name, _take_rows(arr, rows, offset), dtype))
        return feed
    rng = np.random.default_rng(seed)
    for name, dtype, dims in specs:
        shape = _concrete_dims(name, dims, batch_size, dim_overrides)
        feed[name] = _generate(name, dtype, tuple(shape), rng)
    return feed


def conform_feed(session, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feed`` restricted to the session's inputs and cast to their types;
    ``UserError`` when an input is missing."""
    out = {}
    for inp in session.get_inputs():
        if inp.name not in feed:
            raise UserError(f"no data for model input {inp.name!r}")
        arr = np.asarray(feed[inp.name])
        dtype = _ort_type_to_dtype(inp.type)
        out[inp.name] = _cast(inp.name, arr, dtype) if dtype is not None else arr
    return out


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def _ort_type_to_dtype(t: str):
    d = _ORT_TYPES.get(t)
    return np.dtype(d) if d is not None else None


def _batch_of(feed: Mapping[str, np.ndarray]) -> int:
    for arr in feed.values():
        if np.ndim(arr) >= 1:
            return int(np.shape(arr)[0])
    return 1


def _time_runs(session, feed, count: int) -> list[float]:
    times = []
    run = session.run
    clock = time.perf_counter
    for _ in range(count):
        t0 = clock()
        run(None, feed)
        times.append((clock() - t0) * 1e3)
    return times


def _summarize(latencies_ms: Sequence[float], batch: int) -> dict:
    a = np.asarray(latencies_ms, dtype=np.float64)
    mean = float(a.mean())
    return {
        "batch_size": int(batch),
        "iterations": int(a.size),
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": mean,
        "std_ms": float(a.std()),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
        "throughput": float(batch * 1e3 / mean) if mean > 0 else math.inf,
    }


def bench_session(
    session,
    inputs: Mapping[str, np.ndarray],
    warmup: int = 10,
    iterations: int = 100,
    *,
    batch_size: int | None = None,
) -> dict:
    """Time ``session.run`` on ``inputs``: ``warmup`` untimed runs, then
    ``iterations`` timed ones.

    Returns ``{"batch_size", "iterations", "p50_ms", "p90_ms", "p99_ms",
    "mean_ms", "std_ms", "min_ms", "max_ms", "throughput"}``; throughput is
    samples per second (batch size / mean latency). ``batch_size`` defaults to
    the first dimension of the first input.
    """
    if iterations < 1:
        raise UserError(f"iterations must be >= 1, got {iterations}")
    feed = conform_feed(session, inputs)
    batch = int(batch_size) if batch_size is not None else _batch_of(feed)
    _time_runs(session, feed, max(0, int(warmup)))
    return _summarize(_time_runs(session, feed, int(iterations)), batch)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _short(providers: Sequence[str]) -> str:
    return "+".join(p.replace("ExecutionProvider", "") for p in providers)


def bench_models(
    model,
    baseline=None,
    batch_sizes: Sequence[int] = (1,),
    threads: int | None = None,
    warmup: int = 10,
    iterations: int = 100,
    calib_data: Mapping[str, np.ndarray] | None = None,
    *,
    config_path=None,
    providers: Sequence | None = None,
    rounds: int = 5,
    seed: int = 0,
) -> list[dict]:
    """Benchmark a compiled model, and its original when ``baseline`` is given.

    The compiled model goes through :func:`nmcompile.runtime.session.load`
    (its ``.ep.json``; ``config_path``/``providers`` as there). The baseline
    runs on the same providers and session options with TensorRT's int8,
    sparsity and caches turned off (:func:`~nmcompile.runtime.providers.baseline_config`).
    ``threads`` sets ``intra_op_num_threads`` for both (None: ORT's default).

    For each batch size: one feed (:func:`make_inputs`, from ``calib_data`` when
    given) shared by both models; ``warmup`` runs each; then ``iterations`` timed
    runs each, split into ``rounds`` rounds that alternate which model goes first.

    Returns one row per (model, batch size): the :func:`bench_session` fields plus
    ``"model"`` ("compiled"/"baseline"), ``"path"`` (file name), ``"providers"``
    (those the session runs on) and, on compiled rows with a baseline,
    ``"ratio_p50"`` and ``"ratio_mean"`` = compiled / baseline latency (below 1 is faster).
    """
    if iterations < 1:
        raise UserError(f"iterations must be >= 1, got {iterations}")
    overrides = {"intra_op_num_threads": int(threads)} if threads else {}
    comp = load(model, config_path, providers, **overrides)
    base = None
    if baseline is not None:
        cfg = read_config(model, config_path)
        bcfg = baseline_config(cfg) if cfg is not None else None
        base = create_session(
            baseline,
            bcfg,
            providers,
            label=f"{os.path.basename(os.fspath(baseline))} (baseline)",
            **overrides,
        )
        mine = [(i.name, len(i.shape or [])) for i in comp.get_inputs()]
        theirs = [(i.name, len(i.shape or [])) for i in base.get_inputs()]
        if sorted(mine) != sorted(theirs):
            def show(ins):
                return ", ".join(f"{n} (rank {r})" for n, r in ins)
            raise UserError(f"the baseline takes inputs {show(theirs)}, the model {show(mine)}: "
                            "--baseline is the original of the model being timed")
    rounds = max(1, min(int(rounds), int(iterations)))
    rows: list[dict] = []
    for bs in batch_sizes:
        feed = make_inputs(model, int(bs), calib_data, seed)
        runs = [("compiled", model, comp, conform_feed(comp, feed))]
        if base is not None:
            runs.append(("baseline", baseline, base, conform_feed(base, feed)))
        lat: dict[str, list[float]] = {r[0]: [] for r in runs}
        try:
            for _, _, sess, f in runs:
                _time_runs(sess, f, max(0, int(warmup)))
            for r, count in enumerate(_split(int(iterations), rounds)):
                order = runs if r % 2 == 0 else runs[::-1]
                for label, _, sess, f in order:
                    lat[label].extend(_time_runs(sess, f, count))
        except Exception as exc:  # onnxruntime's own exception types: the inputs do not fit
            msg = str(exc).strip().splitlines()
            raise UserError(f"inference failed: {msg[0] if msg else type(exc).__name__}") from None
        batch = _batch_of(runs[0][3])
        stats = {}
        for label, path, sess, _ in runs:
            row = {"model": label, "path": os.path.basename(os.fspath(path))}
            row.update(_summarize(lat[label], batch))
            row["providers"] = list(sess.get_providers())
            row["threads"] = int(threads) if threads else None
            stats[label] = row
        if "baseline" in stats:
            c, b = stats["compiled"], stats["baseline"]
            c["ratio_p50"] = c["p50_ms"] / b["p50_ms"] if b["p50_ms"] > 0 else math.nan
            c["ratio_mean"] = c["mean_ms"] / b["mean_ms"] if b["mean_ms"] > 0 else math.nan
        rows.extend(stats[label] for label, *_ in runs)
    return rows


def _fmt(v, spec=".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    return format(v, spec)


def format_bench_table(rows: Sequence[Mapping]) -> str:
    """A plain-text table of :func:`bench_models` rows for the terminal."""
    header = ["model", "batch", "providers", "p50 ms", "p90 ms", "p99 ms", "mean ms", "samples/s", "p50 ratio"]
    body = []
    for r in rows:
        ratio = r.get("ratio_p50")
        body.append(
            [
                str(r.get("model", "")),
                str(r.get("batch_size", "")),
                _short(r.get("providers", [])),
                _fmt(r.get("p50_ms")),
                _fmt(r.get("p90_ms")),
                _fmt(r.get("p99_ms")),
                _fmt(r.get("mean_ms")),
                _fmt(r.get("throughput"), ".1f"),
                (_fmt(ratio, ".2f") + "x") if ratio is not None else "",
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    left = {0, 2}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    if any(r.get("ratio_p50") is not None for r in rows):
        out.append("p50 ratio = compiled p50 / baseline p50 in the same run (below 1.00x is faster).")
    iters = sorted({r.get("iterations") for r in rows if r.get("iterations")})
    if iters:
        out.append(f"{', '.join(map(str, iters))} timed runs per row; latencies include host<->device copies.")
    return "\n".join(out)
