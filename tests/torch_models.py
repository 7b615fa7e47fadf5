"""PyTorch test models and helpers for tests/test_torch_fold.py.

Nothing here imports bnfold: the models, the BN randomisation and the float64 reference (the ORIGINAL module,
deep-copied, converted to float64 and put in eval mode) are independent of the code under test.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


# ================================================================================== frozen BatchNorm


class FrozenBatchNorm2d(nn.Module):
    """Like torchvision.ops.FrozenBatchNorm2d: statistics and affine parameters are BUFFERS, not parameters."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


BN_TYPES = (_BatchNorm, FrozenBatchNorm2d)


def is_bn(module: nn.Module) -> bool:
    return isinstance(module, BN_TYPES)


def bn_names(module: nn.Module) -> list[str]:
    """Qualified names of every BN-like submodule (used or not)."""
    return [name for name, m in module.named_modules() if is_bn(m)]


def count_bn_used(module: nn.Module) -> int:
    """BN layers the module actually runs: call sites in a torch.fx graph, else BN-like submodules."""
    if isinstance(module, torch.fx.GraphModule):
        n = 0
        for node in module.graph.nodes:
            if node.op == "call_module" and is_bn(module.get_submodule(node.target)):
                n += 1
            elif node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm):
                n += 1
        return n
    return len(bn_names(module))


def randomize_bn(module: nn.Module, seed: int = 0, *, scale: float = 1.0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters (negative scales included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if not is_bn(m):
                continue
            c = m.running_mean.shape[0] if m.running_mean is not None else m.num_features
            dt = next((t.dtype for t in (getattr(m, "weight", None), m.running_mean) if t is not None), torch.float32)
            if m.running_mean is not None:
                m.running_mean.copy_((torch.randn(c, generator=g) * 0.5).to(dt))
                m.running_var.copy_((torch.rand(c, generator=g) * 1.5 + 0.5).to(dt))
            if getattr(m, "weight", None) is not None:
                sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0)
                m.weight.copy_((sign * (torch.rand(c, generator=g) + 0.5) * scale).to(dt))
                m.bias.copy_((torch.randn(c, generator=g) * 0.5).to(dt))
    return module


def reference(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """The ORIGINAL module run in float64 in eval mode on a deep copy: the independent ground truth."""
    ref = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        return ref(*[x.double() for x in inputs])


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4, what: str = "") -> float:
    """|out - ref| <= rtol * max|ref| (tolerance relative to the output scale); returns the relative error."""
    assert out.shape == ref.shape, f"{what} shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o = out.detach().double()
    assert torch.isfinite(o).all(), f"{what} output has non-finite values"
    err = (o - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-6)
    assert err <= rtol * scale, f"{what} max abs error {err:.3g} > {rtol:g} * output scale {scale:.3g}"
    return err / scale


def snapshot(module: nn.Module) -> dict:
    """Everything fold_module(inplace=False) must leave untouched."""
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "dtypes": {k: v.dtype for k, v in module.state_dict().items()},
        "training": {n: m.training for n, m in module.named_modules()},
        "types": {n: type(m) for n, m in module.named_modules()},
        "param_ids": {n: id(p) for n, p in module.named_parameters()},
    }


def assert_unchanged(module: nn.Module, snap: dict) -> None:
    now = snapshot(module)
    assert now["types"] == snap["types"], "module structure changed"
    assert now["training"] == snap["training"], "training flags changed"
    assert now["param_ids"] == snap["param_ids"], "parameters were replaced"
    assert now["state"].keys() == snap["state"].keys(), "state_dict keys changed"
    assert now["dtypes"] == snap["dtypes"], "state_dict dtypes changed"
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), f"state_dict[{k!r}] changed"


# ================================================================================== small pair models


class Seq(nn.Sequential):
    """An nn.Sequential under a different name (so tests can tell it from bnfold's own Sequentials)."""


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module):
        super().__init__()
        self.conv = conv
        self.bn = bn

    def forward(self, x):
        return self.bn(self.conv(x))


class BNConv(nn.Module):
    def __init__(self, bn: nn.Module, conv: nn.Module):
        super().__init__()
        self.bn = bn
        self.conv = conv

    def forward(self, x):
        return self.conv(self.bn(x))


