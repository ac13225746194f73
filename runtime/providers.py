"""Execution-provider configuration for a compiled model (the ``OUT.ep.json`` file).

ONNX Runtime has no N:M sparse kernel on any execution provider: sparse
initializers are densified at load, and the CUDA and CPU providers run pruned
weights as ordinary dense weights. The only path from N:M sparsity to speed is
TensorRT's sparse weights (``trt_sparsity_enable`` in ONNX Runtime's TensorRT
execution provider, TensorRT's ``BuilderFlag::kSPARSE_WEIGHTS``), and TensorRT
takes a layer only when:

* its weights satisfy the 2:4 rule along the input channels: "for each output
  channel and for each spatial pixel in the kernel weights, every four input
  channels must have at least two zeros" (TensorRT Developer Guide, section
  "Structured Sparsity"), and
* FP16 or INT8 is enabled in the builder (same section), and
* TensorRT's timing finds the sparse kernel faster than the dense one: it times
  both and keeps the faster. NVIDIA's engineers report that sparse convolution
  kernels win only when the input and output channel counts are large enough,
  about 256 or more (NVIDIA/TensorRT issues #3849 and #4065), that a k×k
  convolution counts as k·k times the input channels (#3849), and that grouped
  convolutions are not considered for sparse kernels (#4054).

:func:`trt_sparse_eligibility` applies these rules to one layer;
:func:`provider_config` writes the provider list and options.

Option values are Python ``bool``/``int``/``str`` as ONNX Runtime documents for
its Python API ("for bool type options, assign them with True/False in
python"). ``onnxruntime.InferenceSession`` turns every value into ``str(value)``
and the TensorRT provider accepts exactly ``"True"``/``"true"``/``"False"``/
``"false"`` for booleans, so JSON ``true``/``false`` (read back as Python bools)
are accepted; strings such as ``"1"`` are not.

Paths in the configuration (``trt_engine_cache_path``, ``trt_timing_cache_path``)
are relative to the folder that holds the model. ONNX Runtime itself resolves a
relative path against the process's working directory, so
:func:`nmcompile.runtime.session.load` joins them with the model's folder
before creating the session; with plain ONNX Runtime, do the same (see
``README_DEPLOY.md``).
"""

from __future__ import annotations

import math
import os
import posixpath

from nmcompile.errors import UserError

__all__ = [
    "CONFIG_FORMAT_VERSION",
    "TRT",
    "CUDA",
    "CPU",
    "DEFAULT_MIN_CHANNELS",
    "PATH_OPTIONS",
    "provider_config",
    "trt_precision",
    "satisfies_trt_2_4",
    "trt_sparse_eligibility",
    "baseline_config",
    "config_path_for",
]

CONFIG_FORMAT_VERSION = 1

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

#: Channel count from which TensorRT's sparse kernels usually beat dense ones
#: (NVIDIA/TensorRT #3849, #4065).
DEFAULT_MIN_CHANNELS = 256

#: Provider options that hold a folder or file path relative to the model's folder.
PATH_OPTIONS = frozenset({"trt_engine_cache_path", "trt_timing_cache_path"})

_QUANTIZATIONS = ("int8", "log", "lut")

_RULE_SOURCE = (
    "TensorRT Developer Guide 'Structured Sparsity'; size rule: NVIDIA/TensorRT #3849, #4065"
)


def config_path_for(model_path: str | os.PathLike) -> str:
    """The provider configuration's path beside a model: ``foo.nm.onnx`` -> ``foo.nm.ep.json``."""
    p = os.fspath(model_path)
    if p.lower().endswith(".onnx"):
        return p[: -len(".onnx")] + ".ep.json"
    return p + ".ep.json"


def _check_pattern(pattern) -> tuple[int, int] | None:
    if pattern is None:
        return None
    parts = pattern.split(":") if isinstance(pattern, str) else pattern
    try:
        n, m = (int(v) for v in parts)
    except (TypeError, ValueError):
        raise UserError(f"invalid N:M pattern {pattern!r}: expected two integers (N, M)") from None
    if not (1 <= n <= m):
        raise UserError(f"invalid N:M pattern {n}:{m}: need 1 <= N <= M")
    return n, m


