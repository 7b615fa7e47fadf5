"""fold_module merges linear branches (bnfold.torch.merge) on RepVGG-, MobileOne-, ACNet-, DBB-, RepViT-, RepGhost- and
FastViT-style models.

The yardstick is each block's own deploy form (tests/reparam_models.py: the authors' ``reparameterize()``, written
from the papers): bnfold's result runs no more batch norms and convolutions than it (counted at the dispatcher),
and its error against the float64 original is within 3x of the authors' own merge's error.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bnfold.torch import fold_module  # noqa: E402
from bnfold.torch.merge import Zero, merged_count  # noqa: E402
from bnfold.torch.ops import SKIP_CODES  # noqa: E402

try:
    import reparam_models as R
    from torch_models import FrozenBatchNorm2d, assert_unchanged, count_bn_dispatched, reference, snapshot
except ImportError:  # pragma: no cover - tests/ is a package
    from tests import reparam_models as R
    from tests.torch_models import FrozenBatchNorm2d, assert_unchanged, count_bn_dispatched, reference, snapshot


def dispatched(module: nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """ATen ops one forward runs, by name, counted at the dispatcher (every nn.ConvNd/F.convNd is one
    ``convolution``, every average pool one ``avg_pool*``)."""
    counts: dict[str, int] = {}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Counter():
        module(*inputs)
    return counts


def convs(module, *inputs) -> int:
    return dispatched(module, *inputs).get("convolution", 0)


def pools(module, *inputs) -> int:
    return sum(n for name, n in dispatched(module, *inputs).items() if name.startswith("avg_pool"))


def relative_error(module, ref, *inputs) -> float:
    with torch.no_grad():
        out = module(*inputs).double()
    return ((out - ref).abs().max() / ref.abs().max()).item()


TORCH_FAMILIES = list(R.MODELS)  # every family of tests/reparam_models.py
MODELS = {
    **{name: R.MODELS[name] for name in TORCH_FAMILIES},
    "mobileone-1-branch": lambda: R.mobileone_net(1),
    "repvgg-5x5": lambda: nn.Sequential(R.RepVggBlock(3, 8, kernel_size=5), R.RepVggBlock(8, 8, kernel_size=5),
                                        R.Head(8)),
    "dbb-depthwise": lambda: nn.Sequential(R.DiverseBranchBlock(3, 12, 3, 1), R.DiverseBranchBlock(12, 12, 3, 2, 12),
                                           R.Head(12)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_merged_like_the_authors_deploy_form(name):
    model = R.realistic(MODELS[name](), seed=3)
    deploy = R.reparameterize_model(model)
    x = torch.randn(8, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    snap = snapshot(model)
    folded, report = fold_module(model, (x,))
    assert_unchanged(model, snap)
    # no more batch norms and convolutions than the authors' deploy form, no average pool left
    assert count_bn_dispatched(folded, x) == report.bn_after == 0  # deploy forms may keep a conv's BN (RepGhost)
    assert convs(folded, x) <= convs(deploy, x), report.to_dict()
    assert pools(folded, x) == pools(deploy, x) == 0
    assert merged_count(report) > 0 and not report.skipped, report.to_dict()
    # error vs the float64 original within 3x of the authors' own merge (floored at one float32 rounding)
    ref = reference(model, x)
    mine, theirs = relative_error(folded, ref, x), relative_error(deploy, ref, x)
    assert mine <= 3 * max(theirs, 2.0 ** -24), (mine, theirs)
    # on inputs it never saw
    x2 = torch.randn(3, 3, 31, 29, generator=torch.Generator().manual_seed(6)) * 2 + 0.5
    ref2 = reference(model, x2)
    assert relative_error(folded, ref2, x2) <= 3 * max(relative_error(deploy, ref2, x2), 2.0 ** -24)


@pytest.mark.parametrize("name", ["dbb", "fastvit"])
def test_deterministic_and_idempotent(name):
    model = R.realistic(R.MODELS[name](), seed=4)
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    first, report = fold_module(model, (x,))
    second, _ = fold_module(model, (x,))
    a, b = first.state_dict(), second.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    again, again_report = fold_module(first, (x,))
    assert merged_count(again_report) == 0 and not again_report.folded
    with torch.no_grad():
        assert torch.equal(again(x), first(x))


class Branches(nn.Module):
    """Branches summed over one input, as given: for the merges a block does not fit."""

    def __init__(self, *branches: nn.Module, extra: bool = False):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.extra = extra

    def forward(self, x, z=None):
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        return y + z if self.extra else y


def check(model, *inputs, rtol=1e-5):
    model = R.realistic(model, seed=9)
    snap = snapshot(model)
    folded, report = fold_module(model, inputs)
    assert_unchanged(model, snap)
    ref = reference(model, *inputs)
    assert relative_error(folded, ref, *inputs) <= rtol
    for skip in report.skipped + report.not_merged:
        assert skip.code in SKIP_CODES
    return folded, report


def test_an_addend_from_elsewhere_stays():
    model = Branches(R.conv_bn(4, 4, 3, padding=1), R.conv_bn(4, 4, 1), nn.BatchNorm2d(4), extra=True)
    x, z = torch.randn(2, 4, 9, 9), torch.randn(2, 4, 9, 9)
    folded, report = check(model, x, z)
    assert convs(folded, x, z) == 1 and count_bn_dispatched(folded, x, z) == 0
    assert merged_count(report) == 1


def test_kernels_that_do_not_nest_are_refused():
    """1x3 + 3x1 without a 3x3 branch: no branch's kernel holds the other (and a 3x3 would cost more)."""
    model = Branches(R.conv_bn(4, 4, (1, 3), padding=(0, 1)), R.conv_bn(4, 4, (3, 1), padding=(1, 0)))
    x = torch.randn(2, 4, 7, 7)
    folded, report = check(model, x)
    assert convs(folded, x) == 2 and merged_count(report) == 0
    assert [s.code for s in report.not_merged] == ["merge-refused"] and not report.skipped
    assert report.not_merged[0].op_type == "merge" and "contains" in report.not_merged[0].reason


