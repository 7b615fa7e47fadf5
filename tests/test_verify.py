"""Tests of bnfold.verify: seeded inputs, per-output comparison, tolerances, fp16/bf16, providers."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import InputError

# The module, not the package-level ``bnfold.verify`` function of the same name.
V = importlib.import_module("bnfold.verify")

CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDAExecutionProvider not available")


# ---------------------------------------------------------------------------------------------- model builders


def _model(nodes, inputs, outputs, initializers=(), opset=17, ir=8):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def _conv_relu(weight, bias, elem=TensorProto.FLOAT, opset=17, ir=8, batch="N"):
    """x[N,2,5,5] -> Conv(3x3, pad 1, 3 channels) -> y, Relu -> z."""
    x = helper.make_tensor_value_info("x", elem, [batch, 2, 5, 5])
    y = helper.make_tensor_value_info("y", elem, [batch, 3, 5, 5])
    z = helper.make_tensor_value_info("z", elem, [batch, 3, 5, 5])
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    return _model(nodes, [x], [y, z], inits, opset=opset, ir=ir)


def _weights(dtype=np.float32, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((3, 2, 3, 3)).astype(dtype), rng.standard_normal(3).astype(dtype)


def _conv_np(x, w, b):
    """Reference Conv (pad 1, stride 1) in float64."""
    x, w, b = (np.asarray(t, np.float64) for t in (x, w, b))
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i : i + h, j : j + wd], w[:, :, i, j])
    return out + b[None, :, None, None]


def _float_model():
    w, b = _weights()
    return _conv_relu(w, b), w, b


# ------------------------------------------------------------------------------------------------ basic verdicts


def test_identical_models_pass():
    model, _, _ = _float_model()
    report = V.verify(model, model, providers=["cpu"])
    assert report
    r = report.providers["cpu"]
    assert r.available and r.passed and r.reason == ""
    assert [o.name for o in r.outputs] == ["y", "z"]
    assert all(o.max_abs_error == 0.0 and o.scaled_error == 0.0 and o.ratio == 0.0 for o in r.outputs)
    assert r.outputs[0].dtype == "float32" and r.outputs[0].rule == "noise" and r.outputs[0].limit == V.NOISE_FACTOR
    assert r.outputs[0].noise > 0  # one-ulp moves of the weights do reach the outputs
    assert report.seed == 0


def test_paths_are_loaded(tmp_path):
    model, _, _ = _float_model()
    p = tmp_path / "m.onnx"
    onnx.save(model, p)
    assert V.verify(p, str(p), providers=["cpu"])
    with pytest.raises(InputError, match="cannot read original model"):
        V.verify(tmp_path / "missing.onnx", model, providers=["cpu"])


def test_perturbed_weight_fails_with_expected_error():
    model, w, b = _float_model()
    w2 = w.copy()
    w2[1, 0, 1, 1] += 0.5
    bad = _conv_relu(w2, b)
    report = V.verify(model, bad, providers=["cpu"], seed=3)
    assert not report
    r = report.providers["cpu"]
    assert r.available and not r.passed

    x = V.make_inputs(model, seed=3)["x"]
    y_ref, y_bad = _conv_np(x, w, b), _conv_np(x, w2, b)
    expected_y = np.abs(y_bad - y_ref).max()
    expected_z = np.abs(np.maximum(y_bad, 0) - np.maximum(y_ref, 0)).max()
    by_name = {o.name: o for o in r.outputs}
    assert not by_name["y"].passed
    assert by_name["y"].max_abs_error == pytest.approx(expected_y, rel=1e-5)
    assert by_name["z"].max_abs_error == pytest.approx(expected_z, rel=1e-5)
    assert r.max_abs_error == pytest.approx(expected_y, rel=1e-5)
    # the perturbation only reaches output channel 1, with |x| * 0.5 at the centre tap
    assert expected_y == pytest.approx(0.5 * np.abs(x[:, 0]).max(), rel=1e-6)


def test_tolerance_override_both_ways():
    model, w, b = _float_model()
    near = _conv_relu(V.perturb_array(w, np.random.default_rng(9)), b)  # rounding-sized: the noise rule passes it
    assert V.verify(model, near, providers=["cpu"])
    strict = V.verify(model, near, providers=["cpu"], atol=0.0, rtol=0.0)
    assert not strict
    assert all(o.rule == "tolerance" and o.atol == 0.0 and o.rtol == 0.0 and o.ratio is None
               for o in strict.providers["cpu"].outputs)

    far = _conv_relu(w + np.float32(0.01), b)
    assert not V.verify(model, far, providers=["cpu"])
    loose = V.verify(model, far, providers=["cpu"], atol=1.0)
    assert loose
    assert loose.providers["cpu"].outputs[0].atol == 1.0
    assert loose.providers["cpu"].outputs[0].rtol == 0.0  # the other tolerance is 0, not a hidden default
    with pytest.raises(InputError, match="atol must be a finite number >= 0"):
        V.verify(model, far, providers=["cpu"], atol=-1.0)


def test_multiple_outputs_reported_separately():
    """Only the output that differs fails: y is shared, z goes through Relu in one model and Abs in the other."""
    model, w, b = _float_model()
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.node[1].op_type = "Abs"
    r = V.verify(model, other, providers=["cpu"]).providers["cpu"]
    by_name = {o.name: o for o in r.outputs}
    assert by_name["y"].passed and by_name["y"].max_abs_error == 0.0
    assert not by_name["z"].passed
    y = _conv_np(V.make_inputs(model)["x"], w, b)
    assert by_name["z"].max_abs_error == pytest.approx(np.abs(np.minimum(y, 0)).max(), rel=1e-5)


def test_folded_missing_output_and_shape_mismatch():
    model, w, b = _float_model()
    fewer = onnx.ModelProto()
    fewer.CopyFrom(model)
    del fewer.graph.output[1]
    r = V.verify(model, fewer, providers=["cpu"]).providers["cpu"]
    assert not r.passed and "candidate model has no output 'z'" in r.reason
    z = [o for o in r.outputs if o.name == "z"][0]
    assert z.max_abs_error == float("inf") and not z.passed

    reshaped = onnx.ModelProto()
    reshaped.CopyFrom(model)
    reshaped.graph.node[1].output[0] = "z0"
    reshaped.graph.node.append(helper.make_node("Flatten", ["z0"], ["z"]))
    reshaped.graph.output[1].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    r = V.verify(model, reshaped, providers=["cpu"]).providers["cpu"]
    assert not r.passed
    assert "output 'z' has shape (1, 75) in the candidate model, (1, 3, 5, 5) in the original" in r.reason
    assert [o.passed for o in r.outputs] == [True, False]


def test_unrunnable_folded_model_fails_provider_but_original_raises():
    model, _, _ = _float_model()
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[1].op_type = "NoSuchOp"
    report = V.verify(model, broken, providers=["cpu"])
    r = report.providers["cpu"]
    assert not report and r.available and not r.passed
    assert r.reason.startswith("onnxruntime cannot run the candidate model:")
    assert all(o.max_abs_error == float("inf") for o in r.outputs)
    with pytest.raises(InputError, match="^onnxruntime cannot run the original model: "):
        V.verify(broken, model, providers=["cpu"])


# ------------------------------------------------------------------------------------------------ inputs, shapes


def test_dynamic_dims_via_input_shapes():
    model, w, b = _float_model()
    feeds = V.make_inputs(model)
    assert feeds["x"].shape == (1, 2, 5, 5) and feeds["x"].dtype == np.float32
    feeds = V.make_inputs(model, {"x": (4, 2, 5, 5)}, seed=7)
    assert feeds["x"].shape == (4, 2, 5, 5)
    np.testing.assert_array_equal(feeds["x"], V.make_inputs(model, {"x": (4, 2, 5, 5)}, seed=7)["x"])
    report = V.verify(model, model, providers=["cpu"], input_shapes={"x": (4, 2, 5, 5)})
    assert report and report.providers["cpu"].outputs[0].name == "y"


@pytest.mark.parametrize(
    "shapes, message",
    [
        ({"nope": (1, 2, 5, 5)}, "input_shapes names unknown input 'nope' (model inputs: x)"),
        ({"x": (1, 2, 5)}, "has rank 3, but the model input has rank 4"),
        ({"x": (1, 3, 5, 5)}, "sets dimension 1 to 3, but the model fixes it to 2"),
        ({"x": (1, -2, 5, 5)}, "negative dimension"),
    ],
)
def test_bad_input_shapes_raise(shapes, message):
    model, _, _ = _float_model()
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        V.verify(model, model, providers=["cpu"], input_shapes=shapes)


def test_explicit_inputs_override_generation():
    model, w, b = _float_model()
    x = np.full((2, 2, 5, 5), 0.5, np.float32)
    w2 = w.copy()
    w2[0, 0, 0, 0] += 1.0
    r = V.verify(model, _conv_relu(w2, b), providers=["cpu"], inputs={"x": x}).providers["cpu"]
    # a constant input of 0.5 hits the changed tap everywhere except the padded top row and left column
    assert r.outputs[0].max_abs_error == pytest.approx(0.5)
    with pytest.raises(InputError, match="inputs lacks a value for model input 'x'"):
        V.verify(model, model, providers=["cpu"], inputs={})
    with pytest.raises(InputError, match="inputs names unknown input 'q'"):
        V.verify(model, model, providers=["cpu"], inputs={"x": x, "q": x})


def test_initializers_listed_as_inputs_are_not_fed():
    """IR < 4 models list initializers among the graph inputs; they need no generated values."""
    w, b = _weights()
    model = _conv_relu(w, b, ir=3, opset=8)
    model.graph.input.extend(
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, w.shape),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, b.shape)]
    )
    assert list(V.make_inputs(model)) == ["x"]
    assert V.verify(model, model, providers=["cpu"])


def test_make_inputs_dtypes_and_ranges():
    ins = [
        helper.make_tensor_value_info("f16", TensorProto.FLOAT16, [3]),
        helper.make_tensor_value_info("f64", TensorProto.DOUBLE, [3]),
        helper.make_tensor_value_info("bf", TensorProto.BFLOAT16, [3]),
        helper.make_tensor_value_info("i", TensorProto.INT64, [50]),
        helper.make_tensor_value_info("u", TensorProto.UINT8, [2, "k"]),
        helper.make_tensor_value_info("flag", TensorProto.BOOL, [4]),
    ]
    model = _model([], ins, [])
    feeds = V.make_inputs(model, {"u": (2, 6)}, seed=5)
    assert feeds["f16"].dtype == np.float16 and feeds["f64"].dtype == np.float64
    assert feeds["bf"].dtype == ml_dtypes.bfloat16
    assert feeds["i"].dtype == np.int64 and set(np.unique(feeds["i"])) <= {0, 1, 2, 3}  # read by nothing
    assert feeds["u"].shape == (2, 6) and feeds["u"].dtype == np.uint8
    assert feeds["flag"].dtype == np.bool_
    again = V.make_inputs(model, {"u": (2, 6)}, seed=5)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)


# ------------------------------------------------------------------------------------------------ exact outputs


def _argmax_model(offset):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [4, 1])
    nodes = [
        helper.make_node("ArgMax", ["x"], ["a"], axis=1),
        helper.make_node("Add", ["a", "off"], ["i"]),
    ]
    return _model(nodes, [x], [i], [numpy_helper.from_array(np.array(offset, np.int64), "off")])


def test_int_outputs_compared_exactly():
    same = V.verify(_argmax_model(0), _argmax_model(0), providers=["cpu"], atol=10.0, rtol=10.0)
    assert same
    o = same.providers["cpu"].outputs[0]
    assert (o.rule, o.dtype, o.ratio) == ("exact", "int64", None)  # float tolerances do not apply to integers
    off = V.verify(_argmax_model(0), _argmax_model(1), providers=["cpu"], atol=10.0, rtol=10.0)
    o = off.providers["cpu"].outputs[0]
    assert not off and o.max_abs_error == 1.0 and not o.passed


def test_compare_nan_inf_rules():
    nan, inf = np.nan, np.inf
    b = np.array([1.0, nan, inf, -inf, 0.0], np.float32)
    ok = V.compare_arrays("o", b, b.copy())
    assert ok.passed and ok.max_abs_error == 0.0 and ok.scaled_error == 0.0 and ok.scale == 1.0
    one_nan = V.compare_arrays("o", b, np.array([1.0, 2.0, inf, -inf, 0.0], np.float32))
    assert not one_nan.passed and one_nan.max_abs_error == inf and one_nan.ratio == inf
    flipped = V.compare_arrays("o", b, np.array([1.0, nan, -inf, -inf, 0.0], np.float32))
    assert not flipped.passed and flipped.max_abs_error == inf
    finite_vs_inf = V.compare_arrays("o", b, np.array([1.0, nan, 1e30, -inf, 0.0], np.float32))
    assert not finite_vs_inf.passed and finite_vs_inf.scaled_error == inf
    empty = V.compare_arrays("o", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))
    assert empty.passed and empty.max_abs_error == 0.0


def test_scaled_error_is_relative_to_the_output_range_not_elementwise():
    """An error at an element that happens to be ~0 is not divided by that element (no 1e+34 relative errors)."""
    o = V.compare_arrays("o", np.array([1e-30, 2.0, -4.0]), np.array([1e-6, 2.0, -4.0]), noise=1e-6)
    assert o.scale == 4.0 and o.scaled_error == pytest.approx((1e-6 - 1e-30) / 4.0)
    assert o.ratio == pytest.approx(1.0) and o.passed and o.dtype == "float64"


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(-1e6, 1e6)),
    hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(-1e3, 1e3)),
    st.floats(0, 1e3),
)
def test_compare_matches_numpy_reference(b, delta, noise):
    n = min(len(b), len(delta))
    b, a = b[:n], b[:n] + delta[:n]
    err = np.abs(a - b).max()
    # the noise rule, written out independently
    floor = np.finfo(np.float64).eps * np.abs(b).max()
    o = V.compare_arrays("o", b, a, noise=noise)
    assert o.max_abs_error == pytest.approx(err)
    assert o.noise_scale == pytest.approx(max(noise, floor))
    assert o.passed == bool(err <= 8.0 * max(noise, floor))
    # explicit tolerances: numpy.isclose semantics
    t = V.compare_arrays("o", b, a, atol=0.5, rtol=1e-3)
    assert t.passed == bool(np.isclose(a, b, atol=0.5, rtol=1e-3).all())


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16])
def test_perturb_array_moves_every_value_one_ulp(dtype):
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(200) * 10.0 ** rng.integers(-3, 3, 200), [0.0, -0.0]])
    values = np.concatenate([values, [np.inf, -np.inf, np.nan]]).astype(dtype)
    moved = V.perturb_array(values, np.random.default_rng(1))
    wide, moved_wide = values.astype(np.float64), moved.astype(np.float64)
    finite = np.isfinite(wide) & (wide != 0)
    # reference: numpy's nextafter in float32/float64 terms, or the exact ulp of the type via finfo
    spacing = np.array([np.spacing(np.array(abs(v), dtype=dtype)).astype(np.float64) if dtype != ml_dtypes.bfloat16
                        else 2.0 ** (np.floor(np.log2(abs(v))) - 7) for v in wide[finite]])
    step = np.abs(moved_wide[finite] - wide[finite])
    lower = np.abs(moved_wide[finite]) < np.abs(wide[finite])
    # moving down across a power of two takes the smaller ulp below it
    assert np.all((step == spacing) | (lower & (step == spacing / 2)))
    assert 0.3 < lower.mean() < 0.7  # random directions
    np.testing.assert_array_equal(moved_wide[~finite], wide[~finite])  # zeros, inf, NaN kept
    assert moved.dtype == values.dtype


def test_machine_epsilon():
    assert V.machine_epsilon("float32") == 2.0 ** -23
    assert V.machine_epsilon(TensorProto.FLOAT16) == 2.0 ** -10
    assert V.machine_epsilon(ml_dtypes.bfloat16) == 2.0 ** -7
    assert V.machine_epsilon(np.int64) == 0.0


# ------------------------------------------------------------------------------------------------ fp16 / bf16


def test_fp16_conv_relu_runs_natively_within_noise():
    """onnxruntime 1.32's CPU provider has float16 Conv/Relu, so no emulation is needed."""
    w, b = _weights(np.float16)
    model = _conv_relu(w, b, TensorProto.FLOAT16)
    w2 = V.perturb_array(w, np.random.default_rng(4))  # a rounding-sized change
    report = V.verify(model, _conv_relu(w2, b, TensorProto.FLOAT16), providers=["cpu"])
    r = report.providers["cpu"]
    assert report and r.reason == ""
    assert all(o.dtype == "float16" and o.rule == "noise" for o in r.outputs)
    assert all(o.passed for o in r.outputs) and r.max_abs_error > 0
    w3 = w.copy()
    w3[1] = (w3[1].astype(np.float32) * 1.01).astype(np.float16)  # one channel 1 % off
    assert not V.verify(model, _conv_relu(w3, b, TensorProto.FLOAT16), providers=["cpu"])


