"""Fold every batch norm a PyTorch module's forward computes into the Conv/ConvTranspose/Linear layers next to it.

A batch norm is what the forward computes as one, whatever the module type: a ``nn.BatchNorm*d``/SyncBatchNorm
call, a subclass whose forward is traced through (timm's ``BatchNormAct2d`` calls ``F.batch_norm`` on its own
buffers, then an activation), a functional ``F.batch_norm``/``torch.batch_norm`` on parameters and buffers in eval
mode, and torchvision-style frozen batch norms (four buffers and arithmetic: one call when a probe input shows the
module computes just that, else traced through and found as ``x * scale + shift`` computed from ``running_var``).

The math is bnfold.affine's (float64, cast once); the layer knowledge is :mod:`bnfold.torch.ops`'s. Folds are made
only where they are provably exact:

* by data flow, on a torch.fx graph: the linear layer's output goes to the batch norm and nowhere else; a layer
  called at several places is copied for the call site that folds, so every other call keeps its weights;
* by axis: a batch norm normalizes dimension 1, which must be the dimension the layer writes (Conv: always when
  the input is batched; Linear: only for rank-2 tensors). Ranks come from ``example_inputs`` (shape propagation)
  or from what the BatchNorm type forces; when neither proves it, the fold is refused with the reason;
* when torch.fx can not trace the module (sizes read at run time, say), the folds are made on torch.export's
  ATen graph (:mod:`bnfold.torch.export`), which needs ``example_inputs``; when that fails too, only consecutive
  children of plain ``nn.Sequential`` containers fold, and the report says so.

``bn_before`` counts the batch-norm computations one forward runs; every one not folded is a Skip with a code.
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..affine import FoldRefused
from ..errors import InputError, first_line
from ..report import Fold, FoldReport, Skip
from .ops import (Affine, ExactWeights, Layer, Plan, Refusal, affine_from_stats, before_scales, check_after,
                  exact_after, exact_before, first_refusal, frozen_affine, module_kind, module_layer, refusal_of,
                  to_torch, weights_after)

_BATCHNORM = nn.modules.batchnorm._BatchNorm
# Ranks of input each BatchNorm class accepts (None: any rank >= 2).
_ACCEPTED_RANKS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
# Functional batch norms, as signatures to bind a call's arguments to.
_FUNCTIONAL = {
    F.batch_norm: inspect.signature(F.batch_norm),
    torch.batch_norm: inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in (
        "input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")]),
}


def fold_module(module: nn.Module, example_inputs=None, *, inplace: bool = False, allow_train: bool = False,
                keep_class: bool = False, merge: bool = True) -> tuple[nn.Module, FoldReport]:
    """Fold every batch norm that folds exactly; return ``(eval-mode module, FoldReport)``.

    ``example_inputs``: a tensor or a tuple of positional arguments; it lets bnfold prove tensor ranks (needed for
    Linear/BatchNorm1d folds), and folding through torch.export when torch.fx can not trace the module needs it.
    The result is a ``torch.fx.GraphModule`` (or torch.export's module), unless ``keep_class=True``: then it is the
    module's own class, same attribute names and methods, with each folded batch norm replaced by ``nn.Identity``
    or by what its module computes besides it (the activation of a ``BatchNormAct2d``), and the absorbing layers'
    weights updated. Only folds proven on the torch.fx trace that can be written into the module that way are made
    then; the others are Skips with code ``needs-graph-module``.

    ``merge``: after the folds, merge linear branches on the traced graph (:mod:`bnfold.torch.merge`: summed
    Conv/BN/identity/average-pool branches reading one input, and exact Conv sequences, become one Conv), each a
    ``Fold`` with rule ``merge-branches`` or ``merge-sequential``. With ``keep_class=True`` each merge is written into
    the module as a block's own ``reparameterize()`` would (into the block's empty deploy slot, e.g. timm's
    ``reparam_conv``, with the branches deleted; without one, one branch's conv becomes the merged conv and the other
    branches zero); one the module can not express is a Skip with code ``needs-graph-module``.

    The input module is not modified unless ``inplace=True``. A module in training mode is an error unless
    ``allow_train=True``, which folds an eval-mode copy. Prints nothing.
    """
    if not isinstance(module, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if any(m.training for m in module.modules()):
        if not allow_train:
            raise InputError("the module is in training mode (BatchNorm would use batch statistics): call .eval() "
                             "first, or pass allow_train=True to fold an eval-mode copy")
        inplace = False
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if keep_class:
        from .own import fold_own_class

        folded: dict = {}
        result, report = fold_own_class(module, example_inputs, inplace=inplace, exact=folded)
        if merge:
            from .merge import write_merges

            write_merges(result, example_inputs, report, exact_by_path=folded)
        return result, report
    work = module if inplace else copy_module(module)
    work.eval()
    report = FoldReport()
    exact = ExactWeights()  # float64 weights of the folds, so that each merge rounds once
    graph_module = trace(work)
    if isinstance(graph_module, str):
        folded, report = _fold_untraceable(work, example_inputs, report, graph_module, exact)
        if merge and folded is not work:  # torch.export's ATen graph
            from .export import drop_unused_tensors
            from .merge import merge_graph

            merge_graph(folded, report, exact=exact)
            drop_unused_tensors(folded)
        elif merge:
            report.notes.append("branch merges need a graph (torch.fx's or torch.export's): none were made")
        return folded, report
    fold_graph(graph_module, example_inputs, report, exact=exact)
    if merge:
        _merge_and_refold(graph_module, example_inputs, report, exact)
    return graph_module, report


_MAX_MERGE_ROUNDS = 16


def _merge_and_refold(graph_module: fx.GraphModule, example_inputs, report: FoldReport,
                      exact: ExactWeights) -> None:
    """Merge branches, fold what the merges made foldable (a functional or frozen batch norm after a merged sum is
    after one convolution now), and again, until neither changes anything (as the ONNX side does). The batch
    norms left and their reasons are those of the last fold round, which saw the final graph; the merges refused
    are those of the last merge round."""
    from .merge import merge_graph

    for _ in range(_MAX_MERGE_ROUNDS):
        merges, refusals = len(report.merged), len(report.not_merged)
        merge_graph(graph_module, report, exact=exact)
        if len(report.merged) == merges:
            return
        again = FoldReport()
        fold_graph(graph_module, example_inputs, again, exact=exact)
        if not again.folded:
            return
        report.folded += again.folded
        report.skipped, report.bn_after = again.skipped, again.bn_after
        del report.not_merged[refusals:]  # the next merge round finds what stays unmerged again


def copy_module(module: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(module)
    except Exception as exc:  # e.g. legacy weight_norm tensors refuse deepcopy
        raise InputError(f"the module can not be copied ({first_line(exc, max_chars=160)}); pass inplace=True to "
                         "fold it in place") from None


def trace(module: nn.Module) -> fx.GraphModule | str:
    """The module's torch.fx GraphModule (sharing its submodules), or why torch.fx can not trace it."""
    # Buffers are traced as attributes (so a frozen batch norm's arithmetic on its running_var shows in the graph)
    # unless the forward branches on a buffer's value; then they are read as constants.
    for proxy_buffers in (True, False):
        tracer = Tracer()
        tracer.proxy_buffer_attributes = proxy_buffers
        try:
            graph_module = fx.GraphModule(module, tracer.trace(module), module.__class__.__name__)
            break
        except Exception as exc:  # data-dependent control flow, sizes read at run time, untraceable calls
            why = first_line(exc, with_type=True, max_chars=200)
    else:
        return why
    graph_module.eval()
    return graph_module


