"""bnfold.torch.fold_module: every layer pair, every refusal, whole models, dtypes, export.

Ground truth is INDEPENDENT of bnfold: the ORIGINAL (unfolded) module, deep-copied, converted to float64 and put
in eval mode (tests/torch_models.reference). The FOLDED module, run in its own dtype, must match it within a
tolerance relative to the output scale (1e-4 for float32). Folded weights are also checked against float64 math
done here ("float64 math, cast once": within half an ulp of the exactly rounded value).
"""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bnfold.errors import InputError
from bnfold.report import FoldReport

try:
    from torch_models import (BatchNormAct2d, Conv1dNet, Conv3dNet, ConvDropoutBN, DenseLike, EfficientLike,
                              Conv2dSame, FrozenActNet, FrozenBatchNormAct2d, FrozenResNetLike,
                              FunctionalBNNet, RepVGGLike, count_bn_dispatched)
    from torch_models import (ConvBNBN, ConvTransposeOutputSize, ConvTwoBNs, ConvWeightReadElsewhere,
                              FlattenKeepChannels, LinearTransposeBN, NotQuiteFrozenBN, ScaledBN, SharedBN,
                              TiedLinear, UntraceableLinearBlocks, UntraceableMixedRanks, UntraceablePairs)
    from torch_models import (BN1dThenLinearOverLastAxis, BNConv, BNFlattenLinear, BNOutputReused, ConvBN,
                              ConvOutputReused, ConvTwice, ControlFlowNet, Decoder, FrozenBatchNorm2d,
                              LinearOverLastAxis, LinearTwice, MLP, MobileNetLike, ResNetLike,
                              SharedConvControlFlow, assert_close_to_ref, assert_unchanged, bn_names, count_bn_used,
                              randomize_bn, reference, snapshot)
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.torch_models import (BatchNormAct2d, Conv1dNet, Conv3dNet, ConvDropoutBN, DenseLike, EfficientLike,
                                    Conv2dSame, FrozenActNet, FrozenBatchNormAct2d, FrozenResNetLike,
                                    FunctionalBNNet, RepVGGLike, count_bn_dispatched)
    from tests.torch_models import (ConvBNBN, ConvTransposeOutputSize, ConvTwoBNs, ConvWeightReadElsewhere,
                                    FlattenKeepChannels, LinearTransposeBN, NotQuiteFrozenBN, ScaledBN, SharedBN,
                                    TiedLinear, UntraceableLinearBlocks, UntraceableMixedRanks, UntraceablePairs)
    from tests.torch_models import (BN1dThenLinearOverLastAxis, BNConv, BNFlattenLinear, BNOutputReused, ConvBN,
                                    ConvOutputReused, ConvTwice, ControlFlowNet, Decoder, FrozenBatchNorm2d,
                                    LinearOverLastAxis, LinearTwice, MLP, MobileNetLike, ResNetLike,
                                    SharedConvControlFlow, assert_close_to_ref, assert_unchanged, bn_names,
                                    count_bn_used, randomize_bn, reference, snapshot)

from bnfold.torch import fold_module
from bnfold.torch.ops import SKIP_CODES

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: [9], 2: [9, 8], 3: [7, 6, 5]}
EPS = 0.05  # large enough that a fold ignoring eps is off by far more than the tolerance


def make_bn(kind: str, nd: int, c: int) -> nn.Module:
    if kind == "bn":
        return BN[nd](c, eps=EPS)
    if kind == "sync":
        return nn.SyncBatchNorm(c, eps=EPS)  # in eval mode on CPU it is a plain BN
    if kind == "noaffine":
        return BN[nd](c, eps=EPS, affine=False)
    if kind == "frozen":
        assert nd == 2
        return FrozenBatchNorm2d(c, eps=EPS)
    raise ValueError(kind)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def folds(report: FoldReport) -> dict[str, tuple[str, str]]:
    return {f.bn: (f.into, f.rule) for f in report.folded}


def skips(report: FoldReport) -> dict[str, str]:
    return {s.bn: s.reason for s in report.skipped}


def skip_of(report: FoldReport, bn: str):
    found = [s for s in report.skipped if s.bn == bn]
    assert found, f"{bn} not in report.skipped: {report.to_dict()}"
    return found[0]


def fold_and_check(model: nn.Module, inputs, *, example: bool = True, rtol: float = 1e-4, seed: int = 0,
                   fresh: bool = True, count_check: bool = True, **kwargs):
    """Fold ``model`` (randomized BN, eval mode) and check the folded module against the float64 reference of the
    original on ``inputs`` and on fresh inputs of the same shapes. Returns (folded, report)."""
    inputs = tuple(inputs)
    ref = reference(model, *inputs)
    snap = snapshot(model)
    names_before = bn_names(model)
    dispatched_before = count_bn_dispatched(model, *inputs) if count_check else None
    folded, report = fold_module(model, inputs if example else None, **kwargs)
    if not kwargs.get("inplace"):
        assert_unchanged(model, snap)
    assert isinstance(report, FoldReport)
    with torch.no_grad():
        out = folded(*inputs)
    assert out.dtype == inputs[0].dtype
    assert_close_to_ref(out, ref, rtol, "folded vs float64 original:")
    if fresh:
        other = tuple(rand(*x.shape, seed=seed + 100 + i, dtype=x.dtype) * 2 + 0.3 for i, x in enumerate(inputs))
        with torch.no_grad():
            out2 = folded(*other)
        assert_close_to_ref(out2, reference(model, *other), rtol, "fresh inputs:")
    for skip in report.skipped:
        assert skip.code in SKIP_CODES, f"skip of {skip.bn} has no documented code: {skip}"
    if count_check:
        # the report's counts are what the forward runs, counted at the dispatcher (without any trace, bnfold can
        # only count modules: a data-dependent forward runs different batch norms for different inputs)
        if not any("nn.Sequential containers only" in note for note in report.notes):
            assert report.bn_before == dispatched_before, report.to_dict()
            assert report.bn_after == count_bn_dispatched(folded, *inputs), report.to_dict()
        # the report's counts agree with the module
        assert report.bn_before == len(names_before)
        assert report.bn_after == count_bn_used(folded), report.to_dict()
        # every BN of the original is accounted for, under its qualified name (a BN a merge absorbed is a fold by
        # the merge's rule; merges themselves are in report.merged)
        accounted = {f.bn for f in report.folded} | {s.bn for s in report.skipped}
        assert accounted == set(names_before), report.to_dict()
    # checked last so that a failure here does not hide the numerics above
    training = [n for n, m in folded.named_modules() if m.training]
    assert not training, f"result is not in eval mode: submodules {training} are in training mode"
    return folded, report


def input_for(nd: int, c: int, n: int = 2, seed: int = 1):
    return rand(n, c, *SPATIAL[nd], seed=seed)


def assert_half_ulp(actual: torch.Tensor, exact64: torch.Tensor, slack64: torch.Tensor | float = 0.0):
    """``actual`` is ``exact64`` rounded ONCE to actual.dtype (within half an ulp, plus float64 slack)."""
    assert actual.shape == exact64.shape
    rounded = exact64.to(actual.dtype)
    ulp = (torch.nextafter(rounded.abs(), torch.tensor(float("inf"), dtype=actual.dtype)) - rounded.abs()).double()
    err = (actual.double() - exact64).abs()
    bound = 0.5 * ulp + 1e-12 * exact64.abs() + slack64
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} values not rounded once from float64: "
                           f"worst error {(err / ulp).max().item():.3g} ulp")


def bn_affine64(bn: nn.Module):
    """(s, t) of an eval-mode BN in float64, computed here."""
    mean, var = bn.running_mean.double(), bn.running_var.double()
    w = bn.weight.double() if getattr(bn, "weight", None) is not None else torch.ones_like(mean)
    b = bn.bias.double() if getattr(bn, "bias", None) is not None else torch.zeros_like(mean)
    s = w / torch.sqrt(var + bn.eps)
    return s, b - mean * s


