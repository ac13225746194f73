"""Load a compiled model into a configured ONNX Runtime session.

``load("foo.nm.onnx")`` reads ``foo.nm.ep.json`` beside the model (written by the
compile step from :func:`nmcompile.runtime.providers.provider_config`), keeps
the providers that the installed onnxruntime build has, resolves the cache
paths against the model's folder and applies the session options.

Path resolution: every provider option named in
:data:`nmcompile.runtime.providers.PATH_OPTIONS` (the TensorRT engine and
timing cache folders) that holds a relative path is joined with the folder of
the *model* (not the configuration file, not the working directory) and made
absolute. The folder is created when a provider that uses it is kept.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import onnxruntime as ort

from nmcompile.errors import UserError

from .providers import CPU, PATH_OPTIONS, config_path_for

__all__ = [
    "load",
    "read_config",
    "resolve_providers",
    "make_session_options",
    "create_session",
]

log = logging.getLogger("nmcompile")


def read_config(model_path, config_path=None) -> dict | None:
    """The provider configuration of a model: ``config_path`` when given (it
    must exist), else ``MODEL.ep.json`` beside the model, else None."""
    explicit = config_path is not None
    path = os.fspath(config_path) if explicit else config_path_for(model_path)
    if not os.path.exists(path):
        if explicit:
            raise UserError(f"provider configuration not found: {path}")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read provider configuration {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"provider configuration {path} is not valid JSON: {e}") from None
    _validate_config(cfg, path)
    return cfg


def _validate_config(cfg, where) -> None:
    if not isinstance(cfg, dict):
        raise UserError(f"provider configuration {where}: expected a JSON object")
    providers = cfg.get("providers")
    if not isinstance(providers, list) or not providers:
        raise UserError(f"provider configuration {where}: 'providers' must be a non-empty list")
    for entry in providers:
        _split_provider(entry, where)
    so = cfg.get("session_options", {})
    if not isinstance(so, dict):
        raise UserError(f"provider configuration {where}: 'session_options' must be an object")


def _split_provider(entry, where="providers") -> tuple[str, dict]:
    if isinstance(entry, str):
        return entry, {}
    if (
        isinstance(entry, (list, tuple))
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], Mapping)
    ):
        return entry[0], dict(entry[1])
    raise UserError(f"{where}: provider entries must be a name or [name, options], got {entry!r}")


def resolve_providers(
    cfg_or_providers,
    available: Iterable[str] | None = None,
    model_dir: str | os.PathLike | None = None,
) -> tuple[list[tuple[str, dict]], list[str]]:
    """Split a configuration's providers into those this onnxruntime build has
    and those it lacks.

    ``cfg_or_providers``: a configuration dict (its ``providers``) or a list of
    names / ``[name, options]`` pairs. ``available`` defaults to
    ``onnxruntime.get_available_providers()``. With ``model_dir``, relative
    cache paths of the kept providers are joined with it (absolute result).

    Returns ``(kept, dropped)``: ``kept`` as ``[(name, options), ...]`` in
    priority order, ready for ``InferenceSession(providers=kept)``;
    ``dropped`` the names left out. When nothing is kept, the CPU provider is
    added (it is in every build).
    """
    entries = (
        cfg_or_providers.get("providers", [])
        if isinstance(cfg_or_providers, Mapping)
        else cfg_or_providers
    )
    have = set(ort.get_available_providers() if available is None else available)
    kept: list[tuple[str, dict]] = []
    dropped: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        name, opts = _split_provider(entry)
        if name in seen:
            continue
        seen.add(name)
        if name not in have:
            dropped.append(name)
            continue
        opts = copy.deepcopy(opts)
        if model_dir is not None:
            for key in PATH_OPTIONS:
                if key in opts and isinstance(opts[key], str) and opts[key]:
                    if not os.path.isabs(opts[key]):
                        opts[key] = os.path.abspath(os.path.join(os.fspath(model_dir), opts[key]))
        kept.append((name, opts))
    if not kept:
        kept.append((CPU, {}))
    return kept, dropped


def _enum_value(enum_type, value, key):
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        name = value if value.startswith("ORT_") else "ORT_" + value.upper()
        if hasattr(enum_type, name):
            return getattr(enum_type, name)
        choices = ", ".join(n for n in dir(enum_type) if n.startswith("ORT_"))
        raise UserError(f"session option {key}={value!r}: expected one of {choices}")
    if isinstance(value, int):
        try:
            return enum_type(value)
        except (TypeError, ValueError):
            pass
    raise UserError(f"session option {key}={value!r} is not valid")


def make_session_options(options: Mapping | None = None, **overrides) -> ort.SessionOptions:
    """An ``onnxruntime.SessionOptions`` from a configuration's
    ``session_options`` plus keyword overrides (overrides win; a value of None
    means "leave the default").

    Keys: ``graph_optimization_level`` ("ORT_ENABLE_ALL", "ORT_ENABLE_EXTENDED",
    "ORT_ENABLE_BASIC", "ORT_DISABLE_ALL", or "all"/"extended"/...),
    ``execution_mode`` ("ORT_SEQUENTIAL"/"ORT_PARALLEL"), ``config_entries``
    (a dict for ``add_session_config_entry``), and any other writable
    ``SessionOptions`` attribute (``intra_op_num_threads``,
    ``inter_op_num_threads``, ``enable_mem_pattern``, ``log_severity_level``, ...).
    An unknown key raises ``UserError`` when it is an override, and is skipped
    with a warning when it comes from ``options`` (a configuration file).
    """
    merged = dict(options or {})
    merged.update(overrides)
    so = ort.SessionOptions()
    for key, value in merged.items():
        if value is None:
            continue
        if key not in overrides and not _known_option(so, key):
            # A configuration file from another nmcompile version: skip, don't fail.
            log.warning("ignoring unknown session option %r in the provider configuration", key)
            continue
        if key == "graph_optimization_level":
            so.graph_optimization_level = _enum_value(ort.GraphOptimizationLevel, value, key)
        elif key == "execution_mode":
            so.execution_mode = _enum_value(ort.ExecutionMode, value, key)
        elif key == "config_entries":
            if not isinstance(value, Mapping):
                raise UserError("session option config_entries must be an object of strings")
            for k, v in value.items():
                so.add_session_config_entry(str(k), str(v))
        elif key.startswith("_") or not hasattr(so, key) or callable(getattr(so, key)):
            raise UserError(f"unknown session option {key!r}")
        else:
            try:
                setattr(so, key, value)
            except (TypeError, AttributeError) as e:
                raise UserError(f"session option {key}={value!r}: {e}") from None
    return so


def _known_option(so, key: str) -> bool:
    if key in ("graph_optimization_level", "execution_mode", "config_entries"):
        return True
    return not key.startswith("_") and hasattr(so, key) and not callable(getattr(so, key))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def create_session(
    model_path,
    cfg: dict | None,
    providers: Sequence | None = None,
    *,
    label: str | None = None,
    **session_option_overrides,
) -> ort.InferenceSession:
    """Build a session for ``model_path`` from an in-memory configuration
    (``cfg`` None: CPU provider, ORT's default session options). ``providers``
    replaces the configuration's provider list. See :func:`load`."""
    model_path = os.fspath(model_path)
    label = label or os.path.basename(model_path)
    if not os.path.isfile(model_path):
        raise UserError(f"model not found: {model_path}")
    model_dir = os.path.dirname(os.path.abspath(model_path))

    if providers is not None:
        source = list(providers)
    elif cfg is not None:
        source = cfg["providers"]
    else:
        source = [CPU]
    kept, dropped = resolve_providers(source, model_dir=model_dir)
    if dropped:
        log.warning(
            "%s: dropped %s (not in this onnxruntime build, which has %s); running on %s",
            label,
            ", ".join(dropped),
            ", ".join(ort.get_available_providers()),
            ", ".join(n for n, _ in kept),
        )
    for name, opts in kept:
        for key in PATH_OPTIONS:
            if key in opts and _path_used(opts, key):
                try:
                    os.makedirs(opts[key], exist_ok=True)
                except OSError as e:
                    log.warning("%s: cannot create %s %s: %s", label, key, opts[key], e)

    so = make_session_options((cfg or {}).get("session_options"), **session_option_overrides)
    try:
        sess = ort.InferenceSession(model_path, sess_options=so, providers=kept)
    except Exception as e:  # onnxruntime raises its own exception types
        raise UserError(f"onnxruntime cannot load {model_path}: {_first_line(e)}") from None

    used = sess.get_providers()
    unused = [n for n, _ in kept if n not in used]
    if unused:
        log.warning(
            "%s: onnxruntime could not start %s (missing driver or library?); running on %s",
            label,
            ", ".join(unused),
            ", ".join(used),
        )
    _annotate(sess, requested=[n for n, _ in _entries(source)], dropped=dropped + unused, used=used)
    return sess


def _entries(source):
    return [_split_provider(e) for e in source]


def _path_used(opts: dict, key: str) -> bool:
    if key == "trt_engine_cache_path":
        return bool(opts.get("trt_engine_cache_enable")) or bool(opts.get("trt_int8_enable"))
    if key == "trt_timing_cache_path":
        return bool(opts.get("trt_timing_cache_enable"))
    return True


def _annotate(sess, *, requested, dropped, used) -> None:
    # InferenceSession is a plain Python class: attach what callers need to report.
    sess.nm_requested_providers = list(requested)
    sess.nm_dropped_providers = list(dropped)
    sess.nm_providers = list(used)


def load(
    model_path,
    config_path=None,
    providers: Sequence | None = None,
    *,
    config: dict | None = None,
    **session_option_overrides,
) -> ort.InferenceSession:
    """A configured ``onnxruntime.InferenceSession`` for a compiled model.

    * Configuration: ``config`` (a dict) if given, else ``config_path``, else
      ``MODEL.ep.json`` beside the model (``foo.nm.onnx`` -> ``foo.nm.ep.json``).
      No configuration file: CPU provider, ORT's default session options, and
      an INFO log line saying so.
    * Providers: ``providers`` (names or ``(name, options)``) replaces the
      configuration's list. Those missing from
      ``onnxruntime.get_available_providers()`` are dropped with a WARNING on
      the ``nmcompile`` logger; CPU is used when none is left. Providers that
      are available but fail to start (ONNX Runtime falls back by itself) are
      logged too.
    * Cache paths: relative ``trt_engine_cache_path`` / ``trt_timing_cache_path``
      are joined with the model's folder (and created).
    * Session options: the configuration's ``session_options``, then
      ``session_option_overrides`` (e.g. ``intra_op_num_threads=4``,
      ``graph_optimization_level="ORT_ENABLE_EXTENDED"``; None = leave as is).

    The session carries ``nm_providers`` (what runs), ``nm_dropped_providers``
    (requested but not running) and ``nm_requested_providers``.
    Bad input (missing model or configuration, invalid JSON, unknown session
    option, a model ONNX Runtime rejects) raises ``UserError``.
    """
    if config is not None and config_path is not None:
        raise UserError("give either config or config_path, not both")
    if not os.path.isfile(os.fspath(model_path)):
        raise UserError(f"model not found: {os.fspath(model_path)}")
    if config is not None:
        _validate_config(config, "config")
        cfg = config
    else:
        cfg = read_config(model_path, config_path)
        if cfg is None and providers is None:
            log.info(
                "%s: no provider configuration (%s); using CPUExecutionProvider",
                os.path.basename(os.fspath(model_path)),
                os.path.basename(config_path_for(model_path)),
            )
    return create_session(model_path, cfg, providers, **session_option_overrides)


def optimized_op_counts(path) -> Counter[str]:
    """How many nodes of each op type ONNX Runtime CPU runs after its graph optimizer
    (extended level): e.g. whether a QDQ model became QLinearConv / QGemm kernels."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="nmcompile-opt-") as folder:
        so = ort.SessionOptions()
        so.log_severity_level = 4  # errors come back as exceptions: no log lines of ORT's own
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