def test_a_costlier_merge_is_not_made():
    """A dense 1x1 summed with a depthwise 3x3 would become a dense 3x3: nine times the 1x1's work."""
    model = Branches(R.conv_bn(16, 16, 3, padding=1, groups=16), R.conv_bn(16, 16, 1))
    x = torch.randn(2, 16, 8, 8)
    folded, report = check(model, x)
    assert convs(folded, x) == 2 and [s.code for s in report.not_merged] == ["merge-costlier"]


def test_avgpool_without_counted_padding_is_refused():
    """Border windows of a padded pool that does not count the padding divide by fewer values: not a conv."""
    model = Branches(R.conv_bn(4, 4, 3, padding=1, groups=4), nn.AvgPool2d(3, 1, 1, count_include_pad=False))
    x = torch.randn(2, 4, 6, 6)
    folded, report = check(model, x)
    assert pools(folded, x) == 1 and [s.code for s in report.not_merged] == ["merge-refused"]
    exact = Branches(R.conv_bn(4, 4, 3, padding=1, groups=4), nn.AvgPool2d(3, 1, 1))  # count_include_pad=True
    folded, report = check(exact, x)
    assert pools(folded, x) == 0 and convs(folded, x) == 1 and merged_count(report) == 1


class OneThenK(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.first = nn.Conv2d(4, 6, 1, bias=bias)
        self.second = nn.Conv2d(6, 5, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.second(self.first(x)))


def test_sequential_merge_only_where_exact():
    x = torch.randn(2, 4, 7, 8)
    folded, report = check(OneThenK(bias=False), x)
    assert convs(folded, x) == 1 and {m.rule for m in report.merged} == {"merge-sequential"}
    # a bias under the second conv's zero padding: the merged conv would read the bias there, not zero
    folded, report = check(OneThenK(bias=True), x)
    assert convs(folded, x) == 2 and merged_count(report) == 0


def test_a_conv_that_runs_elsewhere_is_not_merged():
    shared = R.conv_bn(4, 4, 3, padding=1)
    model = nn.Sequential(Branches(shared, R.conv_bn(4, 4, 1)), nn.ReLU(), Branches(shared))
    x = torch.randn(2, 4, 6, 6)
    folded, report = check(model, x)
    with torch.no_grad():
        assert relative_error(folded, reference(model, x), x) <= 1e-5


def test_merge_false_leaves_the_branches():
    model = R.realistic(R.repvgg_net(), seed=2)
    x = torch.randn(2, 3, 16, 16)
    folded, report = fold_module(model, (x,), merge=False)
    assert merged_count(report) == 0 and count_bn_dispatched(folded, x) == report.bn_after == 3  # identity BNs
    assert relative_error(folded, reference(model, x), x) <= 1e-5


@pytest.mark.parametrize("name", TORCH_FAMILIES)
def test_keep_class_writes_the_merges_into_the_blocks(name):
    model = R.realistic(R.MODELS[name](), seed=7)
    deploy = R.reparameterize_model(model)
    x = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(8))
    snap = snapshot(model)
    own, report = fold_module(model, (x,), keep_class=True)
    assert_unchanged(model, snap)
    assert type(own) is type(model) and not isinstance(own, torch.fx.GraphModule)
    assert all(type(a) is type(b) for a, b in zip(own, model))  # every block keeps its class
    assert count_bn_dispatched(own, x) == report.bn_after == 0 and not report.skipped, report.to_dict()
    assert convs(own, x) <= convs(deploy, x) and pools(own, x) == 0
    ref = reference(model, x)
    assert relative_error(own, ref, x) <= 3 * max(relative_error(deploy, ref, x), 2.0 ** -24)
    # EfficientViT's sums are x + conv_bn(x): its class keeps the x + (the folded conv is already the merge's conv)
    assert {m.rule for m in report.merged} >= ({"merge-branches"} if name != "efficientvit" else set())
    if name in ("repvgg", "mobileone", "acnet", "dbb"):  # blocks with timm's empty ``reparam_conv`` slot
        # each merge sits where the authors' reparameterize() puts it, the branches are gone: the state dict loads
        # (strictly) into their deploy form, which then computes what bnfold's does
        assert all(m.into.endswith(".reparam_conv") for m in report.merged), [m.into for m in report.merged]
        deploy.load_state_dict(own.state_dict())
        with torch.no_grad():
            assert torch.equal(deploy(x), own(x))


