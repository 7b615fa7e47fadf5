"""Fold rules for ONNX graphs: one small object per pattern.

A rule's :meth:`Rule.match` looks at one normalization (a BatchNormalization, or a Mul/Add/Sub/Div by a
per-channel constant) and answers with

* a :class:`~bnfold.onnx.plan.Plan` — all math done and cast-checked, the graph edits as data for
  :func:`~bnfold.onnx.plan.apply_plan`;
* a :class:`~bnfold.onnx.plan.Refusal` — why this pattern is present but can not be folded exactly (with a code);
* ``None`` — the pattern is not there at all.

Matching never edits the graph, so a refusal leaves the model exactly as it was. What each linear op is (weight
axes, bias, attributes) comes from :data:`bnfold.onnx.ops.LINEAR_OPS`; the after/before rules are generated from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx

# (rules run inside the fold pass's np.errstate: their casts enter none of their own)
from ..affine import FoldRefused, absorb_after, absorb_before, bn_to_affine, cast_checked_in_errstate
from ..errors import InputError
from .batchnorm import check_channels, check_parameter_lengths, inference_epsilon
from .graph import GraphIndex
from .nodes import get_attr, get_attrs, node_label
from .ops import LINEAR_OPS, LinearOp, linear_op
from .plan import (LayerRead, MoveOutput, Plan, Refusal, RenameInput, SetAttribute, SetOpType,
                   TurnIntoAdd, WriteTensor)


@dataclass
class Affine:
    """A normalization node seen as ``y = s*x + t`` along channel axis 1."""

    node: onnx.NodeProto
    x: str
    y: str
    s: np.ndarray
    t: np.ndarray

    @property
    def channels(self) -> int:
        return int(self.s.shape[0])


def _refused(exc: FoldRefused) -> Refusal:
    return Refusal(exc.code, str(exc))


# ---- the normalization side ---------------------------------------------------------------------------------

def batchnorm_affine(g: GraphIndex, node: onnx.NodeProto,
                     prefetched: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> Affine | Refusal:
    """A BatchNormalization in inference mode with constant parameters, as a per-channel affine."""
    inputs = g.inputs_of(node)
    hit = prefetched.pop(id(node), None) if prefetched else None
    if hit is not None:  # prefetch made inference_epsilon's checks before it did the math
        check_batchnorm_channels(g, node, hit[0].shape[0])
        return Affine(node, inputs[0], g.outputs_of(node)[0], *hit)
    epsilon = inference_epsilon(node, g.ctx.opset)
    if isinstance(epsilon, Refusal):
        return epsilon
    params = []
    for role, name in zip(("scale", "bias", "mean", "var"), inputs[1:5]):
        value, reason = g.constant(name)
        if value is None:
            return Refusal("param-not-constant", f"{role} is not constant: {reason}")
        if value.ndim != 1:
            return Refusal("param-not-per-channel",
                           f"{role} has shape {list(value.shape)}, expected one value per channel")
        params.append(value)
    check_parameter_lengths(node, [p.shape[0] for p in params])
    check_batchnorm_channels(g, node, params[0].shape[0])
    if not all(_is_float(p) for p in params):
        return Refusal("not-float", "parameters are not floating point")
    try:
        s, t = bn_to_affine(*params, epsilon)
    except FoldRefused as exc:
        return _refused(exc)
    return Affine(node, inputs[0], g.outputs_of(node)[0], s, t)


def check_batchnorm_channels(g: GraphIndex, node: onnx.NodeProto, channels: int) -> None:
    """A BN whose parameters do not match its input's channel count (when the shape is at hand) is invalid."""
    check_channels(node, channels, g.known_shape(g.inputs_of(node)[0]))


def _channel_vector(const: np.ndarray, rank: int | None, channels: int) -> np.ndarray | None:
    """A constant that broadcasts onto a [N, C, ...] tensor only along C, as C values; else None."""
    if rank is None or const.ndim > rank:
        return None
    shape = (1,) * (rank - const.ndim) + tuple(const.shape)
    if rank < 2 or any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(np.asarray(const, dtype=np.float64).reshape(-1), (channels,)).copy()


