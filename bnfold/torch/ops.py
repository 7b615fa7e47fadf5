"""What the PyTorch side knows about linear ops and normalizations, shared by the torch.fx front end
(:mod:`bnfold.torch.fold`) and the ATen one (:mod:`bnfold.torch.export`).

* ``Layer``: a Conv/ConvTranspose/Linear call as the fold math sees it (weight, bias, groups, padding), built from
  an ``nn.Module`` (:func:`module_layer`) or from an ATen call of an exported graph (:func:`aten_layer`). Which
  weight axis holds the output and the input channels is one descriptor per kind (``KINDS``).
* ``Affine``: a batch norm as ``y = s*x + t`` on dimension 1, in float64.
* ``Plan``: one fold as data: new weight and bias for the layer, which normalization output to bypass and what it
  is replaced with. The fx and ATen passes each have one ``apply`` for it; anything that can compute a plan (a
  branch merge, say) can hand one to them.
* ``Refusal``: why a fold is not made, with a stable kebab-case ``code`` (listed in the README).
* ``frozen_affine``: a frozen batch norm traced through, found as ``x * scale + shift`` on either graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..affine import FoldRefused, absorb_after, absorb_before, bn_to_affine, cast_checked

# ---- refusals -------------------------------------------------------------------------------------------------

# Every reason code the PyTorch side gives a Skip, with what it means (the README lists the same).
SKIP_CODES = {
    "training-mode": "the normalization uses batch statistics (training=True)",
    "batch-statistics": "track_running_stats=False: it normalizes by each batch's statistics even in eval mode",
    "uninitialized": "a lazy BatchNorm that never ran",
    "non-constant": "statistics, scale, shift or the layer's weights are computed, not parameters or buffers",
    "invalid-statistics": "NaN/inf parameters, negative variance or var + eps <= 0",
    "overflow": "the folded weights would overflow the model's dtype",
    "no-linear-neighbour": "no Conv/ConvTranspose/Linear writes its input or reads its output alone",
    "output-read-elsewhere": "the layer's output (or the normalization's) has other readers",
    "padding-reads-zero": "the next convolution pads its input: the shift would not reach the border",
    "channel-mismatch": "the layer's channel count differs from the normalization's",
    "wrong-axis": "the layer writes (or reads) another dimension than the one normalized",
    "rank-unknown": "the tensor rank is not proven (pass example_inputs)",
    "hooked": "a forward hook or a weight parametrization sees the layer's call",
    "extra-arguments": "the layer is called with arguments the fold can not account for",
    "not-traced": "neither torch.fx nor torch.export could trace the forward; only nn.Sequential pairs fold",
    "statistics-read": "the saved mean/variance outputs of the batch-norm call are used",
    "needs-graph-module": "the fold is proven on the trace but can not be written into the user's own module",
    # branch merges (bnfold.torch.merge): Skips with op_type "merge", named after the branches
    "merge-refused": "the summed branches are not one convolution exactly (kernels, pads, strides, dilations, "
                     "channels or ranks do not line up, or torch can not pad the result that way)",
    "merge-costlier": "the merged convolution would cost more multiply-adds than the branches (e.g. a dense 1x1 "
                      "summed with a depthwise 3x3)",
}


@dataclass(frozen=True)
class Refusal:
    """A fold not made: ``code`` (one of SKIP_CODES) and a sentence for people."""

    code: str
    reason: str

    def __post_init__(self):
        assert self.code in SKIP_CODES, self.code

    def __bool__(self) -> bool:
        return bool(self.reason)


NO_NEIGHBOUR = Refusal("no-linear-neighbour",
                       "no Conv/ConvTranspose/Linear next to it whose output (or input) it alone reads")


def first_refusal(*refusals: Refusal | None) -> Refusal:
    """The most specific of several attempts' refusals (their reasons joined), or NO_NEIGHBOUR."""
    real = [r for r in refusals if r]
    if not real:
        return NO_NEIGHBOUR
    return Refusal(real[0].code, "; ".join(r.reason for r in real))


def refusal_of(exc: FoldRefused, *, statistics: bool) -> Refusal:
    return Refusal("invalid-statistics" if statistics else "overflow", str(exc))


# ---- normalizations -------------------------------------------------------------------------------------------

@dataclass
class Affine:
    """A batch norm as ``y = s*x + t`` on dimension 1 (float64 numpy)."""

    s: np.ndarray
    t: np.ndarray
    ranks: tuple[int, ...] | None  # input ranks the normalization accepts (None: any)


