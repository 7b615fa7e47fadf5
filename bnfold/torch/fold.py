"""Fold BatchNorm layers of a PyTorch module into the Conv/ConvTranspose/Linear layers next to them.

The math is bnfold.affine's (float64, cast once); this module only finds folds that are provably exact:

* by data flow, on a torch.fx graph: the linear layer's output goes to the BatchNorm and nowhere else; a layer
  called at several places is copied for the call site that folds, so every other call keeps its weights;
* by axis: BatchNorm normalizes dimension 1, which must be the dimension the layer writes (Conv: always when the
  input is batched; Linear: only for rank-2 tensors). Ranks come from ``example_inputs`` (shape propagation) or
  from what the BatchNorm type forces; when neither proves it, the fold is refused with the reason;
* when torch.fx can not trace the module, only consecutive children of plain ``nn.Sequential`` containers fold
  (their forward feeds each child into the next), and the report says so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..affine import FoldRefused, absorb_after, absorb_before, bn_to_affine, cast_checked
from ..errors import InputError, first_line
from ..report import Fold, FoldReport, Skip

_CONV = nn.modules.conv._ConvNd
_BATCHNORM = nn.modules.batchnorm._BatchNorm
# Ranks of input each BatchNorm class accepts (None: any rank >= 2).
_ACCEPTED_RANKS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


def fold_module(module: nn.Module, example_inputs=None, *, inplace: bool = False,
                allow_train: bool = False) -> tuple[nn.Module, FoldReport]:
    """Fold every BatchNorm that folds exactly; return ``(eval-mode module, FoldReport)``.

    ``example_inputs``: a tensor or a tuple of positional arguments; it lets bnfold prove tensor ranks (needed for
    Linear/BatchNorm1d folds). The input module is not modified unless ``inplace=True``. A module in training
    mode is an error unless ``allow_train=True``, which folds an eval-mode copy. Prints nothing.
    """
    if not isinstance(module, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if any(m.training for m in module.modules()):
        if not allow_train:
            raise InputError("the module is in training mode (BatchNorm would use batch statistics): call .eval() "
                             "first, or pass allow_train=True to fold an eval-mode copy")
        inplace = False
    try:
        work = module if inplace else copy.deepcopy(module)
    except Exception as exc:  # e.g. legacy weight_norm tensors refuse deepcopy
        raise InputError(f"the module can not be copied ({first_line(exc, max_chars=160)}); pass inplace=True to fold "
                         "it in place") from None
    work.eval()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    report = FoldReport()
    try:
        graph_module = fx.GraphModule(work, _Tracer().trace(work), work.__class__.__name__)
    except Exception as exc:  # data-dependent control flow, untraceable calls
        report.notes.append(f"torch.fx could not trace the module ({type(exc).__name__}: "
                            f"{first_line(exc, max_chars=200)}); "
                            "folded consecutive children of nn.Sequential containers only")
        _fold_sequential(work, example_inputs, report)
        return work, report
    graph_module.eval()
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            _run_example(lambda: ShapeProp(graph_module).propagate(*example_inputs))
    _fold_graph(graph_module, report)
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module, report


def _run_example(run) -> None:
    """Run the example inputs through the module; inputs it can not take are the caller's error."""
    try:
        run()
    except Exception as exc:
        cause = exc.__cause__ or exc  # ShapeProp wraps the module's own error
        raise InputError(f"example_inputs do not run through the module ({type(cause).__name__}: "
                         f"{first_line(str(cause), max_chars=200)})") from None


# ---- normalizations -----------------------------------------------------------------------------------------

@dataclass
class _Affine:
    """A BatchNorm-like module as ``y = s*x + t`` on dimension 1 (float64 numpy)."""

    s: np.ndarray
    t: np.ndarray
    ranks: tuple[int, ...] | None  # input ranks the module accepts (None: any)


def _is_frozen_batchnorm(module: nn.Module) -> bool:
    """Structure of torchvision's FrozenBatchNorm2d and its kin: four 1-D buffers, no parameters, an ``eps``."""
    if isinstance(module, _BATCHNORM) or any(True for _ in module.parameters(recurse=False)):
        return False
    buffers = dict(module.named_buffers(recurse=False))
    names = ("weight", "bias", "running_mean", "running_var")
    if not all(n in buffers and buffers[n] is not None and buffers[n].dim() == 1 for n in names):
        return False
    return len({buffers[n].shape[0] for n in names}) == 1 and isinstance(getattr(module, "eps", None), float)


