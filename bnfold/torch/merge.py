"""Structural reparameterization on a traced PyTorch module: linear branches merged into one convolution.

Runs on the torch.fx graph after the batch norms are folded (:func:`bnfold.torch.fold.fold_graph`), or on
torch.export's ATen graph for modules torch.fx can not trace (``aten.conv*``, ``aten.avg_pool*``,
``aten.batch_norm`` and ``aten.add`` nodes; the merged convolution is an ``nn.ConvNd`` call there too), to a fixpoint:

* ``merge-branches``: an addition (a tree of ``+``/``torch.add`` (also ``+=``), ``-``/``torch.sub`` and products by
  a constant that scales whole channels, as FastViT's ``x + layer_scale * (mixer(x) - norm(x))``) whose terms read
  the same tensor, each a convolution (``nn.ConvNd`` or ``F.convNd`` on constant weights), a batch norm left alone in
  its branch (a module, or ``F.batch_norm`` on constant statistics), an average pool that equals a convolution, or
  that tensor itself, becomes one convolution (RepVGG, MobileOne, ACNet, DBB, RepViT, RepGhost, FastViT); each
  term's sign and scales are applied to its branch in float64 first;
* ``merge-sequential``: two such ops in sequence, the first read by nothing else, become one where exact (DBB's
  1×1 then k×k, a pool then its batch norm).

The math is :mod:`bnfold.reparam`'s (float64, cast once to the layer's dtype); each merge is exact or refused with
its reason. A merge is made only when the merged convolution costs no more multiply-adds per output than the ops
it replaces, or when a sequential merge's result is then merged into a sibling branch that pays for it (DBB's
1×1 then average pool, summed with a k×k). Each merge is a :class:`~bnfold.report.Merge` in ``report.merged`` (rule
``merge-branches`` or ``merge-sequential``; ``into``: the new convolution; ``removed``: the ops it replaced), as on the
ONNX side, and each batch norm it absorbed is also a ``Fold`` by the merge's rule; a block that looks mergeable but
is not merged is a ``Skip`` in ``report.not_merged`` with a ``merge-*`` code and ``op_type`` ``"merge"``.
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..affine import FoldRefused
from ..reparam import ConvBranch, MergeRefused, affine_branch, avgpool_branch, conv_branch, identity_branch
from ..reparam import merge_parallel, merge_sequential, negated
from ..report import FoldReport, Merge, Skip
from .fold import ModuleIndex, attribute_tensor, functional_norm, hook_reason, module_affine, passes_input_on
from .fold import runs_torch_forward, single_tensor_arg, value_users
from .ops import Affine, ExactWeights, constant_value, numpy64, to_torch

_aten = torch.ops.aten
_ADD = {operator.add, torch.add, _aten.add.Tensor}
_SUB = {operator.sub, torch.sub, _aten.sub.Tensor}
# ``out += y`` on torch.export's graph; an add, where nothing else reads the tensor it overwrites
_INPLACE = {_aten.add_.Tensor: _aten.add.Tensor, _aten.sub_.Tensor: _aten.sub.Tensor}
_MUL = {operator.mul, torch.mul, _aten.mul.Tensor}
# Convolutions called as functions (torch.fx) or ATen ops (torch.export), all (input, weight, bias, stride, padding,
# dilation, groups), by spatial rank.
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
                   _aten.conv1d.default: 1, _aten.conv2d.default: 2, _aten.conv3d.default: 3,
                   _aten.conv1d.padding: 1, _aten.conv2d.padding: 2, _aten.conv3d.padding: 3}
# ATen average pools: (input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override).
_ATEN_POOLS = {_aten.avg_pool1d.default: 1, _aten.avg_pool2d.default: 2, _aten.avg_pool3d.default: 3}
_ATEN_POOL_SIGNATURE = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
                                          for n, d in (("input", inspect.Parameter.empty),
                                                       ("kernel_size", inspect.Parameter.empty), ("stride", ()),
                                                       ("padding", 0), ("ceil_mode", False),
                                                       ("count_include_pad", True), ("divisor_override", None))])
_CONV_SIGNATURE = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
                                     for n, d in (("input", inspect.Parameter.empty),
                                                  ("weight", inspect.Parameter.empty), ("bias", None), ("stride", 1),
                                                  ("padding", 0), ("dilation", 1), ("groups", 1))])
_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}


@dataclass
class LinearOp:
    """One op a merge can take: ``node`` computes it from ``x`` (``node`` None: the identity, ``x`` itself).
    ``kind``: "conv", "bn", "pool" or "identity"; ``build(channels, spatial_rank)`` gives its ConvBranch (or raises
    MergeRefused); ``like``: a tensor whose dtype and device the merged weights take."""

    node: fx.Node | None
    x: fx.Node
    name: str
    kind: str
    build: object
    like: torch.Tensor | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    spatial_rank: int | None = None


def _tuple(value, rank: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * rank


def _conv_pads(padding, kernel, dilation, rank: int) -> list[int]:
    """torch's ``padding`` (ints or "valid"/"same") as ONNX pads (begins, then ends)."""
    if padding == "valid":
        return [0] * 2 * rank
    if padding == "same":  # torch puts the odd one at the end
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    pads = _tuple(padding, rank)
    return list(pads) * 2


def _conv_op(node, x, name, weight, bias, stride, padding, dilation, groups, exact=None) -> LinearOp:
    rank = weight.dim() - 2
    stride, dilation = _tuple(stride, rank), _tuple(dilation, rank)
    pads = _conv_pads(padding, weight.shape[2:], dilation, rank)
    def build(channels, spatial_rank):
        w64, b64 = exact if exact is not None else (numpy64(weight), None if bias is None else numpy64(bias))
        return conv_branch(w64, b64, groups=int(groups), strides=stride, dilations=dilation, pads=pads)

    return LinearOp(node, x, name, "conv", build, weight, weight.shape[1] * int(groups), weight.shape[0], rank)