# ---- the linear side: where a per-channel affine can be absorbed ---------------------------------------------

def _gemm_allowed(g: GraphIndex, dtype) -> bool:
    """MatMul may become Gemm (with its bias as C) when the opset's Gemm takes an optional C of that dtype."""
    return g.ctx.opset >= (13 if str(np.dtype(dtype)) == "bfloat16" else 11)


class _Weight:
    """A constant weight whose values are read only when the math needs them."""

    __slots__ = ("g", "name", "shape", "dtype", "_values")

    def __init__(self, g: GraphIndex, name: str, shape: tuple[int, ...], dtype, values: np.ndarray | None = None):
        self.g, self.name, self.shape, self.dtype, self._values = g, name, shape, np.dtype(dtype), values

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def values(self) -> np.ndarray:
        if self._values is None:
            self._values = self.g.constant(self.name)[0]
        return self._values


def _weight(g: GraphIndex, name: str) -> tuple[_Weight | None, str]:
    meta = g.constant_meta(name)
    if meta is not None:
        return _Weight(g, name, *meta), ""
    value, reason = g.constant(name)
    if value is None:
        return None, reason
    return _Weight(g, name, value.shape, value.dtype, value), ""


@dataclass
class AfterTarget:
    """A linear op whose output channels can absorb a per-channel affine applied to its output."""

    op: LinearOp
    node: onnx.NodeProto
    output: str  # the value the normalization reads
    weight: _Weight
    axis: int
    groups: int
    bias: np.ndarray | None  # effective bias in float64 (Gemm: beta*C, MatMul+Add: the Add constant)
    bias_name: str  # the input the bias was read from ("" when none)
    channels: int
    rank: int | None
    bias_node: onnx.NodeProto | None = None  # the Add of MatMul -> Add
    bias_slot: int = 2

    def plan_edits(self, g: GraphIndex, s: np.ndarray, t: np.ndarray, out_name: str | None,
                   norm: onnx.NodeProto | None) -> tuple[list, bool]:
        """Math now (refusals raise FoldRefused), edits as data: ``(edits, norm_kept)``.

        ``out_name``: the value the op produces afterwards (None keeps its own). A MatMul that may not become
        Gemm (old opsets) turns ``norm`` into the Add that carries the new bias; ``norm_kept`` says so.
        """
        if s.shape[0] != self.channels:
            raise FoldRefused(f"{s.shape[0]} channels vs {self.channels} output channels of {node_label(self.node)}",
                              "channel-mismatch")
        dtype = self.weight.dtype
        new_w, new_b = absorb_after(self.weight.values, self.bias, s, t, axis=self.axis, groups=self.groups)
        exact_w = exact_b = None
        if g.ctx.exact_wanted(dtype):
            exact_w, exact_b = new_w, new_b
            earlier_w, earlier_b = g.exact_value(self.weight.name), self._exact_bias(g)
            if earlier_w is not None or earlier_b is not None:  # the same math on the values before their rounding
                exact_w, exact_b = absorb_after(self.weight.values if earlier_w is None else earlier_w,
                                                self.bias if earlier_b is None else earlier_b, s, t,
                                                axis=self.axis, groups=self.groups)
        new_w = cast_checked_in_errstate(new_w, dtype)
        needs_bias = self.bias is not None or bool(np.any(t != 0))
        new_b = cast_checked_in_errstate(new_b, dtype, "folded bias") if needs_bias else None
        op, node, renamed = self.op, self.node, self.node
        edits: list = []
        norm_kept = False
        if new_b is None:
            pass
        elif op.bias_slot is not None:
            flat = not op.bias_broadcasts
            edits.append(WriteTensor(node, op.bias_slot, new_b.reshape(-1) if flat else new_b,
                                     exact_b.reshape(-1) if flat and exact_b is not None else exact_b))
            if op.bias_scale_attr and get_attr(node, op.bias_scale_attr, 1.0) != 1.0:
                edits.append(SetAttribute(node, op.bias_scale_attr, 1.0))
        elif self.bias_node is not None:  # MatMul -> Add(const): the Add keeps carrying the bias
            renamed = self.bias_node
            edits.append(WriteTensor(self.bias_node, self.bias_slot, new_b, exact_b))
        elif _gemm_allowed(g, dtype):  # a rank-2 MatMul becomes Gemm(x, W, bias): the bias in the same kernel
            edits += [SetOpType(node, "Gemm"), WriteTensor(node, 2, new_b, exact_b)]
        elif norm is not None:
            edits.append(TurnIntoAdd(norm, self.output, new_b))
            norm_kept, out_name = True, None
        else:
            raise FoldRefused("would need a new Add node (opset < 11 has no Gemm with optional bias)",
                              "no-bias-carrier")
        # The weight goes last: a computed bias (an exporter's Shape(W) -> Expand chain) may read the weight, and
        # once the new bias has replaced it the weight has one reader left and is rewritten in place, not copied.
        edits.append(WriteTensor(node, 1, new_w, exact_w))
        if out_name is not None:
            edits.append(MoveOutput(renamed, out_name))
        return edits, norm_kept

    def _exact_bias(self, g: GraphIndex) -> np.ndarray | None:
        """The float64 value of the bias (scaled as ``self.bias`` is) when an earlier fold or merge wrote it."""
        name = self.bias_node.input[self.bias_slot] if self.bias_node is not None else self.bias_name
        exact = g.exact_value(name) if name else None
        if exact is not None and self.bias_node is None and self.op.bias_scale_attr:
            exact = exact * float(get_attr(self.node, self.op.bias_scale_attr, 1.0))
        return exact

    def read(self, value: str, producer: onnx.NodeProto, reader: onnx.NodeProto) -> LayerRead:
        """What the plan read: ``value`` (made by ``producer``, the op or its bias Add) read by ``reader`` alone,
        the op's weight and bias inputs."""
        return LayerRead(value, producer, reader, self.node, self.weight.name, self.op.bias_slot, self.bias_name)