class BNFlattenLinear(nn.Module):
    """BN2d -> flatten (nn.Flatten or torch.flatten(x, 1)) -> Linear."""

    def __init__(self, c: int, hw: int, out: int, functional: bool, bias: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.flatten = None if functional else nn.Flatten()
        self.fc = nn.Linear(c * hw, out, bias=bias)
        self.functional = functional

    def forward(self, x):
        x = self.bn(x)
        x = torch.flatten(x, 1) if self.functional else self.flatten(x)
        return self.fc(x)


class ConvTwice(nn.Module):
    """One conv called twice; only the first call feeds a BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, y):
        return self.bn(self.conv(x)) + self.conv(y)


class LinearTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return torch.relu(self.fc(x)) - self.bn(self.fc(x * 2))


class ConvOutputReused(nn.Module):
    """The conv output feeds the BN AND a residual add: the BN can not be folded into the conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) + y


class BNOutputReused(nn.Module):
    """The BN output feeds the conv AND the return value: the BN must stay for the second user."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        z = self.bn(x)
        return self.conv(z) + z


class LinearOverLastAxis(nn.Module):
    """Linear over L on [N, C, L] followed by BatchNorm1d(C) over axis 1: NOT a linear-bn fold (C == L)."""

    def __init__(self, n: int = 6):
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.bn = nn.BatchNorm1d(n)

    def forward(self, x):
        return self.bn(self.fc(x))


class BN1dThenLinearOverLastAxis(nn.Module):
    """BatchNorm1d(C) on [N, C, L] then Linear over L: NOT a bn-linear fold (C == L)."""

    def __init__(self, n: int = 6):
        super().__init__()
        self.bn = nn.BatchNorm1d(n)
        self.fc = nn.Linear(n, n)

    def forward(self, x):
        return self.fc(self.bn(x))


# ================================================================================== whole models


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNetLike(nn.Module):
    """Stem conv-BN-ReLU-maxpool, residual blocks (one with a conv1x1+BN downsample shortcut), pool, fc.
    10 BN layers, every one directly after a conv whose only consumer it is."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2), BasicBlock(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def conv_bn_relu(cin, cout, k, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class MobileNetLike(nn.Module):
    """Depthwise-separable blocks (depthwise conv groups=C + pointwise conv, each with BN), global pool,
    Flatten, BatchNorm1d on [N, C], then the classifier Linear (bn-linear)."""

    def __init__(self, num_classes: int = 7):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(3, 8, 3, stride=2),
            conv_bn_relu(8, 8, 3, groups=8), conv_bn_relu(8, 16, 1),
            conv_bn_relu(16, 16, 3, stride=2, groups=16), conv_bn_relu(16, 24, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.bn = nn.BatchNorm1d(24)
        self.classifier = nn.Linear(24, num_classes)

    def forward(self, x):
        return self.classifier(self.bn(self.flatten(self.pool(self.features(x)))))


class MLP(nn.Module):
    """Linear-BN1d-ReLU twice (one Linear without bias), then a plain Linear."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Linear(32, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Linear(16, 4),
        )

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """ConvTranspose decoder: strided ConvTranspose-BN-ReLU, a grouped one, a depthwise one, a final projection."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.up3 = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=8)
        self.bn3 = nn.BatchNorm2d(8)
        self.out = nn.ConvTranspose2d(8, 3, 1)

    def forward(self, z):
        z = F.relu(self.bn1(self.up1(z)))
        z = F.relu(self.bn2(self.up2(z)))
        z = F.relu(self.bn3(self.up3(z)))
        return torch.tanh(self.out(z))


class ControlFlowNet(nn.Module):
    """Data-dependent ``if`` in forward (torch.fx can not trace it). Conv-BN pairs inside nn.Sequential blocks
    can still be folded; the conv/BN called directly from forward can not be proven adjacent."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pos = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.neg = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh())
        self.head = nn.Conv2d(8, 4, 1)
        self.head_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        flag = x.mean() > 0
        x = self.stem(x)
        if flag:
            x = self.pos(x)
        else:
            x = self.neg(x)
        return self.head_bn(self.head(x))


class SharedConvControlFlow(nn.Module):
    """Untraceable; the conv inside the Sequential is ALSO registered as ``self.side`` and called directly on the
    other branch, where it must keep its original weights."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.side = self.block[0]

    def forward(self, x):
        if x.mean() > 0:
            return self.block(x)
        return self.side(x)


# ================================================================================== adversarial data flow


class ConvBNBN(nn.Module):
    """Two BNs in a row after one conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4, eps=0.05)
        self.bn2 = nn.BatchNorm2d(4, eps=0.02)

    def forward(self, x):
        return self.bn2(self.bn1(self.conv(x)))


class SharedBN(nn.Module):
    """One BN module called at two sites: after a conv (foldable) and after a ReLU (not foldable)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, eps=0.05)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(torch.relu(x))


