"""bnfold.fold_onnx: every pattern and every refusal against the float64 numpy reference (tests/reference.py).

Equivalence always compares the FOLDED model (onnxruntime CPU, graph optimizations disabled, or the reference
where onnxruntime has no kernel) with the reference run of the ORIGINAL model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import bnfold

try:
    from onnx_builders import (BF16, Net, bn_stats, count_ops, fold_and_check, random_feeds, refuse_and_check,
                               run_ort, run_ref, assert_close, unused_initializers as unused_initializers_of)
    from reference import SUPPORTED_OPS
except ImportError:  # pragma: no cover - tests/ is a package
    from tests.onnx_builders import (BF16, Net, bn_stats, count_ops, fold_and_check, random_feeds,
                                     refuse_and_check, run_ort, run_ref, assert_close,
                                     unused_initializers as unused_initializers_of)
    from tests.reference import SUPPORTED_OPS

# onnxruntime's CPU provider has no float64 Conv/ConvTranspose kernel: those models are compared with the
# float64 reference run on the folded model (still independent of bnfold).
# Nor does it accept dilations with auto_pad SAME_*.
def conv_runner(dtype, attrs=None) -> str:
    attrs = attrs or {}
    same_dilated = str(attrs.get("auto_pad", "")).startswith("SAME") and any(d > 1 for d in attrs.get("dilations", []))
    return "ref" if np.dtype(dtype) == np.float64 or same_dilated else "ort"


# ============================================================================================ Conv -> BN


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_bn_dims(nd, dtype):
    net = Net(dtype, seed=nd)
    spatial = [7, 6, 5][:nd]
    x = net.input("x", [2, 3, *spatial])
    c = net.conv(x, 3, 4, [3] * nd, pads=[1] * (2 * nd), strides=[2] * nd)
    net.bn(c, 4, "y")
    net.output("y")
    model = net.model()
    folded, report = fold_and_check(model, rules=["conv-bn"], runner=conv_runner(dtype))
    assert [(f.rule, f.into) for f in report.folded] == [("conv-bn", f"Conv({model.graph.node[0].output[0]})")]
    assert report.skipped == []


@pytest.mark.parametrize("attrs", [
    dict(strides=[2, 1], dilations=[1, 2], pads=[0, 1, 2, 0]),
    dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(auto_pad="SAME_LOWER", strides=[1, 2]),
    dict(auto_pad="VALID", strides=[1, 3]),
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_strides_dilations_pads(attrs, bias):
    net = Net(seed=3)
    x = net.input("x", [2, 4, 9, 8])
    c = net.conv(x, 4, 6, [3, 2], bias=bias, **attrs)
    net.bn(c, 6, "y")
    net.output("y")
    folded, _ = fold_and_check(net.model(), rules=["conv-bn"])
    conv = folded.graph.node[0]
    assert conv.op_type == "Conv" and len(conv.input) == 3 and conv.input[2]  # a bias carries the shift


@pytest.mark.parametrize("c_in,c_out,group", [(6, 4, 2), (6, 9, 3), (4, 4, 4), (3, 6, 3)])
def test_conv_bn_grouped_and_depthwise(c_in, c_out, group):
    net = Net(seed=group)
    x = net.input("x", [2, c_in, 6, 6])
    c = net.conv(x, c_in, c_out, [3, 3], group=group, pads=[1, 1, 1, 1])
    net.bn(c, c_out, "y")
    net.output("y")
    fold_and_check(net.model(), rules=["conv-bn"])


def _dynamo_zero_bias(net: Net, x: str, w: str) -> str:
    """The bias torch's dynamo exporter emits for a bias-free conv: zeros of W's C_out, cast like x."""
    c_out = net.node("Shape", [w], start=0, end=1)
    zero = net.constant(np.array(0.0, dtype=np.float32))
    zero_like = net.node("CastLike", [zero, x])
    return net.node("Expand", [zero_like, c_out])


def test_conv_bn_bias_from_constant_subgraph():
    def build(dynamo: bool):
        net = Net(seed=11, opset=18)
        x = net.input("x", [2, 3, 6, 6])
        w = net.weight("W", [5, 3, 3, 3])
        inputs = [x, w, _dynamo_zero_bias(net, x, w)] if dynamo else [x, w]
        c = net.node("Conv", inputs, pads=[1, 1, 1, 1])
        net.bn(c, 5, "y")
        net.output("y")
        return net.model()

    model = build(True)
    # The reference interprets Expand/CastLike only if it grew them; else the same net without the (all-zero)
    # computed bias is the original's exact equivalent.
    twin = None if {"Expand", "CastLike"} <= SUPPORTED_OPS else build(False)
    folded, _ = fold_and_check(model, rules=["conv-bn"], expected_model=twin)
    assert {n.op_type for n in folded.graph.node} == {"Conv"}, [n.op_type for n in folded.graph.node]
    # the computed bias was read by the Conv alone: it keeps its name, now as an initializer
    bias_name = next(n for n in model.graph.node if n.op_type == "Conv").input[2]
    assert folded.graph.node[0].input[2] == bias_name
    assert bias_name in {t.name for t in folded.graph.initializer}
    assert not any(t.name.endswith("_bnfold") for t in folded.graph.initializer)


def test_conv_bn_bias_from_exporter_chain_with_shared_fill():
    """The exporter's exact chain, ``Expand(CastLike(fill, x), Expand(Shape(W, end=1), [1]))``, with one fill
    Constant shared by two Convs (as torch.onnx emits it), which the engine recognises without the generic
    evaluator. A non-zero float64 fill makes its value matter: both Convs match the float64 reference."""
    net = Net(seed=13, opset=18)
    x = net.input("x", [2, 3, 6, 6])
    fill = net.constant(np.array(0.25, dtype=np.float64))

    def conv_bn(inp: str, w: str, c_in: int, c_out: int, out: str) -> str:
        count = net.node("Expand", [net.node("Shape", [w], start=0, end=1), net.constant(np.array([1], np.int64))])
        bias = net.node("Expand", [net.node("CastLike", [fill, inp]), count])
        return net.bn(net.node("Conv", [inp, w, bias], pads=[1, 1, 1, 1]), c_out, out)

    h = conv_bn(x, net.weight("W1", [4, 3, 3, 3]), 3, 4, "h")
    conv_bn(h, net.weight("W2", [5, 4, 3, 3]), 4, 5, "y")
    net.output("y")
    folded, report = fold_and_check(net.model(), rules=["conv-bn"])
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Conv"], [n.op_type for n in folded.graph.node]
    assert len(report.folded) == 2


def test_conv_bn_computed_bias_read_elsewhere_gets_a_new_name():
    """A computed bias that another node also reads stays for that reader; the folded Conv gets its own."""
    def build(dynamo: bool):
        net = Net(seed=12, opset=18)
        x = net.input("x", [2, 3, 6, 6])
        w = net.weight("W", [5, 3, 3, 3])
        bias = _dynamo_zero_bias(net, x, w) if dynamo else net.init("zero_bias", np.zeros(5, np.float32))
        c = net.node("Conv", [x, w, bias], pads=[1, 1, 1, 1])
        net.bn(c, 5, "y")
        net.node("Identity", [bias], "b")
        net.output("y")
        net.output("b", [5])
        return net.model(), bias

    model, bias = build(True)
    twin = None if {"Expand", "CastLike"} <= SUPPORTED_OPS else build(False)[0]
    folded, _ = fold_and_check(model, rules=["conv-bn"], expected_model=twin)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert conv.input[2] == f"{bias}_bnfold"
    assert any(n.output[0] == bias for n in folded.graph.node), "the Identity's input is still computed"


# ============================================================================================ ConvTranspose -> BN


@pytest.mark.parametrize("nd,c_in,c_out,group,attrs", [
    (1, 3, 4, 1, dict(strides=[2])),
    (2, 4, 6, 2, dict(strides=[2, 2], output_padding=[1, 0], pads=[1, 0, 0, 1])),
    (2, 6, 3, 3, dict(strides=[3, 1], dilations=[1, 2])),
    (3, 2, 4, 2, dict(strides=[2, 1, 2], output_padding=[1, 0, 1])),
])
@pytest.mark.parametrize("bias", [True, False])
def test_convtranspose_bn(nd, c_in, c_out, group, attrs, bias):
    net = Net(seed=nd + group)
    x = net.input("x", [2, c_in, *[4, 5, 3][:nd]])
    c = net.conv(x, c_in, c_out, [3, 2, 2][:nd], group=group, bias=bias, op="ConvTranspose", **attrs)
    net.bn(c, c_out, "y")
    net.output("y")
    fold_and_check(net.model(), rules=["convtranspose-bn"])


# ============================================================================================ Gemm -> BN


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, [5], [1, 5], []])
@pytest.mark.parametrize("beta", [1.9, 1.0])  # beta 1 with a [5] or no bias: the batched (prefetched) path
def test_gemm_bn(trans_a, trans_b, bias_shape, beta):
    net = Net(seed=7)
    x = net.input("x", [4, 3] if trans_a else [3, 4])
    w = net.weight("W", [5, 4] if trans_b else [4, 5])
    inputs = [x, w]
    if bias_shape is not None:
        inputs.append(net.init("C", net.rng.standard_normal(bias_shape).astype(np.float32)))
    g = net.node("Gemm", inputs, transA=trans_a, transB=trans_b, alpha=0.7, beta=beta)
    net.bn(g, 5, "y")
    net.output("y")
    fold_and_check(net.model(), rules=["gemm-bn"])


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_gemm_bn_dtypes(dtype):
    net = Net(dtype, seed=8)
    x = net.input("x", [3, 6])
    g = net.node("Gemm", [x, net.weight("W", [4, 6]), net.weight("C", [4])], transB=1, alpha=1.5)
    net.bn(g, 4, "y")
    net.output("y")
    fold_and_check(net.model(), rules=["gemm-bn"])


# ============================================================================================ MatMul -> BN


@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("add_shape", [[6], [1, 6]])
def test_matmul_bn(with_add, add_shape):
    net = Net(seed=9)
    x = net.input("x", [3, 4])
    m = net.node("MatMul", [x, net.weight("W", [4, 6])])
    if with_add:
        m = net.node("Add", [m, net.init("A", net.rng.standard_normal(add_shape).astype(np.float32))])
    net.bn(m, 6, "y")
    net.output("y")
    folded, _ = fold_and_check(net.model(), rules=["matmul-bn"])
    assert count_ops(folded.graph, "Add") + count_ops(folded.graph, "MatMul") + \
        count_ops(folded.graph, "Gemm") == (2 if with_add else 1)


def test_matmul_bn_rank3_is_refused_even_when_sizes_match():
    # [N, C, L] @ W[L, L]: the weight's output axis is L, BN normalizes C (also of size 4).
    net = Net(seed=10)
    x = net.input("x", [2, 4, 4])
    m = net.node("MatMul", [x, net.weight("W", [4, 4])])
    net.bn(m, 4, "y")
    net.output("y")
    refuse_and_check(net.model(), "rank-3")


def test_matmul_bn_without_shape_information_is_refused():
    net = Net(seed=10)
    x = net.input("x", None)
    m = net.node("MatMul", [x, net.weight("W", [4, 4])])
    net.bn(m, 4, "y")
    net.output("y")
    refuse_and_check(net.model(), "rank 2")


# ============================================================================================ BN -> linear op


@pytest.mark.parametrize("c_in,c_out,group,kernel,attrs", [
    (4, 6, 1, [1, 1], {}),
    (6, 4, 2, [1, 1], dict(strides=[2, 2])),
    (6, 6, 3, [1, 1], dict(auto_pad="SAME_UPPER")),
    (4, 5, 1, [3, 2], dict(strides=[1, 2], dilations=[2, 1])),  # no padding: every value went through BN
    (4, 4, 2, [3, 3], dict(auto_pad="VALID")),
])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_conv(c_in, c_out, group, kernel, attrs, bias):
    net = Net(seed=c_in + c_out)
    x = net.input("x", [2, c_in, 7, 6])
    b = net.bn(x, c_in)
    net.conv(b, c_in, c_out, kernel, group=group, bias=bias, **attrs)
    net.nodes[-1].output[0] = "y"
    net.output("y")
    folded, _ = fold_and_check(net.model(), rules=["bn-conv"])
    assert folded.graph.node[0].input[0] == "x"


@pytest.mark.parametrize("attrs", [dict(pads=[1, 1, 1, 1]), dict(pads=[0, 0, 0, 1]),
                                   dict(auto_pad="SAME_UPPER")])
def test_bn_conv_with_padding_is_refused(attrs):
    net = Net(seed=12)
    x = net.input("x", [2, 4, 6, 6])
    b = net.bn(x, 4)
    net.conv(b, 4, 3, [3, 3], **attrs)
    net.nodes[-1].output[0] = "y"
    net.output("y")
    model = net.model()
    refuse_and_check(model, "pad")
    # and the refused model still computes what the reference says
    assert_close(run_ort(model, random_feeds(model)), run_ref(model, random_feeds(model)), 1e-4)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, [5], [1, 5], []])
def test_bn_gemm(trans_b, bias_shape):
    net = Net(seed=13)
    x = net.input("x", [3, 6])
    b = net.bn(x, 6)
    inputs = [b, net.weight("W", [5, 6] if trans_b else [6, 5])]
    if bias_shape is not None:
        inputs.append(net.init("C", net.rng.standard_normal(bias_shape).astype(np.float32)))
    net.node("Gemm", inputs, "y", transB=trans_b, alpha=0.8, beta=1.3)
    net.output("y")
    fold_and_check(net.model(), rules=["bn-gemm"])


def test_bn_gemm_trans_a_is_not_folded():
    net = Net(seed=13)
    x = net.input("x", [6, 6])
    b = net.bn(x, 6)
    net.node("Gemm", [b, net.weight("W", [6, 5])], "y", transA=1)
    net.output("y")
    refuse_and_check(net.model(), "transA")


@pytest.mark.parametrize("with_add", [False, True])
def test_bn_matmul(with_add):
    net = Net(seed=14)
    x = net.input("x", [3, 6])
    b = net.bn(x, 6)
    m = net.node("MatMul", [b, net.weight("W", [6, 5])], None if with_add else "y")
    if with_add:
        net.node("Add", [m, net.weight("A", [5])], "y")
    net.output("y")
    fold_and_check(net.model(), rules=["bn-matmul"])


def test_bn_matmul_rank3_is_refused():
    net = Net(seed=14)
    x = net.input("x", [2, 4, 4])
    b = net.bn(x, 4)
    net.node("MatMul", [b, net.weight("W", [4, 4])], "y")
    net.output("y")
    refuse_and_check(net.model(), "rank-3")


@pytest.mark.parametrize("head", ["Gemm", "GemmT", "MatMul"])
@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_bn_flatten_classifier_head(head, flatten):
    net = Net(seed=15)
    x = net.input("x", [2, 4, 3, 2])
    b = net.bn(x, 4)
    if flatten == "Flatten":
        f = net.node("Flatten", [b], axis=1)
    else:
        f = net.node("Reshape", [b, net.init("shape", np.array([0, -1], dtype=np.int64))])
    if head == "Gemm":
        net.node("Gemm", [f, net.weight("W", [24, 5]), net.weight("C", [5])], "y", alpha=1.1)
    elif head == "GemmT":
        net.node("Gemm", [f, net.weight("W", [5, 24]), net.weight("C", [5])], "y", transB=1)
    else:
        net.node("MatMul", [f, net.weight("W", [24, 5])], "y")
    net.output("y")
    fold_and_check(net.model(), rules=["bn-matmul" if head == "MatMul" else "bn-gemm"])


def test_bn_flatten_axis2_is_refused():
    net = Net(seed=15)
    x = net.input("x", [2, 4, 3, 2])
    b = net.bn(x, 4)
    f = net.node("Flatten", [b], axis=2)
    net.node("Gemm", [f, net.weight("W", [24, 5])], "y")
    net.output("y")
    model = net.model()
    folded, report = bnfold.fold_onnx(model)
    assert count_ops(folded.graph) == 1 and report.folded == []


# ============================================================================================ Mul/Add after linear


@pytest.mark.parametrize("ops", [
    [("Mul", [3, 1, 1]), ("Add", [1, 3, 1, 1])],
    [("Div", [1, 3, 1, 1]), ("Sub", [3, 1, 1])],
    [("Mul", [1]), ("Add", [3, 1, 1])],
])
def test_conv_mul_add(ops):
    net = Net(seed=16)
    x = net.input("x", [2, 2, 5, 5])
    y = net.conv(x, 2, 3, [3, 3], pads=[1, 1, 1, 1])
    for op, shape in ops:
        value = net.rng.uniform(0.5, 2.0, shape).astype(np.float32)
        y = net.node(op, [y, net.init(net.fresh("k"), value)])
    net.nodes[-1].output[0] = "y"
    net.output("y")
    folded, report = fold_and_check(net.model(), rules=["affine-mul-add"])
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert len(report.folded) == 2


def test_gemm_mul_add_constant_first():
    net = Net(seed=17)
    x = net.input("x", [3, 4])
    g = net.node("Gemm", [x, net.weight("W", [4, 5])])
    m = net.node("Mul", [net.init("k", net.rng.uniform(0.5, 2, [5]).astype(np.float32)), g])
    net.node("Add", [net.init("a", net.rng.normal(0, 1, [1, 5]).astype(np.float32)), m], "y")
    net.output("y")
    folded, _ = fold_and_check(net.model(), rules=["affine-mul-add"])
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]


def test_conv_mul_by_spatial_constant_is_left_alone():
    net = Net(seed=18)
    x = net.input("x", [2, 2, 5, 5])
    c = net.conv(x, 2, 3, [3, 3], pads=[1, 1, 1, 1])
    net.node("Mul", [c, net.init("k", net.rng.uniform(0.5, 2, [1, 5, 1]).astype(np.float32))], "y")
    net.output("y")
    model = net.model()
    folded, report = bnfold.fold_onnx(model)
    assert report.folded == [] and folded.SerializeToString() == model.SerializeToString()


# ============================================================================================ Concat -> BN


@pytest.mark.parametrize("axis", [1, -3])
def test_concat_bn(axis):
    net = Net(seed=19)
    x = net.input("x", [2, 3, 6, 6])
    a = net.conv(x, 3, 2, [3, 3], pads=[1, 1, 1, 1])
    b = net.conv(x, 3, 4, [1, 1], bias=False)
    c = net.conv(x, 3, 4, [3, 3], group=1, op="ConvTranspose", pads=[1, 1, 1, 1])
    cat = net.node("Concat", [a, b, c], axis=axis)
    net.bn(cat, 10, "y")
    net.output("y")
    folded, report = fold_and_check(net.model(), rules=["concat-bn"])
    assert count_ops(folded.graph, "Concat") == 1


def test_concat_bn_with_a_shared_slice_is_refused():
    net = Net(seed=19)
    x = net.input("x", [2, 3, 6, 6])
    a = net.conv(x, 3, 2, [1, 1])
    b = net.conv(x, 3, 4, [1, 1])
    cat = net.node("Concat", [a, b], axis=1)
    net.bn(cat, 6, "y")
    net.output("y")
    net.node("Relu", [a], "r")
    net.output("r")
    refuse_and_check(net.model(), "also used elsewhere")


# ============================================================================================ chains, parameters


def test_conv_bn_bn_chain_folds_completely():
    net = Net(seed=20)
    x = net.input("x", [2, 3, 5, 5])
    c = net.conv(x, 3, 4, [3, 3])
    b = net.bn(c, 4)
    b = net.bn(b, 4)
    net.bn(b, 4, "y")
    net.output("y")
    folded, report = fold_and_check(net.model())
    assert len(report.folded) == 3 and [n.op_type for n in folded.graph.node] == ["Conv"]


def test_bn_params_as_constant_nodes():
    net = Net(seed=21)
    x = net.input("x", [2, 3, 5, 5])
    c = net.conv(x, 3, 4, [3, 3], bias=False)
    net.bn(c, 4, "y", params="const")
    net.output("y")
    folded, _ = fold_and_check(net.model(), rules=["conv-bn"])
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_bn_params_from_constant_subgraphs():
    net = Net(seed=22)
    x = net.input("x", [2, 3, 5, 5])
    c = net.conv(x, 3, 4, [3, 3])
    shape = net.init("c_shape", np.array([4], dtype=np.int64))
    scale = net.node("ConstantOfShape", [shape], value=numpy_helper.from_array(np.array([1.5], np.float32)))
    bias = net.node("ConstantOfShape", [shape], value=numpy_helper.from_array(np.array([-0.25], np.float32)))
    mean = net.node("Mul", [net.init("m0", np.array([0.1, -0.2, 0.3, 0.0], np.float32)),
                            net.init("two", np.array(2.0, np.float32))])
    var = net.init("var", np.array([0.5, 1.0, 2.0, 0.3], np.float32))
    net.node("BatchNormalization", [c, scale, bias, mean, var], "y")
    net.output("y")
    folded, _ = fold_and_check(net.model(), rules=["conv-bn"])
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


@pytest.mark.parametrize("opset", [7, 9, 14, 15])
def test_bn_opsets(opset):
    net = Net(seed=opset, opset=opset)
    x = net.input("x", [2, 3, 5, 5])
    c = net.conv(x, 3, 4, [3, 3])
    net.bn(c, 4, "y", epsilon=1e-3)
    net.output("y")
    fold_and_check(net.model(), rules=["conv-bn"])


def test_bn_opset6_is_test():
    net = Net(seed=6, opset=6, ir=3)
    x = net.input("x", [2, 3, 5, 5])
    c = net.conv(x, 3, 4, [3, 3])
    net.bn(c, 4, "y", is_test=1, spatial=1, epsilon=1e-3)
    net.output("y")
    # IR 3: initializers must also be graph inputs.
    model = net.model()
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    # onnxruntime has no BatchNormalization-6 kernel, so the original runs only on the reference; the folded
    # model (Conv-1 alone) runs on onnxruntime, and on the reference as well.
    fold_and_check(model, rules=["conv-bn"])
    fold_and_check(model, rules=["conv-bn"], runner="ref")


def test_bn_opset6_training_is_refused():
    net = Net(seed=6, opset=6, ir=3)
    x = net.input("x", [2, 3, 5, 5])
    c = net.conv(x, 3, 4, [3, 3])
    net.bn(c, 4, "y", is_test=0)
    net.output("y")
    model = net.model()
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    refuse_and_check(model, "training")


# ============================================================================================ dtypes


def test_bf16_conv_bn():
    net = Net(BF16, seed=23, opset=22)  # Conv takes bfloat16 from opset 22
    x = net.input("x", [2, 3, 6, 6])
    c = net.conv(x, 3, 4, [3, 3], pads=[1, 1, 1, 1])
    net.bn(c, 4, "y")
    net.output("y")
    # onnxruntime's CPU provider has no bfloat16 Conv/BatchNormalization: reference on both models.
    fold_and_check(net.model(), rules=["conv-bn"], runner="ref")


@pytest.mark.parametrize("pattern", ["conv-bn", "gemm-bn", "matmul-bn", "convtranspose-bn", "concat-bn", "bn-conv",
                                     "bn-matmul"])
def test_fp16_activations_fp32_bn_params(pattern):
    net = Net(np.float16, seed=24, opset=15)
    bn = dict(dtype=np.float32)  # BatchNormalization-15: T=float16, T1=T2=float32
    if pattern in ("gemm-bn", "matmul-bn", "bn-matmul"):
        x = net.input("x", [3, 5])
    else:
        x = net.input("x", [2, 3, 6, 6])
    if pattern == "conv-bn":
        net.bn(net.conv(x, 3, 4, [3, 3], pads=[1, 1, 1, 1]), 4, "y", **bn)
    elif pattern == "convtranspose-bn":
        net.bn(net.conv(x, 3, 4, [2, 2], op="ConvTranspose", strides=[2, 2]), 4, "y", **bn)
    elif pattern == "gemm-bn":
        net.bn(net.node("Gemm", [x, net.weight("W", [5, 4]), net.weight("C", [4])]), 4, "y", **bn)
    elif pattern == "matmul-bn":
        net.bn(net.node("MatMul", [x, net.weight("W", [5, 4])]), 4, "y", **bn)
    elif pattern == "concat-bn":
        cat = net.node("Concat", [net.conv(x, 3, 2, [1, 1]), net.conv(x, 3, 3, [1, 1], bias=False)], axis=1)
        net.bn(cat, 5, "y", **bn)
    elif pattern == "bn-conv":
        net.conv(net.bn(x, 3, **bn), 3, 4, [1, 1])
        net.nodes[-1].output[0] = "y"
    else:
        net.node("MatMul", [net.bn(x, 5, **bn), net.weight("W", [5, 4])], "y")
    net.output("y")
    folded, _ = fold_and_check(net.model(), rules=[pattern], tol=1e-2)
    for t in folded.graph.initializer:
        assert t.data_type == TP.FLOAT16, t.name


def test_fp16_bn_before_gemm_with_fp32_params():
    net = Net(np.float16, seed=25, opset=15)
    x = net.input("x", [3, 6])
    b = net.bn(x, 6, dtype=np.float32)
    net.node("Gemm", [b, net.weight("W", [6, 4]), net.weight("C", [4])], "y")
    net.output("y")
    fold_and_check(net.model(), rules=["bn-gemm"], tol=1e-2)


def test_fp16_fold_is_done_in_float64_and_rounded_once():
    # A folded fp16 weight must be the float64 product rounded once, not an fp16 product.
    net = Net(np.float16, seed=26)
    x = net.input("x", [1, 8, 4, 4])
    c = net.conv(x, 8, 16, [1, 1], bias=False)
    net.bn(c, 16, "y")
    net.output("y")
    model = net.model()
    folded, _ = fold_and_check(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = inits[model.graph.node[0].input[1]].astype(np.float64)
    sc, bi, mu, var = (inits[n].astype(np.float64) for n in model.graph.node[1].input[1:])
    s = sc / np.sqrt(var + np.float64(np.float32(1e-5)))
    exact = (w * s[:, None, None, None]).astype(np.float16)
    new = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    got = new[folded.graph.node[0].input[1]]
    assert np.array_equal(got, exact)
    assert np.array_equal(new[folded.graph.node[0].input[2]], (bi - mu * s).astype(np.float16))


# ============================================================================================ subgraphs


def test_conv_bn_inside_if_branches():
    net = Net(seed=27)
    x = net.input("x", [2, 3, 5, 5])
    net.inputs.append(helper.make_tensor_value_info("cond", TP.BOOL, []))
    outer_w = net.weight("W_outer", [4, 3, 3, 3])

    def branch(name, weight_inside: bool):
        sub = Net(seed=28 if weight_inside else 29)
        w = sub.weight(f"{name}_W", [4, 3, 3, 3]) if weight_inside else outer_w
        c = sub.node("Conv", [x, w], f"{name}_c", pads=[1, 1, 1, 1])
        sub.bn(c, 4, f"{name}_y")
        return helper.make_graph(sub.nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TP.FLOAT,
                                                                                     [2, 4, 5, 5])], sub.inits)
    net.nodes.append(helper.make_node("If", ["cond"], ["y"], name="If_0",
                                      then_branch=branch("then", True), else_branch=branch("else", False)))
    net.output("y", [2, 4, 5, 5])
    model = net.model()
    feeds = [random_feeds(model, cond=np.array(v)) for v in (True, False)]
    folded, report = fold_and_check(model, feeds=feeds, rules=["conv-bn"], check_unused=False)
    assert len(report.folded) == 2
    assert {f.graph for f in report.folded} == {"If_0.then_branch", "If_0.else_branch"}
    for attr in folded.graph.node[0].attribute:
        assert [n.op_type for n in attr.g.node] == ["Conv"]


def test_outer_scope_weight_folded_in_a_branch_is_not_left_unused():
    # W is a main-graph initializer read only by a Conv inside the If's branch. After the fold the branch
    # reads its own folded copy, so the original W is dead weight in the saved model.
    net = Net(seed=37)
    x = net.input("x", [2, 3, 5, 5])
    net.inputs.append(helper.make_tensor_value_info("cond", TP.BOOL, []))
    w = net.weight("W", [4, 3, 3, 3])
    branches = {}
    for name in ("then", "else"):
        sub = Net(seed=38)
        y = sub.bn(sub.node("Conv", [x, w], f"{name}_c"), 4, f"{name}_y") if name == "then" else \
            sub.node("Relu", [x], f"{name}_y")
        branches[f"{name}_branch"] = helper.make_graph(
            sub.nodes, name, [], [helper.make_tensor_value_info(y, TP.FLOAT, None)], sub.inits)
    net.nodes.append(helper.make_node("If", ["cond"], ["y"], name="If_0", **branches))
    net.outputs.append(helper.make_tensor_value_info("y", TP.FLOAT, None))
    model = net.model()
    model.graph.output[0].type.tensor_type.shape.SetInParent()  # rank unknown: the branches disagree
    feeds = [random_feeds(model, cond=np.array(True))]
    folded, report = fold_and_check(model, feeds=feeds, rules=["conv-bn"], check_unused=False)
    assert report.folded[0].graph == "If_0.then_branch"
    total = sum(t.ByteSize() for t in folded.graph.initializer)
    assert unused_initializers_of(folded) == [], f"{unused_initializers_of(folded)} left unused ({total} bytes)"


# ============================================================================================ refusals


def _conv_bn(seed=30):
    net = Net(seed=seed)
    x = net.input("x", [2, 3, 5, 5])
    c = net.conv(x, 3, 4, [3, 3])
    return net, c


def test_training_mode_is_refused():
    net, c = _conv_bn()
    net.bn(c, 4, "y", training_mode=1)
    net.output("y")
    refuse_and_check(net.model(), "training")


@pytest.mark.parametrize("opset", [9, 14])
def test_bn_with_running_stat_outputs_is_refused(opset):
    net = Net(seed=31, opset=opset)
    x = net.input("x", [2, 3, 5, 5])
    c = net.conv(x, 3, 4, [3, 3])
    b = net.bn(c, 4, "y", **({"training_mode": 1} if opset >= 14 else {}))
    net.nodes[-1].output.extend(["run_mean", "run_var"])
    net.output(b)
    net.output("run_mean", [4])
    net.output("run_var", [4])
    refuse_and_check(net.model(), "training")


def test_non_constant_scale_is_refused():
    net, c = _conv_bn()
    net.input("gamma", [4])
    net.bn(c, 4, "y")
    net.nodes[-1].input[1] = "gamma"
    net.inits = [t for t in net.inits if not t.name.startswith("bn_scale")]
    net.output("y")
    model = net.model()
    report = refuse_and_check(model, "scale is not constant")
    assert "graph input" in report.skipped[0].reason
    feeds = random_feeds(model)
    assert_close(run_ort(model, feeds), run_ref(model, feeds), 1e-4)


def test_initializer_listed_as_input_is_overridable_from_ir4():
    net, c = _conv_bn()
    net.bn(c, 4, "y")
    net.output("y")
    model = net.model()
    scale = model.graph.node[-1].input[1]
    model.graph.input.append(helper.make_tensor_value_info(scale, TP.FLOAT, [4]))
    report = refuse_and_check(model, "overridden")
    assert report.notes == []


def test_initializer_listed_as_input_is_constant_in_ir3():
    net = Net(seed=32, opset=7, ir=3)
    x = net.input("x", [2, 3, 5, 5])
    c = net.conv(x, 3, 4, [3, 3])
    net.bn(c, 4, "y")
    net.output("y")
    model = net.model()
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    folded, report = fold_and_check(model, rules=["conv-bn"])
    assert any("IR version" in n for n in report.notes), report.notes
    # IR 3: every initializer is still listed as a graph input, and no BN parameter is left behind.
    inits = {t.name for t in folded.graph.initializer}
    assert inits <= {i.name for i in folded.graph.input}
    assert not any(n.startswith("bn_") for n in inits | {i.name for i in folded.graph.input})


def test_linear_output_with_another_consumer_is_refused():
    net, c = _conv_bn()
    net.bn(c, 4, "y")
    net.node("Relu", [c], "r")
    net.output("y")
    net.output("r")
    refuse_and_check(net.model(), "also used elsewhere")


def test_linear_output_that_is_a_graph_output_is_refused():
    net, c = _conv_bn()
    net.bn(c, 4, "y")
    net.output("y")
    net.output(c)
    refuse_and_check(net.model(), "graph output")


def test_fp16_overflow_is_refused():
    net = Net(np.float16, seed=33)
    x = net.input("x", [2, 3, 5, 5])
    net.init("W", np.full([4, 3, 3, 3], 2.0, np.float16))
    c = net.node("Conv", [x, "W"])
    stats = {"scale": np.full(4, 1000.0), "bias": np.zeros(4), "mean": np.zeros(4), "var": np.full(4, 1e-4)}
    net.bn(c, 4, "y", stats=stats, epsilon=1e-6)  # s ~ 1e5: folded weight ~ 2e5 > 65504
    net.output("y")
    refuse_and_check(net.model(), "overflow")


def test_negative_variance_is_refused():
    net, c = _conv_bn()
    stats = bn_stats(net.rng, 4)
    stats["var"][2] = -0.5
    net.bn(c, 4, "y", stats=stats)
    net.output("y")
    refuse_and_check(net.model(), "negative")


@pytest.mark.parametrize("op,opset,extra", [
    ("LayerNormalization", 17, dict(axis=1)),
    ("InstanceNormalization", 15, {}),
    ("GroupNormalization", 21, dict(num_groups=2)),
])
def test_per_sample_norms_are_reported(op, opset, extra):
    net = Net(seed=34, opset=opset)
    x = net.input("x", [2, 4, 5, 5])
    c = net.conv(x, 4, 4, [1, 1])
    shape = [4, 5, 5] if op == "LayerNormalization" else [4]
    net.node(op, [c, net.weight("g", shape), net.weight("b", shape)], "y", **extra)
    net.output("y")
    refuse_and_check(net.model(), "per-sample statistics", op_type=op)


# ============================================================================================ guarantees


def test_shared_weight_two_convs_two_bns():
    net = Net(seed=35)
    x = net.input("x", [2, 3, 5, 5])
    w = net.weight("W", [4, 3, 3, 3])
    c1 = net.node("Conv", [x, w], pads=[1, 1, 1, 1])
    c2 = net.node("Conv", [x, w])
    net.bn(c1, 4, "y1")
    net.bn(c2, 4, "y2")
    net.output("y1")
    net.output("y2")
    folded, report = fold_and_check(net.model(), rules=["conv-bn"])
    assert len(report.folded) == 2
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]


def test_determinism_and_idempotence():
    net = Net(seed=36)
    x = net.input("x", [2, 3, 6, 6])
    c = net.conv(x, 3, 4, [3, 3])
    b = net.bn(c, 4)
    r = net.node("Relu", [b])
    f = net.node("Flatten", [net.bn(r, 4)])
    net.node("Gemm", [f, net.weight("W", [64, 3])], "y")
    net.output("y")
    model = net.model()
    first, report = bnfold.fold_onnx(model)
    second, _ = bnfold.fold_onnx(model)
    assert first.SerializeToString() == second.SerializeToString()
    assert len(report.folded) == 2
    again, report2 = bnfold.fold_onnx(first)
    assert again.SerializeToString() == first.SerializeToString()
    assert report2.folded == [] and report2.bn_before == report2.bn_after == 0


def test_inplace_folds_the_given_model():
    net, c = _conv_bn()
    net.bn(c, 4, "y")
    net.output("y")
    model = net.model()
    folded, _ = bnfold.fold_onnx(model, inplace=True)
    assert folded is model and count_ops(model.graph) == 0


def test_skip_rule():
    net, c = _conv_bn()
    net.bn(c, 4, "y")
    net.output("y")
    report = refuse_and_check(net.model(), "", skip=["conv-bn"])
    assert len(report.skipped) == 1


# ============================================================================================ hypothesis properties

PROPS = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow],
                 derandomize=True)


@st.composite
def conv_cases(draw, transpose=False):
    nd = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    c_in = group * draw(st.integers(1, 3))
    c_out = group * draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
    strides = [draw(st.integers(1, 3)) for _ in range(nd)]
    dilations = [draw(st.integers(1, 2)) for _ in range(nd)]
    attrs = dict(strides=strides, dilations=dilations)
    if transpose:
        # the spec allows output_padding < max(stride, dilation); onnxruntime only < stride
        attrs["output_padding"] = [draw(st.integers(0, s - 1)) for s in strides]
        attrs["pads"] = [draw(st.integers(0, k - 1)) for k in kernel] * 2
    else:
        mode = draw(st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
        if mode == "NOTSET":
            attrs["pads"] = [draw(st.integers(0, 2)) for _ in range(2 * nd)]
        else:
            attrs["auto_pad"] = mode
    sizes = [draw(st.integers((k - 1) * d + 1, (k - 1) * d + 4)) for k, d in zip(kernel, dilations)]
    return dict(nd=nd, group=group, c_in=c_in, c_out=c_out, kernel=kernel, attrs=attrs, sizes=sizes,
                bias=draw(st.booleans()), dtype=draw(st.sampled_from([np.float32, np.float64])),
                seed=draw(st.integers(0, 2**16)))


@PROPS
@given(conv_cases())
def test_property_conv_bn(case):
    net = Net(case["dtype"], seed=case["seed"])
    x = net.input("x", [2, case["c_in"], *case["sizes"]])
    c = net.conv(x, case["c_in"], case["c_out"], case["kernel"], group=case["group"], bias=case["bias"],
                 **case["attrs"])
    net.bn(c, case["c_out"], "y")
    net.output("y")
    fold_and_check(net.model(), rules=["conv-bn"], runner=conv_runner(case["dtype"], case["attrs"]))


@PROPS
@given(conv_cases(transpose=True))
def test_property_convtranspose_bn(case):
    net = Net(case["dtype"], seed=case["seed"])
    x = net.input("x", [2, case["c_in"], *case["sizes"]])
    c = net.conv(x, case["c_in"], case["c_out"], case["kernel"], group=case["group"], bias=case["bias"],
                 op="ConvTranspose", **case["attrs"])
    net.bn(c, case["c_out"], "y")
    net.output("y")
    fold_and_check(net.model(), rules=["convtranspose-bn"], runner=conv_runner(case["dtype"]))


@PROPS
@given(trans_a=st.integers(0, 1), trans_b=st.integers(0, 1), m=st.integers(1, 5), k=st.integers(1, 6),
       n=st.integers(1, 6), alpha=st.floats(-2, 2).filter(lambda a: abs(a) > 0.1), beta=st.floats(-2, 2),
       bias=st.sampled_from(["none", "n", "1n", "scalar", "mn"]), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**16))
def test_property_gemm_bn(trans_a, trans_b, m, k, n, alpha, beta, bias, dtype, seed):
    net = Net(dtype, seed=seed)
    x = net.input("x", [k, m] if trans_a else [m, k])
    inputs = [x, net.weight("W", [n, k] if trans_b else [k, n])]
    shape = {"none": None, "n": [n], "1n": [1, n], "scalar": [], "mn": [m, n]}[bias]
    if shape is not None:
        inputs.append(net.init("C", net.rng.standard_normal(shape).astype(dtype)))
    g = net.node("Gemm", inputs, transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    net.bn(g, n, "y")
    net.output("y")
    # a full [M, N] bias is not per channel, but BN's affine still maps it exactly: every case folds
    fold_and_check(net.model(), rules=["gemm-bn"])


@PROPS
@given(group=st.integers(1, 4), cin_g=st.integers(1, 3), cout_g=st.integers(1, 3), stride=st.integers(1, 3),
       bias=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_property_bn_pointwise_conv(group, cin_g, cout_g, stride, bias, dtype, seed):
    net = Net(dtype, seed=seed)
    c_in, c_out = group * cin_g, group * cout_g
    x = net.input("x", [2, c_in, 5, 4])
    b = net.bn(x, c_in)
    net.conv(b, c_in, c_out, [1, 1], group=group, bias=bias, strides=[stride, stride])
    net.nodes[-1].output[0] = "y"
    net.output("y")
    fold_and_check(net.model(), rules=["bn-conv"], runner=conv_runner(dtype))


# ============================================================================================ more corners


@pytest.mark.parametrize("opset", [9, 10])
def test_matmul_bn_before_gemm_had_optional_bias(opset):
    # Gemm's C is optional only from opset 11: the BN becomes the Add that carries the folded bias.
    net = Net(seed=40, opset=opset)
    x = net.input("x", [3, 4])
    m = net.node("MatMul", [x, net.weight("W", [4, 6])])
    net.bn(m, 6, "y")
    net.output("y")
    folded, _ = fold_and_check(net.model(), rules=["matmul-bn"])
    assert sorted(n.op_type for n in folded.graph.node) == ["Add", "MatMul"]


def test_bn_matmul_before_opset11_needs_a_bias_and_is_refused():
    net = Net(seed=41, opset=10)
    x = net.input("x", [3, 6])
    b = net.bn(x, 6)
    net.node("MatMul", [b, net.weight("W", [6, 5])], "y")
    net.output("y")
    refuse_and_check(net.model(), "bias")


def test_matmul_rank_from_shape_inference_and_symbolic_batch():
    # x[N, 4, 3, 3] -> GlobalAveragePool -> Flatten -> MatMul -> BN: rank 2 is known only by inference.
    net = Net(seed=42)
    x = net.input("x", ["N", 4, 3, 3])
    p = net.node("GlobalAveragePool", [x])
    f = net.node("Flatten", [p])
    m = net.node("MatMul", [f, net.weight("W", [4, 5])])
    net.bn(m, 5, "y")
    net.output("y")
    model = net.model()
    feeds = {"x": np.random.default_rng(0).standard_normal([3, 4, 3, 3]).astype(np.float32)}
    fold_and_check(model, rules=["matmul-bn"], feeds=feeds)


def test_bn_bn_conv_chain_folds_completely():
    net = Net(seed=43)
    x = net.input("x", [2, 4, 5, 5])
    b = net.bn(net.bn(x, 4), 4)
    net.conv(b, 4, 3, [1, 1])
    net.nodes[-1].output[0] = "y"
    net.output("y")
    folded, report = fold_and_check(net.model(), rules=["bn-conv"])
    assert len(report.folded) == 2 and [n.op_type for n in folded.graph.node] == ["Conv"]


def test_bn_between_relu_and_conv_reports_why():
    net = Net(seed=44)
    x = net.input("x", [2, 4, 5, 5])
    b = net.bn(net.node("Relu", [x]), 4)
    net.node("Relu", [b], "y")
    net.output("y")
    refuse_and_check(net.model(), "no foldable linear op")


def test_conv_weight_as_constant_node():
    net = Net(seed=45)
    x = net.input("x", [2, 3, 5, 5])
    w = net.constant(net.rng.standard_normal([4, 3, 3, 3]).astype(np.float32), "Wc")
    c = net.node("Conv", [x, w])
    net.bn(c, 4, "y")
    net.output("y")
    folded, _ = fold_and_check(net.model(), rules=["conv-bn"])
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


def test_conv_weight_listed_as_graph_input_is_refused():
    net, c = _conv_bn()
    net.bn(c, 4, "y")
    net.output("y")
    model = net.model()
    w = model.graph.node[0].input[1]
    model.graph.input.append(helper.make_tensor_value_info(w, TP.FLOAT, [4, 3, 3, 3]))
    refuse_and_check(model, "weight")


def test_shared_weight_and_bias_only_one_conv_followed_by_bn():
    net = Net(seed=46)
    x = net.input("x", [2, 3, 5, 5])
    w, b = net.weight("W", [4, 3, 3, 3]), net.weight("B", [4])
    c1 = net.node("Conv", [x, w, b])
    net.node("Conv", [x, w, b], "z")
    net.bn(c1, 4, "y")
    net.output("y")
    net.output("z")
    folded, report = fold_and_check(net.model(), rules=["conv-bn"])
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    assert list(convs[1].input) == ["x", "W", "B"]  # the untouched reader keeps the original tensors
    assert not set(convs[0].input[1:]) & {"W", "B"}


def test_bn_parameters_shared_by_two_bns_and_read_elsewhere():
    net = Net(seed=47)
    x = net.input("x", [2, 3, 5, 5])
    v = net.input("v", [4])
    names = [net.init(k, val) for k, val in bn_stats(net.rng, 4).items()]
    for out in ("y1", "y2"):
        c = net.conv(x, 3, 4, [3, 3])
        net.node("BatchNormalization", [c] + names, out)
        net.output(out)
    net.node("Add", [v, "scale"], "z")  # the scale tensor also has a reader that is not a BN
    net.output("z")
    folded, report = fold_and_check(net.model(), rules=["conv-bn"])
    assert len(report.folded) == 2
    assert {t.name for t in folded.graph.initializer} & {"scale", "bias", "mean", "var"} == {"scale"}


def test_linear_output_also_read_inside_a_subgraph_is_refused():
    net, c = _conv_bn()
    net.bn(c, 4, "y")
    net.output("y")
    net.inputs.append(helper.make_tensor_value_info("cond", TP.BOOL, []))
    then = helper.make_graph([helper.make_node("Relu", [c], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TP.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", [c], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TP.FLOAT, None)])
    net.nodes.append(helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other))
    net.outputs.append(helper.make_tensor_value_info("z", TP.FLOAT, [2, 4, 3, 3]))
    refuse_and_check(net.model(), "also used elsewhere")


def test_bn_params_in_outer_scope_do_not_stay_behind():
    # Conv -> BN inside a branch whose BN parameters are main-graph initializers: once folded they are unused.
    net = Net(seed=48)
    x = net.input("x", [2, 3, 5, 5])
    net.inputs.append(helper.make_tensor_value_info("cond", TP.BOOL, []))
    params = [net.init(k, v) for k, v in bn_stats(net.rng, 4).items()]
    branches = {}
    for name in ("then", "else"):
        sub = Net(seed=49)
        c = sub.conv(x, 3, 4, [3, 3], pads=[1, 1, 1, 1])
        sub.node("BatchNormalization", [c] + params, f"{name}_y")
        branches[f"{name}_branch"] = helper.make_graph(
            sub.nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TP.FLOAT, [2, 4, 5, 5])], sub.inits)
    net.nodes.append(helper.make_node("If", ["cond"], ["y"], name="If_0", **branches))
    net.output("y", [2, 4, 5, 5])
    model = net.model()
    feeds = [random_feeds(model, cond=np.array(v)) for v in (True, False)]
    fold_and_check(model, feeds=feeds, rules=["conv-bn"])


def test_skipping_every_rule_still_counts_and_explains_each_batchnorm():
    from bnfold.onnx.rules import RULE_NAMES

    net, c = _conv_bn()
    net.bn(c, 4, "y")
    net.output("y")
    report = refuse_and_check(net.model(), "every rule was skipped", skip=RULE_NAMES)
    assert report.bn_before == report.bn_after == 1


def test_unknown_skip_rule_is_an_input_error():
    net, c = _conv_bn()
    net.bn(c, 4, "y")
    net.output("y")
    with pytest.raises(bnfold.InputError, match="unknown rule"):
        bnfold.fold_onnx(net.model(), skip=["no-such-rule"])


@pytest.mark.parametrize("attrs", [dict(output_shape=[9, 8], strides=[2, 2]),
                                   dict(auto_pad="SAME_UPPER", strides=[2, 2])])
def test_convtranspose_bn_output_shape_and_auto_pad(attrs):
    net = Net(seed=50)
    x = net.input("x", [2, 4, 4, 4])
    c = net.conv(x, 4, 6, [3, 3], group=2, op="ConvTranspose", **attrs)
    net.bn(c, 6, "y")
    net.output("y")
    fold_and_check(net.model(), rules=["convtranspose-bn"])


@pytest.mark.parametrize("pattern", ["gemm-bn", "bn-gemm", "bn-conv"])
def test_bf16_other_patterns(pattern):
    net = Net(BF16, seed=51, opset=22)
    if pattern == "gemm-bn":
        x = net.input("x", [3, 5])
        net.bn(net.node("Gemm", [x, net.weight("W", [5, 4]), net.weight("C", [4])]), 4, "y")
    elif pattern == "bn-gemm":
        x = net.input("x", [3, 5])
        net.node("Gemm", [net.bn(x, 5), net.weight("W", [5, 4]), net.weight("C", [4])], "y")
    else:
        x = net.input("x", [2, 4, 3, 3])
        net.conv(net.bn(x, 4), 4, 6, [1, 1], group=2)
        net.nodes[-1].output[0] = "y"
    net.output("y")
    # onnxruntime's CPU provider has no bfloat16 kernels for these: the reference runs both models.
    fold_and_check(net.model(), rules=[pattern], runner="ref")


def _everything_model() -> onnx.ModelProto:
    """One model with most patterns, for determinism and idempotence."""
    net = Net(seed=52, opset=17)
    x = net.input("x", [2, 3, 6, 6])
    a = net.bn(net.conv(x, 3, 4, [3, 3], pads=[1, 1, 1, 1]), 4)
    b = net.conv(x, 3, 2, [1, 1], bias=False)
    cat = net.bn(net.node("Concat", [a, b], axis=1), 6)
    r = net.node("Relu", [cat])
    d = net.conv(net.bn(r, 6), 6, 6, [1, 1], group=3)
    d = net.node("Add", [net.node("Mul", [d, net.weight("k", [6, 1, 1])]), net.weight("k2", [1, 6, 1, 1])])
    t = net.bn(net.conv(d, 6, 4, [2, 2], op="ConvTranspose", strides=[2, 2]), 4)
    net.node("LayerNormalization", [t, net.weight("lg", [12]), net.weight("lb", [12])], "ln", axis=-1)
    f = net.node("Flatten", [net.bn(net.node("Relu", [t]), 4)])
    g = net.bn(net.node("Gemm", [f, net.weight("G", [576, 8]), net.weight("Gb", [8])]), 8)
    net.node("MatMul", [net.bn(net.node("Relu", [g]), 8), net.weight("M", [8, 3])], "y")
    net.output("y")
    net.output("ln")
    return net.model()


def test_everything_model_folds_and_matches():
    model = _everything_model()
    folded, report = fold_and_check(model, rules=["conv-bn", "concat-bn", "bn-conv", "affine-mul-add",
                                                  "convtranspose-bn", "bn-gemm", "gemm-bn", "bn-matmul"])
    assert [s.op_type for s in report.skipped] == ["LayerNormalization"]


def test_determinism_across_hash_seeds(tmp_path):
    import os
    import subprocess
    import sys

    path = tmp_path / "m.onnx"
    onnx.save(_everything_model(), path)
    script = ("import sys, bnfold, onnx; m, _ = bnfold.fold_onnx(onnx.load(sys.argv[1])); "
              "sys.stdout.buffer.write(m.SerializeToString())")
    outs = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.append(subprocess.run([sys.executable, "-c", script, str(path)], env=env, check=True,
                                   capture_output=True).stdout)
    assert outs[0] == outs[1]
    assert outs[0] == bnfold.fold_onnx(_everything_model())[0].SerializeToString()


def test_everything_model_idempotent():
    first, _ = bnfold.fold_onnx(_everything_model())
    again, report = bnfold.fold_onnx(first)
    assert again.SerializeToString() == first.SerializeToString()
    assert report.folded == []


@PROPS
@given(nd=st.integers(1, 3), group=st.integers(1, 3), cin_g=st.integers(1, 3), cout_g=st.integers(1, 2),
       kernel=st.lists(st.integers(1, 3), min_size=3, max_size=3),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), bias=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**16))
def test_property_bn_conv_unpadded(nd, group, cin_g, cout_g, kernel, stride, dilation, bias, dtype, seed):
    net = Net(dtype, seed=seed)
    c_in, c_out = group * cin_g, group * cout_g
    kernel = kernel[:nd]
    sizes = [(k - 1) * dilation + 1 + 2 for k in kernel]
    x = net.input("x", [2, c_in, *sizes])
    b = net.bn(x, c_in)
    net.conv(b, c_in, c_out, kernel, group=group, bias=bias, strides=[stride] * nd, dilations=[dilation] * nd)
    net.nodes[-1].output[0] = "y"
    net.output("y")
    fold_and_check(net.model(), rules=["bn-conv"], runner=conv_runner(dtype))


def test_folding_a_model_with_full_value_info():
    # Shape-inferred intermediate annotations must not go stale (the full checker re-infers them strictly).
    model = onnx.shape_inference.infer_shapes(_everything_model())
    assert len(model.graph.value_info) > 10
    folded, _ = fold_and_check(model, rules=["conv-bn", "bn-gemm"])
    names = {o for n in folded.graph.node for o in n.output} | {i.name for i in folded.graph.input}
    assert all(v.name in names for v in folded.graph.value_info)


def test_matmul_add_with_constant_first_then_bn():
    net = Net(seed=53)
    x = net.input("x", [3, 4])
    m = net.node("MatMul", [x, net.weight("W", [4, 6])])
    a = net.node("Add", [net.weight("A", [6]), m])
    net.bn(a, 6, "y")
    net.output("y")
    fold_and_check(net.model(), rules=["matmul-bn"])


@pytest.mark.parametrize("shape", [[2, -1], [-1, 24], [2, 24], [0, 24]])
def test_bn_reshape_gemm_explicit_shapes(shape):
    net = Net(seed=54)
    x = net.input("x", [2, 4, 3, 2])
    r = net.node("Reshape", [net.bn(x, 4), net.init("shape", np.array(shape, np.int64))])
    net.node("Gemm", [r, net.weight("W", [24, 5])], "y")
    net.output("y")
    fold_and_check(net.model(), rules=["bn-gemm"])


def test_bn_reshape_that_moves_channels_is_refused():
    net = Net(seed=55)
    x = net.input("x", [2, 4, 3, 2])
    r = net.node("Reshape", [net.bn(x, 4), net.init("shape", np.array([6, -1], np.int64))])
    net.node("Gemm", [r, net.weight("W", [8, 5])], "y")
    net.output("y")
    refuse_and_check(net.model(), "Reshape")


def test_fp16_overflow_in_one_concat_slice_leaves_everything():
    net = Net(np.float16, seed=56)
    x = net.input("x", [2, 3, 5, 5])
    a = net.conv(x, 3, 2, [1, 1])
    net.init("Wbig", np.full([2, 3, 1, 1], 4.0, np.float16))
    b = net.node("Conv", [x, "Wbig"])
    cat = net.node("Concat", [a, b], axis=1)
    stats = {"scale": np.array([1, 1, 1, 3000.0]), "bias": np.zeros(4), "mean": np.zeros(4),
             "var": np.array([1, 1, 1, 1e-3])}
    net.bn(cat, 4, "y", stats=stats)
    net.output("y")
    refuse_and_check(net.model(), "overflow")


def test_fp16_overflow_before_conv_is_refused():
    net = Net(np.float16, seed=57)
    x = net.input("x", [2, 3, 5, 5])
    stats = {"scale": np.full(3, 3000.0), "bias": np.zeros(3), "mean": np.zeros(3), "var": np.full(3, 1e-3)}
    b = net.bn(x, 3, stats=stats)
    net.init("W", np.full([2, 3, 1, 1], 4.0, np.float16))
    net.node("Conv", [b, "W"], "y")
    net.output("y")
    refuse_and_check(net.model(), "overflow")


def test_fp16_bias_overflow_is_refused():
    net = Net(np.float16, seed=58)
    x = net.input("x", [2, 3, 5, 5])
    c = net.conv(x, 3, 4, [1, 1])
    stats = {"scale": np.full(4, 2.0), "bias": np.zeros(4), "mean": np.full(4, -60000.0), "var": np.full(4, 1.0)}
    net.bn(c, 4, "y", stats=stats)  # t = -mean * s = 120000 > 65504
    net.output("y")
    refuse_and_check(net.model(), "overflow")


def test_bn_with_nan_parameters_is_refused():
    net, c = _conv_bn()
    stats = bn_stats(net.rng, 4)
    stats["mean"][1] = np.nan
    net.bn(c, 4, "y", stats=stats)
    net.output("y")
    refuse_and_check(net.model(), "NaN")


def test_conv_bn_in_loop_body():
    net = Net(seed=59)
    x = net.input("x", [2, 3, 5, 5])
    body = Net(seed=60)
    c = body.conv("x_in", 3, 3, [3, 3], pads=[1, 1, 1, 1])
    body.bn(c, 3, "x_out")
    body.node("Identity", ["cond_in"], "cond_out")
    graph = helper.make_graph(
        body.nodes, "body",
        [helper.make_tensor_value_info("i", TP.INT64, []), helper.make_tensor_value_info("cond_in", TP.BOOL, []),
         helper.make_tensor_value_info("x_in", TP.FLOAT, [2, 3, 5, 5])],
        [helper.make_tensor_value_info("cond_out", TP.BOOL, []),
         helper.make_tensor_value_info("x_out", TP.FLOAT, [2, 3, 5, 5])], body.inits)
    trips = net.init("trips", np.array(3, np.int64))
    cond = net.init("cond", np.array(True))
    net.nodes.append(helper.make_node("Loop", [trips, cond, x], ["y"], name="Loop_0", body=graph))
    net.output("y", [2, 3, 5, 5])
    folded, report = fold_and_check(net.model(), rules=["conv-bn"])
    assert report.folded[0].graph == "Loop_0.body"


def test_gemm_bn_in_scan_body():
    # The float64 reference has no Scan: the original runs in onnxruntime, which is independent of bnfold.
    net = Net(seed=63)
    xs = net.input("xs", [4, 2, 5])  # 4 steps of [N=2, K=5]
    body = Net(seed=64)
    g = body.node("Gemm", ["x_t", body.weight("W", [5, 3]), body.weight("C", [3])])
    body.bn(g, 3, "y_t")
    body.node("Identity", ["s_in"], "s_out")
    graph = helper.make_graph(
        body.nodes, "body",
        [helper.make_tensor_value_info("s_in", TP.FLOAT, [1]), helper.make_tensor_value_info("x_t", TP.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("s_out", TP.FLOAT, [1]), helper.make_tensor_value_info("y_t", TP.FLOAT, [2, 3])],
        body.inits)
    s0 = net.init("s0", np.zeros(1, np.float32))
    net.nodes.append(helper.make_node("Scan", [s0, xs], ["s_final", "ys"], name="Scan_0", body=graph,
                                      num_scan_inputs=1))
    net.output("ys", [4, 2, 3])
    model = net.model()
    folded, report = bnfold.fold_onnx(model)
    onnx.checker.check_model(folded, full_check=True)
    assert [(f.rule, f.graph) for f in report.folded] == [("gemm-bn", "Scan_0.body")]
    assert report.bn_before == 1 and report.bn_after == 0
    body_ops = [n.op_type for n in folded.graph.node[0].attribute[0].g.node]
    assert "BatchNormalization" not in body_ops
    feeds = random_feeds(model)
    assert_close(run_ort(folded, feeds), run_ort(model, feeds), 1e-5)


def test_default_epsilon_is_the_float32_attribute_value():
    # ONNX float attributes are float32: an absent epsilon means float32(1e-5), as onnxruntime and the
    # reference use. With a small variance the difference to the double 1e-5 is visible in a float64 model.
    net = Net(np.float64, seed=61)
    x = net.input("x", [3, 5])
    g = net.node("Gemm", [x, net.weight("W", [5, 4]), net.weight("C", [4])])
    stats = bn_stats(net.rng, 4, np.float64)
    stats["var"][:] = [0.0, 1e-6, 0.5, 2.0]
    net.bn(g, 4, "y", stats=stats)  # no epsilon attribute
    net.output("y")
    model = net.model()
    feeds = random_feeds(model)
    assert_close(run_ort(model, feeds), run_ref(model, feeds), 1e-13)  # the unfolded model agrees
    fold_and_check(model, rules=["gemm-bn"], tol=1e-12)


def test_spatial_0_is_refused():
    net = Net(seed=62, opset=7)
    x = net.input("x", [2, 3, 5, 5])
    c = net.conv(x, 3, 4, [3, 3])
    net.bn(c, 4, "y", spatial=0)
    net.output("y")
    refuse_and_check(net.model(), "spatial=0")


@pytest.mark.parametrize("op", ["Mul", "Div"])
def test_matmul_mul_div_by_channel_constant(op):
    net = Net(seed=63)
    x = net.input("x", [3, 4])
    m = net.node("MatMul", [x, net.weight("W", [4, 5])])
    net.node(op, [m, net.init("k", net.rng.uniform(0.5, 2, [5]).astype(np.float32))], "y")
    net.output("y")
    folded, _ = fold_and_check(net.model(), rules=["affine-mul-add"])
    assert [n.op_type for n in folded.graph.node] == ["MatMul"]


def test_conv1d_mul_add_channel_constants():
    net = Net(seed=64)
    x = net.input("x", [2, 3, 7])
    c = net.conv(x, 3, 4, [3], bias=False)
    m = net.node("Mul", [c, net.init("k", net.rng.uniform(0.5, 2, [4, 1]).astype(np.float32))])
    net.node("Sub", [m, net.init("a", net.rng.normal(0, 1, [1, 4, 1]).astype(np.float32))], "y")
    net.output("y")
    folded, _ = fold_and_check(net.model(), rules=["affine-mul-add"])
    assert [n.op_type for n in folded.graph.node] == ["Conv"]


@st.composite
def bn_statistics(draw, channels):
    gamma = draw(st.lists(st.floats(-2, 2), min_size=channels, max_size=channels))
    beta = draw(st.lists(st.floats(-1, 1), min_size=channels, max_size=channels))
    mean = draw(st.lists(st.floats(-3, 3), min_size=channels, max_size=channels))
    var = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-4, 10)), min_size=channels, max_size=channels))
    return {"scale": np.array(gamma), "bias": np.array(beta), "mean": np.array(mean), "var": np.array(var)}


@PROPS
@given(data=st.data(), channels=st.integers(1, 6), group=st.sampled_from([1, 2]),
       epsilon=st.sampled_from([1e-5, 1e-3, 0.1]), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**16))
def test_property_conv_bn_statistics(data, channels, group, epsilon, dtype, seed):
    c_out = channels * group
    stats = data.draw(bn_statistics(c_out))
    net = Net(dtype, seed=seed)
    x = net.input("x", [2, 2 * group, 5, 4])
    c = net.conv(x, 2 * group, c_out, [3, 3], group=group, pads=[1, 0, 1, 0])
    net.bn(c, c_out, "y", stats=stats, epsilon=epsilon)
    net.output("y")
    fold_and_check(net.model(), rules=["conv-bn"], runner=conv_runner(dtype))


@pytest.mark.parametrize("opset", [9, 17])
def test_concat_of_gemm_and_matmul_then_bn(opset):
    net = Net(seed=65, opset=opset)
    x = net.input("x", [3, 4])
    a = net.node("Gemm", [x, net.weight("Wa", [2, 4]), net.weight("Ca", [2])], transB=1)
    b = net.node("MatMul", [x, net.weight("Wb", [4, 3])])
    net.bn(net.node("Concat", [a, b], axis=-1), 5, "y")
    net.output("y")
    model = net.model()
    if opset >= 11:  # the MatMul slice becomes a Gemm with the folded bias
        fold_and_check(model, rules=["concat-bn"])
    else:  # no Gemm with an optional bias and no single Add to carry it: refused, model untouched
        refuse_and_check(model, "opset")


def test_bn_on_rank3_flatten_gemm():
    net = Net(seed=66)
    x = net.input("x", [2, 4, 3])
    f = net.node("Flatten", [net.bn(x, 4)], axis=1)
    net.node("Gemm", [f, net.weight("W", [12, 5])], "y")
    net.output("y")
    fold_and_check(net.model(), rules=["bn-gemm"])


def test_deep_runtime_chain_read_by_an_add_after_conv_is_not_walked_recursively():
    """A per-channel Add after a Conv asks whether its other input is constant. Above it sits a chain of 3,000
    runtime nodes: the answer must come without exhausting Python's recursion limit (or walking the chain once per
    question), and the graph must fold as usual."""
    net = Net(seed=5)
    x = net.input("x", [1, 2, 3, 3])
    r = x
    for _ in range(3000):
        r = net.node("Relu", [r])
    c = net.bn(net.conv(x, 2, 2, [1, 1]), 2)
    net.node("Add", [c, r], "y")
    net.output("y", [1, 2, 3, 3])
    folded, report = bnfold.fold_onnx(net.model())
    assert report.bn_after == 0 and len(report.folded) == 1
    assert count_ops(folded.graph, "Add") == 1 and count_ops(folded.graph, "Relu") == 3000


@pytest.mark.parametrize("typed", [(True,), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("channels", [1, 2, 4])
def test_conv_bias_in_typed_fields_not_raw_data(typed, channels):
    """A Conv bias stored in float_data (not raw_data) is read by value, never as raw bytes: the batched prefetch
    once read such biases as empty bytes and folded garbage (two Convs of 2 channels) or crashed (found by
    tests/test_fuzz.py)."""
    net = Net(seed=67)
    x = net.input("x", [1, 3, 4, 4])
    for i, as_floats in enumerate(typed):
        b = (np.arange(channels) + 10 * i + 1).astype(np.float32)
        if as_floats:
            net.inits.append(helper.make_tensor(f"B{i}", TP.FLOAT, [channels], b.tolist()))
        else:
            net.init(f"B{i}", b)
        net.bn(net.node("Conv", [x, net.weight(f"W{i}", [channels, 3, 1, 1]), f"B{i}"]), channels, f"y{i}")
        net.output(f"y{i}")
    fold_and_check(net.model(), rules=["conv-bn"])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int64, BF16])
@pytest.mark.parametrize("shape", [(2, 3), (3, 2, 1), (0, 3), ()])
def test_new_initializers_are_what_numpy_helper_makes(dtype, shape):
    """fill_tensor's fast path writes the same message as onnx's from_array, also for transposed arrays."""
    from bnfold.onnx.graph import fill_tensor

    value = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape).astype(dtype)
    for array in (value, value.T):
        tensor = TP()
        fill_tensor(tensor, array, "t")
        assert tensor.SerializeToString() == numpy_helper.from_array(array, "t").SerializeToString()


def test_annotated_channels_that_disagree_with_the_batchnorm_are_an_invalid_model():
    """The batched Conv -> BN path checks the BN input's annotated channels, as the per-node path does."""
    net, c = _conv_bn()
    net.bn(c, 4, "y")
    net.output("y")
    model = net.model()
    model.graph.value_info.append(helper.make_tensor_value_info(c, TP.FLOAT, [2, 5, 6, 6]))
    with pytest.raises(bnfold.InputError, match="has 4 channels, but its input has 5"):
        bnfold.fold_onnx(model)


