"""Tensors stored outside the .onnx file (ONNX "external data"): checked before anything is read, read one tensor at
a time, and written out again by streaming, so a model larger than memory likes folds with a small footprint.

Every reference is checked first (:func:`check_external_data`): the location must be a relative path that stays
inside the model's directory (no ``..``, no absolute path, no symlink out), name a regular file, and the offset and
length must lie inside it and match the tensor's shape. A model that breaks any of these is refused with one line;
nothing outside the model's directory is ever opened.

:class:`ExternalData` serves a lazily loaded model: main-graph initializers stay in their files and are read with
``numpy.fromfile`` when a fold needs them (never kept), and folded values are spilled to an anonymous temporary
file instead of being held in memory. :func:`write_with_external_data` then writes the output's data file tensor
by tensor: untouched tensors are copied from their source files in chunks, folded ones from the spill file.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import InputError

_CHUNK = 16 << 20  # bytes per read when copying tensor data between files
_ALIGN = 64 << 10  # large tensors start at multiples of this (what mmap-based loaders want)
_ALIGN_FROM = 1 << 20
_INLINE_BELOW = 1024  # like onnx.save's size_threshold: smaller tensors stay in the protobuf


class ExternalRef:
    """Where one tensor's bytes are: an absolute, checked path, an offset and a length."""

    __slots__ = ("path", "offset", "length")

    def __init__(self, path: Path, offset: int, length: int):
        self.path, self.offset, self.length = path, offset, length


def external_ref(tensor: TensorProto, base: Path) -> ExternalRef:
    """The checked location of an external tensor's bytes; InputError naming the tensor otherwise."""
    entries = {e.key: e.value for e in tensor.external_data}
    what = f"external data of tensor '{tensor.name}'"
    location = entries.get("location", "")
    if not location:
        raise InputError(f"{what} has no location")
    if "\x00" in location or os.path.isabs(location) or Path(location).drive or \
            any(part == ".." for part in Path(location.replace("\\", "/")).parts):
        raise InputError(f"{what} points outside the model's directory ('{location}')")
    base = base.resolve()
    path = (base / location).resolve()
    if not path.is_relative_to(base):
        raise InputError(f"{what} points outside the model's directory ('{location}' resolves to {path})")
    if not path.exists():
        raise InputError(f"{what}: file '{location}' not found beside the model")
    if not path.is_file():
        raise InputError(f"{what}: '{location}' is not a regular file")
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        raise InputError(f"{what} has a non-integer offset or length") from None
    size = path.stat().st_size
    if length is None:
        length = size - offset
    if offset < 0 or length < 0 or offset + length > size:
        raise InputError(f"{what} asks for bytes {offset}..{offset + length} of '{location}', which has {size}")
    expected = tensor_nbytes(tensor)
    if expected is not None and expected != length:
        raise InputError(f"{what} has {length} bytes in '{location}', but its shape {list(tensor.dims)} needs "
                         f"{expected}")
    return ExternalRef(path, offset, length)


def check_external_data(model: onnx.ModelProto, base: Path) -> None:
    """Check every external reference in the model (all graphs, Constant attributes, functions)."""
    for tensor in all_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            external_ref(tensor, base)


def load_external_tensor(tensor: TensorProto, base: Path) -> None:
    """Read a checked external tensor into ``raw_data`` (for the few that are not served lazily)."""
    tensor.raw_data = _read_bytes(external_ref(tensor, base))
    tensor.data_location = TensorProto.DEFAULT
    del tensor.external_data[:]


def load_all_external_data(model: onnx.ModelProto, base: Path, *, except_main_initializers: bool = False) -> None:
    """Load external tensors into the model; with ``except_main_initializers`` the main graph's initializers
    stay external (they are served by :class:`ExternalData`)."""
    for tensor in all_tensors(model, main_initializers=not except_main_initializers):
        if tensor.data_location == TensorProto.EXTERNAL:
            load_external_tensor(tensor, base)


class Spilled:
    """A folded tensor's bytes parked in the spill file instead of memory."""

    __slots__ = ("file", "offset", "nbytes", "dtype", "shape")

    def __init__(self, file, offset: int, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]):
        self.file, self.offset, self.nbytes, self.dtype, self.shape = file, offset, nbytes, dtype, shape

    def array(self) -> np.ndarray:
        self.file.seek(self.offset)
        return np.fromfile(self.file, dtype=self.dtype, count=math.prod(self.shape)).reshape(self.shape)

    def copy_to(self, out) -> None:
        self.file.seek(self.offset)
        _copy(self.file, out, self.nbytes)