class _Label:
    """``"<op> <node name>"`` for messages, built only when printed."""

    __slots__ = ("op", "node")

    def __init__(self, op: str, node: onnx.NodeProto):
        self.op, self.node = op, node

    def __str__(self) -> str:
        return f"{self.op} {node_label(self.node)}"


def after_target(g: GraphIndex, name: str, reader: onnx.NodeProto) -> AfterTarget | Refusal | None:
    """The linear op producing ``name``, if ``reader`` is its only consumer and its weights are constant."""
    node = g.producer.get(name)
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    bias_node = add_bias = None
    bias_slot = 2
    if node.op_type == "Add":  # MatMul -> Add(const) -> normalization
        found = _bias_add(g, node)
        if found is None:
            return None
        bias_node, node, bias_slot, add_bias = found
    op = LINEAR_OPS.get(node.op_type)
    if op is None:
        return None
    label = _Label(node.op_type, node)  # formatted only when a refusal needs it
    if not g.only_consumer(name, reader):
        return Refusal("output-shared", f"the output of {label} is also used elsewhere: {g.usage(name)}")
    if bias_node is not None and not g.only_consumer(node.output[0], bias_node):
        return Refusal("output-shared", f"the output of {label} is also used elsewhere: {g.usage(node.output[0])}")
    inputs = node.input
    if len(inputs) < 2:
        return Refusal("no-weight", f"{label} has no weight input")
    weight, reason = _weight(g, inputs[1])
    if weight is None:
        return Refusal("weight-not-constant", f"weight of {label} is not constant: {reason}")
    if not _is_float(weight):
        return Refusal("not-float", f"weight of {label} is not floating point")
    bias, bias_name = None, ""
    if op.bias_slot is not None and len(inputs) > op.bias_slot and inputs[op.bias_slot]:
        bias_name = inputs[op.bias_slot]
        bias, reason = g.constant(bias_name)
        if bias is None:
            return Refusal("bias-not-constant", f"bias of {label} is not constant: {reason}")
        bias = np.asarray(bias, dtype=np.float64)
    rank_reason = op.weight_rank_reason(weight.ndim)
    if rank_reason:
        return Refusal("weight-rank", f"weight of {label} {rank_reason}")
    axis, _ = op.axes(node)
    groups = op.axis_groups(node, axis)
    channels = weight.shape[axis] * groups
    if bias is not None:
        if op.bias_scale_attr:
            bias = bias * float(get_attr(node, op.bias_scale_attr, 1.0))
        if op.bias_broadcasts and (bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, channels))):
            return Refusal("bias-shape", f"bias of {label} has shape {list(bias.shape)}")
    if op.activation_rank is not None:  # the weight's output axis is BN's channel axis 1 only at this rank
        reason = _activation_rank_reason(g, node, op, label, "channel axis 1 is not the weight's output axis")
        if reason is not None:
            return reason
    if bias_node is not None:
        if add_bias.ndim > 2 or (add_bias.ndim >= 1 and add_bias.shape[-1] not in (1, channels)) or \
                (add_bias.ndim == 2 and add_bias.shape[0] != 1):
            return Refusal("bias-shape", f"the Add after {label} does not add a per-channel constant")
        return AfterTarget(op, node, name, weight, axis, groups, add_bias, "", channels, weight.ndim, bias_node,
                           bias_slot)
    return AfterTarget(op, node, name, weight, axis, groups, bias, bias_name, channels, weight.ndim)


