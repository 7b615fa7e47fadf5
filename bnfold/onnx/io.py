"""Loading and saving ONNX models: clear errors for bad files, atomic writes, external data kept external."""

from __future__ import annotations

import functools
import math
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError

from ..errors import InputError, first_line, require_file
from ..files import write_atomically
from .external import (TENSOR_ATTRIBUTE_OPS, ExternalData, all_tensors, check_external_data, load_all_external_data,
                       tensor_nbytes, value_of, write_with_external_data)

_PROTOBUF_LIMIT = 2**31 - 1


def load_model(path: "str | os.PathLike") -> onnx.ModelProto:
    """Read a model and its external data; any problem becomes an InputError with one line."""
    return load_model_with_info(path)[0]


def load_model_with_info(path: "str | os.PathLike") -> tuple[onnx.ModelProto, bool]:
    """``(model, external)``: the model with its external data loaded, and whether the file used external data
    (so that the output can keep it)."""
    path = require_file(path, "an ONNX file")
    model = _parse_checked(path)
    external = has_external_data(model)
    if external:
        check_external_data(model, path.parent)
        load_all_external_data(model, path.parent)
    return model, external


def load_model_lazily(path: "str | os.PathLike") -> tuple[onnx.ModelProto, "ExternalData | None"]:
    """``(model, external)``: like :func:`load_model_with_info`, but the main graph's external initializers stay in
    their files, served one at a time by the returned :class:`ExternalData` (None when the model has none)."""
    path = require_file(path, "an ONNX file")
    model = _parse_checked(path)
    if not has_external_data(model):
        return model, None
    check_external_data(model, path.parent)
    load_all_external_data(model, path.parent, except_main_initializers=True)
    return model, ExternalData(path.parent)


