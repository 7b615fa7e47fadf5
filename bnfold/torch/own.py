"""The folded result as the user's own module: same class, same attribute names and methods, each folded batch norm
replaced by ``nn.Identity`` (or by what its module computes besides it: the activation of a ``BatchNormAct2d``),
the absorbing layers' weights updated. State dict keys then match a BN-less definition of the same network.

Every fold is first proven on the torch.fx trace (:func:`bnfold.torch.fold.fold_graph`); a fold is written into the
module only where the module's structure expresses it exactly:

* the absorbing layer is a module called once (a layer called at several sites would need a copy);
* the batch norm's module has no other computation left: a BatchNorm module (all its calls folded), or a module
  whose forward is the batch norm followed by parameter-free child modules (activation, dropout), which replace it.

A fold the module can not express is not made (Skip code ``needs-graph-module``), and the pass runs again without
it, so that what is written is exactly what the trace proved. The result is traced once more and checked: it runs
as many batch norms as the report says are left, and computes what the folded graph computes.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from ..report import FoldReport
from .fold import copy_module, fold_graph, fold_sequential, run_example, trace
from .ops import ExactWeights


def fold_own_class(module: nn.Module, example_inputs, *, inplace: bool, exact: dict | None = None
                   ) -> tuple[nn.Module, FoldReport]:
    """The folded module in its own class, and the report. ``exact``: a dict that receives the float64 (weight,
    bias) of the layers folded on the torch.fx trace, by module path (their weights are the cast of them), for the
    merges :func:`bnfold.torch.merge.write_merges` makes next."""
    keep: set[str] = set()
    while True:  # each round keeps more batch norms, of finitely many: in practice the second is the last
        trial = copy_module(module).eval()
        graph_module = trace(trial)
        if isinstance(graph_module, str):
            return _untraceable(module, example_inputs, inplace, graph_module)
        report, folded = FoldReport(), ExactWeights()
        fold_graph(graph_module, example_inputs, report, keep=frozenset(keep), own_class=True, exact=folded)
        replacements = {}
        problems = set()
        for fold in report.folded:
            if fold.bn in replacements:
                continue
            found = _replacement(trial, graph_module, fold.bn)
            if isinstance(found, nn.Module):
                replacements[fold.bn] = found
            else:
                problems.add(fold.bn)
        if not problems:
            break
        _keep_more(keep, problems)
    if exact is not None:
        exact.update(folded.by_path(trial))  # the same paths in the user's module when inplace
    target = module if inplace else trial
    if inplace:
        _copy_weights(trial, target, {f.into for f in report.folded})
    for name, replacement in replacements.items():
        set_submodule(target, name, replacement)
    target.eval()
    _prove(target, graph_module, example_inputs, report)
    return target, report


def _keep_more(keep: set[str], problems: set[str]) -> None:
    if problems <= keep:  # a kept batch norm was folded anyway: a bnfold bug, not a loop to spin in
        raise RuntimeError(f"bnfold: batch norms {sorted(problems)} were folded although kept")
    keep |= problems


def _untraceable(module, example_inputs, inplace: bool, why: str):
    failure = "no example_inputs were given for torch.export"
    if example_inputs is not None:
        result = _from_aten_graph(module, example_inputs, inplace)
        if not isinstance(result, str):
            result[1].notes.insert(0, f"torch.fx could not trace the module ({why}); the folds were proven on "
                                      "torch.export's ATen graph")
            return result
        failure = result
    work = module if inplace else copy_module(module)
    work.eval()
    report = FoldReport()
    report.notes.append(f"torch.fx could not trace the module ({why}) and {failure}: folded consecutive children "
                        "of nn.Sequential containers only")
    fold_sequential(work, example_inputs, report)
    return work, report


def _from_aten_graph(module: nn.Module, example_inputs, inplace: bool):
    """The own-class result from folds proven on torch.export's ATen graph, or why there is none."""
    from .export import fold_module_exported

    keep: set[str] = set()
    while True:
        trial = copy_module(module).eval()
        report, applied = FoldReport(), []
        graph_module = fold_module_exported(trial, example_inputs, report, keep=frozenset(keep), applied=applied)
        if graph_module is None:
            return "torch.export could not trace it either"
        report.notes = [n for n in report.notes if not n.startswith("the result is torch.export's module")]
        layers, replacements, problems = {}, {}, set()
        reads_bias = _layers_reading_bias(trial, [plan.into for plan in applied], example_inputs)
        for plan in applied:
            layer = _aten_layer_target(trial, graph_module, plan, reads_bias)
            found = _aten_replacement(trial, graph_module, plan.bn, report)
            if isinstance(layer, str) or isinstance(found, str):
                problems.add(plan.bn)
            else:
                layers[plan.into] = layer
                replacements[plan.bn] = found
        if not problems:
            break
        _keep_more(keep, problems)
    target = module if inplace else trial
    with torch.no_grad():
        for name, (weight, bias) in layers.items():
            layer = target.get_submodule(name)
            layer.weight.copy_(weight)
            if layer.bias is None:
                layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=layer.weight.requires_grad)
            else:
                layer.bias.copy_(bias)
    for name, replacement in replacements.items():
        set_submodule(target, name, replacement)
    target.eval()
    if not same_outputs(target, graph_module, example_inputs):
        raise RuntimeError("bnfold: the module written in its own class does not compute what the folded ATen "
                           "graph computes")
    return target, report