def fold_graph(graph_module: fx.GraphModule, example_inputs, report: FoldReport, *, keep=frozenset(),
               own_class: bool = False, exact: ExactWeights | None = None) -> None:
    """Fold the batch norms of a traced module in place. ``keep``: names of batch norms to leave, and with
    ``own_class`` folds into a layer that runs elsewhere too (which would need a copy of it) are not made either;
    both are Skips with code ``needs-graph-module``. ``exact``: receives the float64 weights of the folded layers
    (for :func:`bnfold.torch.merge.merge_graph`)."""
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            run_example(lambda: ShapeProp(graph_module).propagate(*example_inputs))
    _fold_graph(graph_module, report, keep, own_class, exact)
    _drop_unread_attributes(graph_module)
    graph_module.graph.lint()
    graph_module.recompile()


def _fold_untraceable(work: nn.Module, example_inputs, report: FoldReport, why: str, exact: ExactWeights):
    if example_inputs is not None:
        from .export import fold_module_exported

        folded = fold_module_exported(work, example_inputs, report, exact=exact)
        if folded is not None:
            report.notes.insert(0, f"torch.fx could not trace the module ({why}); folded on torch.export's ATen "
                                   "graph instead")
            return folded, report
    report.notes.insert(0, f"torch.fx could not trace the module ({why})" + (
        "" if example_inputs is not None else " and no example_inputs were given for torch.export") +
        "; folded consecutive children of nn.Sequential containers only")
    fold_sequential(work, example_inputs, report)
    return work, report