def satisfies_trt_2_4(pattern) -> bool:
    """Whether every weight tensor pruned to ``pattern`` along the input channels
    also meets TensorRT's rule (at most 2 nonzeros in every aligned group of 4
    input channels, groups starting at channel 0).

    True for 2:4 and for patterns stricter than it (1:4, 1:2, 1:3, 2:8, 1:8, ...);
    false for 4:8, 3:4, 2:3, ... A group of M holding N nonzeros can put
    min(N, overlap) of them into an aligned block of 4, so the worst block over
    one period lcm(4, M) decides.
    """
    nm = _check_pattern(pattern)
    if nm is None:
        return False
    n, m = nm
    if n == m:  # dense
        return False
    period = 4 * m // math.gcd(4, m)
    for start in range(0, period, 4):
        worst = 0
        for g in range(start // m, (start + 3) // m + 1):  # groups overlapping [start, start+4)
            lo, hi = max(start, g * m), min(start + 4, (g + 1) * m)
            worst += min(n, hi - lo)
        if worst > 2:
            return False
    return True


def trt_precision(quantization: str | None) -> str:
    """The TensorRT precision :func:`provider_config` enables: ``"int8"`` for
    int8 QDQ models, ``"fp16"`` for everything else (float models and the
    weight-only ``log``/``lut`` models, whose weights are stored as float)."""
    return "int8" if quantization == "int8" else "fp16"


def _pattern_str(nm) -> str:
    return "dense" if nm is None else f"{nm[0]}:{nm[1]}"


def provider_config(
    *,
    pattern: tuple[int, int] | None,
    sequential: bool,
    transposable: bool,
    quantization: str | None,
    model_filename: str,
    cache_dir: str = "trt_cache",
    calibration_table: str | None = None,
    device_id: int = 0,
) -> dict:
    """The execution-provider configuration for a compiled model, as a JSON-ready dict.

    Returns ``{"format_version", "model", "compiled_with", "providers",
    "session_options", "notes"}`` where ``providers`` is
    ``[[name, options], ...]`` in priority order: TensorRT, CUDA, CPU (last).
    Pass it to ONNX Runtime as
    ``providers=[(name, options) for name, options in cfg["providers"]]``.

    TensorRT options:

    * ``trt_fp16_enable``: True (float models, and int8 models so that layers
      outside Q/DQ pairs run in fp16 rather than fp32).
    * ``trt_int8_enable``: True for ``quantization="int8"`` (explicit QDQ model;
      no calibration table: TensorRT 10.1 deprecated implicit calibration and
      TensorRT 11 removes it), or when a legacy ``calibration_table`` is given.
    * ``trt_sparsity_enable``: True when ``pattern`` meets TensorRT's 2:4 rule
      (2:4 itself, or a stricter pattern such as 1:4 or 2:8; see
      :func:`satisfies_trt_2_4`); a note says why otherwise.
    * ``trt_engine_cache_enable``/``trt_engine_cache_path`` and
      ``trt_timing_cache_enable``/``trt_timing_cache_path``: ``cache_dir``,
      a folder *relative to the model's folder* (``load()`` resolves it there).

    ``calibration_table`` (legacy, float models only): the file name of a
    TensorRT calibration cache written by
    :func:`nmcompile.runtime.calib_table.write_calibration_table` *inside*
    ``cache_dir`` (ONNX Runtime looks for it in ``trt_engine_cache_path``).

    The output depends only on the arguments (no absolute paths, no timestamps).
    ``model_filename`` is reduced to its base name.
    """
    nm = _check_pattern(pattern)
    if quantization is not None and quantization not in _QUANTIZATIONS:
        raise UserError(
            f"unknown quantization {quantization!r}: expected one of {', '.join(_QUANTIZATIONS)} or none"
        )
    model_name = posixpath.basename(os.fspath(model_filename).replace("\\", "/"))
    if not model_name:
        raise UserError(f"invalid model file name {model_filename!r}")
    cache = os.fspath(cache_dir).replace("\\", "/").rstrip("/")
    if (
        not cache
        or posixpath.isabs(cache)
        or os.path.isabs(os.fspath(cache_dir))
        or ".." in cache.split("/")
        or (len(cache) > 1 and cache[1] == ":")
    ):
        raise UserError(
            f"cache folder {cache_dir!r} must be a relative path inside the model's folder (no '..')"
        )
    if calibration_table is not None:
        if quantization == "int8":
            raise UserError(
                "a calibration table cannot be used with an int8 QDQ model: TensorRT refuses "
                "calibration tables when the model has Q/DQ nodes"
            )
        if not calibration_table or "/" in calibration_table or "\\" in calibration_table:
            raise UserError(
                f"calibration table {calibration_table!r} must be a plain file name inside {cache!r}"
            )

    notes: list[str] = []
    sparse = satisfies_trt_2_4(nm) if nm is not None else False
    int8 = quantization == "int8" or calibration_table is not None

    trt: dict = {
        "device_id": int(device_id),
        "trt_fp16_enable": True,
        "trt_int8_enable": bool(int8),
        "trt_sparsity_enable": bool(sparse),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
    }
    if calibration_table is not None:
        trt["trt_int8_calibration_table_name"] = calibration_table
        trt["trt_int8_use_native_calibration_table"] = True

    # --- sparsity ----------------------------------------------------------
    no_kernel = (
        "ONNX Runtime has no N:M sparse kernel on any provider: on the CUDA and CPU "
        "providers the pruned weights run as dense weights, at dense speed."
    )
    if nm is None:
        notes.append("Dense model: trt_sparsity_enable is off.")
    elif nm == (2, 4):
        notes.append(
            "2:4 along the input channels matches TensorRT's sparse-weight rule "
            "(every 4 input channels hold at least 2 zeros), so trt_sparsity_enable is on. "
            "TensorRT times sparse and dense kernels per layer and keeps the faster one; "
            "sparse kernels usually win only for layers with >= 256 input and output channels "
            "(NVIDIA/TensorRT #3849, #4065). See the report for which layers are eligible."
        )
    elif sparse:
        notes.append(
            f"{_pattern_str(nm)} is stricter than 2:4: every aligned group of 4 input channels "
            "holds at least 2 zeros, so TensorRT's 2:4 sparse kernels can take these weights "
            "and trt_sparsity_enable is on (the extra zeros give no extra speed: the kernels are 2:4)."
        )
    else:
        notes.append(
            f"trt_sparsity_enable is off: {_pattern_str(nm)} can leave more than 2 nonzeros in a "
            "group of 4 input channels, and TensorRT's sparse kernels only take 2:4 "
            "(at least 2 zeros in every 4 input channels). Re-compile with --pattern 2:4 "
            "(nmcompile re-fits an N:M model to 2:4) to use sparse tensor cores."
        )
    if nm is not None:
        notes.append(no_kernel)
    if transposable and nm is not None:
        notes.append(
            "Transposable masks make the transposed weights N:M as well; inference only uses "
            "the input-channel direction, so the runtime configuration is that of plain N:M."
        )
    if sequential:
        notes.append("Sequential mode changed how the masks were fitted, not how the model runs.")

    # --- precision ---------------------------------------------------------
    if quantization == "int8":
        notes.append(
            "int8: the model carries explicit QuantizeLinear/DequantizeLinear pairs, which "
            "TensorRT builds as int8 with trt_int8_enable; no calibration table is used "
            "(TensorRT 10.1 deprecated implicit calibration, TensorRT 11 removes it). "
            "trt_fp16_enable lets layers outside Q/DQ pairs run in fp16; turn it off if they need fp32."
        )
    elif quantization in ("log", "lut"):
        kind = "power-of-two (log)" if quantization == "log" else "k-means look-up-table"
        notes.append(
            f"{kind} weights are a weight-only compression: no provider has a kernel for them, "
            "so they run as float weights (fp16 in TensorRT); expect a smaller file, not more speed."
        )
        notes.append(
            "trt_fp16_enable rounds the weights to fp16 inside TensorRT; run nmcompile verify "
            "on the GPU to check the accuracy."
        )
    else:
        notes.append(
            "Float model: TensorRT builds it with trt_fp16_enable (sparse kernels need fp16 or int8); "
            "run nmcompile verify on the GPU to check the fp16 accuracy."
        )
    if calibration_table is not None:
        notes.append(
            f"Legacy implicit int8: TensorRT reads the calibration table {calibration_table!r} from "
            f"{cache!r} (trt_int8_use_native_calibration_table). TensorRT 10.1 deprecated "
            "calibration tables and TensorRT 11 removes them; prefer --quantize int8 (explicit QDQ)."
        )

    # --- caches ------------------------------------------------------------
    notes.append(
        f"TensorRT builds its engines when the session is created (this can take minutes) and "
        f"caches engines and timing in {cache!r}, relative to the folder holding {model_name!r}. "
        "nmcompile.runtime.load() resolves it there; with plain onnxruntime, join it with the "
        "model's folder yourself (ONNX Runtime resolves relative paths against the working "
        "directory). Delete the cache when the model, ONNX Runtime, TensorRT or the GPU changes."
    )
    notes.append(
        "Providers missing from the installed onnxruntime build are dropped by load(), "
        "which falls back to the next one (CPU last)."
    )

    return {
        "format_version": CONFIG_FORMAT_VERSION,
        "model": model_name,
        "compiled_with": {
            "pattern": _pattern_str(nm),
            "sequential": bool(sequential),
            "transposable": bool(transposable),
            "quantization": quantization,
            "trt_precision": "int8" if int8 else "fp16",
        },
        "providers": [
            [TRT, trt],
            [CUDA, {"device_id": int(device_id)}],
            [CPU, {}],
        ],
        "session_options": {"graph_optimization_level": "ORT_ENABLE_ALL"},
        "notes": notes,
    }


def baseline_config(cfg: dict) -> dict:
    """A configuration for running the *original* dense float model beside a
    compiled one on the same providers and session options: TensorRT keeps
    fp16 (the fastest dense float build) but loses int8, sparsity, the
    calibration table and the engine/timing caches (so nothing is written next
    to the original model)."""
    out = {k: v for k, v in cfg.items() if k != "providers"}
    providers = []
    for name, opts in cfg.get("providers", []):
        opts = dict(opts)
        if name == TRT:
            opts["trt_int8_enable"] = False
            opts["trt_sparsity_enable"] = False
            opts["trt_engine_cache_enable"] = False
            opts["trt_timing_cache_enable"] = False
            for key in (
                "trt_int8_calibration_table_name",
                "trt_int8_use_native_calibration_table",
                *PATH_OPTIONS,
            ):
                opts.pop(key, None)
        providers.append([name, opts])
    out["providers"] = providers
    out["notes"] = ["Baseline: the dense original model on the compiled model's providers."]
    return out


# ---------------------------------------------------------------------------
# per-layer eligibility
# ---------------------------------------------------------------------------

_CONV_OPS = {"Conv", "ConvInteger", "QLinearConv"}
_FC_OPS = {"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul"}


def trt_sparse_eligibility(
    op: str,
    out_channels: int,
    in_channels: int,
    kernel: tuple | None,
    pattern,
    precision: str | None,
    *,
    group: int = 1,
    min_channels: int = DEFAULT_MIN_CHANNELS,
) -> tuple[bool, str]:
    """Whether TensorRT's sparse kernels are expected to run this layer.

    Returns ``(eligible, reason)``; ``reason`` starts with ``"eligible:"`` or
    ``"not eligible:"`` and names the rule that decided.

    Arguments: ``op`` the ONNX op type (Conv, MatMul, Gemm); ``out_channels``
    and ``in_channels`` of the product as executed (Conv: O and I/group of the
    weight [O, I/g, kH, kW]; MatMul B [K, N]: in=K, out=N; Gemm: in=K);
    ``kernel`` the spatial kernel shape of a Conv (None for MatMul/Gemm);
    ``pattern`` (N, M) along the input channels or None; ``precision`` the
    TensorRT build precision ("fp16", "int8", "fp32", ...; see
    :func:`trt_precision`); ``group`` the Conv group count.

    The rule, in order:

    1. Op: convolution or fully-connected/MatMul with constant weights
       (TensorRT Developer Guide, "Structured Sparsity": "the convolution kernel
       weights and the fully connected weights"). Other ops: no.
    2. Precision: fp16 or int8 must be enabled (same section).
    3. Pattern: every aligned group of 4 input channels has at least 2 zeros
       ("for each output channel and for each spatial pixel in the kernel
       weights, every four input channels must have at least two zeros", same
       section): 2:4 or stricter (:func:`satisfies_trt_2_4`); the input channel
       count must be a multiple of lcm(4, M) (the guide's check assumes C % 4 == 0,
       and a partial tail group is not covered).
    4. Grouped/depthwise convolutions: no; TensorRT does not consider sparse
       kernels for them (NVIDIA/TensorRT #4054).
    5. Size: TensorRT times the sparse and the dense kernel and keeps the faster;
       sparse wins only when the input channels C (times kH·kW for a k×k
       convolution) and the output channels K are both about 256 or more
       (NVIDIA/TensorRT #3849, #4065: "sparsity only have benefit when
       convolution channels are large enough (256 or above)"). Smaller layers
       are reported as not eligible (TensorRT would keep them dense).

    This is a prediction, not a measurement: TensorRT's build log ("Layers
    eligible for sparse math" / "picked sparse implementation") is the truth.
    """
    op_name = str(op)
    if op_name in _CONV_OPS:
        kind = "conv"
    elif op_name in _FC_OPS:
        kind = "fc"
    else:
        return False, (
            f"not eligible: {op_name} is not a convolution or fully-connected/MatMul layer; "
            f"TensorRT's sparse weights cover only those ({_RULE_SOURCE})"
        )

    prec = (precision or "fp32").lower()
    if prec not in ("fp16", "int8", "half", "float16"):
        return False, (
            f"not eligible: TensorRT uses sparse weights only with fp16 or int8 enabled, "
            f"this layer builds as {prec} ({_RULE_SOURCE})"
        )

    if pattern is None:
        return False, "not eligible: dense weights (no N:M pattern)"
    n, m = _check_pattern(pattern)
    if not satisfies_trt_2_4((n, m)):
        return False, (
            f"not eligible: {n}:{m} can leave more than 2 nonzeros in a group of 4 input channels; "
            f"TensorRT's sparse kernels need at least 2 zeros in every 4 input channels (2:4) "
            f"({_RULE_SOURCE})"
        )

    out_c, in_c = int(out_channels), int(in_channels)
    align = 4 * m // math.gcd(4, m)
    if in_c % align:
        return False, (
            f"not eligible: {in_c} input channels is not a multiple of {align}; TensorRT's 2:4 rule "
            f"groups input channels by 4 from channel 0 and a partial group is not covered "
            f"({_RULE_SOURCE})"
        )

    spatial = 1
    if kind == "conv":
        if int(group) != 1:
            return False, (
                f"not eligible: grouped convolution (group={int(group)}); TensorRT does not "
                "consider sparse kernels for grouped or depthwise convolutions (NVIDIA/TensorRT #4054)"
            )
        if kernel:
            for k in kernel:
                spatial *= int(k)
            if len(kernel) > 2:
                return False, (
                    f"not eligible: {len(kernel)}-D convolution; TensorRT's documented sparse rule "
                    f"covers 2-D kernels [K, C, R, S] ({_RULE_SOURCE})"
                )
    eff_in = in_c * spatial
    if eff_in < min_channels or out_c < min_channels:
        what = f"C={in_c}" + (f" x {spatial} kernel taps = {eff_in}" if spatial > 1 else "")
        return False, (
            f"not eligible: too small ({what}, K={out_c}); TensorRT keeps the dense kernel unless "
            f"input (x kernel taps) and output channels are both >= {min_channels} "
            "(NVIDIA/TensorRT #3849, #4065)"
        )
    what = f"C={in_c}" + (f" x {spatial} taps = {eff_in}" if spatial > 1 else "")
    return True, (
        f"eligible: {n}:{m} meets TensorRT's 2:4 rule, {prec} enabled, {what} and K={out_c} "
        f">= {min_channels} ({_RULE_SOURCE}); TensorRT still times sparse vs dense and keeps the faster"
    )