# =============================================================================================== conv -> BN

CONV_CFGS = [  # (cin, cout, groups, bias, dilation)
    pytest.param(4, 6, 1, True, 1, id="plain"),
    pytest.param(4, 6, 2, False, 1, id="grouped-nobias"),
    pytest.param(4, 4, 4, True, 2, id="depthwise-dilated"),
    pytest.param(3, 6, 3, False, 1, id="depthwise-x2-nobias"),
]


@pytest.mark.parametrize("kind", ["bn", "sync", "noaffine"])
@pytest.mark.parametrize("cin,cout,groups,bias,dilation", CONV_CFGS)
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_bn(nd, cin, cout, groups, bias, dilation, kind):
    torch.manual_seed(nd * 10 + groups)
    conv = CONV[nd](cin, cout, 3, stride=2, padding=1, dilation=dilation, groups=groups, bias=bias)
    model = randomize_bn(ConvBN(conv, make_bn(kind, nd, cout)), seed=groups).eval()
    folded, report = fold_and_check(model, [input_for(nd, cin)])
    assert folds(report) == {"bn": ("conv", "conv-bn")}
    assert report.skipped == []
    assert report.bn_after == 0


@pytest.mark.parametrize("cin,cout,groups,bias,dilation", CONV_CFGS)
def test_conv_bn_frozen(cin, cout, groups, bias, dilation):
    torch.manual_seed(groups)
    conv = nn.Conv2d(cin, cout, 3, padding=1, dilation=dilation, groups=groups, bias=bias)
    model = randomize_bn(ConvBN(conv, FrozenBatchNorm2d(cout, eps=EPS)), seed=3).eval()
    folded, report = fold_and_check(model, [input_for(2, cin)])
    assert folds(report) == {"bn": ("conv", "conv-bn")}
    assert report.bn_after == 0


@pytest.mark.parametrize("kind", ["bn", "frozen", "noaffine"])
def test_conv_bn_weights_are_float64_math_cast_once(kind):
    torch.manual_seed(7)
    conv = nn.Conv2d(5, 6, 3, padding=1, bias=True)
    model = randomize_bn(ConvBN(conv, make_bn(kind, 2, 6)), seed=7).eval()
    folded, report = fold_and_check(model, [input_for(2, 5)])
    s, t = bn_affine64(model.bn)
    layer = folded.get_submodule(report.folded[0].into)
    w64, b64 = conv.weight.double(), conv.bias.double()
    assert layer.weight.dtype == torch.float32 and layer.bias.dtype == torch.float32
    assert_half_ulp(layer.weight.detach(), w64 * s.view(-1, 1, 1, 1))
    assert_half_ulp(layer.bias.detach(), b64 * s + t, 1e-14 * (b64.abs() * s.abs() + t.abs()))


@pytest.mark.parametrize("nd", [2, 3])
def test_conv_bn_without_example_inputs(nd):
    """Conv2d/Conv3d -> BN2d/BN3d: the ranks are implied (BN2d/3d only accept batched input): folded."""
    torch.manual_seed(nd)
    model = randomize_bn(ConvBN(CONV[nd](3, 4, 3, padding=1), BN[nd](4, eps=EPS)), seed=nd).eval()
    folded, report = fold_and_check(model, [input_for(nd, 3)], example=False)
    assert folds(report) == {"bn": ("conv", "conv-bn")}


@pytest.mark.parametrize("layer", ["conv", "convtranspose"])
def test_conv1d_bn1d_without_example_inputs_is_refused(layer):
    """Conv1d accepts unbatched [C, L] input, on which BatchNorm1d normalizes L: needs example_inputs."""
    torch.manual_seed(1)
    conv = nn.Conv1d(3, 4, 3) if layer == "conv" else nn.ConvTranspose1d(3, 4, 3)
    model = randomize_bn(ConvBN(conv, nn.BatchNorm1d(4, eps=EPS)), seed=1).eval()
    folded, report = fold_and_check(model, [input_for(1, 3)], example=False)
    assert report.folded == []
    skip = skip_of(report, "bn")
    assert "example_inputs" in skip.reason
    assert skip.op_type == "BatchNorm1d"
    assert report.bn_after == 1
    # and with example_inputs it folds
    _, report2 = fold_and_check(model, [input_for(1, 3)])
    assert folds(report2) == {"bn": ("conv", f"{layer}-bn")}


# ====================================================================================== convtranspose -> BN


@pytest.mark.parametrize("kind", ["bn", "sync", "noaffine"])
@pytest.mark.parametrize("cin,cout,groups,bias,dilation", CONV_CFGS)
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_convtranspose_bn(nd, cin, cout, groups, bias, dilation, kind):
    torch.manual_seed(nd * 10 + groups + 1)
    conv = CONVT[nd](cin, cout, 3, stride=2, padding=1, output_padding=1, dilation=dilation, groups=groups,
                     bias=bias)
    model = randomize_bn(ConvBN(conv, make_bn(kind, nd, cout)), seed=groups + 1).eval()
    folded, report = fold_and_check(model, [input_for(nd, cin, seed=4)])
    assert folds(report) == {"bn": ("conv", "convtranspose-bn")}
    assert report.skipped == []
    assert report.bn_after == 0


@pytest.mark.parametrize("cin,cout,groups,bias,dilation", CONV_CFGS)
def test_convtranspose_bn_frozen(cin, cout, groups, bias, dilation):
    torch.manual_seed(groups + 5)
    conv = nn.ConvTranspose2d(cin, cout, 3, stride=2, dilation=dilation, groups=groups, bias=bias)
    model = randomize_bn(ConvBN(conv, FrozenBatchNorm2d(cout, eps=EPS)), seed=5).eval()
    folded, report = fold_and_check(model, [input_for(2, cin)])
    assert folds(report) == {"bn": ("conv", "convtranspose-bn")}


def test_convtranspose_grouped_weights_cast_once():
    """ConvTranspose weight is [C_in, C_out/g, k...]: output channel c of group g is column c - g*C_out/g."""
    torch.manual_seed(11)
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2, bias=True)
    model = randomize_bn(ConvBN(conv, nn.BatchNorm2d(6, eps=EPS)), seed=11).eval()
    folded, report = fold_and_check(model, [input_for(2, 4)])
    s, t = bn_affine64(model.bn)
    layer = folded.get_submodule(report.folded[0].into)
    per_group = s.view(2, 1, 3, 1, 1)  # [g, 1, C_out/g, 1, 1] against weight viewed [g, C_in/g, C_out/g, k, k]
    exact = (conv.weight.double().view(2, 2, 3, 3, 3) * per_group).view(4, 3, 3, 3)
    assert_half_ulp(layer.weight.detach(), exact)
    b64 = conv.bias.double()
    assert_half_ulp(layer.bias.detach(), b64 * s + t, 1e-14 * (b64.abs() * s.abs() + t.abs()))


# ============================================================================================ Linear -> BN1d