def run_example(run) -> None:
    """Run the example inputs through the module; inputs it can not take are the caller's error."""
    try:
        run()
    except Exception as exc:
        cause = exc.__cause__ or exc  # ShapeProp wraps the module's own error
        raise InputError(f"example_inputs do not run through the module "
                         f"({first_line(cause, with_type=True, max_chars=200)})") from None


# ---- normalizations -----------------------------------------------------------------------------------------

def is_frozen_batchnorm(module: nn.Module) -> bool:
    """Structure of torchvision's FrozenBatchNorm2d and its kin: four 1-D buffers, no parameters, an ``eps``."""
    if isinstance(module, _BATCHNORM) or any(True for _ in module.parameters(recurse=False)):
        return False
    buffers = dict(module.named_buffers(recurse=False))
    names = ("weight", "bias", "running_mean", "running_var")
    if not all(n in buffers and buffers[n] is not None and buffers[n].dim() == 1 for n in names):
        return False
    return len({buffers[n].shape[0] for n in names}) == 1 and isinstance(getattr(module, "eps", None), float)


def module_affine(module: nn.Module) -> Affine | Refusal | None:
    """A batch-norm module (whose forward is the batch norm) as an Affine, a refusal, or None if it is not one."""
    if isinstance(module, _BATCHNORM):
        if not module.track_running_stats or module.running_mean is None or module.running_var is None:
            return Refusal("batch-statistics", "track_running_stats=False: it normalizes by the statistics of "
                                               "each batch, even at inference")
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            return Refusal("uninitialized", "lazy BatchNorm that was never initialized")
        ranks = next((r for cls, r in _ACCEPTED_RANKS.items()  # a subclass may check ranks its own way
                      if isinstance(module, cls) and type(module)._check_input_dim is cls._check_input_dim), None)
        return affine_from_stats(module.weight if module.affine else None, module.bias if module.affine else None,
                                 module.running_mean, module.running_var, module.eps, ranks)
    if is_frozen_batchnorm(module):
        affine = affine_from_stats(module.weight, module.bias, module.running_mean, module.running_var, module.eps)
        if isinstance(affine, Affine) and not _behaves_like(module, affine):
            return None  # looks like a frozen batch norm but computes something else: not ours to fold
        return affine
    return None


def _behaves_like(module: nn.Module, affine: Affine) -> bool:
    """Check a structurally recognised frozen batch norm on a probe input: it must compute s*x + t on dim 1."""
    channels = affine.s.shape[0]
    probe_module = copy.deepcopy(module).double().eval()
    generator = torch.Generator().manual_seed(0)
    for shape in ((2, channels, 3, 3), (2, channels, 3), (2, channels)):
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        try:
            with torch.no_grad():
                y = probe_module(x.to(next(probe_module.buffers()).device)).cpu().numpy()
        except Exception:
            continue
        view = (1, channels) + (1,) * (len(shape) - 2)
        expected = x.numpy() * affine.s.reshape(view) + affine.t.reshape(view)
        return y.shape == expected.shape and np.allclose(y, expected, rtol=1e-9, atol=1e-9)
    return False