def test_bf16_conv_relu_is_emulated_in_float32():
    """onnxruntime's CPU provider has no bfloat16 Conv: both models run as float32 copies."""
    w, b = _weights(ml_dtypes.bfloat16)
    model = _conv_relu(w, b, TensorProto.BFLOAT16, opset=22, ir=10)
    report = V.verify(model, model, providers=["cpu"])
    r = report.providers["cpu"]
    assert report and r.reason == "bfloat16 kernels missing on CPU: compared in float32 emulation"
    assert all(o.dtype == "bfloat16" and o.rule == "noise" for o in r.outputs)

    # the emulation computes what a float64 reference computes from the same bfloat16 values
    x = V.make_inputs(model)["x"]
    assert x.dtype == ml_dtypes.bfloat16
    y_ref = _conv_np(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32))
    w2 = w.copy()
    w2[2, 1, 0, 0] = ml_dtypes.bfloat16(float(w[2, 1, 0, 0]) + 1.0)
    r2 = V.verify(model, _conv_relu(w2, b, TensorProto.BFLOAT16, opset=22, ir=10), providers=["cpu"])
    y_bad = _conv_np(x.astype(np.float32), w2.astype(np.float32), b.astype(np.float32))
    y_out = r2.providers["cpu"].outputs[0]
    assert not r2 and y_out.max_abs_error == pytest.approx(np.abs(y_bad - y_ref).max(), rel=1e-5)