@pytest.mark.parametrize("kind", ["bn", "sync", "noaffine"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn(bias, kind):
    torch.manual_seed(int(bias))
    model = randomize_bn(ConvBN(nn.Linear(7, 5, bias=bias), make_bn(kind, 1, 5)), seed=2).eval()
    folded, report = fold_and_check(model, [rand(4, 7, seed=3)])
    assert folds(report) == {"bn": ("conv", "linear-bn")}
    assert report.bn_after == 0
    s, t = bn_affine64(model.bn)
    layer = folded.get_submodule("conv")
    assert_half_ulp(layer.weight.detach(), model.conv.weight.double() * s[:, None])


def test_linear_bn_without_example_inputs_is_refused():
    model = randomize_bn(ConvBN(nn.Linear(7, 5), nn.BatchNorm1d(5, eps=EPS)), seed=2).eval()
    folded, report = fold_and_check(model, [rand(4, 7, seed=3)], example=False)
    assert report.folded == []
    skip = skip_of(report, "bn")
    assert "example_inputs" in skip.reason
    assert skip.op_type == "BatchNorm1d"
    assert report.bn_after == 1


@pytest.mark.parametrize("example", [True, False])
def test_bn1d_over_wrong_axis_is_not_folded(example):
    """Linear over L on [N, C, L], BatchNorm1d(C) normalizes axis 1: sizes match (C == L) but it is no fold."""
    torch.manual_seed(5)
    model = randomize_bn(LinearOverLastAxis(6), seed=5).eval()
    folded, report = fold_and_check(model, [rand(3, 6, 6, seed=5)], example=example)
    assert report.folded == []
    skip = skip_of(report, "bn")
    assert skip.op_type == "BatchNorm1d" and skip.reason
    if not example:
        assert "example_inputs" in skip.reason
    assert report.bn_after == 1


def test_bn1d_on_rank3_then_linear_over_last_axis_is_not_folded():
    torch.manual_seed(6)
    model = randomize_bn(BN1dThenLinearOverLastAxis(6), seed=6).eval()
    folded, report = fold_and_check(model, [rand(3, 6, 6, seed=6)])
    assert report.folded == []
    assert skip_of(report, "bn").reason
    assert report.bn_after == 1


# ================================================================================================ BN -> conv


@pytest.mark.parametrize("kind", ["bn", "sync", "noaffine"])
@pytest.mark.parametrize("groups,bias,stride,dilation", [(1, True, 1, 1), (2, False, 2, 1), (4, True, 1, 2)])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_bn_conv(nd, groups, bias, stride, dilation, kind):
    torch.manual_seed(nd + groups)
    conv = CONV[nd](4, 8, 3, stride=stride, padding=0, dilation=dilation, groups=groups, bias=bias)
    model = randomize_bn(BNConv(make_bn(kind, nd, 4), conv), seed=nd).eval()
    folded, report = fold_and_check(model, [input_for(nd, 4)])
    assert folds(report) == {"bn": ("conv", "bn-conv")}
    assert report.bn_after == 0


def test_bn_conv_frozen_weights_cast_once():
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, groups=2, bias=True)
    model = randomize_bn(BNConv(FrozenBatchNorm2d(4, eps=EPS), conv), seed=9).eval()
    folded, report = fold_and_check(model, [input_for(2, 4)])
    assert folds(report) == {"bn": ("conv", "bn-conv")}
    s, t = bn_affine64(model.bn)
    layer = folded.get_submodule("conv")
    w64 = conv.weight.double()  # [6, 2, 3, 3]: rows 0-2 read channels 0-1, rows 3-5 read channels 2-3
    sg = s.view(2, 1, 2, 1, 1)
    exact_w = (w64.view(2, 3, 2, 3, 3) * sg).view(6, 2, 3, 3)
    assert_half_ulp(layer.weight.detach(), exact_w)
    exact_b = conv.bias.double() + (w64.view(2, 3, 2, 3, 3) * t.view(2, 1, 2, 1, 1)).sum(dim=(2, 3, 4)).view(6)
    slack = 1e-13 * (w64.abs().view(2, 3, 2, 3, 3) * t.abs().view(2, 1, 2, 1, 1)).sum(dim=(2, 3, 4)).view(6)
    assert_half_ulp(layer.bias.detach(), exact_b, slack)


@pytest.mark.parametrize("padding", [1, (0, 1), "same"])
def test_bn_conv_with_padding_is_refused(padding):
    """Zero padding is added AFTER the BN: padded positions never saw the shift, so the fold is not exact."""
    torch.manual_seed(4)
    model = randomize_bn(BNConv(nn.BatchNorm2d(4, eps=EPS), nn.Conv2d(4, 6, 3, padding=padding)), seed=4).eval()
    folded, report = fold_and_check(model, [input_for(2, 4)])
    assert report.folded == []
    skip = skip_of(report, "bn")
    assert "padding" in skip.reason.lower()
    assert skip.op_type == "BatchNorm2d"
    assert report.bn_after == 1


# ============================================================================================== BN -> Linear


@pytest.mark.parametrize("kind", ["bn", "sync", "noaffine"])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_linear(bias, kind):
    torch.manual_seed(8)
    model = randomize_bn(BNConv(make_bn(kind, 1, 8), nn.Linear(8, 5, bias=bias)), seed=8).eval()
    folded, report = fold_and_check(model, [rand(4, 8, seed=8)])
    assert folds(report) == {"bn": ("conv", "bn-linear")}
    assert report.bn_after == 0


@pytest.mark.parametrize("functional", [False, True], ids=["nn.Flatten", "torch.flatten"])
@pytest.mark.parametrize("bias", [True, False])
def test_bn2d_flatten_linear(functional, bias):
    torch.manual_seed(9)
    model = randomize_bn(BNFlattenLinear(4, 6, 5, functional=functional, bias=bias), seed=9).eval()
    folded, report = fold_and_check(model, [rand(3, 4, 2, 3, seed=9)])
    assert folds(report) == {"bn": ("fc", "bn-linear")}
    assert report.bn_after == 0
    # each BN channel c scales the H*W consecutive Linear columns it flattens to
    s, t = bn_affine64(model.bn)
    layer = folded.get_submodule("fc")
    assert_half_ulp(layer.weight.detach(), model.fc.weight.double() * s.repeat_interleave(6)[None, :])


def test_frozen_bn2d_flatten_linear():
    torch.manual_seed(10)
    model = BNFlattenLinear(4, 6, 5, functional=True)
    model.bn = FrozenBatchNorm2d(4, eps=EPS)
    model = randomize_bn(model, seed=10).eval()
    folded, report = fold_and_check(model, [rand(3, 4, 2, 3, seed=10)])
    assert folds(report) == {"bn": ("fc", "bn-linear")}


# ================================================================================================ refusals


def test_track_running_stats_false_is_refused():
    """Without running statistics BN normalizes with batch statistics even in eval: not an affine."""
    torch.manual_seed(12)
    model = ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=EPS, track_running_stats=False)).eval()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.normal_()
    folded, report = fold_and_check(model, [input_for(2, 3, n=4)], fresh=True)
    assert report.folded == []
    skip = skip_of(report, "bn")
    assert re.search(r"running|statistic", skip.reason, re.I), skip.reason
    assert skip.op_type == "BatchNorm2d"
    assert report.bn_after == 1


def test_conv_output_with_other_users_is_refused():
    torch.manual_seed(13)
    model = randomize_bn(ConvOutputReused(), seed=13).eval()
    folded, report = fold_and_check(model, [input_for(2, 4)])
    assert report.folded == []
    skip = skip_of(report, "bn")
    assert skip.reason and skip.op_type == "BatchNorm2d"
    assert report.bn_after == 1


def test_bn_output_with_other_users_keeps_the_bn():
    torch.manual_seed(14)
    model = randomize_bn(BNOutputReused(), seed=14).eval()
    folded, report = fold_and_check(model, [input_for(2, 4)], merge=False)
    assert report.bn_after == 1  # the second user needs the BN output
    # conv(z) + z is one 1x1 conv of z, and the BN then folds into it (bnfold.torch.merge)
    folded, report = fold_and_check(model, [input_for(2, 4)])
    assert report.bn_after == 0 and {m.rule for m in report.merged} == {"merge-branches", "merge-sequential"}
    assert [f.rule for f in report.folded] == ["merge-sequential"]  # the BN went with the sequential merge