def _parse_checked(path: Path) -> onnx.ModelProto:
    try:
        model = _parse_file(path)
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not an ONNX model (protobuf parse failed: {first_line(exc)})") from None
    except Exception as exc:  # onnx raises a variety of types for garbage
        raise InputError(f"{path}: not an ONNX model ({type(exc).__name__}: {first_line(exc)})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise InputError(f"{path}: not an ONNX model (no graph)")
    if not model.opset_import and model.ir_version >= 3:
        raise InputError(f"{path}: invalid model: no opset_import")
    _check_tensor_sizes(model, path)
    return model


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Every tensor held in raw_data has the bytes its shape needs (a corrupt file otherwise fails deep inside
    numpy, or not at all where a command never reads that tensor)."""
    external = onnx.TensorProto.EXTERNAL
    for tensor in all_tensors(model):
        if tensor.data_location == external:
            continue
        raw = tensor.raw_data
        if not raw and not tensor.HasField("raw_data"):
            continue  # values in typed fields (float_data, ...), or none
        expected = tensor_nbytes(tensor)
        if expected is not None and len(raw) != expected:
            raise InputError(f"{path}: invalid model: tensor '{tensor.name}' has {len(raw)} bytes, "
                             f"but its shape {list(tensor.dims)} needs {expected}")


def _parse_file(path: Path) -> onnx.ModelProto:
    """Parse a binary ONNX file straight from a read-only memory map of it.

    Reading the file into a bytes object first (as onnx.load does) costs a second copy of the whole model in fresh
    memory; parsing from the mapped page cache is several times faster and the file is never writable.
    """
    model = onnx.ModelProto()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise InputError(f"{path}: empty file")
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # not mappable (a pipe, some network file systems): read it
            model.ParseFromString(f.read())
            return model
        with mapped:
            view = memoryview(mapped)
            try:
                model.ParseFromString(view)
            finally:
                view.release()
    return model


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor (initializer, Constant attribute, in any subgraph) lives in an external file."""
    return _graph_has_external(model.graph) or any(_nodes_have_external(f.node) for f in model.functions)


def _graph_has_external(graph: onnx.GraphProto) -> bool:
    external = onnx.TensorProto.EXTERNAL
    return any(t.data_location == external for t in graph.initializer) or _nodes_have_external(graph.node)


def _nodes_have_external(nodes) -> bool:
    external = onnx.TensorProto.EXTERNAL
    for node in nodes:
        if node.op_type not in TENSOR_ATTRIBUTE_OPS and node.domain in ("", "ai.onnx"):
            continue  # no tensor or graph attributes
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_location == external:
                return True
            if attr.type == onnx.AttributeProto.GRAPH and _graph_has_external(attr.g):
                return True
            if attr.type == onnx.AttributeProto.GRAPHS and any(_graph_has_external(g) for g in attr.graphs):
                return True
    return False


def estimated_size(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers, from their shapes (reading raw_data would copy it)."""
    itemsizes: dict[int, int] = {}
    total = 0
    for t in model.graph.initializer:
        if t.data_type not in itemsizes:
            try:
                itemsizes[t.data_type] = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            except Exception:  # string or unknown element types: count one byte each
                itemsizes[t.data_type] = 1
        total += math.prod(t.dims[:]) * itemsizes[t.data_type]  # (a slice reads the dims fastest)
    return total


def save_model(model: onnx.ModelProto, path: "str | os.PathLike", *, external_data: bool | None = None,
               replacements: "dict[str, np.ndarray] | None" = None, source: "ExternalData | None" = None) -> None:
    """Write atomically: a temporary file beside the target, then a rename. No partial output on failure.

    ``external_data``: write tensors to ``<name>.data`` beside the model (None: only when the model exceeds the 2 GB
    protobuf limit). Saving with external data moves the tensors out of the in-memory model; ``source`` serves the
    tensors of a lazily loaded model (:func:`load_model_lazily`) that still live in their files.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"{path}: output directory {directory} does not exist")
    size = None
    if external_data is None:  # from shapes: upb's ByteSize would serialize the whole model to count it
        size = estimated_size(model)
        external_data = size > _PROTOBUF_LIMIT - (64 << 20)
    if not external_data:
        _save_inline(model, path, replacements, size)
        return
    try:
        tmp_dir = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        tmp_model = Path(tmp_dir) / path.name
        data_path = data_file(tmp_model)
        with open(tmp_model, "wb") as f:
            write_with_external_data(model, f, data_path, data_path.name, replacements, source)
        if not data_path.stat().st_size:  # every tensor small enough to stay inline: no data file
            data_path.unlink()
        move_model(tmp_model, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def data_file(path: "str | os.PathLike") -> Path:
    """The external-data file that :func:`save_model` writes beside a model: ``<model file name>.data``."""
    path = Path(path)
    return path.with_name(f"{path.name}.data")


def move_model(staged: Path, path: Path) -> None:
    """Rename a model saved as ``staged`` (and its :func:`data_file`, when it has one) to ``path`` in the same file
    system; the model file goes last, so it never appears before its data. Both keep their names' meaning: a model
    saved with external data must be staged under ``path``'s file name (its references name the data file)."""
    try:
        if data_file(staged).exists():
            os.replace(data_file(staged), data_file(path))
        os.replace(staged, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None


# Below this many bytes of weights a model is serialized in one piece: streaming saves memory, not time. Both
# ways write the same bytes.
_STREAM_FROM = 16 << 20


def _save_inline(model: onnx.ModelProto, path: Path, replacements, size: int | None = None) -> None:
    """One file: written to a temporary file in the same directory, then renamed over ``path``. ``size``: the
    model's :func:`estimated_size`, when the caller has it."""
    if (estimated_size(model) if size is None else size) < _STREAM_FROM:
        materialize(model, replacements)
        data = model.SerializeToString()
        write_atomically(path, lambda f: f.write(data))
    else:
        write_atomically(path, lambda f: write_streamed(model, f, replacements))


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# The field layout comes from the protobuf descriptors of this onnx, never from numbers written here: a field
# added by a newer onnx falls on the right side of the split by its number.
_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA_FIELD = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
_LENGTH_DELIMITED = 2  # protobuf wire type of messages and bytes


def _tag(number: int) -> bytes:
    """The key of a length-delimited field ``number``."""
    return _varint(number << 3 | _LENGTH_DELIMITED)


_GRAPH_TAG, _INITIALIZER_TAG, _RAW_DATA_TAG = _tag(_GRAPH_FIELD), _tag(_INITIALIZER_FIELD), _tag(_RAW_DATA_FIELD)
# TensorProto fields serialized after raw_data: (name, repeated). Checked by presence, never read (reading a bytes
# field would copy it).
_TENSOR_FIELDS_AFTER_RAW_DATA = tuple((f.name, f.is_repeated) for f in
                                      onnx.TensorProto.DESCRIPTOR.fields if f.number > _RAW_DATA_FIELD)


def write_streamed(model: onnx.ModelProto, f, replacements: "dict[str, np.ndarray] | None" = None) -> None:
    """Serialize ``model`` in pieces, the main graph's initializers one at a time, into exactly the bytes
    ``model.SerializeToString()`` gives (protobuf writes fields in number order; the graph's length is summed from
    its pieces first), while memory never holds a serialized copy of the whole model.

    ``replacements`` maps initializer names to new values (same dtype and shape) that are written in place of the
    tensor's raw_data without being copied into the protobuf first; the stale raw_data of those tensors is dropped
    from ``model``. The bytes are the same as for the materialized model.
    """
    model_low, model_high, graph_low, graph_high = (onnx.ModelProto(), onnx.ModelProto(), onnx.GraphProto(),
                                                    onnx.GraphProto())
    _copy_fields(model, model_low, lambda field: field.number < _GRAPH_FIELD)
    _copy_fields(model, model_high, lambda field: field.number > _GRAPH_FIELD)
    _copy_fields(model.graph, graph_low, lambda field: field.number < _INITIALIZER_FIELD)
    _copy_fields(model.graph, graph_high, lambda field: field.number > _INITIALIZER_FIELD)
    # Fields this onnx does not know (written by a newer ONNX) come last, after the known ones, as upb writes them.
    graph_low_bytes = graph_low.SerializeToString()
    graph_high_bytes = graph_high.SerializeToString() + _unknown_bytes(model.graph)
    replacements = replacements or {}
    # Per initializer: None (serialized when written; only its size now) or, for a replaced one, (the tensor's bytes
    # up to raw_data, the replacement's bytes, the rest). upb's ByteSize encodes the tensor to count it, so a
    # tensor that is not replaced is encoded twice: the price of never holding them all serialized at once.
    pieces: list = []
    sizes = []
    for tensor in model.graph.initializer:
        value = replacements.get(tensor.name)
        if value is None:
            pieces.append(None)
            sizes.append(tensor.ByteSize())
            continue
        raw = np.ascontiguousarray(value).reshape(-1).view(np.uint8)  # bytes, also for zero-size arrays
        unknown = _unknown_bytes(tensor)
        if unknown or _has_fields_after_raw_data(tensor):  # rare: split the other fields around raw_data
            low, high = onnx.TensorProto(), onnx.TensorProto()
            _copy_fields(tensor, low, lambda field: field.number < _RAW_DATA_FIELD)
            _copy_fields(tensor, high, lambda field: field.number > _RAW_DATA_FIELD)
        else:
            tensor.ClearField("raw_data")  # stale: the replacement is written in its place
            low, high = tensor, None
        head = low.SerializeToString() + _raw_data_header(raw.nbytes)
        tail = (high.SerializeToString() if high is not None else b"") + unknown
        pieces.append((head, raw, tail))
        sizes.append(len(head) + raw.nbytes + len(tail))
    graph_size = len(graph_low_bytes) + len(graph_high_bytes) + sum(
        len(_INITIALIZER_TAG) + len(_varint(size)) + size for size in sizes)
    f.write(model_low.SerializeToString())
    f.write(_GRAPH_TAG + _varint(graph_size) + graph_low_bytes)
    for tensor, piece, size in zip(model.graph.initializer, pieces, sizes):
        if piece is None:
            body = tensor.SerializeToString()
            if len(body) != size:
                raise AssertionError("an initializer changed size while it was written")
            f.write(_INITIALIZER_TAG + _varint(size))
            f.write(body)
            continue
        head, raw, tail = piece
        f.write(_INITIALIZER_TAG + _varint(size) + head)
        f.write(raw)
        if tail:
            f.write(tail)
    f.write(graph_high_bytes)
    f.write(model_high.SerializeToString() + _unknown_bytes(model))


def _unknown_bytes(message) -> bytes:
    """The fields of ``message`` that this onnx does not know, encoded as SerializeToString writes them."""
    fields = unknown_fields.UnknownFieldSet(message)
    return _encode_unknown(fields) if len(fields) else b""


def _encode_unknown(fields) -> bytes:
    out = bytearray()
    for field in fields:
        number, wire, data = field.field_number, field.wire_type, field.data
        out += _varint(number << 3 | wire)
        if wire == 0:  # varint
            out += _varint(data & 0xFFFF_FFFF_FFFF_FFFF)
        elif wire == 1:  # fixed 64 bits
            out += (data & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")
        elif wire == 2:  # length-delimited
            out += _varint(len(data)) + data
        elif wire == 3:  # group: its fields, then the end-group tag
            out += _encode_unknown(data) + _varint(number << 3 | 4)
        elif wire == 5:  # fixed 32 bits
            out += (data & 0xFFFF_FFFF).to_bytes(4, "little")
        else:
            raise InputError(f"invalid model: unknown field {number} has wire type {wire}")
    return bytes(out)


@functools.lru_cache(maxsize=1024)
def _raw_data_header(nbytes: int) -> bytes:
    return _RAW_DATA_TAG + _varint(nbytes)


def _fields_after_raw_data_check():
    """``tensor -> bool``: whether any field after raw_data is set, as one expression compiled from the descriptor's
    field names (called for every initializer written: a loop over the names cost several times as much)."""
    terms = [f"len(t.{name})" if repeated else f"t.HasField({name!r})"
             for name, repeated in _TENSOR_FIELDS_AFTER_RAW_DATA]
    return eval(f"lambda t: bool({' or '.join(terms) or 'False'})")  # names from onnx's own descriptor


_has_fields_after_raw_data = _fields_after_raw_data_check()


def materialize(model: onnx.ModelProto, replacements: "dict[str, np.ndarray] | None",
                initializers: "dict[str, onnx.TensorProto] | None" = None) -> None:
    """Write pending replacement values into the model's initializers (and forget them). ``initializers``: the main
    graph's initializers by name, when at hand (every replaced one among them)."""
    if not replacements:
        return
    if initializers is None:
        initializers = {}
        for tensor in model.graph.initializer:
            if tensor.name in replacements:
                initializers.setdefault(tensor.name, tensor)  # (a name given twice: its first tensor)
    for name in [name for name in replacements if name in initializers]:
        tensor = initializers[name]
        tensor.raw_data = value_of(replacements.pop(name)).tobytes()  # (C order whatever the array's layout)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


def _copy_fields(src, dst, keep) -> None:
    """Copy the fields of message ``src`` for which ``keep(field_descriptor)`` holds into ``dst``."""
    for field, value in src.ListFields():
        if not keep(field):
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)