class TwoBranch(nn.Module):
    def __init__(self, deploy: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=deploy)
        if not deploy:
            self.bn = nn.BatchNorm2d(6)
            self.conv1 = nn.Conv2d(4, 6, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(6)
        self.deploy = deploy

    def forward(self, x):
        if self.deploy:
            return torch.relu(self.conv(x))
        return torch.relu(self.bn(self.conv(x)) + self.bn1(self.conv1(x)))


def test_keep_class_state_dict_loads_into_the_deploy_definition():
    model = R.realistic(TwoBranch(), seed=3)
    x = torch.randn(2, 4, 9, 9)
    own, report = fold_module(model, (x,), keep_class=True)
    deploy = TwoBranch(deploy=True).eval()
    deploy.load_state_dict(own.state_dict())  # strict: the same keys, nothing left over
    ref = reference(model, x)
    assert relative_error(deploy, ref, x) <= 1e-5 and relative_error(own, ref, x) <= 1e-5


class FlagSwitched(nn.Module):
    """Has timm's ``reparam_conv`` slot, but its forward switches on a flag: filling the slot changes nothing."""

    def __init__(self, inference_mode: bool = False):
        super().__init__()
        self.inference_mode = inference_mode
        self.reparam_conv = nn.Conv2d(4, 6, 3, padding=1) if inference_mode else None
        if not inference_mode:
            self.conv = R.conv_bn(4, 6, 3, padding=1)
            self.conv1 = R.conv_bn(4, 6, 1)

    def forward(self, x):
        if self.inference_mode:
            return torch.relu(self.reparam_conv(x))
        return torch.relu(self.conv(x) + self.conv1(x))


class HasattrSwitched(nn.Module):
    """The RepVGG reference code's way: ``rbr_reparam`` exists only in the deploy form, and its forward asks."""

    def __init__(self, deploy: bool = False):
        super().__init__()
        if deploy:
            self.rbr_reparam = nn.Conv2d(4, 4, 3, padding=1)
        else:
            self.rbr_dense = R.conv_bn(4, 4, 3, padding=1)
            self.rbr_1x1 = R.conv_bn(4, 4, 1)
            self.rbr_identity = nn.BatchNorm2d(4)

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return torch.relu(self.rbr_reparam(x))
        return torch.relu(self.rbr_dense(x) + self.rbr_1x1(x) + self.rbr_identity(x))


def test_keep_class_fills_the_reference_codes_deploy_slot():
    model = R.realistic(nn.Sequential(HasattrSwitched(), HasattrSwitched()), seed=4)
    x = torch.randn(2, 4, 9, 9)
    own, report = fold_module(model, (x,), keep_class=True)
    assert [m.into for m in report.merged] == ["0.rbr_reparam", "1.rbr_reparam"] and not report.not_merged
    assert count_bn_dispatched(own, x) == report.bn_after == 0 and convs(own, x) == 2
    deploy = nn.Sequential(HasattrSwitched(deploy=True), HasattrSwitched(deploy=True)).eval()
    deploy.load_state_dict(own.state_dict())
    ref = reference(model, x)
    assert relative_error(deploy, ref, x) <= 1e-5 and relative_error(own, ref, x) <= 1e-5


def test_keep_class_keeps_the_host_name_when_the_slot_does_not_switch_the_forward():
    """A ``reparam_conv`` slot the forward does not switch on (it asks a flag): filling it and deleting the branches
    would break the module, the check finds that, and that merge goes into the host convolution's place; the block
    beside it still gets its deploy slot."""
    model = R.realistic(nn.Sequential(HasattrSwitched(), FlagSwitched()), seed=5)
    x = torch.randn(2, 4, 9, 9)
    own, report = fold_module(model, (x,), keep_class=True)
    assert [m.into for m in report.merged] == ["0.rbr_reparam", "1.conv.conv"] and own[1].reparam_conv is None
    assert isinstance(own[1].conv1.conv, Zero) and convs(own, x) == 2 and count_bn_dispatched(own, x) == 0
    assert relative_error(own, reference(model, x), x) <= 1e-5


class InPlaceSums(nn.Module):
    """Branches summed the way timm's RepVGG and MobileOne blocks sum them: from a literal ``0`` where a branch is
    absent, and in place (``out += branch(x)``), which torch.export keeps as ``aten.add_``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, skip: bool, scale: bool):
        super().__init__()
        self.skip = nn.BatchNorm2d(c_in) if skip else None
        self.scale = R.conv_bn(c_in, c_out, 1) if scale else None
        self.convs = nn.ModuleList(R.conv_bn(c_in, c_out, kernel_size, padding=kernel_size // 2) for _ in range(2))

    def forward(self, x):
        skip_out = 0
        if self.skip is not None:
            skip_out = self.skip(x)
        out = 0
        if self.scale is not None:
            out = self.scale(x)
        for conv in self.convs:
            out += conv(x)
        out += skip_out
        return torch.relu(out)


@pytest.mark.parametrize("path", ["fx", "aten", "keep_class"])
def test_sums_from_zero_and_in_place_are_merged(path):
    model = R.realistic(nn.Sequential(InPlaceSums(4, 4, 3, skip=True, scale=True),
                                      InPlaceSums(4, 6, 3, skip=False, scale=True),
                                      InPlaceSums(6, 8, 1, skip=False, scale=False)), seed=6)
    x = torch.randn(2, 4, 9, 9)
    snap = snapshot(model)
    subject = Untraceable(model).eval() if path == "aten" else model
    folded, report = fold_module(subject, (x,), keep_class=path == "keep_class")
    assert_unchanged(model, snap)
    assert merged_count(report) == 3 and not report.not_merged, report.to_dict()
    assert convs(folded, x) == 3 and count_bn_dispatched(folded, x) == report.bn_after == 0
    assert relative_error(folded, reference(model, x), x) <= 1e-5


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d, reduced: ``F.batch_norm`` on its own statistics, then (here empty) drop and act."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), nn.Identity()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class TimmStyleRepVgg(nn.Module):
    """A RepVGG block written the way timm writes it: ``reparam_conv`` None until deployed, a BatchNormAct2d-like
    identity branch (a functional batch norm in the trace), an in-place sum."""

    def __init__(self, channels: int, deploy: bool = False):
        super().__init__()
        self.reparam_conv = nn.Conv2d(channels, channels, 3, padding=1) if deploy else None
        if not deploy:
            self.identity = BatchNormAct(channels)
            self.conv_kxk = R.conv_bn(channels, channels, 3, padding=1)
            self.conv_1x1 = R.conv_bn(channels, channels, 1)
            self.drop_path = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        identity = self.identity(x)
        x = self.conv_1x1(x) + self.conv_kxk(x)
        x = self.drop_path(x)
        x += identity
        return self.act(x)


@pytest.mark.parametrize("path", ["fx", "aten", "keep_class"])
def test_timm_style_blocks_merge_to_their_deploy_form(path):
    model = R.realistic(nn.Sequential(TimmStyleRepVgg(4), TimmStyleRepVgg(4)), seed=8)
    x = torch.randn(2, 4, 9, 9)
    snap = snapshot(model)
    subject = Untraceable(model).eval() if path == "aten" else model
    folded, report = fold_module(subject, (x,), keep_class=path == "keep_class")
    assert_unchanged(model, snap)
    assert count_bn_dispatched(folded, x) == report.bn_after == 0 and not report.skipped, report.to_dict()
    assert convs(folded, x) == 2 and merged_count(report) == 2 and not report.not_merged
    assert relative_error(folded, reference(model, x), x) <= 1e-5
    if path == "keep_class":
        assert [m.into for m in report.merged] == ["0.reparam_conv", "1.reparam_conv"]
        deploy = nn.Sequential(TimmStyleRepVgg(4, deploy=True), TimmStyleRepVgg(4, deploy=True)).eval()
        deploy.load_state_dict(folded.state_dict())
        with torch.no_grad():
            assert torch.equal(deploy(x), folded(x))


class PlusInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x


def test_keep_class_says_why_a_merge_is_not_written():
    """``conv(x) + x``: the graph merges the identity into the conv, the class has no module to make zero."""
    model = R.realistic(PlusInput(), seed=1)
    x = torch.randn(2, 4, 6, 6)
    folded, report = fold_module(model, (x,))
    assert convs(folded, x) == 1 and merged_count(report) == 1
    own, report = fold_module(model, (x,), keep_class=True)
    assert type(own) is PlusInput and isinstance(own.conv, nn.Conv2d)
    [skip] = report.not_merged
    assert not report.skipped
    assert skip.code == "needs-graph-module" and skip.op_type == "merge" and "input itself" in skip.reason
    assert relative_error(own, reference(model, x), x) <= 1e-5
    _, report = fold_module(model, keep_class=True)  # without example inputs nothing is written
    assert [s.code for s in report.not_merged] == ["needs-graph-module"]


def test_merged_kernel_is_rounded_once():
    """The merged kernel and bias are the float64 merge rounded once to float32: within half a float32 spacing of
    the block's own merge computed in float64 (folding into float32 weights first, then merging, is not)."""
    import copy

    import numpy as np

    block = R.realistic(nn.Sequential(R.RepVggBlock(8, 8), R.MobileOneBlock(8, 8), R.ACBlock(8, 8)), seed=11)
    x = torch.randn(2, 8, 10, 10)
    folded, _ = fold_module(block, (x,))
    merged = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert len(merged) == 3
    with torch.no_grad():
        wide = copy.deepcopy(block).double()
        references = [block.kernel_bias() for block in wide]
    for conv, (kernel, bias) in zip(merged, references):
        for mine, ref in ((conv.weight, kernel), (conv.bias, bias)):
            ref = ref.numpy()
            half_spacing = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64) / 2
            assert np.all(np.abs(mine.detach().double().numpy() - ref) <= half_spacing * (1 + 1e-6) + 1e-300)