def runs_torch_forward(module: nn.Module) -> bool:
    """A Conv/ConvTranspose/Linear/BatchNorm (or subclass) whose forward is torch's own: one call, one op."""
    if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, _BATCHNORM)):
        return False
    return getattr(type(module).forward, "__module__", "").startswith("torch.nn.")


class Tracer(fx.Tracer):
    """Keeps as single calls: frozen batch norms, and layers (subclasses too) that run torch's own forward.
    Everything else is traced through, so a batch norm computed inside a custom module shows as a call."""

    def trace(self, root, concrete_args=None):
        # decided before tracing: the probe run of module_affine must not happen while calls are being recorded;
        # a frozen batch norm that computes more (an activation too) is traced through
        self.frozen = {id(m) for m in root.modules() if is_frozen_batchnorm(m) and module_affine(m) is not None}
        self.buffer_names = {id(b): n for n, b in root.named_buffers()} if isinstance(root, nn.Module) else {}
        return super().trace(root, concrete_args)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        # torch.fx looks a proxied buffer up by walking every buffer of the model at each access (quadratic in
        # the model's size); a table built once finds it at once
        if self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor) and \
                not isinstance(attr_val, nn.Parameter) and id(attr_val) in self.buffer_names:
            name = self.buffer_names[id(attr_val)]
            if name not in parameter_proxy_cache:
                parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
            return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or runs_torch_forward(m) or id(m) in self.frozen


class _Norm:
    """One batch-norm computation of the graph: its node (whose output a fold bypasses), its input, what it is as
    an affine, its report name, and the nodes a fold removes (the node, and for arithmetic the rest of it)."""

    def __init__(self, node: fx.Node, x, affine: Affine | Refusal, name: str, op_type: str, module=None,
                 nodes=None):
        self.node, self.x, self.affine, self.name, self.op_type, self.module = node, x, affine, name, op_type, module
        self.nodes = nodes or [node]


def _norm_of(gm: fx.GraphModule, modules: dict, node: fx.Node) -> _Norm | None:
    if node.op == "call_module" and node.target in modules:
        module = modules[node.target]
        affine = module_affine(module)
        if affine is None:
            return None
        return _Norm(node, single_tensor_arg(node), affine, node.target, type(module).__name__, module)
    frozen = frozen_affine(node, lambda n: attribute_tensor(gm, n))
    if frozen is not None:
        x, nodes, affine, owner = frozen
        rank = _rank(x)
        if isinstance(affine, Affine) and rank is not None and rank not in affine.ranks:
            return None  # the per-channel constants broadcast against another dimension than 1
        if isinstance(affine, Affine) and rank is None:
            affine = Refusal("rank-unknown", "can not prove the frozen batch norm's input has the rank of its "
                                             "constants (pass example_inputs)")
        return _Norm(node, x, affine, owner or node.name, "frozen batch norm", nodes=nodes)
    found = functional_norm(gm, node)
    if found is not None:
        x, affine, name = found
        return _Norm(node, x, affine, name, "batch_norm")
    return None


def functional_norm(gm: fx.GraphModule, node: fx.Node) -> tuple[object, Affine | Refusal, str] | None:
    """A functional batch norm call (``F.batch_norm``/``torch.batch_norm``, as timm's ``BatchNormAct2d`` makes) as
    (its input, its affine or why it is not one, its name), or None when ``node`` is no such call."""
    if node.op != "call_function" or node.target not in _FUNCTIONAL:
        return None
    try:
        bound = _FUNCTIONAL[node.target].bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = bound.arguments
    name = _functional_name(a.get("running_mean"), node)
    if a.get("training") is not False:
        return a["input"], Refusal("training-mode", "training=True (or computed): it normalizes by batch "
                                                    "statistics"), name
    tensors = {k: attribute_tensor(gm, a.get(k)) for k in ("weight", "bias", "running_mean", "running_var")}
    computed = [k for k in tensors if a.get(k) is not None and tensors[k] is None]
    if computed or a.get("running_mean") is None or a.get("running_var") is None or \
            not isinstance(a.get("eps"), (int, float)):
        what = ", ".join(computed) or "running statistics or eps"
        return a["input"], Refusal("non-constant", f"{what} not parameters or buffers"), name
    affine = affine_from_stats(tensors["weight"], tensors["bias"], tensors["running_mean"], tensors["running_var"],
                               float(a["eps"]))
    return a["input"], affine, name