def numpy64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def affine_from_stats(scale, bias, mean, var, eps: float, ranks=None) -> Affine | Refusal:
    """Inference batch norm parameters (tensors; scale/bias None for ones/zeros) as an Affine, or why not."""
    scale = torch.ones_like(mean) if scale is None else scale
    bias = torch.zeros_like(mean) if bias is None else bias
    try:
        s, t = bn_to_affine(*(numpy64(p) for p in (scale, bias, mean, var)), eps)
    except FoldRefused as exc:
        return refusal_of(exc, statistics=True)
    return Affine(s, t, ranks)


# ---- linear layers --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """Where a linear op keeps its channels: ``out_axis``/``in_axis`` of the weight, whether ``groups`` split the
    axis absorb_after (ConvTranspose) or absorb_before (Conv) scales, and whether its input may be zero-padded."""

    name: str
    out_axis: int
    in_axis: int
    groups_after: bool
    groups_before: bool
    pads: bool


KINDS = {
    "conv": Kind("conv", out_axis=0, in_axis=1, groups_after=False, groups_before=True, pads=True),
    "convtranspose": Kind("convtranspose", out_axis=1, in_axis=0, groups_after=True, groups_before=False,
                          pads=True),
    "linear": Kind("linear", out_axis=0, in_axis=1, groups_after=False, groups_before=False, pads=False),
}


@dataclass
class Layer:
    """A Conv/ConvTranspose/Linear call as the fold math reads it."""

    kind: Kind
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int = 1
    padding: tuple | str = (0,)
    padding_mode: str = "zeros"

    @property
    def out_channels(self) -> int:
        if self.kind.name == "convtranspose":
            return self.weight.shape[1] * self.groups
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        if self.kind.name == "conv":
            return self.weight.shape[1] * self.groups
        return self.weight.shape[self.kind.in_axis]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    def pads_input(self) -> bool:
        """Whether the layer reads values that are not its input (zero, reflected, ... padding)."""
        if not self.kind.pads:
            return False
        if isinstance(self.padding, str):  # "valid" pads nothing, "same" pads unless every kernel size is 1
            return self.padding == "same" and any(k != 1 for k in self.kernel_size)
        return any(p != 0 for p in self.padding)


def module_kind(module) -> Kind | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return KINDS["convtranspose" if module.transposed else "conv"]
    if isinstance(module, nn.Linear):
        return KINDS["linear"]
    return None


def module_layer(module: nn.Module) -> Layer | None:
    kind = module_kind(module)
    if kind is None:
        return None
    padding = getattr(module, "padding", (0,))
    return Layer(kind, module.weight, module.bias, getattr(module, "groups", 1),
                 padding if isinstance(padding, str) else tuple(padding), getattr(module, "padding_mode", "zeros"))


# ATen calls that are linear layers: (kind, index of padding, index of groups, index of `transposed` or None).
_aten = torch.ops.aten
ATEN_LINEAR = {
    _aten.linear.default: ("linear", None, None, None),
    _aten.conv1d.default: ("conv", 4, 6, None),
    _aten.conv2d.default: ("conv", 4, 6, None),
    _aten.conv3d.default: ("conv", 4, 6, None),
    _aten.conv1d.padding: ("conv", 4, 6, None),
    _aten.conv2d.padding: ("conv", 4, 6, None),
    _aten.conv3d.padding: ("conv", 4, 6, None),
    _aten.conv_transpose1d.default: ("convtranspose", 4, 6, None),
    _aten.conv_transpose2d.input: ("convtranspose", 4, 6, None),
    _aten.conv_transpose3d.input: ("convtranspose", 4, 6, None),
    _aten.convolution.default: (None, 4, 8, 6),
}
# Defaults of the ATen signatures above where the call leaves the argument out.
_ATEN_DEFAULTS = {"padding": 0, "groups": 1}

# ATen batch norms: op -> (index of training flag or None for "never", index of eps, returns a tuple).
ATEN_BATCHNORM = {
    _aten.batch_norm.default: (5, 7, False),
    _aten._native_batch_norm_legit_no_training.default: (None, 6, True),
    _aten.native_batch_norm.default: (5, 7, True),
    _aten._native_batch_norm_legit.default: (5, 7, True),
    _aten._native_batch_norm_legit_functional.default: (5, 7, True),
    _aten.cudnn_batch_norm.default: (5, 7, True),
    _aten.miopen_batch_norm.default: (5, 7, True),
}


def aten_layer(node, tensor_of) -> Layer | Refusal | None:
    """The linear layer an ATen call node computes (``tensor_of(arg)``: the constant tensor an argument names, or
    None), a refusal when its weights are not constant, or None when the call is not a linear layer."""
    spec = ATEN_LINEAR.get(getattr(node, "target", None))
    if spec is None or node.op != "call_function":
        return None
    name, pad_i, groups_i, transposed_i = spec
    args = list(node.args)
    arg = lambda i, key: args[i] if i is not None and i < len(args) else node.kwargs.get(  # noqa: E731
        key, _ATEN_DEFAULTS.get(key))
    if name is None:
        name = "convtranspose" if arg(transposed_i, "transposed") else "conv"
    weight = tensor_of(args[1]) if len(args) > 1 else None
    bias_arg = args[2] if len(args) > 2 else node.kwargs.get("bias")
    bias = tensor_of(bias_arg) if bias_arg is not None else None
    if weight is None or (bias_arg is not None and bias is None):
        return Refusal("non-constant", f"the weight or bias of {node.name} is computed, not a parameter")
    padding = arg(pad_i, "padding") if pad_i is not None else 0
    padding = (padding,) if isinstance(padding, int) else padding if isinstance(padding, str) else tuple(padding)
    groups = arg(groups_i, "groups") if groups_i is not None else 1
    return Layer(KINDS[name], weight, bias, int(groups), padding)


# ---- plans ----------------------------------------------------------------------------------------------------

def numpy_dtype(dtype: torch.dtype):
    if dtype == torch.bfloat16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return torch.empty((), dtype=dtype).numpy().dtype


def to_torch(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """float64 results rounded once to ``like``'s dtype (overflow refused), on its device."""
    rounded = cast_checked(values, numpy_dtype(like.dtype))
    exact = rounded.astype(np.float32) if like.dtype == torch.bfloat16 else rounded  # every bf16 is a float32
    return torch.from_numpy(np.ascontiguousarray(exact)).to(device=like.device, dtype=like.dtype)