def test_conv_called_twice_keeps_original_weights_for_the_other_call():
    """conv(x) -> BN and conv(y) without BN: folding in place would corrupt conv(y). bnfold may fold a copy for
    the BN call site or refuse; either way the function stays the same."""
    torch.manual_seed(15)
    model = randomize_bn(ConvTwice(), seed=15).eval()
    x, y = input_for(2, 3, seed=1), input_for(2, 3, seed=2) * 3 - 1
    folded, report = fold_and_check(model, [x, y])
    if report.folded:
        assert folds(report)["bn"][1] == "conv-bn"
        assert report.bn_after == 0
    else:
        assert skip_of(report, "bn").reason
    # the y path alone still gives the original conv
    with torch.no_grad():
        zero_x = torch.zeros_like(x)
        got = folded(zero_x, y) - folded(zero_x, torch.zeros_like(y))
        want = reference(model, zero_x, y) - reference(model, zero_x, torch.zeros_like(y))
    assert_close_to_ref(got, want, 1e-4, "conv(y) path:")
    folded.load_state_dict(folded.state_dict())


def test_linear_called_twice():
    torch.manual_seed(16)
    model = randomize_bn(LinearTwice(), seed=16).eval()
    folded, report = fold_and_check(model, [rand(4, 6, seed=16)])
    if report.folded:
        assert folds(report)["bn"][1] == "linear-bn"
    folded.load_state_dict(folded.state_dict())


def test_lonely_bn_is_reported():
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3, eps=EPS), nn.ReLU(), nn.MaxPool2d(2)), seed=17).eval()
    folded, report = fold_and_check(model, [input_for(2, 3)])
    assert report.folded == []
    assert skip_of(report, "0").op_type == "BatchNorm2d"
    assert report.bn_after == 1


def overflow_model(layer: str):
    """Folded fp16 weights overflow (|s*W| ~ 1.4e5 > 65504) although the unfolded fp16 model is finite."""
    if layer == "conv":
        model = ConvBN(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
        x = rand(2, 3, 6, 6, seed=18) * 1e-2
    else:
        model = ConvBN(nn.Linear(6, 4, bias=False), nn.BatchNorm1d(4))
        x = rand(5, 6, seed=18) * 1e-2
    with torch.no_grad():
        model.conv.weight.copy_(torch.where(torch.rand(model.conv.weight.shape) < 0.5, -20.0, 20.0))
        model.bn.running_mean.zero_()
        model.bn.running_var.fill_(1.0)
        model.bn.weight.fill_(7000.0)
        model.bn.bias.fill_(0.5)
    return model.half().eval(), x.half()


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_fp16_overflow_is_refused(layer):
    model, x = overflow_model(layer)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()  # the unfolded model is fine in fp16
    folded, report = fold_and_check(model, [x], rtol=2e-2, fresh=False)
    assert report.folded == []
    skip = skip_of(report, "bn")
    assert "overflow" in skip.reason.lower(), skip.reason
    assert report.bn_after == 1
    for p in folded.parameters():
        assert p.dtype == torch.float16 and torch.isfinite(p).all()


# ========================================================================================= mode, inplace


def test_training_mode_raises_input_error():
    model = randomize_bn(ResNetLike(), seed=19)
    model.train()
    snap = snapshot(model)
    x = rand(2, 3, 16, 16, seed=19)
    with pytest.raises(InputError):
        fold_module(model, (x,))
    with pytest.raises(InputError):
        fold_module(model)
    assert_unchanged(model, snap)


def test_allow_train_returns_eval_copy_and_leaves_input_alone():
    model = randomize_bn(ResNetLike(), seed=20)
    model.train()
    snap = snapshot(model)  # running stats included: a forward in training mode would change them
    x = rand(2, 3, 16, 16, seed=20)
    ref = reference(model, x)
    folded, report = fold_module(model, (x,), allow_train=True)
    assert_unchanged(model, snap)
    assert model.training and all(m.training for m in model.modules())
    assert not any(m.training for m in folded.modules())
    assert report.bn_after == 0 and len(report.folded) == 10
    with torch.no_grad():
        assert_close_to_ref(folded(x), ref, 1e-4)


def test_not_mutated_by_default():
    model = randomize_bn(MobileNetLike(), seed=21).eval()
    x = rand(2, 3, 16, 16, seed=21)
    snap = snapshot(model)
    with torch.no_grad():
        before = model(x).clone()
    folded, report = fold_module(model, (x,))
    assert_unchanged(model, snap)
    assert folded is not model
    with torch.no_grad():
        assert torch.equal(model(x), before)
    # the folded module shares no storage with the original
    original_ptrs = {t.data_ptr() for t in model.state_dict().values() if t.numel()}
    assert not original_ptrs & {t.data_ptr() for t in folded.state_dict().values() if t.numel()}


def test_inplace():
    model = randomize_bn(ResNetLike(), seed=22).eval()
    x = rand(2, 3, 16, 16, seed=22)
    ref = reference(model, x)
    folded, report = fold_module(model, (x,), inplace=True)
    assert report.bn_after == 0 and len(report.folded) == 10
    assert count_bn_used(folded) == 0
    with torch.no_grad():
        assert_close_to_ref(folded(x), ref, 1e-4)


# =================================================================================================== dtypes


def test_float64_model():
    model = randomize_bn(ResNetLike(), seed=23).double().eval()
    x = rand(2, 3, 16, 16, seed=23, dtype=torch.float64)
    folded, report = fold_and_check(model, [x], rtol=1e-10)
    assert report.bn_after == 0
    assert all(v.dtype == torch.float64 for v in folded.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("pair", ["conv-bn", "convtranspose-bn", "linear-bn", "bn-conv"])
def test_half_precision(pair, dtype, rtol):
    """fp16/bf16 run on CPU in torch 2.13 (conv, conv-transpose, linear, BN kernels all exist): the folded module
    runs in the same dtype and is compared with the float64 original; folded weights are float64 math rounded
    once to the dtype."""
    torch.manual_seed(24)
    if pair == "conv-bn":
        model, x = ConvBN(nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6, eps=EPS)), input_for(2, 4)
    elif pair == "convtranspose-bn":
        model, x = ConvBN(nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6, eps=EPS)), input_for(2, 4)
    elif pair == "linear-bn":
        model, x = ConvBN(nn.Linear(7, 5), nn.BatchNorm1d(5, eps=EPS)), rand(4, 7, seed=24)
    else:
        model, x = BNConv(nn.BatchNorm2d(4, eps=EPS), nn.Conv2d(4, 6, 1)), input_for(2, 4)
    model = randomize_bn(model, seed=24).to(dtype).eval()
    x = x.to(dtype)
    folded, report = fold_and_check(model, [x], rtol=rtol)
    assert [f.rule for f in report.folded] == [pair]
    assert all(v.dtype == dtype for v in folded.state_dict().values() if v.is_floating_point())
    if pair in ("conv-bn", "linear-bn"):
        s, _ = bn_affine64(model.bn)
        layer = folded.get_submodule("conv")
        w = model.conv.weight.double()
        assert_half_ulp(layer.weight.detach(), w * s.view(-1, *([1] * (w.dim() - 1))))


# ===================================================================== state_dict, export, leftover modules


def test_state_dict_round_trip():
    model = randomize_bn(ResNetLike(), seed=25).eval()
    x = rand(2, 3, 16, 16, seed=25)
    folded, _ = fold_module(model, (x,))
    with torch.no_grad():
        before = folded(x).clone()
    sd = folded.state_dict()
    folded.load_state_dict(sd)  # strict
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = copy.deepcopy(folded)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(torch.load(buf))
    with torch.no_grad():
        assert torch.equal(folded(x), before)
        assert torch.equal(other(x), before)


def test_folded_bn_modules_are_gone():
    """A fully folded model carries no BN submodule and no BN buffers in its state_dict."""
    model = randomize_bn(ResNetLike(), seed=26).eval()
    x = rand(2, 3, 16, 16, seed=26)
    folded, report = fold_module(model, (x,))
    assert report.bn_after == 0
    assert bn_names(folded) == []
    assert not [k for k in folded.state_dict() if "running_" in k or "num_batches_tracked" in k]


