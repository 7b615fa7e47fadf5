"""Validate the float64 numpy reference interpreter (tests/reference.py).

The reference is the ground truth of the equivalence tests, so it is checked
here twice over: against onnxruntime (CPU, no graph optimisations) on float32
models, and against direct textbook definitions (nested loops, formulas)
written independently below.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

try:  # tests/ on sys.path (rootdir-less "prepend" import mode)
    from reference import run_reference
except ImportError:  # pragma: no cover - tests/ is a package
    from tests.reference import run_reference

FLOAT = TP.FLOAT

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _vi(name, elem=FLOAT, shape=None):
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes, inputs, outputs, inits=(), opset=17):
    """inputs: list of (name, shape[, elem]); outputs: list of names or (name, elem)."""
    ins = [_vi(i[0], i[2] if len(i) > 2 else FLOAT, i[1]) for i in inputs]
    outs = [_vi(o) if isinstance(o, str) else _vi(o[0], o[1]) for o in outputs]
    graph = helper.make_graph(nodes, "g", ins, outs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = max(7, helper.find_min_ir_version_for(opsets))
    return model


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def run_ort(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3  # ORT shape-inference warnings on ConvTranspose corner cases
    sess = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def assert_close(got, ref, rtol=1e-4, atol=1e-5):
    got = np.asarray(got)
    ref = np.asarray(ref)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if got.dtype.kind in "fc":
        assert ref.dtype == np.float64, ref.dtype
        scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
        np.testing.assert_allclose(got.astype(np.float64), ref, rtol=rtol, atol=atol * scale)
    else:
        assert got.dtype == ref.dtype, (got.dtype, ref.dtype)
        np.testing.assert_array_equal(got, ref)


def check(model, feeds, rtol=1e-4, atol=1e-5):
    # (onnx.checker wants output shapes; ORT validates the model on load)
    ref = run_reference(model, feeds)
    got = run_ort(model, feeds)
    assert set(ref) == set(got)
    for name in got:
        assert_close(got[name], ref[name], rtol, atol)
    return ref


def rnd(*shape, seed=0, low=None, high=None):
    r = np.random.default_rng(seed)
    if low is not None:
        return r.uniform(low, high, size=shape).astype(np.float32)
    return r.standard_normal(shape).astype(np.float32)


def single(op, in_shapes, attrs=None, opset=17, n_out=1, seed=0, inits=(), extra_inputs=()):
    """Model with one node whose float inputs x0, x1, ... are fed."""
    names = [f"x{i}" for i in range(len(in_shapes))]
    node_inputs = names + list(extra_inputs)
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, node_inputs, outs, **(attrs or {}))
    model = make_model([node], [(n, s) for n, s in zip(names, in_shapes)], outs, inits, opset)
    feeds = {n: rnd(*s, seed=seed + i) for i, (n, s) in enumerate(zip(names, in_shapes))}
    return model, feeds


# --------------------------------------------------------------------------
# independent textbook definitions
# --------------------------------------------------------------------------


def naive_conv(x, w, b, strides, dilations, pb, pe, group):
    """Direct definition: y[n,m,o] = b[m] + sum_{c,k} xpad[n, c, o*s + k*d] w[m,c,k]."""
    n, c = x.shape[:2]
    m = w.shape[0]
    ks = w.shape[2:]
    nd = len(ks)
    cg, mg = c // group, m // group
    outs = [
        (x.shape[2 + i] + pb[i] + pe[i] - (ks[i] - 1) * dilations[i] - 1) // strides[i] + 1
        for i in range(nd)
    ]
    y = np.zeros((n, m, *outs))
    for ni, mi in itertools.product(range(n), range(m)):
        g = mi // mg
        for o in itertools.product(*(range(v) for v in outs)):
            acc = 0.0 if b is None else float(b[mi])
            for ci in range(cg):
                for k in itertools.product(*(range(v) for v in ks)):
                    idx = [o[i] * strides[i] + k[i] * dilations[i] - pb[i] for i in range(nd)]
                    if all(0 <= idx[i] < x.shape[2 + i] for i in range(nd)):
                        acc += float(x[(ni, g * cg + ci, *idx)]) * float(w[(mi, ci, *k)])
            y[(ni, mi, *o)] = acc
    return y


def naive_conv_transpose(x, w, b, strides, dilations, pb, pe, out_pad, group):
    """Direct definition: every x[n,c,i] scatters x*w[c,m,k] to position i*s + k*d - pb."""
    n, c = x.shape[:2]
    mg = w.shape[1]
    m = mg * group
    cg = c // group
    ks = w.shape[2:]
    nd = len(ks)
    outs = [
        strides[i] * (x.shape[2 + i] - 1) + out_pad[i] + (ks[i] - 1) * dilations[i] + 1
        - pb[i] - pe[i]
        for i in range(nd)
    ]
    y = np.zeros((n, m, *outs))
    for ni, ci in itertools.product(range(n), range(c)):
        g = ci // cg
        for i in itertools.product(*(range(v) for v in x.shape[2:])):
            for mi in range(mg):
                for k in itertools.product(*(range(v) for v in ks)):
                    o = [i[a] * strides[a] + k[a] * dilations[a] - pb[a] for a in range(nd)]
                    if all(0 <= o[a] < outs[a] for a in range(nd)):
                        y[(ni, g * mg + mi, *o)] += float(x[(ni, ci, *i)]) * float(w[(ci, mi, *k)])
    if b is not None:
        y += np.asarray(b, np.float64).reshape((m,) + (1,) * nd)
    return y


def _conv_attrs(nd, strides, dilations, pads, group, auto_pad, kernel, with_kernel_shape):
    attrs = {"strides": strides, "dilations": dilations, "group": group}
    if auto_pad == "NOTSET":
        attrs["pads"] = pads
    else:
        attrs["auto_pad"] = auto_pad
    if with_kernel_shape:
        attrs["kernel_shape"] = kernel
    return attrs


# --------------------------------------------------------------------------
# Conv
# --------------------------------------------------------------------------


@st.composite
def conv_cases(draw):
    nd = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    cg = draw(st.integers(1, 2))
    mg = draw(st.integers(1, 2))
    n = draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
    strides = [draw(st.integers(1, 3)) for _ in range(nd)]
    dilations = [draw(st.integers(1, 2)) for _ in range(nd)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    pads = [draw(st.integers(0, 2)) for _ in range(2 * nd)] if auto_pad == "NOTSET" else None
    span = 3 if nd == 3 else 5
    spatial = []
    for i in range(nd):
        eff = (kernel[i] - 1) * dilations[i] + 1
        lo = eff - (pads[i] + pads[i + nd] if pads else 0) if auto_pad != "SAME_UPPER" and auto_pad != "SAME_LOWER" else 1
        lo = max(1, lo)
        spatial.append(draw(st.integers(lo, lo + span)))
    bias = draw(st.booleans())
    with_ks = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return nd, group, cg, mg, n, kernel, strides, dilations, auto_pad, pads, spatial, bias, with_ks, seed


def _conv_model(case):
    nd, group, cg, mg, n, kernel, strides, dilations, auto_pad, pads, spatial, bias, with_ks, seed = case
    c, m = cg * group, mg * group
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, c, *spatial)).astype(np.float32)
    w = r.standard_normal((m, cg, *kernel)).astype(np.float32)
    b = r.standard_normal(m).astype(np.float32) if bias else None
    attrs = _conv_attrs(nd, strides, dilations, pads, group, auto_pad, kernel, with_ks)
    inits = [init("w", w)] + ([init("b", b)] if bias else [])
    node = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"], **attrs)
    model = make_model([node], [("x", list(x.shape))], ["y"], inits, opset=11)
    return model, x, w, b


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_conv_vs_ort(case):
    model, x, _, _ = _conv_model(case)
    nd, auto_pad, dilations = case[0], case[8], case[7]
    if auto_pad.startswith("SAME") and any(d > 1 for d in dilations):
        # ORT refuses SAME + dilation; compare against ORT on the explicitly
        # padded equivalent, with the SAME pads derived here from the spec.
        kernel, strides, spatial = case[5], case[6], case[10]
        pb, pe = [], []
        for i in range(nd):
            out = -(-spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial[i])
            lo, hi = total // 2, total - total // 2
            pb.append(lo if auto_pad == "SAME_UPPER" else hi)
            pe.append(hi if auto_pad == "SAME_UPPER" else lo)
        explicit, _, _, _ = _conv_model(case[:8] + ("NOTSET", pb + pe) + case[10:])
        ref = run_reference(model, {"x": x})["y"]
        assert ref.shape[2:] == tuple(-(-n // s) for n, s in zip(spatial, strides))
        assert_close(run_ort(explicit, {"x": x})["y"], ref)
    else:
        check(model, {"x": x})


@settings(max_examples=25, deadline=None)
@given(conv_cases())
def test_conv_vs_naive(case):
    nd, group, cg, mg, n, kernel, strides, dilations, auto_pad, pads, spatial, bias, _, _ = case
    if auto_pad != "NOTSET":
        return  # padding arithmetic of auto_pad is covered against ORT
    model, x, w, b = _conv_model(case)
    ref = run_reference(model, {"x": x})["y"]
    exp = naive_conv(x, w, b, strides, dilations, pads[:nd], pads[nd:], group)
    np.testing.assert_allclose(ref, exp, rtol=1e-12, atol=1e-12)


def test_conv_naive_handpicked():
    # 2-D depthwise with channel multiplier, asymmetric pads, stride+dilation
    x = rnd(2, 3, 7, 6, seed=1)
    w = rnd(6, 1, 3, 2, seed=2)
    b = rnd(6, seed=3)
    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"], group=3, strides=[2, 1], dilations=[1, 2], pads=[1, 0, 2, 1]
    )
    model = make_model([node], [("x", [2, 3, 7, 6])], ["y"], [init("w", w), init("b", b)])
    ref = run_reference(model, {"x": x})["y"]
    exp = naive_conv(x, w, b, [2, 1], [1, 2], [1, 0], [2, 1], 3)
    np.testing.assert_allclose(ref, exp, rtol=1e-12, atol=1e-12)
    check(model, {"x": x})


def test_conv_1x1_is_matmul():
    x = rnd(1, 4, 3, 5, seed=4).astype(np.float64)
    w = rnd(2, 4, 1, 1, seed=5).astype(np.float64)
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    model = make_model([node], [("x", [1, 4, 3, 5])], ["y"], [init("w", w.astype(np.float32))])
    ref = run_reference(model, {"x": x.astype(np.float32)})["y"]
    exp = np.einsum("mc,nchw->nmhw", w[:, :, 0, 0], x)
    np.testing.assert_allclose(ref, exp, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# ConvTranspose
# --------------------------------------------------------------------------


@st.composite
def conv_transpose_cases(draw):
    nd = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    cg = draw(st.integers(1, 2))
    mg = draw(st.integers(1, 2))
    n = draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
    strides = [draw(st.integers(1, 3)) for _ in range(nd)]
    dilations = [draw(st.integers(1, 2)) for _ in range(nd)]
    spatial = [draw(st.integers(1, 3 if nd == 3 else 4)) for _ in range(nd)]
    out_pad = [draw(st.integers(0, s - 1)) for s in strides]
    full = [
        strides[i] * (spatial[i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1
        for i in range(nd)
    ]
    mode = draw(st.sampled_from(["pads", "pads", "output_shape", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    pads = None
    output_shape = None
    if mode == "pads":
        pb, pe = [], []
        for f in full:
            a = draw(st.integers(0, min(2, f - 1)))
            pb.append(a)
            pe.append(draw(st.integers(0, min(2, f - 1 - a))))
        pads = pb + pe
    elif mode == "output_shape":
        # up to stride-1-output_padding beyond the natural extent is accepted
        # by ORT (implicit output padding at the end)
        output_shape = [
            draw(st.integers(max(1, f - 3), f + s - 1 - op))
            for f, s, op in zip(full, strides, out_pad)
        ]
    with_op = any(out_pad) or draw(st.booleans())
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return dict(
        nd=nd, group=group, cg=cg, mg=mg, n=n, kernel=kernel, strides=strides,
        dilations=dilations, spatial=spatial, out_pad=out_pad if with_op else None,
        mode=mode, pads=pads, output_shape=output_shape, bias=bias, seed=seed,
    )


def _conv_transpose_model(cs):
    c, m = cs["cg"] * cs["group"], cs["mg"] * cs["group"]
    r = np.random.default_rng(cs["seed"])
    x = r.standard_normal((cs["n"], c, *cs["spatial"])).astype(np.float32)
    w = r.standard_normal((c, cs["mg"], *cs["kernel"])).astype(np.float32)
    b = r.standard_normal(m).astype(np.float32) if cs["bias"] else None
    attrs = {"strides": cs["strides"], "dilations": cs["dilations"], "group": cs["group"]}
    if cs["out_pad"] is not None:
        attrs["output_padding"] = cs["out_pad"]
    if cs["pads"] is not None:
        attrs["pads"] = cs["pads"]
    if cs["output_shape"] is not None:
        attrs["output_shape"] = cs["output_shape"]
    if cs["mode"] in ("VALID", "SAME_UPPER", "SAME_LOWER"):
        attrs["auto_pad"] = cs["mode"]
    inits = [init("w", w)] + ([init("b", b)] if cs["bias"] else [])
    node = helper.make_node("ConvTranspose", ["x", "w"] + (["b"] if cs["bias"] else []), ["y"], **attrs)
    model = make_model([node], [("x", list(x.shape))], ["y"], inits, opset=11)
    return model, x, w, b


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_transpose_cases())
def test_conv_transpose_vs_ort(cs):
    model, x, _, _ = _conv_transpose_model(cs)
    if cs["mode"].startswith("SAME"):
        out_pad = cs["out_pad"] or [0] * cs["nd"]
        full = [
            s * (n - 1) + op + (k - 1) * d + 1
            for s, n, op, k, d in zip(cs["strides"], cs["spatial"], out_pad, cs["kernel"], cs["dilations"])
        ]
        if any(f < n * s for f, n, s in zip(full, cs["spatial"], cs["strides"])):
            # Spec: SAME output is input*stride even when that exceeds the
            # natural extent (negative total padding); ORT clamps the padding
            # at 0 instead.  See test_conv_transpose_same_negative_padding.
            return
    check(model, {"x": x})


@settings(max_examples=25, deadline=None)
@given(conv_transpose_cases())
def test_conv_transpose_vs_naive(cs):
    if cs["mode"] != "pads":
        return
    nd = cs["nd"]
    model, x, w, b = _conv_transpose_model(cs)
    ref = run_reference(model, {"x": x})["y"]
    out_pad = cs["out_pad"] or [0] * nd
    exp = naive_conv_transpose(
        x, w, b, cs["strides"], cs["dilations"], cs["pads"][:nd], cs["pads"][nd:], out_pad, cs["group"]
    )
    np.testing.assert_allclose(ref, exp, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(conv_cases())
def test_conv_transpose_is_adjoint_of_conv(case):
    """<Conv(x), y> == <ConvTranspose(y), x> with the same weight tensor."""
    nd, group, cg, mg, n, kernel, strides, dilations, auto_pad, pads, spatial, _, _, seed = case
    if auto_pad != "NOTSET":
        return
    model, x, w, _ = _conv_model(case[:11] + (False,) + case[12:])
    y_conv = run_reference(model, {"x": x})["y"]
    r = np.random.default_rng(seed + 1)
    yb = r.standard_normal(y_conv.shape).astype(np.float32)
    out_pad = [
        (spatial[i] + pads[i] + pads[i + nd] - (kernel[i] - 1) * dilations[i] - 1) % strides[i]
        for i in range(nd)
    ]
    node = helper.make_node(
        "ConvTranspose", ["yb", "w"], ["xb"], strides=strides, dilations=dilations,
        pads=pads, output_padding=out_pad, group=group,
    )
    tmodel = make_model([node], [("yb", list(yb.shape))], ["xb"], [init("w", w)], opset=11)
    xb = run_reference(tmodel, {"yb": yb})["xb"]
    assert xb.shape == x.shape
    lhs = float(np.sum(y_conv * yb.astype(np.float64)))
    rhs = float(np.sum(xb * x.astype(np.float64)))
    assert abs(lhs - rhs) <= 1e-9 * max(1.0, abs(lhs))


def test_conv_transpose_output_shape_spec_pads():
    # ONNX spec: with output_shape and NOTSET, the odd unit of padding goes at the start.
    x = rnd(1, 1, 3, seed=7)
    w = rnd(1, 1, 3, seed=8)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2], output_shape=[6])
    model = make_model([node], [("x", [1, 1, 3])], ["y"], [init("w", w)])
    ref = run_reference(model, {"x": x})["y"]
    full = naive_conv_transpose(x, w, None, [2], [1], [0], [0], [0], 1)  # length 7
    np.testing.assert_allclose(ref, full[..., 1:], rtol=1e-12)
    up = helper.make_node(
        "ConvTranspose", ["x", "w"], ["y"], strides=[2], output_shape=[6], auto_pad="SAME_UPPER"
    )
    model = make_model([up], [("x", [1, 1, 3])], ["y"], [init("w", w)])
    ref = run_reference(model, {"x": x})["y"]
    np.testing.assert_allclose(ref, full[..., :6], rtol=1e-12)


def test_conv_transpose_output_larger_than_natural():
    # natural extent 5 (in=2, k=2, stride 3)
    x = rnd(1, 1, 2, seed=1)
    w = rnd(1, 1, 2, seed=2)
    b = rnd(1, seed=3)
    full = naive_conv_transpose(x, w, b, [3], [1], [0], [0], [0], 1)
    # SAME without output_shape: spec says output = input * stride (= 6) even
    # though that exceeds the natural extent; onnxruntime returns 5 here.
    # Explicit output_shape 7: the surplus is appended at the end like
    # output_padding (matches onnxruntime).
    cases = [({"auto_pad": "SAME_UPPER"}, 6), ({"auto_pad": "SAME_LOWER"}, 6), ({"output_shape": [7]}, 7)]
    for attrs, size in cases:
        node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[3], **attrs)
        model = make_model([node], [("x", [1, 1, 2])], ["y"], [init("w", w), init("b", b)], opset=11)
        ref = run_reference(model, {"x": x})["y"]
        assert ref.shape == (1, 1, size)
        np.testing.assert_allclose(ref[..., :5], full, rtol=1e-12)
        np.testing.assert_allclose(ref[..., 5:], float(b[0]), rtol=1e-12)
        if "output_shape" in attrs:
            assert_close(run_ort(model, {"x": x})["y"], ref)


# --------------------------------------------------------------------------
# BatchNormalization
# --------------------------------------------------------------------------


def _bn_params(c_shape, seed):
    r = np.random.default_rng(seed)
    return dict(
        scale=r.standard_normal(c_shape).astype(np.float32),
        bias=r.standard_normal(c_shape).astype(np.float32),
        mean=r.standard_normal(c_shape).astype(np.float32),
        var=r.uniform(0.1, 2.0, c_shape).astype(np.float32),
    )


def _bn_model(x_shape, params, opset, attrs):
    inits = [init(k, v) for k, v in params.items()]
    node = helper.make_node(
        "BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], **attrs
    )
    return make_model([node], [("x", list(x_shape))], ["y"], inits, opset)


def bn_formula(x, p, eps, spatial=True):
    x = x.astype(np.float64)
    y = np.empty_like(x)
    for c in range(x.shape[1]):
        if spatial:
            s, b, mu, v = (float(p[k][c]) for k in ("scale", "bias", "mean", "var"))
        else:
            s, b, mu, v = (p[k][c].astype(np.float64) for k in ("scale", "bias", "mean", "var"))
        y[:, c] = s * (x[:, c] - mu) / np.sqrt(v + eps) + b
    return y


@pytest.mark.parametrize("opset", [7, 9, 14, 15])
@pytest.mark.parametrize("x_shape", [(3, 4), (2, 3, 5), (2, 3, 4, 5), (1, 2, 3, 2, 4)])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_batchnorm(opset, x_shape, eps):
    attrs = {} if eps is None else {"epsilon": eps}
    if opset == 14 and eps is None:
        attrs["training_mode"] = 0
    params = _bn_params((x_shape[1],), seed=sum(x_shape))
    model = _bn_model(x_shape, params, opset, attrs)
    x = rnd(*x_shape, seed=opset)
    ref = check(model, {"x": x})["y"]
    # float attributes are stored as float32 in the protobuf
    exp = bn_formula(x, params, float(np.float32(1e-5 if eps is None else eps)))
    np.testing.assert_allclose(ref, exp, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("x_shape", [(2, 3), (2, 3, 4), (2, 3, 2, 2)])
def test_batchnorm_spatial0(x_shape):
    params = _bn_params(tuple(x_shape[1:]), seed=3)
    model = _bn_model(x_shape, params, 7, {"spatial": 0, "epsilon": 1e-4})
    x = rnd(*x_shape, seed=4)
    ref = run_reference(model, {"x": x})["y"]
    np.testing.assert_allclose(ref, bn_formula(x, params, float(np.float32(1e-4)), spatial=False), rtol=1e-13, atol=1e-13)
    try:
        got = run_ort(model, {"x": x})["y"]
    except Exception as e:  # pragma: no cover - depends on the ORT build
        pytest.skip(f"onnxruntime rejects spatial=0: {e}")
    assert_close(got, ref)


def test_batchnorm_spatial1_explicit_opset7():
    params = _bn_params((3,), seed=5)
    model = _bn_model((2, 3, 4), params, 7, {"spatial": 1})
    x = rnd(2, 3, 4, seed=6)
    ref = check(model, {"x": x})["y"]
    np.testing.assert_allclose(ref, bn_formula(x, params, float(np.float32(1e-5))), rtol=1e-13)


def test_batchnorm_training_mode_raises():
    params = _bn_params((3,), seed=5)
    model = _bn_model((2, 3, 4), params, 15, {"training_mode": 1})
    with pytest.raises(NotImplementedError):
        run_reference(model, {"x": rnd(2, 3, 4)})


# --------------------------------------------------------------------------
# Gemm / MatMul
# --------------------------------------------------------------------------


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (), (5,), (1, 5), (3, 1), (3, 5)])
@pytest.mark.parametrize("alpha_beta", [None, (0.5, 2.0)])
def test_gemm(trans_a, trans_b, c_shape, alpha_beta):
    a_shape = (4, 3) if trans_a else (3, 4)
    b_shape = (5, 4) if trans_b else (4, 5)
    attrs = {"transA": trans_a, "transB": trans_b}
    if alpha_beta:
        attrs.update(alpha=alpha_beta[0], beta=alpha_beta[1])
    shapes = [a_shape, b_shape] + ([c_shape] if c_shape is not None else [])
    model, feeds = single("Gemm", shapes, attrs, opset=13)
    check(model, feeds)


@pytest.mark.parametrize(
    "sa,sb",
    [((3, 4), (4, 5)), ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)), ((2, 3, 4), (4, 5)),
     ((2, 1, 3, 4), (3, 4, 2)), ((5, 3, 4), (5, 4, 2))],
)
def test_matmul(sa, sb):
    model, feeds = single("MatMul", [sa, sb], opset=13)
    check(model, feeds)


# --------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize(
    "sa,sb", [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((2, 3, 1), (1, 1, 4)), ((3, 1, 1), ()), ((1,), (2, 3))]
)
def test_binary(op, sa, sb):
    model, feeds = single(op, [sa, sb], opset=14)
    check(model, feeds)


def test_int_div_truncates():
    a = np.array([7, -7, 7, -7, 0, 9], dtype=np.int64)
    b = np.array([2, 2, -2, -2, 3, 3], dtype=np.int64)
    node = helper.make_node("Div", ["a", "b"], ["y"])
    model = make_model([node], [("a", [6], TP.INT64), ("b", [6], TP.INT64)], [("y", TP.INT64)], opset=14)
    ref = check(model, {"a": a, "b": b})
    np.testing.assert_array_equal(ref["y"], [3, -3, -3, 3, 0, 3])


def test_legacy_broadcast_opset6():
    node = helper.make_node("Add", ["x0", "x1"], ["y0"], broadcast=1, axis=1)
    model = make_model([node], [("x0", [2, 3, 4]), ("x1", [3])], ["y0"], opset=6)
    feeds = {"x0": rnd(2, 3, 4), "x1": rnd(3, seed=1)}
    ref = run_reference(model, feeds)["y0"]  # ORT has no Add-6 kernel
    np.testing.assert_allclose(ref, feeds["x0"] + feeds["x1"][:, None].astype(np.float64))


@pytest.mark.parametrize(
    "op,attrs,low,high",
    [
        ("Relu", {}, None, None), ("LeakyRelu", {}, None, None), ("LeakyRelu", {"alpha": 0.3}, None, None),
        ("Sigmoid", {}, None, None), ("Tanh", {}, None, None), ("Identity", {}, None, None),
        ("Neg", {}, None, None), ("Abs", {}, None, None), ("Sqrt", {}, 0.1, 4.0), ("Exp", {}, None, None),
        ("Log", {}, 0.1, 4.0), ("Reciprocal", {}, 0.5, 3.0), ("Erf", {}, None, None),
    ],
)
def test_unary(op, attrs, low, high):
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    model = make_model([node], [("x", [2, 3, 4])], ["y"], opset=13)
    check(model, {"x": rnd(2, 3, 4, seed=9, low=low, high=high) if low else rnd(2, 3, 4, seed=9) * 3})


def test_pow():
    model, feeds = single("Pow", [(2, 3), (3,)], opset=13)
    feeds["x0"] = np.abs(feeds["x0"]) + 0.1
    check(model, feeds)


@pytest.mark.parametrize("bounds", [(-0.5, 0.7), (-0.5, None), (None, 0.7), (None, None)])
@pytest.mark.parametrize("opset", [6, 11, 13])
def test_clip(bounds, opset):
    lo, hi = bounds
    if opset < 11:
        attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
        node = helper.make_node("Clip", ["x"], ["y"], **attrs)
        inits = []
    else:
        attrs = {}
        ins = ["x", "lo" if lo is not None else "", "hi" if hi is not None else ""]
        while ins and ins[-1] == "":
            ins.pop()
        node = helper.make_node("Clip", ins, ["y"])
        inits = [init(n, np.float32(v)) for n, v in (("lo", lo), ("hi", hi)) if v is not None]
    model = make_model([node], [("x", [3, 4])], ["y"], inits, opset)
    check(model, {"x": rnd(3, 4, seed=2)})


# --------------------------------------------------------------------------
# shape manipulation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 0, 1, 2, 4, -1, -3])
def test_flatten(axis):
    attrs = {} if axis is None else {"axis": axis}
    model, feeds = single("Flatten", [(2, 3, 4, 5)], attrs, opset=13)
    check(model, feeds)


@pytest.mark.parametrize(
    "shape,allowzero,in_shape",
    [([4, -1], 0, (2, 3, 4)), ([0, -1], 0, (2, 3, 4)), ([0, 0, 2, 2], 0, (2, 3, 4)),
     ([-1], 0, (2, 3, 4)), ([2, 0, 4], 1, (2, 0, 4)), ([3, 0], 1, (0, 3)), ([1, 6, 4], 1, (2, 3, 4))],
)
def test_reshape(shape, allowzero, in_shape):
    node = helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=allowzero)
    model = make_model([node], [("x", list(in_shape))], ["y"], [init("s", np.array(shape, np.int64))], 14)
    check(model, {"x": rnd(*in_shape)})


@pytest.mark.parametrize("perm", [None, [0, 2, 1, 3], [3, 1, 0, 2]])
def test_transpose(perm):
    attrs = {} if perm is None else {"perm": perm}
    model, feeds = single("Transpose", [(2, 3, 4, 5)], attrs, opset=13)
    check(model, feeds)


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_concat(axis):
    shapes = []
    for k in (1, 2, 3):
        s = [2, 3, 4]
        s[axis] = k
        shapes.append(tuple(s))
    model, feeds = single("Concat", shapes, {"axis": axis}, opset=13)
    check(model, feeds)


@pytest.mark.parametrize(
    "opset,split,n_out,axis,attrs",
    [(11, None, 3, 1, {}), (11, [1, 4, 1], 3, 1, {}), (13, None, 2, -1, {}), (13, [2, 4], 2, 1, {}),
     (18, None, 4, 1, {"num_outputs": 4}), (18, None, 2, 0, {"num_outputs": 2})],
)
def test_split(opset, split, n_out, axis, attrs):
    attrs = dict(attrs, axis=axis)
    inits = []
    extra = []
    if split is not None:
        if opset < 13:
            attrs["split"] = split
        else:
            inits = [init("split", np.array(split, np.int64))]
            extra = ["split"]
    model, feeds = single("Split", [(3, 6, 4)], attrs, opset, n_out=n_out, inits=inits, extra_inputs=extra)
    check(model, feeds)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("axes", [None, [1], [-1, 1]])
def test_squeeze(opset, axes):
    attrs, inits, extra = {}, [], []
    if axes is not None:
        if opset < 13:
            attrs["axes"] = axes
        else:
            inits, extra = [init("axes", np.array(axes, np.int64))], ["axes"]
    model, feeds = single("Squeeze", [(3, 1, 4, 1)], attrs, opset, inits=inits, extra_inputs=extra)
    check(model, feeds)


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("axes", [[0], [1, 3], [-1], [-1, 0], [4, 0]])
def test_unsqueeze(opset, axes):
    attrs, inits, extra = {}, [], []
    if opset < 13:
        attrs["axes"] = axes
    else:
        inits, extra = [init("axes", np.array(axes, np.int64))], ["axes"]
    model, feeds = single("Unsqueeze", [(3, 4, 2)], attrs, opset, inits=inits, extra_inputs=extra)
    check(model, feeds)


@pytest.mark.parametrize("attrs", [{}, {"start": 1}, {"end": -1}, {"start": -3, "end": 3}, {"start": 9}])
def test_shape(attrs):
    node = helper.make_node("Shape", ["x"], ["y"], **attrs)
    model = make_model([node], [("x", [2, 3, 4, 5])], [("y", TP.INT64)], opset=15)
    check(model, {"x": rnd(2, 3, 4, 5)})


@pytest.mark.parametrize(
    "axis,indices",
    [(0, [0, 2]), (1, [[1, -1], [0, 0]]), (-1, [3, -4]), (1, 2)],
)
def test_gather(axis, indices):
    node = helper.make_node("Gather", ["x", "i"], ["y"], axis=axis)
    model = make_model([node], [("x", [3, 4, 4])], ["y"], [init("i", np.array(indices, np.int64))], 13)
    check(model, {"x": rnd(3, 4, 4)})


def test_shape_gather_concat_reshape_chain():
    # the classic exported "flatten" idiom: Reshape(x, Concat(Gather(Shape(x), 0), [-1]))
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = [init("zero", np.array(0, np.int64)), init("ax0", np.array([0], np.int64)),
             init("minus1", np.array([-1], np.int64))]
    model = make_model(nodes, [("x", [2, 3, 4])], ["y"], inits, 13)
    check(model, {"x": rnd(2, 3, 4)})


# --------------------------------------------------------------------------
# Constant / ConstantOfShape / Cast
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attr,elem",
    [("value", FLOAT), ("value_float", FLOAT), ("value_floats", FLOAT), ("value_int", TP.INT64),
     ("value_ints", TP.INT64), ("value16", FLOAT)],
)
def test_constant(attr, elem):
    if attr == "value":
        kw = {"value": numpy_helper.from_array(rnd(2, 3, seed=3))}
    elif attr == "value16":
        v = rnd(2, 3, seed=3).astype(np.float16)
        kw = {"value": numpy_helper.from_array(v)}
    else:
        kw = {attr: {"value_float": 1.25, "value_floats": [1.5, -2.0], "value_int": 7,
                     "value_ints": [3, -4, 5]}[attr]}
    node = helper.make_node("Constant", [], ["y"], **kw)
    model = make_model([node], [], [("y", TP.FLOAT16 if attr == "value16" else elem)], opset=13)
    ref = check(model, {})
    if attr == "value16":
        assert ref["y"].dtype == np.float64
        np.testing.assert_array_equal(ref["y"], v.astype(np.float64))


@pytest.mark.parametrize("value", [None, np.array([2.5], np.float32), np.array([3], np.int64)])
def test_constant_of_shape(value):
    kw = {} if value is None else {"value": numpy_helper.from_array(value)}
    node = helper.make_node("ConstantOfShape", ["s"], ["y"], **kw)
    elem = TP.INT64 if value is not None and value.dtype == np.int64 else FLOAT
    model = make_model([node], [], [("y", elem)], [init("s", np.array([2, 3], np.int64))], 13)
    check(model, {})


@pytest.mark.parametrize("to", [TP.FLOAT, TP.INT64, TP.INT32, TP.INT8, TP.BOOL])
def test_cast_from_float(to):
    node = helper.make_node("Cast", ["x"], ["y"], to=to)
    model = make_model([node], [("x", [3, 4])], [("y", to)], opset=13)
    check(model, {"x": rnd(3, 4, seed=5) * 4})


@pytest.mark.parametrize("like", [FLOAT, TP.INT64])
def test_cast_like(like):
    node = helper.make_node("CastLike", ["x", "l"], ["y"])
    like_value = np.zeros(2, np.float32 if like == FLOAT else np.int64)
    model = make_model([node], [("x", [3, 4])], [("y", like)], [init("l", like_value)], 15)
    check(model, {"x": rnd(3, 4, seed=6) * 4})


@pytest.mark.parametrize("shape", [[2, 3, 4], [3, 1], [1, 1, 4], [4]])
def test_expand(shape):
    node = helper.make_node("Expand", ["x", "s"], ["y"])
    model = make_model([node], [("x", [3, 1])], ["y"], [init("s", np.array(shape, np.int64))], 13)
    check(model, {"x": rnd(3, 1, seed=7)})


def test_cast_int_to_float_and_float16_stays_exact():
    nodes = [helper.make_node("Cast", ["i"], ["f"], to=TP.FLOAT),
             helper.make_node("Cast", ["x"], ["h"], to=TP.FLOAT16)]
    model = make_model(nodes, [("i", [4], TP.INT64), ("x", [3])], ["f", ("h", TP.FLOAT16)], opset=13)
    x = np.array([1.0001, 2.0, -3.3], np.float32)
    ref = run_reference(model, {"i": np.array([1, -2, 3, 40], np.int64), "x": x})
    assert ref["f"].dtype == np.float64
    np.testing.assert_array_equal(ref["f"], [1, -2, 3, 40])
    # float targets keep the exact float64 value (idealised model)
    np.testing.assert_array_equal(ref["h"], x.astype(np.float64))


# --------------------------------------------------------------------------
# pooling / reductions / normalisations
# --------------------------------------------------------------------------


def test_global_average_pool():
    for shape in [(2, 3, 5), (2, 3, 4, 5), (1, 2, 3, 2, 4)]:
        model, feeds = single("GlobalAveragePool", [shape], opset=13)
        check(model, feeds)


@pytest.mark.parametrize("op", ["AveragePool", "MaxPool"])
@pytest.mark.parametrize(
    "attrs,shape",
    [
        ({"kernel_shape": [2, 2]}, (1, 2, 5, 6)),
        ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, (2, 2, 7, 6)),
        ({"kernel_shape": [3, 2], "strides": [1, 2], "pads": [0, 1, 2, 0]}, (1, 3, 5, 5)),
        ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, (1, 2, 4, 4)),
        ({"kernel_shape": [3], "strides": [2], "auto_pad": "SAME_UPPER"}, (1, 2, 8)),
        ({"kernel_shape": [2, 2, 2], "strides": [2, 1, 2]}, (1, 1, 4, 3, 5)),
        ({"kernel_shape": [3, 2], "auto_pad": "SAME_LOWER"}, (1, 2, 5, 4)),
        ({"kernel_shape": [2, 2], "auto_pad": "VALID", "strides": [2, 2]}, (1, 2, 5, 4)),
    ],
)
def test_pool(op, attrs, shape):
    if op == "MaxPool":
        attrs = {k: v for k, v in attrs.items() if k != "count_include_pad"}
    model, feeds = single(op, [shape], attrs, opset=13)
    check(model, feeds)


def test_maxpool_dilations():
    model, feeds = single("MaxPool", [(1, 2, 7, 7)], {"kernel_shape": [2, 3], "dilations": [2, 2],
                                                      "pads": [1, 0, 1, 2]}, opset=13)
    check(model, feeds)


@pytest.mark.parametrize(
    "opset,axes,keepdims,noop",
    [(13, None, 1, 0), (13, [1], 1, 0), (13, [-1, 1], 0, 0), (18, None, 1, 0), (18, [2, 0], 1, 0),
     (18, [-2], 0, 0), (18, None, 1, 1)],
)
def test_reduce_mean(opset, axes, keepdims, noop):
    attrs = {"keepdims": keepdims}
    inits, extra = [], []
    if opset >= 18:
        attrs["noop_with_empty_axes"] = noop
        if axes is not None:
            inits, extra = [init("axes", np.array(axes, np.int64))], ["axes"]
    elif axes is not None:
        attrs["axes"] = axes
    model, feeds = single("ReduceMean", [(2, 3, 4)], attrs, opset, inits=inits, extra_inputs=extra)
    check(model, feeds)


@pytest.mark.parametrize("axis", [None, 1, -2, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_out", [1, 3])
def test_layer_norm(axis, bias, n_out):
    x_shape = (2, 3, 4)
    a = -1 if axis is None else axis
    norm_shape = x_shape[a:]
    inits = [init("s", rnd(*norm_shape, seed=1))] + ([init("b", rnd(*norm_shape, seed=2))] if bias else [])
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node("LayerNormalization", ["x", "s"] + (["b"] if bias else []),
                            [f"y{i}" for i in range(n_out)], epsilon=1e-3, **attrs)
    model = make_model([node], [("x", list(x_shape))], [f"y{i}" for i in range(n_out)], inits, 17)
    check(model, {"x": rnd(*x_shape) * 2 + 1})


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 3)])
def test_instance_norm(shape):
    c = shape[1]
    inits = [init("s", rnd(c, seed=1)), init("b", rnd(c, seed=2))]
    node = helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-4)
    model = make_model([node], [("x", list(shape))], ["y"], inits, 13)
    check(model, {"x": rnd(*shape) * 3 + 1})


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset,axis", [(11, None), (11, 2), (11, -2), (13, None), (13, 1), (13, 0)])
def test_softmax(op, opset, axis):
    attrs = {} if axis is None else {"axis": axis}
    model, feeds = single(op, [(2, 3, 4)], attrs, opset)
    check(model, feeds)


# --------------------------------------------------------------------------
# control flow
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cond", [True, False])
def test_if_with_outer_scope(cond):
    then_g = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["t"])], "then", [], [_vi("t", FLOAT, [2, 3])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["e"])], "else", [], [_vi("e", FLOAT, [2, 3])],
        initializer=[init("k", np.float32(-2.0))],
    )
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)
    relu = helper.make_node("Relu", ["y"], ["z"])
    model = make_model([node, relu], [("x", [2, 3]), ("c", [], TP.BOOL)], ["z"],
                       [init("w", rnd(2, 3, seed=3))], 13)
    check(model, {"x": rnd(2, 3), "c": np.array(cond)})


def test_loop():
    # acc_{i+1} = acc_i * 0.5 + x * i ; scan output collects acc each iteration
    body = helper.make_graph(
        [
            helper.make_node("Cast", ["i"], ["fi"], to=TP.FLOAT),
            helper.make_node("Mul", ["x", "fi"], ["xi"]),
            helper.make_node("Mul", ["acc_in", "half"], ["h"]),
            helper.make_node("Add", ["h", "xi"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["acc_out"], ["scan"]),
        ],
        "body",
        [_vi("i", TP.INT64, []), _vi("cond_in", TP.BOOL, []), _vi("acc_in", FLOAT, [3])],
        [_vi("cond_out", TP.BOOL, []), _vi("acc_out", FLOAT, [3]), _vi("scan", FLOAT, [3])],
        initializer=[init("half", np.float32(0.5))],
    )
    node = helper.make_node("Loop", ["M", "", "acc0"], ["acc", "scans"], body=body)
    model = make_model([node], [("x", [3]), ("acc0", [3])], ["acc", "scans"],
                       [init("M", np.array(4, np.int64))], 13)
    check(model, {"x": rnd(3), "acc0": rnd(3, seed=1)})


# --------------------------------------------------------------------------
# tensor types, feeds, errors
# --------------------------------------------------------------------------


def test_float16_and_bfloat16_initializers_are_exact():
    h = rnd(2, 3, seed=1).astype(np.float16)
    bf = rnd(2, 3, seed=2).astype(ml_dtypes.bfloat16)
    nodes = [helper.make_node("Identity", ["h"], ["yh"]), helper.make_node("Identity", ["bf"], ["ybf"])]
    model = make_model(nodes, [], [("yh", TP.FLOAT16), ("ybf", TP.BFLOAT16)],
                       [init("h", h), numpy_helper.from_array(bf, "bf")], 13)
    ref = run_reference(model, {})
    assert ref["yh"].dtype == np.float64 and ref["ybf"].dtype == np.float64
    np.testing.assert_array_equal(ref["yh"], h.astype(np.float64))
    np.testing.assert_array_equal(ref["ybf"], bf.astype(np.float64))


def test_float16_model_vs_ort():
    x = rnd(1, 2, 5, 5).astype(np.float16)
    w = rnd(3, 2, 3, 3, seed=1).astype(np.float16)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    model = make_model([node], [("x", [1, 2, 5, 5], TP.FLOAT16)], [("y", TP.FLOAT16)], [init("w", w)], 13)
    ref = run_reference(model, {"x": x})["y"]
    assert ref.dtype == np.float64
    got = run_ort(model, {"x": x})["y"]
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=5e-3, atol=5e-3 * np.abs(ref).max())


def test_feed_overrides_initializer_input():
    node = helper.make_node("Add", ["x", "b"], ["y"])
    model = make_model([node], [("x", [3]), ("b", [3])], ["y"], [init("b", np.ones(3, np.float32))], 13)
    x = rnd(3)
    np.testing.assert_array_equal(run_reference(model, {"x": x})["y"], x.astype(np.float64) + 1)
    b = rnd(3, seed=4)
    ref = run_reference(model, {"x": x, "b": b})["y"]
    np.testing.assert_array_equal(ref, x.astype(np.float64) + b.astype(np.float64))
    assert_close(run_ort(model, {"x": x, "b": b})["y"], ref)


def test_float32_feed_becomes_float64_and_integers_stay():
    nodes = [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["i"], ["j"])]
    model = make_model(nodes, [("x", [2]), ("i", [2], TP.INT32)], ["y", ("j", TP.INT32)], opset=13)
    ref = run_reference(model, {"x": np.ones(2, np.float32), "i": np.array([1, 2], np.int32)})
    assert ref["y"].dtype == np.float64
    assert ref["j"].dtype == np.int32


def test_unknown_op_raises():
    node = helper.make_node("HardSwishy", ["x"], ["y"])
    model = make_model([node], [("x", [2])], ["y"], opset=13)
    with pytest.raises(NotImplementedError, match="HardSwishy"):
        run_reference(model, {"x": rnd(2)})


def test_custom_domain_raises():
    node = helper.make_node("Relu", ["x"], ["y"], domain="com.example")
    model = make_model([node], [("x", [2])], ["y"], opset=13)
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(NotImplementedError, match="com.example"):
        run_reference(model, {"x": rnd(2)})


def test_small_network_end_to_end():
    """Conv -> BN -> Relu -> ConvTranspose -> BN -> GAP -> Flatten -> Gemm."""
    r = np.random.default_rng(11)
    f = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
    pos = lambda *s: r.uniform(0.5, 1.5, s).astype(np.float32)  # noqa: E731
    inits = [
        init("w1", f(4, 3, 3, 3)), init("b1", f(4)),
        init("s1", f(4)), init("o1", f(4)), init("m1", f(4)), init("v1", pos(4)),
        init("w2", f(4, 2, 2, 2)),
        init("s2", f(4)), init("o2", f(4)), init("m2", f(4)), init("v2", pos(4)),
        init("wg", f(5, 4)), init("bg", f(5)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c1", "s1", "o1", "m1", "v1"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("ConvTranspose", ["r1", "w2"], ["c2"], group=2, strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c2", "s2", "o2", "m2", "v2"], ["n2"], epsilon=1e-3),
        helper.make_node("GlobalAveragePool", ["n2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["fl"]),
        helper.make_node("Gemm", ["fl", "wg", "bg"], ["y"], transB=1),
    ]
    model = make_model(nodes, [("x", [2, 3, 8, 8])], ["y"], inits, 15)
    check(model, {"x": f(2, 3, 8, 8)})


def test_the_fold_check_judges_an_output_against_the_originals_own_float_error():
    """onnx_builders.assert_close, used by every fold check: within tol of the output's scale, or (for an
    ill-conditioned model whose ORIGINAL float run already misses the float64 result) within twice that miss."""
    try:
        from onnx_builders import assert_close
    except ImportError:  # pragma: no cover
        from tests.onnx_builders import assert_close
    want = {"y": np.array([10.0, -3.0])}
    assert_close({"y": np.array([10.0005, -3.0])}, want, 1e-4)  # 5e-4 <= 1e-4 * 10
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close({"y": np.array([10.01, -3.0])}, want, 1e-4)
    original = {"y": np.array([10.02, -3.0])}  # the original itself is 0.02 off
    assert_close({"y": np.array([10.01, -3.0])}, want, 1e-4, original=lambda: original)
    with pytest.raises(AssertionError, match="twice the original's own error"):
        assert_close({"y": np.array([10.05, -3.0])}, want, 1e-4, original=lambda: original)