def _activation_rank_reason(g: GraphIndex, node: onnx.NodeProto, op: LinearOp, label, why: str) -> Refusal | None:
    rank = g.rank(node.input[0])
    if rank is None:
        return Refusal("rank-unknown",
                       f"can not prove the input of {label} is rank {op.activation_rank} (no shape information)")
    if rank != op.activation_rank:
        return Refusal("rank-mismatch", f"{label} multiplies a rank-{rank} tensor: {why}")
    return None


def _bias_add(g: GraphIndex, add: onnx.NodeProto):
    """(add, op node, constant slot, constant) when ``add`` adds a constant to a linear op without a bias input."""
    for slot in (0, 1):
        other = add.input[1 - slot]
        producer = g.producer.get(other)
        op = linear_op(producer) if producer is not None else None
        if op is not None and op.bias_slot is None:
            const, _ = g.constant(add.input[slot])
            if const is not None and _is_float(const):
                return add, producer, slot, np.asarray(const, dtype=np.float64)
    return None


def _is_float(a) -> bool:
    return a.dtype.kind == "f" or a.dtype.name == "bfloat16"


# ---- rules ------------------------------------------------------------------------------------------------------

class Rule:
    """One folding pattern. ``name`` is what ``--skip`` takes."""

    name: str
    summary: str
    sources: ClassVar[frozenset[str]] = frozenset({"BatchNormalization"})

    def match(self, g: GraphIndex, norm: Affine) -> Plan | Refusal | None:
        raise NotImplementedError