def test_torch_export():
    model = randomize_bn(ResNetLike(), seed=27).eval()
    x = rand(2, 3, 16, 16, seed=27)
    ref = reference(model, x)
    folded, report = fold_module(model, (x,))
    ep = torch.export.export(folded, (x,))
    assert not [n for n in ep.graph.nodes if "batch_norm" in str(n.target)]
    with torch.no_grad():
        assert_close_to_ref(ep.module()(x), ref, 1e-4, "exported:")


def test_onnx_export_dynamo(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = randomize_bn(MobileNetLike(), seed=28).eval()
    x = rand(2, 3, 16, 16, seed=28)
    ref = reference(model, x)
    folded, report = fold_module(model, (x,))
    assert report.bn_after == 0
    path = tmp_path / "folded.onnx"
    torch.onnx.export(folded, (x,), str(path), dynamo=True)
    proto = onnx.load(str(path))
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert_close_to_ref(torch.from_numpy(out), ref, 1e-4, "onnxruntime:")


# ============================================================================================ whole models


def test_resnet_like():
    model = randomize_bn(ResNetLike(), seed=29).eval()
    folded, report = fold_and_check(model, [rand(2, 3, 16, 16, seed=29)])
    assert isinstance(folded, torch.fx.GraphModule)
    expected = {"bn1": ("conv1", "conv-bn")}
    for layer, blocks in (("layer1", 2), ("layer2", 2)):
        for b in range(blocks):
            for i in (1, 2):
                expected[f"{layer}.{b}.bn{i}"] = (f"{layer}.{b}.conv{i}", "conv-bn")
    expected["layer2.0.downsample.1"] = ("layer2.0.downsample.0", "conv-bn")
    assert folds(report) == expected
    assert report.bn_before == 10 and report.bn_after == 0 and report.skipped == []


def test_resnet_like_without_example_inputs():
    model = randomize_bn(ResNetLike(), seed=30).eval()
    folded, report = fold_and_check(model, [rand(2, 3, 16, 16, seed=30)], example=False)
    assert report.bn_after == 0 and len(report.folded) == 10


def test_mobilenet_like():
    model = randomize_bn(MobileNetLike(), seed=31).eval()
    folded, report = fold_and_check(model, [rand(2, 3, 16, 16, seed=31)])
    expected = {f"features.{i}.1": (f"features.{i}.0", "conv-bn") for i in range(5)}
    expected["bn"] = ("classifier", "bn-linear")
    assert folds(report) == expected
    assert report.bn_after == 0


def test_mlp():
    model = randomize_bn(MLP(), seed=32).eval()
    folded, report = fold_and_check(model, [rand(8, 10, seed=32)])
    assert folds(report) == {"net.1": ("net.0", "linear-bn"), "net.4": ("net.3", "linear-bn")}
    assert report.bn_after == 0


def test_mlp_batch_of_one():
    """Eval-mode BatchNorm1d accepts a batch of one; the folded model must too."""
    model = randomize_bn(MLP(), seed=33).eval()
    folded, report = fold_and_check(model, [rand(1, 10, seed=33)])
    assert report.bn_after == 0


def test_convtranspose_decoder():
    model = randomize_bn(Decoder(), seed=34).eval()
    folded, report = fold_and_check(model, [rand(2, 16, 4, 4, seed=34)])
    assert folds(report) == {f"bn{i}": (f"up{i}", "convtranspose-bn") for i in (1, 2, 3)}
    assert report.bn_after == 0


@pytest.mark.parametrize("example", [False, True])
def test_control_flow_falls_back_to_sequential(example):
    model = randomize_bn(ControlFlowNet(), seed=35).eval()
    x_pos = rand(2, 3, 8, 8, seed=35).abs() + 0.1
    x_neg = -x_pos
    folded, report = fold_and_check(model, [x_pos], example=example, fresh=False)
    assert not isinstance(folded, torch.fx.GraphModule)
    with torch.no_grad():
        assert_close_to_ref(folded(x_neg), reference(model, x_neg), 1e-4, "other branch:")
    got = folds(report)
    must = {"stem.1": ("stem.0", "conv-bn"), "pos.1": ("pos.0", "conv-bn"), "pos.4": ("pos.3", "conv-bn")}
    assert {k: got[k] for k in must if k in got} == must, report.to_dict()
    if not example:  # conv2d -> BN2d needs no ranks
        assert got.get("neg.1") == ("neg.0", "conv-bn")
    assert "head_bn" in skips(report)
    assert report.bn_before == 5
    assert report.bn_after == 5 - len(report.folded) == len(report.skipped)


def test_control_flow_shared_conv_keeps_original_weights():
    model = randomize_bn(SharedConvControlFlow(), seed=36).eval()
    x_pos = rand(2, 3, 6, 6, seed=36).abs() + 0.1
    folded, report = fold_and_check(model, [x_pos], fresh=False)
    with torch.no_grad():
        assert_close_to_ref(folded(-x_pos), reference(model, -x_pos), 1e-4, "side conv:")


# ================================================================================= adversarial data flow


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_conv_bn_with_padding_mode(padding_mode):
    """conv-bn scales the conv's output channels: the conv's own padding mode does not matter."""
    torch.manual_seed(40)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    model = randomize_bn(ConvBN(conv, nn.BatchNorm2d(4, eps=EPS)), seed=40).eval()
    folded, report = fold_and_check(model, [input_for(2, 3)])
    assert folds(report) == {"bn": ("conv", "conv-bn")}


def test_conv_bn_bn():
    model = randomize_bn(ConvBNBN(), seed=41).eval()
    folded, report = fold_and_check(model, [input_for(2, 3)])
    assert folds(report)["bn1"] == ("conv", "conv-bn")


def test_shared_bn_module_called_twice():
    """One BN module at two call sites; folding the first site must leave the BN working at the second."""
    model = randomize_bn(SharedBN(), seed=42).eval()
    # bn_before may count modules (1) or call sites (2): not checked here
    folded, report = fold_and_check(model, [input_for(2, 4)], count_check=False)
    assert report.bn_after == count_bn_used(folded) >= 1
    assert {f.bn for f in report.folded} | {s.bn for s in report.skipped} == {"bn"}


def test_conv_called_twice_with_two_bns():
    model = randomize_bn(ConvTwoBNs(), seed=43).eval()
    folded, report = fold_and_check(model, [input_for(2, 3)])
    folded.load_state_dict(folded.state_dict())


def test_conv_weight_read_elsewhere():
    """forward also reads conv.weight directly: folding in place would change that read."""
    model = randomize_bn(ConvWeightReadElsewhere(), seed=44).eval()
    folded, report = fold_and_check(model, [input_for(2, 3)])


def test_tied_linear_weights():
    """fc2 shares fc1's weight Parameter: folding the BN into fc1 must not change fc2."""
    model = randomize_bn(TiedLinear(), seed=45).eval()
    folded, report = fold_and_check(model, [rand(4, 6, seed=45)])
    folded.load_state_dict(folded.state_dict())


def test_bn_subclass_with_other_forward():
    """A BatchNorm2d subclass that overrides forward is not a BN: folding it as one would change the function."""
    torch.manual_seed(46)
    model = randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), ScaledBN(4, eps=EPS)), seed=46).eval()
    folded, report = fold_and_check(model, [input_for(2, 3)])


def test_frozen_bn_lookalike_with_other_forward():
    torch.manual_seed(47)
    model = randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), NotQuiteFrozenBN(4, eps=EPS)), seed=47).eval()
    # bnfold may not count it as a BN at all: only the function is checked
    folded, report = fold_and_check(model, [input_for(2, 3)], count_check=False)
    assert "bn" not in folds(report) or folds(report)["bn"][1] == "conv-bn"


@pytest.mark.parametrize("how", ["torch.flatten(x, 2)", "x.flatten(2)", "nn.Flatten(2)", "reshape"])
def test_flatten_keeping_channel_axis_is_not_bn_linear(how):
    model = randomize_bn(FlattenKeepChannels(how), seed=48).eval()
    folded, report = fold_and_check(model, [rand(3, 4, 2, 2, seed=48)])
    assert report.folded == []
    assert report.bn_after == 1