def test_bf16_native_when_kernels_exist():
    """Transpose has a bfloat16 CPU kernel: bf16 inputs and outputs pass through onnxruntime without emulation."""
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [3, 2])
    model = _model([helper.make_node("Transpose", ["x"], ["y"])], [x], [y], opset=22, ir=10)
    r = V.verify(model, model, providers=["cpu"]).providers["cpu"]
    assert r.passed and r.reason == "" and r.outputs[0].dtype == "bfloat16"


def test_bf16_folded_needs_emulation_then_both_are_emulated():
    """The original runs natively (Identity), the folded one (Add 0) lacks a bf16 kernel: both run in float32."""
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 3])
    original = _model([helper.make_node("Identity", ["x"], ["y"])], [x], [y], opset=22, ir=10)
    zero = numpy_helper.from_array(np.zeros((), ml_dtypes.bfloat16), "zero")
    folded = _model([helper.make_node("Add", ["x", "zero"], ["y"])], [x], [y], [zero], opset=22, ir=10)
    r = V.verify(original, folded, providers=["cpu"]).providers["cpu"]
    assert r.passed and "float32 emulation" in r.reason and r.outputs[0].max_abs_error == 0.0


def test_bf16_emulation_converts_subgraphs_constants_and_casts():
    """If branches with bf16 Constant, ConstantOfShape and Cast-to-bf16 are all widened consistently."""
    bf = TensorProto.BFLOAT16

    def branch(name, scale):
        out = helper.make_tensor_value_info(f"{name}_out", bf, [2, 3])
        nodes = [
            helper.make_node("Constant", [], [f"{name}_c"],
                             value=numpy_helper.from_array(np.array(scale, ml_dtypes.bfloat16))),
            helper.make_node("ConstantOfShape", ["shape"], [f"{name}_ones"],
                             value=numpy_helper.from_array(np.array([1.0], ml_dtypes.bfloat16))),
            helper.make_node("Mul", ["x", f"{name}_c"], [f"{name}_m"]),
            helper.make_node("Add", [f"{name}_m", f"{name}_ones"], [f"{name}_out"]),
        ]
        return helper.make_graph(nodes, name, [], [out])

    x = helper.make_tensor_value_info("x", bf, [2, 3])
    f = helper.make_tensor_value_info("f", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", bf, [2, 3])
    nodes = [
        helper.make_node("Cast", ["f"], ["fb"], to=bf),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("If", ["cond"], ["t"], then_branch=branch("then", 2.0), else_branch=branch("else", 3.0)),
        helper.make_node("Add", ["t", "fb"], ["y"]),
    ]
    cond = numpy_helper.from_array(np.array(True), "cond")
    model = _model(nodes, [x, f], [y], [cond], opset=22, ir=10)
    assert V._low_precision_types(model) == {"bfloat16"}
    assert V._low_precision_types(V._to_float32(model)) == set()
    assert model.graph.node[0].attribute[0].i == bf  # the caller's model is untouched

    feeds = V.make_inputs(model, seed=2)
    r = V.verify(model, model, providers=["cpu"], inputs=feeds).providers["cpu"]
    assert r.passed and "emulation" in r.reason
    # the then-branch computed 2x + 1 + cast(f): check against numpy via a folded model with the branches swapped
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    swapped.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array(False), "cond"))
    r2 = V.verify(model, swapped, providers=["cpu"], inputs=feeds).providers["cpu"]
    x_ = feeds["x"].astype(np.float64)
    assert r2.outputs[0].max_abs_error == pytest.approx(np.abs(x_).max(), rel=1e-6)


