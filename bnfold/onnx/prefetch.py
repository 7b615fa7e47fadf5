"""Batched math for the commonest folds, computed before the pass walks the graph node by node.

A model with thousands of BatchNormalization layers would otherwise spend most of its fold time in numpy's
per-call overhead on arrays of a few dozen values. These functions do the float64 math of many folds in one numpy
call per group of equal shapes and hand each result to the rule that would have computed it; the rule checks the
result still applies (same node, same weight never rewritten, same affine) and otherwise computes it itself. Nodes
that do not fit (computed parameters, other ops, refusals) simply take the per-node path, which also explains why.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx

from ..affine import FoldRefused, absorb_after_cast, bn_to_affine_batch
from .graph import RAW_FLOAT_DTYPES, GraphIndex, get_attr
from .rules import DEFAULT_EPSILON

_CHUNK = 64  # weights per numpy call: large enough to amortize the overhead, small enough to stay in cache


def prefetch_batchnorm_affines(g: GraphIndex, nodes) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``bn_to_affine`` for every BatchNormalization whose parameters are plain float initializers, in one numpy
    call per (channels, dtype) group. Keyed by ``id(node)``; nodes left out take the per-node path, which also
    explains refusals."""
    groups: dict[tuple[int, int], list] = defaultdict(list)
    for node in nodes:
        if len(node.input) < 5:
            continue
        tensors = [g.initializers.get(name) for name in node.input[1:5]]
        if any(t is None for t in tensors) or any(name in g.inputs for name in node.input[1:5]):
            continue  # computed, Constant-node or (IR < 4) input-listed parameters: per-node path
        if g.parent is None and any(name in g.ctx.replacements for name in node.input[1:5]):
            continue
        dtype = RAW_FLOAT_DTYPES.get(tensors[0].data_type)
        if dtype is None or any(t.data_type != tensors[0].data_type or len(t.dims) != 1 for t in tensors):
            continue
        channels = tensors[0].dims[0]
        raws = [t.raw_data for t in tensors]
        if any(len(r) != channels * dtype.itemsize for r in raws):
            continue
        groups[(channels, tensors[0].data_type)].append((node, raws, get_attr(node, "epsilon", DEFAULT_EPSILON)))
    cache = {}
    for (channels, data_type), members in groups.items():
        dtype = RAW_FLOAT_DTYPES[data_type]
        buffer = b"".join(raw for _, raws, _ in members for raw in raws)
        params = np.frombuffer(buffer, dtype=dtype).reshape(len(members), 4, channels).astype(np.float64)
        s, t, ok = bn_to_affine_batch(params, np.array([eps for _, _, eps in members], dtype=np.float64))
        for i, (node, _, _) in enumerate(members):
            if ok[i]:
                cache[id(node)] = (s[i], t[i])
    return cache



class PrefetchedFold:
    """New weight and bias of a Conv/ConvTranspose for the BatchNormalization after it."""

    __slots__ = ("node", "weight_name", "bias_name", "s", "weight", "bias")

    def __init__(self, node: onnx.NodeProto, weight_name: str, bias_name: str, s: np.ndarray, weight: np.ndarray,
                 bias: np.ndarray):
        self.node, self.weight_name, self.bias_name = node, weight_name, bias_name
        self.s, self.weight, self.bias = s, weight, bias

    def edits(self, g: GraphIndex, out_name: str) -> list:
        """The graph edits of this fold, as the conv-bn/convtranspose-bn rules would make them."""
        node, weight, bias = self.node, self.weight, self.bias
        # bias first, as in AfterTarget.plan_edits: a weight read by a computed bias is then rewritten in place
        return [lambda: g.write_tensor(node, 2, bias), lambda: g.write_tensor(node, 1, weight),
                lambda: g.move_output(node, out_name)]

    def applies_to(self, g: GraphIndex, node: onnx.NodeProto, s: np.ndarray) -> bool:
        bias_name = node.input[2] if len(node.input) > 2 else ""
        return (node is self.node and s is self.s and node.input[1] == self.weight_name
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


def prefetch_conv_folds(g: GraphIndex, nodes, affines: dict[int, tuple[np.ndarray, np.ndarray]]
                        ) -> dict[int, PrefetchedFold]:
    """Folded weights for every Conv/ConvTranspose -> BatchNormalization whose tensors are plain initializers."""
    groups: dict[tuple, list] = defaultdict(list)
    for bn in nodes:
        st = affines.get(id(bn))
        conv = g.producer.get(bn.input[0]) if st is not None else None
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or conv.domain not in ("", "ai.onnx") \
                or not g.only_consumer(bn.input[0], bn) or len(conv.input) < 2:
            continue
        weight = _plain_tensor(g, conv.input[1])
        bias_name = conv.input[2] if len(conv.input) > 2 else ""
        bias = _plain_tensor(g, bias_name) if bias_name else None
        if weight is None or (bias_name and (bias is None or bias.data_type != weight.data_type)):
            continue
        dims = tuple(weight.dims)
        if len(dims) < 3:
            continue
        group = int(get_attr(conv, "group", 1)) if conv.op_type == "ConvTranspose" else 1
        channels = dims[0] if conv.op_type == "Conv" else dims[1] * group
        if st[0].shape[0] != channels or (bias is not None and tuple(bias.dims) != (channels,)):
            continue
        if bias is not None and len(bias.raw_data) != channels * RAW_FLOAT_DTYPES[bias.data_type].itemsize:
            continue  # values in typed fields (float_data, ...), not raw_data: the per-node path reads them
        groups[(conv.op_type, dims, weight.data_type, group, bool(bias_name))].append((bn, conv, weight, bias, st))
    done: dict[int, PrefetchedFold] = {}
    for (op, dims, data_type, group, has_bias), members in groups.items():
        dtype = RAW_FLOAT_DTYPES[data_type]
        size = int(np.prod(dims)) * dtype.itemsize
        for start in range(0, len(members), _CHUNK):
            chunk = members[start:start + _CHUNK]
            raws = [w.raw_data for _, _, w, _, _ in chunk]
            if any(len(r) != size for r in raws):
                continue
            weights = [np.frombuffer(raw, dtype=dtype).reshape(dims) for raw in raws]
            biases = np.frombuffer(b"".join(b.raw_data for _, _, _, b, _ in chunk), dtype=dtype).reshape(
                len(chunk), -1) if has_bias else None
            s = np.stack([st[0] for *_, st in chunk])
            t = np.stack([st[1] for *_, st in chunk])
            try:
                new_w, new_b, ok = absorb_after_cast(weights, biases, s, t, axis=0 if op == "Conv" else 1,
                                                     groups=group, dtype=dtype)
            except FoldRefused:
                continue
            for i, (bn, conv, weight, bias, st) in enumerate(chunk):
                if ok[i]:
                    done[id(bn)] = PrefetchedFold(conv, weight.name, bias.name if bias is not None else "", st[0],
                                                  new_w[i], new_b[i])
    return done