def test_linear_transpose_bn_is_not_folded():
    model = randomize_bn(LinearTransposeBN(), seed=49).eval()
    folded, report = fold_and_check(model, [rand(3, 7, 5, seed=49)])
    assert report.folded == []
    assert report.bn_after == 1


def test_convtranspose_called_with_output_size():
    model = randomize_bn(ConvTransposeOutputSize(), seed=50).eval()
    folded, report = fold_and_check(model, [input_for(2, 4)])
    # output_size only picks output_padding, so the fold is exact; refusing it is allowed (conservative)
    if report.folded:
        assert folds(report) == {"bn": ("up", "convtranspose-bn")}
    else:
        assert skip_of(report, "bn").reason


def test_single_tensor_example_input():
    model = randomize_bn(MLP(), seed=51).eval()
    x = rand(4, 10, seed=51)
    folded, report = fold_module(model, x)
    assert report.bn_after == 0 and [f.rule for f in report.folded] == ["linear-bn", "linear-bn"]
    with torch.no_grad():
        assert_close_to_ref(folded(x), reference(model, x), 1e-4)


def test_folding_twice_is_idempotent():
    model = randomize_bn(ResNetLike(), seed=52).eval()
    x = rand(2, 3, 16, 16, seed=52)
    once, _ = fold_module(model, (x,))
    twice, report = fold_and_check(once, [x])
    assert report.bn_before == 0 and report.folded == [] and report.skipped == []


def test_untraceable_unobserved_rank3_branch_is_not_folded():
    """The example input only takes the ``pos`` branch: nothing proves the rank of ``neg``'s input, and it is 3."""
    model = randomize_bn(UntraceableLinearBlocks(), seed=53).eval()
    x_pos = rand(2, 6, 6, seed=53).abs() + 0.1
    for example in (True, False):
        folded, report = fold_and_check(model, [x_pos], example=example, fresh=False)
        with torch.no_grad():
            assert_close_to_ref(folded(-x_pos), reference(model, -x_pos), 1e-4, f"neg branch ({example=}):")
        assert "neg.1" not in folds(report)
        if not example:
            assert report.folded == []


def test_untraceable_mixed_ranks_is_not_folded():
    model = randomize_bn(UntraceableMixedRanks(), seed=54).eval()
    folded, report = fold_and_check(model, [rand(2, 6, 6, seed=54)])
    assert report.folded == []
    assert report.bn_after == 1


def test_untraceable_pairs():
    model = randomize_bn(UntraceablePairs(), seed=55).eval()
    folded, report = fold_and_check(model, [rand(2, 3, 9, 9, seed=55)])
    got = folds(report)
    assert "b.0" not in got  # padding 1 after the BN
    assert got.get("c.1") == ("c.0", "conv-bn")
    assert got.get("a.0", ("a.1", "bn-conv")) == ("a.1", "bn-conv")


def test_inplace_on_untraceable_module():
    model = randomize_bn(ControlFlowNet(), seed=56).eval()
    x = rand(2, 3, 8, 8, seed=56).abs() + 0.1
    ref_pos, ref_neg = reference(model, x), reference(model, -x)
    folded, report = fold_module(model, (x,), inplace=True)
    assert len(report.folded) >= 3
    with torch.no_grad():
        assert_close_to_ref(folded(x), ref_pos, 1e-4)
        assert_close_to_ref(folded(-x), ref_neg, 1e-4)


def test_fp16_overflow_of_folded_bias_is_refused():
    """s = 1 but a large running mean: the folded Linear bias (b - W @ (mean*s)) ~ -8e4 overflows fp16 while the
    unfolded model's values stay small."""
    torch.manual_seed(57)
    bn = nn.BatchNorm1d(8)
    fc = nn.Linear(8, 3)
    with torch.no_grad():
        fc.weight.fill_(10.0)
        fc.bias.zero_()
        bn.running_mean.fill_(1000.0)
        bn.running_var.fill_(1.0)
        bn.weight.fill_(float(np.sqrt(1.0 + bn.eps)))
        bn.bias.zero_()
    x = rand(5, 8, seed=57) + 1000.0
    model = BNConv(bn, fc).half().eval()
    x = x.half()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    folded, report = fold_and_check(model, [x], rtol=2e-2, fresh=False)
    assert report.folded == []
    assert "overflow" in skip_of(report, "bn").reason.lower()


def test_conv_with_output_modifying_forward_hook():
    """A forward hook on the conv changes its output: BN(hook(conv(x))) is not BN folded into the conv."""
    torch.manual_seed(58)
    model = randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=EPS)), seed=58).eval()
    model.conv.register_forward_hook(lambda mod, inp, out: out + 1.0)
    folded, report = fold_and_check(model, [input_for(2, 3)])


def test_bn_with_output_modifying_forward_hook():
    torch.manual_seed(59)
    model = randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=EPS)), seed=59).eval()
    model.bn.register_forward_hook(lambda mod, inp, out: out.clamp(min=-0.5))
    folded, report = fold_and_check(model, [input_for(2, 3)])


@pytest.mark.parametrize("inplace", [False, True])
def test_conv_with_legacy_weight_norm(inplace):
    """torch.nn.utils.weight_norm recomputes conv.weight from weight_g/weight_v in a forward pre-hook, and such a
    module can not be deep-copied (torch raises RuntimeError). bnfold must fold correctly, refuse the pair, or
    raise InputError; it must not return a module computing something else."""

    def make():
        torch.manual_seed(60)
        conv = nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
        return randomize_bn(ConvBN(conv, nn.BatchNorm2d(4, eps=EPS)), seed=60).eval()

    x = input_for(2, 3)
    with torch.no_grad():
        ref = make().double()(x.double())  # the original in float64, built afresh (no deepcopy possible)
    model = make()
    try:
        folded, report = fold_module(model, (x,), inplace=inplace)
    except InputError:
        return
    with torch.no_grad():
        assert_close_to_ref(folded(x), ref, 1e-4, "weight_norm conv:")
        if not inplace:
            assert_close_to_ref(model(x), ref, 1e-4, "input module after fold:")


def test_conv_with_parametrized_weight_norm():
    torch.manual_seed(61)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    model = randomize_bn(ConvBN(conv, nn.BatchNorm2d(4, eps=EPS)), seed=61).eval()
    folded, report = fold_and_check(model, [input_for(2, 3)])


@pytest.mark.parametrize("bn_cls", [nn.SyncBatchNorm, nn.BatchNorm1d])
@pytest.mark.parametrize("example", [False, True])
def test_unbatched_conv2d_then_bn_over_wrong_axis(bn_cls, example):
    """Conv2d on unbatched [C, H, W] (H == C_out), then a BN accepting 3D input: it normalizes H, not C."""
    torch.manual_seed(62)
    model = randomize_bn(ConvBN(nn.Conv2d(3, 4, 3, padding=1), bn_cls(4, eps=EPS)), seed=62).eval()
    folded, report = fold_and_check(model, [rand(3, 4, 5, seed=62)], example=example)
    assert report.folded == []
    reason = skip_of(report, "bn").reason
    if not example:
        assert "example_inputs" in reason


@pytest.mark.parametrize("untraceable", [False, True])
def test_example_inputs_that_do_not_run_raise_input_error(untraceable):
    """example_inputs the module can not run (wrong channel count) are unusable input: InputError."""
    model = randomize_bn(ControlFlowNet() if untraceable else ResNetLike(), seed=63).eval()
    with pytest.raises(InputError):
        fold_module(model, (rand(2, 5, 16, 16, seed=63),))


# =============================================================================================== properties

BN_KINDS = st.sampled_from(["bn", "frozen", "noaffine"])