class Untraceable(nn.Module):
    """Reads a size in Python control flow: torch.fx can not trace it, fold_module works on torch.export's graph."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        if x.shape[-1] > 10_000:
            x = x[..., :10_000]
        return self.body(x)


@pytest.mark.parametrize("name", TORCH_FAMILIES)
def test_merged_on_the_aten_graph_too(name):
    model = R.realistic(Untraceable(R.MODELS[name]()), seed=12)
    deploy = R.reparameterize_model(model)
    x = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(13))
    snap = snapshot(model)
    folded, report = fold_module(model, (x,))
    assert_unchanged(model, snap)
    assert any("torch.export" in note for note in report.notes), report.notes
    assert count_bn_dispatched(folded, x) == report.bn_after == 0 and not report.skipped, report.to_dict()
    assert convs(folded, x) <= convs(deploy, x) and pools(folded, x) == 0
    ref = reference(model, x)
    assert relative_error(folded, ref, x) <= 3 * max(relative_error(deploy, ref, x), 2.0 ** -24)


# ---- one rounding per merged weight, for 16-bit models, on every path -------------------------------------------

def bn_affine64(bn: nn.BatchNorm2d):
    """A BatchNorm's (scale, shift) in float64 numpy, from its own parameters."""
    import numpy as np

    gamma, beta, mean, var = (p.detach().double().numpy() for p in (bn.weight, bn.bias, bn.running_mean,
                                                                     bn.running_var))
    scale = gamma / np.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def reference_merge64(block):
    """The float64 numpy merge of a RepVGG or MobileOne block's ORIGINAL parameters (written here from the papers,
    independent of bnfold): each conv+BN branch's kernel scaled by its BN and centred in the k x k kernel, the
    BN-only branch as a kernel with its scale at the centre of its channel, the shifts summed."""
    import numpy as np

    if isinstance(block, R.RepVggBlock):
        branches, identity = [block.conv_kxk, block.conv_1x1], block.identity
    else:
        branches = list(block.conv_kxk) + ([block.conv_scale] if block.conv_scale is not None else [])
        identity = block.skip
    per_group = block.c_in // block.groups
    kernel = np.zeros((block.c_out, per_group, block.k, block.k))
    bias = np.zeros(block.c_out)
    for branch in branches:
        weight = branch.conv.weight.detach().double().numpy()
        scale, shift = bn_affine64(branch.bn)
        kh, kw = weight.shape[2:]
        top, left = (block.k - kh) // 2, (block.k - kw) // 2
        kernel[:, :, top:top + kh, left:left + kw] += weight * scale[:, None, None, None]
        bias += shift
    if identity is not None:
        scale, shift = bn_affine64(identity)
        channels = np.arange(block.c_out)
        kernel[channels, channels % per_group, block.k // 2, block.k // 2] += scale
        bias += shift
    return kernel, bias


def rounded_once(values, dtype: torch.dtype) -> torch.Tensor:
    """float64 values rounded ONCE to ``dtype`` (numpy/ml_dtypes convert directly; torch's own cast from float64
    goes through float32 and can round twice)."""
    import ml_dtypes
    import numpy as np

    if dtype == torch.bfloat16:
        return torch.from_numpy(values.astype(ml_dtypes.bfloat16).astype(np.float32)).to(dtype)
    return torch.from_numpy(values.astype(np.float16))


def convs_called(module: nn.Module, *inputs) -> list[nn.Conv2d]:
    """The nn.Conv2d modules one forward calls, in call order (a merged convolution is one on every path)."""
    called: list[nn.Conv2d] = []
    hooks = [m.register_forward_hook(lambda m, args, out: called.append(m)) for m in module.modules()
             if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return called


_UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.mark.parametrize("path", ["fx", "aten", "keep_class", "keep_class_inplace"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_merges_are_rounded_once(dtype, path):
    """Every merged kernel and bias equals the float64 merge of the original parameters rounded once to the model's
    dtype: folding each branch into 16-bit weights first, then merging, rounds twice (off by one 16-bit ulp in many
    places), on the torch.fx path, on torch.export's ATen graph and when the merges are written into the blocks."""
    import copy

    model = R.realistic(nn.Sequential(R.RepVggBlock(8, 8), R.MobileOneBlock(8, 8),
                                      R.RepVggBlock(8, 16, stride=2, groups=2), R.MobileOneBlock(16, 16, groups=16)),
                        seed=21).to(dtype)
    blocks = copy.deepcopy(model)  # the original, whatever happens to ``model``
    x = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(22)).to(dtype)
    snap = snapshot(model)
    subject = Untraceable(model).eval() if path == "aten" else model
    folded, report = fold_module(subject, (x,), keep_class=path.startswith("keep_class"),
                                 inplace=path == "keep_class_inplace")
    if path == "keep_class_inplace":
        assert folded is model
    else:
        assert_unchanged(model, snap)
    assert count_bn_dispatched(folded, x) == report.bn_after == 0, report.to_dict()
    if path == "aten":
        assert any("torch.export" in note for note in report.notes), report.notes
    merged = convs_called(folded, x)
    assert len(merged) == len(blocks) == convs(folded, x)
    for block, conv in zip(blocks, merged):
        kernel, bias = reference_merge64(block)
        assert conv.weight.dtype == dtype and conv.bias.dtype == dtype
        assert torch.equal(conv.weight.detach(), rounded_once(kernel, dtype)), f"{type(block).__name__} kernel"
        assert torch.equal(conv.bias.detach(), rounded_once(bias, dtype)), f"{type(block).__name__} bias"
    # the authors' merge, run on the 16-bit model as its reparameterize() does, is the yardstick
    deploy = R.reparameterize_model(blocks).to(dtype)
    ref = reference(blocks, x)
    mine, theirs = relative_error(folded, ref, x), relative_error(deploy, ref, x)
    assert mine <= 3 * max(theirs, _UNIT_ROUNDOFF[dtype]), (mine, theirs)


class Bottleneck(nn.Module):
    """A ResNet bottleneck: its sum adds the block's input to a branch that reads something else, so no merge."""

    def __init__(self, channels: int):
        super().__init__()
        self.branch = nn.Sequential(R.conv_bn(channels, channels, 1), nn.ReLU(),
                                    R.conv_bn(channels, channels, 3, padding=1), nn.ReLU(),
                                    R.conv_bn(channels, channels, 1))

    def forward(self, x):
        return torch.relu(self.branch(x) + x)


def test_float64_copies_are_kept_only_where_a_merge_may_read_them():
    """The folds keep the float64 weights a merge may read (branches of one sum, ops in sequence), not those of
    every folded conv: a ResNet would hold a float64 copy of its weights for nothing."""
    import copy

    from bnfold.report import FoldReport
    from bnfold.torch.fold import fold_graph, trace
    from bnfold.torch.ops import ExactWeights

    def kept(model, x):
        graph_module, exact = trace(copy.deepcopy(model).eval()), ExactWeights()
        fold_graph(graph_module, (x,), FoldReport(), exact=exact)
        return sorted(exact.by_path(graph_module))

    x = torch.randn(2, 8, 6, 6)
    assert kept(R.realistic(nn.Sequential(Bottleneck(8), Bottleneck(8)), seed=1), x) == []
    assert kept(R.realistic(R.RepVggBlock(8, 8), seed=1), x) == ["conv_1x1.conv", "conv_kxk.conv"]
    assert kept(R.realistic(R.ACBlock(8, 8), seed=1), x) == ["hor.conv", "square.conv", "ver.conv"]
    assert kept(R.realistic(R.RepVggBlock(8, 8), seed=1).to(torch.float64), x.double()) == []  # the cast is exact


# ---- sums with signs and constant scales, and folds the merges make possible -------------------------------

class Mixer(nn.Module):
    """``x + scale * (conv(x) + conv1(x) - bn(x))``: FastViT's RepMixer with the scale given (None: no product)."""

    def __init__(self, scale=None, channels: int = 4):
        super().__init__()
        self.conv = R.conv_bn(channels, channels, 3, padding=1, groups=channels)
        self.conv1 = R.conv_bn(channels, channels, 1, groups=channels)
        self.bn = nn.BatchNorm2d(channels)
        self.scale = None if scale is None else nn.Parameter(scale)

    def forward(self, x):
        inner = self.conv(x) + self.conv1(x) - self.bn(x)
        return x + (inner if self.scale is None else self.scale * inner)


def test_a_subtracted_branch_is_merged_with_its_sign():
    x = torch.randn(2, 4, 7, 7)
    folded, report = check(Mixer(), x)
    assert convs(folded, x) == 1 and count_bn_dispatched(folded, x) == report.bn_after == 0
    assert [m.rule for m in report.merged] == ["merge-branches"] and "bn" in report.merged[0].removed


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), (1, 1, 1), ()])
def test_a_per_channel_constant_scale_is_merged(shape):
    scale = torch.rand(shape, generator=torch.Generator().manual_seed(2)) + 0.1
    x = torch.randn(2, 4, 7, 7)
    folded, report = check(Mixer(scale), x)
    assert convs(folded, x) == 1 and count_bn_dispatched(folded, x) == 0 and merged_count(report) == 1
    # torch.export's ATen graph (aten.mul.Tensor, aten.sub.Tensor): the same merge
    aten, report = check(Untraceable(Mixer(scale)), x)
    assert any("torch.export" in note for note in report.notes)
    assert convs(aten, x) == 1 and count_bn_dispatched(aten, x) == 0 and merged_count(report) == 1


