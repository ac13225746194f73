"""Reading and writing ONNX models without holding several copies of their weights.

Models are parsed with their external data left on disk; an initializer's array
is read on demand (memory-mapped when it lives in an external file), and the
compiler hands back only the arrays it changed. Saving streams every tensor
once, into the output file or an external data file, under temporary names that
are renamed into place only when everything has been written.
"""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .errors import UserError

# Protobuf refuses to serialize messages over 2 GiB; stay well below it.
INLINE_LIMIT_BYTES = 1_800_000_000
# Tensors smaller than this stay inside the .onnx file even in external mode.
EXTERNAL_MIN_BYTES = 1024
EXTERNAL_ALIGN = 4096
# Output models are written with this IR version unless the input asks for
# less: newer onnx releases default to IR versions ONNX Runtime cannot read.
MAX_IR_VERSION = 10


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies) inside it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def iter_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor that can carry data: initializers and tensor attributes, subgraphs included."""
    for tensor, _ in _tensors_with_origin(model.graph, True):
        yield tensor


def _tensors_with_origin(graph: onnx.GraphProto, top: bool) -> Iterator[tuple[TensorProto, bool]]:
    """(tensor, is_main_graph_initializer): overrides are keyed by main-graph initializer names."""
    for t in graph.initializer:
        yield t, top
    for sparse in graph.sparse_initializer:
        yield sparse.values, False
        yield sparse.indices, False
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t, False
            elif attr.type == onnx.AttributeProto.TENSORS:
                for t in attr.tensors:
                    yield t, False
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _tensors_with_origin(attr.g, False)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _tensors_with_origin(g, False)


def is_external(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


@dataclass
class ExternalRef:
    location: str
    offset: int
    length: int | None


def external_ref(tensor: TensorProto) -> ExternalRef:
    info = {e.key: e.value for e in tensor.external_data}
    if "location" not in info:
        raise UserError(f"tensor {tensor.name!r}: external data without a location")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise UserError(f"tensor {tensor.name!r}: malformed external data offset/length") from None
    return ExternalRef(info["location"], offset, length)


def resolve_external_path(base_dir: Path, location: str, tensor_name: str) -> Path:
    """The file an external-data location names, refusing anything that leaves base_dir."""
    if not location or "\x00" in location:
        raise UserError(f"tensor {tensor_name!r}: empty external data location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise UserError(f"tensor {tensor_name!r}: external data location {location!r} is an absolute path")
    parts = Path(location.replace("\\", "/")).parts
    if ".." in parts:
        raise UserError(f"tensor {tensor_name!r}: external data location {location!r} leaves the model's folder")
    current = base_dir
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise UserError(f"tensor {tensor_name!r}: external data location {location!r} goes through a symbolic link")
    if not current.is_file():
        raise UserError(f"tensor {tensor_name!r}: external data file {location!r} not found beside the model")
    return current


def tensor_nbytes(tensor: TensorProto) -> int:
    if is_external(tensor):
        ref = external_ref(tensor)
        if ref.length is not None:
            return ref.length
    if tensor.HasField("raw_data") or tensor.raw_data:
        return len(tensor.raw_data)
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


class LoadedModel:
    """A parsed model whose initializer arrays are read lazily and overridden by name."""

    def __init__(self, model: onnx.ModelProto, path: Path):
        self.model = model
        self.path = path
        self.base_dir = path.parent
        self.has_external_data = any(is_external(t) for t in iter_tensors(model))
        self._overrides: dict[str, np.ndarray] = {}
        self._initializers = {t.name: t for t in model.graph.initializer}

    # -- initializers ---------------------------------------------------------
    def initializer(self, name: str) -> TensorProto | None:
        return self._initializers.get(name)

    def refresh_index(self) -> None:
        self._initializers = {t.name: t for t in self.model.graph.initializer}

    def array(self, name: str) -> np.ndarray:
        """The initializer's current value (read-only view for external data)."""
        if name in self._overrides:
            return self._overrides[name]
        tensor = self._initializers[name]
        return read_tensor(tensor, self.base_dir)

    def set_array(self, name: str, value: np.ndarray) -> None:
        tensor = self._initializers[name]
        expected = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        value = np.ascontiguousarray(value, dtype=expected)
        if tuple(value.shape) != tuple(tensor.dims):
            # Reshaping an initializer is a graph edit: dims follow the array.
            del tensor.dims[:]
            tensor.dims.extend(value.shape)
        self._overrides[name] = value

    def add_initializer(self, name: str, value: np.ndarray) -> None:
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.model.graph.initializer.append(tensor)
        self._initializers[name] = self.model.graph.initializer[-1]
        self._overrides[name] = np.ascontiguousarray(value)

    def remove_initializer(self, name: str) -> None:
        inits = self.model.graph.initializer
        for i, t in enumerate(inits):
            if t.name == name:
                del inits[i]
                break
        self._overrides.pop(name, None)
        self._initializers.pop(name, None)

    @property
    def changed(self) -> set[str]:
        return set(self._overrides)

    def overrides(self) -> dict[str, np.ndarray]:
        """Initializers whose current value differs from the file (for running the model as it stands)."""
        return dict(self._overrides)