@st.composite
def conv_configs(draw, transpose: bool):
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    hw = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    cfg = dict(groups=groups, cin=cin, cout=cout, k=k, stride=stride, dilation=dilation, padding=padding, hw=hw,
               bias=draw(st.booleans()), kind=draw(BN_KINDS), seed=draw(st.integers(0, 2**16)))
    if transpose:
        cfg["output_padding"] = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
        out = [(h - 1) * s - 2 * p + d * (kk - 1) + op + 1
               for h, s, p, d, kk, op in zip(hw, stride, padding, dilation, k, cfg["output_padding"])]
    else:
        out = [(h + 2 * p - d * (kk - 1) - 1) // s + 1 for h, s, p, d, kk in zip(hw, stride, padding, dilation, k)]
    assume(min(out) >= 1)
    return cfg


def _bn2d(kind, c):
    return FrozenBatchNorm2d(c, eps=EPS) if kind == "frozen" else make_bn(kind, 2, c)


PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.filter_too_much])


@PROPERTY
@given(conv_configs(transpose=False))
def test_property_conv2d_bn(cfg):
    torch.manual_seed(cfg["seed"])
    conv = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["k"], stride=cfg["stride"], padding=cfg["padding"],
                     dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"])
    model = randomize_bn(ConvBN(conv, _bn2d(cfg["kind"], cfg["cout"])), seed=cfg["seed"]).eval()
    _, report = fold_and_check(model, [rand(2, cfg["cin"], *cfg["hw"], seed=cfg["seed"])], seed=cfg["seed"])
    assert folds(report) == {"bn": ("conv", "conv-bn")}


@PROPERTY
@given(conv_configs(transpose=True))
def test_property_convtranspose2d_bn(cfg):
    torch.manual_seed(cfg["seed"])
    conv = nn.ConvTranspose2d(cfg["cin"], cfg["cout"], cfg["k"], stride=cfg["stride"], padding=cfg["padding"],
                              output_padding=cfg["output_padding"], dilation=cfg["dilation"], groups=cfg["groups"],
                              bias=cfg["bias"])
    model = randomize_bn(ConvBN(conv, _bn2d(cfg["kind"], cfg["cout"])), seed=cfg["seed"]).eval()
    _, report = fold_and_check(model, [rand(2, cfg["cin"], *cfg["hw"], seed=cfg["seed"])], seed=cfg["seed"])
    assert folds(report) == {"bn": ("conv", "convtranspose-bn")}


@PROPERTY
@given(conv_configs(transpose=False))
def test_property_bn_conv2d(cfg):
    """BN -> Conv2d: folded when padding is 0, refused (reason mentions padding) otherwise."""
    torch.manual_seed(cfg["seed"])
    conv = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["k"], stride=cfg["stride"], padding=cfg["padding"],
                     dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"])
    model = randomize_bn(BNConv(_bn2d(cfg["kind"], cfg["cin"]), conv), seed=cfg["seed"]).eval()
    _, report = fold_and_check(model, [rand(2, cfg["cin"], *cfg["hw"], seed=cfg["seed"])], seed=cfg["seed"])
    if cfg["padding"] == (0, 0):
        assert folds(report) == {"bn": ("conv", "bn-conv")}
    else:
        assert report.folded == []
        assert "padding" in skip_of(report, "bn").reason.lower()


# ======================================================================================================= device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_device_kept():
    model = randomize_bn(ResNetLike(), seed=37).eval().cuda()
    x = rand(2, 3, 16, 16, seed=37).cuda()
    ref = reference(model, x)
    folded, report = fold_module(model, (x,))
    assert all(v.device.type == "cuda" for v in folded.state_dict().values())
    with torch.no_grad():
        assert_close_to_ref(folded(x), ref, 1e-3)


def test_cpu_device_and_dtype_kept():
    model = randomize_bn(MobileNetLike(), seed=38).eval()
    folded, _ = fold_module(model, (rand(2, 3, 16, 16, seed=38),))
    assert all(v.device.type == "cpu" for v in folded.state_dict().values())
    assert all(v.dtype == torch.float32 for v in folded.state_dict().values() if v.is_floating_point())


# ============================================================================ batch norms as computations
# Every batch norm the forward computes is seen (module, traced-through subclass, functional, frozen), counted as a
# profiler would (count_bn_dispatched, independent of bnfold), and folded where the ONNX route folds it.

# model, input shape, batch norms left (the ONNX export of the model keeps as many: a pre-activation BN, a
# training-mode one), batch norms left with keep_class=True (functional calls on the root module's own tensors
# can not be written into its class)
COMPUTED = {
    "timm-like BatchNormAct2d": (EfficientLike, (2, 3, 17, 19), 0, 0),
    "functional batch_norm": (FunctionalBNNet, (2, 3, 8, 8), 1, 3),
    "frozen batch norm": (FrozenResNetLike, (2, 3, 8, 8), 0, 0),
    "frozen batch norm + activation": (FrozenActNet, (2, 3, 8, 8), 0, 0),
    "residual": (ResNetLike, (2, 3, 16, 16), 0, 0),
    "depthwise": (MobileNetLike, (2, 3, 16, 16), 0, 0),
    "mlp": (MLP, (4, 10), 0, 0),
    "conv1d + SyncBatchNorm": (Conv1dNet, (2, 4, 9), 0, 0),
    "conv3d": (Conv3dNet, (2, 3, 4, 4, 4), 0, 0),
    "pre-activation": (DenseLike, (2, 3, 8, 8), 1, 1),
    "eval-mode dropout between": (ConvDropoutBN, (2, 3, 8, 8), 0, 0),
    "branch batch norms": (RepVGGLike, (2, 6, 8, 8), 0, 0),  # merged away (bnfold.torch.merge)
}


@pytest.mark.parametrize("keep_class", [False, True], ids=["graph", "own-class"])
@pytest.mark.parametrize("name", list(COMPUTED))
def test_every_computed_batch_norm_is_counted_and_folded(name, keep_class):
    factory, shape, left, left_own = COMPUTED[name]
    torch.manual_seed(70)
    model = randomize_bn(factory(), seed=70).eval()
    folded, report = fold_and_check(model, [rand(*shape, seed=70)], keep_class=keep_class, count_check=False)
    x = rand(*shape, seed=71)
    assert report.bn_before == count_bn_dispatched(model, x) > 0
    assert report.bn_after == count_bn_dispatched(folded, x) == (left_own if keep_class else left), \
        report.to_dict()
    assert len(report.folded) + len(report.skipped) == report.bn_before  # merges are in report.merged
    if keep_class:
        assert type(folded) is type(model)
        assert not isinstance(folded, torch.fx.GraphModule)
        for fold in report.folded:  # folded norms are gone from the module, under the user's attribute names
            assert not isinstance(folded.get_submodule(fold.bn), (nn.modules.batchnorm._BatchNorm,
                                                                   FrozenBatchNorm2d))