def _functional_name(running_mean, node: fx.Node) -> str:
    """A functional batch norm is named after the module that owns its statistics (timm's ``BatchNormAct2d``)."""
    if isinstance(running_mean, fx.Node) and running_mean.op == "get_attr":
        owner = str(running_mean.target).rpartition(".")[0]
        if owner:
            return owner
    return node.name


def attribute_tensor(gm: fx.GraphModule, arg) -> torch.Tensor | None:
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    try:
        value = gm.get_submodule(arg.target.rpartition(".")[0]) if "." in arg.target else gm
        value = getattr(value, arg.target.rpartition(".")[2])
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


# ---- the fx pass -------------------------------------------------------------------------------------------------

def count_normalizations(gm: fx.GraphModule) -> int:
    """The batch-norm computations of a traced module's forward."""
    modules = dict(gm.named_modules())
    return sum(_norm_of(gm, modules, n) is not None for n in gm.graph.nodes)


_NEEDS_GRAPH = "folding it is proven on the trace, but it can not be written into the module's own class"


class ModuleIndex(dict):
    """The GraphModule's modules by name, with the counts the data-flow checks read, kept up to date by the pass
    (counting them again for every fold made large models fold in seconds)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm.named_modules())
        self.registered = Counter(id(m) for _, m in gm.named_modules(remove_duplicate=False))
        self.param_refs = Counter(id(p) for _, p in gm.named_parameters(remove_duplicate=False))
        self.calls = Counter(id(self[n.target]) for n in gm.graph.nodes if n.op == "call_module" and n.target in self)
        self.exact = ExactWeights()  # the float64 weights of folds and merges made
        self.read_under = set()  # module paths under which a get_attr reads a tensor
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                parts = str(n.target).split(".")
                self.read_under.update(".".join(parts[:i]) for i in range(1, len(parts)))


    def exact_of(self, layer: nn.Module) -> tuple | None:
        """The float64 (weight, bias) a fold or merge computed for ``layer`` (whose weights are their cast), or
        None: later folds and merges start from them, so that every result is rounded once."""
        return self.exact.of(layer.weight, layer.bias)

    def set_exact(self, layer: nn.Module, weight, bias, wanted: bool = True) -> None:
        self.exact.keep(module_kind(layer), layer.weight, layer.bias, (weight, bias), wanted)


def _fold_graph(gm: fx.GraphModule, report: FoldReport, keep, own_class: bool,
                exact: ExactWeights | None) -> None:
    modules = ModuleIndex(gm)
    if exact is not None:
        modules.exact = exact
    report.bn_before += count_normalizations(gm)
    while True:
        changed, skipped = False, []
        for node in list(gm.graph.nodes):
            norm = _norm_of(gm, modules, node)
            if norm is None:
                continue
            if isinstance(norm.affine, Refusal):
                skipped.append(Skip(norm.name, norm.affine.reason, op_type=norm.op_type, code=norm.affine.code))
                continue
            after = _plan_after(gm, modules, norm)
            plan = after if isinstance(after, Plan) else _plan_before(gm, modules, norm)
            if isinstance(plan, Plan) and norm.name in keep:
                skipped.append(Skip(norm.name, _NEEDS_GRAPH, op_type=norm.op_type, code="needs-graph-module"))
            elif isinstance(plan, Plan) and own_class and _shared_elsewhere(gm, modules, plan.layer,
                                                                            modules[plan.layer.target]):
                skipped.append(Skip(norm.name, f"{_NEEDS_GRAPH}: '{plan.layer.target}' runs elsewhere too",
                                    op_type=norm.op_type, code="needs-graph-module"))
            elif isinstance(plan, Plan):
                report.folded.append(apply_plan(gm, modules, plan))
                changed = True
            else:
                refusal = first_refusal(after, plan)
                skipped.append(Skip(norm.name, refusal.reason, op_type=norm.op_type, code=refusal.code))
        if not changed:
            break
    report.skipped.extend(skipped)
    report.bn_after += len(skipped)




def _rank(node) -> int | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return None if shape is None else len(shape)


def hook_reason(module: nn.Module | None) -> str:
    """Why the module's call is more than its forward (hooks, weight parametrizations), or ''."""
    from torch.nn.utils import parametrize

    if module is None:
        return ""
    if parametrize.is_parametrized(module):
        return "its weight is computed by a parametrization"
    if module._forward_pre_hooks or module._forward_hooks or getattr(module, "_forward_hooks_with_kwargs", None):
        return "it has forward hooks (e.g. legacy weight_norm) that would see different values"
    return ""