class ConvTwoBNs(nn.Module):
    """One conv called twice, each call followed by a different BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4, eps=0.05)
        self.bn_b = nn.BatchNorm2d(4, eps=0.05)

    def forward(self, x):
        return self.bn_a(self.conv(x)) * self.bn_b(self.conv(x + 1))


class ConvWeightReadElsewhere(nn.Module):
    """The conv's weight is also read directly in forward (a get_attr outside the conv call)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, eps=0.05)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.sum(dim=(1, 2, 3)).view(1, -1, 1, 1)


class TiedLinear(nn.Module):
    """Two Linear modules share ONE weight Parameter; only the first is followed by a BN."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6, eps=0.05)
        self.fc2 = nn.Linear(6, 6)
        self.fc2.weight = self.fc1.weight

    def forward(self, x):
        return self.bn(self.fc1(x)) + self.fc2(x)


class ScaledBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass whose forward is NOT plain BN."""

    def forward(self, x):
        return super().forward(x) * 2.0 + 1.0


class NotQuiteFrozenBN(FrozenBatchNorm2d):
    """Looks like a frozen BN (same buffers, eps) but ignores its bias."""

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        return x * (w * (rv + self.eps).rsqrt())


class FlattenKeepChannels(nn.Module):
    """BN2d(C) on [N, C, H, W], then a flatten that KEEPS the channel axis and a Linear over H*W (C == H*W):
    the Linear contracts the spatial axis, not the BN channel axis: no bn-linear fold."""

    def __init__(self, how: str):
        super().__init__()
        self.bn = nn.BatchNorm2d(4, eps=0.05)
        self.flat = nn.Flatten(2) if how == "nn.Flatten(2)" else None
        self.how = how
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.bn(x)
        if self.how == "torch.flatten(x, 2)":
            x = torch.flatten(x, 2)
        elif self.how == "x.flatten(2)":
            x = x.flatten(2)
        elif self.how == "reshape":
            x = x.reshape(x.shape[0], x.shape[1], -1)
        else:
            x = self.flat(x)
        return self.fc(x)


class LinearTransposeBN(nn.Module):
    """Linear over the last axis of [N, L, C], transposed to [N, C, L], then BatchNorm1d(C): not adjacent."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6, eps=0.05)

    def forward(self, x):
        return self.bn(self.fc(x).transpose(1, 2))


class ConvTransposeOutputSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(6, eps=0.05)

    def forward(self, x):
        return self.bn(self.up(x, output_size=[x.shape[2] * 2, x.shape[3] * 2]))


class UntraceableLinearBlocks(nn.Module):
    """Untraceable. ``pos`` (taken by positive inputs) gets rank-2 input; ``neg`` (only taken by negative inputs)
    is Linear over L on [N, C, L] then BatchNorm1d(C) with C == L: folding ``neg`` would be wrong."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6, eps=0.05))
        self.neg = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6, eps=0.05))

    def forward(self, x):  # x: [N, 6, 6]
        if x.mean() > 0:
            return self.pos(x.mean(dim=2)).unsqueeze(2) + x
        return self.neg(x)


class UntraceableMixedRanks(nn.Module):
    """Untraceable; one Sequential(Linear, BatchNorm1d) called on rank-2 AND rank-3 inputs."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6, eps=0.05))

    def forward(self, x):  # x: [N, 6, 6]
        if x.mean() > -100:
            return self.block(x) + self.block(x[:, :, 0]).unsqueeze(2)
        return x


class UntraceablePairs(nn.Module):
    """Untraceable; Sequential(BN, Conv padding 0), Sequential(BN, Conv padding 1), Sequential(Conv, BN, BN)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.BatchNorm2d(3, eps=0.05), nn.Conv2d(3, 4, 3))
        self.b = nn.Sequential(nn.BatchNorm2d(4, eps=0.05), nn.Conv2d(4, 4, 3, padding=1))
        self.c = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, eps=0.05), nn.BatchNorm2d(4, eps=0.02))

    def forward(self, x):
        x = self.c(self.b(self.a(x)))
        if x.sum() > 1e9:
            x = x * 0
        return x


# ============================================================ real architectures for verification (issue 12)
# Written here (torchvision is not a dependency): the same building blocks as torchvision's Inception v3,
# ResNet-50 and MobileNetV2, with fewer channels and blocks so the tests stay fast.


