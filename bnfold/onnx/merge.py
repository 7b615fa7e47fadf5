"""The ONNX branch-merge pass (structural reparameterization), run after BN folding and to a fixpoint with it.

Two rules, each a name ``--skip`` takes:

* ``merge-branches``: an Add/Sum/Sub tree whose terms are linear chains (Conv, BatchNormalization, AveragePool,
  Identity) all reading the same tensor, at least one of them a Conv, becomes one Conv (RepVGG, MobileOne, ACNet,
  DBB blocks after their BNs are folded);
* ``merge-sequential``: a Conv reading a linear chain (Conv, BN, AveragePool, Identity) with nothing non-linear
  between them becomes one Conv, where that is exact and costs no more multiply-adds than the chain did.

The math is :mod:`bnfold.reparam` (float64, exact or refused with the reason); this module finds the patterns and
reads the constants. Like the fold rules (:mod:`bnfold.onnx.rules`), a rule's ``match`` never edits: it answers a
:class:`~bnfold.onnx.plan.MergePlan` (data, applied by :func:`~bnfold.onnx.plan.apply_plan`), a
:class:`~bnfold.onnx.plan.Refusal` with a stable code, or None. The surviving node is one of the merged ops, so every
value is still defined before its readers without reordering nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from ..affine import FoldRefused, cast_checked_in_errstate  # (rules run inside the fold pass's errstate)
from ..reparam import (ConvBranch, MergeRefused, affine_branch, avgpool_branch, conv_branch, dense_branch,
                       dense_identity, identity_branch, merge_parallel, merge_parallel_dense, merge_sequential,
                       negated)
from .constants import is_pure_constant_producer
from .graph import GraphIndex
from .nodes import get_attrs, node_label
from .plan import MergePlan, MoveOutput, Plan, Refusal, RemoveAttribute, RenameInput, SetAttribute, WriteTensor
from .rules import batchnorm_affine

MERGE_BRANCHES = "merge-branches"
MERGE_SEQUENTIAL = "merge-sequential"
#: Summaries by rule name, for the CLI and README; ``--skip NAME`` leaves one out.
MERGE_RULES: dict[str, str] = {
    MERGE_BRANCHES: "Add/Sum/Sub of Conv/BN/AveragePool/Identity (or Gemm/MatMul) branches reading one tensor -> "
                    "one op",
    MERGE_SEQUENTIAL: "Conv after a Conv/BN/AveragePool chain, nothing non-linear between -> one Conv",
}
MERGE_RULE_NAMES: tuple[str, ...] = tuple(MERGE_RULES)


_CHAIN_OPS = frozenset({"Conv", "BatchNormalization", "AveragePool", "Identity"})
_DENSE_OPS = frozenset({"Gemm", "MatMul"})
_SUM_OPS = frozenset({"Add", "Sum", "Sub"})  # Sub: a + (-1)·b (FastViT's RepMixer subtracts a branch)
_DEFAULT_DOMAINS = ("", "ai.onnx")
_TERM_OPS = _CHAIN_OPS | _DENSE_OPS | _SUM_OPS  # what produces a term that is (or holds) a branch
_READERS_OF_BRANCHES = _CHAIN_OPS | {"Add", "Sum"}
# A chain op, or a per-channel Mul/Add/Sub/Div that a fold into the linear op before it replaces by that op.
_MAY_PRODUCE_A_CHAIN = _CHAIN_OPS | {"Mul", "Add", "Sub", "Div"}


class MergeRule:
    """A merge rule: listed beside the fold rules (``--skip`` takes its name), run by the pass after folding."""

    name: str
    summary: str
    sources: frozenset[str]  # the node types a match starts from

    def match(self, g: GraphIndex, node: onnx.NodeProto) -> "MergePlan | Refusal | None":
        raise NotImplementedError


class MergeBranches(MergeRule):
    name, summary, sources = MERGE_BRANCHES, MERGE_RULES[MERGE_BRANCHES], _SUM_OPS

    def match(self, g: GraphIndex, node: onnx.NodeProto) -> "MergePlan | Refusal | None":
        # Most sums are residual (x + f(x), f ending in an activation): no term is an op a merge reads with this
        # sum its one reader, so no term is a branch. Said without walking the tree (the walk would find the same).
        producer = g.producer
        for name in g.inputs_of(node):
            term = producer.get(name)
            if term is not None and term.op_type in _TERM_OPS and _sole_value_reader(g, name, node):
                return _merge_branches(g, node)
        return None


class MergeSequential(MergeRule):
    name, summary, sources = MERGE_SEQUENTIAL, MERGE_RULES[MERGE_SEQUENTIAL], frozenset({"Conv"})

    def match(self, g: GraphIndex, node: onnx.NodeProto) -> "MergePlan | Refusal | None":
        inputs = g.inputs_of(node)
        before = g.producer.get(inputs[0]) if inputs else None
        # Most Convs read an activation, or a value that others read too (a residual stream): no call deeper.
        if before is None or before.op_type not in _CHAIN_OPS or not _sole_value_reader(g, inputs[0], node):
            return None
        return _merge_sequence(g, node)


MERGES: tuple[MergeRule, ...] = (MergeBranches(), MergeSequential())


def may_be_merged(g: GraphIndex, node: onnx.NodeProto, output: str | None = None) -> bool:
    """Whether a merge rule may read ``node``'s weights: a Conv, Gemm or MatMul whose output (``output``: the value
    it will produce once the fold being planned is made) is summed or read by an op of a linear chain, or a Conv
    reading the output of such an op or of a normalization that a fold may yet turn into one. (A Conv between two
    Relus never is.) The fold pass keeps the float64 values of written weights only for such ops."""
    if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in _DEFAULT_DOMAINS:
        return False
    output = g.outputs_of(node)[0] if output is None else output
    if any(u.op_type in _READERS_OF_BRANCHES for u in g.consumers.get(output, ())):
        return True
    producer = g.producer.get(g.inputs_of(node)[0]) if node.op_type == "Conv" else None
    return producer is not None and producer.op_type in _MAY_PRODUCE_A_CHAIN


def forget_unmergeable_exact(g: GraphIndex, plan: Plan) -> None:
    """After ``plan`` is applied: drop the float64 values it kept (:attr:`WriteTensor.exact`) for ops no merge
    can read, so that a 16-bit model keeps float64 copies only of the weights a merge may compose (a plain
    Conv -> BN -> Relu network keeps none)."""
    for edit in plan.edits:
        if type(edit) is WriteTensor and edit.exact is not None and not may_be_merged(g, edit.node):
            g.set_exact(g.inputs_of(edit.node)[edit.slot], None)


def _inexact(exc: FoldRefused, context: str = "") -> Refusal:
    """A refusal of the merge math: would-overflow keeps its code; anything else is not exact to merge."""
    if exc.code == "would-overflow":
        return Refusal(exc.code, f"{context}{exc}")
    return Refusal("merge-inexact", f"{context}{exc}")


@dataclass
class _Link:
    """One op of a linear chain: its node, its map as a ConvBranch, the tensor it reads."""

    node: onnx.NodeProto
    branch: ConvBranch
    x: str


# ---- reading ops as linear maps ---------------------------------------------------------------------------

def _ints(value, n: int, default: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if value else (default,) * n


def _explicit_pads(auto_pad, kernel, strides, dilations, pads) -> tuple[int, ...]:
    """Pads as numbers; SAME_* is fixed only at stride 1 (elsewhere it depends on the input size)."""
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
    rank = len(kernel)
    if auto_pad in ("NOTSET", ""):
        return _ints(pads, 2 * rank, 0)
    if auto_pad == "VALID":
        return (0,) * (2 * rank)
    if any(s != 1 for s in strides):
        raise MergeRefused(f"auto_pad={auto_pad} with strides: its pads depend on the input size")
    total = [d * (k - 1) for d, k in zip(dilations, kernel)]
    small = [t // 2 for t in total]
    large = [t - s for t, s in zip(total, small)]
    return tuple(small + large) if auto_pad == "SAME_UPPER" else tuple(large + small)


def _as_branch(g: GraphIndex, node: onnx.NodeProto, channels: int | None, rank: int | None
               ) -> ConvBranch | Refusal:
    """The op as a linear map of its first input, else why not. ``channels``/``rank``: of its input, if known."""
    try:
        return _read_branch(g, node, channels, rank)
    except MergeRefused as exc:
        return _inexact(exc, f"{node.op_type} {node_label(node)}: ")


def _read_branch(g: GraphIndex, node: onnx.NodeProto, channels: int | None, rank: int | None
                 ) -> ConvBranch | Refusal:
    op, label = node.op_type, f"{node.op_type} {node_label(node)}"
    if op == "Conv":
        weight, reason = g.constant(node.input[1]) if len(node.input) > 1 else (None, "no weight")
        if weight is None:
            return Refusal("weight-not-constant", f"weight of {label} is not constant: {reason}")
        if weight.dtype.kind != "f":
            return Refusal("not-float", f"weight of {label} is not floating point")
        if weight.ndim < 3:
            return Refusal("weight-rank", f"weight of {label} is not a convolution kernel")
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias, reason = g.constant(node.input[2])
            if bias is None:
                return Refusal("bias-not-constant", f"bias of {label} is not constant: {reason}")
        n = weight.ndim - 2
        a = get_attrs(node, group=1, strides=None, dilations=None, pads=None, auto_pad="NOTSET")
        strides, dilations = _ints(a["strides"], n, 1), _ints(a["dilations"], n, 1)
        pads = _explicit_pads(a["auto_pad"], weight.shape[2:], strides, dilations, a["pads"])
        weight, bias = _exact_or(g, node, 1, weight), _exact_or(g, node, 2, bias)
        return conv_branch(weight, bias, groups=int(a["group"]), strides=strides, dilations=dilations, pads=pads)
    if op == "BatchNormalization":
        if rank is None:
            return Refusal("merge-shape-unknown", f"the rank of the input of {label} is unknown")
        norm = batchnorm_affine(g, node)
        if isinstance(norm, Refusal):
            return norm
        return affine_branch(norm.s, norm.t, rank)
    if channels is None:
        return Refusal("merge-shape-unknown", f"the channel count of the input of {label} is unknown")
    if op == "Identity":
        if rank is None:
            return Refusal("merge-shape-unknown", f"the rank of the input of {label} is unknown")
        return identity_branch(channels, rank)
    if op == "AveragePool":
        a = get_attrs(node, kernel_shape=None, strides=None, pads=None, auto_pad="NOTSET", count_include_pad=0,
                      ceil_mode=0, dilations=None)
        kernel = _ints(a["kernel_shape"], 0, 1)
        n = len(kernel)
        strides, dilations = _ints(a["strides"], n, 1), _ints(a["dilations"], n, 1)
        pads = _explicit_pads(a["auto_pad"], kernel, strides, dilations, a["pads"])
        return avgpool_branch(channels, kernel, strides=strides, pads=pads, dilations=dilations,
                              count_include_pad=bool(a["count_include_pad"]), ceil_mode=bool(a["ceil_mode"]))
    raise AssertionError(f"{label} is not an op of a linear chain")  # _chain walks _CHAIN_OPS only


def _exact_or(g: GraphIndex, node: onnx.NodeProto, slot: int, value: np.ndarray | None) -> np.ndarray | None:
    """Input ``slot`` of ``node`` as the float64 value a fold or merge rounded to it, if one was kept, else
    ``value``: a merge of folded weights then rounds once."""
    if value is None:
        return None
    exact = g.exact_value(node.input[slot])
    return value if exact is None else exact


def _chain(g: GraphIndex, name: str, reader: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str]:
    """The linear ops that compute ``name`` for ``reader`` alone, first op first, and the tensor they start from.

    The walk stops at a value someone else also reads (the shared input of the branches), a graph output, or an
    op that is not linear. Readers of only a value's dtype or shape (an exporter's zero-bias chain) do not stop it:
    :func:`_type_readers_go` checks that they go with the merge."""
    nodes = []
    producer = g.producer
    while True:
        node = producer.get(name)
        if node is None or node.op_type not in _CHAIN_OPS or node.domain not in _DEFAULT_DOMAINS or \
                not _sole_value_reader(g, name, reader):
            break
        inputs = g.inputs_of(node)
        if not inputs:
            break
        nodes.append(node)
        reader, name = node, inputs[0]
    nodes.reverse()
    return nodes, name


def _reads_type_only(g: GraphIndex, name: str, node: onnx.NodeProto) -> bool:
    """``node`` takes only the dtype (CastLike's second input) or the shape (Shape) of ``name``."""
    op = node.op_type
    if op not in ("Shape", "CastLike") or node.domain not in _DEFAULT_DOMAINS:
        return False
    return op == "Shape" or g.inputs_of(node)[0] != name


def _sole_value_reader(g: GraphIndex, name: str, reader: onnx.NodeProto) -> bool:
    """``reader`` is the one node that reads the values of ``name`` (not a graph output); others read its type."""
    users = g.consumers.get(name, ())
    if name in g.outputs:
        return False
    if len(users) == 1:  # the common case (this runs for every Add and Conv)
        return users[0] is reader
    found = False
    for user in users:  # a loop that ends at the first other reader of the values: most values have one
        if user is reader:
            if found:
                return False  # read twice by ``reader`` (x + x)
            found = True
        elif not _reads_type_only(g, name, user):
            return False
    return found


def _type_readers_go(g: GraphIndex, vanishing: list[onnx.NodeProto], merged: list[onnx.NodeProto]
                     ) -> Refusal | None:
    """None when every other reader of a value that vanishes in the merge (the outputs of ``vanishing``) is a
    type-only reader that feeds nothing but constant inputs (weight,
    bias) of the merged nodes, which the merge rewrites or removes, so that the reader goes with them; else why not.
    (Removing a node drops the constants only it read; rewriting the survivor's weight and bias drops theirs.)"""
    ids = {id(n) for n in merged}

    def goes(node: onnx.NodeProto, seen: set[int]) -> bool:
        if id(node) in seen:
            return True
        seen.add(id(node))
        if not is_pure_constant_producer(node):
            return False
        for out in g.outputs_of(node):
            if not out:
                continue
            if out in g.outputs or g.constant(out)[0] is None:
                return False
            for user in g.consumers.get(out, []):
                if id(user) in ids:
                    if g.inputs_of(user)[0] == out:  # the merged op reads it as its activation
                        return False
                elif not goes(user, seen):
                    return False
        return True

    for node in vanishing:
        for out in g.outputs_of(node):
            for user in g.consumers.get(out, []):
                if id(user) not in ids and not goes(user, set()):
                    return Refusal("output-shared", f"the output of {node.op_type} {node_label(node)} is also used "
                                   f"elsewhere: {g.usage(out)}")
    return None


def _chain_branch(g: GraphIndex, nodes: list[onnx.NodeProto], channels: int | None, rank: int | None
                  ) -> ConvBranch | Refusal:
    """A chain composed into one ConvBranch (exact, or the reason it is not)."""
    composed = None
    for node in nodes:
        link = _as_branch(g, node, channels, rank)
        if isinstance(link, Refusal):
            return link
        channels, rank = link.out_channels, link.spatial_rank
        try:
            composed = link if composed is None else merge_sequential(composed, link)
        except MergeRefused as exc:
            return _inexact(exc, f"{node.op_type} {node_label(node)} after the ops before it: ")
    return composed


def _input_channels_and_rank(g: GraphIndex, x: str, chains: list[list[onnx.NodeProto]]
                             ) -> tuple[int | None, int | None]:
    """What the chains read: channels and spatial rank of ``x``, from its shape or a Conv/BN reading it."""
    shape = g.static_shape(x, allow_symbolic=True)
    channels = shape[1] if shape is not None and len(shape) > 1 and isinstance(shape[1], int) else None
    rank = len(shape) - 2 if shape is not None else None
    for nodes in chains:
        if not nodes:
            continue
        first = nodes[0]
        if first.op_type == "Conv" and len(first.input) > 1:
            meta = g.constant_meta(first.input[1])
            w_shape = meta[0] if meta is not None else getattr(g.constant(first.input[1])[0], "shape", None)
            if w_shape is not None and len(w_shape) >= 3:
                groups = get_attrs(first, group=1)["group"]
                channels = channels or int(w_shape[1]) * int(groups)
                rank = rank if rank is not None else len(w_shape) - 2
        elif first.op_type == "AveragePool" and rank is None:
            kernel = get_attrs(first, kernel_shape=None)["kernel_shape"]
            rank = len(kernel) if kernel else None
    return channels, rank


def _macs(branch: ConvBranch) -> int:
    """Multiply-adds per output position."""
    return branch.out_channels * (branch.in_channels // branch.groups) * math.prod(branch.kernel_shape)


def _chain_macs(g: GraphIndex, nodes, channels, rank) -> int:
    """Multiply-adds of a chain run op by op, per output position of its last op (earlier ops run at every
    position the later ones' strides skip)."""
    total, per_position = 0, []
    for node in nodes:
        link = _as_branch(g, node, channels, rank)
        if isinstance(link, Refusal):
            return 0
        channels, rank = link.out_channels, link.spatial_rank
        per_position.append((_macs(link) if node.op_type == "Conv" else link.out_channels, link.strides))
    factor = 1
    for macs, strides in reversed(per_position):
        total += macs * factor
        factor *= math.prod(strides)
    return total


# ---- the two rules ----------------------------------------------------------------------------------------

def _add_tree(g: GraphIndex, root: onnx.NodeProto) -> tuple[list[tuple[str, onnx.NodeProto, int]],
                                                           list[onnx.NodeProto]]:
    """The terms summed by ``root``, each as (name, the node that reads it, sign: -1 where a Sub subtracts it),
    and the Add/Sum/Sub nodes below it that only feed this sum."""
    terms, inner, stack = [], [], [(root, 1)]
    producers = g.producer
    while stack:
        node, sign = stack.pop()
        inputs = g.inputs_of(node)
        subtracts = node.op_type == "Sub"
        for slot in range(len(inputs) - 1, -1, -1):
            name = inputs[slot]
            term_sign = -sign if subtracts and slot == 1 else sign
            producer = producers.get(name)
            if producer is not None and producer.op_type in _SUM_OPS and \
                    producer.domain in _DEFAULT_DOMAINS and g.only_consumer(name, node):
                inner.append(producer)
                stack.append((producer, term_sign))
            else:
                terms.append((name, node, term_sign))
    return terms, inner


def _merge_branches(g: GraphIndex, root: onnx.NodeProto) -> MergePlan | Refusal | None:
    outputs, inputs = g.outputs_of(root), g.inputs_of(root)
    if not outputs or not outputs[0] or len(inputs) < 2 or "" in inputs:
        return None
    terms, inner = _add_tree(g, root)
    producer = g.producer
    for name, _, _ in terms:
        if name in producer and producer[name].op_type in _DENSE_OPS:
            dense = _merge_dense_branches(g, root, terms, inner)
            if dense is not None:
                return dense
            break
    # (loops, not generators: this runs for every residual Add of a network, and almost always ends here)
    chains, x = [], None
    for name, reader, _ in terms:
        nodes, start = _chain(g, name, reader)
        if x is None:
            x = start
        elif start != x:
            return None  # the terms read different tensors: a residual sum, not branches of one op
        chains.append((nodes, start))
    has_conv = any(n.op_type == "Conv" for nodes, _ in chains for n in nodes)
    if not has_conv or x in g.initializers or \
            (x not in g.producer and x not in g.inputs and g.constant(x)[0] is not None):
        return None  # no Conv to hold the merged kernel, or a constant summand (an enclosing graph's, in a body)
    channels, rank = _input_channels_and_rank(g, x, [nodes for nodes, _ in chains])
    branches, separate = [], 0
    for (nodes, _), (_, _, sign) in zip(chains, terms):
        if nodes:
            branch = _chain_branch(g, nodes, channels, rank)
            if isinstance(branch, Refusal):
                return branch
            separate += _chain_macs(g, nodes, channels, rank)
        else:
            if channels is None or rank is None:
                return Refusal("merge-shape-unknown", f"the shape of '{x}', summed as it is, is unknown")
            branch = identity_branch(channels, rank)
            separate += channels
        branches.append(branch if sign > 0 else negated(branch))
    try:
        merged = merge_parallel(branches)
    except MergeRefused as exc:
        return _inexact(exc)
    if _macs(merged) > separate:
        return Refusal("merge-costlier",
                       f"the merged Conv would cost {_macs(merged)} multiply-adds per output, the branches {separate}")
    all_nodes = [n for nodes, _ in chains for n in nodes]
    refused = _type_readers_go(g, all_nodes + inner, all_nodes + inner + [root])
    if refused is not None:
        return refused
    survivor = next(n for n in all_nodes if n.op_type == "Conv")
    return _conv_plan(g, MERGE_BRANCHES, root, survivor, merged, x,
                      [n for n in all_nodes if n is not survivor] + inner + [root], root.output[0])


def _merge_dense_branches(g: GraphIndex, root: onnx.NodeProto, terms, inner) -> MergePlan | Refusal | None:
    """Gemm/MatMul terms (and the input itself) summed, all reading one tensor: one Gemm, or one MatMul when no
    term has a bias. None when the terms are not that."""
    nodes, signs, x = [], [], None
    for name, reader, sign in terms:
        node = g.producer.get(name)
        if node is not None and node.op_type in _DENSE_OPS and node.domain in _DEFAULT_DOMAINS and \
                g.only_consumer(name, reader) and len(node.input) >= 2:
            if x is not None and node.input[0] != x:
                return None
            x = node.input[0]
            nodes.append(node)
            signs.append(sign)
    if not nodes or any(g.producer.get(name) not in nodes and name != x for name, _, _ in terms):
        return None  # terms that are neither a fully connected op on the shared input nor that input
    branches = []
    for node, sign in zip(nodes, signs):
        label = f"{node.op_type} {node_label(node)}"
        weight, _ = g.constant(node.input[1])
        if weight is None or weight.dtype.kind != "f" or weight.ndim != 2:
            return None  # a product of two run-time tensors (attention), not a weighted branch
        bias = None
        a = get_attrs(node, transA=0, transB=0, alpha=1.0, beta=1.0)
        if node.op_type == "Gemm":
            if a["transA"]:
                return Refusal("batch-axis-contracted", f"{label} has transA=1: it contracts over the batch axis")
            if len(node.input) > 2 and node.input[2]:
                bias, reason = g.constant(node.input[2])
                if bias is None:
                    return Refusal("bias-not-constant", f"bias of {label} is not constant: {reason}")
        weight, bias = _exact_or(g, node, 1, weight), _exact_or(g, node, 2, bias)
        try:
            branch = dense_branch(weight, bias, trans_b=bool(a["transB"]) and node.op_type == "Gemm",
                                  alpha=a["alpha"] if node.op_type == "Gemm" else 1.0, beta=a["beta"])
        except MergeRefused as exc:
            return _inexact(exc, f"{label}: ")
        branches.append(branch if sign > 0 else negated(branch))
    identity = dense_identity(branches[0].in_features)
    branches += [identity if sign > 0 else negated(identity) for name, _, sign in terms if name == x]
    try:
        merged = merge_parallel_dense(branches)
    except MergeRefused as exc:
        return _inexact(exc)
    gemms = [n for n in nodes if n.op_type == "Gemm"]
    survivor = gemms[0] if gemms else nodes[0]
    if survivor.op_type == "MatMul" and np.any(merged.bias != 0):
        return Refusal("no-bias-carrier", "the merged bias needs a Gemm, and no branch is one")
    cast = _cast_to_weight_dtype(g, survivor, merged)
    if isinstance(cast, Refusal):
        return cast
    weight, bias, exact_w, exact_b = cast
    edits = [WriteTensor(survivor, 1, weight, exact_w)]
    if survivor.op_type == "Gemm":
        edits.append(WriteTensor(survivor, 2, bias, exact_b))
        edits += [SetAttribute(survivor, name, value) for name, value in (("transB", 0), ("alpha", 1.0), ("beta", 1.0))]
    edits.append(MoveOutput(survivor, root.output[0]))
    return MergePlan(MERGE_BRANCHES, root, node_label(survivor), edits,
                     remove=[n for n in nodes if n is not survivor] + inner + [root])


def _merge_sequence(g: GraphIndex, conv: onnx.NodeProto) -> MergePlan | Refusal | None:
    inputs, outputs = g.inputs_of(conv), g.outputs_of(conv)
    if not inputs or not outputs or not outputs[0]:
        return None
    nodes, x = _chain(g, inputs[0], conv)
    if not nodes:
        return None
    nodes = nodes + [conv]
    channels, rank = _input_channels_and_rank(g, x, [nodes])
    merged = _chain_branch(g, nodes, channels, rank)
    if isinstance(merged, Refusal):
        return merged
    separate = _chain_macs(g, nodes, channels, rank)
    if _macs(merged) > separate:
        return None  # exact but slower (e.g. a 1x1 bottleneck before a 3x3): not a merge worth making
    refused = _type_readers_go(g, nodes[:-1], nodes)
    if refused is not None:
        return refused
    return _conv_plan(g, MERGE_SEQUENTIAL, conv, conv, merged, x, nodes[:-1], None)


def _cast_to_weight_dtype(g: GraphIndex, survivor: onnx.NodeProto, merged) -> tuple | Refusal:
    """The merged weight and bias cast once (overflow checked) to the dtype of ``survivor``'s weight, and their
    float64 values where a later merge should compose from those (else None, None)."""
    dtype = g.constant(survivor.input[1])[0].dtype
    try:
        cast = (cast_checked_in_errstate(merged.weight, dtype),
                cast_checked_in_errstate(merged.bias, dtype, "merged bias"))
    except FoldRefused as exc:
        return _inexact(exc)
    return cast + ((merged.weight, merged.bias) if g.ctx.exact_wanted(dtype) else (None, None))


def _conv_plan(g: GraphIndex, rule: str, source: onnx.NodeProto, survivor: onnx.NodeProto, merged: ConvBranch,
               x: str, remove: list[onnx.NodeProto], output: str | None) -> MergePlan | Refusal:
    """The plan that makes ``survivor`` the merged Conv reading ``x`` (and producing ``output``); the values are
    cast (checked) to the survivor's weight dtype here, so a refusal edits nothing."""
    cast = _cast_to_weight_dtype(g, survivor, merged)
    if isinstance(cast, Refusal):
        return cast
    weight, bias, exact_w, exact_b = cast
    edits = [RenameInput(survivor, survivor.input[0], x)] if survivor.input[0] != x else []
    edits += [WriteTensor(survivor, 2, bias, exact_b), WriteTensor(survivor, 1, weight, exact_w),
              RemoveAttribute(survivor, "auto_pad"),
              SetAttribute(survivor, "group", merged.groups),
              SetAttribute(survivor, "kernel_shape", list(merged.kernel_shape)),
              SetAttribute(survivor, "pads", list(merged.pads)),
              SetAttribute(survivor, "strides", list(merged.strides)),
              SetAttribute(survivor, "dilations", list(merged.dilations))]
    if output is not None:
        edits.append(MoveOutput(survivor, output))
    return MergePlan(rule, source, node_label(survivor), edits, remove=remove)