def read_tensor(tensor: TensorProto, base_dir: Path) -> np.ndarray:
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(int(d) for d in tensor.dims)
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    ref = external_ref(tensor)
    file = resolve_external_path(base_dir, ref.location, tensor.name)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1):
        raise UserError(f"tensor {tensor.name!r}: 4-bit tensors in external data are not supported")
    size = file.stat().st_size
    if ref.offset < 0 or ref.offset + nbytes > size or (ref.length is not None and ref.length < nbytes):
        raise UserError(f"tensor {tensor.name!r}: external data in {ref.location!r} is shorter than the tensor")
    if count == 0:
        return np.zeros(shape, dtype)
    arr = np.memmap(file, dtype=dtype.newbyteorder("<"), mode="r", offset=ref.offset, shape=(count,))
    return arr.reshape(shape)


def _read_raw_external(tensor: TensorProto, base_dir: Path) -> memoryview:
    ref = external_ref(tensor)
    file = resolve_external_path(base_dir, ref.location, tensor.name)
    length = ref.length if ref.length is not None else file.stat().st_size - ref.offset
    if ref.offset < 0 or ref.offset + length > file.stat().st_size:
        raise UserError(f"tensor {tensor.name!r}: external data in {ref.location!r} is shorter than the tensor")
    if length == 0:
        return memoryview(b"")
    return memoryview(np.memmap(file, dtype=np.uint8, mode="r", offset=ref.offset, shape=(length,)))


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Parse a model file, leaving external data on disk; every failure is a UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not an ONNX model file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if size == 0:
        raise UserError(f"{path}: empty file, not an ONNX model")
    backed: list[tuple[int, int, int]] = []
    try:
        parsed = None if path.is_symlink() else _parse_without_weights(path)
        if parsed is None:
            model = onnx.load(str(path), load_external_data=False)
        else:
            model, backed = parsed
    except Exception as exc:  # protobuf DecodeError and friends
        raise UserError(f"{path}: not a valid ONNX model ({type(exc).__name__})") from None
    if not model.graph.node or not model.opset_import or model.ir_version <= 0:
        raise UserError(f"{path}: not a valid ONNX model (no graph, opset or IR version; truncated?)")
    for tensor in iter_tensors(model):
        if is_external(tensor):
            ref = external_ref(tensor)
            file = resolve_external_path(path.parent, ref.location, tensor.name)
            need = ref.offset + (ref.length if ref.length is not None else 0)
            if ref.offset < 0 or need > file.stat().st_size:
                raise UserError(f"tensor {tensor.name!r}: external data in {ref.location!r} is truncated")
    try:
        check_structure(model)
    except Exception as exc:  # ValidationError, or the checker choking on malformed input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "checker failed"
        raise UserError(f"{path}: invalid ONNX model: {first}") from None
    loaded = LoadedModel(model, path)
    for index, offset, length in backed:
        _set_external(model.graph.initializer[index], path.name, offset, length)
    return loaded