# ------------------------------------------------------------------------------------------------ providers


def test_unknown_provider_raises():
    model, _, _ = _float_model()
    with pytest.raises(InputError, match=r"^unknown provider 'tpu' \(choose from cpu, cuda\)$"):
        V.verify(model, model, providers=["tpu"])


def test_provider_names_accept_full_names_and_case():
    model, _, _ = _float_model()
    report = V.verify(model, model, providers=["CPUExecutionProvider", "CPU", "cpu"])
    assert list(report.providers) == ["cpu"] and report


def test_default_providers_and_available_providers():
    model, _, _ = _float_model()
    report = V.verify(model, model)
    assert list(report.providers) == (["cpu", "cuda"] if CUDA else ["cpu"])
    assert V.available_providers() == (["cpu", "cuda"] if CUDA else ["cpu"])


@pytest.mark.skipif(CUDA, reason="CUDAExecutionProvider is available here; tested by test_cuda_run")
def test_cuda_unavailable_is_reported():
    model, _, _ = _float_model()
    report = V.verify(model, model, providers=["cpu", "cuda"])
    cuda = report.providers["cuda"]
    assert not cuda.available and cuda.reason == (
        "CUDAExecutionProvider not available in this onnxruntime build (install onnxruntime-gpu and a CUDA runtime)"
    )
    assert report  # the CPU comparison still decides
    assert not V.verify(model, model, providers=["cuda"])  # nothing ran