class FoldAfter(Rule):
    """Normalization after a linear op: scale its output channels, shift its bias."""

    def __init__(self, op: LinearOp):
        self.op, self.name, self.summary = op, op.after_rule, op.after_summary
        # an op without a bias input may have its bias in an Add after it
        self.op_types = (op.op_type,) + (("Add",) if op.bias_slot is None else ())

    def match(self, g, norm):
        producer = g.producer.get(norm.x)
        if producer is None or producer.op_type not in self.op_types:
            return None
        target = after_target(g, norm.x, norm.node)
        if not isinstance(target, AfterTarget):
            return target
        if target.op is not self.op:
            return None
        if self.op.nc_output and norm.node.op_type == "BatchNormalization" and norm.s.shape[0] != target.channels:
            # both read axis 1 of [N, C, ...]: only an invalid model disagrees
            raise InputError(f"invalid model: BatchNormalization {node_label(norm.node)} has {norm.s.shape[0]} "
                             f"channels, but its input has {target.channels} ({node_label(target.node)})")
        try:
            edits, norm_kept = target.plan_edits(g, norm.s, norm.t, norm.y, norm.node)
        except FoldRefused as exc:
            return _refused(exc)
        return Plan(self.name, norm.node, node_label(target.node), edits, [] if norm_kept else [norm.node],
                    [target.read(norm.x, producer, norm.node)])


class FoldBefore(Rule):
    """Normalization feeding a linear op: scale its input channels, push the shift through into its bias."""

    def __init__(self, op: LinearOp):
        self.op, self.name, self.summary = op, op.before_rule, op.before_summary

    def match(self, g, norm):
        users = g.consumers.get(norm.y, [])
        if len(users) != 1 or norm.y in g.outputs:
            return None
        consumer, via = users[0], None
        dense = self.op.max_weight_rank == 2  # a 2-D weight reads features: channels may be flattened first
        if consumer.op_type in ("Flatten", "Reshape") and consumer.input[0] == norm.y and dense:
            flattened = consumer.output[0]
            readers = g.consumers.get(flattened, [])
            if len(readers) != 1 or flattened in g.outputs:
                return None
            via, consumer = consumer, readers[0]
        reads = via.output[0] if via is not None else norm.y
        inputs = g.inputs_of(consumer)  # (the index's list: no protobuf reads)
        if consumer.op_type != self.op.op_type or consumer.domain not in ("", "ai.onnx") or \
                not inputs or inputs[0] != reads:
            return None
        label = f"{consumer.op_type} {node_label(consumer)}"
        if via is not None:
            reason = _flatten_keeps_channels(g, via, norm)
            if reason:
                return reason
        if len(inputs) < 2 or inputs[1] == reads:
            return Refusal("weight-is-input", f"{label} reads the normalized tensor as its weight")
        weight, reason = g.constant(inputs[1])
        if weight is None:
            return Refusal("weight-not-constant", f"weight of {label} is not constant: {reason}")
        if not _is_float(weight):
            return Refusal("not-float", f"weight of {label} is not floating point")
        s, t = norm.s, norm.t
        if via is not None:  # channel c covers a run of K/C consecutive features after flattening
            _, in_axis = self.op.axes(consumer)
            features = weight.shape[min(in_axis, weight.ndim - 1)]
            if weight.ndim != 2 or features % norm.channels:
                return Refusal("channel-mismatch",
                               f"{label} reads {features} features, not a multiple of {norm.channels} channels")
            s, t = np.repeat(s, features // norm.channels), np.repeat(t, features // norm.channels)
        try:
            edits = self.plan(g, consumer, weight, s, t, label, rank_known=via is not None)
        except FoldRefused as exc:
            return _refused(exc)
        if isinstance(edits, Refusal):
            return edits
        first = via if via is not None else consumer
        edits.append(RenameInput(first, norm.y, norm.x))
        return Plan(self.name, norm.node, node_label(consumer), edits, [norm.node])

    def plan(self, g, consumer, weight, s, t, label, rank_known) -> list | Refusal:
        op, inputs = self.op, g.inputs_of(consumer)
        if op.refuse_before_attr and get_attr(consumer, op.refuse_before_attr, 0):
            return Refusal("batch-axis-contracted", f"{label} {op.refuse_before_reason}")
        if op.activation_rank is not None and not rank_known:
            reason = _activation_rank_reason(g, consumer, op, label,
                                             "BatchNormalization's channel axis is not contracted")
            if reason is not None:
                return reason
        if op.pads_input and not _no_padding(g, consumer, weight):
            return Refusal("pads-input", f"{label} pads its input: the shift would not reach the padded border")
        out_axis, in_axis = op.axes(consumer)
        groups = op.axis_groups(consumer, in_axis)
        if op.weight_rank_reason(weight.ndim) or weight.shape[in_axis] * groups != s.shape[0]:
            if op.max_weight_rank == 2:
                contracted = weight.shape[in_axis] if weight.ndim > in_axis else "?"
                return Refusal("channel-mismatch", f"{label} contracts over {contracted} features, not {s.shape[0]}")
            return Refusal("channel-mismatch", f"{label} reads {weight.shape[in_axis] * groups} channels, "
                                               f"BatchNormalization has {s.shape[0]}")
        new_w, shift = absorb_before(weight, None, s, t, in_axis=in_axis, out_axis=out_axis, groups=groups)
        exact_w = exact_shift = None
        if g.ctx.exact_wanted(weight.dtype):
            earlier = g.exact_value(inputs[1])
            exact_w, exact_shift = (new_w, shift) if earlier is None else \
                absorb_before(earlier, None, s, t, in_axis=in_axis, out_axis=out_axis, groups=groups)
        new_w = cast_checked_in_errstate(new_w, weight.dtype)
        if op.bias_slot is None:
            return _bias_after(g, consumer, weight, new_w, shift, exact_w, exact_shift)
        bias = exact_bias = None
        if len(inputs) > op.bias_slot and inputs[op.bias_slot]:
            bias, reason = g.constant(inputs[op.bias_slot])
            if bias is None:
                return Refusal("bias-not-constant", f"bias of {label} is not constant: {reason}")
            if op.bias_broadcasts and (bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, shift.shape[0]))):
                return Refusal("bias-shape", f"bias of {label} has shape {list(bias.shape)}")
            if exact_w is not None:
                exact_bias = g.exact_value(inputs[op.bias_slot])
        alpha = float(get_attr(consumer, op.output_scale_attr, 1.0)) if op.output_scale_attr else 1.0
        beta = float(get_attr(consumer, op.bias_scale_attr, 1.0)) if op.bias_scale_attr else 1.0

        def shifted(bias, shift):  # beta * bias + alpha * shift; a factor of 1 is left out (1 * x is x exactly)
            scaled = shift if alpha == 1.0 else alpha * shift
            if bias is None:
                return scaled
            bias = np.asarray(bias, np.float64)
            return (bias if beta == 1.0 else beta * bias) + scaled

        new_b = cast_checked_in_errstate(shifted(bias, shift), weight.dtype, "folded bias")
        exact_b = None if exact_w is None else shifted(bias if exact_bias is None else exact_bias, exact_shift)
        edits = [WriteTensor(consumer, 1, new_w, exact_w), WriteTensor(consumer, op.bias_slot, new_b, exact_b)]
        if beta != 1.0:
            edits.append(SetAttribute(consumer, op.bias_scale_attr, 1.0))
        return edits