def _as_affine(module: nn.Module) -> _Affine | str | None:
    """The module as a per-channel affine, a reason it is a BatchNorm that can not be one, or None."""
    if isinstance(module, _BATCHNORM):
        if not module.track_running_stats or module.running_mean is None or module.running_var is None:
            return "track_running_stats=False: it normalizes by the statistics of each batch, even at inference"
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            return "lazy BatchNorm that was never initialized"
        mean, var = module.running_mean, module.running_var
        scale = module.weight if module.affine else torch.ones_like(mean)
        bias = module.bias if module.affine else torch.zeros_like(mean)
        ranks = next((r for cls, r in _ACCEPTED_RANKS.items() if type(module) is cls), None)
        return _affine(scale, bias, mean, var, module.eps, ranks)
    if _is_frozen_batchnorm(module):
        affine = _affine(module.weight, module.bias, module.running_mean, module.running_var, module.eps, None)
        if isinstance(affine, _Affine) and not _behaves_like(module, affine):
            return None  # looks like a frozen BatchNorm but computes something else: not ours to fold
        return affine
    return None


def _affine(scale, bias, mean, var, eps: float, ranks) -> _Affine | str:
    try:
        s, t = bn_to_affine(*(_numpy64(p) for p in (scale, bias, mean, var)), eps)
    except FoldRefused as exc:
        return str(exc)
    return _Affine(s, t, ranks)


def _behaves_like(module: nn.Module, affine: _Affine) -> bool:
    """Check a structurally recognised frozen BatchNorm on a probe input: it must compute s*x + t on dim 1."""
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


class _Tracer(fx.Tracer):
    """Keeps frozen BatchNorm modules as single calls, like torch's own BatchNorm."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or _is_frozen_batchnorm(m)


# ---- linear layers ---------------------------------------------------------------------------------------------

def _linear_kind(module: nn.Module) -> str | None:
    if isinstance(module, _CONV):
        return "convtranspose" if module.transposed else "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _numpy64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def _numpy_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return torch.empty((), dtype=dtype).numpy().dtype


def _to_torch(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """float64 results rounded once to ``like``'s dtype (overflow refused), on its device."""
    rounded = cast_checked(values, _numpy_dtype(like.dtype))
    exact = rounded.astype(np.float32) if like.dtype == torch.bfloat16 else rounded  # every bf16 is a float32
    return torch.from_numpy(np.ascontiguousarray(exact)).to(device=like.device, dtype=like.dtype)


def _plan_after(layer: nn.Module, kind: str, affine: _Affine):
    """New (weight, bias) tensors for ``affine`` applied to the layer's output."""
    weight = layer.weight
    groups = layer.groups if kind == "convtranspose" else 1
    axis = 1 if kind == "convtranspose" else 0
    bias = None if layer.bias is None else _numpy64(layer.bias)
    new_w, new_b = absorb_after(_numpy64(weight), bias, affine.s, affine.t, axis=axis, groups=groups)
    return _to_torch(new_w, weight), _to_torch(new_b, weight)


def _plan_before(layer: nn.Module, kind: str, s: np.ndarray, t: np.ndarray):
    """New (weight, bias) tensors for ``s*x + t`` applied to the layer's input (exact only without padding)."""
    weight = layer.weight
    groups = layer.groups if kind == "conv" else 1
    bias = None if layer.bias is None else _numpy64(layer.bias)
    new_w, new_b = absorb_before(_numpy64(weight), bias, s, t, in_axis=1, out_axis=0, groups=groups)
    return _to_torch(new_w, weight), _to_torch(new_b, weight)


def _write(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is None:
            layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(bias)


def _out_channels(layer: nn.Module, kind: str) -> int:
    return layer.out_features if kind == "linear" else layer.out_channels


def _in_channels(layer: nn.Module, kind: str) -> int:
    return layer.in_features if kind == "linear" else layer.in_channels


def _pads(layer: nn.Module) -> bool:
    if isinstance(layer.padding, str):  # "valid" pads nothing, "same" pads unless every kernel size is 1
        return layer.padding == "same" and any(k != 1 for k in layer.kernel_size)
    return any(p != 0 for p in layer.padding)


# ---- the fx pass -------------------------------------------------------------------------------------------------

def _fold_graph(gm: fx.GraphModule, report: FoldReport) -> None:
    modules = dict(gm.named_modules())
    normalizations = [n for n in gm.graph.nodes if n.op == "call_module" and _as_affine(modules[n.target]) is not None]
    report.bn_before += len(normalizations)
    while True:
        changed, skipped = False, []
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or node.target not in modules:
                continue
            affine = _as_affine(modules[node.target])
            if affine is None:
                continue
            bn_name = node.target
            if isinstance(affine, str):
                skipped.append(Skip(bn_name, affine, op_type=type(modules[bn_name]).__name__))
                continue
            outcome = _fold_after(gm, modules, node, affine)
            if not isinstance(outcome, Fold):
                before = _fold_before(gm, modules, node, affine)
                outcome = before if isinstance(before, Fold) else "; ".join(r for r in (outcome, before) if r) or (
                    "no Conv/ConvTranspose/Linear next to it whose output (or input) it alone reads")
            if isinstance(outcome, Fold):
                report.folded.append(outcome)
                changed = True
                modules = dict(gm.named_modules())
            else:
                skipped.append(Skip(bn_name, outcome, op_type=type(modules[bn_name]).__name__))
        if not changed:
            break
    report.skipped.extend(skipped)
    report.bn_after += len(skipped)


def _call_sites(gm: fx.GraphModule, modules: dict, layer: nn.Module) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and modules.get(n.target) is layer)


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else len(shape)