def _layers_reading_bias(root: nn.Module, names: list[str], example_inputs) -> set[str]:
    """Which bias-less layers among ``names`` run a forward of their own (timm's Conv2dSame) that adds ``self.bias``
    once it is set: each is run on the input it got from the example, with a zero and a unit bias."""
    from .fold import runs_torch_forward

    candidates = {}
    for name in set(names):
        try:
            layer = root.get_submodule(name)
        except AttributeError:
            continue
        if getattr(layer, "bias", 0) is None and not runs_torch_forward(layer):
            candidates[name] = layer
    seen: dict[str, tuple] = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, args))
             for name, layer in candidates.items()]
    try:
        with torch.no_grad():
            run_example(lambda: root(*example_inputs))
    finally:
        for hook in hooks:
            hook.remove()
    reading = set()
    for name, args in seen.items():
        probe = copy.deepcopy(candidates[name])
        out_channels = probe.weight.shape[1] * probe.groups if probe.transposed else probe.weight.shape[0] \
            if hasattr(probe, "transposed") else probe.weight.shape[0]
        probe.bias = nn.Parameter(torch.zeros(out_channels, dtype=probe.weight.dtype, device=probe.weight.device))
        try:
            with torch.no_grad():
                without = probe(*args)
                probe.bias.fill_(1)
                delta = probe(*args) - without
        except Exception:
            continue
        if isinstance(delta, torch.Tensor) and torch.allclose(delta, torch.ones_like(delta), atol=1e-3):
            reading.add(name)
    return reading


def _aten_layer_target(root: nn.Module, gm: fx.GraphModule, plan, reads_bias: set[str]
                       ) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The folded (weight, bias) for the user's layer module ``plan.into``, or why the fold is not its own."""
    from .fold import module_kind, runs_torch_forward

    try:
        layer = root.get_submodule(plan.into)
    except AttributeError:
        return f"no module named '{plan.into}'"
    call = plan.layer
    targets = [getattr(a, "target", None) for a in call.args[1:3]]
    if module_kind(layer) is None or targets != [f"{plan.into}.weight", f"{plan.into}.bias"]:
        return f"'{plan.into}' does not run this call with its own weight and bias"
    if layer.bias is None and not runs_torch_forward(layer) and plan.into not in reads_bias:
        return f"'{plan.into}' has no bias, and its own forward may not read one"
    owner = gm.get_submodule(plan.into)
    return owner.weight, owner.bias


_SHAPE_ONLY = ("sym_size", "sym_numel", "sym_stride", "_assert_scalar", "sym_constrain_range",
               "sym_constrain_range_for_size", "_assert_tensor_metadata")


def _aten_replacement(root: nn.Module, gm: fx.GraphModule, name: str, report: FoldReport) -> nn.Module | str:
    """What replaces batch norm module ``name`` after its folds on the ATen graph, or why nothing can."""
    from .fold import is_frozen_batchnorm, module_affine, runs_torch_forward

    original = _registered_once(root, name)
    if isinstance(original, str):
        return original
    if any(s.bn == name for s in report.skipped):
        return f"'{name}' is also called where it is not folded"
    if module_affine(original) is not None and (runs_torch_forward(original) or is_frozen_batchnorm(original)):
        return nn.Identity()  # a BatchNorm or frozen batch norm: the batch norm was all it computed
    children: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0] in _SHAPE_ONLY:
            continue
        paths = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values() if isinstance(v, tuple) and v]
        if name not in paths:
            continue
        inner = paths[-1]
        if inner == name or not inner.startswith(name + "."):
            if isinstance(node.target, torch._ops.OpOverload):
                return f"'{name}' computes more than the batch norm and child modules"
            continue  # Python arithmetic on sizes
        child = name + "." + inner[len(name) + 1:].split(".")[0]
        if child not in children:
            children.append(child)
    modules = []
    for child in children:
        module = root.get_submodule(child)
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            return f"'{name}' calls '{child}', which has weights of its own"
        if not isinstance(module, nn.Identity):
            modules.append(module)
    if not modules:
        return nn.Identity()
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