def _shared_elsewhere(gm: fx.GraphModule, modules: ModuleIndex, node: fx.Node, layer: nn.Module) -> bool:
    """Whether anything but this call site runs the layer or reads its tensors."""
    if modules.calls[id(layer)] != 1 or modules.registered[id(layer)] != 1:
        return True
    if any(modules.param_refs[id(p)] != 1 for p in layer.parameters(recurse=False)):
        return True  # a parameter tied to another module
    return node.target in modules.read_under


def _own_copy(gm: fx.GraphModule, modules: ModuleIndex, node: fx.Node) -> nn.Module:
    """The module this call site runs, copied under a new name when anything else runs it or reads its tensors."""
    layer = modules[node.target]
    if not _shared_elsewhere(gm, modules, node, layer):
        return layer
    base, i = f"{node.target.replace('.', '_')}_bnfold", 0
    name = base
    while name in modules:
        i += 1
        name = f"{base}_{i}"
    copied = copy.deepcopy(layer)
    gm.add_submodule(name, copied)
    node.target = name
    modules[name] = copied
    modules.registered[id(copied)] = 1
    modules.param_refs.update(id(p) for p in copied.parameters())
    modules.calls[id(layer)] -= 1
    modules.calls[id(copied)] = 1
    return copied


_SHAPE_ATTRIBUTES = {"ndim", "shape", "dtype", "device", "is_cuda"}
_SHAPE_METHODS = {"dim", "size", "ndimension"}


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of a node that read its values; reads of its shape (timm asserts the rank) see the same shape
    after a fold."""
    import builtins

    return [u for u in node.users if not (
        (u.op == "call_function" and u.target is builtins.getattr and len(u.args) > 1 and u.args[0] is node and
         u.args[1] in _SHAPE_ATTRIBUTES) or
        (u.op == "call_method" and u.target in _SHAPE_METHODS and u.args[0] is node))]


def single_tensor_arg(node: fx.Node) -> fx.Node | None:
    if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _layer_call(modules: dict, node) -> tuple[nn.Module, Layer] | None:
    if not isinstance(node, fx.Node) or node.op != "call_module" or node.target not in modules:
        return None
    module = modules[node.target]
    layer = module_layer(module)
    return None if layer is None else (module, layer)


def passes_input_on(modules: dict, node) -> bool:
    """An eval-mode call of torch's nn.Identity or Dropout: its output is its input."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or single_tensor_arg(node) is None:
        return False
    module = modules.get(node.target)
    return isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)) and not module.training and \
        getattr(type(module).forward, "__module__", "").startswith("torch.nn.") and not hook_reason(module)