# ============================================================================================ annotations

def test_annotations_first_tensor_type_counts_and_every_annotation_stays_listed():
    """A value annotated first without a tensor type and later with one takes the later's element type; a value
    with no tensor type at all is not annotated for shape queries, but stays listed (commit deletes its value_info
    by those names when the value goes)."""
    from bnfold.onnx.shapes import Annotations

    graph = helper.make_graph(
        [], "g", [helper.make_tensor_value_info("x", TP.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TP.FLOAT16, [3])],
        value_info=[helper.make_empty_tensor_value_info("v"), helper.make_empty_tensor_value_info("w"),
                    helper.make_tensor_value_info("v", TP.DOUBLE, [4, 5])])
    annotations = Annotations(graph)
    assert annotations.value_info_names == ["v", "w", "v"]
    assert annotations.annotates("v") and annotations.elem_type("v") == TP.DOUBLE
    assert annotations.get("v") == [4, 5]  # the last shape
    assert not annotations.annotates("w")
    assert set(annotations.names()) == {"x", "y", "v", "w"}
    assert annotations.annotates("x") and annotations.elem_type("y") == TP.FLOAT16 and annotations.get("x") == [1, 2]

    single = Annotations(helper.make_graph([], "g", [], [], value_info=[helper.make_empty_tensor_value_info("w")]))
    assert not single.annotates("w") and list(single.names()) == ["w"]  # (no name twice: one dict, copied to edit)


def test_shape_of_reads_every_kind_of_dim():
    """An explicit 0 is a dim of 0 (not unset), a dim_param its name, an unset dim None; no shape: None."""
    from bnfold.onnx.shapes import shape_of

    assert shape_of(helper.make_tensor_value_info("x", TP.FLOAT, [0, "N", None, 5]).type) == [0, "N", None, 5]
    assert shape_of(helper.make_tensor_value_info("x", TP.FLOAT, []).type) == []
    assert shape_of(helper.make_tensor_value_info("x", TP.FLOAT, None).type) is None
    assert shape_of(helper.make_empty_tensor_value_info("x").type) is None
