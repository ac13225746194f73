"""Calibration data: load it, check it against the model, cut it into batches.

Format: an ``.npz`` whose arrays are named after the model's inputs, samples
along the first axis (``np.savez("calib.npz", input_ids=..., attention_mask=...)``),
or a folder of such files, concatenated along axis 0 in sorted file-name order.
Arrays are loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Iterator, Mapping

import numpy as np
import onnx
from onnx import helper

from nmcompile.errors import UserError
from nmcompile.passes.statistics import TOKEN_MASK_INPUTS, fixed_batch_size

__all__ = ["load_calibration", "validate_calibration", "iter_batches", "batch_size_for",
           "Batches", "StoredRows"]

_LOAD_ERRORS = (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError,
                zlib.error, TypeError, AttributeError)


def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


class StoredRows:
    """An array left in its .npz file(s), read a slice of samples at a time.

    Calibration reads the data once per pass and never needs it whole: 512
    ImageNet-sized samples are 308 MB, three times ResNet-50's weights. Each slice
    is a fresh array read from the file (page cache, not this process's memory).
    ``segments``: (path, byte offset, rows) per file, all of ``dtype`` and
    per-sample shape ``shape[1:]``, concatenated along axis 0. ``np.asarray``
    reads it all."""

    def __init__(self, segments: list[tuple[str, int, int]], dtype: np.dtype, sample_shape: tuple[int, ...]):
        self.segments = segments
        self.dtype = np.dtype(dtype)
        self.shape = (sum(r for _, _, r in segments),) + tuple(sample_shape)
        self.ndim = len(self.shape)
        self._row = int(np.prod(sample_shape, dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(0, stop - start),) + self.shape[1:], self.dtype)
        flat = out.reshape(-1)
        first = done = 0
        for path, offset, rows in self.segments:
            lo, hi = max(start, first), min(stop, first + rows)
            if lo < hi:
                count = (hi - lo) * self._row
                try:
                    part = np.fromfile(path, self.dtype, count=count, offset=offset + (lo - first) * self._row * self.dtype.itemsize)
                except OSError as exc:  # moved or deleted while the compile ran
                    raise UserError(f"cannot read calibration file {path}: {exc.strerror or exc}") from None
                if part.size != count:
                    raise UserError(f"calibration file {path} is shorter than its header says (truncated?)")
                flat[done:done + count] = part
                done += count
            first += rows
        return out

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.shape[0])
            return self._read(start, max(start, stop))
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= i < self.shape[0]:
                raise IndexError(key)
            return self._read(i, i + 1)[0]
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        out = self._read(0, self.shape[0])
        return out if dtype is None else out.astype(dtype)


def _stored_member(path: str, archive: zipfile.ZipFile, member: str) -> StoredRows | None:
    """The member as StoredRows when it lies uncompressed in the archive as a
    C-ordered numeric .npy (np.savez); None otherwise (np.savez_compressed,
    Fortran order), and then it is loaded as usual."""
    info = archive.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        offset = f.tell()
    if fortran or dtype.hasobject or dtype.kind not in "biuf" or len(shape) == 0:
        return None  # loaded as usual, which reports what is wrong with it
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset - start + nbytes > info.file_size:
        raise UserError(f"calibration file {path}: array {member[:-4]!r} is shorter than its header says")
    return StoredRows([(path, offset, int(shape[0]))], dtype, tuple(shape[1:]))


def _load_npz(path: str) -> dict[str, np.ndarray | StoredRows]:
    try:
        f = np.load(path, allow_pickle=False)
    except _LOAD_ERRORS as e:
        raise UserError(f"cannot read calibration file {path}: not a valid .npz archive "
                        f"({_first_line(e)})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise UserError(f"calibration file {path} is a single array, not an .npz archive "
                        "with arrays named after the model's inputs")
    out = {}
    with f:
        for k in f.files:
            try:
                stored = _stored_member(path, f.zip, k + ".npy") if k + ".npy" in f.zip.namelist() else None
                out[k] = stored if stored is not None else f[k]
            except _LOAD_ERRORS as e:
                msg = _first_line(e)
                if "allow_pickle" in msg or "bject arrays" in msg:
                    raise UserError(f"calibration array {k!r} in {path} is an object "
                                    "array; only numeric arrays are accepted") from None
                raise UserError(f"cannot read array {k!r} of calibration file {path}: "
                                f"{msg}") from None
    if not out:
        raise UserError(f"calibration file {path} holds no arrays")
    for k, a in out.items():
        if not isinstance(a, (np.ndarray, StoredRows)):
            raise UserError(f"calibration file {path}: member {k!r} is not a numpy array")
        if a.dtype.kind not in "biuf":
            raise UserError(f"calibration array {k!r} in {path} has unsupported "
                            f"dtype {a.dtype}")
        if a.ndim == 0:
            raise UserError(f"calibration array {k!r} in {path} is a scalar; samples "
                            "go along the first axis")
    return out


def load_calibration(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load an .npz file or a folder of .npz files (concatenated along axis 0 in
    sorted file-name order). Bad input raises UserError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"calibration data not found: {path}")
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path)
                       if f.lower().endswith(".npz") and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise UserError(f"calibration folder {path} holds no .npz files")
        parts = [_load_npz(os.path.join(path, f)) for f in files]
        keys = set(parts[0])
        for f, p in zip(files[1:], parts[1:]):
            if set(p) != keys:
                raise UserError(f"calibration file {f} has arrays {sorted(p)}, "
                                f"{files[0]} has {sorted(keys)}")
        out = {}
        for k in list(parts[0]):
            arrs = [p[k] for p in parts]
            for f, a in zip(files, arrs):
                if a.shape[1:] != arrs[0].shape[1:] or a.dtype != arrs[0].dtype:
                    raise UserError(f"calibration array {k!r}: {f} has shape {a.shape} "
                                    f"{a.dtype}, {files[0]} has {arrs[0].shape} "
                                    f"{arrs[0].dtype}")
            if len(arrs) == 1:
                out[k] = arrs[0]
            elif all(isinstance(a, StoredRows) for a in arrs):  # still read a slice at a time
                out[k] = StoredRows([seg for a in arrs for seg in a.segments], arrs[0].dtype, arrs[0].shape[1:])
            else:
                out[k] = np.concatenate([np.asarray(a) for a in arrs], axis=0)
            for p in parts:
                del p[k]
        return out
    return _load_npz(path)


def _elem_dtype(vi: onnx.ValueInfoProto) -> np.dtype | None:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    except Exception:
        return None


# dim_params exporters write for "unknown" (paddle2onnx: "?"): no shared size to agree on
ANONYMOUS_DIMS = ("?", "-1", "unk", "None")


def pop_labels(model: onnx.ModelProto, data: dict) -> np.ndarray | None:
    """Take out an array named ``labels`` that is not a model input: class indices that
    `verify` scores classifier outputs against, so one data file serves every command."""
    if "labels" not in data or "labels" in {i.name for i in model.graph.input}:
        return None
    labels = np.asarray(data.pop("labels")[:])
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserError(f"calibration array 'labels' must hold one class index per sample (1-D integers), "
                        f"got shape {labels.shape} {labels.dtype}")
    n = min((a.shape[0] for a in data.values()), default=0)
    if labels.shape[0] != n:
        raise UserError(f"calibration array 'labels' holds {labels.shape[0]} labels for {n} samples")
    return labels


def validate_calibration(model: onnx.ModelProto, data: Mapping[str, np.ndarray]) -> None:
    """Check names, dtypes, per-sample shapes and sample counts against the
    model's graph inputs (those that are not initializers). Raises UserError."""
    inits = {t.name for t in model.graph.initializer}
    inits |= {t.values.name for t in model.graph.sparse_initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in inits]
    names = [vi.name for vi in inputs]
    missing = [n for n in names if n not in data]
    extra = sorted(k for k in data if k not in names)
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing))
        if extra:
            parts.append("unknown " + ", ".join(extra))
        raise UserError(f"calibration data does not match the model inputs "
                        f"({'; '.join(parts)}); expected {', '.join(names)}")
    counts = {}
    fixed = set()
    symbolic: dict[str, tuple[int, str]] = {}  # dim_param -> (size, first input with it)
    for vi in inputs:
        a = data[vi.name]  # an array or StoredRows: only its dtype and shape are read
        if not vi.type.HasField("tensor_type"):
            raise UserError(f"model input {vi.name!r} is not a tensor; calibration "
                            "supports tensor inputs only")
        want = _elem_dtype(vi)
        if want is not None and a.dtype != want:
            raise UserError(f"calibration array {vi.name!r} has dtype {a.dtype}, the model "
                            f"input expects {want}")
        if a.ndim == 0:
            raise UserError(f"calibration array {vi.name!r} is a scalar; samples go "
                            "along the first axis")
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            dims = tt.shape.dim
            if len(dims) == 0:
                raise UserError(f"model input {vi.name!r} is a scalar; it cannot take a "
                                "batch of calibration samples")
            if a.ndim != len(dims):
                raise UserError(f"calibration array {vi.name!r} has shape {a.shape}, the "
                                f"model input has rank {len(dims)}")
            want_shape = []
            bad = False
            for d, n in zip(list(dims)[1:], a.shape[1:]):
                if d.HasField("dim_value") and d.dim_value > 0:
                    want_shape.append(str(d.dim_value))
                    bad |= int(d.dim_value) != n
                else:
                    want_shape.append(d.dim_param or "?")
                    if d.dim_param and d.dim_param not in ANONYMOUS_DIMS:  # inputs naming the same dimension must agree on it
                        seen = symbolic.setdefault(d.dim_param, (n, vi.name))
                        if seen[0] != n:
                            raise UserError(f"calibration arrays {seen[1]!r} and {vi.name!r} disagree on the "
                                            f"model's dimension {d.dim_param!r} ({seen[0]} vs {n})")
            if bad:
                raise UserError(f"calibration array {vi.name!r} has samples of shape "
                                f"{tuple(a.shape[1:])}, the model input expects "
                                f"({', '.join(want_shape)})")
            d0 = dims[0]
            if d0.HasField("dim_value") and d0.dim_value > 0:
                fixed.add(int(d0.dim_value))
        counts[vi.name] = a.shape[0]
    if len(set(counts.values())) > 1:
        raise UserError("calibration arrays hold different numbers of samples: "
                        + ", ".join(f"{k}={v}" for k, v in counts.items()))
    n = next(iter(counts.values()), 0)
    if inputs and n < 1:
        raise UserError("calibration data holds no samples")
    if len(fixed) > 1:
        raise UserError(f"model inputs have different fixed batch sizes {sorted(fixed)}")
    if fixed and n < min(fixed):
        raise UserError(f"the model takes batches of exactly {min(fixed)} samples; the "
                        f"calibration data holds only {n}")
    for name in TOKEN_MASK_INPUTS:
        mask = data.get(name)
        if mask is not None and mask.ndim == 2 and mask.dtype.kind in "biuf":
            values = np.asarray(mask[:])
            if np.isin(values, (0, 1)).all() and not values.any():
                raise UserError(f"calibration array {name!r} is 0 everywhere: no sample has a real "
                                "token to calibrate on (1 marks a token, 0 padding)")


