"""What a linear op is, for folding: one descriptor per ONNX op, read by every place that needs it.

The rules (:mod:`bnfold.onnx.rules`), the batched path (:mod:`bnfold.onnx.prefetch`) and the audit's folded-weight
check (:mod:`bnfold.audit`) know nothing per op beyond :data:`LINEAR_OPS`. Adding a linear op is one
:class:`LinearOp` here (its rules are generated from it); tests/test_ops.py shows it. The PyTorch side keeps its
own twin table in ``bnfold/torch/`` (keyed by torch op, not ONNX op).

The weight's layout is what matters: where the output and input channels sit, and how groups split them. With
groups, the weight's axis 1 holds the channel *within* a group and axis 0 enumerates rows that belong to groups in
order (Conv's input channels, ConvTranspose's output channels); see :func:`bnfold.affine.channel_multiplier`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import onnx

from .nodes import get_attr, get_attrs


@dataclass(frozen=True)
class LinearOp:
    """One linear ONNX op: its weight layout, its bias, and the rules that fold a normalization into it."""

    op_type: str
    after_rule: str  # the rule folding a normalization of its output (what --skip takes)
    after_summary: str
    before_rule: str = ""  # the rule folding a normalization of its input; "" when it has none
    before_summary: str = ""
    min_weight_rank: int = 2
    max_weight_rank: int | None = 2  # None: any rank from min_weight_rank up
    out_axis: int = 0  # weight axis of the output channels ...
    in_axis: int = 1  # ... and of the input channels (the contraction axis)
    swap_axes_attr: str = ""  # an int attribute that, when set, swaps the two axes (Gemm's transB)
    groups_attr: str = ""  # an int attribute splitting the channels into groups (on weight axis 1)
    bias_slot: int | None = 2  # input slot of the bias; None: the op has none (MatMul: an Add after it carries it)
    bias_scale_attr: str = ""  # a float attribute multiplying the bias (Gemm's beta)
    bias_broadcasts: bool = False  # the bias may be [1], [n], [1, n] or a scalar (Gemm's C), not only [n]
    output_scale_attr: str = ""  # a float attribute multiplying the product (Gemm's alpha)
    activation_rank: int | None = None  # the activation must have this rank for the channel axis to be axis 1
    nc_output: bool = False  # its output is [N, C, ...] with C its output channels, whatever the weights
    pads_input: bool = False  # zero padding: a shift of the input does not reach the padded border
    refuse_before_attr: str = ""  # an int attribute that, when set, makes the input side unfoldable (transA)
    refuse_before_reason: str = ""

    def axes(self, node: onnx.NodeProto) -> tuple[int, int]:
        """(output-channel axis, input-channel axis) of the weight for this node's attributes."""
        if self.swap_axes_attr and get_attr(node, self.swap_axes_attr, 0):
            return self.in_axis, self.out_axis
        return self.out_axis, self.in_axis

    def groups(self, node: onnx.NodeProto) -> int:
        return int(get_attr(node, self.groups_attr, 1)) if self.groups_attr else 1

    def axis_groups(self, node: onnx.NodeProto, axis: int) -> int:
        """Groups along weight ``axis``: only axis 1 holds a channel within a group; axis 0 lists every row."""
        return self.groups(node) if axis == 1 else 1

    def output_layout(self, node: onnx.NodeProto) -> tuple[int, int, float]:
        """(output-channel axis, groups along it, bias scale) in one pass over the node's attributes, and none when
        the op's layout needs no attribute (Conv's output channels are axis 0): what the batched path asks of every
        layer before a BN, where each attribute lookup costs as much as the rest of the check."""
        names = self._layout_attributes
        if not names:
            return self.out_axis, 1, 1.0
        found = get_attrs(node, **names)
        axis = self.in_axis if found.get(self.swap_axes_attr) else self.out_axis
        groups = int(found.get(self.groups_attr, 1)) if axis == 1 else 1
        return axis, groups, float(found.get(self.bias_scale_attr, 1.0))

    @functools.cached_property
    def _layout_attributes(self) -> dict[str, object]:
        """The attributes :meth:`output_layout` reads, with their defaults."""
        names: dict[str, object] = {}
        if self.swap_axes_attr:
            names[self.swap_axes_attr] = 0
        if self.groups_attr and (self.out_axis == 1 or self.swap_axes_attr):
            names[self.groups_attr] = 1
        if self.bias_scale_attr:
            names[self.bias_scale_attr] = 1.0
        return names

    def weight_rank_reason(self, rank: int) -> str:
        """'' when a weight of ``rank`` fits the op, else the end of the refusal ("has rank 1, expected 2")."""
        if rank < self.min_weight_rank or (self.max_weight_rank is not None and rank > self.max_weight_rank):
            return f"has rank {rank}" + (f", expected {rank_text}" if (rank_text := self._rank_text()) else "")
        return ""

    def _rank_text(self) -> str:
        return str(self.min_weight_rank) if self.max_weight_rank == self.min_weight_rank else ""


#: Every linear op a normalization folds into, in the order their rules are tried.
LINEAR_OPS: dict[str, LinearOp] = {op.op_type: op for op in (
    LinearOp("Conv", "conv-bn", "Conv -> BatchNormalization (1-D/2-D/3-D, grouped)",
             "bn-conv", "BatchNormalization -> Conv without padding (e.g. 1x1)",
             min_weight_rank=3, max_weight_rank=None, out_axis=0, in_axis=1, groups_attr="group", nc_output=True,
             pads_input=True),
    LinearOp("ConvTranspose", "convtranspose-bn", "ConvTranspose -> BatchNormalization",
             min_weight_rank=3, max_weight_rank=None, out_axis=1, in_axis=0, groups_attr="group", nc_output=True),
    LinearOp("Gemm", "gemm-bn", "Gemm -> BatchNormalization",
             "bn-gemm", "BatchNormalization [-> Flatten/Reshape] -> Gemm",
             out_axis=1, in_axis=0, swap_axes_attr="transB", bias_scale_attr="beta", bias_broadcasts=True,
             output_scale_attr="alpha", refuse_before_attr="transA",
             refuse_before_reason="has transA=1: it contracts over the batch axis"),
    LinearOp("MatMul", "matmul-bn", "MatMul [-> Add] -> BatchNormalization (rank 2)",
             "bn-matmul", "BatchNormalization [-> Flatten/Reshape] -> MatMul (rank 2)",
             out_axis=1, in_axis=0, bias_slot=None, activation_rank=2),
)}


def linear_op(node: onnx.NodeProto) -> LinearOp | None:
    """The descriptor of ``node`` when it is a linear op of the default domain, else None."""
    if node.domain not in ("", "ai.onnx"):
        return None
    return LINEAR_OPS.get(node.op_type)


def batchable(op: LinearOp) -> bool:
    """The batched path folds into this op: its bias is an input of its own and no activation rank is needed."""
    return op.bias_slot is not None and op.activation_rank is None
