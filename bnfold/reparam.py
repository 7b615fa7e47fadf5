"""Structural reparameterization, on numpy arrays only, in float64: linear branches written as one convolution.

A :class:`ConvBranch` is a convolution (weight, bias, groups, strides, dilations, pads) seen as a linear map of
its input. Everything else that is linear and reads a tensor channel by channel can be written as one too:

* an identity is a kernel with a 1 at its own channel, at the centre (:func:`identity_branch`);
* a BatchNormalization on its own (no conv to fold into) is that identity with its affine (:func:`affine_branch`);
* an average pool is a depthwise kernel of ``1/k`` values (:func:`avgpool_branch`), exact only where its
  padding reads zeros the way a convolution's does.

Then two merges, each exact or refused with the reason (:class:`MergeRefused`):

* :func:`merge_parallel`: branches that read the same input and are summed,
  ``Σ conv(x, Wᵢ) + bᵢ = conv(x, ΣWᵢ) + Σbᵢ``, once each kernel is placed inside the largest one at the offset
  that makes it read the same input positions (:func:`place_kernel`), and each grouping is written in the
  coarsest common one (:func:`regroup`);
* :func:`merge_sequential`: one convolution applied to the output of another, with nothing between them, is a
  convolution whose kernel is the two composed, ``W[o,i,a+b] = Σₘ W₂[o,m,b]·W₁[m,i,a]``; the first one's bias
  passes through the second as ``Σ W₂·b₁``, which is exact only where the second never reads its own zero
  padding (the padded zeros are not the first one's bias).

Weights follow ONNX/PyTorch: ``[C_out, C_in/groups, *kernel]``; pads are per spatial axis, begin and end apart.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np

from .affine import FoldRefused


class MergeRefused(FoldRefused):
    """The branches can not be written as one linear op exactly; the message says why."""


@dataclass(frozen=True)
class ConvBranch:
    """A convolution as a linear map: float64 weight ``[C_out, C_in/groups, *kernel]`` and bias ``[C_out]``."""

    weight: np.ndarray
    bias: np.ndarray
    groups: int
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]

    @property
    def spatial_rank(self) -> int:
        return self.weight.ndim - 2

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def pads(self) -> tuple[int, ...]:
        """ONNX order: every begin, then every end."""
        return self.pads_begin + self.pads_end


def conv_branch(weight, bias=None, *, groups: int = 1, strides=None, dilations=None, pads=None) -> ConvBranch:
    """A convolution's parameters as a :class:`ConvBranch` (``pads`` in ONNX order: begins then ends)."""
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim < 3:
        raise MergeRefused(f"a convolution weight has rank 3 or more, not {weight.ndim}")
    rank = weight.ndim - 2
    out = weight.shape[0]
    if groups < 1 or out % groups:
        raise MergeRefused(f"{out} output channels do not split into {groups} groups")
    bias = np.zeros(out) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    if bias.shape[0] != out:
        raise MergeRefused(f"bias has {bias.shape[0]} values for {out} output channels")
    strides = tuple(int(s) for s in (strides or (1,) * rank))
    dilations = tuple(int(d) for d in (dilations or (1,) * rank))
    pads = tuple(int(p) for p in (pads or (0,) * (2 * rank)))
    if len(strides) != rank or len(dilations) != rank or len(pads) != 2 * rank:
        raise MergeRefused(f"strides, dilations or pads do not have one value per spatial axis ({rank})")
    return ConvBranch(weight, bias, int(groups), strides, dilations, pads[:rank], pads[rank:])


def identity_branch(channels: int, spatial_rank: int) -> ConvBranch:
    """``y = x`` as a depthwise 1×…×1 convolution (a 1 on each channel): exact, it multiplies by one."""
    return affine_branch(np.ones(channels), np.zeros(channels), spatial_rank)


def affine_branch(scale, shift, spatial_rank: int) -> ConvBranch:
    """``y = s·x + t`` per channel (a BatchNormalization alone in its branch) as a depthwise 1×…×1 convolution:
    the identity kernel scaled by ``s``, bias ``t``. Exact: the same products and sums."""
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    shift = np.asarray(shift, dtype=np.float64).reshape(-1)
    channels = scale.shape[0]
    weight = scale.reshape((channels, 1) + (1,) * spatial_rank)
    return conv_branch(weight, shift, groups=channels)


