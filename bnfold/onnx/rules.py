"""Fold rules for ONNX graphs: one small object per pattern.

A rule's :meth:`Rule.match` looks at one normalization (a BatchNormalization, or a Mul/Add/Sub/Div by a
per-channel constant) and answers with

* a :class:`Plan` — all math done and cast-checked, only the graph edit left to :meth:`Plan.apply`;
* a string — the reason this pattern is present but can not be folded exactly;
* ``None`` — the pattern is not there at all.

Matching never edits the graph, so a refusal leaves the model exactly as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import onnx

from ..affine import FoldRefused, absorb_after, absorb_before, bn_to_affine, cast_checked
from ..errors import InputError
from .constant_ops import attribute_value
from .graph import GraphIndex, get_attr, node_label, set_attr

Reason = str


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


@dataclass
class Plan:
    """A fold ready to happen: graph edits, then the normalization nodes that disappear."""

    rule: str
    into: str
    edits: list[Callable[[], None]] = field(default_factory=list)
    remove: list[onnx.NodeProto] = field(default_factory=list)

    def apply(self, g: GraphIndex) -> None:
        for edit in self.edits:
            edit()
        for node in self.remove:
            if not g.is_removed(node):
                g.remove_node(node)


# ONNX float attributes are float32: an absent epsilon means float32(1e-5), as runtimes read it.
DEFAULT_EPSILON = float(np.float32(1e-5))


# ---- the normalization side ---------------------------------------------------------------------------------

def inference_epsilon(g: GraphIndex, node: onnx.NodeProto) -> float | Reason:
    """The epsilon of a BatchNormalization that normalizes by its stored statistics, else why it does not."""
    opset = g.ctx.opset
    if opset < 6:
        return f"BatchNormalization-{opset} (consumed_inputs era) is not supported"
    outputs = g.outputs_of(node)
    if len(outputs) > 1 and any(outputs[1:]):
        return "training mode: the node also outputs running statistics"
    epsilon = training_mode = is_test = spatial = None
    for attr in node.attribute:  # one pass: the first of each name counts, as get_attr reads them
        name = attr.name
        if name == "epsilon" and epsilon is None:
            epsilon = attribute_value(attr)
        elif name == "training_mode" and training_mode is None:
            training_mode = attr.i
        elif name == "is_test" and is_test is None:
            is_test = attr.i
        elif name == "spatial" and spatial is None:
            spatial = attr.i
    if training_mode:
        return "training mode (training_mode=1): it normalizes by batch statistics"
    if opset < 7 and not is_test:
        return "training mode (is_test=0 in BatchNormalization-6)"
    if opset < 9 and spatial == 0:
        return "spatial=0: statistics per activation, not per channel"
    if len(g.inputs_of(node)) < 5 or not outputs or not outputs[0]:
        return "malformed BatchNormalization (needs 5 inputs and an output)"
    return DEFAULT_EPSILON if epsilon is None else epsilon


def batchnorm_affine(g: GraphIndex, node: onnx.NodeProto,
                     prefetched: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> Affine | Reason:
    """A BatchNormalization in inference mode with constant parameters, as a per-channel affine."""
    inputs = g.inputs_of(node)
    hit = prefetched.pop(id(node), None) if prefetched else None
    if hit is not None:  # prefetch made inference_epsilon's checks before it did the math
        check_batchnorm_channels(g, node, hit[0].shape[0])
        return Affine(node, inputs[0], g.outputs_of(node)[0], *hit)
    epsilon = inference_epsilon(g, node)
    if isinstance(epsilon, str):
        return epsilon
    params = []
    for role, name in zip(("scale", "bias", "mean", "var"), inputs[1:5]):
        value, reason = g.constant(name)
        if value is None:
            return f"{role} is not constant: {reason}"
        if value.ndim != 1:
            return f"{role} has shape {list(value.shape)}, expected one value per channel"
        params.append(value)
    if len({p.shape[0] for p in params}) != 1:
        raise InputError(f"invalid model: BatchNormalization {node_label(node)} has scale, B, mean and var of "
                         f"lengths {[p.shape[0] for p in params]}")
    check_batchnorm_channels(g, node, params[0].shape[0])
    if not all(_is_float(p) for p in params):
        return "parameters are not floating point"
    try:
        s, t = bn_to_affine(*params, epsilon)
    except FoldRefused as exc:
        return str(exc)
    return Affine(node, inputs[0], g.outputs_of(node)[0], s, t)


def check_batchnorm_channels(g: GraphIndex, node: onnx.NodeProto, channels: int) -> None:
    """A BN whose parameters do not match its input's channel count (when the shape is at hand) is invalid."""
    shape = g.known_shape(g.inputs_of(node)[0])
    if shape is not None and len(shape) >= 2 and isinstance(shape[1], int) and shape[1] != channels:
        raise InputError(f"invalid model: BatchNormalization {node_label(node)} has {channels} channels, "
                         f"but its input has {shape[1]}")


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
    """A constant weight whose values are read only when the math needs them (prefetched folds never do)."""

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

    node: onnx.NodeProto
    output: str  # the value the normalization reads
    weight: _Weight
    axis: int
    groups: int
    bias: np.ndarray | None  # effective bias in float64 (Gemm: beta*C, MatMul+Add: the Add constant)
    channels: int
    rank: int | None
    bias_node: onnx.NodeProto | None = None  # the Add of MatMul -> Add
    bias_slot: int = 2

    def plan_edits(self, g: GraphIndex, s: np.ndarray, t: np.ndarray, out_name: str | None,
                   norm: onnx.NodeProto | None) -> tuple[list[Callable[[], None]], bool]:
        """Math now (refusals raise FoldRefused), edits later: ``(edits, norm_kept)``.

        ``out_name``: the value the op produces afterwards (None keeps its own). A MatMul that may not become
        Gemm (old opsets) turns ``norm`` into the Add that carries the new bias; ``norm_kept`` says so.
        """
        if s.shape[0] != self.channels:
            raise FoldRefused(f"{s.shape[0]} channels vs {self.channels} output channels of {node_label(self.node)}")
        dtype = self.weight.dtype
        new_w, new_b = absorb_after(self.weight.values, self.bias, s, t, axis=self.axis, groups=self.groups)
        new_w = cast_checked(new_w, dtype)
        needs_bias = self.bias is not None or bool(np.any(t != 0))
        new_b = cast_checked(new_b, dtype, "folded bias") if needs_bias else None
        node, op, renamed = self.node, self.node.op_type, self.node
        edits: list[Callable[[], None]] = []
        norm_kept = False
        if new_b is None:
            pass
        elif op in ("Conv", "ConvTranspose"):
            edits.append(lambda: g.write_tensor(node, 2, new_b.reshape(-1)))
        elif op == "Gemm":
            edits.append(lambda: g.write_tensor(node, 2, new_b))
            if get_attr(node, "beta", 1.0) != 1.0:
                edits.append(lambda: set_attr(node, "beta", 1.0))
        elif self.bias_node is not None:  # MatMul -> Add(const): the Add keeps carrying the bias
            add, slot, renamed = self.bias_node, self.bias_slot, self.bias_node
            edits.append(lambda: g.write_tensor(add, slot, new_b))
        elif _gemm_allowed(g, dtype):
            edits.append(lambda: _matmul_to_gemm(g, node, new_b))
        elif norm is not None:
            matmul_out = self.output
            edits.append(lambda: g.turn_into_add(norm, matmul_out, new_b))
            norm_kept, out_name = True, None
        else:
            raise FoldRefused("would need a new Add node (opset < 11 has no Gemm with optional bias)")
        # The weight goes last: a computed bias (an exporter's Shape(W) -> Expand chain) may read the weight, and
        # once the new bias has replaced it the weight has one reader left and is rewritten in place, not copied.
        edits.append(lambda: g.write_tensor(node, 1, new_w))
        if out_name is not None:
            edits.append(lambda: g.move_output(renamed, out_name))
        return edits, norm_kept


