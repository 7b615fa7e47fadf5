"""Batched math for the commonest folds, computed before the pass walks the graph node by node.

A model with thousands of BatchNormalization layers would otherwise spend most of its fold time in numpy's
per-call overhead on arrays of a few dozen values. These functions do the float64 math of many folds at once, the
channels of every layer laid end to end in one vector, and hand each result to the rule that would have computed it;
the rule checks the result still applies (same node, same weight never rewritten, same affine) and otherwise computes it itself. Nodes
that do not fit (computed parameters, other ops, refusals) simply take the per-node path, which also explains why.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import onnx

from ..affine import absorb_after_into, bn_to_affine_flat
from .graph import RAW_FLOAT_DTYPES, GraphIndex, get_attr
from .rules import inference_epsilon


def prefetch_batchnorm_affines(g: GraphIndex, nodes) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``bn_to_affine`` for every BatchNormalization whose parameters are plain float initializers, all channels of
    one dtype in one run of numpy calls. Keyed by ``id(node)``; nodes left out take the per-node path, which also
    explains refusals."""
    by_dtype: dict[int, list] = defaultdict(list)
    initializers, inputs = g.initializers, g.inputs
    replaced = g.ctx.replacements if g.parent is None else {}
    for node in nodes:
        epsilon = inference_epsilon(g, node)
        if isinstance(epsilon, str):
            continue  # the per-node path says why
        names = g.inputs_of(node)[1:5]
        tensors = []
        for name in names:
            tensor = initializers.get(name)
            # computed, Constant-node, (IR < 4) input-listed or already rewritten parameters: per-node path
            if tensor is None or name in inputs or name in replaced:
                break
            tensors.append(tensor)
        else:
            data_type = tensors[0].data_type
            dtype = RAW_FLOAT_DTYPES.get(data_type)
            if dtype is None:
                continue
            raws = [t.raw_data for t in tensors if t.data_type == data_type]
            size = len(raws[0])
            if not size or len(raws) < 4 or any(len(r) != size for r in raws) or \
                    any(tuple(t.dims) != (size // dtype.itemsize,) for t in tensors):
                continue
            by_dtype[data_type].append((node, raws, epsilon))
    cache = {}
    for data_type, members in by_dtype.items():
        dtype = RAW_FLOAT_DTYPES[data_type]
        channels = [len(raws[0]) // dtype.itemsize for _, raws, _ in members]
        scale, bias, mean, var = (np.frombuffer(b"".join(raws[role] for _, raws, _ in members), dtype=dtype)
                                  .astype(np.float64) for role in range(4))
        epsilon = np.repeat(np.array([eps for _, _, eps in members], dtype=np.float64), channels)
        s, t, valid = bn_to_affine_flat(scale, bias, mean, var, epsilon)
        ends = np.cumsum(channels).tolist()
        ok = np.logical_and.reduceat(valid, [end - c for end, c in zip(ends, channels)]).tolist()
        start = 0
        for (node, _, _), end, fine in zip(members, ends, ok):
            if fine:
                cache[id(node)] = (s[start:end], t[start:end])
            start = end
    return cache


class PrefetchedFold:
    """New weight and bias of a Conv/ConvTranspose/Gemm for the BatchNormalization after it."""

    __slots__ = ("node", "weight_name", "bias_name", "s", "weight", "bias")

    def __init__(self, node: onnx.NodeProto, weight_name: str, bias_name: str, s: np.ndarray, weight: np.ndarray,
                 bias: np.ndarray | None):
        self.node, self.weight_name, self.bias_name = node, weight_name, bias_name
        self.s, self.weight, self.bias = s, weight, bias

    def edits(self, g: GraphIndex, out_name: str) -> list:
        """The graph edits of this fold, as the conv-bn/convtranspose-bn/gemm-bn rules would make them."""
        node, weight, bias = self.node, self.weight, self.bias
        # bias first, as in AfterTarget.plan_edits: a weight read by a computed bias is then rewritten in place
        edits = [] if bias is None else [lambda: g.write_tensor(node, 2, bias)]
        edits += [lambda: g.write_tensor(node, 1, weight), lambda: g.move_output(node, out_name)]
        return edits

    def applies_to(self, g: GraphIndex, node: onnx.NodeProto, s: np.ndarray) -> bool:
        inputs = node.input
        bias_name = inputs[2] if len(inputs) > 2 else ""
        return (node is self.node and s is self.s and inputs[1] == self.weight_name
                and bias_name == self.bias_name and self.weight_name not in g.rewritten
                and self.bias_name not in g.rewritten)


def _plain_tensor(g: GraphIndex, name: str):
    """The initializer behind ``name`` when its bytes can be read directly, else None."""
    tensor = g.initializers.get(name)
    if tensor is None or name in g.inputs or name in g.rewritten or \
            (g.parent is None and name in g.ctx.replacements):
        return None
    dtype = RAW_FLOAT_DTYPES.get(tensor.data_type)
    if dtype is None:
        return None
    return tensor


def _bias_values(g: GraphIndex, name: str, data_type: int, channels: int) -> np.ndarray | None:
    """The bias ``name`` as ``channels`` values of the weight's dtype, when it is a plain initializer or a computed
    constant (exporters compute a zero bias from the weight's shape); else None, for the per-node path."""
    dtype = RAW_FLOAT_DTYPES[data_type]
    tensor = g.initializers.get(name)
    if tensor is not None:
        if _plain_tensor(g, name) is None or tensor.data_type != data_type or tuple(tensor.dims) != (channels,) \
                or len(tensor.raw_data) != channels * dtype.itemsize:
            return None  # values in typed fields (float_data, ...), not raw_data: the per-node path reads them
        return np.frombuffer(tensor.raw_data, dtype=dtype)
    if name not in g.producer:
        return None  # a graph input, or a value of an enclosing graph
    value, _ = g.constant(name)
    if value is None or value.dtype != dtype or value.shape != (channels,):
        return None
    return value


def prefetch_conv_folds(g: GraphIndex, nodes, affines: dict[int, tuple[np.ndarray, np.ndarray]]
                        ) -> dict[int, PrefetchedFold]:
    """Folded weights for every Conv/ConvTranspose/Gemm -> BatchNormalization whose weight is a plain initializer
    and whose bias is one too, or a computed constant, or absent. Biases of one dtype are computed in one run of
    numpy calls; each weight is multiplied straight into its folded dtype."""
    jobs = []
    producers = g.producer
    for bn in nodes:
        st = affines.get(id(bn))
        if st is None:
            continue
        x = bn.input[0]
        layer = producers.get(x)
        if layer is None:
            continue
        op = layer.op_type
        if op not in ("Conv", "ConvTranspose", "Gemm") or layer.domain not in ("", "ai.onnx") \
                or not g.only_consumer(x, bn):
            continue
        inputs = layer.input
        if len(inputs) < 2:
            continue
        weight = _plain_tensor(g, inputs[1])
        if weight is None:
            continue
        dims = tuple(weight.dims)
        dtype = RAW_FLOAT_DTYPES[weight.data_type]
        raw = weight.raw_data
        if not raw or len(raw) != math.prod(dims) * dtype.itemsize:
            continue
        group = 1
        if op == "Gemm":
            if len(dims) != 2 or get_attr(layer, "beta", 1.0) != 1.0:
                continue  # beta != 1 is rewritten by the per-node path
            axis = 0 if get_attr(layer, "transB", 0) else 1
            channels = dims[axis]
        elif len(dims) < 3:
            continue
        elif op == "Conv":
            axis, channels = 0, dims[0]
        else:
            group = int(get_attr(layer, "group", 1))
            axis, channels = 1, dims[1] * group
            if group < 1 or dims[0] % group:
                continue
        if st[0].shape[0] != channels:
            continue
        bias_name = inputs[2] if len(inputs) > 2 else ""
        bias = None
        if bias_name:
            bias = _bias_values(g, bias_name, weight.data_type, channels)
            if bias is None:
                continue
        jobs.append((bn, layer, weight.name, np.frombuffer(raw, dtype=dtype).reshape(dims), axis, group, bias_name,
                     bias, st))
    done: dict[int, PrefetchedFold] = {}
    if not jobs:
        return done
    with np.errstate(over="ignore", invalid="ignore"):
        # new biases: s*b + t for layers with a bias, t itself for those without (as absorb_after has it)
        with_bias = [job for job in jobs if job[7] is not None]
        new_biases = {}
        if with_bias:
            s = np.concatenate([job[8][0] for job in with_bias])
            t = np.concatenate([job[8][1] for job in with_bias])
            b = np.concatenate([job[7] for job in with_bias]).astype(np.float64)
            flat = s * b + t
            start = 0
            for job in with_bias:
                end = start + job[8][0].shape[0]
                new_biases[id(job[0])] = flat[start:end]
                start = end
        for bn, layer, weight_name, weight, axis, group, bias_name, bias, (s, t) in jobs:
            new_w = np.empty(weight.shape, dtype=weight.dtype)
            absorb_after_into(weight, s, new_w, axis=axis, groups=group)
            if bias is not None:
                new_b = new_biases[id(bn)].astype(weight.dtype)
            elif t.any():  # as in AfterTarget.plan_edits: no bias is added when the shift is all zero
                new_b = t.astype(weight.dtype)
            else:
                new_b = None
            if np.isfinite(new_w).all() and (new_b is None or np.isfinite(new_b).all()):
                done[id(bn)] = PrefetchedFold(layer, weight_name, bias_name, s, new_w, new_b)
    return done
