"""bnfold.reparam: every merge against the float64 reference interpreter (tests/reference.py).

Each case builds the branches as an ONNX graph (Conv, AveragePool, BatchNormalization, Add nodes), runs it in
the reference, and compares with the reference run of ONE Conv holding the merged kernel: the merged kernel is
judged by what a plain convolution computes with it, never by bnfold's own code.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from bnfold.affine import bn_to_affine
from bnfold.reparam import (ConvBranch, MergeRefused, affine_branch, avgpool_branch, conv_branch, identity_branch,
                            merge_parallel, merge_sequential, regroup)

try:
    from onnx_builders import Net, bn_stats, run_ref
except ImportError:  # pragma: no cover - tests/ is a package
    from tests.onnx_builders import Net, bn_stats, run_ref

F64 = np.float64


class Branches:
    """Branches of one block as a float64 ONNX graph, and each one's parameters as a ConvBranch."""

    def __init__(self, channels: int, spatial=(7, 6), seed: int = 0, out_channels: int | None = None):
        self.net = Net(F64, seed=seed)
        self.rng = np.random.default_rng(seed + 100)
        self.c_in, self.c_out = channels, out_channels or channels
        self.spatial = tuple(spatial)
        self.x = self.net.input("x", [2, channels, *spatial])
        self.outputs: list[str] = []
        self.branches: list[ConvBranch] = []

    def conv(self, kernel, *, groups=1, pads=None, strides=None, dilations=None, x=None, c_in=None, c_out=None,
             bias=True):
        c_in, c_out = c_in or self.c_in, c_out or self.c_out
        rank = len(kernel)
        w = self.rng.standard_normal((c_out, c_in // groups, *kernel)) / np.sqrt(c_in // groups * np.prod(kernel))
        b = 0.3 * self.rng.standard_normal(c_out) if bias else np.zeros(c_out)
        attrs = dict(group=groups, pads=list(pads or [0] * 2 * rank), strides=list(strides or [1] * rank),
                     dilations=list(dilations or [1] * rank), kernel_shape=list(kernel))
        out = self.net.node("Conv", [x or self.x, self.net.init(self.net.fresh("W"), w),
                                     self.net.init(self.net.fresh("B"), b)], **attrs)
        branch = conv_branch(w, b, groups=groups, strides=strides, dilations=dilations, pads=pads)
        return out, branch

    def add_conv(self, kernel, **kw):
        out, branch = self.conv(kernel, **kw)
        self.outputs.append(out)
        self.branches.append(branch)

    def add_identity(self):
        self.outputs.append(self.net.node("Identity", [self.x]))
        self.branches.append(identity_branch(self.c_in, len(self.spatial)))

    def add_bn(self):
        stats = bn_stats(self.rng, self.c_in, F64)
        self.outputs.append(self.net.bn(self.x, self.c_in, stats=stats))
        s, t = bn_to_affine(stats["scale"], stats["bias"], stats["mean"], stats["var"], 1e-5)
        self.branches.append(affine_branch(s, t, len(self.spatial)))

    def add_avgpool(self, kernel, *, pads=None, strides=None, count_include_pad=0):
        rank = len(kernel)
        attrs = dict(kernel_shape=list(kernel), pads=list(pads or [0] * 2 * rank),
                     strides=list(strides or [1] * rank), count_include_pad=count_include_pad)
        self.outputs.append(self.net.node("AveragePool", [self.x], **attrs))
        self.branches.append(avgpool_branch(self.c_in, kernel, strides=strides, pads=pads,
                                            count_include_pad=bool(count_include_pad)))

    def reference(self) -> np.ndarray:
        """The sum of the branches, run by the float64 reference."""
        total = self.outputs[0]
        for out in self.outputs[1:]:
            total = self.net.node("Add", [total, out])
        self.net.output(total)
        feeds = {"x": self.rng.standard_normal((2, self.c_in, *self.spatial))}
        self.feeds = feeds
        return next(iter(run_ref(self.net.model(), feeds).values()))


def run_merged(merged: ConvBranch, feeds: dict) -> np.ndarray:
    """One Conv with the merged parameters, run by the float64 reference."""
    net = Net(F64)
    x = net.input("x", list(feeds["x"].shape))
    y = net.node("Conv", [x, net.init("W", merged.weight), net.init("B", merged.bias)], group=merged.groups,
                 pads=list(merged.pads), strides=list(merged.strides), dilations=list(merged.dilations),
                 kernel_shape=list(merged.kernel_shape))
    net.output(y)
    return next(iter(run_ref(net.model(), feeds).values()))


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12 * scale)


def check_parallel(block: Branches) -> ConvBranch:
    expected = block.reference()
    merged = merge_parallel(block.branches)
    assert_same(run_merged(merged, block.feeds), expected)
    return merged


# ---- parallel branches ------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 2, 6])
def test_repvgg_branches(groups):
    block = Branches(6, seed=groups)
    block.add_conv((3, 3), pads=[1, 1, 1, 1], groups=groups)
    block.add_conv((1, 1), groups=groups)
    block.add_bn()
    merged = check_parallel(block)
    assert merged.groups == groups and merged.kernel_shape == (3, 3)


def test_plain_identity_and_strided_branches():
    block = Branches(4, seed=1)
    block.add_conv((3, 3), pads=[1, 1, 1, 1])
    block.add_identity()
    check_parallel(block)
    block = Branches(4, seed=2, spatial=(9, 8))
    block.add_conv((3, 3), pads=[1, 1, 1, 1], strides=[2, 2])
    block.add_conv((1, 1), strides=[2, 2])
    check_parallel(block)


def test_mobileone_over_parameterized_depthwise():
    block = Branches(5, seed=3)
    for _ in range(3):
        block.add_conv((3, 3), pads=[1, 1, 1, 1], groups=5)
    block.add_conv((1, 1), groups=5)
    block.add_bn()
    merged = check_parallel(block)
    assert merged.groups == 5


def test_acnet_asymmetric_kernels():
    block = Branches(3, seed=4, out_channels=4)
    block.add_conv((3, 3), pads=[1, 1, 1, 1])
    block.add_conv((1, 3), pads=[0, 1, 0, 1])
    block.add_conv((3, 1), pads=[1, 0, 1, 0])
    check_parallel(block)


def test_dense_and_depthwise_merge_into_the_common_grouping():
    block = Branches(4, seed=5)
    block.add_conv((3, 3), pads=[1, 1, 1, 1])
    block.add_conv((3, 3), pads=[1, 1, 1, 1], groups=4)
    block.add_conv((1, 1), groups=2)
    merged = check_parallel(block)
    assert merged.groups == 1


@pytest.mark.parametrize("pads,count_include_pad", [([1, 1, 1, 1], 1), ([0, 0, 0, 0], 0)])
def test_avgpool_branch(pads, count_include_pad):
    block = Branches(4, seed=6)
    block.add_conv((3, 3), pads=pads)
    block.add_avgpool((3, 3), pads=pads, count_include_pad=count_include_pad)
    check_parallel(block)


def test_avgpool_with_uncounted_padding_is_refused():
    with pytest.raises(MergeRefused, match="count_include_pad"):
        avgpool_branch(4, (3, 3), pads=[1, 1, 1, 1], count_include_pad=False)
    with pytest.raises(MergeRefused, match="ceil_mode"):
        avgpool_branch(4, (3, 3), ceil_mode=True)


def test_off_centre_kernel_lines_up_by_its_pads():
    block = Branches(3, seed=7)
    block.add_conv((2, 2), pads=[0, 0, 1, 1])
    block.add_conv((1, 1))
    check_parallel(block)


def test_one_and_three_spatial_axes():
    block = Branches(4, spatial=(11,), seed=8)
    block.add_conv((5,), pads=[2, 2], groups=2)
    block.add_conv((3,), pads=[1, 1])
    block.add_bn()
    check_parallel(block)
    block = Branches(2, spatial=(4, 5, 3), seed=9)
    block.add_conv((3, 3, 3), pads=[1] * 6)
    block.add_conv((1, 1, 1))
    block.add_identity()
    check_parallel(block)


def test_dilated_branches():
    block = Branches(3, spatial=(9, 9), seed=10)
    block.add_conv((3, 3), pads=[2, 2, 2, 2], dilations=[2, 2])
    block.add_conv((1, 1))
    block.add_identity()
    check_parallel(block)


@pytest.mark.parametrize("second,reason", [
    (dict(kernel=(3, 3), pads=[1, 1, 1, 1], strides=[2, 2]), "strides"),
    (dict(kernel=(3, 3), pads=[0, 0, 0, 0]), "line up"),
    (dict(kernel=(3, 3), pads=[2, 2, 2, 2], dilations=[2, 2]), "dilations"),
])
def test_parallel_refusals(second, reason):
    block = Branches(3, seed=11)
    block.add_conv((3, 3), pads=[1, 1, 1, 1])
    block.add_conv(second.pop("kernel"), **second)
    with pytest.raises(MergeRefused, match=reason):
        merge_parallel(block.branches)


def test_crossed_kernels_without_a_containing_one_are_refused():
    block = Branches(3, seed=12)
    block.add_conv((1, 3), pads=[0, 1, 0, 1])
    block.add_conv((3, 1), pads=[1, 0, 1, 0])
    with pytest.raises(MergeRefused, match="contains"):
        merge_parallel(block.branches)


def test_regroup_keeps_the_function():
    block = Branches(6, seed=13)
    block.add_conv((3, 3), pads=[1, 1, 1, 1], groups=6)
    expected = block.reference()
    for groups in (3, 2, 1):
        assert_same(run_merged(regroup(block.branches[0], groups), block.feeds), expected)
    with pytest.raises(MergeRefused):
        regroup(block.branches[0], 4)


# ---- two convolutions in sequence -------------------------------------------------------------------------

def check_sequential(first: dict, second: dict, *, c_in=4, c_mid=6, c_out=5, seed=0, spatial=(8, 7)):
    block = Branches(c_in, spatial=spatial, seed=seed)
    mid, a = block.conv(first.pop("kernel"), c_in=c_in, c_out=c_mid, **first)
    out, b = block.conv(second.pop("kernel"), x=mid, c_in=c_mid, c_out=c_out, **second)
    block.outputs.append(out)
    expected = block.reference()
    merged = merge_sequential(a, b)
    assert_same(run_merged(merged, block.feeds), expected)
    return merged


@pytest.mark.parametrize("first,second", [
    (dict(kernel=(1, 1)), dict(kernel=(3, 3))),  # 1x1 then kxk, both without padding, bias through
    (dict(kernel=(1, 1), pads=[1, 1, 1, 1]), dict(kernel=(3, 3))),  # DBB: the 1x1 pads, its border is its bias
    (dict(kernel=(3, 3), pads=[1, 1, 1, 1]), dict(kernel=(1, 1))),  # kxk then 1x1
    (dict(kernel=(3, 3), pads=[1, 1, 1, 1]), dict(kernel=(1, 1), strides=[2, 2])),
    (dict(kernel=(1, 1), bias=False), dict(kernel=(3, 3), pads=[1, 1, 1, 1])),  # no bias to reach the border
    (dict(kernel=(3, 3), pads=[1, 1, 1, 1]), dict(kernel=(3, 3), strides=[2, 2])),
    (dict(kernel=(3, 3), pads=[1, 1, 1, 1], strides=[2, 2]), dict(kernel=(1, 1))),  # strided, then a channel mix
    (dict(kernel=(3, 3), pads=[2, 2, 2, 2], dilations=[2, 2]), dict(kernel=(1, 1), strides=[2, 2])),
])
def test_sequential_exact_cases(first, second):
    check_sequential(first, second)


@pytest.mark.parametrize("g1,g2,expected_groups", [(2, 2, 2), (1, 2, 1), (2, 1, 1), (2, 4, 2)])
def test_sequential_grouped(g1, g2, expected_groups):
    merged = check_sequential(dict(kernel=(1, 1), groups=g1, pads=[1, 1, 1, 1]), dict(kernel=(3, 3), groups=g2),
                              c_in=4, c_mid=8, c_out=4, seed=g1 * 10 + g2)
    assert merged.groups == expected_groups


def test_sequential_depthwise():
    merged = check_sequential(dict(kernel=(1, 1), groups=4, pads=[1, 1, 1, 1]), dict(kernel=(3, 3), groups=4),
                              c_in=4, c_mid=4, c_out=4, seed=3)
    assert merged.groups == 4


def test_sequential_bias_under_zero_padding_is_refused():
    block = Branches(4, seed=14)
    _, a = block.conv((1, 1))
    _, b = block.conv((3, 3), pads=[1, 1, 1, 1])
    with pytest.raises(MergeRefused, match="zero padding"):
        merge_sequential(a, b)


@pytest.mark.parametrize("first,second,reason", [
    (dict(kernel=(3, 3), pads=[1, 1, 1, 1]), dict(kernel=(3, 3), pads=[1, 1, 1, 1]), "pads the first"),
    (dict(kernel=(1, 1), strides=[2, 2]), dict(kernel=(3, 3)), "strides"),
    (dict(kernel=(3, 3), dilations=[2, 2]), dict(kernel=(3, 3)), "dilated"),
])
def test_sequential_refusals(first, second, reason):
    block = Branches(4, seed=15)
    _, a = block.conv(first.pop("kernel"), **first)
    _, b = block.conv(second.pop("kernel"), **second)
    with pytest.raises(MergeRefused, match=reason):
        merge_sequential(a, b)


# ---- fully connected branches -----------------------------------------------------------------------------

def test_dense_branches_and_identity():
    from bnfold.reparam import dense_branch, dense_identity, merge_parallel_dense

    net = Net(F64, seed=20)
    rng = np.random.default_rng(20)
    x = net.input("x", [3, 5])
    w1, c1 = rng.standard_normal((5, 5)), rng.standard_normal(5)  # Gemm transB=1, alpha, beta
    w2 = rng.standard_normal((5, 5))  # MatMul
    a = net.node("Gemm", [x, net.init("W1", w1), net.init("C1", c1)], transB=1, alpha=0.7, beta=1.3)
    b = net.node("MatMul", [x, net.init("W2", w2)])
    net.output(net.node("Add", [net.node("Add", [a, b]), x]))
    feeds = {"x": rng.standard_normal((3, 5))}
    expected = next(iter(run_ref(net.model(), feeds).values()))
    gemm = dense_branch(w1, c1, trans_b=True, alpha=np.float32(0.7), beta=np.float32(1.3))  # float32 attributes
    merged = merge_parallel_dense([gemm, dense_branch(w2), dense_identity(5)])
    one = Net(F64)
    y = one.node("Gemm", [one.input("x", [3, 5]), one.init("W", merged.weight), one.init("C", merged.bias)])
    one.output(y)
    assert_same(next(iter(run_ref(one.model(), feeds).values())), expected)
    with pytest.raises(MergeRefused, match="per output feature"):
        dense_branch(w1, rng.standard_normal((3, 5)))
    with pytest.raises(MergeRefused, match="features"):
        merge_parallel_dense([dense_branch(w1), dense_branch(rng.standard_normal((5, 4)))])