def _matmul_to_gemm(g: GraphIndex, matmul: onnx.NodeProto, bias: np.ndarray) -> None:
    """A rank-2 MatMul becomes Gemm(x, W, bias): same product, the bias added in the same kernel."""
    matmul.op_type = "Gemm"
    g.write_tensor(matmul, 2, bias)


class _Label:
    """``"<op> <node name>"`` for messages, built only when printed."""

    __slots__ = ("op", "node")

    def __init__(self, op: str, node: onnx.NodeProto):
        self.op, self.node = op, node

    def __str__(self) -> str:
        return f"{self.op} {node_label(self.node)}"


def after_target(g: GraphIndex, name: str, reader: onnx.NodeProto) -> AfterTarget | Reason | None:
    """The linear op producing ``name``, if ``reader`` is its only consumer and its weights are constant."""
    node = g.producer.get(name)
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    bias_node = add_bias = None
    if op == "Add":  # MatMul -> Add(const) -> normalization
        found = _matmul_bias_add(g, node)
        if found is None:
            return None
        bias_node, node, bias_slot, add_bias = found
        op = "MatMul"
    if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return None
    label = _Label(op, node)  # formatted only when a refusal needs it
    if not g.only_consumer(name, reader):
        return f"the output of {label} is also used elsewhere: {g.usage(name)}"
    if bias_node is not None and not g.only_consumer(node.output[0], bias_node):
        return f"the output of {label} is also used elsewhere: {g.usage(node.output[0])}"
    inputs = node.input
    if len(inputs) < 2:
        return f"{label} has no weight input"
    weight, reason = _weight(g, inputs[1])
    if weight is None:
        return f"weight of {label} is not constant: {reason}"
    if not _is_float(weight):
        return f"weight of {label} is not floating point"
    bias = None
    if op != "MatMul" and len(inputs) > 2 and inputs[2]:
        bias, reason = g.constant(inputs[2])
        if bias is None:
            return f"bias of {label} is not constant: {reason}"
        bias = np.asarray(bias, dtype=np.float64)
    if op == "Conv" or op == "ConvTranspose":
        if weight.ndim < 3:
            return f"weight of {label} has rank {weight.ndim}"
        if op == "Conv":
            return AfterTarget(node, name, weight, 0, 1, bias, weight.shape[0], weight.ndim)
        groups = int(get_attr(node, "group", 1))
        return AfterTarget(node, name, weight, 1, groups, bias, weight.shape[1] * groups, weight.ndim)
    if weight.ndim != 2:
        return f"weight of {label} has rank {weight.ndim}, expected 2"
    if op == "Gemm":
        axis = 0 if get_attr(node, "transB", 0) else 1
        if bias is not None:
            bias = bias * float(get_attr(node, "beta", 1.0))
            if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, weight.shape[axis])):
                return f"bias of {label} has shape {list(bias.shape)}"
        return AfterTarget(node, name, weight, axis, 1, bias, weight.shape[axis], 2)
    # MatMul: its last axis is BN's channel axis 1 only for a rank-2 product
    rank = g.rank(node.input[0])
    if rank is None:
        return f"can not prove the input of {label} is rank 2 (no shape information)"
    if rank != 2:
        return f"{label} multiplies a rank-{rank} tensor: channel axis 1 is not the weight's output axis"
    if bias_node is not None:
        if add_bias.ndim > 2 or (add_bias.ndim >= 1 and add_bias.shape[-1] not in (1, weight.shape[1])) or \
                (add_bias.ndim == 2 and add_bias.shape[0] != 1):
            return f"the Add after {label} does not add a per-channel constant"
        return AfterTarget(node, name, weight, 1, 1, add_bias, weight.shape[1], 2, bias_node, bias_slot)
    return AfterTarget(node, name, weight, 1, 1, None, weight.shape[1], 2)


