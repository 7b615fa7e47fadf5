"""Independent float64 reference interpreter for (a subset of) ONNX graphs.

This module is deliberately self-contained: it uses only numpy, ml_dtypes and
``onnx`` (for protobuf parsing and ``numpy_helper.to_array``).  It must never
import bnfold nor onnxruntime, because the equivalence tests use it as the
ground truth against which both are judged.

Semantics follow the ONNX operator specification.  Every floating tensor
(float16 / bfloat16 / float32 / float64 / float8 initializers, Constant values
and feeds) is converted *exactly* to float64 and all arithmetic is done in
float64; integer and bool tensors keep their dtype.  Casts to floating types
keep float64 (the reference is the idealised, infinitely-precise model), casts
to integer/bool types are performed.

Public entry point::

    run_reference(model, feeds) -> {output_name: np.ndarray}
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["run_reference"]

_DEFAULT_DOMAINS = ("", "ai.onnx")

_FLOAT_TENSOR_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}

_INT_TENSOR_TYPES = {
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.INT16: np.int16,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.UINT16: np.uint16,
    onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.UINT64: np.uint64,
    onnx.TensorProto.BOOL: np.bool_,
}

_ML_FLOAT_DTYPES = set()
for _name in (
    "bfloat16",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e4m3b11fnuz",
    "float4_e2m1fn",
):
    if hasattr(ml_dtypes, _name):
        _ML_FLOAT_DTYPES.add(np.dtype(getattr(ml_dtypes, _name)))


# --------------------------------------------------------------------------
# dtype handling
# --------------------------------------------------------------------------


def _is_floating(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" or a.dtype in _ML_FLOAT_DTYPES


def _to_f64_if_float(a) -> np.ndarray:
    a = np.asarray(a)
    if _is_floating(a):
        return a.astype(np.float64)
    return a


def _tensor_to_array(t: onnx.TensorProto) -> np.ndarray:
    return _to_f64_if_float(numpy_helper.to_array(t))


# --------------------------------------------------------------------------
# attributes
# --------------------------------------------------------------------------


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        if a.ref_attr_name:
            raise NotImplementedError(
                f"attribute reference {a.name!r} (function bodies) is not supported"
            )
        if a.type == onnx.AttributeProto.TENSOR:
            out[a.name] = _tensor_to_array(a.t)
        elif a.type == onnx.AttributeProto.GRAPH:
            out[a.name] = a.g
        else:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode("utf-8")
            elif isinstance(v, list) and v and isinstance(v[0], bytes):
                v = [s.decode("utf-8") for s in v]
            out[a.name] = v
    return out


def _f32(v: float) -> float:
    """Float attribute defaults are float32 values in ONNX (e.g. epsilon 1e-5)."""
    return float(np.float32(v))


def _opset_of(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in _DEFAULT_DOMAINS:
            return int(op.version)
    # ONNX: if no default-domain import is given, the IR version implies one;
    # every model this project handles declares it, so be strict.
    raise ValueError("model has no opset_import for the default ONNX domain")


# --------------------------------------------------------------------------
# padding helpers shared by Conv and pooling
# --------------------------------------------------------------------------


def _explicit_pads(attrs: dict, nd: int) -> tuple[list[int], list[int]]:
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    if len(pads) != 2 * nd:
        raise ValueError(f"pads has {len(pads)} entries, expected {2 * nd}")
    return pads[:nd], pads[nd:]


def _forward_pads(
    attrs: dict,
    in_shape: tuple[int, ...],
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
) -> tuple[list[int], list[int]]:
    """Begin/end pads for Conv / pooling, honouring auto_pad."""
    nd = len(in_shape)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        return _explicit_pads(attrs, nd)
    if auto_pad == "VALID":
        return [0] * nd, [0] * nd
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nd):
            out = -(-in_shape[i] // strides[i])  # ceil
            eff_k = (kernel[i] - 1) * dilations[i] + 1
            total = max(0, (out - 1) * strides[i] + eff_k - in_shape[i])
            small, big = total // 2, total - total // 2
            if auto_pad == "SAME_UPPER":  # extra padding at the end
                begin.append(small)
                end.append(big)
            else:  # SAME_LOWER: extra padding at the beginning
                begin.append(big)
                end.append(small)
        return begin, end
    raise ValueError(f"unknown auto_pad {auto_pad!r}")


def _pad_spatial(x: np.ndarray, begin, end, value=0.0) -> np.ndarray:
    """Pad (positive) or crop (negative) the trailing spatial axes of x."""
    nd = len(begin)
    lead = x.ndim - nd
    # crop negatives first
    sl = [slice(None)] * lead
    for b, e, n in zip(begin, end, x.shape[lead:]):
        sl.append(slice(max(0, -b), n - max(0, -e)))
    x = x[tuple(sl)]
    widths = [(0, 0)] * lead + [(max(0, b), max(0, e)) for b, e in zip(begin, end)]
    if any(w != (0, 0) for w in widths):
        x = np.pad(x, widths, mode="constant", constant_values=value)
    return x


def _window_slices(offsets, dilations, strides, out_shape, lead: int):
    sl = [slice(None)] * lead
    for o, d, s, n in zip(offsets, dilations, strides, out_shape):
        start = o * d
        sl.append(slice(start, start + s * (n - 1) + 1, s))
    return tuple(sl)


# --------------------------------------------------------------------------
# Conv / ConvTranspose
# --------------------------------------------------------------------------


def _conv(x, w, b, attrs):
    if x.ndim < 3:
        raise ValueError("Conv input must have rank >= 3")
    nd = x.ndim - 2
    n, c = x.shape[:2]
    m = w.shape[0]
    group = int(attrs.get("group", 1))
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    if tuple(kernel) != tuple(w.shape[2:]):
        raise ValueError(f"kernel_shape {kernel} does not match W {w.shape}")
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    if c % group or m % group or w.shape[1] != c // group:
        raise ValueError(f"Conv: bad group={group} for X {x.shape}, W {w.shape}")
    begin, end = _forward_pads(attrs, x.shape[2:], kernel, strides, dilations)
    xp = _pad_spatial(x, begin, end)
    out_shape = []
    for i in range(nd):
        eff_k = (kernel[i] - 1) * dilations[i] + 1
        out_shape.append((xp.shape[2 + i] - eff_k) // strides[i] + 1)
    if any(o <= 0 for o in out_shape):
        raise ValueError(f"Conv output shape {out_shape} is empty")
    cg, mg = c // group, m // group
    y = np.zeros((n, group, mg, *out_shape), dtype=np.float64)
    wg = w.reshape(group, mg, cg, *kernel)
    for off in itertools.product(*(range(k) for k in kernel)):
        patch = xp[_window_slices(off, dilations, strides, out_shape, 2)]
        patch = patch.reshape(n, group, cg, *out_shape)
        wk = wg[(Ellipsis, *off)]  # [group, mg, cg]
        y += np.einsum("ngc...,gmc->ngm...", patch, wk)
    y = y.reshape(n, m, *out_shape)
    if b is not None:
        y = y + b.reshape((m,) + (1,) * nd)
    return y


def _conv_transpose(x, w, b, attrs):
    if x.ndim < 3:
        raise ValueError("ConvTranspose input must have rank >= 3")
    nd = x.ndim - 2
    n, c = x.shape[:2]
    group = int(attrs.get("group", 1))
    if c % group or w.shape[0] != c:
        raise ValueError(f"ConvTranspose: bad group={group} for X {x.shape}, W {w.shape}")
    mg = w.shape[1]
    m = mg * group
    cg = c // group
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    if tuple(kernel) != tuple(w.shape[2:]):
        raise ValueError(f"kernel_shape {kernel} does not match W {w.shape}")
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    out_pad = list(attrs.get("output_padding", [0] * nd))
    in_shape = x.shape[2:]
    # Full ("uncropped") output extent.
    full = [
        strides[i] * (in_shape[i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1
        for i in range(nd)
    ]
    auto_pad = attrs.get("auto_pad", "NOTSET")
    output_shape = attrs.get("output_shape")
    if output_shape is not None and len(output_shape) == nd + 2:
        output_shape = list(output_shape)[2:]  # tolerate N,C-prefixed form
    if output_shape is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        output_shape = [in_shape[i] * strides[i] for i in range(nd)]
    if output_shape is not None:
        # Spec: pads are generated from output_shape; for SAME_UPPER the
        # extra (odd) unit of padding goes at the end, otherwise at the start.
        # A negative total (requested output larger than the natural extent)
        # acts as implicit output_padding: zeros (+ bias) appended at the end,
        # as onnxruntime and onnx.reference (NOTSET) do.
        begin, end = [], []
        for i in range(nd):
            total = full[i] - int(output_shape[i])
            if total < 0:
                begin.append(0)
                end.append(total)
                continue
            small, big = total // 2, total - total // 2
            if auto_pad == "SAME_UPPER":
                begin.append(small)
                end.append(big)
            else:
                begin.append(big)
                end.append(small)
    elif auto_pad == "VALID":
        begin, end = [0] * nd, [0] * nd
    else:
        begin, end = _explicit_pads(attrs, nd)

    yfull = np.zeros((n, group, mg, *full), dtype=np.float64)
    xg = x.reshape(n, group, cg, *in_shape)
    wg = w.reshape(group, cg, mg, *kernel)
    for off in itertools.product(*(range(k) for k in kernel)):
        wk = wg[(Ellipsis, *off)]  # [group, cg, mg]
        contrib = np.einsum("ngc...,gcm->ngm...", xg, wk)
        yfull[_window_slices(off, dilations, strides, in_shape, 3)] += contrib
    yfull = yfull.reshape(n, m, *full)
    # crop pads (negative pads extend with zeros)
    y = _pad_spatial(yfull, [-p for p in begin], [-p for p in end])
    if any(s <= 0 for s in y.shape[2:]):
        raise ValueError(f"ConvTranspose output shape {y.shape} is empty")
    if b is not None:
        y = y + b.reshape((m,) + (1,) * nd)
    return y


# --------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------


def _pool(x, attrs, kind: str):
    nd = x.ndim - 2
    if int(attrs.get("ceil_mode", 0)):
        raise NotImplementedError(f"{kind}Pool with ceil_mode=1")
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    begin, end = _forward_pads(attrs, x.shape[2:], kernel, strides, dilations)
    fill = -np.inf if kind == "Max" else 0.0
    if kind == "Max" and not _is_floating(x):
        fill = np.iinfo(x.dtype).min
    xp = _pad_spatial(x, begin, end, value=fill)
    out_shape = [
        (xp.shape[2 + i] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1
        for i in range(nd)
    ]
    windows = [
        xp[_window_slices(off, dilations, strides, out_shape, 2)]
        for off in itertools.product(*(range(k) for k in kernel))
    ]
    stack = np.stack(windows, axis=-1)
    if kind == "Max":
        return stack.max(axis=-1)
    total = stack.sum(axis=-1)
    if int(attrs.get("count_include_pad", 0)):
        # divisor counts explicit padding but not positions past the padded input
        return total / float(np.prod(kernel))
    ones = _pad_spatial(np.ones((1, 1, *x.shape[2:])), begin, end, value=0.0)
    counts = np.stack(
        [
            ones[_window_slices(off, dilations, strides, out_shape, 2)]
            for off in itertools.product(*(range(k) for k in kernel))
        ],
        axis=-1,
    ).sum(axis=-1)
    return total / counts


# --------------------------------------------------------------------------
# misc helpers
# --------------------------------------------------------------------------


def _norm_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis % rank


def _int_div(a, b):
    # ONNX / C semantics: truncation towards zero
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) ^ (b < 0), -q, q).astype(np.result_type(a, b))


def _legacy_broadcast(node_attrs: dict, a, b, opset: int):
    """Opset < 7 binary ops: explicit broadcast=1 with optional axis."""
    if opset < 7 and int(node_attrs.get("broadcast", 0)) and b.ndim < a.ndim:
        axis = node_attrs.get("axis")
        if axis is None:
            axis = a.ndim - b.ndim
        axis = _norm_axis(axis, a.ndim)
        b = b.reshape(b.shape + (1,) * (a.ndim - axis - b.ndim))
    return a, b


def _binary(fn_float, fn_int=None):
    def impl(ctx, node, ins, attrs):
        a, b = ins[0], ins[1]
        a, b = _legacy_broadcast(attrs, a, b, ctx.opset)
        if fn_int is not None and not _is_floating(a) and not _is_floating(b):
            return [fn_int(a, b)]
        return [fn_float(a, b)]

    return impl


def _unary(fn):
    def impl(ctx, node, ins, attrs):
        return [fn(ins[0])]

    return impl


def _optional(ins, i):
    return ins[i] if i < len(ins) else None


# --------------------------------------------------------------------------
# op implementations: impl(ctx, node, inputs, attrs) -> list of outputs
# --------------------------------------------------------------------------


def _op_conv(ctx, node, ins, attrs):
    return [_conv(ins[0], ins[1], _optional(ins, 2), attrs)]


def _op_conv_transpose(ctx, node, ins, attrs):
    return [_conv_transpose(ins[0], ins[1], _optional(ins, 2), attrs)]


def _op_gemm(ctx, node, ins, attrs):
    a, b = ins[0], ins[1]
    c = _optional(ins, 2)
    if int(attrs.get("transA", 0)):
        a = a.T
    if int(attrs.get("transB", 0)):
        b = b.T
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError("Gemm operands must be 2-D")
    y = float(attrs.get("alpha", 1.0)) * (a @ b)
    if c is not None:
        y = y + float(attrs.get("beta", 1.0)) * c
    return [y]


def _op_matmul(ctx, node, ins, attrs):
    return [np.matmul(ins[0], ins[1])]


def _op_batchnorm(ctx, node, ins, attrs):
    x, scale, bias, mean, var = ins[:5]
    if int(attrs.get("training_mode", 0)):
        raise NotImplementedError("BatchNormalization with training_mode=1")
    if ctx.opset < 14 and any(node.output[1:]):
        raise NotImplementedError(
            "BatchNormalization with training outputs (mean/var/saved_*)"
        )
    eps = float(attrs.get("epsilon", _f32(1e-5)))
    spatial = int(attrs.get("spatial", 1)) if ctx.opset < 9 else 1
    if spatial:
        shape = (x.shape[1],) + (1,) * (x.ndim - 2)
    else:
        # per-activation parameters: shape [C, D1, ..., Dn]
        shape = x.shape[1:]

    def p(v):
        return np.asarray(v, dtype=np.float64).reshape(shape)

    y = p(scale) * (x - p(mean)) / np.sqrt(p(var) + eps) + p(bias)
    return [y] + [None] * (len(node.output) - 1)


def _op_clip(ctx, node, ins, attrs):
    x = ins[0]
    if ctx.opset < 11:
        lo = attrs.get("min", -np.inf)
        hi = attrs.get("max", np.inf)
    else:
        lo, hi = _optional(ins, 1), _optional(ins, 2)
    if lo is not None:
        x = np.maximum(x, lo)
    if hi is not None:
        x = np.minimum(x, hi)
    return [x]


def _op_leaky_relu(ctx, node, ins, attrs):
    alpha = float(attrs.get("alpha", _f32(0.01)))
    x = ins[0]
    return [np.where(x >= 0, x, alpha * x)]


def _op_flatten(ctx, node, ins, attrs):
    x = ins[0]
    axis = int(attrs.get("axis", 1))
    if axis < 0:
        axis += x.ndim
    if not 0 <= axis <= x.ndim:
        raise ValueError(f"Flatten axis {axis} out of range")
    a = int(np.prod(x.shape[:axis], dtype=np.int64))
    return [x.reshape(a, int(np.prod(x.shape[axis:], dtype=np.int64)))]


def _op_reshape(ctx, node, ins, attrs):
    x = ins[0]
    if ctx.opset < 5:
        shape = list(attrs["shape"])
    else:
        shape = [int(s) for s in ins[1]]
    allowzero = int(attrs.get("allowzero", 0))
    new = []
    for i, s in enumerate(shape):
        if s == 0 and not allowzero:
            new.append(x.shape[i])
        else:
            new.append(s)
    return [x.reshape(new)]


def _op_transpose(ctx, node, ins, attrs):
    x = ins[0]
    perm = attrs.get("perm")
    if perm is None:
        perm = list(range(x.ndim))[::-1]
    return [np.transpose(x, perm)]


def _op_concat(ctx, node, ins, attrs):
    arrs = [a for a in ins if a is not None]
    axis = _norm_axis(int(attrs["axis"]), arrs[0].ndim)
    return [np.concatenate(arrs, axis=axis)]


def _op_split(ctx, node, ins, attrs):
    x = ins[0]
    axis = _norm_axis(int(attrs.get("axis", 0)), x.ndim)
    n_out = len(node.output)
    if ctx.opset < 13:
        split = attrs.get("split")
    else:
        split = _optional(ins, 1)
    dim = x.shape[axis]
    if split is None or len(split) == 0:
        num = int(attrs.get("num_outputs", n_out))
        if dim % num == 0:
            split = [dim // num] * num
        else:
            if ctx.opset < 18:
                raise ValueError("Split: dimension not divisible by number of outputs")
            chunk = -(-dim // num)
            split = [chunk] * (num - 1) + [dim - chunk * (num - 1)]
    split = [int(s) for s in split]
    if sum(split) != dim:
        raise ValueError(f"Split sizes {split} do not sum to {dim}")
    idx = np.cumsum(split)[:-1]
    return list(np.split(x, idx, axis=axis))


def _op_squeeze(ctx, node, ins, attrs):
    x = ins[0]
    axes = attrs.get("axes") if ctx.opset < 13 else _optional(ins, 1)
    if axes is None or len(axes) == 0:
        return [np.squeeze(x)]
    axes = tuple(sorted(_norm_axis(int(a), x.ndim) for a in axes))
    for a in axes:
        if x.shape[a] != 1:
            raise ValueError(f"Squeeze axis {a} has size {x.shape[a]}")
    return [np.squeeze(x, axis=axes)]


def _op_unsqueeze(ctx, node, ins, attrs):
    x = ins[0]
    axes = attrs.get("axes") if ctx.opset < 13 else ins[1]
    rank = x.ndim + len(axes)
    axes = sorted(_norm_axis(int(a), rank) for a in axes)
    if len(set(axes)) != len(axes):
        raise ValueError("Unsqueeze: duplicate axes")
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return [x.reshape(shape)]


def _op_constant(ctx, node, ins, attrs):
    if "value" in attrs:
        return [attrs["value"]]
    if "value_float" in attrs:
        return [np.array(attrs["value_float"], dtype=np.float64)]
    if "value_floats" in attrs:
        return [np.array(attrs["value_floats"], dtype=np.float64)]
    if "value_int" in attrs:
        return [np.array(attrs["value_int"], dtype=np.int64)]
    if "value_ints" in attrs:
        return [np.array(attrs["value_ints"], dtype=np.int64)]
    if "value_string" in attrs:
        return [np.array(attrs["value_string"], dtype=object)]
    if "value_strings" in attrs:
        return [np.array(attrs["value_strings"], dtype=object)]
    raise NotImplementedError(f"Constant with attributes {sorted(attrs)}")


def _op_constant_of_shape(ctx, node, ins, attrs):
    shape = [int(s) for s in ins[0]]
    value = attrs.get("value")
    if value is None:
        value = np.zeros(1, dtype=np.float64)
    value = np.asarray(value).reshape(-1)
    return [np.full(shape, value[0], dtype=value.dtype)]


def _op_shape(ctx, node, ins, attrs):
    shape = np.array(ins[0].shape, dtype=np.int64)
    rank = len(shape)
    start = int(attrs.get("start", 0))
    end = attrs.get("end")
    end = rank if end is None else int(end)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return [shape[start:end]]


def _op_gather(ctx, node, ins, attrs):
    data, idx = ins[0], np.asarray(ins[1])
    axis = _norm_axis(int(attrs.get("axis", 0)), data.ndim)
    dim = data.shape[axis]
    idx = idx.astype(np.int64)
    if np.any((idx < -dim) | (idx >= dim)):
        raise IndexError("Gather index out of range")
    idx = np.where(idx < 0, idx + dim, idx)
    return [np.take(data, idx, axis=axis)]


def _op_cast(ctx, node, ins, attrs):
    x = ins[0]
    to = int(attrs["to"])
    if to in _FLOAT_TENSOR_TYPES:
        return [x.astype(np.float64)]
    if to in _INT_TENSOR_TYPES:
        dt = _INT_TENSOR_TYPES[to]
        if to != onnx.TensorProto.BOOL and _is_floating(x):
            x = np.trunc(x)
        return [x.astype(dt)]
    raise NotImplementedError(f"Cast to {onnx.TensorProto.DataType.Name(to)}")


def _op_cast_like(ctx, node, ins, attrs):
    """CastLike(x, like): Cast to ``like``'s element type (floating types are all float64 here)."""
    x, like = ins[0], ins[1]
    if _is_floating(like):
        return [x.astype(np.float64)]
    if _is_floating(x):
        x = np.trunc(x)
    return [x.astype(like.dtype)]