def _bias_after(g: GraphIndex, consumer: onnx.NodeProto, weight: np.ndarray, new_w: np.ndarray,
                shift: np.ndarray, exact_w: np.ndarray | None, exact_shift: np.ndarray | None) -> list | Refusal:
    """Edits for an op without a bias input: the shift goes into an Add after it, or it becomes Gemm.
    ``exact_w``, ``exact_shift``: the float64 values to keep beside the rounded ones (None: none kept)."""
    out = consumer.output[0]
    readers = g.consumers.get(out, [])
    if len(readers) == 1 and out not in g.outputs and readers[0].op_type == "Add":
        found = _bias_add(g, readers[0])
        if found is not None and found[1] is consumer:
            add, _, slot, bias = found
            if bias.ndim <= 2 and (bias.ndim == 0 or bias.shape[-1] in (1, shift.shape[0])) and \
                    (bias.ndim < 2 or bias.shape[0] == 1):
                new_b = cast_checked_in_errstate(bias + shift, weight.dtype, "folded bias")
                exact_b = None
                if exact_shift is not None:
                    earlier = g.exact_value(add.input[slot])
                    exact_b = (bias if earlier is None else earlier) + exact_shift
                return [WriteTensor(consumer, 1, new_w, exact_w), WriteTensor(add, slot, new_b, exact_b)]
    if not np.any(shift != 0):
        return [WriteTensor(consumer, 1, new_w, exact_w)]
    if not _gemm_allowed(g, weight.dtype):
        return Refusal("no-bias-carrier", "the shift needs a bias and this opset's Gemm can not carry one")
    new_b = cast_checked_in_errstate(shift, weight.dtype, "folded bias")
    return [SetOpType(consumer, "Gemm"), WriteTensor(consumer, 1, new_w, exact_w),
            WriteTensor(consumer, 2, new_b, exact_shift)]