def test_batchnorm_act_subclass_becomes_its_activation():
    """timm's BatchNormAct2d folds into the conv before it; in the user's own module it becomes its activation, and
    the state dict is the one of the BN-less definition of the network (it loads there and computes the same)."""
    torch.manual_seed(72)
    model = randomize_bn(EfficientLike(), seed=72).eval()
    x = rand(2, 3, 17, 19, seed=72)
    folded, report = fold_module(model, (x,), keep_class=True)
    assert report.bn_after == 0
    assert {f.bn for f in report.folded} == {"stem.bn", "dw.bn", "pw.bn", "expand.bn", "dw2.bn", "project.bn",
                                             "head.bn", "head_bn"}
    assert type(folded.stem.bn) is nn.ReLU and type(folded.dw.bn) is nn.ReLU6 and type(folded.head.bn) is nn.SiLU
    assert type(folded.pw.bn) is nn.Identity and type(folded.head_bn) is nn.Identity
    plain = EfficientLike(bn=False).eval()
    assert list(folded.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(folded.state_dict())
    with torch.no_grad():
        assert_close_to_ref(plain(x), reference(model, x), 1e-4, "BN-less definition with the folded weights:")


def test_functional_batch_norms():
    model = FunctionalBNNet().eval()
    x = rand(2, 3, 8, 8, seed=73)
    folded, report = fold_and_check(model, [x], count_check=False)  # no BN modules: counted at the dispatcher
    assert report.bn_before == count_bn_dispatched(model, x) == 3
    assert report.bn_after == count_bn_dispatched(folded, x) == 1
    assert {f.rule for f in report.folded} == {"conv-bn", "linear-bn"}
    assert [s.code for s in report.skipped] == ["training-mode"]
    assert not [k for k in folded.state_dict() if k.startswith(("a_", "b_"))], "folded statistics are left behind"


def test_functional_batch_norm_on_root_tensors_needs_the_graph_module():
    model = FunctionalBNNet().eval()
    folded, report = fold_and_check(model, [rand(2, 3, 8, 8, seed=74)], keep_class=True, count_check=False)
    assert type(folded) is FunctionalBNNet and report.folded == []
    assert sorted(s.code for s in report.skipped) == ["needs-graph-module", "needs-graph-module", "training-mode"]


@pytest.mark.parametrize("factory", [lambda: EfficientLike(same=True), lambda: FrozenResNetLike(same=True)],
                         ids=["BatchNormAct2d", "frozen"])
def test_untraceable_module_folds_on_the_aten_graph(factory):
    """Conv2dSame pads by the input size at run time: torch.fx can not trace it, torch.export can."""
    torch.manual_seed(75)
    model = randomize_bn(factory(), seed=75).eval()
    x = rand(2, 3, 17, 19, seed=75)
    folded, report = fold_and_check(model, [x], count_check=False)
    assert any("torch.export" in note for note in report.notes), report.notes
    assert report.bn_before == count_bn_dispatched(model, x) > 0
    assert report.bn_after == count_bn_dispatched(folded, x) == 0, report.to_dict()


@pytest.mark.parametrize("inplace", [False, True])
def test_untraceable_module_in_its_own_class(inplace):
    """Folds proven on the ATen graph are written into the user's class too; Conv2dSame (its own forward, no bias)
    is probed to read the bias it is given. The state dict is the BN-less definition's."""
    torch.manual_seed(76)
    model = randomize_bn(EfficientLike(same=True), seed=76).eval()
    x = rand(2, 3, 17, 19, seed=76)
    folded, report = fold_and_check(model, [x], keep_class=True, inplace=inplace, count_check=False)
    assert type(folded) is EfficientLike and (folded is model) == inplace
    assert any("torch.export" in note for note in report.notes), report.notes
    assert report.bn_before == 8 and report.bn_after == count_bn_dispatched(folded, x) == 0, report.to_dict()
    assert type(folded.stem.bn) is nn.ReLU
    assert list(folded.state_dict()) == list(EfficientLike(same=True, bn=False).state_dict())


def test_own_class_keeps_a_batch_norm_whose_module_computes_more():
    """ScaledBN computes 2*BN(x)+1: torch.export folds the BN, but its module can not become an Identity."""
    torch.manual_seed(81)
    model = randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), ScaledBN(4, eps=EPS)), seed=81).eval()
    x = input_for(2, 3)
    folded, report = fold_and_check(model, [x], keep_class=True)
    assert type(folded) is ConvBN and isinstance(folded.bn, ScaledBN)
    assert [(s.bn, s.code) for s in report.skipped] == [("bn", "needs-graph-module")]
    graph, graph_report = fold_module(model, (x,))
    assert graph_report.bn_after == 0


def test_bn_subclass_that_runs_torch_forward_is_one_call():
    """A BatchNorm2d subclass that does not override forward runs torch's forward: one batch norm, folded."""

    class PlainSubclass(nn.BatchNorm2d):
        pass

    model = randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), PlainSubclass(4, eps=EPS)), seed=77).eval()
    folded, report = fold_and_check(model, [input_for(2, 3)])
    assert folds(report) == {"bn": ("conv", "conv-bn")}
    assert not report.notes


def test_batchnorm_act_reading_the_rank_still_folds():
    """BatchNormAct2d asserts ``x.ndim == 4`` on the conv output: reading a shape is not reading values."""
    model = randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, eps=EPS)), seed=78).eval()
    folded, report = fold_and_check(model, [input_for(2, 3)])
    assert folds(report) == {"bn": ("conv", "conv-bn")}


def test_dispatch_counter_counts_batch_norm_computations():
    """The test's own counter: module, functional and frozen batch norms count once per call; nothing else does."""
    x = rand(2, 4, 5, 5, seed=79)
    bn, frozen = randomize_bn(nn.BatchNorm2d(4)).eval(), randomize_bn(FrozenBatchNorm2d(4)).eval()
    assert count_bn_dispatched(bn, x) == 1
    assert count_bn_dispatched(frozen, x) == 1
    assert count_bn_dispatched(ConvBN(nn.Conv2d(4, 4, 1), nn.ReLU()), x) == 0
    assert count_bn_dispatched(SharedBN().eval(), x) == 2
    assert count_bn_dispatched(FunctionalBNNet().eval(), rand(2, 3, 8, 8)) == 3


@pytest.mark.parametrize("name", ["timm-like BatchNormAct2d", "functional batch_norm", "frozen batch norm",
                                  "pre-activation", "conv1d + SyncBatchNorm", "branch batch norms"])
def test_no_more_left_than_the_onnx_route(name, tmp_path):
    """fold_module leaves no more batch norms than exporting the model to ONNX and folding that leaves."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from bnfold import fold_onnx
    from bnfold.onnx.merge import MERGE_RULE_NAMES

    factory, shape, _, _ = COMPUTED[name]
    torch.manual_seed(80)
    model = randomize_bn(factory(), seed=80).eval()
    x = rand(*shape, seed=80)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    # Folds against folds: the ONNX route also merges branches (issue 16), which the torch front end does not yet.
    folded_onnx, onnx_report = fold_onnx(onnx.load(str(path)), skip=MERGE_RULE_NAMES)
    left_onnx = sum(n.op_type == "BatchNormalization" for n in folded_onnx.graph.node)
    _, report = fold_module(model, (x,))
    assert report.bn_after <= left_onnx, (report.to_dict(), onnx_report.to_dict())


def test_readme_lists_every_skip_code():
    """The README's table of skip codes is the one in bnfold/torch/ops.py."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    listed = set(re.findall(r"^\| `([a-z-]+)` \|", readme, flags=re.M))
    assert set(SKIP_CODES) <= listed, set(SKIP_CODES) - listed


def test_own_class_in_place():
    model = randomize_bn(ResNetLike(), seed=82).eval()
    x = rand(2, 3, 16, 16, seed=82)
    folded, report = fold_and_check(model, [x], keep_class=True, inplace=True)
    assert folded is model and report.bn_after == 0
    assert not [k for k in model.state_dict() if "running_" in k or "num_batches_tracked" in k]
    assert type(model.layer2[0].downsample[1]) is nn.Identity


def test_untraceable_frozen_batch_norm_with_activation():
    """FrozenBatchNormAct2d behind a Conv2dSame: its arithmetic is found on the ATen graph and folded."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = Conv2dSame(3, 6, 3)
            self.bn = FrozenBatchNormAct2d(6)

        def forward(self, x):
            return self.bn(self.conv(x))

    torch.manual_seed(83)
    model = randomize_bn(Net(), seed=83).eval()
    x = rand(2, 3, 9, 10, seed=83)
    for keep_class in (False, True):
        folded, report = fold_and_check(model, [x], keep_class=keep_class, count_check=False)
        assert report.bn_before == count_bn_dispatched(model, x) == 1
        assert report.bn_after == count_bn_dispatched(folded, x) == 0, report.to_dict()
    assert type(folded.bn) is nn.ReLU