def _matmul_bias_add(g: GraphIndex, add: onnx.NodeProto):
    """(add, matmul, constant slot, constant) when ``add`` is MatMul(x, W) + constant."""
    for slot in (0, 1):
        other = add.input[1 - slot]
        producer = g.producer.get(other)
        if producer is not None and producer.op_type == "MatMul" and producer.domain in ("", "ai.onnx"):
            const, _ = g.constant(add.input[slot])
            if const is not None and _is_float(const):
                return add, producer, slot, np.asarray(const, dtype=np.float64)
    return None


def _is_float(a) -> bool:
    return a.dtype.kind == "f" or a.dtype.name == "bfloat16"


# ---- rules ------------------------------------------------------------------------------------------------------

class Rule:
    """One folding pattern. ``name`` is what ``--skip`` takes."""

    name: ClassVar[str]
    summary: ClassVar[str]
    sources: ClassVar[frozenset[str]] = frozenset({"BatchNormalization"})

    def match(self, g: GraphIndex, norm: Affine) -> Plan | Reason | None:
        raise NotImplementedError


class FoldAfter(Rule):
    """Normalization after a linear op of ``op_type``: scale its output channels, shift its bias."""

    op_types: ClassVar[tuple[str, ...]]

    def match(self, g, norm):
        producer = g.producer.get(norm.x)
        if producer is None or producer.op_type not in self.op_types:
            return None
        target = after_target(g, norm.x, norm.node)
        if not isinstance(target, AfterTarget):
            return target
        if target.node.op_type in ("Conv", "ConvTranspose") and norm.node.op_type == "BatchNormalization" and \
                norm.s.shape[0] != target.channels:  # both read axis 1: only an invalid model disagrees
            raise InputError(f"invalid model: BatchNormalization {node_label(norm.node)} has {norm.s.shape[0]} "
                             f"channels, but its input has {target.channels} ({node_label(target.node)})")
        try:
            edits, norm_kept = target.plan_edits(g, norm.s, norm.t, norm.y, norm.node)
        except FoldRefused as exc:
            return str(exc)
        return Plan(self.name, node_label(target.node), edits, [] if norm_kept else [norm.node])