def batch_size_for(model: onnx.ModelProto, batch_size: int) -> int:
    """The batch size iter_batches uses: the inputs' fixed first dimension if they
    have one, else ``batch_size``."""
    fixed = _fixed(model)
    if fixed is not None:
        return fixed
    if int(batch_size) < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    return int(batch_size)


def _fixed(model: onnx.ModelProto) -> int | None:
    try:
        return fixed_batch_size(model)
    except ValueError as e:
        raise UserError(str(e)) from None


class Batches:
    """The batches of ``iter_batches``: ``len()`` is the number of batches,
    ``iter()`` starts a fresh pass each time (several calibration passes can share
    one object), ``next()`` steps through one internal pass."""

    def __init__(self, data: Mapping[str, np.ndarray], b: int, stop: int):
        self.data, self.batch_size, self.stop = data, b, stop
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return -(-self.stop // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        b = self.batch_size
        for i in range(0, self.stop, b):
            batch = {k: v[i:i + b] for k, v in self.data.items()}
            for k, v in batch.items():
                v = np.asarray(v)
                if np.issubdtype(v.dtype, np.inexact) and not np.isfinite(v).all():
                    bad = i + int(np.flatnonzero(~np.isfinite(v).reshape(len(v), -1).all(axis=1))[0])
                    raise UserError(f"calibration array {k!r} holds NaN or inf (sample {bad})")
            yield batch

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = iter(self)
        return next(self._it)


def iter_batches(model: onnx.ModelProto, data: Mapping[str, np.ndarray],
                 batch_size: int) -> Batches:
    """Batches of views of ``data``, ``b`` samples each: ``b`` is the fixed first
    dimension of the model's inputs when they have one (e.g. 1) — a trailing
    remainder smaller than that is dropped, since the model cannot take it — else
    ``batch_size`` (the last batch may be smaller). Errors are raised here, not
    at the first batch."""
    fixed = _fixed(model)
    b = batch_size_for(model, batch_size)
    n = min((np.shape(a)[0] for a in data.values()), default=0)
    stop = (n // b) * b if fixed is not None else n
    return Batches(data, b, stop)