class ScaledNumber(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = R.conv_bn(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return 0.5 * (self.conv(x) - self.bn(x)) + x.mul(2.0)


def test_a_scale_by_a_number_is_merged():
    x = torch.randn(2, 4, 6, 6)
    folded, report = check(ScaledNumber(), x)
    assert convs(folded, x) == 1 and count_bn_dispatched(folded, x) == 0 and merged_count(report) == 1


@pytest.mark.parametrize("shape, dtype, why", [((1, 1, 7, 1), torch.float32, "does not scale whole channels"),
                                               ((1, 1, 1, 7), torch.float32, None),
                                               ((4, 1, 1), torch.float64, "float64")])
def test_a_scale_that_is_not_per_channel_is_not_merged(shape, dtype, why):
    """A constant that varies along a spatial axis (or one of another dtype, which changes the product's dtype)
    is no convolution's scale. Where the graph records the product's shape and dtype (example inputs), the product
    is a term of its own and the sum under it still merges; without them, the merge through it is refused with
    the reason (a constant varying along the last axis never scales channels: a term of its own anyway)."""
    x = torch.randn(2, 4, 7, 7)
    scale = (torch.rand(shape, generator=torch.Generator().manual_seed(3)) + 0.1).to(dtype)
    folded, report = check(Mixer(scale), x)
    assert convs(folded, x) == 1 and count_bn_dispatched(folded, x) == 0 and merged_count(report) == 1
    assert not report.not_merged
    model = R.realistic(Mixer(scale), seed=9)
    folded, report = fold_module(model)
    assert relative_error(folded, reference(model, x), x) <= 1e-5
    if why is None:
        assert convs(folded, x) == 1 and merged_count(report) == 1 and not report.not_merged
    else:
        assert convs(folded, x) == 2 and count_bn_dispatched(folded, x) == 1 and merged_count(report) == 0
        assert [s.code for s in report.not_merged] == ["merge-refused"] and why in report.not_merged[0].reason


class ScaledOther(nn.Module):
    """Branches over ``x`` summed with terms of another input that carry a sign and a scale."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = R.conv_bn(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.gamma = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)

    def forward(self, x, z):
        return self.conv(x) - self.gamma * (z - self.bn(x)) - z


def test_terms_left_out_of_the_merge_keep_their_sign_and_scale():
    x, z = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    folded, report = check(ScaledOther(), x, z)
    assert convs(folded, x, z) == 1 and count_bn_dispatched(folded, x, z) == 0 and merged_count(report) == 1


class NormAfterSum(nn.Module):
    """RepViT's ``bn(conv_bn(x) + conv1(x) + x)`` with the outer batch norm functional (timm's BatchNormAct2d
    calls ``F.batch_norm`` on its buffers) or frozen (buffers and arithmetic, torchvision's FrozenBatchNorm2d):
    the merges do not see it, the fold after them does."""

    def __init__(self, frozen: bool, channels: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.conv = R.conv_bn(channels, channels, 3, padding=1, groups=channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, groups=channels)
        self.frozen = FrozenBatchNorm2d(channels) if frozen else None
        self.register_buffer("running_mean", torch.randn(channels, generator=g) * 0.5)
        self.register_buffer("running_var", torch.rand(channels, generator=g) + 0.3)
        self.weight = nn.Parameter(torch.rand(channels, generator=g) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels, generator=g) * 0.3)
        if frozen:
            for name in ("running_mean", "running_var", "weight", "bias"):
                getattr(self.frozen, name).copy_(getattr(self, name).detach())

    def forward(self, x):
        y = self.conv(x) + self.conv1(x) + x
        if self.frozen is not None:
            return torch.relu(self.frozen(y))
        return torch.relu(torch.nn.functional.batch_norm(y, self.running_mean, self.running_var, self.weight,
                                                         self.bias, False, 0.0, 1e-5))


@pytest.mark.parametrize("frozen", [False, True])
def test_a_batch_norm_after_a_merged_sum_is_folded_after_the_merge(frozen):
    x = torch.randn(2, 4, 7, 7)
    folded, report = check(NormAfterSum(frozen), x)
    assert convs(folded, x) == 1 and count_bn_dispatched(folded, x) == report.bn_after == 0 and not report.skipped
    assert report.bn_before == 2
    assert [f.rule for f in report.folded if f.rule == "conv-bn"] == ["conv-bn", "conv-bn"]  # conv.bn, then it
    assert [m.rule for m in report.merged] == ["merge-branches"] and not report.not_merged


def test_keep_class_writes_a_scaled_sum_with_the_input_as_a_term():
    """RepMixer's sum in the module's own class: the host conv holds (merged - identity) / scale, the other
    branches are zero, the ``x +`` and the product stay in the forward."""
    scale = torch.rand(4, 1, 1, generator=torch.Generator().manual_seed(5)) + 0.1
    model = R.realistic(Mixer(scale), seed=6)
    x = torch.randn(2, 4, 7, 7)
    own, report = fold_module(model, (x,), keep_class=True)
    assert type(own) is Mixer and convs(own, x) == 1 and count_bn_dispatched(own, x) == report.bn_after == 0
    assert [(m.rule, m.into) for m in report.merged] == [("merge-branches", "conv.conv")] and not report.not_merged
    assert relative_error(own, reference(model, x), x) <= 1e-5
    # a scale with a zero channel: the host can not hold the merged kernel divided by it
    zero = R.realistic(Mixer(torch.cat([torch.zeros(1, 1, 1), scale[1:]])), seed=6)
    own, report = fold_module(zero, (x,), keep_class=True)
    assert merged_count(report) == 0 and [s.code for s in report.not_merged] == ["needs-graph-module"]
    assert "zero" in report.not_merged[0].reason
    assert relative_error(own, reference(zero, x), x) <= 1e-5


def test_keep_class_proves_a_batched_scale_from_the_example_inputs():
    """A ``[1, C, 1, 1]`` scale is per channel only on a rank-4 tensor: the example inputs prove it."""
    scale = torch.rand(1, 4, 1, 1, generator=torch.Generator().manual_seed(7)) + 0.1
    model = R.realistic(Mixer(scale), seed=8)
    x = torch.randn(2, 4, 7, 7)
    own, report = fold_module(model, (x,), keep_class=True)
    assert convs(own, x) == 1 and count_bn_dispatched(own, x) == 0 and merged_count(report) == 1
    assert relative_error(own, reference(model, x), x) <= 1e-5


class StartsAtZero(nn.Module):
    """timm's FastViT MobileOneBlock: the sum starts at the number 0 for a branch the block does not have, and the
    k×k branches are added with ``+=``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1, branches: int = 1,
                 scale: bool = True):
        super().__init__()
        self.identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.conv_kxk = nn.ModuleList(R.conv_bn(c_in, c_out, 3, stride, 1, groups) for _ in range(branches))
        self.conv_scale = R.conv_bn(c_in, c_out, 1, stride, 0, groups) if scale else None

    def forward(self, x):
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        for branch in self.conv_kxk:
            out += branch(x)
        return out


class LayerScale2d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(channels, 1, 1, generator=torch.Generator().manual_seed(channels)) + .1)

    def forward(self, x):
        return x * self.gamma