def _flatten_keeps_channels(g: GraphIndex, node: onnx.NodeProto, norm: Affine) -> Refusal | None:
    """None when the Flatten/Reshape turns [N, C, ...] into [N, C*...] with channels outermost, else why not."""
    if node.op_type == "Flatten":
        axis = get_attr(node, "axis", 1)
        rank = g.rank(norm.x)
        if axis == 1 or (rank is not None and axis == 1 - rank):
            return None
        return Refusal("flatten-mixes-channels",
                       f"Flatten axis={axis} after the BatchNormalization mixes the channel axis with others")
    if len(node.input) < 2:
        return Refusal("reshape-unproven", "Reshape without a shape")
    shape, reason = g.constant(node.input[1])
    if shape is None:
        return Refusal("reshape-unproven", f"Reshape shape is not constant: {reason}")
    shape = [int(v) for v in np.asarray(shape).reshape(-1)]
    if len(shape) == 2 and shape[0] == 0 and not get_attr(node, "allowzero", 0):
        return None  # [0, -1] or [0, K]: keeps the batch axis, flattens the rest
    x_shape = g.static_shape(norm.x)
    if x_shape is not None and len(shape) == 2:
        total = math.prod(x_shape[1:])
        if shape in ([x_shape[0], -1], [-1, total], [x_shape[0], total]):
            return None
    return Refusal("reshape-unproven",
                   f"can not prove Reshape {list(shape)} keeps the batch axis and flattens channels outermost")


def _no_padding(g: GraphIndex, conv: onnx.NodeProto, weight: np.ndarray) -> bool:
    found = get_attrs(conv, pads=None, auto_pad=b"NOTSET")
    pads, auto_pad = found["pads"], found["auto_pad"]
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):  # pads only when the dilated kernel is wider than 1
        return all(k == 1 for k in weight.shape[2:])
    return auto_pad in ("NOTSET", "VALID") and not any(pads or [])


_LINEAR_NAMES = "/".join(LINEAR_OPS)


class ConcatBN(Rule):
    name, summary = "concat-bn", "Concat of linear ops along channels -> BatchNormalization (each slice folds)"

    def match(self, g, norm):
        concat = g.producer.get(norm.x)
        if concat is None or concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx"):
            return None
        if not g.only_consumer(norm.x, norm.node):
            return Refusal("output-shared", f"the Concat output is also used elsewhere: {g.usage(norm.x)}")
        if len(set(concat.input)) != len(concat.input):
            return Refusal("concat-repeats-input", "the Concat reads the same tensor twice")
        targets = []
        for name in concat.input:
            target = after_target(g, name, concat)
            if not isinstance(target, AfterTarget):
                return target or Refusal("concat-input-not-linear",
                                         f"Concat input '{name}' does not come from a {_LINEAR_NAMES}")
            targets.append(target)
        axis = get_attr(concat, "axis", 0)
        rank = targets[0].rank
        if not (axis == 1 or (rank is not None and axis == 1 - rank)):
            return Refusal("concat-not-channel-axis", f"the Concat joins along axis {axis}, not the channel axis")
        if sum(t.channels for t in targets) != norm.channels:
            return Refusal("channel-mismatch", f"the Concat joins {sum(t.channels for t in targets)} channels, "
                                               f"BatchNormalization has {norm.channels}")
        edits, start = [], 0
        try:
            for target in targets:
                stop = start + target.channels
                part, _ = target.plan_edits(g, norm.s[start:stop], norm.t[start:stop], None, None)
                edits += part
                start = stop
        except FoldRefused as exc:
            return _refused(exc)
        edits.append(MoveOutput(concat, norm.y))
        return Plan(self.name, norm.node, ", ".join(node_label(t.node) for t in targets), edits, [norm.node])