def avgpool_branch(channels: int, kernel_shape, *, strides=None, pads=None, count_include_pad: bool = False,
                   ceil_mode: bool = False, dilations=None) -> ConvBranch:
    """An AveragePool as a depthwise convolution of ``1/prod(kernel)`` values.

    Exact when every window divides by the full kernel size: no padding, or padding counted in the divisor
    (``count_include_pad=1``), and no window hanging off the end (``ceil_mode=0``)."""
    kernel_shape = tuple(int(k) for k in kernel_shape)
    rank = len(kernel_shape)
    pads = tuple(int(p) for p in (pads or (0,) * (2 * rank)))
    if any(pads) and not count_include_pad:
        raise MergeRefused("AveragePool pads without count_include_pad: border windows divide by fewer "
                           "elements than the kernel has, which no convolution does")
    if ceil_mode:
        raise MergeRefused("AveragePool with ceil_mode=1: its last window may hang off the end and divide by fewer "
                           "elements")
    size = math.prod(kernel_shape)
    weight = np.full((channels, 1) + kernel_shape, 1.0 / size)
    return conv_branch(weight, None, groups=channels, strides=strides, pads=pads, dilations=dilations)


def regroup(branch: ConvBranch, groups: int) -> ConvBranch:
    """The same convolution written with ``groups`` groups, a divisor of its own: the weight grows with zeros
    for the input channels it does not read. Exact: only zero products are added."""
    if groups == branch.groups:
        return branch
    if groups < 1 or branch.groups % groups:
        raise MergeRefused(f"a convolution with {branch.groups} groups can not be written with {groups}")
    c_out, c_in = branch.out_channels, branch.in_channels
    per_old, per_new = c_in // branch.groups, c_in // groups
    o = np.arange(c_out)
    old_group, new_group = o // (c_out // branch.groups), o // (c_out // groups)
    start = old_group * per_old - new_group * per_new  # where the old group's columns sit in the new row
    weight = np.zeros((c_out, per_new) + branch.kernel_shape)
    weight[o[:, None], start[:, None] + np.arange(per_old)] = branch.weight
    return ConvBranch(weight, branch.bias, groups, branch.strides, branch.dilations, branch.pads_begin,
                      branch.pads_end)


def place_kernel(branch: ConvBranch, kernel_shape, pads_begin, pads_end, dilations=None) -> ConvBranch:
    """The same convolution with a larger kernel and other pads: the kernel placed, zeros around it, where it
    reads the same input positions.

    Output ``i`` reads input ``i·s − p_begin + j·d`` for tap ``j``; with pads ``P`` the same positions are taps
    ``j + (P_begin − p_begin)/d``, so the kernel moves by that offset (centred when both are centred). Exact when
    the offset is whole and inside the kernel and both give the same output size
    (``p_begin + p_end − d·(k−1) = P_begin + P_end − d·(K−1)``); positions in either padding read zeros in both.
    """
    rank = branch.spatial_rank
    kernel_shape, pads_begin, pads_end = tuple(kernel_shape), tuple(pads_begin), tuple(pads_end)
    dilations = tuple(dilations) if dilations is not None else branch.dilations
    offsets = []
    for axis in range(rank):
        k, K = branch.kernel_shape[axis], kernel_shape[axis]
        d = dilations[axis]
        if k > 1 and d != branch.dilations[axis]:
            raise MergeRefused(f"dilation {branch.dilations[axis]} vs {d} on spatial axis {axis}")
        shift = pads_begin[axis] - branch.pads_begin[axis]
        extent = branch.pads_begin[axis] + branch.pads_end[axis] - d * (k - 1)
        target = pads_begin[axis] + pads_end[axis] - d * (K - 1)
        if shift % d or extent != target:
            raise MergeRefused(f"a {k}-tap kernel with pads ({branch.pads_begin[axis]}, {branch.pads_end[axis]}) "
                               f"does not line up with a {K}-tap kernel with pads ({pads_begin[axis]}, "
                               f"{pads_end[axis]}) on spatial axis {axis}")
        offset = shift // d
        if offset < 0 or offset + k > K:
            raise MergeRefused(f"a {k}-tap kernel falls outside a {K}-tap kernel on spatial axis {axis}")
        offsets.append(offset)
    weight = np.zeros(branch.weight.shape[:2] + kernel_shape)
    weight[(slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(offsets, branch.kernel_shape))] = \
        branch.weight
    return ConvBranch(weight, branch.bias, branch.groups, branch.strides, dilations, pads_begin, pads_end)


def negated(branch: "ConvBranch | DenseBranch") -> "ConvBranch | DenseBranch":
    """``-branch(x)``: the weight and bias negated (exact: a sign flip), for a branch that is subtracted."""
    return replace(branch, weight=-branch.weight, bias=-branch.bias)