def _plan_after(gm, modules, norm: _Norm) -> Plan | Refusal | None:
    source = norm.x
    while passes_input_on(modules, source) and len(value_users(source)) == 1:
        source = source.args[0]
    found = _layer_call(modules, source)
    if found is None:
        return None
    module, layer = found
    label = f"{type(module).__name__} '{source.target}'"
    hooked = hook_reason(module) or hook_reason(norm.module)
    if hooked:
        return Refusal("hooked", f"not folded into {label}: {hooked}")
    readers = value_users(source)
    if len(readers) != 1:
        return Refusal("output-read-elsewhere", f"the output of {label} is also used elsewhere "
                                                f"({len(readers)} users)")
    if len(source.args) != 1 or source.kwargs:
        return Refusal("extra-arguments", f"{label} is called with extra arguments")
    refusal = check_after(layer, norm.affine, _rank(source), label)
    if refusal:
        return refusal
    try:
        exact = exact_after(layer, norm.affine, modules.exact_of(module))
        weight, bias = to_torch(exact[0], layer.weight), to_torch(exact[1], layer.weight)
    except FoldRefused as exc:
        return refusal_of(exc, statistics=False)
    return Plan(norm.name, source.target, f"{layer.kind.name}-bn", source, weight, bias, bypass=norm.node,
                replacement=norm.x, remove=norm.nodes, exact=exact)


_FLATTEN_FUNCTIONS = (torch.flatten,)


def _is_channel_flatten(node: fx.Node, modules: dict) -> bool:
    """Flatten that keeps dimension 0 and flattens the rest with channels outermost."""
    if node.op == "call_module":
        module = modules.get(node.target)
        return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1
    start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else None)
    end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
    if node.op == "call_function" and node.target in _FLATTEN_FUNCTIONS:
        return start == 1 and end == -1
    if node.op == "call_method" and node.target == "flatten":
        return start == 1 and end == -1
    return False


def _plan_before(gm, modules, norm: _Norm) -> Plan | Refusal | None:
    node = norm.node
    readers = value_users(node)
    if not isinstance(norm.x, fx.Node) or len(readers) != 1:
        return None
    consumer = readers[0]
    via = None
    if _layer_call(modules, consumer) is None:
        if not _is_channel_flatten(consumer, modules) or len(consumer.users) != 1:
            return None
        via, consumer = consumer, next(iter(consumer.users))
        if _layer_call(modules, consumer) is None:
            return None
    module, layer = _layer_call(modules, consumer)
    if single_tensor_arg(consumer) is not (via if via is not None else node):
        return None
    label = f"{type(module).__name__} '{consumer.target}'"
    hooked = hook_reason(module) or hook_reason(norm.module)
    if hooked:
        return Refusal("hooked", f"not folded into {label}: {hooked}")
    scales = before_scales(layer, norm.affine, _rank(node), via is not None, label)
    if isinstance(scales, Refusal):
        return scales
    try:
        exact = exact_before(layer, *scales, modules.exact_of(module))
        weight, bias = to_torch(exact[0], layer.weight), to_torch(exact[1], layer.weight)
    except FoldRefused as exc:
        return refusal_of(exc, statistics=False)
    return Plan(norm.name, consumer.target, f"bn-{layer.kind.name}", consumer, weight, bias, bypass=node,
                replacement=norm.x, remove=norm.nodes, exact=exact)