class AffineAfterLinear(Rule):
    """Mul/Add/Sub/Div by a per-channel constant right after a linear op (BN decomposed by an exporter)."""

    name, summary = "affine-mul-add", f"{_LINEAR_NAMES} -> Mul/Add/Sub/Div by a per-channel constant"
    sources = frozenset({"Mul", "Add", "Sub", "Div"})

    def match(self, g, node):
        op = node.op_type
        inputs, outputs = g.inputs_of(node), g.outputs_of(node)  # (the index's lists: no protobuf reads)
        if len(inputs) != 2 or not outputs or not outputs[0]:
            return None
        for slot in ((0, 1) if op in ("Mul", "Add") else (0,)):
            x, c = inputs[slot], inputs[1 - slot]
            producer = g.producer.get(x)
            linear = LINEAR_OPS.get(producer.op_type) if producer is not None else None
            if linear is None:
                continue
            if linear.bias_slot is None and op in ("Add", "Sub"):
                continue  # an Add after MatMul already is its bias
            const, _ = g.constant(c)
            if const is None or not _is_float(const):
                continue
            target = after_target(g, x, node)
            if not isinstance(target, AfterTarget):
                return None  # the Mul/Add simply stays: not a normalization we promised to fold
            vec = _channel_vector(const, target.rank, target.channels)
            if vec is None:
                continue
            ones, zeros = np.ones_like(vec), np.zeros_like(vec)
            if op == "Div" and np.any(vec == 0):
                continue
            s, t = {"Mul": (vec, zeros), "Add": (ones, vec), "Sub": (ones, -vec), "Div": (1.0 / vec, zeros)}[op]
            try:
                edits, _ = target.plan_edits(g, s, t, outputs[0], None)
            except FoldRefused:
                return None
            return Plan(self.name, node, node_label(target.node), edits, [node])
        return None


def build_rules(ops: dict[str, LinearOp] | None = None) -> tuple[Rule, ...]:
    """Every rule, in the order they are tried: folds after each linear op, Concat, folds before each linear op,
    and decomposed affines. Generated from the descriptor table, so a new descriptor brings its rules along."""
    ops = LINEAR_OPS if ops is None else ops
    return (*(FoldAfter(op) for op in ops.values()), ConcatBN(),
            *(FoldBefore(op) for op in ops.values() if op.before_rule), AffineAfterLinear())


_built: list = [None, ()]  # [a copy of the table the rules were built from, the rules]


def current_rules() -> tuple[Rule, ...]:
    """:func:`build_rules` of the table as it is now, rebuilt only when the table changed (a fold of a small
    model would otherwise spend a noticeable part of its time building rule objects). The check compares the
    entries (a dict comparison allocates nothing), not their order: reordering the same descriptors in place keeps
    the rules built for the old order."""
    if _built[0] != LINEAR_OPS:
        _built[:] = [dict(LINEAR_OPS), build_rules()]
    return _built[1]


#: The rules of the built-in table. ``--skip NAME`` removes one.
RULES: tuple[Rule, ...] = build_rules()
RULE_NAMES: tuple[str, ...] = tuple(r.name for r in RULES)