def _hooked(module: nn.Module) -> str:
    """Why the module's call is more than its forward (hooks, weight parametrizations), or ''."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        return "its weight is computed by a parametrization"
    if module._forward_pre_hooks or module._forward_hooks or getattr(module, "_forward_hooks_with_kwargs", None):
        return "it has forward hooks (e.g. legacy weight_norm) that would see different values"
    return ""


def _shared_elsewhere(gm: fx.GraphModule, modules: dict, node: fx.Node, layer: nn.Module) -> bool:
    """Whether anything but this call site runs the layer or reads its tensors."""
    if _call_sites(gm, modules, layer) != 1:
        return True
    if sum(m is layer for _, m in gm.named_modules(remove_duplicate=False)) != 1:
        return True
    own = {id(p) for p in layer.parameters(recurse=False)}
    if sum(id(p) in own for _, p in gm.named_parameters(remove_duplicate=False)) != len(own):
        return True  # a parameter tied to another module
    prefix = f"{node.target}."
    return any(n.op == "get_attr" and str(n.target).startswith(prefix) for n in gm.graph.nodes)


def _own_copy(gm: fx.GraphModule, modules: dict, node: fx.Node) -> nn.Module:
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
    return copied


def _remove_call(gm: fx.GraphModule, modules: dict, node: fx.Node, replacement: fx.Node) -> None:
    bn = modules[node.target]
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)
    if _call_sites(gm, modules, bn) == 0:
        gm.delete_submodule(node.target)


def _single_tensor_arg(node: fx.Node) -> fx.Node | None:
    if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _fold_after(gm, modules, node: fx.Node, affine: _Affine) -> Fold | str:
    source = _single_tensor_arg(node)
    if source is None or source.op != "call_module" or source.target not in modules:
        return ""
    layer = modules[source.target]
    kind = _linear_kind(layer)
    if kind is None:
        return ""
    label = f"{type(layer).__name__} '{source.target}'"
    hooked = _hooked(layer) or _hooked(modules[node.target])
    if hooked:
        return f"not folded into {label}: {hooked}"
    if len(source.users) != 1:
        return f"the output of {label} is also used elsewhere ({len(source.users)} users)"
    if len(source.args) != 1 or source.kwargs:
        return f"{label} is called with extra arguments"
    if _out_channels(layer, kind) != affine.s.shape[0]:
        return f"{label} writes {_out_channels(layer, kind)} channels, the BatchNorm has {affine.s.shape[0]}"
    reason = _prove_channel_axis(layer, kind, _rank(source), affine)
    if reason:
        return reason
    return _commit(gm, modules, node, source, lambda: _plan_after(layer, kind, affine), source, f"{kind}-bn")


def _prove_channel_axis(layer, kind: str, rank: int | None, affine: _Affine) -> str:
    """'' when dimension 1 of the layer's output (of ``rank``, None if unknown) is the dimension it writes its
    channels to."""
    if kind == "linear":  # Linear writes the last dimension: that is dimension 1 only for rank 2
        if rank == 2:
            return ""
        if rank is None:
            return "can not prove the Linear output is rank 2 (pass example_inputs)"
        return f"the BatchNorm normalizes dimension 1 of a rank-{rank} tensor, the Linear writes the last one"
    batched = layer.weight.dim()  # conv output rank with a batch dimension
    if rank is not None:
        return "" if rank == batched else "unbatched convolution: its channels are dimension 0"
    if affine.ranks is not None and batched - 1 not in affine.ranks:
        return ""  # the BatchNorm would reject the unbatched rank, so the input is batched
    return f"can not prove the {type(layer).__name__} input is batched (pass example_inputs)"


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


def _fold_before(gm, modules, node: fx.Node, affine: _Affine) -> Fold | str:
    source = _single_tensor_arg(node)
    if source is None or len(node.users) != 1:
        return ""
    consumer = next(iter(node.users))
    via = None
    if consumer.op != "call_module" or _linear_kind(modules.get(consumer.target)) is None:
        if not _is_channel_flatten(consumer, modules) or len(consumer.users) != 1:
            return ""
        via, consumer = consumer, next(iter(consumer.users))
        if consumer.op != "call_module" or not isinstance(modules.get(consumer.target), nn.Linear):
            return ""
    layer = modules[consumer.target]
    kind = _linear_kind(layer)
    reads = via if via is not None else node
    if kind == "convtranspose" or _single_tensor_arg(consumer) is not reads:
        return ""
    label = f"{type(layer).__name__} '{consumer.target}'"
    hooked = _hooked(layer) or _hooked(modules[node.target])
    if hooked:
        return f"not folded into {label}: {hooked}"
    s, t = affine.s, affine.t
    if kind == "conv":
        if _pads(layer):
            return (f"{label} pads its input (padding={layer.padding}, padding_mode='{layer.padding_mode}'): "
                    "the shift would not reach the padded border")
        if _in_channels(layer, kind) != s.shape[0]:
            return f"{label} reads {_in_channels(layer, kind)} channels, the BatchNorm has {s.shape[0]}"
    else:
        if via is None:
            rank = _rank(node)
            if rank is None:
                return f"can not prove the input of {label} is rank 2 (pass example_inputs)"
            if rank != 2:
                return f"{label} contracts the last dimension of a rank-{rank} tensor, not the BatchNorm's"
        features = layer.in_features
        if features % s.shape[0]:
            return f"{label} reads {features} features, not a multiple of {s.shape[0]} channels"
        s, t = np.repeat(s, features // s.shape[0]), np.repeat(t, features // s.shape[0])
    return _commit(gm, modules, node, consumer, lambda: _plan_before(layer, kind, s, t), source, f"bn-{kind}")


def _commit(gm, modules, bn: fx.Node, call: fx.Node, plan, replacement: fx.Node, rule: str) -> Fold | str:
    """Do the math (a refusal leaves the graph as it was), then write the layer this call runs and drop the BN."""
    try:
        new_w, new_b = plan()
    except FoldRefused as exc:
        return str(exc)
    into, bn_name = call.target, bn.target
    _write(_own_copy(gm, modules, call), new_w, new_b)
    _remove_call(gm, modules, bn, replacement)
    return Fold(bn_name, into, rule)


# ---- fallback for modules torch.fx can not trace ---------------------------------------------------------------

def _fold_sequential(root: nn.Module, example_inputs, report: FoldReport) -> None:
    """Fold consecutive (linear layer, BatchNorm) children of plain nn.Sequential containers."""
    registrations: dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        registrations[id(m)] = registrations.get(id(m), 0) + 1
    ranks = _observed_ranks(root, example_inputs) if example_inputs is not None else {}
    all_norms = [(name, m) for name, m in root.named_modules() if _as_affine(m) is not None]
    report.bn_before += len(all_norms)
    folded_ids = set()
    for seq_name, seq in list(root.named_modules()):
        if type(seq) is not nn.Sequential:
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            layer, norm = seq._modules[first], seq._modules[second]
            kind = _linear_kind(layer)
            affine = _as_affine(norm)
            if kind is None or not isinstance(affine, _Affine) or id(norm) in folded_ids:
                continue
            if registrations[id(layer)] != 1 or registrations[id(norm)] != 1:
                continue  # registered twice: it may run elsewhere too
            if _out_channels(layer, kind) != affine.s.shape[0]:
                continue
            observed = ranks.get(id(layer))
            if observed is not None and len(observed) != 1:
                continue  # called with inputs of several ranks
            rank = next(iter(observed)) if observed else None
            reason = _prove_channel_axis(layer, kind, rank, affine)
            if reason:
                continue
            try:
                new_w, new_b = _plan_after(layer, kind, affine)
            except FoldRefused:
                continue
            _write(layer, new_w, new_b)
            seq._modules[second] = nn.Identity().eval()
            folded_ids.add(id(norm))
            prefix = f"{seq_name}." if seq_name else ""
            report.folded.append(Fold(prefix + second, prefix + first, f"{kind}-bn"))
    for name, m in all_norms:
        if id(m) not in folded_ids:
            reason = _as_affine(m)
            report.skipped.append(Skip(name, reason if isinstance(reason, str) else
                                       "torch.fx could not trace the module, and this BatchNorm is not right after a "
                                       "Conv/ConvTranspose/Linear in an nn.Sequential whose ranks are proven (the "
                                       "only folds made without a trace)", op_type=type(m).__name__))
    report.bn_after += len(all_norms) - len(folded_ids)


def _observed_ranks(root: nn.Module, example_inputs) -> dict[int, set[int]]:
    """Output ranks each linear layer produced while running the example inputs."""
    seen: dict[int, set[int]] = {}
    hooks = []
    for m in root.modules():
        if _linear_kind(m) is not None:
            hooks.append(m.register_forward_hook(
                lambda mod, args, out: seen.setdefault(id(mod), set()).add(out.dim())))
    try:
        with torch.no_grad():
            _run_example(lambda: root(*example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return seen