def _op_expand(ctx, node, ins, attrs):
    """Expand: numpy broadcasting of the input and the target shape, both ways (the result may be larger)."""
    x, shape = ins[0], tuple(int(d) for d in np.asarray(ins[1]).reshape(-1))
    return [np.array(np.broadcast_to(x, np.broadcast_shapes(x.shape, shape)))]


def _op_global_avg_pool(ctx, node, ins, attrs):
    x = ins[0]
    return [x.mean(axis=tuple(range(2, x.ndim)), keepdims=True)]


def _op_global_max_pool(ctx, node, ins, attrs):
    x = ins[0]
    return [x.max(axis=tuple(range(2, x.ndim)), keepdims=True)]


def _op_avg_pool(ctx, node, ins, attrs):
    return [_pool(ins[0], attrs, "Average")]


def _op_max_pool(ctx, node, ins, attrs):
    if len(node.output) > 1 and node.output[1]:
        raise NotImplementedError("MaxPool Indices output")
    if int(attrs.get("storage_order", 0)):
        raise NotImplementedError("MaxPool storage_order=1")
    return [_pool(ins[0], attrs, "Max")]


def _op_reduce_mean(ctx, node, ins, attrs):
    x = ins[0]
    keepdims = bool(int(attrs.get("keepdims", 1)))
    if ctx.opset < 18:
        axes = attrs.get("axes")
        noop = False
    else:
        axes = _optional(ins, 1)
        noop = bool(int(attrs.get("noop_with_empty_axes", 0)))
    if axes is None or len(axes) == 0:
        if noop:
            return [x]
        axes = tuple(range(x.ndim))
    else:
        axes = tuple(sorted({_norm_axis(int(a), x.ndim) for a in axes}))
    return [np.mean(x, axis=axes, keepdims=keepdims)]