@dataclass
class Plan:
    """One fold as data. ``layer`` (a graph node or a module name, whatever the pass addresses layers by) gets
    ``weight`` and ``bias``; every use of ``bypass`` (the normalization's output) reads ``replacement`` instead,
    and ``remove`` (the normalization's nodes) go."""

    bn: str
    into: str
    rule: str
    layer: object
    weight: torch.Tensor
    bias: torch.Tensor
    bypass: object = None
    replacement: object = None
    remove: list = field(default_factory=list)
    exact: tuple | None = None  # the float64 (weight, bias) the cast ones came from, for merges made later


class ExactWeights:
    """The float64 (weight, bias) that folds and merges computed, by the weight tensor they were rounded into. A
    later fold into the same layer, or a merge that reads it, starts from them, so every result is rounded once
    (two roundings cost up to one ulp: a real error in 16-bit floats). Shared by the torch.fx pass (a module's
    weight), the ATen pass (the parameter a ``get_attr`` reads) and the merges (:mod:`bnfold.torch.merge`).

    Memory: a float64 copy is 2x a float32 tensor and 4x a 16-bit one, so copies are kept only where a merge may
    read them (``wanted``: :func:`bnfold.torch.merge.may_be_merged`, next to a branch sum or another linear op; a
    ResNet keeps almost none), for convolutions (the only layers a merge reads) narrower than float64 (whose cast is
    the value itself). A layer folded twice without being kept (a Linear between two batch norms) rounds twice. An
    entry holds its tensors: their ids are not reused while it lives."""

    def __init__(self):
        self._entries: dict[int, tuple] = {}  # id(weight) -> (weight, bias, float64 weight, float64 bias)

    def of(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The float64 (weight, bias) that ``weight`` and ``bias`` are the cast of, or None."""
        entry = self._entries.get(id(weight))
        if entry is None or entry[0] is not weight or entry[1] is not bias:
            return None
        return entry[2], entry[3]

    def keep(self, kind: Kind, weight: torch.Tensor, bias: torch.Tensor, exact: tuple, wanted: bool = True) -> None:
        """Remember that ``weight`` and ``bias`` are the cast of ``exact``, where a merge may read them (``wanted``);
        else forget what ``weight`` held before (its values changed)."""
        if wanted and kind.name == "conv" and weight.dtype != torch.float64:
            self._entries[id(weight)] = (weight, bias, *exact)
        else:
            self.drop(weight)

    def drop(self, weight: torch.Tensor) -> None:
        """Forget ``weight``'s values (it was replaced: the entry would only keep it alive)."""
        self._entries.pop(id(weight), None)

    def by_path(self, root: nn.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The float64 values of ``root``'s layers, by module path (to carry them into a copy of ``root``)."""
        found = {}
        for path, module in root.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                values = self.of(weight, getattr(module, "bias", None))
                if values is not None:
                    found[path] = values
        return found

    @classmethod
    def at_paths(cls, root: nn.Module, values: dict[str, tuple]) -> "ExactWeights":
        """Float64 values of :meth:`by_path` for the same layers of ``root`` (a copy, or the module they were
        written into)."""
        exact = cls()
        for path, pair in values.items():
            module = root.get_submodule(path)
            exact.keep(module_kind(module), module.weight, module.bias, pair)
        return exact


def exact_after(layer: Layer, affine: Affine, exact=None) -> tuple[np.ndarray, np.ndarray]:
    """New float64 (weight, bias) for ``affine`` applied to the layer's output; FoldRefused when not exact.
    ``exact``: the layer's weight and bias in float64 when an earlier fold or merge computed them (else its own)."""
    groups = layer.groups if layer.kind.groups_after else 1
    weight, bias = exact if exact is not None else (numpy64(layer.weight),
                                                    None if layer.bias is None else numpy64(layer.bias))
    return absorb_after(weight, bias, affine.s, affine.t, axis=layer.kind.out_axis, groups=groups)


def exact_before(layer: Layer, s: np.ndarray, t: np.ndarray, exact=None) -> tuple[np.ndarray, np.ndarray]:
    """New float64 (weight, bias) for ``s*x + t`` applied to the layer's input (exact only without padding)."""
    groups = layer.groups if layer.kind.groups_before else 1
    weight, bias = exact if exact is not None else (numpy64(layer.weight),
                                                    None if layer.bias is None else numpy64(layer.bias))
    return absorb_before(weight, bias, s, t, in_axis=layer.kind.in_axis, out_axis=layer.kind.out_axis,
                         groups=groups)


def weights_after(layer: Layer, affine: Affine) -> tuple[torch.Tensor, torch.Tensor]:
    """New (weight, bias) for ``affine`` applied to the layer's output; FoldRefused when not exact."""
    new_w, new_b = exact_after(layer, affine)
    return to_torch(new_w, layer.weight), to_torch(new_b, layer.weight)


def weights_before(layer: Layer, s: np.ndarray, t: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """New (weight, bias) for ``s*x + t`` applied to the layer's input (exact only without padding)."""
    new_w, new_b = exact_before(layer, s, t)
    return to_torch(new_w, layer.weight), to_torch(new_b, layer.weight)


def check_after(layer: Layer, affine: Affine, rank: int | None, label: str) -> Refusal | None:
    """Why ``affine`` on dimension 1 of the layer's output (of ``rank``, None if unknown) is not a per-channel
    scale of what the layer writes, or None."""
    if layer.out_channels != affine.s.shape[0]:
        return Refusal("channel-mismatch",
                       f"{label} writes {layer.out_channels} channels, the batch norm has {affine.s.shape[0]}")
    if layer.kind.name == "linear":  # Linear writes the last dimension: that is dimension 1 only for rank 2
        if rank == 2:
            return None
        if rank is None:
            return Refusal("rank-unknown", f"can not prove the output of {label} is rank 2 (pass example_inputs)")
        return Refusal("wrong-axis", f"the batch norm normalizes dimension 1 of a rank-{rank} tensor, "
                                     f"{label} writes the last one")
    batched = layer.weight.dim()  # conv output rank with a batch dimension
    if rank is not None:
        return None if rank == batched else Refusal(
            "wrong-axis", f"{label} is unbatched: its channels are dimension 0")
    if affine.ranks is not None and batched - 1 not in affine.ranks:
        return None  # the batch norm would reject the unbatched rank, so the input is batched
    return Refusal("rank-unknown", f"can not prove the input of {label} is batched (pass example_inputs)")


def before_scales(layer: Layer, affine: Affine, rank: int | None, flattened: bool, label: str
                  ) -> tuple[np.ndarray, np.ndarray] | Refusal:
    """``(s, t)`` per input channel of the layer for ``affine`` applied to its input, or why that is not exact.
    ``flattened``: a channel-outermost flatten sits between them (Linear only); ``rank``: the batch norm output's."""
    s, t = affine.s, affine.t
    if layer.kind.name == "convtranspose":
        return NO_NEIGHBOUR
    if layer.kind.name == "conv":
        if flattened:
            return NO_NEIGHBOUR
        if layer.pads_input():
            return Refusal("padding-reads-zero", f"{label} pads its input (padding={layer.padding}, padding_mode="
                                                 f"'{layer.padding_mode}'): the shift would not reach the border")
        if layer.in_channels != s.shape[0]:
            return Refusal("channel-mismatch", f"{label} reads {layer.in_channels} channels, the batch norm has "
                                               f"{s.shape[0]}")
        batched = layer.weight.dim()
        if rank is not None and rank != batched:
            return Refusal("wrong-axis", f"{label} is unbatched: its channels are dimension 0")
        if rank is None and (affine.ranks is None or batched - 1 in affine.ranks):
            return Refusal("rank-unknown", f"can not prove the input of {label} is batched (pass example_inputs)")
        return s, t
    if not flattened:
        if rank is None:
            return Refusal("rank-unknown", f"can not prove the input of {label} is rank 2 (pass example_inputs)")
        if rank != 2:
            return Refusal("wrong-axis", f"{label} contracts the last dimension of a rank-{rank} tensor, not the "
                                         "batch norm's")
    features = layer.in_channels
    if features % s.shape[0]:
        return Refusal("channel-mismatch", f"{label} reads {features} features, not a multiple of {s.shape[0]} "
                                           "channels")
    return np.repeat(s, features // s.shape[0]), np.repeat(t, features // s.shape[0])


# ---- frozen batch norms written as arithmetic ------------------------------------------------------------------

_MUL = {operator.mul, torch.mul, _aten.mul.Tensor, "mul"}
_ADD = {operator.add, torch.add, _aten.add.Tensor, "add"}


def _is_op(node, ops) -> bool:
    return getattr(node, "op", None) in ("call_function", "call_method") and node.target in ops and \
        len(node.args) == 2 and not node.kwargs


def constant_value(node, tensor_of, seen: dict, depth: int = 0):
    """The value of a node computed from parameters, buffers and literals only (evaluated here), else None.
    Constants of a normalization are a few operations deep: deeper chains are not looked into."""
    import torch.fx as fx

    if not isinstance(node, fx.Node):
        return node
    if node in seen:
        return seen[node]
    value = None
    if node.op == "get_attr":
        value = tensor_of(node)
    elif node.op in ("call_function", "call_method") and depth < 32:
        args = [constant_value(a, tensor_of, seen, depth + 1) if isinstance(a, fx.Node) else a for a in node.args]
        if not any(isinstance(a, fx.Node) and seen.get(a) is None for a in node.args) and \
                not any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            try:
                with torch.no_grad():
                    value = (node.target(*args, **node.kwargs) if node.op == "call_function"
                             else getattr(args[0], node.target)(*args[1:], **node.kwargs))
            except Exception:
                value = None
    seen[node] = value
    return value


def _reads_running_var(node, limit: int = 64) -> str | None:
    """The owner path of a ``running_var`` attribute the constant subgraph reads, or None."""
    import torch.fx as fx

    stack, visited = [node], set()
    while stack and len(visited) < limit:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in visited:
            continue
        visited.add(n)
        if n.op == "get_attr" and str(n.target).rpartition(".")[2] in ("running_var", "running_var_buffer"):
            return str(n.target).rpartition(".")[0]
        stack.extend(a for a in n.args if isinstance(a, fx.Node))
    return None


def frozen_affine(node, tensor_of):
    """``x * scale + shift`` where scale and shift are computed from a ``running_var`` buffer and other constants
    (a frozen batch norm traced through, as torchvision and timm write it), as ``(x, nodes, Affine, owner)``:
    ``nodes`` are the add, the mul and the constant computation, in an order they can be erased in; None if
    ``node`` is not such an add."""
    if not _is_op(node, _ADD):
        return None
    for mul, shift_node in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if not _is_op(mul, _MUL) or len(mul.users) != 1:
            continue
        for x, scale_node in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
            owner = _reads_running_var(scale_node)
            if owner is None:
                continue
            seen: dict = {}
            scale, shift = constant_value(scale_node, tensor_of, seen), constant_value(shift_node, tensor_of, seen)
            if not (isinstance(scale, torch.Tensor) and isinstance(shift, torch.Tensor)) or scale.dim() < 2:
                continue
            channels = scale.shape[1]
            per_channel = (1, channels) + (1,) * (scale.dim() - 2)
            if tuple(scale.shape) != per_channel or tuple(shift.shape) != per_channel:
                continue
            s, t = numpy64(scale.reshape(-1)), numpy64(shift.reshape(-1))
            constants = [n for n in reversed(list(seen)) if getattr(n, "op", None) != "get_attr"]
            nodes = [node, mul] + constants + [n for n in seen if getattr(n, "op", None) == "get_attr"]
            if not (np.isfinite(s).all() and np.isfinite(t).all()):
                return x, nodes, Refusal("invalid-statistics", "the frozen scale or shift is not finite"), owner
            return x, nodes, Affine(s, t, (scale.dim(),)), owner
    return None