# -- weights left in the model file ------------------------------------------------------
#
# Parsing a model puts every weight byte in protobuf's memory, and a changed weight
# then lives twice (the parsed bytes cannot be released one tensor at a time). The
# loader instead parses the model with the raw bytes of its large main-graph
# initializers cut out, and points those tensors at their place in the model file
# itself, as external data: they are memory-mapped on use like any external data,
# and a replaced weight's pages simply stop being touched. The in-memory model then
# holds the graph alone; has_external_data still describes the file as written, so
# outputs keep the input's layout.

_WIRE_MODEL_GRAPH = 7
_WIRE_GRAPH_INITIALIZER = 5
_WIRE_TENSOR_RAW_DATA = 9


def _read_varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, field start, payload start, payload end, field end) of each field;
    the payload is only meaningful for length-delimited fields."""
    pos = start
    while pos < end:
        begin = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
            yield number, begin, pos, pos, pos
            continue
        if wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            yield number, begin, pos, pos + length, pos + length
            pos += length
            continue
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, begin, pos, pos, pos
    if pos != end:
        raise ValueError("field runs past its message")


def _parse_without_weights(path: Path) -> tuple[onnx.ModelProto, list[tuple[int, int, int]]] | None:
    """The model parsed without the raw bytes of its large main-graph initializers,
    and (initializer index, file offset, length) of each cut-out. None when the file
    does not have the plain layout this expects (then it is parsed as usual)."""
    import mmap

    try:
        with open(path, "rb") as fh:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # a file that cannot be mapped: parse it as usual
        return None
    try:
        view = memoryview(buf)
        try:
            top = list(_fields(view, 0, len(view)))
            graphs = [f for f in top if f[0] == _WIRE_MODEL_GRAPH]
            if len(graphs) != 1:
                return None
            _, g_begin, g_start, g_end, g_stop = graphs[0]
            graph_parts, backed, n_init = [], [], 0
            for number, begin, start, end, stop in _fields(view, g_start, g_end):
                if number != _WIRE_GRAPH_INITIALIZER:
                    graph_parts.append(bytes(view[begin:stop]))
                    continue
                raw = [f for f in _fields(view, start, end) if f[0] == _WIRE_TENSOR_RAW_DATA]
                if len(raw) == 1 and raw[0][3] - raw[0][2] >= EXTERNAL_MIN_BYTES:
                    _, r_begin, r_start, r_end, r_stop = raw[0]
                    body = bytes(view[start:r_begin]) + bytes(view[r_stop:end])
                    graph_parts.append(_varint(_WIRE_GRAPH_INITIALIZER << 3 | 2) + _varint(len(body)) + body)
                    backed.append((n_init, r_start, r_end - r_start))
                else:
                    graph_parts.append(bytes(view[begin:stop]))
                n_init += 1
            head = b"".join(bytes(view[f[1]:f[4]]) for f in top if f[0] != _WIRE_MODEL_GRAPH)
        except (ValueError, IndexError):
            return None
        if not backed:
            return None
        graph_body = b"".join(graph_parts)
        data = head + _varint(_WIRE_MODEL_GRAPH << 3 | 2) + _varint(len(graph_body)) + graph_body
        del graph_parts, graph_body
    finally:
        view.release()
        buf.close()
    return onnx.ModelProto.FromString(data), backed


def check_structure(model: onnx.ModelProto) -> None:
    """onnx.checker on the graph without its weight bytes.

    The checker needs every initializer to hold data; handing it the real model
    costs two more copies of the weights (serialized, then parsed in C++). A stub
    whose initializers all point at one placeholder external file checks the
    same graph, types and shapes at the cost of the graph alone. Tensor data is
    validated separately (external data ranges above; protobuf parsing for inline).
    """
    stub = onnx.ModelProto()
    stub.ir_version = model.ir_version
    stub.opset_import.extend(model.opset_import)
    stub.functions.extend(model.functions)
    graph = stub.graph
    graph.name = model.graph.name or "graph"
    for name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, name).extend(getattr(model.graph, name))
    for tensor in model.graph.initializer:
        placeholder = graph.initializer.add()
        placeholder.name = tensor.name
        placeholder.data_type = tensor.data_type
        placeholder.dims.extend(tensor.dims)
        _set_external(placeholder, "placeholder.bin", 0, 1)
    with tempfile.TemporaryDirectory(prefix="nmcompile-check-") as folder:
        Path(folder, "placeholder.bin").write_bytes(b"\0")
        stub_path = Path(folder, "stub.onnx")
        stub_path.write_bytes(stub.SerializeToString())
        onnx.checker.check_model(str(stub_path))


# -- saving -------------------------------------------------------------------


@dataclass
class SaveResult:
    model_path: Path
    data_path: Path | None
    model_bytes: int
    data_bytes: int = 0


class AtomicWriter:
    """Files written under temporary names in their final folder, renamed together at commit."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def open(self, final: Path):
        final = Path(final)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        self._pending.append((Path(tmp), final))
        return os.fdopen(fd, "wb")

    def write_bytes(self, final: Path, data: bytes) -> None:
        with self.open(final) as fh:
            fh.write(data)

    def commit(self) -> None:
        """Rename every file into place, or none: files the outputs replace are set aside
        first and put back if a later rename fails (a folder in the way, say)."""
        done: list[tuple[Path, Path | None]] = []
        try:
            for tmp, final in self._pending:
                if final.is_dir() and not final.is_symlink():
                    raise IsADirectoryError(errno.EISDIR, "a folder is in the way", str(final))
                os.chmod(tmp, 0o644)
                backup = None
                if os.path.lexists(final):
                    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent)
                    os.close(fd)
                    backup = Path(name)
                    os.replace(final, backup)
                done.append((final, backup))
                os.replace(tmp, final)
        except BaseException:
            for final, backup in reversed(done):
                if backup is not None:
                    os.replace(backup, final)
                else:
                    try:
                        final.unlink()
                    except FileNotFoundError:
                        pass
            self.abort()
            raise
        for _, backup in done:
            if backup is not None:
                backup.unlink()
        self._pending.clear()

    def abort(self) -> None:
        for tmp, _ in self._pending:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
        self._pending.clear()

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def save_model(loaded: LoadedModel, out_path: Path, writer: AtomicWriter, external: bool | None = None) -> SaveResult:
    """Write the model with its overridden arrays; external data when the input had it or size demands it.

    The written files are registered with `writer`; nothing is visible until it commits.
    Tensors are rewritten in place (the stale bytes of overridden ones are dropped)
    and the overriding arrays are written straight from numpy, so no second copy
    of the weights is built; `loaded.array()` still answers for overridden names.
    """
    out_path = Path(out_path)
    model = loaded.model
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    total = 0
    for graph in iter_graphs(model.graph):
        for t in graph.initializer:
            total += _current_nbytes(loaded, t)
    if external is None:
        external = loaded.has_external_data or total > INLINE_LIMIT_BYTES

    data_path = out_path.with_name(out_path.name + ".data") if external else None
    data_bytes = 0
    streamed: dict[str, memoryview] = {}  # inline mode: raw bytes written straight from the arrays
    restore: list[tuple[TensorProto, TensorProto]] = []
    with ExitStack() as stack:
        data_fh = stack.enter_context(writer.open(data_path)) if external else None
        for tensor, is_top in _tensors_with_origin(model.graph, True):
            override = loaded._overrides.get(tensor.name) if is_top else None
            if override is not None:
                raw = _little_endian_bytes(override)
            elif is_external(tensor):
                raw = _read_raw_external(tensor, loaded.base_dir)
            else:
                raw = None  # inline, untouched
            inline_small = raw is not None and len(raw) < EXTERNAL_MIN_BYTES
            if external and (raw is not None or len(tensor.raw_data) >= EXTERNAL_MIN_BYTES) and not inline_small:
                if raw is None:
                    raw = memoryview(tensor.raw_data) if tensor.raw_data else memoryview(numpy_helper.to_array(tensor).tobytes())
                pad = (-data_bytes) % EXTERNAL_ALIGN
                if pad:
                    data_fh.write(b"\0" * pad)
                    data_bytes += pad
                offset = data_bytes
                data_fh.write(raw)
                data_bytes += len(raw)
                _set_external(tensor, data_path.name, offset, len(raw))
            elif raw is not None and is_top and not external:
                if override is None:  # read from a file: point there again once written
                    kept = onnx.TensorProto()
                    kept.CopyFrom(tensor)
                    restore.append((tensor, kept))
                _clear_data(tensor)
                streamed[tensor.name] = raw
            elif raw is not None:
                _set_inline(tensor, bytes(raw))
            del raw, override
        if streamed:
            with writer.open(out_path) as fh:
                model_bytes = write_streamed(model, streamed, fh)
            del streamed
            for tensor, kept in restore:  # loaded.array() keeps answering for them
                tensor.CopyFrom(kept)
        else:
            serialized = model.SerializeToString()
            writer.write_bytes(out_path, serialized)
            model_bytes = len(serialized)
    return SaveResult(out_path, data_path, model_bytes, data_bytes)


