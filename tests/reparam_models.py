"""Structurally reparameterizable blocks and small nets, written in this project (timm is not a dependency).

RepVGG, MobileOne, ACNet, Diverse Branch Block (DBB), RepViT, RepGhost, FastViT and EfficientViT style blocks,
each with its authors' own deploy form: a ``reparameterize()`` that computes the single conv's kernel and bias from
the train-time branches in float32 torch arithmetic, the way timm's ``RepVggBlock``/``MobileOneBlock`` and the
DBB/ACNet reference code do (BN fused into each branch, smaller kernels padded to the centre, an identity as a
kernel with a 1 at its channel's centre, an average pool as a ``1/k²`` kernel, a 1×1 followed by a k×k composed),
then replaces the branches by that conv.
:func:`reparameterize_model` calls it on every block, as ``timm.utils.reparameterize_model`` does.

Written for these tests from the papers' descriptions (RepVGG arXiv:2101.03697, MobileOne arXiv:2206.04040,
ACNet arXiv:1908.03930, DBB arXiv:2103.13425, RepViT arXiv:2307.09283, RepGhost arXiv:2211.06088, FastViT
arXiv:2303.14189, EfficientViT arXiv:2305.07027), not copied. Nothing here imports bnfold.

The DBB branches that pad with the BN's output for a zero input (the authors' ``BNAndPadLayer``) are written as
a 1×1 conv that pads its input by the same amount, then the BN: the border then holds exactly BN(0), the value
``BNAndPadLayer`` writes, and the graph exports to plain Conv/BatchNormalization nodes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(c_in: int, c_out: int, kernel, stride: int = 1, padding=0, groups: int = 1) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(c_out))
    return seq


def fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv kernel (no bias) followed by ``bn``, as one kernel and bias (float32, as the authors do it)."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def identity_kernel(channels: int, groups: int, kernel_size: int) -> torch.Tensor:
    """An identity as a kernel: a 1 at the centre of each channel's own input (within its group)."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kernel_size, kernel_size)
    centre = kernel_size // 2
    for c in range(channels):
        kernel[c, c % per_group, centre, centre] = 1.0
    return kernel


def pad_to(kernel: torch.Tensor, size) -> torch.Tensor:
    """A smaller kernel centred in a ``size`` kernel (zeros around it)."""
    kh, kw = (size, size) if isinstance(size, int) else size
    dh, dw = (kh - kernel.shape[2]) // 2, (kw - kernel.shape[3]) // 2
    return F.pad(kernel, [dw, kw - kernel.shape[3] - dw, dh, kh - kernel.shape[2] - dh])


class Reparameterizable(nn.Module):
    """A block whose branches become ``self.reparam_conv`` when :meth:`reparameterize` is called."""

    reparam_conv: nn.Conv2d | None

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def branch_names(self) -> list[str]:
        raise NotImplementedError

    def deploy_conv_args(self) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        kernel, bias = self.kernel_bias()
        conv = nn.Conv2d(**self.deploy_conv_args(), bias=True)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        self.reparam_conv = conv
        for name in self.branch_names():
            if hasattr(self, name):
                delattr(self, name)


# ---- RepVGG: k×k conv+BN, 1×1 conv+BN and a BN identity, summed ------------------------------------------

