"""Exact numpy versions of the few ONNX ops that exporters put in constant subgraphs (the zero bias of a Conv
exported without one is ``Shape -> Expand -> CastLike -> Expand``; BN parameters may be ``Constant -> Cast``).

onnx's ReferenceEvaluator costs about 0.1 ms per node just to set up, which made evaluating these chains the
largest part of folding a small exported model. :func:`evaluate` covers the ops and dtypes whose numpy form is the
ONNX definition exactly and returns None for anything else, so the caller falls back to the reference evaluator.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

# numpy dtypes these kernels handle; anything else (bfloat16, float8, strings) goes to the reference evaluator.
_FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
_INTS = {np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)}


def evaluate(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray] | None:
    """The outputs of ``node`` on ``inputs`` (None for an absent optional input), or None if not covered here."""
    op = node.op_type
    if op not in _KERNELS:
        return None
    attrs = {} if op in _NO_ATTRIBUTES else {a.name: attribute_value(a) for a in node.attribute}
    result = _run(op, inputs, attrs, opset)
    return None if result is None else [result]


def evaluate_without_attributes(op: str, inputs: list[np.ndarray], opset: int) -> np.ndarray | None:
    """:func:`evaluate` for an op that takes no attributes (Expand, CastLike, ...), given by name: the same kernel
    and answer, without reading the node (the exporter's zero-bias chain runs this for every bias-less Conv)."""
    return _run(op, inputs, {}, opset) if op in _NO_ATTRIBUTES else None


def _run(op: str, inputs: list, attrs: dict, opset: int) -> np.ndarray | None:
    try:
        result = _KERNELS[op](inputs, attrs, opset)
    except (ValueError, IndexError, TypeError):  # malformed for numpy: let the reference evaluator judge it
        return None
    return None if result is None else np.asarray(result)


def attribute_value(attr: onnx.AttributeProto):
    """onnx.helper.get_attribute_value, without its dispatch for the scalar types attributes mostly have."""
    kind = attr.type
    if kind == onnx.AttributeProto.INT:
        return attr.i
    if kind == onnx.AttributeProto.FLOAT:
        return attr.f
    if kind == onnx.AttributeProto.INTS:
        return list(attr.ints)
    if kind == onnx.AttributeProto.STRING:  # (auto_pad)
        return attr.s
    return helper.get_attribute_value(attr)


def _identity(inputs, attrs, opset):
    return inputs[0]


def _shape(inputs, attrs, opset):
    shape = inputs[0].shape
    start, end = attrs.get("start", 0), attrs.get("end", None)
    return np.array(shape[start:end], dtype=np.int64)  # ONNX clamps start/end the way Python slicing does


def _cast_to(x: np.ndarray, target: np.dtype) -> np.ndarray | None:
    # Exact and specified: to a float type from any int/float (round to nearest even), and widening int casts.
    if x.dtype not in _FLOATS | _INTS or target not in _FLOATS | _INTS:
        return None
    if target in _FLOATS or x.dtype == target or (x.dtype in _INTS and np.can_cast(x.dtype, target, "safe")):
        return x.astype(target)
    return None


def _cast(inputs, attrs, opset):
    try:
        target = np.dtype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    except (KeyError, ValueError, TypeError):
        return None
    return _cast_to(inputs[0], target)


def _cast_like(inputs, attrs, opset):
    return _cast_to(inputs[0], inputs[1].dtype)


def _expand(inputs, attrs, opset):
    x, shape = inputs
    dims = tuple(shape.tolist())
    if x.size == 1 and min(dims, default=0) >= 0:  # the exporters' commonest case: fill with one value
        rank = max(x.ndim, len(dims))
        out = np.empty((1,) * (rank - len(dims)) + dims, dtype=x.dtype)
        out.fill(x.reshape(())[()])
        return out
    return np.broadcast_to(x, np.broadcast_shapes(x.shape, dims)).copy()


def _axes(inputs, attrs, opset) -> list[int] | None:
    if opset >= 13:
        return [int(a) for a in inputs[1]] if len(inputs) > 1 and inputs[1] is not None else None
    return list(attrs["axes"]) if "axes" in attrs else None


def _unsqueeze(inputs, attrs, opset):
    axes = _axes(inputs, attrs, opset)
    if not axes:
        return None
    return np.expand_dims(inputs[0], tuple(axes))  # numpy reads the axes in the output's rank, as ONNX does


def _squeeze(inputs, attrs, opset):
    axes = _axes(inputs, attrs, opset)
    x = inputs[0]
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(axes))


def _reshape(inputs, attrs, opset):
    x, shape = inputs
    dims = [int(d) for d in shape]
    if not attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _concat(inputs, attrs, opset):
    return np.concatenate([i for i in inputs if i is not None], axis=attrs["axis"])


def _constant_of_shape(inputs, attrs, opset):
    value = attrs.get("value")
    fill = numpy_helper.to_array(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
    if fill.dtype not in _FLOATS | _INTS:
        return None
    return np.full(tuple(int(d) for d in inputs[0]), fill[0], dtype=fill.dtype)


def _float_binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    def kernel(inputs, attrs, opset):
        a, b = inputs
        if opset < 7 or a.dtype != b.dtype or a.dtype not in _FLOATS:  # legacy broadcast attributes, int division
            return None
        return fn(a, b).astype(a.dtype)

    return kernel


# Ops whose numpy form here reads no attribute: their attributes are not even parsed.
_NO_ATTRIBUTES = frozenset({"Identity", "CastLike", "Expand", "Add", "Sub", "Mul", "Div"})

_KERNELS = {
    "Identity": _identity,
    "Shape": _shape,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Expand": _expand,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Reshape": _reshape,
    "Concat": _concat,
    "ConstantOfShape": _constant_of_shape,
    "Add": _float_binary(np.add),
    "Sub": _float_binary(np.subtract),
    "Mul": _float_binary(np.multiply),
    "Div": _float_binary(np.divide),
}