class ExternalData:
    """The external files of one lazily loaded model, and a spill file for the values folding writes."""

    def __init__(self, base: Path):
        self.base = Path(base).resolve()
        self._spill = None

    def read(self, tensor: TensorProto) -> np.ndarray:
        """The tensor's values, read from its file now (not cached)."""
        ref = external_ref(tensor, self.base)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        with open(ref.path, "rb") as f:
            f.seek(ref.offset)
            return np.fromfile(f, dtype=dtype, count=ref.length // dtype.itemsize).reshape(tuple(tensor.dims))

    def spill(self, value: np.ndarray) -> Spilled:
        """Park ``value`` in the spill file (an unnamed temporary file, gone when closed)."""
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(prefix="bnfold-spill-")
        value = np.ascontiguousarray(value)
        self._spill.seek(0, os.SEEK_END)
        offset = self._spill.tell()
        self._spill.write(value.reshape(-1).view(np.uint8))
        return Spilled(self._spill, offset, value.nbytes, value.dtype, value.shape)

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None


def value_of(value) -> np.ndarray:
    """An array from a replacement that may be spilled."""
    return value.array() if isinstance(value, Spilled) else value


def write_with_external_data(model: onnx.ModelProto, model_file, data_path: Path, data_name: str,
                             replacements: dict | None, source: ExternalData | None) -> None:
    """Write the main graph's tensors of 1 KiB or more to ``data_path`` one by one (replacement values, bytes copied
    from their source files, or inline bytes), point the protobuf at them, then write the protobuf to
    ``model_file``. Deterministic: same model, same bytes."""
    from .io import write_streamed

    replacements = replacements or {}
    with open(data_path, "wb") as data:
        for tensor in model.graph.initializer:
            value = replacements.pop(tensor.name, None)
            external = tensor.data_location == TensorProto.EXTERNAL
            if value is None and not external and not tensor.HasField("raw_data"):
                continue  # typed fields (int64_data, ...): small by nature, they stay in the protobuf
            ref = None
            if value is not None:
                nbytes = value.nbytes
            elif external:
                if source is None:
                    raise InputError(f"tensor '{tensor.name}' is external but its source directory is unknown")
                ref = external_ref(tensor, source.base)
                nbytes = ref.length
            else:
                nbytes = len(tensor.raw_data)
            # Where a tensor goes depends on its size only, so every path to the same model gives the same bytes.
            if nbytes < _INLINE_BELOW:
                if value is not None:
                    tensor.raw_data = np.ascontiguousarray(value_of(value)).tobytes()
                elif ref is not None:
                    tensor.raw_data = _read_bytes(ref)
                del tensor.external_data[:]
                tensor.ClearField("data_location")
                continue
            offset = data.tell()
            if nbytes >= _ALIGN_FROM and offset % _ALIGN:
                data.write(b"\0" * (_ALIGN - offset % _ALIGN))
                offset = data.tell()
            if isinstance(value, Spilled):
                value.copy_to(data)
            elif value is not None:
                data.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
            elif ref is not None:
                with open(ref.path, "rb") as f:
                    f.seek(ref.offset)
                    _copy(f, data, ref.length)
            else:
                data.write(tensor.raw_data)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = TensorProto.EXTERNAL
            for key, val in (("location", data_name), ("offset", str(offset)), ("length", str(nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, val
    write_streamed(model, model_file)


def _copy(src, dst, nbytes: int) -> None:
    remaining = nbytes
    while remaining:
        chunk = src.read(min(_CHUNK, remaining))
        if not chunk:
            raise InputError("external data file ended early while copying")
        dst.write(chunk)
        remaining -= len(chunk)


def _read_bytes(ref: ExternalRef) -> bytes:
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        data = f.read(ref.length)
    if len(data) != ref.length:
        raise InputError(f"external data file '{ref.path.name}' ended early")
    return data


# Element types packed several to a byte in raw_data: elements per byte.
_PACKED = {getattr(TensorProto, name): per_byte for name, per_byte in
           (("INT4", 2), ("UINT4", 2), ("FLOAT4E2M1", 2), ("INT2", 4), ("UINT2", 4)) if hasattr(TensorProto, name)}
_UNCHECKED = {getattr(TensorProto, name) for name in ("FLOAT6E2M3", "FLOAT6E3M2") if hasattr(TensorProto, name)}
_itemsizes: dict[int, int | None] = {}


def tensor_nbytes(tensor: TensorProto) -> int | None:
    """The bytes raw_data needs for the tensor's shape, or None where that is not a fixed size."""
    data_type = tensor.data_type
    per_byte = _PACKED.get(data_type)
    if per_byte is not None:
        return (math.prod(tensor.dims) + per_byte - 1) // per_byte
    itemsize = _itemsizes.get(data_type, -1)
    if itemsize == -1:
        try:
            itemsize = None if data_type in _UNCHECKED else \
                np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
        except Exception:  # strings, unknown types: no fixed size to check
            itemsize = None
        _itemsizes[data_type] = itemsize
    return None if itemsize is None else math.prod(tensor.dims) * itemsize


TENSOR_ATTRIBUTE_OPS = frozenset({"Constant", "ConstantOfShape", "If", "Loop", "Scan", "SequenceMap"})


def all_tensors(model: onnx.ModelProto, main_initializers: bool = True):
    """Every TensorProto of the model: initializers and tensor attributes in all graphs and functions (the main
    graph's initializers only with ``main_initializers``)."""

    def graph_tensors(graph: onnx.GraphProto, initializers: bool = True):
        if initializers:
            yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        yield from node_tensors(graph.node)

    def node_tensors(nodes):
        for node in nodes:
            # in the default domain only these ops carry tensors or graphs in their attributes
            if node.op_type not in TENSOR_ATTRIBUTE_OPS and node.domain in ("", "ai.onnx"):
                continue
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors
                elif attr.type == onnx.AttributeProto.GRAPH:
                    yield from graph_tensors(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from graph_tensors(g)

    yield from graph_tensors(model.graph, main_initializers)
    for function in model.functions:
        yield from node_tensors(function.node)