class RepVggBlock(Reparameterizable):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1, kernel_size: int = 3):
        super().__init__()
        self.c_in, self.c_out, self.stride, self.groups, self.k = c_in, c_out, stride, groups, kernel_size
        self.identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.conv_kxk = conv_bn(c_in, c_out, kernel_size, stride, kernel_size // 2, groups)
        self.conv_1x1 = conv_bn(c_in, c_out, 1, stride, 0, groups)
        self.act = nn.ReLU()
        self.reparam_conv = None

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        y = self.conv_kxk(x) + self.conv_1x1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)

    def kernel_bias(self):
        k, b = fuse_bn(self.conv_kxk.conv.weight, self.conv_kxk.bn)
        k1, b1 = fuse_bn(self.conv_1x1.conv.weight, self.conv_1x1.bn)
        k, b = k + pad_to(k1, self.k), b + b1
        if self.identity is not None:
            ki, bi = fuse_bn(identity_kernel(self.c_in, self.groups, self.k), self.identity)
            k, b = k + ki, b + bi
        return k, b

    def branch_names(self):
        return ["identity", "conv_kxk", "conv_1x1"]

    def deploy_conv_args(self):
        return dict(in_channels=self.c_in, out_channels=self.c_out, kernel_size=self.k, stride=self.stride,
                    padding=self.k // 2, groups=self.groups)


# ---- MobileOne: n over-parameterized k×k conv+BN branches, a 1×1 conv+BN, a BN skip ----------------------

class MobileOneBlock(Reparameterizable):
    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 num_conv_branches: int = 3):
        super().__init__()
        self.c_in, self.c_out, self.k, self.stride, self.groups = c_in, c_out, kernel_size, stride, groups
        self.skip = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.conv_kxk = nn.ModuleList(conv_bn(c_in, c_out, kernel_size, stride, kernel_size // 2, groups)
                                      for _ in range(num_conv_branches))
        self.conv_scale = conv_bn(c_in, c_out, 1, stride, 0, groups) if kernel_size > 1 else None
        self.act = nn.ReLU()
        self.reparam_conv = None

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        outs = [branch(x) for branch in self.conv_kxk]
        if self.conv_scale is not None:
            outs.append(self.conv_scale(x))
        if self.skip is not None:
            outs.append(self.skip(x))
        y = outs[0]
        for out in outs[1:]:
            y = y + out
        return self.act(y)

    def kernel_bias(self):
        k = torch.zeros(self.c_out, self.c_in // self.groups, self.k, self.k)
        b = torch.zeros(self.c_out)
        for branch in self.conv_kxk:
            kb, bb = fuse_bn(branch.conv.weight, branch.bn)
            k, b = k + kb, b + bb
        if self.conv_scale is not None:
            ks, bs = fuse_bn(self.conv_scale.conv.weight, self.conv_scale.bn)
            k, b = k + pad_to(ks, self.k), b + bs
        if self.skip is not None:
            ki, bi = fuse_bn(identity_kernel(self.c_in, self.groups, self.k), self.skip)
            k, b = k + ki, b + bi
        return k, b

    def branch_names(self):
        return ["skip", "conv_kxk", "conv_scale"]

    def deploy_conv_args(self):
        return dict(in_channels=self.c_in, out_channels=self.c_out, kernel_size=self.k, stride=self.stride,
                    padding=self.k // 2, groups=self.groups)


# ---- ACNet: k×k, 1×k and k×1 conv+BN, summed ---------------------------------------------------------------

class ACBlock(Reparameterizable):
    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        self.c_in, self.c_out, self.k, self.stride, self.groups = c_in, c_out, kernel_size, stride, groups
        p = kernel_size // 2
        self.square = conv_bn(c_in, c_out, kernel_size, stride, p, groups)
        self.hor = conv_bn(c_in, c_out, (1, kernel_size), stride, (0, p), groups)
        self.ver = conv_bn(c_in, c_out, (kernel_size, 1), stride, (p, 0), groups)
        self.act = nn.ReLU()
        self.reparam_conv = None

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        return self.act(self.square(x) + self.hor(x) + self.ver(x))

    def kernel_bias(self):
        k, b = fuse_bn(self.square.conv.weight, self.square.bn)
        kh, bh = fuse_bn(self.hor.conv.weight, self.hor.bn)
        kv, bv = fuse_bn(self.ver.conv.weight, self.ver.bn)
        return k + pad_to(kh, self.k) + pad_to(kv, self.k), b + bh + bv

    def branch_names(self):
        return ["square", "hor", "ver"]

    def deploy_conv_args(self):
        return dict(in_channels=self.c_in, out_channels=self.c_out, kernel_size=self.k, stride=self.stride,
                    padding=self.k // 2, groups=self.groups)


# ---- Diverse Branch Block: k×k, 1×1, 1×1→avg pool, 1×1→k×k, each with its BN -----------------------------

class IdentityBasedConv1x1(nn.Module):
    """DBB's 1×1 conv initialised as (and parameterized around) the identity: weight + identity kernel. It pads
    its input (``padding``) so that its zero-input border, after the BN, is BN(0) as in ``BNAndPadLayer``."""

    def __init__(self, channels: int, groups: int = 1, padding: int = 0):
        super().__init__()
        self.groups, self.padding = groups, padding
        self.weight = nn.Parameter(torch.zeros(channels, channels // groups, 1, 1))
        self.register_buffer("id_tensor", identity_kernel(channels, groups, 1))

    def actual_kernel(self) -> torch.Tensor:
        return self.weight + self.id_tensor

    def forward(self, x):
        return F.conv2d(x, self.actual_kernel(), None, 1, self.padding, 1, self.groups)


class DiverseBranchBlock(Reparameterizable):
    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        self.c_in, self.c_out, self.k, self.stride, self.groups = c_in, c_out, kernel_size, stride, groups
        p = self.p = kernel_size // 2
        self.origin = conv_bn(c_in, c_out, kernel_size, stride, p, groups)
        self.avg = nn.Sequential()
        if groups < c_out:
            self.avg.add_module("conv", nn.Conv2d(c_in, c_out, 1, 1, p, groups=groups, bias=False))
            self.avg.add_module("bn", nn.BatchNorm2d(c_out))
            self.avg.add_module("pool", nn.AvgPool2d(kernel_size, stride, 0))
            self.branch_1x1 = conv_bn(c_in, c_out, 1, stride, 0, groups)
        else:
            self.avg.add_module("pool", nn.AvgPool2d(kernel_size, stride, p))  # count_include_pad=True
            self.branch_1x1 = None
        self.avg_bn = nn.BatchNorm2d(c_out)
        mid = c_in  # the identity-based 1x1 keeps the input width (the authors' choice when groups < c_out)
        self.kxk_first = IdentityBasedConv1x1(c_in, groups, padding=p)
        self.kxk_bn1 = nn.BatchNorm2d(mid)
        self.kxk_second = nn.Conv2d(mid, c_out, kernel_size, stride, 0, groups=groups, bias=False)
        self.kxk_bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()
        self.reparam_conv = None

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        y = self.origin(x) + self.avg_bn(self.avg(x))
        if self.branch_1x1 is not None:
            y = y + self.branch_1x1(x)
        y = y + self.kxk_bn2(self.kxk_second(self.kxk_bn1(self.kxk_first(x))))
        return self.act(y)

    def _compose_1x1_kxk(self, k1, b1, k2, b2):
        """A 1×1 then a k×k (grouped alike): the kernel composed, the 1×1's bias carried through the k×k's sum."""
        g = self.groups
        if g == 1:
            k = F.conv2d(k2, k1.permute(1, 0, 2, 3))
            b = (k2 * b1.reshape(1, -1, 1, 1)).sum((1, 2, 3))
        else:
            ks, bs = [], []
            o1, o2 = k1.shape[0] // g, k2.shape[0] // g
            for i in range(g):
                k1g, k2g = k1[i * o1:(i + 1) * o1], k2[i * o2:(i + 1) * o2]
                ks.append(F.conv2d(k2g, k1g.permute(1, 0, 2, 3)))
                bs.append((k2g * b1[i * o1:(i + 1) * o1].reshape(1, -1, 1, 1)).sum((1, 2, 3)))
            k, b = torch.cat(ks), torch.cat(bs)
        return k, b + b2

    def _avg_kernel(self, channels: int) -> torch.Tensor:
        per_group = channels // self.groups
        k = torch.zeros(channels, per_group, self.k, self.k)
        k[torch.arange(channels), torch.arange(channels) % per_group] = 1.0 / self.k ** 2
        return k

    def kernel_bias(self):
        k, b = fuse_bn(self.origin.conv.weight, self.origin.bn)
        if self.branch_1x1 is not None:
            k1, b1 = fuse_bn(self.branch_1x1.conv.weight, self.branch_1x1.bn)
            k, b = k + pad_to(k1, self.k), b + b1
        # 1×1 (→ BN) → avg pool → BN
        if hasattr(self.avg, "conv"):
            ka, ba = fuse_bn(self.avg.conv.weight, self.avg.bn)
            kav, bav = self._compose_1x1_kxk(ka, ba, self._avg_kernel(self.c_out), torch.zeros(self.c_out))
        else:
            kav, bav = self._avg_kernel(self.c_out), torch.zeros(self.c_out)
        kav, bav2 = fuse_bn(kav, self.avg_bn)
        k, b = k + kav, b + bav2 + bav * (self.avg_bn.weight / (self.avg_bn.running_var + self.avg_bn.eps).sqrt())
        # identity-based 1×1 → BN → k×k → BN
        kf, bf = fuse_bn(self.kxk_first.actual_kernel(), self.kxk_bn1)
        ks, bs = fuse_bn(self.kxk_second.weight, self.kxk_bn2)
        kc, bc = self._compose_1x1_kxk(kf, bf, ks, bs)
        return k + kc, b + bc

    def branch_names(self):
        return ["origin", "avg", "avg_bn", "branch_1x1", "kxk_first", "kxk_bn1", "kxk_second", "kxk_bn2"]

    def deploy_conv_args(self):
        return dict(in_channels=self.c_in, out_channels=self.c_out, kernel_size=self.k, stride=self.stride,
                    padding=self.p, groups=self.groups)


# ---- RepViT's RepVGGDW: depthwise 3×3 conv+BN, depthwise 1×1 conv (with bias) and the identity, then a BN ------

class RepVggDw(Reparameterizable):
    """RepViT's token mixer: ``bn(conv_bn(x) + conv1(x) + x)``; its ``fuse()`` merges the three branches, then
    fuses the outer BN into the result."""

    def __init__(self, channels: int):
        super().__init__()
        self.c = channels
        self.conv = conv_bn(channels, channels, 3, 1, 1, groups=channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, 1, 0, groups=channels, bias=True)
        self.bn = nn.BatchNorm2d(channels)
        self.reparam_conv = None

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return self.bn(self.conv(x) + self.conv1(x) + x)

    def kernel_bias(self):
        k, b = fuse_bn(self.conv.conv.weight, self.conv.bn)
        k = k + pad_to(self.conv1.weight, 3) + identity_kernel(self.c, self.c, 3)
        b = b + self.conv1.bias
        scale = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
        return k * scale.reshape(-1, 1, 1, 1), self.bn.bias + (b - self.bn.running_mean) * scale

    def branch_names(self):
        return ["conv", "conv1", "bn"]

    def deploy_conv_args(self):
        return dict(in_channels=self.c, out_channels=self.c, kernel_size=3, padding=1, groups=self.c)


class RepVitBlock(nn.Module):
    """RepViT block (stride 1): the RepVGGDW token mixer, then a residual 1×1 → GELU → 1×1 channel mixer."""

    def __init__(self, channels: int):
        super().__init__()
        self.token_mixer = RepVggDw(channels)
        self.channel_mixer = nn.Sequential(conv_bn(channels, 2 * channels, 1), nn.GELU(),
                                           conv_bn(2 * channels, channels, 1))

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.channel_mixer(x)


# ---- RepGhost: a depthwise 3×3 conv+BN beside a BN of the same input (the "fusion BN"), summed --------------

class RepGhostModule(Reparameterizable):
    """RepGhost's module: a 1×1 conv+BN+ReLU makes the features; a cheap depthwise 3×3 conv+BN and the fusion BN
    of those features are summed (re-parameterized into the depthwise conv), then a ReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.c = c_out
        self.primary_conv = nn.Sequential(conv_bn(c_in, c_out, 1), nn.ReLU())
        self.cheap_operation = conv_bn(c_out, c_out, 3, 1, 1, groups=c_out)
        self.fusion_bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()
        self.reparam_conv = None

    def forward(self, x):
        x1 = self.primary_conv(x)
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x1))
        return self.act(self.cheap_operation(x1) + self.fusion_bn(x1))

    def kernel_bias(self):
        k, b = fuse_bn(self.cheap_operation.conv.weight, self.cheap_operation.bn)
        ki, bi = fuse_bn(identity_kernel(self.c, self.c, 3), self.fusion_bn)
        return k + ki, b + bi

    def branch_names(self):
        return ["cheap_operation", "fusion_bn"]

    def deploy_conv_args(self):
        return dict(in_channels=self.c, out_channels=self.c, kernel_size=3, padding=1, groups=self.c)


# ---- FastViT: RepMixer (x + γ·(mixer(x) − norm(x))) and RepCPE (x + depthwise conv(x)) ---------------------

class RepMixer(Reparameterizable):
    """FastViT's token mixer: ``x + layer_scale * (mixer(x) - norm(x))``, where ``mixer`` is a MobileOne block
    without activation (depthwise k×k conv+BN, depthwise 1×1 conv+BN, a BN skip) and ``norm`` one with only its BN
    skip. Its ``reparameterize()`` writes one depthwise conv: identity + γ·(mixer kernel − norm kernel)."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.c, self.k = channels, kernel_size
        self.mixer_kxk = conv_bn(channels, channels, kernel_size, 1, kernel_size // 2, groups=channels)
        self.mixer_scale = conv_bn(channels, channels, 1, 1, 0, groups=channels)
        self.mixer_skip = nn.BatchNorm2d(channels)
        self.norm_skip = nn.BatchNorm2d(channels)
        self.layer_scale = nn.Parameter(torch.full((channels, 1, 1), 1e-5))
        self.reparam_conv = None

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        mixer = self.mixer_kxk(x) + self.mixer_scale(x) + self.mixer_skip(x)
        return x + self.layer_scale * (mixer - self.norm_skip(x))

    def kernel_bias(self):
        identity = identity_kernel(self.c, self.c, self.k)
        k, b = fuse_bn(self.mixer_kxk.conv.weight, self.mixer_kxk.bn)
        ks, bs = fuse_bn(self.mixer_scale.conv.weight, self.mixer_scale.bn)
        ki, bi = fuse_bn(identity, self.mixer_skip)
        kn, bn = fuse_bn(identity, self.norm_skip)
        mixer_k, mixer_b = k + pad_to(ks, self.k) + ki, b + bs + bi
        gamma = self.layer_scale.reshape(-1)
        return identity + gamma.reshape(-1, 1, 1, 1) * (mixer_k - kn), gamma * (mixer_b - bn)

    def branch_names(self):
        return ["mixer_kxk", "mixer_scale", "mixer_skip", "norm_skip", "layer_scale"]

    def deploy_conv_args(self):
        return dict(in_channels=self.c, out_channels=self.c, kernel_size=self.k, padding=self.k // 2,
                    groups=self.c)


class RepCpe(Reparameterizable):
    """FastViT's conditional positional encoding: ``x + pe(x)`` with ``pe`` a depthwise conv with bias."""

    def __init__(self, channels: int, kernel_size: int = 7):
        super().__init__()
        self.c, self.k = channels, kernel_size
        self.pe = nn.Conv2d(channels, channels, kernel_size, 1, kernel_size // 2, groups=channels, bias=True)
        self.reparam_conv = None

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.pe(x)

    def kernel_bias(self):
        return identity_kernel(self.c, self.c, self.k) + self.pe.weight, self.pe.bias.clone()

    def branch_names(self):
        return ["pe"]

    def deploy_conv_args(self):
        return dict(in_channels=self.c, out_channels=self.c, kernel_size=self.k, padding=self.k // 2,
                    groups=self.c)


class FastVitBlock(nn.Module):
    """RepMixer, then a residual ConvFFN (depthwise 7×7 conv+BN, 1×1, GELU, 1×1) scaled by its layer scale."""

    def __init__(self, channels: int):
        super().__init__()
        self.token_mixer = RepMixer(channels)
        self.ffn = nn.Sequential(conv_bn(channels, channels, 7, 1, 3, groups=channels),
                                 nn.Conv2d(channels, 2 * channels, 1), nn.GELU(), nn.Conv2d(2 * channels, channels, 1))
        self.layer_scale = nn.Parameter(torch.full((channels, 1, 1), 1e-5))

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.layer_scale * self.ffn(x)


# ---- EfficientViT (MSRA): residual depthwise conv+BN, merged with its identity by the authors' fuse() ---------

class ResidualConvBn(Reparameterizable):
    """EfficientViT's ``Residual(Conv2d_BN(groups=c))``: ``x + bn(dw_conv(x))``; its ``fuse()`` folds the BN and adds
    the identity to the kernel (one depthwise conv)."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.c, self.k = channels, kernel_size
        self.m = conv_bn(channels, channels, kernel_size, 1, kernel_size // 2, groups=channels)
        self.reparam_conv = None

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.m(x)

    def kernel_bias(self):
        k, b = fuse_bn(self.m.conv.weight, self.m.bn)
        return k + identity_kernel(self.c, self.c, self.k), b

    def branch_names(self):
        return ["m"]

    def deploy_conv_args(self):
        return dict(in_channels=self.c, out_channels=self.c, kernel_size=self.k, padding=self.k // 2,
                    groups=self.c)


class EfficientVitBlock(nn.Module):
    """EfficientViT's sandwich layout around its attention, here without the attention: residual depthwise
    conv+BN, a residual FFN (1×1 conv+BN, ReLU, 1×1 conv+BN), residual depthwise conv+BN again."""

    def __init__(self, channels: int):
        super().__init__()
        self.dw0 = ResidualConvBn(channels)
        self.ffn0 = nn.Sequential(conv_bn(channels, 2 * channels, 1), nn.ReLU(), conv_bn(2 * channels, channels, 1))
        self.dw1 = ResidualConvBn(channels)

    def forward(self, x):
        x = self.dw0(x)
        x = x + self.ffn0(x)
        return self.dw1(x)


# ---- small nets ------------------------------------------------------------------------------------------

class Head(nn.Module):
    def __init__(self, channels: int, classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def repvgg_net() -> nn.Module:
    return nn.Sequential(RepVggBlock(3, 16, 2), RepVggBlock(16, 16), RepVggBlock(16, 32, 2, groups=2),
                         RepVggBlock(32, 32, groups=2), RepVggBlock(32, 32), Head(32))


def mobileone_net(branches: int = 3) -> nn.Module:
    layers = [MobileOneBlock(3, 16, 3, 2, num_conv_branches=branches)]
    for c_in, c_out, stride in ((16, 24, 2), (24, 24, 1), (24, 32, 2), (32, 32, 1)):
        layers.append(MobileOneBlock(c_in, c_in, 3, stride, groups=c_in, num_conv_branches=branches))  # depthwise
        layers.append(MobileOneBlock(c_in, c_out, 1, 1, num_conv_branches=branches))  # pointwise
    return nn.Sequential(*layers, Head(32))


def acnet_net() -> nn.Module:
    return nn.Sequential(ACBlock(3, 16, 3, 2), ACBlock(16, 16), ACBlock(16, 32, 3, 2), ACBlock(32, 32, 3, 1, 4),
                         Head(32))


def dbb_net() -> nn.Module:
    return nn.Sequential(DiverseBranchBlock(3, 16, 3, 2), DiverseBranchBlock(16, 16),
                         DiverseBranchBlock(16, 16, 3, 1, groups=16), DiverseBranchBlock(16, 32, 3, 2),
                         DiverseBranchBlock(32, 32, 5, 1, groups=2), Head(32))


def repvit_net() -> nn.Module:
    return nn.Sequential(conv_bn(3, 16, 3, 2, 1), nn.ReLU(), RepVitBlock(16),
                         conv_bn(16, 32, 3, 2, 1, groups=16), RepVitBlock(32), Head(32))


def repghost_net() -> nn.Module:
    return nn.Sequential(conv_bn(3, 16, 3, 2, 1), nn.ReLU(), RepGhostModule(16, 16), RepGhostModule(16, 32),
                         Head(32))


def fastvit_net() -> nn.Module:
    return nn.Sequential(MobileOneBlock(3, 16, 3, 2, num_conv_branches=1), FastVitBlock(16), RepCpe(16),
                         MobileOneBlock(16, 32, 3, 2, num_conv_branches=1), FastVitBlock(32), Head(32))


def efficientvit_net() -> nn.Module:
    return nn.Sequential(conv_bn(3, 16, 3, 2, 1), nn.ReLU(), EfficientVitBlock(16), conv_bn(16, 32, 3, 2, 1),
                         EfficientVitBlock(32), Head(32))


MODELS = {"repvgg": repvgg_net, "mobileone": mobileone_net, "acnet": acnet_net, "dbb": dbb_net,
          "repvit": repvit_net, "repghost": repghost_net, "fastvit": fastvit_net, "efficientvit": efficientvit_net}


def realistic(module: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking statistics and parameters: running mean/var not 0/1, random BN affine (a few negative
    scales), DBB's identity-based 1×1 weights away from zero. Returns the module in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.3)
                sign = torch.where(torch.rand(c, generator=g) < 0.15, -1.0, 1.0)
                m.weight.copy_(sign * (torch.rand(c, generator=g) + 0.5))
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
            elif isinstance(m, IdentityBasedConv1x1):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
            if isinstance(m, (RepMixer, FastVitBlock)):  # trained layer scales are far from their 1e-5 start
                m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=g) * 0.9 + 0.1)
    return module.eval()


def reparameterize_model(model: nn.Module) -> nn.Module:
    """A deploy copy: every block's own ``reparameterize()`` called (timm's ``reparameterize_model``)."""
    deploy = copy.deepcopy(model).eval()
    for m in deploy.modules():
        if isinstance(m, Reparameterizable):
            m.reparameterize()
    return deploy