class ConvBN(FoldAfter):
    name, summary, op_types = "conv-bn", "Conv -> BatchNormalization (1-D/2-D/3-D, grouped)", ("Conv",)


class ConvTransposeBN(FoldAfter):
    name, summary, op_types = "convtranspose-bn", "ConvTranspose -> BatchNormalization", ("ConvTranspose",)


class GemmBN(FoldAfter):
    name, summary, op_types = "gemm-bn", "Gemm -> BatchNormalization", ("Gemm",)


class MatMulBN(FoldAfter):
    name, summary, op_types = "matmul-bn", "MatMul [-> Add] -> BatchNormalization (rank 2)", ("MatMul", "Add")


class FoldBefore(Rule):
    """Normalization feeding a linear op: scale its input channels, push the shift through into its bias."""

    op_types: ClassVar[tuple[str, ...]]

    def match(self, g, norm):
        users = g.consumers.get(norm.y, [])
        if len(users) != 1 or norm.y in g.outputs:
            return None
        consumer, via = users[0], None
        if consumer.op_type in ("Flatten", "Reshape") and consumer.input[0] == norm.y and self.op_types != ("Conv",):
            flattened = consumer.output[0]
            readers = g.consumers.get(flattened, [])
            if len(readers) != 1 or flattened in g.outputs:
                return None
            via, consumer = consumer, readers[0]
        reads = via.output[0] if via is not None else norm.y
        if consumer.op_type not in self.op_types or consumer.domain not in ("", "ai.onnx") or \
                not consumer.input or consumer.input[0] != reads:
            return None
        label = f"{consumer.op_type} {node_label(consumer)}"
        if via is not None:
            reason = _flatten_keeps_channels(g, via, norm)
            if reason:
                return reason
        if len(consumer.input) < 2 or consumer.input[1] == reads:
            return f"{label} reads the normalized tensor as its weight"
        weight, reason = g.constant(consumer.input[1])
        if weight is None:
            return f"weight of {label} is not constant: {reason}"
        if not _is_float(weight):
            return f"weight of {label} is not floating point"
        s, t = norm.s, norm.t
        if via is not None:  # channel c covers a run of K/C consecutive features after flattening
            features = weight.shape[-1] if consumer.op_type == "Gemm" and get_attr(consumer, "transB", 0) \
                else weight.shape[0]
            if weight.ndim != 2 or features % norm.channels:
                return f"{label} reads {features} features, not a multiple of {norm.channels} channels"
            s, t = np.repeat(s, features // norm.channels), np.repeat(t, features // norm.channels)
        try:
            edits = self.plan(g, consumer, weight, s, t, label, rank_known=via is not None)
        except FoldRefused as exc:
            return str(exc)
        if isinstance(edits, str):
            return edits
        first, x, y = (via if via is not None else consumer), norm.x, norm.y
        edits.append(lambda: g.rename_input(first, y, x))
        return Plan(self.name, node_label(consumer), edits, [norm.node])

    def plan(self, g, consumer, weight, s, t, label, rank_known):
        raise NotImplementedError


def _flatten_keeps_channels(g: GraphIndex, node: onnx.NodeProto, norm: Affine) -> Reason:
    """'' when the Flatten/Reshape turns [N, C, ...] into [N, C*...] with channels outermost."""
    if node.op_type == "Flatten":
        axis = get_attr(node, "axis", 1)
        rank = g.rank(norm.x)
        if axis == 1 or (rank is not None and axis == 1 - rank):
            return ""
        return f"Flatten axis={axis} after the BatchNormalization mixes the channel axis with others"
    if len(node.input) < 2:
        return "Reshape without a shape"
    shape, reason = g.constant(node.input[1])
    if shape is None:
        return f"Reshape shape is not constant: {reason}"
    shape = [int(v) for v in np.asarray(shape).reshape(-1)]
    if len(shape) == 2 and shape[0] == 0 and not get_attr(node, "allowzero", 0):
        return ""  # [0, -1] or [0, K]: keeps the batch axis, flattens the rest
    x_shape = g.static_shape(norm.x)
    if x_shape is not None and len(shape) == 2:
        total = math.prod(x_shape[1:])
        if shape in ([x_shape[0], -1], [-1, total], [x_shape[0], total]):
            return ""
    return f"can not prove Reshape {list(shape)} keeps the batch axis and flattens channels outermost"


def _no_padding(g: GraphIndex, conv: onnx.NodeProto, weight: np.ndarray) -> bool:
    pads = get_attr(conv, "pads", None)
    auto_pad = get_attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):  # pads only when the dilated kernel is wider than 1
        return all(k == 1 for k in weight.shape[2:])
    return auto_pad in ("NOTSET", "VALID") and not any(pads or [])