def same_outputs(module: nn.Module, graph_module: nn.Module, example_inputs) -> bool:
    outputs = []
    for candidate in (module, graph_module):
        with torch.no_grad():
            run_example(lambda: outputs.append(candidate(*example_inputs)))
    mine, graph = (torch.cat([t.detach().double().flatten() for t in _tensors(o)]) for o in outputs)
    scale = max(graph.abs().max().item() if graph.numel() else 0.0, 1e-30)
    return mine.shape == graph.shape and (mine - graph).abs().max().item() <= 1e-5 * scale


def _owner_nodes(gm: fx.GraphModule, owner: str) -> list[fx.Node]:
    """The nodes left in the graph that ``owner``'s forward made (get_attr excluded)."""
    nodes = []
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        owners = {value[0] for value in stack.values() if isinstance(value, tuple) and value}
        if node.op not in ("get_attr", "placeholder", "output") and owner in owners:
            nodes.append(node)
    return nodes


def _without_checks(nodes: list[fx.Node]) -> list[fx.Node]:
    """Drop ``torch._assert`` input checks, unread values and what only feeds them (timm asserts the input
    rank)."""
    dropped = {n for n in nodes if (n.op == "call_function" and n.target is torch._assert) or
               (n.op in ("call_function", "call_method") and not n.users)}  # unread (a message's formatting)
    changed = True
    while changed:
        changed = False
        for n in nodes:
            if n not in dropped and n.users and all(u in dropped for u in n.users):
                dropped.add(n)
                changed = True
    return [n for n in nodes if n not in dropped]


def _registered_once(root: nn.Module, name: str) -> nn.Module | str:
    """The submodule ``name`` if the user's module registers it under that one name only, or why not: a module
    registered twice would be replaced at both places."""
    try:
        module = root.get_submodule(name)
    except AttributeError:
        return f"no module named '{name}' computes it"
    if sum(m is module for _, m in root.named_modules(remove_duplicate=False)) != 1:
        return f"'{name}' is registered under several names"
    return module


def _replacement(root: nn.Module, gm: fx.GraphModule, name: str) -> nn.Module | str:
    """What replaces batch norm ``name`` in the user's module, or why nothing can."""
    original = _registered_once(root, name)
    if isinstance(original, str):
        return original
    remaining = _without_checks(_owner_nodes(gm, name))
    if any(n.op == "call_module" and n.target == name for n in remaining):
        return f"'{name}' is also called where it is not folded"
    chain = []
    for node in remaining:
        if node.op != "call_module" or not str(node.target).startswith(name + "."):
            return f"'{name}' computes more than the batch norm and child modules"
        child = root.get_submodule(node.target)
        if any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
            return f"'{name}' calls '{node.target}', which has weights of its own"
        if chain and (len(node.args) != 1 or node.args[0] is not chain[-1][0] or node.kwargs):
            return f"'{name}' does not call its child modules one after the other"
        chain.append((node, child))
    if len(chain) > 1 and any(len(n.users) != 1 for n, _ in chain[:-1]):
        return f"the output of a child module of '{name}' is read elsewhere"
    modules = [child for _, child in chain if not isinstance(child, nn.Identity)]
    if not modules:
        return nn.Identity()
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    setattr(owner, leaf, module)


def _copy_weights(source: nn.Module, target: nn.Module, names: set[str]) -> None:
    """Folded weights and biases of ``names`` from the worked-on copy into the user's module."""
    with torch.no_grad():
        for name in sorted(names):
            src, dst = source.get_submodule(name), target.get_submodule(name)
            dst.weight.copy_(src.weight)
            if dst.bias is None:
                dst.bias = nn.Parameter(src.bias.detach().clone(), requires_grad=dst.weight.requires_grad)
            else:
                dst.bias.copy_(src.bias)


def _prove(module: nn.Module, graph_module: fx.GraphModule, example_inputs, report: FoldReport) -> None:
    """The module as written runs as many batch norms as the report leaves and computes what the folded graph
    computes; anything else is a bnfold bug."""
    from .fold import count_normalizations

    retraced = trace(module)
    left = count_normalizations(retraced) if not isinstance(retraced, str) else None
    if left != report.bn_after:
        raise RuntimeError(f"bnfold: the module written in its own class runs {left} batch norms, the folded "
                           f"graph {report.bn_after}")
    if example_inputs is not None and not same_outputs(module, graph_module, example_inputs):
        raise RuntimeError("bnfold: the module written in its own class does not compute what the folded graph "
                           "computes")


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []
