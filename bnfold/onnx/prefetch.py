"""Batched math for the commonest folds, computed before the pass walks the graph node by node.

A model with thousands of BatchNormalization layers would otherwise spend most of its fold time in numpy's
per-call overhead on arrays of a few dozen values. These functions do the float64 math of many folds at once (the
channels of every layer laid end to end in one vector) and answer with the same :class:`~bnfold.onnx.plan.Plan`
objects the rules make (tests/test_plans.py proves both paths give identical bytes). The pass applies a prefetched
plan only while what it read holds (:meth:`Plan.holds`); anything else (computed parameters, other ops, refusals,
a graph changed by an earlier fold) takes the per-node path, which also explains why.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict

import numpy as np

from ..affine import bn_to_affine_flat, channel_multiplier
from .batchnorm import inference_epsilon
from .graph import GraphIndex
from .merge import may_be_merged
from .nodes import node_label
from .ops import LinearOp
from .plan import LayerRead, MoveOutput, Plan, WriteTensor
from .tensors import RAW_FLOAT_DTYPES


_DIMS, _DATA_TYPE = operator.attrgetter("dims"), operator.attrgetter("data_type")


def prefetch_batchnorm_affines(g: GraphIndex, nodes) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``bn_to_affine`` for every BatchNormalization whose parameters are plain float initializers, all channels of
    one dtype in one run of numpy calls. Keyed by ``id(node)``; nodes left out take the per-node path, which also
    explains refusals. Call under ``np.errstate(all="ignore")`` (the fold pass does)."""
    by_dtype: dict[int, list] = defaultdict(list)
    initializers, inputs = g.initializers, g.inputs
    replaced = g.ctx.replacements if g.parent is None else {}
    opset = g.ctx.opset
    for node in nodes:
        epsilon = inference_epsilon(node, opset)
        if isinstance(epsilon, str):
            continue  # the per-node path says why
        tensors = []
        for name in g.inputs_of(node)[1:5]:
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
            raws = [t.raw_data for t in tensors]
            size = len(raws[0])
            # four vectors of one dtype and byte length: one value per channel each (else the per-node path refuses)
            # (map, not generators: this runs for every BN, and a generator costs a frame)
            if size and set(map(_DATA_TYPE, tensors)) == {data_type} and set(map(len, raws)) == {size} and \
                    set(map(len, map(_DIMS, tensors))) == {1} and tensors[0].dims[0] * dtype.itemsize == size:
                by_dtype[data_type].append((node, raws, epsilon, size // dtype.itemsize))
    cache = {}
    for data_type, members in by_dtype.items():
        dtype = RAW_FLOAT_DTYPES[data_type]
        # every scale, then every bias, mean, var: four runs of one vector
        flat = np.frombuffer(b"".join([raws[role] for role in range(4) for _, raws, _, _ in members]),
                             dtype=dtype).astype(np.float64)
        total = len(flat) // 4
        scale, bias, mean, var = flat[:total], flat[total:2 * total], flat[2 * total:3 * total], flat[3 * total:]
        epsilons = {eps for _, _, eps, _ in members}
        epsilon = np.float64(epsilons.pop()) if len(epsilons) == 1 else \
            np.repeat(np.array([eps for _, _, eps, _ in members], dtype=np.float64), [m[3] for m in members])
        s, t, valid = bn_to_affine_flat(scale, bias, mean, var, epsilon)
        all_valid = bool(valid.all())
        start = 0
        for node, _, _, channels in members:
            end = start + channels
            if all_valid or valid[start:end].all():
                cache[id(node)] = (s[start:end], t[start:end])
            start = end
    return cache


def _plain_tensor(g: GraphIndex, name: str):
    """The initializer behind ``name`` when its bytes can be read directly, else None."""
    tensor = g.initializers.get(name)
    if tensor is None or name in g.inputs or name in g.rewritten or \
            (g.parent is None and name in g.ctx.replacements) or name in g.exact:
        return None  # (a value with a float64 original: the rules compose from that)
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
        if _plain_tensor(g, name) is None or tensor.data_type != data_type or tuple(tensor.dims[:]) != (channels,):
            return None
        raw = tensor.raw_data
        if len(raw) != channels * dtype.itemsize:
            return None  # values in typed fields (float_data, ...), not raw_data: the per-node path reads them
        return np.frombuffer(raw, dtype=dtype)
    if name not in g.producer:
        return None  # a graph input, or a value of an enclosing graph
    value, _ = g.constant(name)
    if value is None or value.dtype != dtype or value.shape != (channels,):
        return None
    return value


def prefetch_linear_plans(g: GraphIndex, nodes, affines: dict[int, tuple[np.ndarray, np.ndarray]],
                          rule_for: "dict[str, tuple[LinearOp, str]]") -> dict[int, tuple[Plan, int]]:
    """Plans for every linear op -> BatchNormalization whose op is :func:`~bnfold.onnx.ops.batchable`, whose
    weight is a plain initializer and whose bias is one too, or a computed constant, or absent; ``rule_for`` maps
    the type of each such op whose rule is enabled to its descriptor and the rule's name. New biases are computed
    in one run of numpy calls; each weight is multiplied straight into its folded dtype. Keyed by ``id(bn)``:
    ``(plan, channels)``. Call under ``np.errstate(all="ignore")`` (the fold pass does)."""
    jobs = []
    producers = g.producer
    merging = g.ctx.merging
    for bn in nodes:
        st = affines.get(id(bn))
        if st is None:
            continue
        x = g.inputs_of(bn)[0]
        layer = producers.get(x)
        if layer is None:
            continue
        entry = rule_for.get(layer.op_type)
        if entry is None or layer.domain not in ("", "ai.onnx") or not g.only_consumer(x, bn):
            continue
        op, rule = entry
        inputs = g.inputs_of(layer)
        if len(inputs) < 2:
            continue
        weight = _plain_tensor(g, inputs[1])
        if weight is None:
            continue
        if merging and g.ctx.exact_wanted(RAW_FLOAT_DTYPES[weight.data_type]) and \
                may_be_merged(g, layer, g.outputs_of(bn)[0]):
            # its float64 values are kept for the merges: the per-node path computes them as it applies the fold
            # (a plan computed ahead would hold them for every layer at once)
            continue
        dims = tuple(weight.dims[:])
        if op.weight_rank_reason(len(dims)):
            continue
        axis, group, bias_scale = op.output_layout(layer)
        if bias_scale != 1.0:
            continue  # a bias scale != 1 is rewritten by the per-node path
        if group < 1 or dims[0] % group:
            continue
        channels = dims[axis] * group
        if st[0].shape[0] != channels:
            continue
        bias_name = inputs[op.bias_slot] if len(inputs) > op.bias_slot else ""
        bias = None
        if bias_name:
            bias = _bias_values(g, bias_name, weight.data_type, channels)
            if bias is None:
                continue
        jobs.append((bn, x, layer, op, rule, weight, dims, axis, group, bias_name, bias, st))
    done: dict[int, tuple[Plan, int]] = {}
    if not jobs:
        return done
    # New biases: s*b + t where the layer has a bias, t itself where it has none (as absorb_after has it).
    with_bias = [job for job in jobs if job[10] is not None]
    cast_biases, biases_finite = None, False
    if with_bias:
        flat = np.concatenate([job[11][0] for job in with_bias]) * \
            np.concatenate([job[10] for job in with_bias]).astype(np.float64) + \
            np.concatenate([job[11][1] for job in with_bias])
        if len({job[5].data_type for job in with_bias}) == 1:  # one dtype (the usual case): rounded in one call
            cast_biases = flat.astype(RAW_FLOAT_DTYPES[with_bias[0][5].data_type])
            biases_finite = bool(np.isfinite(cast_biases).all())
    start = 0
    for bn, x, layer, op, rule, tensor, dims, axis, group, bias_name, bias, (s, t) in jobs:
        bias_finite = False
        if bias is not None:
            end = start + s.shape[0]
            new_b = flat[start:end] if cast_biases is None else cast_biases[start:end]
            bias_finite = biases_finite
            start = end
        else:
            new_b = t if t.any() else None  # as in AfterTarget.plan_edits: no bias for an all-zero shift
        # The weight's bytes are read here, one tensor at a time (a copy of every weight at once would double the
        # fold's peak memory). Multiplied in float64 and rounded once to the weight's dtype as numpy writes the
        # result, without a float64 copy: on large models the fold is bound by memory traffic, not arithmetic.
        dtype = RAW_FLOAT_DTYPES[tensor.data_type]
        raw = tensor.raw_data
        if not raw or len(raw) != math.prod(dims) * dtype.itemsize:
            continue  # values in typed fields, or a size that does not fit: the per-node path reads or refuses
        weight = np.frombuffer(raw, dtype=dtype).reshape(dims)
        new_w = np.empty(dims, dtype=dtype)
        np.multiply(weight, channel_multiplier(s, dims, axis, group), out=new_w, dtype=np.float64, casting="unsafe")
        del weight, raw
        if new_b is not None and new_b.dtype != dtype:
            new_b = new_b.astype(dtype)
        if np.isfinite(new_w).all() and (new_b is None or bias_finite or np.isfinite(new_b).all()):
            # the edits AfterTarget.plan_edits makes, in its order: bias first, weight, then the output moves
            weight_and_output = WriteTensor(layer, 1, new_w), MoveOutput(layer, g.outputs_of(bn)[0])
            edits = [*weight_and_output] if new_b is None else \
                [WriteTensor(layer, op.bias_slot, new_b), *weight_and_output]
            reads = [LayerRead(x, layer, bn, layer, tensor.name, op.bias_slot, bias_name)]
            plan = Plan(rule, bn, node_label(layer), edits, [bn], reads)
            done[id(bn)] = (plan, s.shape[0])
    return done