def _op_layer_norm(ctx, node, ins, attrs):
    x, scale = ins[0], ins[1]
    bias = _optional(ins, 2)
    axis = _norm_axis(int(attrs.get("axis", -1)), x.ndim)
    eps = float(attrs.get("epsilon", _f32(1e-5)))
    axes = tuple(range(axis, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    inv_std = 1.0 / np.sqrt(var + eps)
    y = (x - mean) * inv_std * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv_std][: len(node.output)]


def _op_instance_norm(ctx, node, ins, attrs):
    x, scale, bias = ins[:3]
    eps = float(attrs.get("epsilon", _f32(1e-5)))
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    shape = (x.shape[1],) + (1,) * (x.ndim - 2)
    return [scale.reshape(shape) * (x - mean) / np.sqrt(var + eps) + bias.reshape(shape)]


def _softmax_along(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _coerced(fn):
    """Opset < 13 (Log)Softmax: flatten to 2-D at axis, apply along dim 1."""

    def impl(ctx, node, ins, attrs):
        x = ins[0]
        if ctx.opset < 13:
            axis = _norm_axis(int(attrs.get("axis", 1)), x.ndim) if x.ndim else 0
            a = int(np.prod(x.shape[:axis], dtype=np.int64))
            y = fn(x.reshape(a, -1), 1).reshape(x.shape)
        else:
            y = fn(x, _norm_axis(int(attrs.get("axis", -1)), x.ndim))
        return [y]

    return impl


def _op_if(ctx, node, ins, attrs):
    cond = np.asarray(ins[0])
    if cond.size != 1:
        raise ValueError("If condition must be a single element")
    branch = attrs["then_branch"] if bool(cond.reshape(-1)[0]) else attrs["else_branch"]
    outs = ctx.run_subgraph(branch, {})
    return [outs[o.name] for o in branch.output]


def _op_loop(ctx, node, ins, attrs):
    body = attrs["body"]
    max_trip = _optional(ins, 0)
    cond = _optional(ins, 1)
    carried = list(ins[2:])
    n_carried = len(carried)
    body_in = [i.name for i in body.input]
    body_out = [o.name for o in body.output]
    n_scan = len(body_out) - 1 - n_carried
    scans: list[list[np.ndarray]] = [[] for _ in range(n_scan)]
    trip_limit = None if max_trip is None else int(np.asarray(max_trip).reshape(-1)[0])
    keep_going = True if cond is None else bool(np.asarray(cond).reshape(-1)[0])
    if trip_limit is None and cond is None:
        raise ValueError("Loop without trip count or condition never ends")
    it = 0
    while keep_going and (trip_limit is None or it < trip_limit):
        local = {body_in[0]: np.array(it, dtype=np.int64)}
        if body_in[1]:
            local[body_in[1]] = np.array(keep_going)
        for name, v in zip(body_in[2:], carried):
            local[name] = v
        outs = ctx.run_subgraph(body, local)
        keep_going = bool(np.asarray(outs[body_out[0]]).reshape(-1)[0])
        carried = [outs[n] for n in body_out[1 : 1 + n_carried]]
        for j, n in enumerate(body_out[1 + n_carried :]):
            scans[j].append(outs[n])
        it += 1
    scan_res = []
    for s in scans:
        if not s:
            raise NotImplementedError("Loop with zero iterations and scan outputs")
        scan_res.append(np.stack(s, axis=0))
    return carried + scan_res


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _pow(a, b):
    if _is_floating(a) or _is_floating(b):
        return np.power(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return np.power(a, b)


_OPS: dict[str, Callable] = {
    "Conv": _op_conv,
    "ConvTranspose": _op_conv_transpose,
    "Gemm": _op_gemm,
    "MatMul": _op_matmul,
    "BatchNormalization": _op_batchnorm,
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(np.divide, _int_div),
    "Pow": _binary(_pow),
    "Relu": _unary(lambda x: np.maximum(x, 0)),
    "LeakyRelu": _op_leaky_relu,
    "Sigmoid": _unary(_sigmoid),
    "Tanh": _unary(np.tanh),
    "Neg": _unary(np.negative),
    "Abs": _unary(np.abs),
    "Sqrt": _unary(np.sqrt),
    "Exp": _unary(np.exp),
    "Log": _unary(np.log),
    "Reciprocal": _unary(lambda x: 1.0 / x),
    "Erf": _unary(_erf),
    "Clip": _op_clip,
    "Identity": _unary(lambda x: x),
    "Flatten": _op_flatten,
    "Reshape": _op_reshape,
    "Transpose": _op_transpose,
    "Concat": _op_concat,
    "Split": _op_split,
    "Squeeze": _op_squeeze,
    "Unsqueeze": _op_unsqueeze,
    "Constant": _op_constant,
    "ConstantOfShape": _op_constant_of_shape,
    "Shape": _op_shape,
    "Gather": _op_gather,
    "Cast": _op_cast,
    "CastLike": _op_cast_like,
    "Expand": _op_expand,
    "GlobalAveragePool": _op_global_avg_pool,
    "GlobalMaxPool": _op_global_max_pool,
    "AveragePool": _op_avg_pool,
    "MaxPool": _op_max_pool,
    "ReduceMean": _op_reduce_mean,
    "LayerNormalization": _op_layer_norm,
    "InstanceNormalization": _op_instance_norm,
    "Softmax": _coerced(_softmax_along),
    "LogSoftmax": _coerced(lambda x, a: np.log(_softmax_along(x, a))),
    "If": _op_if,
    "Loop": _op_loop,
}

SUPPORTED_OPS = frozenset(_OPS)


# --------------------------------------------------------------------------
# graph execution
# --------------------------------------------------------------------------


class _Context:
    def __init__(self, opset: int):
        self.opset = opset
        self.scopes: list[dict[str, np.ndarray]] = []

    def lookup(self, name: str, local: dict):
        if name in local:
            return local[name]
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise KeyError(f"value {name!r} is not defined (missing feed or bad graph order)")

    def run_graph(self, graph: onnx.GraphProto, env: dict) -> dict:
        for node in graph.node:
            if node.domain not in _DEFAULT_DOMAINS:
                raise NotImplementedError(
                    f"op {node.domain}::{node.op_type} (non-default domain) is not supported"
                )
            impl = _OPS.get(node.op_type)
            if impl is None:
                raise NotImplementedError(f"op {node.op_type!r} is not supported by the reference")
            ins = [self.lookup(n, env) if n else None for n in node.input]
            attrs = _attrs(node)
            self.scopes.append(env)
            try:
                outs = impl(self, node, ins, attrs)
            finally:
                self.scopes.pop()
            for name, val in zip(node.output, outs):
                if name:
                    if val is None:
                        raise NotImplementedError(
                            f"{node.op_type} output {name!r} is not computed by the reference"
                        )
                    env[name] = _to_f64_if_float(val)
        return env

    def run_subgraph(self, graph: onnx.GraphProto, local: dict) -> dict:
        env = dict(local)
        for init in graph.initializer:
            env[init.name] = _tensor_to_array(init)
        if graph.sparse_initializer:
            raise NotImplementedError("sparse initializers")
        env = self.run_graph(graph, env)
        return {o.name: self.lookup(o.name, env) for o in graph.output}


def run_reference(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run ``model`` in float64 with numpy; return every graph output by name."""
    ctx = _Context(_opset_of(model))
    graph = model.graph
    if graph.sparse_initializer:
        raise NotImplementedError("sparse initializers")
    env: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        env[init.name] = _tensor_to_array(init)
    input_names = {i.name for i in graph.input}
    for name, val in feeds.items():
        if name not in input_names:
            raise KeyError(f"feed {name!r} is not a graph input")
        env[name] = _to_f64_if_float(val)
    for i in graph.input:
        if i.name not in env:
            raise KeyError(f"graph input {i.name!r} has no feed and no initializer")
    env = ctx.run_graph(graph, env)
    return {o.name: ctx.lookup(o.name, env) for o in graph.output}