def linear_op(gm: fx.GraphModule, modules: ModuleIndex, node) -> LinearOp | None:
    """The op ``node`` computes, if a merge can take it, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module" and node.target in modules:
        module, x = modules[node.target], single_tensor_arg(node)
        if x is None or hook_reason(module) or module.training:
            return None
        if isinstance(module, nn.modules.conv._ConvNd):
            if module.transposed or module.padding_mode != "zeros" or not runs_torch_forward(module):
                return None
            return _conv_op(node, x, node.target, module.weight, module.bias, module.stride, module.padding,
                            module.dilation, module.groups, modules.exact_of(module))
        pool_rank = next((r for cls, r in _POOLS.items() if type(module) is cls), None)
        if pool_rank is not None and getattr(module, "divisor_override", None) is None:
            return _pool_op(node, x, node.target, pool_rank, module.kernel_size, module.stride, module.padding,
                            module.ceil_mode, module.count_include_pad)
        affine = module_affine(module)
        if isinstance(affine, Affine) and runs_torch_forward(module):
            return _bn_op(node, x, node.target, affine)
        return None
    if node.op == "call_function" and node.target in _ATEN_POOLS:
        return _aten_pool_op(node)
    if node.op == "call_function" and node.target is _aten.batch_norm.default:
        return _aten_bn_op(gm, node)
    functional = functional_norm(gm, node)  # F.batch_norm on constant statistics (timm's BatchNormAct2d)
    if functional is not None:
        x, affine, name = functional
        return _bn_op(node, x, name, affine) if isinstance(affine, Affine) and isinstance(x, fx.Node) else None
    if node.op == "call_function" and node.target in _CONV_FUNCTIONS:
        try:
            bound = _CONV_SIGNATURE.bind(*node.args, **node.kwargs)
        except TypeError:
            return None
        a = bound.arguments
        if not isinstance(a["input"], fx.Node):
            return None
        seen: dict = {}
        tensor_of = lambda n: attribute_tensor(gm, n)  # noqa: E731
        weight = constant_value(a["weight"], tensor_of, seen)
        bias = constant_value(a.get("bias"), tensor_of, seen) if a.get("bias") is not None else None
        if not isinstance(weight, torch.Tensor) or (a.get("bias") is not None and not isinstance(bias, torch.Tensor)):
            return None
        if weight.dim() != _CONV_FUNCTIONS[node.target] + 2:
            return None
        return _conv_op(node, a["input"], node.name, weight, bias, a.get("stride", 1), a.get("padding", 0),
                        a.get("dilation", 1), a.get("groups", 1), modules.exact.of(weight, bias))
    return None


def _pool_op(node, x, name, rank, kernel, stride, padding, ceil_mode, count_include_pad) -> LinearOp:
    kernel = _tuple(kernel, rank)
    stride = _tuple(stride if stride else kernel, rank)  # ATen writes "as the kernel" as []
    pads = list(_tuple(padding, rank)) * 2

    def build(channels, spatial_rank):
        if channels is None:
            raise MergeRefused("the average pool's channel count is not known from a neighbouring op")
        return avgpool_branch(channels, kernel, strides=stride, pads=pads, count_include_pad=bool(count_include_pad),
                              ceil_mode=bool(ceil_mode))

    return LinearOp(node, x, name, "pool", build, spatial_rank=rank)


def _aten_pool_op(node) -> LinearOp | None:
    try:
        bound = _ATEN_POOL_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    a = bound.arguments
    if not isinstance(a["input"], fx.Node) or a.get("divisor_override") is not None:
        return None
    return _pool_op(node, a["input"], node.name, _ATEN_POOLS[node.target], a["kernel_size"], a.get("stride"),
                    a.get("padding", 0), a.get("ceil_mode", False), a.get("count_include_pad", True))


def _aten_bn_op(gm, node) -> LinearOp | None:
    """``aten.batch_norm`` in inference mode on constant tensors (x, weight, bias, mean, var, training, momentum,
    eps, cudnn_enabled)."""
    from .export import module_path
    from .ops import affine_from_stats

    args = list(node.args)
    if len(args) < 8 or node.kwargs or args[5] is not False or not isinstance(args[0], fx.Node):
        return None
    tensors = [attribute_tensor(gm, a) if a is not None else None for a in args[1:5]]
    if any(t is None for t in tensors[2:]) or any(a is not None and t is None for a, t in zip(args[1:3], tensors)):
        return None
    affine = affine_from_stats(*tensors, float(args[7]))
    return _bn_op(node, args[0], module_path(node), affine) if isinstance(affine, Affine) else None


def _bn_op(node, x, name, affine: Affine) -> LinearOp:
    channels = affine.s.shape[0]
    meta = node.meta.get("tensor_meta")
    value = node.meta.get("val")  # torch.export's
    shape = getattr(meta, "shape", None) if meta is not None else getattr(value, "shape", None)
    ranks = (len(shape),) if shape is not None else affine.ranks
    spatial = ranks[0] - 2 if ranks is not None and len(ranks) == 1 and ranks[0] >= 3 else None

    def build(c, spatial_rank):
        if spatial is None or spatial != spatial_rank:
            raise MergeRefused(f"can not prove the batch norm '{name}' normalizes a rank-{spatial_rank + 2} tensor")
        return affine_branch(affine.s, affine.t, spatial_rank)

    return LinearOp(node, x, name, "bn", build, None, channels, channels, spatial)


def _identity(x: fx.Node) -> LinearOp:
    return LinearOp(None, x, x.name, "identity", lambda c, r: identity_branch(c, r))


def may_be_merged(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a merge may read the layer ``node`` calls, once the batch norm next to it is folded (so that its
    float64 weights are worth keeping): it is in sequence with another op a merge takes, or a term of a sum whose
    other terms read its input (or are that input). An over-estimate costs memory, an under-estimate one more
    rounding; never a wrong merge."""
    x = single_tensor_arg(node) if node.op == "call_module" else (node.args[0] if node.args else None)
    if not isinstance(x, fx.Node):
        return False
    if _maybe_linear(gm, x):
        return True
    readers, seen = list(node.users), set()
    while readers:
        reader = readers.pop()
        if reader in seen:
            continue
        seen.add(reader)
        if reader.op == "call_module" and passes_input_on(dict(gm.named_modules()), reader):
            readers.extend(reader.users)  # an eval-mode Identity/Dropout (timm's drop_path) between
        elif _maybe_linear(gm, reader):
            return True
        elif _is_sum_node(reader):
            root = reader
            while _inner_add(root):
                root = next(iter(root.users))
            others = [t for t in _tree(root)[1] if t is not node and t not in seen]
            if any(_branch_reads(gm, t, x) for t in others):
                return True
    return False