class BNConv(FoldBefore):
    name, summary, op_types = "bn-conv", "BatchNormalization -> Conv without padding (e.g. 1x1)", ("Conv",)

    def plan(self, g, conv, weight, s, t, label, rank_known):
        if not _no_padding(g, conv, weight):
            return f"{label} pads its input: the shift would not reach the padded border"
        groups = int(get_attr(conv, "group", 1))
        bias = None
        if len(conv.input) > 2 and conv.input[2]:
            bias, reason = g.constant(conv.input[2])
            if bias is None:
                return f"bias of {label} is not constant: {reason}"
        if weight.shape[1] * groups != s.shape[0]:
            return f"{label} reads {weight.shape[1] * groups} channels, BatchNormalization has {s.shape[0]}"
        new_w, new_b = absorb_before(weight, bias, s, t, in_axis=1, out_axis=0, groups=groups)
        new_w, new_b = cast_checked(new_w, weight.dtype), cast_checked(new_b, weight.dtype, "folded bias")
        return [lambda: g.write_tensor(conv, 1, new_w), lambda: g.write_tensor(conv, 2, new_b)]


class BNGemm(FoldBefore):
    name, summary, op_types = "bn-gemm", "BatchNormalization [-> Flatten/Reshape] -> Gemm", ("Gemm",)

    def plan(self, g, gemm, weight, s, t, label, rank_known):
        if get_attr(gemm, "transA", 0):
            return f"{label} has transA=1: it contracts over the batch axis"
        trans_b = get_attr(gemm, "transB", 0)
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        if weight.ndim != 2 or weight.shape[in_axis] != s.shape[0]:
            return f"{label} contracts over {weight.shape[in_axis]} features, not {s.shape[0]}"
        alpha, beta = float(get_attr(gemm, "alpha", 1.0)), float(get_attr(gemm, "beta", 1.0))
        new_w, shift = absorb_before(weight, None, s, t, in_axis=in_axis, out_axis=out_axis)
        bias = None
        if len(gemm.input) > 2 and gemm.input[2]:
            bias, reason = g.constant(gemm.input[2])
            if bias is None:
                return f"bias of {label} is not constant: {reason}"
            if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, shift.shape[0])):
                return f"bias of {label} has shape {list(bias.shape)}"
        new_c = alpha * shift if bias is None else beta * np.asarray(bias, np.float64) + alpha * shift
        new_w, new_c = cast_checked(new_w, weight.dtype), cast_checked(new_c, weight.dtype, "folded bias")
        edits = [lambda: g.write_tensor(gemm, 1, new_w), lambda: g.write_tensor(gemm, 2, new_c)]
        if beta != 1.0:
            edits.append(lambda: set_attr(gemm, "beta", 1.0))
        return edits