class BasicConv2d(nn.Module):
    """Inception's conv (no bias) -> BN(eps=0.001) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    """Inception v3's block A: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1, concatenated."""

    def __init__(self, cin: int, width: int):
        super().__init__()
        self.b1 = BasicConv2d(cin, width, 1)
        self.b5 = nn.Sequential(BasicConv2d(cin, width, 1), BasicConv2d(width, width, 5, padding=2))
        self.b3 = nn.Sequential(BasicConv2d(cin, width, 1), BasicConv2d(width, width, 3, padding=1),
                                BasicConv2d(width, width, 3, padding=1))
        self.pool = BasicConv2d(cin, width, 1)

    def forward(self, x):
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.b1(x), self.b5(x), self.b3(x), self.pool(pooled)], 1)


class InceptionLike(nn.Module):
    """Stem of BasicConv2d (stride 2, max pool), ``blocks`` Inception blocks, global pool, dropout-free fc."""

    def __init__(self, blocks: int = 3, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(BasicConv2d(3, 16, 3, stride=2), BasicConv2d(16, 16, 3, padding=1),
                                  nn.MaxPool2d(3, stride=2))
        layers, cin = [], 16
        for _ in range(blocks):
            layers.append(InceptionBlock(cin, width))
            cin = 4 * width
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4), each with BN, projection shortcut when needed."""

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50Like(nn.Module):
    """ResNet-50's layout (7x7 stem, max pool, four stages of bottlenecks, [3, 4, 6, 3] at full depth) with
    ``depths`` blocks per stage and base width ``width``."""

    def __init__(self, depths=(3, 4, 6, 3), width: int = 4, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4 * width, 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm2d(4 * width), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        stages, cin = [], 4 * width
        for i, depth in enumerate(depths):
            w = width * 2 ** i
            blocks = [Bottleneck(cin, w, stride=1 if i == 0 else 2)]
            blocks += [Bottleneck(4 * w, w) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = 4 * w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand -> 3x3 depthwise -> 1x1 project (no activation), residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 6):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(conv_bn_relu(cin, hidden, 1), conv_bn_relu(hidden, hidden, 3, stride, hidden),
                                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_res else out


class DeepMobileNet(nn.Module):
    """MobileNetV2's layout: stem, 17 inverted residual blocks in 7 stages, 1x1 head conv, pool, classifier;
    ``width`` divides the channel counts (53 BatchNorms at any width)."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        cin = 32 // width
        layers = [conv_bn_relu(3, cin, 3, stride=2)]
        for t, c, n, s in self.SETTINGS:
            cout = max(c // width, 2)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(conv_bn_relu(cin, 1280 // width, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280 // width, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def realistic_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights as initialized, and BN statistics like a trained network's: each BN's running mean and
    variance are those of its input on a random batch (so activations stay in range through any depth), with
    gamma U(0.5, 1.5) and beta N(0, 0.2). Eval mode on return."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, generator=g)
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives that batch's statistics
        module.train()
        module(torch.randn(8, 3, 64, 64, generator=g))
    return module.eval()


# ================================================================================== batch norms as computations
# Mimics of what real model libraries write (no timm/torchvision dependency): the batch norm is a computation of
# the forward, not always a BatchNorm module call.


class BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm2d subclass whose forward calls F.batch_norm on its own buffers, then
    dropout and an activation. torch.fx traces through it."""

    def __init__(self, num_features: int, eps: float = 1e-5, act: type | None = nn.ReLU, drop: float = 0.0):
        super().__init__(num_features, eps=eps)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, factor, self.eps)
        return self.act(self.drop(x))


def get_same_padding(size: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """Like timm's Conv2dSame (the ``tf_`` models): TensorFlow 'SAME' padding computed from the input size at run
    time. torch.fx can not trace it (it unpacks the input's size)."""

    def __init__(self, cin, cout, k, stride=1, groups=1, bias=False):
        super().__init__(cin, cout, k, stride, 0, 1, groups, bias)

    def forward(self, x):
        ih, iw = x.size()[-2:]
        pad_h = get_same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = get_same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class ConvNormAct(nn.Module):
    """timm's ConvNormAct: a conv and a BatchNormAct2d that holds the activation."""

    def __init__(self, cin, cout, k, stride=1, groups=1, act=nn.ReLU, same=False, bn=True):
        super().__init__()
        self.conv = (Conv2dSame(cin, cout, k, stride, groups, bias=not bn) if same else
                     nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=not bn))
        # bn=False: the BN-less definition of the same network (the activation where the norm layer was)
        self.bn = BatchNormAct2d(cout, act=act) if bn else act() if act is not None else nn.Identity()

    def forward(self, x):
        return self.bn(self.conv(x))


class SqueezeExcite(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class EfficientLike(nn.Module):
    """An EfficientNet-Lite-like net built from BatchNormAct2d (stem, depthwise-separable block with SE, inverted
    residual with a skip, head), a BatchNorm-free classifier. ``same=True`` uses Conv2dSame everywhere (the tf_
    variants), which torch.fx can not trace. 8 batch norms, all foldable into the conv before them. ``bn=False``:
    the BN-less definition of the same network (convs with biases, activations where the norm layers were)."""

    def __init__(self, same: bool = False, num_classes: int = 5, bn: bool = True):
        super().__init__()
        self.stem = ConvNormAct(3, 8, 3, stride=2, same=same, bn=bn)
        self.dw = ConvNormAct(8, 8, 3, groups=8, act=nn.ReLU6, same=same, bn=bn)
        self.se = SqueezeExcite(8, 4)
        self.pw = ConvNormAct(8, 8, 1, act=None, bn=bn)
        self.expand = ConvNormAct(8, 16, 1, bn=bn)
        self.dw2 = ConvNormAct(16, 16, 3, groups=16, same=same, bn=bn)
        self.project = ConvNormAct(16, 8, 1, act=None, bn=bn)
        self.head = ConvNormAct(8, 12, 1, act=nn.SiLU, bn=bn)
        self.classifier = nn.Linear(12, num_classes)
        self.head_bn = nn.BatchNorm1d(num_classes) if bn else nn.Identity()

    def forward(self, x):
        x = self.stem(x)
        x = self.pw(self.se(self.dw(x))) + x
        x = self.project(self.dw2(self.expand(x))) + x
        x = self.head(x).mean((2, 3))
        return self.head_bn(self.classifier(x))


class FunctionalBNNet(nn.Module):
    """Batch norms as functional calls on the module's own parameters and buffers: ``F.batch_norm`` after a conv,
    ``torch.batch_norm`` after a Linear (different argument order), and a training-mode call that must stay."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 4)
        g = torch.Generator().manual_seed(7)
        for name, c in (("a", 6), ("b", 4), ("c", 6)):  # non-trivial statistics and a negative scale
            self.register_buffer(f"{name}_mean", torch.randn(c, generator=g) * 0.5)
            self.register_buffer(f"{name}_var", torch.rand(c, generator=g) * 1.5 + 0.5)
            setattr(self, f"{name}_weight", nn.Parameter(torch.rand(c, generator=g) + 0.5))
            setattr(self, f"{name}_bias", nn.Parameter(torch.randn(c, generator=g) * 0.5))
        with torch.no_grad():
            self.a_weight[0] *= -1

    def forward(self, x):
        x = F.batch_norm(self.conv(x), self.a_mean, self.a_var, self.a_weight, self.a_bias, False, 0.1, 0.05)
        x = F.relu(x)
        y = self.conv2(x)
        # batch statistics: not a fold, whatever the mode
        y = F.batch_norm(y, None, None, self.c_weight, self.c_bias, True, 0.1, 0.05)
        v = self.fc(F.relu(y).mean((2, 3)))
        return torch.batch_norm(v, self.b_weight, self.b_bias, self.b_mean, self.b_var, False, 0.1, 0.02, False)


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """Like timm's FrozenBatchNormAct2d: the frozen arithmetic, then an activation, in one module."""

    def __init__(self, num_features: int, eps: float = 1e-5, act: type = nn.ReLU):
        super().__init__(num_features, eps)
        self.act = act()

    def forward(self, x):
        return self.act(super().forward(x))


class FrozenActNet(nn.Module):
    """Conv + FrozenBatchNormAct2d twice, a residual: the frozen batch norms are traced through as arithmetic."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = FrozenBatchNormAct2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = FrozenBatchNormAct2d(6, act=nn.SiLU)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(y)) + y


class FrozenResNetLike(nn.Module):
    """Residual blocks whose norms are torchvision-style FrozenBatchNorm2d (buffers and arithmetic), as detection
    backbones are shipped. ``same=True``: the first conv pads by input size (torch.fx can not trace it)."""

    def __init__(self, same: bool = False):
        super().__init__()
        self.conv1 = Conv2dSame(3, 8, 3) if same else nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = FrozenBatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(8)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        return F.relu(self.bn3(self.conv3(y)) + x)


class Conv1dNet(nn.Module):
    """1-D convs: Conv1d-BN1d-ReLU, a SyncBatchNorm (a plain BN in eval mode on CPU), BN1d before an unpadded
    Conv1d (bn-conv), a pre-activation BN1d that stays (ReLU between it and the conv)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.SyncBatchNorm(8)
        self.bn3 = nn.BatchNorm1d(8)
        self.conv3 = nn.Conv1d(8, 6, 1)
        self.bn4 = nn.BatchNorm1d(6)
        self.conv4 = nn.Conv1d(6, 6, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.conv3(self.bn3(x))
        return self.conv4(F.relu(self.bn4(x)))


class Conv3dNet(nn.Module):
    """3-D convs: Conv3d-BN3d, a depthwise Conv3d-BN3d, ConvTranspose3d-BN3d."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(6)
        self.dw = nn.Conv3d(6, 6, 3, padding=1, groups=6)
        self.bn2 = nn.BatchNorm3d(6)
        self.up = nn.ConvTranspose3d(6, 4, 2, stride=2)
        self.bn3 = nn.BatchNorm3d(4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.dw(x)))
        return self.bn3(self.up(x))


class ConvDropoutBN(nn.Module):
    """Conv, then eval-mode Dropout and Identity (the ONNX export drops both), then BN: the BN folds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout2d(0.3)
        self.aa = nn.Identity()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.aa(self.drop(self.conv(x))))


class RepVGGLike(nn.Module):
    """Two RepVGG train-time blocks: 3x3 conv + BN, 1x1 conv + BN and a BN-only identity branch, summed. The conv
    BNs fold; the identity-branch BNs stay (their output is summed, no linear op next to them) until a branch merge
    (issue 16) absorbs them. The ONNX route keeps them too."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.conv3 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            block.bn3 = BatchNormAct2d(c, act=None)
            block.conv1 = nn.Conv2d(c, c, 1, bias=False)
            block.bn1 = nn.BatchNorm2d(c)
            block.identity = nn.BatchNorm2d(c)
            self.blocks.append(block)

    def forward(self, x):
        for b in self.blocks:
            x = F.relu(b.bn3(b.conv3(x)) + b.bn1(b.conv1(x)) + b.identity(x))
        return x


class DenseLike(nn.Module):
    """DenseNet's pre-activation pattern: BN-ReLU-Conv on a concatenation. The BN can not fold (a ReLU between it
    and the conv, a concatenation before it); the ONNX route keeps it too."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(6)
        self.norm = nn.BatchNorm2d(9)
        self.conv = nn.Conv2d(9, 4, 3, padding=1)

    def forward(self, x):
        x = torch.cat([self.bn0(self.conv0(x)), x], 1)
        return self.conv(F.relu(self.norm(x)))


# ================================================================================== dispatch-level counter

# The ATen ops that compute a batch norm; which one a forward reaches depends on device, mode and torch version
# (eval on CPU reaches native_batch_norm in torch 2.13; exported graphs show _native_batch_norm_legit_no_training).
BATCH_NORM_OPS = ("batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                  "_native_batch_norm_legit_functional", "cudnn_batch_norm", "miopen_batch_norm",
                  "_batch_norm_impl_index", "_batch_norm_with_update", "_batch_norm_no_update")
_ROOTS = ("rsqrt", "sqrt")
_PASS_ON = ("add", "view", "reshape", "_reshape_alias", "_unsafe_view", "clone", "expand", "unsqueeze", "to",
            "_to_copy", "detach", "alias")


def count_bn_dispatched(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Batch-norm computations one forward of ``module`` runs, counted at the dispatcher like a profiler would:
    every ATen batch-norm op, plus the frozen batch-norm arithmetic as this project defines it (a square root of a
    buffer named ``running_var`` plus eps: that is where every frozen batch norm starts)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    variances = {b.untyped_storage().data_ptr() for name, b in module.named_buffers()
                 if name.rpartition(".")[2] == "running_var" and b.numel()}
    derived: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive so ids are not reused during the run)

    def from_variance(t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        if id(t) in derived:
            return True
        try:
            return t.untyped_storage().data_ptr() in variances
        except Exception:
            return False

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in BATCH_NORM_OPS:
                Counter.count += 1
            elif any(from_variance(a) for a in args):
                if name in _ROOTS:
                    Counter.count += 1
                elif name in _PASS_ON and isinstance(out, torch.Tensor):
                    derived[id(out)] = out
            return out

    with torch.no_grad(), Counter():
        module(*inputs)
    return Counter.count