def _branch_reads(gm: fx.GraphModule, term, x: fx.Node, depth: int = 6) -> bool:
    """Whether the branch ending in ``term`` is ``x`` or reads it through ops a merge may take (its batch norms may
    not be folded yet)."""
    for _ in range(depth):
        if not isinstance(term, fx.Node):
            return False
        if term is x or x in term.all_input_nodes:
            return True
        if not _maybe_linear(gm, term) or not term.args:
            return False
        term = term.args[0]
    return False


def _maybe_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` may be an op a merge takes (a convolution, batch norm or average pool), by its kind."""
    if node.op == "call_module":
        try:
            module = gm.get_submodule(node.target)
        except AttributeError:
            return False
        return isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, *_POOLS))
    return node.op == "call_function" and (node.target in _CONV_FUNCTIONS or node.target in _ATEN_POOLS or
                                           node.target is _aten.batch_norm.default or
                                           functional_norm(gm, node) is not None)


# ---- costs ----------------------------------------------------------------------------------------------------

def _cost(branch: ConvBranch) -> int:
    """Multiply-adds per output position (an identity or batch norm still reads each value once)."""
    return int(branch.weight.size)


# ---- the pass -------------------------------------------------------------------------------------------------

def merge_graph(gm: fx.GraphModule, report: FoldReport, provenance: dict | None = None,
                exact: ExactWeights | None = None) -> None:
    """Merge linear branches of a traced (and batch-norm-folded) module in place, to a fixpoint. ``provenance``:
    filled with the ops of the traced module each new convolution absorbed (name -> [Source]); ``exact``: the
    float64 weights of the layers the folds wrote (``fold_graph``'s), merged from instead of their cast."""
    modules = ModuleIndex(gm)
    if exact is not None:
        modules.exact = exact
    modules.provenance = {} if provenance is None else provenance
    modules.tried = set()  # sequential pairs found not to merge: not computed again in later rounds
    modules.erased = set()  # nodes erased by merges of the current round
    refused: dict[str, Skip] = {}
    for node in list(gm.graph.nodes):  # eval-mode Identity/Dropout calls stand between branches and their sum
        if passes_input_on(modules, node):
            node.replace_all_uses_with(node.args[0])
            _erase(gm, modules, [node])
    while True:
        changed = False
        modules.erased.clear()
        for node in list(gm.graph.nodes):
            if node in modules.erased or not node.users:
                continue
            if _is_sum_node(node) and not _inner_add(node):
                changed |= _merge_parallel_at(gm, modules, node, report, refused)
            elif node.op in ("call_module", "call_function"):
                changed |= _merge_sequential_at(gm, modules, node, report)
        if not changed:
            break
    report.not_merged.extend(refused.values())
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _is_add(node) -> bool:
    if not isinstance(node, fx.Node) or node.kwargs or len(node.args) != 2:
        return False
    return (node.op == "call_function" and _out_of_place(node) in _ADD) or (node.op == "call_method" and
                                                                            node.target == "add")


def _is_sub(node) -> bool:
    if not isinstance(node, fx.Node) or node.kwargs or len(node.args) != 2:
        return False
    return (node.op == "call_function" and _out_of_place(node) in _SUB) or (node.op == "call_method" and
                                                                            node.target == "sub")


def _out_of_place(node: fx.Node):
    """The call's target, an in-place ATen add or subtraction as its out-of-place twin when the tensor it
    overwrites is a value computed here that nothing else reads (then writing a new tensor computes the same)."""
    if node.target not in _INPLACE:
        return node.target
    target = node.args[0]
    if isinstance(target, fx.Node) and target.op in ("call_function", "call_module") and list(target.users) == [node]:
        return _INPLACE[node.target]
    return None


@dataclass(frozen=True, eq=False)  # compared by identity: its value is a tensor
class Factor:
    """A constant a term of a sum is multiplied by (``c * (...)``): ``value`` (a tensor or a number), ``constant``
    (the graph's argument that holds it, reused when a term is written again) and ``mul`` (the product's node)."""

    value: object
    constant: object
    mul: fx.Node


def _scale_of(node) -> tuple[fx.Node, Factor] | None:
    """``(operand, factor)`` when ``node`` multiplies one tensor by a constant (a parameter or buffer, or a number)
    that may scale whole channels: it varies along one axis at most, not the last (a spatial one), and where the
    graph records the product's shape, along dimension 0 or 1 of it, in its dtype (the channel axis is proven where
    the convolutions' rank is known, :func:`_coefficient`). Anything else is a term of its own, so that a sum under
    it still merges. A constant computed in the forward is not taken: a frozen batch norm's arithmetic is the
    folds' to take whole."""
    if not isinstance(node, fx.Node) or node.kwargs or len(node.args) != 2 or not (
            (node.op == "call_function" and node.target in _MUL) or (node.op == "call_method" and
                                                                     node.target == "mul")):
        return None
    gm = node.graph.owning_module
    for i in (0, 1):
        constant, operand = node.args[i], node.args[1 - i]
        if not isinstance(operand, fx.Node) or _constant_node(operand):
            continue
        if isinstance(constant, (int, float)) and not isinstance(constant, bool):
            return operand, Factor(float(constant), constant, node)
        value = attribute_tensor(gm, constant) if gm is not None else None
        if isinstance(value, torch.Tensor) and _may_scale_channels(value, operand, node):
            return operand, Factor(value, constant, node)
    return None


def _may_scale_channels(value: torch.Tensor, operand: fx.Node, mul: fx.Node) -> bool:
    shape = tuple(value.shape)
    varying = [j for j, size in enumerate(shape) if size != 1]
    if not value.is_floating_point() or len(varying) > 1 or (shape and shape[-1] != 1):
        return False
    out, read = _recorded(mul), _recorded(operand)
    if read is not None and read.dtype != value.dtype:
        return False
    if out is None:
        return True
    rank = len(out.shape)
    return len(shape) <= rank and all(j + rank - len(shape) in (0, 1) for j in varying)


def _recorded(node: fx.Node):
    """The shape and dtype the graph records for ``node`` (shape propagation's, or torch.export's), or None."""
    meta = node.meta.get("tensor_meta")
    if meta is None:
        meta = node.meta.get("val")
    return meta if hasattr(meta, "shape") and hasattr(meta, "dtype") else None


def _is_sum_node(node) -> bool:
    """An add, a subtraction or a constant scaling: a node of an addition tree."""
    return _is_add(node) or _is_sub(node) or _scale_of(node) is not None


def _operands(node: fx.Node) -> list[tuple[object, tuple]]:
    """The operands of a sum node, each with the factors it gets there: ``-1`` for a subtracted one."""
    if _is_add(node):
        return [(node.args[0], ()), (node.args[1], ())]
    if _is_sub(node):
        return [(node.args[0], ()), (node.args[1], (-1,))]
    operand, factor = _scale_of(node)
    return [(operand, (factor,))]


def _inner_add(node: fx.Node) -> bool:
    """Whether ``node`` is read only by a sum node, as one of its (non-constant) operands."""
    users = list(node.users)
    return len(users) == 1 and _is_sum_node(users[0]) and any(o is node for o, _ in _operands(users[0]))


def _tree(root: fx.Node) -> tuple[list[fx.Node], list, list[tuple]]:
    """The sum nodes of the tree under ``root`` (adds, subtractions and constant scalings, each inner one read by
    its parent only), its terms, and each term's factors (outermost first; ``-1`` for a subtraction)."""
    adds, terms, factors, stack = [], [], [], [(root, ())]
    while stack:
        node, outer = stack.pop()
        if _is_sum_node(node) and (node is root or len(node.users) == 1):
            adds.append(node)
            stack.extend((operand, outer + inner) for operand, inner in reversed(_operands(node)))
        else:
            terms.append(node)
            factors.append(outer)
    return adds, terms, factors


def _coefficient(factors: tuple, channels: int, spatial_rank: int) -> np.ndarray | None:
    """The per-channel float64 multiplier of a term with these factors (None: one), or MergeRefused when a
    constant does not scale whole channels of a rank-``spatial_rank + 2`` (or unbatched) tensor."""
    total = np.ones(channels)
    for factor in factors:
        if factor == -1:
            total = -total
            continue
        value = factor.value
        if isinstance(value, float):
            total = total * value
            continue
        shape = tuple(value.shape)
        recorded = _recorded(factor.mul)
        out_rank = len(recorded.shape) if recorded is not None else spatial_rank + 1  # unproven: unbatched too
        at = len(shape) - spatial_rank - 1  # where the channel axis falls in the constant, batched or not
        if len(shape) > out_rank or any(size != 1 for j, size in enumerate(shape) if j != at) or \
                (0 <= at < len(shape) and shape[at] not in (1, channels)):
            raise MergeRefused(f"the constant of '{factor.mul.name}' (shape {list(shape)}) does not scale whole "
                               "channels")
        total = total * numpy64(value).reshape(-1)
    return None if np.all(total == 1) else total


def _scaled(branch: ConvBranch, coefficient: np.ndarray | None) -> ConvBranch:
    """``coefficient · branch(x)`` per output channel, in float64 (a sign flip is exact)."""
    if coefficient is None:
        return branch
    if np.all(coefficient == -1):
        return negated(branch)
    return merge_sequential(branch, affine_branch(coefficient, np.zeros_like(coefficient), branch.spatial_rank))


def _term_op(gm, modules, term, adds: list[fx.Node]) -> LinearOp:
    """A term as an op of what it reads (when nothing outside the tree reads the op's output), else the identity."""
    if len(term.users) == 1 and next(iter(term.users)) in adds and len(value_users(term)) == 1:
        op = linear_op(gm, modules, term)
        if op is not None and _owned(modules, op):
            return op
    return _identity(term)


def _owned(modules: ModuleIndex, op: LinearOp) -> bool:
    """The op's module runs only at this call (else it stays anyway and merging it saves nothing)."""
    if op.node is None or op.node.op != "call_module":
        return True
    return modules.calls[id(modules[op.node.target])] == 1


def _shape_of(ops: list[LinearOp]) -> tuple[int | None, int | None, int | None]:
    """(in channels, out channels, spatial rank) the ops agree on, from those that know them."""
    c_in = next((o.in_channels for o in ops if o.in_channels is not None), None)
    c_out = next((o.out_channels for o in ops if o.out_channels is not None), None)
    rank = next((o.spatial_rank for o in ops if o.kind == "conv"), None)
    if rank is None:
        rank = next((o.spatial_rank for o in ops if o.spatial_rank is not None), None)
    return c_in, c_out, rank


def _branches(ops: list[LinearOp], factors: list[tuple]) -> tuple[list[ConvBranch], list[np.ndarray | None]]:
    """The ops as ConvBranches, each multiplied by its factors in the sum, and those per-channel coefficients."""
    c_in, c_out, rank = _shape_of(ops)
    if rank is None:
        raise MergeRefused("the spatial rank is not known")
    like = next((op.like for op in ops if op.like is not None), None)
    for factor in {id(f): f for term in factors for f in term if f != -1}.values():
        if isinstance(factor.value, torch.Tensor) and like is not None and factor.value.dtype != like.dtype:
            raise MergeRefused(f"the constant of '{factor.mul.name}' is {factor.value.dtype}, the branches "
                               f"{like.dtype}: the product is computed in another dtype")
    branches = [op.build(c_in if op.kind != "conv" else None, rank) for op in ops]
    coefficients = [_coefficient(f, b.out_channels, rank) for b, f in zip(branches, factors)]
    return [_scaled(b, c) for b, c in zip(branches, coefficients)], coefficients


def _merge_parallel_at(gm, modules, root: fx.Node, report: FoldReport, refused: dict) -> bool:
    adds, terms, factors = _tree(root)
    if len(terms) < 2 or not all(isinstance(t, fx.Node) or _is_number(t) for t in terms):
        return False
    ops = [_term_op(gm, modules, t, adds) if isinstance(t, fx.Node) else None for t in terms]
    groups: dict[fx.Node, list[int]] = {}
    for i, op in enumerate(ops):
        if op is not None:
            groups.setdefault(op.x, []).append(i)
    for x, members in groups.items():
        group = [ops[i] for i in members]
        if len(group) < 2 or not any(op.kind == "conv" for op in group):
            continue
        label = " + ".join(op.name for op in group)
        if label in refused:
            continue  # the same ops refused in an earlier round
        try:
            branches, coefficients = _branches(group, [factors[i] for i in members])
            merged = merge_parallel(branches)
            if _cost(merged) > sum(_cost(b) for b in branches):
                refused[label] = Skip(label, f"the merged convolution ({list(merged.weight.shape)}) costs more "
                                             "than the branches", op_type="merge", code="merge-costlier")
                continue
            conv = _conv_module(merged, next(op.like for op in group if op.like is not None))
        except MergeRefused as exc:
            refused[label] = Skip(label, str(exc), op_type="merge", code="merge-refused")
            continue
        except FoldRefused as exc:  # the merged weights overflow the dtype
            refused[label] = Skip(label, str(exc), op_type="merge", code="overflow")
            continue
        refused.pop(label, None)
        name = _fresh_name(modules, _merged_name(group))
        gm.add_submodule(name, conv)
        modules[name] = conv
        modules.calls[id(conv)] = 1
        modules.set_exact(conv, merged.weight, merged.bias)
        rest = [i for i in range(len(terms)) if i not in members and not (_is_number(terms[i]) and terms[i] == 0)]
        with gm.graph.inserting_before(root):
            total = gm.graph.call_module(name, (x,))
            if not rest:
                total.meta = dict(root.meta)
            for i in rest:
                total = _add_term(gm, total, terms[i], factors[i])
        root.replace_all_uses_with(total)
        _erase(gm, modules, adds + [op.node for op in group if op.node is not None])
        _record(report, group, name, "merge-branches")
        modules.provenance[name] = [src for op, c in zip(group, coefficients)
                                    for src in _sources(op, modules.provenance, c)]
        return True
    return False


def _is_number(term) -> bool:
    """A number added in the sum (timm's MobileOneBlock starts it at ``0`` for a branch it does not have)."""
    return isinstance(term, (int, float)) and not isinstance(term, bool)


def _add_term(gm, total: fx.Node, term, factors: tuple) -> fx.Node:
    """``total`` plus a term the merge left (a tensor or a number), with its factors as the sum had them (its
    constants multiplied in from the innermost, a subtracted term subtracted). A zero the sum added is dropped by
    the caller: adding it changes nothing."""
    negative = False
    for factor in reversed(factors):
        if factor == -1:
            negative = not negative
        else:
            term = gm.graph.call_function(operator.mul, (factor.constant, term))
    return gm.graph.call_function(operator.sub if negative else operator.add, (total, term))


def _merge_sequential_at(gm, modules, node: fx.Node, report: FoldReport) -> bool:
    second = linear_op(gm, modules, node)
    if second is None or second.kind == "identity" or not _owned(modules, second):
        return False
    first = linear_op(gm, modules, second.x)
    if first is None or len(second.x.users) != 1 or len(value_users(second.x)) != 1 or not _owned(modules, first):
        return False
    if "conv" not in (first.kind, second.kind) and "pool" not in (first.kind, second.kind):
        return False  # two batch norms: merging them would make a convolution where there was none
    if any(op.kind == "bn" and functional_norm(gm, op.node) is not None for op in (first, second)):
        return False  # a functional batch norm next to a layer is the folds' (merges take it as a branch of a sum)
    # pairs that did not merge are not computed again while the addition they feed (if any) stays the same
    key = (first.node, node, tuple(_tree_of(node)[1]))
    if key in modules.tried:
        return False
    modules.tried.add(key)
    try:
        between = first.out_channels if first.out_channels is not None else second.in_channels
        rank = next((o.spatial_rank for o in (first, second) if o.spatial_rank is not None), None)
        if rank is None:
            return False
        a = first.build(first.in_channels if first.kind == "conv" else between, rank)
        b = second.build(between, rank)
        merged = merge_sequential(a, b)
    except MergeRefused:
        return False  # sequential pairs are everywhere in a network; only a made merge is news
    spent = _cost(a) * math.prod(b.strides) + _cost(b)
    if _cost(merged) > spent and not _pays_off(gm, modules, node, first.x, merged, spent):
        return False
    like = first.like if first.like is not None else second.like
    if like is None:
        like = next((p for p in gm.parameters()), torch.empty(0))
    try:
        conv = _conv_module(merged, like)
    except FoldRefused:  # asymmetric pads, or the merged weights overflow the dtype
        return False
    name = _fresh_name(modules, _merged_name([first, second]))
    gm.add_submodule(name, conv)
    modules[name] = conv
    modules.calls[id(conv)] = 1
    modules.set_exact(conv, merged.weight, merged.bias)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (first.x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    _erase(gm, modules, [node, first.node])
    _record(report, [first, second], name, "merge-sequential")
    modules.provenance[name] = [src for op in (first, second) for src in _sources(op, modules.provenance)]
    return True


def _tree_of(node: fx.Node) -> tuple[list[fx.Node], list, list]:
    """The addition tree ``node`` is a term of (its sum nodes, terms and factors), or three empty lists."""
    if not _inner_add(node):
        return [], [], []
    root = next(iter(node.users))
    while _inner_add(root):
        root = next(iter(root.users))
    return _tree(root)


def _pays_off(gm, modules, node: fx.Node, x: fx.Node, merged: ConvBranch, spent: int) -> bool:
    """Whether a costlier sequential merge is then merged into a sibling convolution of an addition (reading the
    same input) for no more than the ops it replaces cost."""
    adds, terms, _ = _tree_of(node)
    for term in terms:
        if term is node or not isinstance(term, fx.Node):
            continue
        op = _term_op(gm, modules, term, adds)
        if op.kind != "conv" or op.x is not x:
            continue
        try:
            sibling = op.build(None, merged.spatial_rank)
            if _cost(merge_parallel([sibling, merged])) <= _cost(sibling) + spent:
                return True
        except MergeRefused:
            continue
    return False


@dataclass(frozen=True)
class Source:
    """An op of the traced module that a merged convolution absorbed: its node, the tensor it read, its kind, and
    the module whose call it is (a functional call: the innermost module that made it; None for an identity);
    ``coefficient``: what the sums it was a term of multiplied it by, per output channel (None: one)."""

    node: fx.Node | None
    x: fx.Node
    kind: str
    path: str | None
    coefficient: np.ndarray | None = field(default=None, compare=False)


def _sources(op: LinearOp, provenance: dict, coefficient: np.ndarray | None = None) -> list[Source]:
    node = op.node
    if node is not None and node.op == "call_module" and node.target in provenance:  # an earlier merge's conv
        if coefficient is None:
            return provenance[node.target]
        return [replace(src, coefficient=coefficient if src.coefficient is None else src.coefficient * coefficient)
                for src in provenance[node.target]]
    if node is None:
        return [Source(None, op.x, op.kind, None, coefficient)]
    if node.op == "call_module":
        return [Source(node, op.x, op.kind, str(node.target), coefficient)]
    stack = node.meta.get("nn_module_stack") or {}
    owner = list(stack.values())[-1][0] if stack else None
    return [Source(node, op.x, op.kind, owner, coefficient)]


def _record(report: FoldReport, ops: list[LinearOp], into: str, rule: str) -> None:
    """One Merge record per merged convolution, naming the ops it replaced (an identity term removes nothing), as
    the ONNX side records it; batch norms merged away are folds by the merge's rule too."""
    merge = Merge(rule, into, tuple(op.name for op in ops if op.kind != "identity"),
                  absorbed=tuple(op.name for op in ops if op.kind == "bn"))
    _add_merge(report, merge)


def _add_merge(report: FoldReport, merge: Merge) -> None:
    """Record ``merge``: its batch norms are no longer left (their Skips go, ``bn_after`` counts them out)."""
    report.merged.append(merge)
    report.folded.extend(merge.folds())
    before = len(report.skipped)
    report.skipped = [s for s in report.skipped if s.bn not in merge.absorbed]
    report.bn_after -= before - len(report.skipped)


def _conv_module(branch: ConvBranch, like: torch.Tensor) -> nn.Module:
    """A torch ConvNd holding the merged kernel (rounded once to ``like``'s dtype)."""
    if branch.pads_begin != branch.pads_end:
        raise MergeRefused(f"the merged convolution pads {list(branch.pads_begin)} before and "
                           f"{list(branch.pads_end)} after: torch's ConvNd pads alike on both sides")
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(branch.spatial_rank)
    if cls is None:
        raise MergeRefused(f"{branch.spatial_rank} spatial axes: no torch convolution")
    conv = cls(branch.in_channels, branch.out_channels, branch.kernel_shape, stride=branch.strides,
               padding=branch.pads_begin, dilation=branch.dilations, groups=branch.groups, bias=True,
               device="meta")
    conv.weight = nn.Parameter(to_torch(branch.weight, like))
    conv.bias = nn.Parameter(to_torch(branch.bias, like))
    return conv.eval()


def _merged_name(ops: list[LinearOp]) -> str:
    first = next((op.name for op in ops if op.kind == "conv"), ops[0].name)
    return first.replace(".", "_") + "_merged"


def _fresh_name(modules: ModuleIndex, base: str) -> str:
    name, i = base, 0
    while name in modules:
        i += 1
        name = f"{base}_{i}"
    return name


def _erase(gm: fx.GraphModule, modules: ModuleIndex, nodes: list[fx.Node]) -> None:
    """Erase the replaced nodes, then whatever constant computation only they read (a functional conv's weight)."""
    work = list(nodes)
    while work:
        node = work.pop(0)
        if node in modules.erased or node.users or node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module" and node.target in modules:
            modules.calls[id(modules[node.target])] -= 1
        inputs = [a for a in node.all_input_nodes]
        gm.graph.erase_node(node)
        modules.erased.add(node)
        work.extend(a for a in inputs if _constant_node(a))


def _constant_node(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    return node.op in ("call_function", "call_method") and all(_constant_node(a) for a in node.all_input_nodes)


def merged_count(report: FoldReport) -> int:
    """The merges a report records (one merged convolution each)."""
    return len(report.merged)


def _without_identities(conv: nn.Module, exact: ExactWeights, identities: list[Source], factor) -> nn.Module:
    """The convolution that, multiplied by ``factor`` (per output channel; None: one) and added to the input with
    the identities' coefficients, computes ``conv``: ``(W - Σ cᵢ·I) / factor``, in float64 from the merge's own
    float64 weights, rounded once."""
    values = exact.of(conv.weight, conv.bias)
    weight, bias = values if values is not None else (numpy64(conv.weight), numpy64(conv.bias))
    rank = weight.ndim - 2
    pads = list(_tuple(conv.padding, rank)) * 2
    branch = conv_branch(weight, bias, groups=conv.groups, strides=conv.stride, dilations=conv.dilation, pads=pads)
    channels = branch.out_channels
    added = sum((np.ones(channels) if src.coefficient is None else src.coefficient) for src in identities)
    if identities:
        branch = merge_parallel([branch, negated(affine_branch(added, np.zeros(channels), rank))])
    if factor is not None:
        if not np.all(np.isfinite(factor)) or np.any(factor == 0):
            raise MergeRefused("the convolution's branch is multiplied by zero on some channel in the module's "
                               "forward")
        branch = _scaled(branch, 1.0 / factor)
    return _conv_module(branch, conv.weight)


class Zero(nn.Module):
    """A branch merged into another one: adds nothing (a zero the sum broadcasts), as a deploy form drops it."""

    def forward(self, x):
        return x.new_zeros(())


def write_merges(module: nn.Module, example_inputs, report: FoldReport, exact_by_path: dict | None = None) -> None:
    """For a ``keep_class=True`` result: write each merge the trace of ``module`` proves into the module itself, the
    way a block's own ``reparameterize()`` does. Where the block has the authors' empty deploy slot
    (:data:`DEPLOY_SLOTS`, e.g. timm's ``reparam_conv = None``) and its forward then runs that convolution alone, the
    merged convolution goes there and the merged branches are deleted, as their ``reparameterize()`` does: the state
    dict loads into the authors' deploy class. Otherwise one absorbed convolution module (the host, reading the
    block's input) becomes the merged convolution, the first module of every other branch a :class:`Zero`, the rest
    of each branch ``nn.Identity``. A term that is the block's input itself stays in its forward, as do the sum's
    signs and constant scales: the host gets the merged kernel less those identities, over its own factor. A merge
    the module can not express that way (nothing but the input beside the host, an input term that is not the
    block's input, a module called elsewhere or computing more) is a Skip with code ``needs-graph-module``. The
    written module is checked against the merged graph on ``example_inputs`` (without them nothing is written).
    ``exact_by_path``: the float64 (weight, bias) of layers the folds wrote, by module path
    (:func:`bnfold.torch.own.fold_own_class`'s), merged from instead of their cast."""
    from .fold import copy_module, count_normalizations, run_example, trace
    from .own import same_outputs

    copied = copy_module(module).eval()
    graph_module = trace(copied)
    if isinstance(graph_module, str):
        return
    if example_inputs is not None:  # ranks: where a constant scale's channel axis is, what a functional BN reads
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            run_example(lambda: ShapeProp(graph_module).propagate(*example_inputs))
    calls: dict[str, int] = {}
    owners: dict[str, list[fx.Node]] = {}  # module path -> the computing nodes its forward made
    graph_modules = dict(graph_module.named_modules())
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        if node.op in ("call_function", "call_method", "call_module") and not _constant_node(node) and \
                not passes_input_on(graph_modules, node):  # eval-mode Identity/Dropout compute nothing
            for path, _ in (node.meta.get("nn_module_stack") or {}).values():
                owners.setdefault(path, []).append(node)
    registered: dict[int, int] = {}
    for _, m in module.named_modules(remove_duplicate=False):
        registered[id(m)] = registered.get(id(m), 0) + 1
    trial, provenance = FoldReport(), {}
    exact = ExactWeights.at_paths(copied, exact_by_path or {})
    merge_graph(graph_module, trial, provenance, exact)
    finals = [n for n in graph_module.graph.nodes if n.op == "call_module" and n.target in provenance]
    written: list[_Writing] = []
    slots_taken: set[str] = set()
    for node in finals:
        sources = provenance[node.target]
        rule = _rule_of(node.target, trial)
        label = " + ".join(src.path or src.x.name for src in sources)
        found = _assignment(module, graph_module, node, sources, calls, owners, registered, exact)
        if isinstance(found, str) or example_inputs is None:
            why = found if isinstance(found, str) else "no example_inputs to check the written module with"
            report.not_merged.append(Skip(label, f"the {rule} merge is proven on the trace, but not written into "
                                                 f"the module's own class: {why}", op_type="merge",
                                          code="needs-graph-module"))
            continue
        host, assignment = found
        slot = _deploy_slot(module, sources)
        if slot is not None and slot[0] in slots_taken:
            slot = None  # one deploy convolution per block: a second merge in it keeps its host's name
        if slot is not None:
            slots_taken.add(slot[0])
        # in the slot the block's forward runs the whole merged convolution alone: identity terms and scales too
        written.append(_Writing(rule, sources, host, graph_module.get_submodule(node.target), assignment, slot))
    if not written:
        return
    candidate = _written_copy(module, written, set())
    if not same_outputs(candidate, graph_module, example_inputs):
        raise RuntimeError("bnfold: the merges written into the module's own class do not compute what the merged "
                           "graph computes")
    slotted = _slots_that_work(module, written, candidate, graph_module, example_inputs)
    for writing in written:
        slot = id(writing) in slotted
        _write(module, writing, slot)
        if slot:
            into, removed = writing.slot[0], [src for src in writing.sources if src.path is not None]
        else:
            into = writing.host.path
            removed = [src for src in writing.sources if src is not writing.host and src.path is not None]
        _add_merge(report, Merge(writing.rule, into, tuple(src.path for src in removed),
                                 absorbed=tuple(src.path for src in removed if src.kind == "bn")))
    module.eval()
    retraced = trace(module)
    if not isinstance(retraced, str) and count_normalizations(retraced) != report.bn_after:
        raise RuntimeError("bnfold: the module with merges written runs another number of batch norms than the "
                           "report says")


# Where the authors' deploy forms keep a block's merged convolution: timm's RepVGG/MobileOne/FastViT blocks
# (``self.reparam_conv``, None until ``reparameterize()``), the RepVGG and DBB reference code (``rbr_reparam``,
# ``dbb_reparam``, absent until then). Their forwards run that convolution alone once it is set.
DEPLOY_SLOTS = ("reparam_conv", "rbr_reparam", "dbb_reparam")


@dataclass
class _Writing:
    """One merge to write into the user's module: into its host convolution's place (``assignment``), or, where
    the block has an empty deploy slot (``slot``: its path, and the block's branch modules to delete), there."""

    rule: str
    sources: list[Source]
    host: Source
    merged: nn.Module
    assignment: list[tuple[str, nn.Module]]
    slot: tuple[str, list[str]] | None


def _deploy_slot(module: nn.Module, sources: list[Source]) -> tuple[str, list[str]] | None:
    """(path of the slot, paths of the branch modules to delete) when a module holding every merged op (the
    innermost such one that has it) has an empty :data:`DEPLOY_SLOTS` attribute its forward reads, and its branches
    hold no weights but the merged ops'; else None. Writing there gives the state dict keys of the authors' deploy
    form (``block.reparam_conv.weight``), loadable into their deploy class."""
    parts = [src.path.split(".") for src in sources if src.path is not None]  # None: the block's input itself
    common: list[str] = []
    for names in zip(*parts):
        if len(set(names)) != 1:
            break
        common.append(names[0])
    common = common[:min(len(p) for p in parts) - 1]  # the block holds the ops; it is none of them
    for depth in range(len(common), -1, -1):  # MobileOne's branches sit in a ModuleList inside the block
        block = module.get_submodule(".".join(common[:depth]))
        read = getattr(getattr(type(block).forward, "__code__", None), "co_names", ())
        slot = next((name for name in DEPLOY_SLOTS if name in read and getattr(block, name, None) is None), None)
        if slot is not None:
            common = common[:depth]
            break
    else:
        return None
    prefix = "".join(f"{name}." for name in common)
    branches = sorted({prefix + p[len(common)] for p in parts})
    merged_ops = {id(module.get_submodule(src.path)) for src in sources if src.path is not None}
    for branch in branches:
        for m in module.get_submodule(branch).modules():
            holds = any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
            if holds and id(m) not in merged_ops:
                return None
    return prefix + slot, branches


def _write(root: nn.Module, writing: _Writing, slot: bool) -> None:
    from .own import set_submodule

    if slot and writing.slot is not None:
        path, branches = writing.slot
        for branch in branches:
            owner_path, _, leaf = branch.rpartition(".")
            delattr(root.get_submodule(owner_path), leaf)
        set_submodule(root, path, copy.deepcopy(writing.merged))
        return
    for path, replacement in writing.assignment:
        set_submodule(root, path, copy.deepcopy(replacement))


def _written_copy(module: nn.Module, written: list[_Writing], slotted: set[int]) -> nn.Module:
    """A copy of ``module`` with the merges written: those in ``slotted`` (ids) into their deploy slots."""
    from .fold import copy_module

    candidate = copy_module(module)
    for writing in written:
        _write(candidate, writing, id(writing) in slotted)
    return candidate.eval()


def _slots_that_work(module: nn.Module, written: list[_Writing], hosted: nn.Module, graph_module,
                     example_inputs) -> set[int]:
    """The merges (ids) written into their deploy slots: all that have one when that checks out (one run, the
    common case), else each one that checks out beside those before it (a block whose forward does more than its
    slot, say, keeps its host's name without costing the others theirs)."""
    slotted = {id(w) for w in written if w.slot is not None}
    if not slotted or _same_function(_written_copy(module, written, slotted), hosted, graph_module, example_inputs):
        return slotted
    chosen: set[int] = set()
    for writing in written:
        if id(writing) in slotted and len(slotted) > 1 and _same_function(
                _written_copy(module, written, chosen | {id(writing)}), hosted, graph_module, example_inputs):
            chosen.add(id(writing))
    return chosen


def _same_function(candidate: nn.Module, written: nn.Module, graph_module, example_inputs) -> bool:
    """Whether the module with merges in the deploy slots computes what the merged graph computes and runs as many
    batch norms as the module with merges in their hosts' places (a forward that does not switch on the slot, or
    fails without the deleted branches, does not)."""
    from .fold import count_normalizations, trace
    from .own import same_outputs

    try:
        if not same_outputs(candidate, graph_module, example_inputs):
            return False
    except Exception:
        return False
    traced, reference = trace(candidate), trace(written)
    return not isinstance(traced, str) and not isinstance(reference, str) and \
        count_normalizations(traced) == count_normalizations(reference)


def _rule_of(into: str, trial: FoldReport) -> str:
    """``merge-branches`` when the convolution ``into`` comes of a branch merge, at any step (a batch norm after
    the merged sum is a sequential merge after it), else ``merge-sequential``."""
    records = {m.into: m for m in trial.merged}
    work, seen = [into], set()
    while work:
        name = work.pop()
        if name in seen or name not in records:
            continue
        seen.add(name)
        if records[name].rule == "merge-branches":
            return "merge-branches"
        work.extend(records[name].removed)
    return "merge-sequential"


def _assignment(module, graph_module, node, sources: list[Source], calls, owners, registered,
                exact: ExactWeights):
    """(host source, [(module path, replacement)]) writing the merged convolution ``node`` into ``module``, or why
    the module can not express it. A term that is the input itself stays in the module's forward, with the
    factors its sum gives it, and so does the host's own factor: the host gets the merged kernel less those
    identities, divided by its factor (in float64, rounded once)."""
    x = node.args[0]
    identities = [src for src in sources if src.path is None]
    if any(src.x is not x for src in identities):
        return "a term of the sum is a tensor the block computed, not its input and not a module's output"
    if len(identities) == len(sources) - 1:
        return ("the other term of the sum is the input itself, which the module's forward adds anyway: nothing "
                "to merge into the convolution")
    for src in sources:
        if src.path is None:
            continue
        try:
            owned = module.get_submodule(src.path)
        except AttributeError:
            return f"no module named '{src.path}'"
        if registered.get(id(owned), 0) != 1:
            return f"'{src.path}' is registered under several names"
        if src.node.op == "call_module":
            if calls.get(src.path) != 1:
                return f"'{src.path}' is called elsewhere too"
        elif owners.get(src.path) != [src.node]:
            return f"'{src.path}' computes more than the {src.kind}"
    host = next((src for src in sources if src.kind == "conv" and src.x is x), None)
    if host is None:
        return "no convolution of the block reads its input"
    merged = graph_module.get_submodule(node.target)
    if identities or host.coefficient is not None:
        try:
            merged = _without_identities(merged, exact, identities, host.coefficient)
        except (MergeRefused, FoldRefused) as exc:
            return str(exc)
    else:
        merged = copy.deepcopy(merged)
    assignment = [(host.path, merged)]
    for src in sources:
        if src is not host and src.path is not None:
            assignment.append((src.path, Zero() if src.x is x else nn.Identity()))
    return host, assignment