def _little_endian_bytes(array: np.ndarray) -> memoryview:
    """An array's raw_data bytes. By a uint8 view, not memoryview's own cast: that cannot
    take the custom dtypes onnx decodes bfloat16 and float8 tensors to."""
    a = np.ascontiguousarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return memoryview(a.reshape(-1).view(np.uint8))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# Protobuf tags (field number << 3 | length-delimited) of the fields written by hand.
_MODEL_GRAPH = _varint(7 << 3 | 2)
_GRAPH_INITIALIZER = _varint(5 << 3 | 2)
_TENSOR_RAW_DATA = _varint(9 << 3 | 2)


def _shell(message, skip: str):
    """A copy of a message without one (large) field, built field by field so nothing big is copied."""
    shell = type(message)()
    for descriptor, value in message.ListFields():
        if descriptor.name == skip:
            continue
        if descriptor.is_repeated:
            getattr(shell, descriptor.name).extend(value)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            getattr(shell, descriptor.name).CopyFrom(value)
        else:
            setattr(shell, descriptor.name, value)
    return shell


def write_streamed(model: onnx.ModelProto, raw: dict[str, memoryview], fh) -> int:
    """Serialize `model` to fh, taking the raw_data of the named main-graph initializers from `raw`.

    Protobuf lets fields come in any order, so the message is written as the
    model without its graph, then the graph without its initializers, then each
    initializer's header followed by its bytes, straight from the numpy array.
    This avoids building the whole serialization (another copy of the weights)
    in memory. The result parses to exactly the message onnx.save would write.
    """
    graph = model.graph
    head = _shell(model, "graph").SerializeToString()
    graph_head = _shell(graph, "initializer").SerializeToString()
    records = []
    for tensor in graph.initializer:
        header = tensor.SerializeToString()
        data = raw.get(tensor.name)
        tail = b"" if data is None else _TENSOR_RAW_DATA + _varint(len(data))
        size = len(header) + len(tail) + (0 if data is None else len(data))
        records.append((header, tail, data, size))
    graph_len = len(graph_head) + sum(len(_GRAPH_INITIALIZER) + len(_varint(r[3])) + r[3] for r in records)
    written = 0
    for chunk in (head, _MODEL_GRAPH, _varint(graph_len), graph_head):
        fh.write(chunk)
        written += len(chunk)
    for header, tail, data, size in records:
        for chunk in (_GRAPH_INITIALIZER, _varint(size), header, tail):
            fh.write(chunk)
            written += len(chunk)
        if data is not None:
            fh.write(data)
            written += len(data)
    return written


def _current_nbytes(loaded: LoadedModel, tensor: TensorProto) -> int:
    override = loaded._overrides.get(tensor.name)
    return override.nbytes if override is not None else tensor_nbytes(tensor)


def _set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(f)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key = key
        entry.value = value


def _clear_data(tensor: TensorProto) -> None:
    for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(f)
    del tensor.external_data[:]
    tensor.ClearField("data_location")


def _set_inline(tensor: TensorProto, raw: bytes) -> None:
    for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(f)
    del tensor.external_data[:]
    tensor.ClearField("data_location")
    tensor.raw_data = raw