@needs_cuda
def test_cuda_run():
    model, w, b = _float_model()
    report = V.verify(model, model, providers=["cuda"])
    cuda = report.providers["cuda"]
    if not cuda.available:  # a CUDA build without a usable device or runtime
        pytest.skip(cuda.reason)
    assert report and cuda.outputs[0].max_abs_error == 0.0
    w2 = w.copy()
    w2[0] += 0.1
    assert not V.verify(model, _conv_relu(w2, b), providers=["cuda"])


class _FakeCudaOrt:
    """onnxruntime as a CUDA build would look; sessions really run on CPU and report ``placed`` first."""

    def __init__(self, placed):
        self.placed = placed
        self.requested = []
        self.SessionOptions = ort.SessionOptions
        self.GraphOptimizationLevel = ort.GraphOptimizationLevel
        self.OrtValue = ort.OrtValue

    def get_available_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def InferenceSession(self, model, options, providers):  # noqa: N802 - mirrors onnxruntime
        self.requested.append((providers, options.graph_optimization_level))
        sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        sess.get_providers = lambda: [self.placed, "CPUExecutionProvider"]
        return sess


@pytest.mark.parametrize("placed", ["CUDAExecutionProvider", "CPUExecutionProvider"])
def test_cuda_session_setup_and_silent_fallback(monkeypatch, placed):
    fake = _FakeCudaOrt(placed)
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    model, _, _ = _float_model()
    report = V.verify(model, model)
    assert list(report.providers) == ["cpu", "cuda"]
    assert ([("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"],
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL) in fake.requested
    assert all(level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL for _, level in fake.requested)
    cuda = report.providers["cuda"]
    if placed == "CUDAExecutionProvider":
        assert cuda.available and cuda.passed
    else:
        assert not cuda.available and "fell back to CPUExecutionProvider" in cuda.reason
    assert report


# ------------------------------------------------------------------------------------------------ mechanics


def test_large_model_path_uses_external_data(monkeypatch):
    model, w, b = _float_model()
    monkeypatch.setattr(V.ortlib, "MAX_INLINE_BYTES", 0)
    w2 = w.copy()
    w2[0, 0, 0, 0] += 1.0
    assert V.verify(model, model, providers=["cpu"])
    assert not V.verify(model, _conv_relu(w2, b), providers=["cpu"])
    # the caller's tensors still hold their data
    assert all(t.data_location == TensorProto.DEFAULT and t.raw_data for t in model.graph.initializer)


def test_import_does_not_pull_onnxruntime_or_torch():
    code = (
        "import sys, bnfold, bnfold.verify, bnfold.report, bnfold.errors\n"
        "bad = [m for m in ('onnxruntime', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)