def merge_parallel(branches: list[ConvBranch]) -> ConvBranch:
    """One convolution equal to the sum of ``branches`` (all reading the same input).

    Exact: convolution is linear in its weight, so once every branch is written with the same kernel size,
    pads, strides, dilations and groups (:func:`place_kernel`, :func:`regroup`), the sum of outputs is the
    output of the summed weights plus the summed biases. Refused when the branches differ in what they read
    (channels, strides, dilations) or their kernels do not line up."""
    if not branches:
        raise MergeRefused("no branches to merge")
    first = branches[0]
    rank = first.spatial_rank
    for b in branches[1:]:
        if b.spatial_rank != rank:
            raise MergeRefused(f"branches have {rank} and {b.spatial_rank} spatial axes")
        if (b.in_channels, b.out_channels) != (first.in_channels, first.out_channels):
            raise MergeRefused(f"branches map {first.in_channels}->{first.out_channels} and "
                               f"{b.in_channels}->{b.out_channels} channels")
        if b.strides != first.strides:
            raise MergeRefused(f"branches have strides {list(first.strides)} and {list(b.strides)}")
    # The largest kernel (in taps, axis by axis) sets the size and pads; a 1-tap axis reads one position whatever
    # its dilation, so only wider kernels must agree on it.
    widest = max(branches, key=lambda b: math.prod(b.kernel_shape))
    kernel_shape = widest.kernel_shape
    if any(any(k > K for k, K in zip(b.kernel_shape, kernel_shape)) for b in branches):
        raise MergeRefused("no branch's kernel contains every other one (e.g. 1x3 and 3x1 need a 3x3 branch)")
    dilations = widest.dilations
    for b in branches:
        for axis, k in enumerate(b.kernel_shape):
            if k > 1 and b.dilations[axis] != dilations[axis]:
                raise MergeRefused(f"branches have dilations {list(dilations)} and {list(b.dilations)}")
    groups = math.gcd(*(b.groups for b in branches))
    weight = np.zeros((first.out_channels, first.in_channels // groups) + kernel_shape)
    bias = np.zeros(first.out_channels)
    for b in branches:
        placed = place_kernel(regroup(b, groups), kernel_shape, widest.pads_begin, widest.pads_end, dilations)
        weight += placed.weight
        bias += placed.bias
    return ConvBranch(weight, bias, groups, first.strides, dilations, widest.pads_begin, widest.pads_end)


def merge_sequential(first: ConvBranch, second: ConvBranch) -> ConvBranch:
    """One convolution equal to ``second(first(x))``.

    The kernel is the two composed, ``W[o,i,a+b] = Σₘ W₂[o,m,b]·W₁[m,i,a]`` (size ``k₁+k₂−1``, the second's
    stride), the bias ``b₂ + Σ W₂·b₁``. Exact in two cases:

    * the second has no padding: the merged op pads the input as the first did, and every value the second
      reads is one the first computed (its own borders included);
    * the first is 1×…×1 without padding and the second pads: exact only if the first's bias is zero, because
      where the second reads its zero padding the merged op would read the first's bias instead. (Diverse
      Branch Blocks pad with the bias for this reason; in a graph that is a padded first op, the case above.)

    A second op that is 1×…×1 without padding (a channel mix, a BN) composes with anything: the first's kernel,
    pads and dilations, the strides multiplied. Otherwise the first must have stride 1 and no dilation, the
    second no dilation (their taps then add up one to one).
    """
    if first.spatial_rank != second.spatial_rank:
        raise MergeRefused(f"{first.spatial_rank} vs {second.spatial_rank} spatial axes")
    if first.out_channels != second.in_channels:
        raise MergeRefused(f"the first produces {first.out_channels} channels, the second reads "
                           f"{second.in_channels}")
    k1, k2 = first.kernel_shape, second.kernel_shape
    pointwise = all(k == 1 for k in k2) and not any(second.pads_begin) and not any(second.pads_end)
    if pointwise:
        # The second mixes channels at each position it keeps: the first's kernel, strides multiplied (the
        # positions kept of positions kept), the first's pads and dilations.
        strides = tuple(a * b for a, b in zip(first.strides, second.strides))
        return _compose(first, second, strides, first.dilations, first.pads_begin, first.pads_end)
    if any(s != 1 for s in first.strides):
        raise MergeRefused(f"the first has strides {list(first.strides)}: the second's taps would skip its outputs")
    if any(d != 1 and k > 1 for d, k in zip(first.dilations, k1)) or \
            any(d != 1 and k > 1 for d, k in zip(second.dilations, k2)):
        raise MergeRefused("a dilated kernel: composing dilated taps is not supported")
    second_pads = any(second.pads_begin) or any(second.pads_end)
    if not second_pads:
        pads_begin, pads_end = first.pads_begin, first.pads_end
    elif all(k == 1 for k in k1) and not any(first.pads_begin) and not any(first.pads_end):
        if np.any(first.bias != 0):
            raise MergeRefused("the first op's bias would reach the second's zero padding: at the border the "
                               "second reads zeros, the merged op would read the bias")
        pads_begin, pads_end = second.pads_begin, second.pads_end
    else:
        raise MergeRefused("the second pads the first's output: its zero border is not a convolution of the input")
    return _compose(first, second, second.strides, (1,) * len(k1), pads_begin, pads_end)


def _compose(first: ConvBranch, second: ConvBranch, strides, dilations, pads_begin, pads_end) -> ConvBranch:
    """The kernel and bias of ``second(first(x))``, taps added one to one (the caller checked that is exact)."""
    k1, k2 = first.kernel_shape, second.kernel_shape
    groups = math.gcd(first.groups, second.groups)
    a, b = regroup(first, groups), regroup(second, groups)
    mid_per_group = a.out_channels // groups
    w1 = a.weight.reshape((groups, mid_per_group) + a.weight.shape[1:])  # [g, M, I, *k1]
    w2 = b.weight.reshape((groups, b.out_channels // groups) + b.weight.shape[1:])  # [g, O, M, *k2]
    kernel_shape = tuple(x + y - 1 for x, y in zip(k1, k2))
    merged = np.zeros((groups, w2.shape[1], w1.shape[2]) + kernel_shape)
    for taps in itertools.product(*(range(k) for k in k2)):
        window = (slice(None),) * 3 + tuple(slice(t, t + k) for t, k in zip(taps, k1))
        merged[window] += np.einsum("gom,gmi...->goi...", w2[(slice(None),) * 3 + taps], w1)
    spatial = tuple(range(3, w2.ndim))
    through = np.einsum("gom,gm->go", w2.sum(axis=spatial), a.bias.reshape(groups, mid_per_group))
    bias = b.bias + through.reshape(-1)
    weight = merged.reshape((b.out_channels,) + merged.shape[2:])
    return ConvBranch(weight, bias, groups, tuple(strides), tuple(dilations), tuple(pads_begin), tuple(pads_end))


# ---- fully connected branches (Gemm, MatMul) ---------------------------------------------------------------

@dataclass(frozen=True)
class DenseBranch:
    """A fully connected op as ``y = x @ weight + bias`` over the last axis: float64 ``[in, out]`` and ``[out]``."""

    weight: np.ndarray
    bias: np.ndarray

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])


def dense_branch(weight, bias=None, *, trans_b: bool = False, alpha: float = 1.0, beta: float = 1.0) -> DenseBranch:
    """A Gemm (``alpha·x·op(B) + beta·C``) or MatMul (no bias) weight as a :class:`DenseBranch`. A bias that is not
    one value per output feature (a ``[N, out]`` C adds per row) has no place in one op's bias: refused."""
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 2:
        raise MergeRefused(f"a fully connected weight has rank 2, not {weight.ndim}")
    weight = (weight.T if trans_b else weight) * float(alpha)
    out = weight.shape[1]
    if bias is None:
        return DenseBranch(weight, np.zeros(out))
    bias = np.asarray(bias, dtype=np.float64) * float(beta)
    if bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1) or (bias.ndim >= 1 and bias.shape[-1] not in (1, out)):
        raise MergeRefused(f"a bias of shape {list(bias.shape)} is not one value per output feature")
    return DenseBranch(weight, np.broadcast_to(bias.reshape(-1), (out,)).copy())


def dense_identity(features: int) -> DenseBranch:
    """``y = x`` as ``x @ I``: exact, every product is by one or zero."""
    return DenseBranch(np.eye(features), np.zeros(features))


def merge_parallel_dense(branches: list[DenseBranch]) -> DenseBranch:
    """One fully connected op equal to the sum of ``branches`` reading the same input: ``x@ΣWᵢ + Σbᵢ``, exact by
    linearity. Refused when they map different feature counts."""
    if not branches:
        raise MergeRefused("no branches to merge")
    shape = branches[0].weight.shape
    for b in branches[1:]:
        if b.weight.shape != shape:
            raise MergeRefused(f"branches map {shape[0]}->{shape[1]} and {b.in_features}->{b.out_features} features")
    return DenseBranch(sum(b.weight for b in branches), sum(b.bias for b in branches))