class BNMatMul(FoldBefore):
    name, summary, op_types = "bn-matmul", "BatchNormalization [-> Flatten/Reshape] -> MatMul (rank 2)", ("MatMul",)

    def plan(self, g, matmul, weight, s, t, label, rank_known):
        if not rank_known:
            rank = g.rank(matmul.input[0])
            if rank is None:
                return f"can not prove the input of {label} is rank 2 (no shape information)"
            if rank != 2:
                return f"{label} multiplies a rank-{rank} tensor: BatchNormalization's channel axis is not contracted"
        if weight.ndim != 2 or weight.shape[0] != s.shape[0]:
            return f"{label} contracts over {weight.shape[0]} features, not {s.shape[0]}"
        new_w, shift = absorb_before(weight, None, s, t, in_axis=0, out_axis=1)
        new_w = cast_checked(new_w, weight.dtype)
        out = matmul.output[0]
        readers = g.consumers.get(out, [])
        if len(readers) == 1 and out not in g.outputs and readers[0].op_type == "Add":
            found = _matmul_bias_add(g, readers[0])
            if found is not None and found[1] is matmul:
                add, _, slot, bias = found
                if bias.ndim <= 2 and (bias.ndim == 0 or bias.shape[-1] in (1, shift.shape[0])) and \
                        (bias.ndim < 2 or bias.shape[0] == 1):
                    new_b = cast_checked(bias + shift, weight.dtype, "folded bias")
                    return [lambda: g.write_tensor(matmul, 1, new_w), lambda: g.write_tensor(add, slot, new_b)]
        if not np.any(shift != 0):
            return [lambda: g.write_tensor(matmul, 1, new_w)]
        if not _gemm_allowed(g, weight.dtype):
            return "the shift needs a bias and this opset's Gemm can not carry one"
        new_b = cast_checked(shift, weight.dtype, "folded bias")

        def to_gemm():
            matmul.op_type = "Gemm"
            g.write_tensor(matmul, 1, new_w)
            g.write_tensor(matmul, 2, new_b)
        return [to_gemm]


class ConcatBN(Rule):
    name, summary = "concat-bn", "Concat of linear ops along channels -> BatchNormalization (each slice folds)"

    def match(self, g, norm):
        concat = g.producer.get(norm.x)
        if concat is None or concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx"):
            return None
        if not g.only_consumer(norm.x, norm.node):
            return f"the Concat output is also used elsewhere: {g.usage(norm.x)}"
        if len(set(concat.input)) != len(concat.input):
            return "the Concat reads the same tensor twice"
        targets = []
        for name in concat.input:
            target = after_target(g, name, concat)
            if not isinstance(target, AfterTarget):
                return target or f"Concat input '{name}' does not come from a Conv/ConvTranspose/Gemm/MatMul"
            targets.append(target)
        axis = get_attr(concat, "axis", 0)
        rank = targets[0].rank
        if not (axis == 1 or (rank is not None and axis == 1 - rank)):
            return f"the Concat joins along axis {axis}, not the channel axis"
        if sum(t.channels for t in targets) != norm.channels:
            return f"the Concat joins {sum(t.channels for t in targets)} channels, BatchNormalization has {norm.channels}"
        edits, start = [], 0
        try:
            for target in targets:
                stop = start + target.channels
                part, _ = target.plan_edits(g, norm.s[start:stop], norm.t[start:stop], None, None)
                edits += part
                start = stop
        except FoldRefused as exc:
            return str(exc)
        y = norm.y
        edits.append(lambda: g.move_output(concat, y))
        return Plan(self.name, ", ".join(node_label(t.node) for t in targets), edits, [norm.node])


class AffineAfterLinear(Rule):
    """Mul/Add/Sub/Div by a per-channel constant right after a linear op (BN decomposed by an exporter)."""

    name, summary = "affine-mul-add", "Conv/ConvTranspose/Gemm/MatMul -> Mul/Add/Sub/Div by a per-channel constant"
    sources = frozenset({"Mul", "Add", "Sub", "Div"})

    def match(self, g, node):
        op = node.op_type
        if len(node.input) != 2 or not node.output or not node.output[0]:
            return None
        for slot in ((0, 1) if op in ("Mul", "Add") else (0,)):
            x, c = node.input[slot], node.input[1 - slot]
            producer = g.producer.get(x)
            if producer is None or producer.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                continue
            if producer.op_type == "MatMul" and op in ("Add", "Sub"):
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
                edits, _ = target.plan_edits(g, s, t, node.output[0], None)
            except FoldRefused:
                return None
            return Plan(self.name, node_label(target.node), edits, [node])
        return None


#: Every rule, in the order they are tried. ``--skip NAME`` removes one.
RULES: tuple[Rule, ...] = (ConvBN(), ConvTransposeBN(), GemmBN(), MatMulBN(), ConcatBN(), BNConv(), BNGemm(),
                           BNMatMul(), AffineAfterLinear())
RULE_NAMES: tuple[str, ...] = tuple(r.name for r in RULES)
