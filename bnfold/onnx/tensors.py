"""Tensor storage: reading an initializer's values and deciding where a new value lives (in place in the
protobuf, as a pending replacement written when the model is saved, or spilled next to external data)."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from .external import ExternalData

RAW_FLOAT_DTYPES = {onnx.TensorProto.FLOAT: np.dtype(np.float32), onnx.TensorProto.FLOAT16: np.dtype(np.float16),
                     onnx.TensorProto.DOUBLE: np.dtype(np.float64)}


# Element types whose raw_data numpy reads as is (little-endian, fixed size): a fast path past numpy_helper.
_RAW_DTYPES = {**RAW_FLOAT_DTYPES, onnx.TensorProto.INT64: np.dtype(np.int64),
               onnx.TensorProto.INT32: np.dtype(np.int32)}


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """numpy_helper.to_array, with a fast path for float and int tensors held in raw_data (the common case)."""
    dtype = _RAW_DTYPES.get(tensor.data_type)
    if dtype is not None:
        raw = tensor.raw_data
        if raw:
            dims = tuple(tensor.dims[:])  # (a slice reads a repeated field faster than iterating it)
            if len(raw) == math.prod(dims) * dtype.itemsize:
                return np.frombuffer(raw, dtype=dtype).reshape(dims)
    return numpy_helper.to_array(tensor)


_RAW_FLOAT_TYPES = {dtype: data_type for data_type, dtype in RAW_FLOAT_DTYPES.items()}


def fill_tensor(tensor: onnx.TensorProto, value: np.ndarray, name: str) -> None:
    """Make the empty ``tensor`` what numpy_helper.from_array(value, name) gives."""
    data_type = _RAW_FLOAT_TYPES.get(value.dtype)
    if data_type is None:
        tensor.CopyFrom(numpy_helper.from_array(value, name))
        return
    tensor.dims.extend(value.shape)
    tensor.data_type = data_type
    tensor.name = name
    tensor.raw_data = value.tobytes()  # C order, whatever the array's layout, as from_array writes it



def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, or None for attributes that hold no numeric tensor (strings, sparse)."""
    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            return tensor_to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None



def store_value(tensor: onnx.TensorProto, value: np.ndarray, replacements: "dict[str, np.ndarray] | None",
                external: "ExternalData | None", *, name: str, dims: tuple[int, ...], in_file: bool) -> None:
    """Give the initializer ``tensor`` the new ``value`` (same dtype), keeping its name.

    ``replacements``: the main graph's pending new values (None in a subgraph, whose tensors are written at once);
    ``external``: serves the main graph's tensors that stay in external files (a lazily loaded model).
    ``name``, ``dims``, ``in_file`` (its data is external): the tensor's, as the caller already read them (each
    protobuf field read costs about as much as the rest of a small fold's write).
    """
    if in_file and dims == value.shape and onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type) == value.dtype:
        replacements[name] = external.spill(value)  # written out when the model is saved
    elif RAW_FLOAT_DTYPES.get(tensor.data_type) == value.dtype and dims == value.shape and \
            tensor.HasField("raw_data"):
        if replacements is not None:  # same dtype and shape: the bytes are swapped when saved
            replacements[name] = value
        else:
            tensor.raw_data = value.tobytes()
    else:
        if replacements is not None:  # a value pending from an earlier fold is superseded (a new shape), not saved
            replacements.pop(name, None)
        new = numpy_helper.from_array(value, name)
        if new.data_type != tensor.data_type:
            raise AssertionError("folding must keep the tensor's dtype")
        doc = tensor.doc_string if tensor.HasField("doc_string") else None
        tensor.CopyFrom(new)
        if doc is not None:  # an unset doc_string stays unset (set-but-empty is serialized)
            tensor.doc_string = doc

