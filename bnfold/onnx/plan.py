"""Plans are data: what a fold reads, writes, rewires and removes, and the one function that applies it.

A rule's match (:mod:`bnfold.onnx.rules`) and the batched path (:mod:`bnfold.onnx.prefetch`) both answer with a
:class:`Plan` (or a :class:`Refusal`); :func:`apply_plan` performs every plan and is the one place a fold is recorded.
A plan holds its math already done (new tensors in the model's dtype), so it can be inspected, compared and
checked (:meth:`Plan.holds`) before anything in the graph changes. The edit vocabulary is general enough for a
branch merge: several nodes' tensors written, names rewired, nodes removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..report import Fold, Merge
from .graph import GraphIndex
from .nodes import node_label, set_attr


class Refusal(str):
    """Why a pattern that is present can not be folded exactly: the message, and a stable kebab-case ``code``.

    A ``str`` (the message) so that reasons join and print as text; the code travels to the report's ``Skip``.
    """

    code: str

    def __new__(cls, code: str, message: str) -> "Refusal":
        self = super().__new__(cls, message)
        self.code = code
        return self


# ---- edits ------------------------------------------------------------------------------------------------------

@dataclass(slots=True, eq=False)
class WriteTensor:
    """Input ``slot`` of ``node`` becomes the constant ``value`` (rewritten in place when nothing else reads it).

    ``exact``: the float64 value ``value`` was rounded from, for merges made later to compose from (set only where
    :meth:`~bnfold.onnx.graph.ModelContext.exact_wanted` says so)."""

    node: onnx.NodeProto
    slot: int
    value: np.ndarray
    exact: np.ndarray | None = None


@dataclass(slots=True, eq=False)
class SetAttribute:
    node: onnx.NodeProto
    name: str
    value: object


@dataclass(slots=True, eq=False)
class RemoveAttribute:
    """The attribute ``name`` of ``node`` is dropped, if set (a merged Conv's ``auto_pad``: its pads are explicit)."""

    node: onnx.NodeProto
    name: str


@dataclass(slots=True, eq=False)
class SetOpType:
    """The node computes the same product as another op (MatMul -> Gemm, to carry a bias)."""

    node: onnx.NodeProto
    op_type: str


@dataclass(slots=True, eq=False)
class MoveOutput:
    """``node`` now produces ``name`` (the value the removed normalization produced)."""

    node: onnx.NodeProto
    name: str


@dataclass(slots=True, eq=False)
class RenameInput:
    node: onnx.NodeProto
    old: str
    new: str


@dataclass(slots=True, eq=False)
class TurnIntoAdd:
    """The normalization ``node`` becomes ``Add(x, bias)``: the op before it can not carry a bias."""

    node: onnx.NodeProto
    x: str
    bias: np.ndarray


Edit = WriteTensor | SetAttribute | RemoveAttribute | SetOpType | MoveOutput | RenameInput | TurnIntoAdd


# ---- what a plan read ------------------------------------------------------------------------------------------

@dataclass(slots=True, eq=False)
class LayerRead:
    """What a fold into ``layer`` read: ``value`` is produced by ``producer`` (the layer, or the Add holding its
    bias) and read by ``reader`` alone; the layer's weight (input 1) is ``weight`` and its input ``bias_slot`` is
    ``bias`` (``""``: the slot was empty; ``bias_slot`` None: the op has no bias input), and neither tensor has been
    given a new value since."""

    value: str
    producer: onnx.NodeProto
    reader: onnx.NodeProto
    layer: onnx.NodeProto
    weight: str
    bias_slot: int | None
    bias: str

    def holds(self, g: GraphIndex) -> bool:
        # one object and one call per plan: the batched path checks this once per prefetched fold
        if g.producer.get(self.value) is not self.producer or not g.only_consumer(self.value, self.reader):
            return False
        inputs, rewritten = g.inputs_of(self.layer), g.rewritten
        if len(inputs) < 2 or inputs[1] != self.weight or self.weight in rewritten:
            return False
        if self.bias_slot is None:
            return True
        current = inputs[self.bias_slot] if self.bias_slot < len(inputs) else ""
        return current == self.bias and (not current or current not in rewritten)


@dataclass(slots=True, eq=False)
class Plan:
    """A fold ready to happen: ``source`` (the normalization, named in the report) goes into ``into``.

    ``reads`` must cover whatever an earlier fold could change under a plan computed ahead (the batched path and
    the after-rules fill it); a plan that is applied as soon as it is made may leave it empty."""

    rule: str
    source: onnx.NodeProto
    into: str
    edits: list[Edit] = field(default_factory=list)
    remove: list[onnx.NodeProto] = field(default_factory=list)
    reads: list[LayerRead] = field(default_factory=list)

    def holds(self, g: GraphIndex) -> bool:
        """Everything the plan read is still as it was (a plan computed ahead, before earlier folds)."""
        for read in self.reads:  # a loop, not all(): this runs once per prefetched fold
            if not read.holds(g):
                return False
        return True


@dataclass(slots=True, eq=False)
class MergePlan(Plan):
    """A branch merge (:mod:`bnfold.onnx.merge`): ``source`` is the Add/Sum or the last Conv, ``into`` the op that
    survives as the merged one, ``remove`` every other merged node. Applied by the same :func:`apply_plan`, it is
    recorded as a :class:`~bnfold.report.Merge`."""


def apply_plan(g: GraphIndex, plan: Plan) -> Fold | Merge:
    """Perform ``plan``'s edits in order, remove its nodes, and return the record of the fold (or merge)."""
    if type(plan) is MergePlan:  # named before any edit renames them
        record = Merge(plan.rule, plan.into, tuple(f"{n.op_type} {node_label(n)}" for n in plan.remove), graph=g.path,
                       absorbed=tuple(node_label(n) for n in plan.remove if n.op_type == "BatchNormalization"))
    else:
        record = Fold(node_label(plan.source), plan.into, plan.rule, g.path)
    for edit in plan.edits:
        kind = type(edit)
        if kind is WriteTensor:
            name = g.write_tensor(edit.node, edit.slot, edit.value)
            if edit.exact is not None or g.exact:  # (no call at all in the common case: nothing kept)
                g.set_exact(name, edit.exact)
        elif kind is MoveOutput:
            g.move_output(edit.node, edit.name)
        elif kind is SetAttribute:
            set_attr(edit.node, edit.name, edit.value)
        elif kind is RemoveAttribute:
            for i, attr in enumerate(edit.node.attribute):
                if attr.name == edit.name:
                    del edit.node.attribute[i]
                    break
        elif kind is SetOpType:
            edit.node.op_type = edit.op_type
        elif kind is RenameInput:
            g.rename_input(edit.node, edit.old, edit.new)
        elif kind is TurnIntoAdd:
            g.turn_into_add(edit.node, edit.x, edit.bias)
        else:
            raise TypeError(f"unknown edit {edit!r}")
    for node in plan.remove:
        if not g.is_removed(node):
            g.remove_node(node)
    return record