class TimmRepMixer(nn.Module):
    """timm's RepMixer: ``x + layer_scale(mixer(x) - norm(x))``, ``norm`` a MobileOneBlock with only its BN skip."""

    def __init__(self, channels: int):
        super().__init__()
        self.mixer = StartsAtZero(channels, channels, groups=channels)
        self.norm = StartsAtZero(channels, channels, groups=channels, branches=0, scale=False)
        self.layer_scale = LayerScale2d(channels)

    def forward(self, x):
        return x + self.layer_scale(self.mixer(x) - self.norm(x))


def timm_style_fastvit() -> nn.Module:
    return nn.Sequential(StartsAtZero(3, 8, stride=2), nn.GELU(), TimmRepMixer(8), StartsAtZero(8, 8, stride=2),
                         TimmRepMixer(8), R.Head(8))


@pytest.mark.parametrize("how", ["fx", "aten", "keep_class"])
def test_timm_style_sums_that_start_at_zero_merge(how):
    model = R.realistic(timm_style_fastvit(), seed=10)
    if how == "aten":
        model = Untraceable(model).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    snap = snapshot(model)
    folded, report = fold_module(model, (x,), keep_class=how == "keep_class")
    assert_unchanged(model, snap)
    assert convs(folded, x) == 4 and count_bn_dispatched(folded, x) == report.bn_after == 0, report.to_dict()
    assert merged_count(report) == 4 and not report.skipped and not report.not_merged
    assert relative_error(folded, reference(model, x), x) <= 1e-5