def apply_plan(gm: fx.GraphModule, modules: "ModuleIndex", plan: Plan) -> Fold:
    """Write the plan's weights into the module its layer node calls (a copy of its own when the module is
    shared), route the bypassed output's readers to the replacement and remove the normalization's nodes."""
    into = plan.layer.target
    layer = _own_copy(gm, modules, plan.layer)
    with torch.no_grad():
        layer.weight.copy_(plan.weight)
        if layer.bias is None:
            layer.bias = nn.Parameter(plan.bias, requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(plan.bias)
    plan.bypass.replace_all_uses_with(plan.replacement)
    for node in plan.remove:
        if node.users:  # a constant the normalization computed may feed something else too
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        gm.graph.erase_node(node)
        if module is not None:
            modules.calls[id(module)] -= 1
            if modules.calls[id(module)] == 0:
                for name, m in list(modules.items()):
                    if m is module and name:
                        gm.delete_submodule(name)
                        del modules[name]
    if plan.exact is not None:
        from .merge import may_be_merged

        modules.set_exact(layer, *plan.exact, wanted=may_be_merged(gm, plan.layer))
    else:
        modules.exact.drop(layer.weight)  # its values changed
    return Fold(plan.bn, into, plan.rule)


def _drop_unread_attributes(gm: fx.GraphModule) -> None:
    """Remove get_attr nodes nobody reads (a folded functional batch norm's statistics) and the tensors they named
    from the GraphModule (its containers are its own: the user's modules are not touched)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name in [n for n, _ in gm.named_buffers()] + [n for n, _ in gm.named_parameters()]:
        owner_path, _, leaf = name.rpartition(".")
        parts = owner_path.split(".")
        if name in read or any(".".join(parts[:i]) in called for i in range(1, len(parts) + 1)):
            continue  # read by a get_attr, or a tensor of a module that is called
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if type(owner) is nn.Module or owner is gm:  # a container fx made, not a user module
            delattr(owner, leaf)
    gm.delete_all_unused_submodules()


# ---- fallback for modules neither torch.fx nor torch.export can trace ----------------------------------------

def fold_sequential(root: nn.Module, example_inputs, report: FoldReport) -> None:
    """Fold consecutive (linear layer, batch norm) children of plain nn.Sequential containers."""
    registrations: dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        registrations[id(m)] = registrations.get(id(m), 0) + 1
    ranks = _observed_ranks(root, example_inputs) if example_inputs is not None else {}
    all_norms = [(name, m) for name, m in root.named_modules() if module_affine(m) is not None]
    report.bn_before += len(all_norms)
    folded_ids = set()
    for seq_name, seq in list(root.named_modules()):
        if type(seq) is not nn.Sequential:
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            module, norm = seq._modules[first], seq._modules[second]
            layer = module_layer(module)
            affine = module_affine(norm)
            if layer is None or not isinstance(affine, Affine) or id(norm) in folded_ids:
                continue
            if registrations[id(module)] != 1 or registrations[id(norm)] != 1:
                continue  # registered twice: it may run elsewhere too
            observed = ranks.get(id(module))
            if observed is not None and len(observed) != 1:
                continue  # called with inputs of several ranks
            rank = next(iter(observed)) if observed else None
            if check_after(layer, affine, rank, "") or hook_reason(module) or hook_reason(norm):
                continue
            try:
                new_w, new_b = weights_after(layer, affine)
            except FoldRefused:
                continue
            with torch.no_grad():
                module.weight.copy_(new_w)
                if module.bias is None:
                    module.bias = nn.Parameter(new_b, requires_grad=module.weight.requires_grad)
                else:
                    module.bias.copy_(new_b)
            seq._modules[second] = nn.Identity().eval()
            folded_ids.add(id(norm))
            prefix = f"{seq_name}." if seq_name else ""
            report.folded.append(Fold(prefix + second, prefix + first, f"{layer.kind.name}-bn"))
    for name, m in all_norms:
        if id(m) not in folded_ids:
            affine = module_affine(m)
            refusal = affine if isinstance(affine, Refusal) else Refusal(
                "not-traced", "the module could not be traced, and this BatchNorm is not right after a "
                "Conv/ConvTranspose/Linear in an nn.Sequential whose ranks are proven (the only folds made "
                "without a trace)")
            report.skipped.append(Skip(name, refusal.reason, op_type=type(m).__name__, code=refusal.code))
    report.bn_after += len(all_norms) - len(folded_ids)


def _observed_ranks(root: nn.Module, example_inputs) -> dict[int, set[int]]:
    """Output ranks each linear layer produced while running the example inputs."""
    seen: dict[int, set[int]] = {}
    hooks = []
    for m in root.modules():
        if module_kind(m) is not None:
            hooks.append(m.register_forward_hook(
                lambda mod, args, out: seen.setdefault(id(mod), set()).add(out.dim())))
    try:
        with torch.no_grad():
            run_example(lambda: root(*example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return seen
