"""bnfold.onnx.calibrate against an independent numpy float64 reference of training-mode BN."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from bnfold.errors import InputError
from bnfold.onnx.calibrate import calibrate_onnx, load_calibration_data

EPS1, EPS2 = 1e-5, 1e-3
C_IN, C1, C2, HW = 3, 4, 2, 5


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(size=(C1, C_IN, 1, 1)).astype(np.float32),
        "b1": rng.normal(size=C1).astype(np.float32),
        "s1": rng.uniform(0.5, 1.5, C1).astype(np.float32),
        "t1": rng.normal(size=C1).astype(np.float32),
        "m1": np.full(C1, 7.0, np.float32),   # deliberately wrong
        "v1": np.full(C1, 0.01, np.float32),
        "w2": rng.normal(size=(C2, C1, 1, 1)).astype(np.float32),
        "s2": rng.uniform(0.5, 1.5, C2).astype(np.float32),
        "t2": rng.normal(size=C2).astype(np.float32),
        "m2": np.full(C2, -3.0, np.float32),
        "v2": np.full(C2, 50.0, np.float32),
    }


def make_model(opset=17, shared=False):
    p = _params()
    inits = [numpy_helper.from_array(v, k) for k, v in p.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "s1", "t1", "m1", "v1"], ["n1"], name="bn1", epsilon=EPS1),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "s2", "t2", "m2", "v2"], ["y"], name="bn2", epsilon=EPS2),
    ]
    outputs = [helper.make_tensor_value_info("y", TP.FLOAT, ["N", C2, HW, HW])]
    if shared:  # m2 is also read by another node: must not be overwritten for it
        nodes.append(helper.make_node("Identity", ["m2"], ["m2_copy"], name="ident"))
        outputs.append(helper.make_tensor_value_info("m2_copy", TP.FLOAT, [C2]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["N", C_IN, HW, HW])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, p


def _conv1x1(x, w, b=None):
    y = np.einsum("nchw,oc->nohw", x, w[:, :, 0, 0].astype(np.float64))
    return y if b is None else y + b.astype(np.float64)[None, :, None, None]


def _moments(y):
    mean = y.mean(axis=(0, 2, 3))
    var = ((y - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
    return mean, var


def reference_batches(x, p, batch_size):
    """Per batch, per BN: (mean, biased var, m), both BNs in training mode, float64."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].astype(np.float64)
        c1 = _conv1x1(xb, p["w1"], p["b1"])
        mu1, var1 = _moments(c1)
        n1 = ((c1 - mu1[None, :, None, None]) / np.sqrt(var1 + EPS1)[None, :, None, None]
              * p["s1"].astype(np.float64)[None, :, None, None] + p["t1"].astype(np.float64)[None, :, None, None])
        c2 = _conv1x1(np.maximum(n1, 0), p["w2"])
        mu2, var2 = _moments(c2)
        m = xb.shape[0] * HW * HW
        out.append(((mu1, var1, m), (mu2, var2, m)))
    return out


def _init(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _data(n=10, seed=1):
    return {"x": np.random.default_rng(seed).normal(1.0, 2.0, size=(n, C_IN, HW, HW)).astype(np.float32)}


@pytest.mark.parametrize("opset", [15, 18])
@pytest.mark.parametrize("batch_size", [3, 4])
def test_unbiased_matches_numpy_reference(opset, batch_size):
    model, p = make_model(opset)
    data = _data(10)
    before = model.SerializeToString()
    calls = []
    new, info = calibrate_onnx(model, data, batch_size=batch_size, progress=lambda d, t: calls.append((d, t)))
    assert model.SerializeToString() == before  # the caller's model is untouched
    ref = reference_batches(data["x"], p, batch_size)
    for k, (mean_name, var_name) in enumerate([("m1", "v1"), ("m2", "v2")]):
        per = [b[k] for b in ref]
        total = sum(m for _, _, m in per)
        mean = sum(m * mu for mu, _, m in per) / total
        var = sum(m * v for _, v, m in per) / (total - len(per))
        np.testing.assert_allclose(_init(new, mean_name), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_init(new, var_name), var, rtol=1e-4, atol=1e-5)
        assert info["layers"][k] == {"bn": f"bn{k + 1}", "batches": len(per), "values": total}
    n_batches = -(-10 // batch_size)
    assert calls == [(i + 1, n_batches) for i in range(n_batches)]
    onnx.checker.check_model(new)
    # same graph; only the two statistics per BN changed
    assert [n.SerializeToString() for n in new.graph.node] == [n.SerializeToString() for n in model.graph.node]
    changed = {t.name for t, u in zip(new.graph.initializer, model.graph.initializer)
               if t.SerializeToString() != u.SerializeToString()}
    assert changed == {"m1", "v1", "m2", "v2"}
    assert len(new.graph.initializer) == len(model.graph.initializer)


def test_ema_matches_explicit_loop():
    model, p = make_model()
    data = _data(12)
    new, _ = calibrate_onnx(model, data, batch_size=4, estimator="ema", decay=0.7)
    ref = reference_batches(data["x"], p, 4)
    for k, (mean_name, var_name) in enumerate([("m1", "v1"), ("m2", "v2")]):
        mean = var = None
        for batch in ref:
            mu, v, m = batch[k]
            v = v * m / (m - 1)
            if mean is None:
                mean, var = mu, v
            else:
                mean, var = 0.7 * mean + 0.3 * mu, 0.7 * var + 0.3 * v
        np.testing.assert_allclose(_init(new, mean_name), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_init(new, var_name), var, rtol=1e-4, atol=1e-5)


def test_shared_initializer_not_overwritten():
    model, p = make_model(shared=True)
    new, info = calibrate_onnx(model, _data(8), batch_size=4)
    np.testing.assert_array_equal(_init(new, "m2"), p["m2"])
    bn2 = next(n for n in new.graph.node if n.name == "bn2")
    assert bn2.input[3] != "m2"
    assert not np.allclose(_init(new, bn2.input[3]), p["m2"])
    assert any("shared" in note for note in info["notes"])
    onnx.checker.check_model(new)


def test_batch_of_one_sample_still_counts_when_spatial():
    model, _ = make_model()
    _, info = calibrate_onnx(model, _data(5), batch_size=2)
    assert info["layers"][0]["batches"] == 3


def test_bad_options():
    model, _ = make_model()
    with pytest.raises(InputError):
        calibrate_onnx(model, _data(4), batch_size=0)
    with pytest.raises(InputError):
        calibrate_onnx(model, _data(4), batch_size=2, estimator="median")


# ------------------------------------------------------------------------------------------------- data loading

def test_npz_and_directory(tmp_path):
    model, _ = make_model()
    x = _data(6)["x"]
    np.savez(tmp_path / "d.npz", x=x)
    np.testing.assert_array_equal(load_calibration_data(tmp_path / "d.npz", model)["x"], x)
    d = tmp_path / "dir"
    d.mkdir()
    np.save(d / "x.npy", x)
    np.testing.assert_array_equal(load_calibration_data(d, model)["x"], x)
    d2 = tmp_path / "dir2"
    d2.mkdir()
    np.savez(d2 / "a.npz", x=x[:2])
    np.savez(d2 / "b.npz", x=x[2:])
    np.testing.assert_array_equal(load_calibration_data(d2, model)["x"], x)


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros((2, C_IN, HW, HW), np.float32)}, "missing"),
    ({"x": np.zeros((2, C_IN, HW, HW), np.float32), "z": np.zeros(2)}, "unknown"),
    ({"x": np.zeros((2, C_IN, HW), np.float32)}, "rank"),
    ({"x": np.zeros((2, C_IN + 1, HW, HW), np.float32)}, "axis 1"),
    ({"x": np.zeros((2, C_IN, HW, HW), np.int64)}, "float"),
])
def test_npz_validation_errors(tmp_path, arrays, message):
    model, _ = make_model()
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(InputError, match=message) as exc:
        load_calibration_data(tmp_path / "d.npz", model)
    assert "\n" not in str(exc.value)


def test_unequal_lengths(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])], "g",
        [helper.make_tensor_value_info("a", TP.FLOAT, ["N", 2]), helper.make_tensor_value_info("b", TP.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("c", TP.FLOAT, ["N", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    np.savez(tmp_path / "d.npz", a=np.zeros((3, 2), np.float32), b=np.zeros((4, 2), np.float32))
    with pytest.raises(InputError, match="different numbers"):
        load_calibration_data(tmp_path / "d.npz", model)


def test_corrupt_and_missing_files(tmp_path):
    model, _ = make_model()
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(InputError):
        load_calibration_data(tmp_path / "bad.npz", model)
    d = tmp_path / "dir"
    d.mkdir()
    (d / "x.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(InputError):
        load_calibration_data(d, model)
    with pytest.raises(InputError, match="no such"):
        load_calibration_data(tmp_path / "absent.npz", model)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError):
        load_calibration_data(tmp_path / "obj.npy", model)


def _bn_only_model(dtype_elem, np_dtype, mean_from_node=False):
    c = 3
    inits = [numpy_helper.from_array(np.ones(c, np_dtype), "s"), numpy_helper.from_array(np.zeros(c, np_dtype), "t"),
             numpy_helper.from_array(np.full(c, 5, np_dtype), "v")]
    nodes = []
    if mean_from_node:
        nodes.append(helper.make_node("Constant", [], ["m"], value=numpy_helper.from_array(np.zeros(c, np_dtype))))
    else:
        inits.append(numpy_helper.from_array(np.full(c, 9, np_dtype), "m"))
    nodes.append(helper.make_node("BatchNormalization", ["x", "s", "t", "m", "v"], ["y"], name="bn"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype_elem, ["N", c, 4])],
                              [helper.make_tensor_value_info("y", dtype_elem, ["N", c, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_float16_bn_computed_in_float32():
    model = _bn_only_model(TP.FLOAT16, np.float16)
    x = np.random.default_rng(3).normal(2.0, 1.5, size=(8, 3, 4)).astype(np.float16)
    new, _ = calibrate_onnx(model, {"x": x}, batch_size=4)
    xs = x.astype(np.float64)
    parts = [xs[:4], xs[4:]]
    mean = np.mean([b.mean(axis=(0, 2)) for b in parts], axis=0)
    var = np.mean([b.var(axis=(0, 2)) for b in parts], axis=0) * 16 / 15
    assert _init(new, "m").dtype == np.float16
    np.testing.assert_allclose(_init(new, "m"), mean, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(_init(new, "v"), var, rtol=2e-3)
    onnx.checker.check_model(new)


def test_bn_with_non_initializer_stats_is_skipped_with_note():
    model = _bn_only_model(TP.FLOAT, np.float32, mean_from_node=True)
    new, info = calibrate_onnx(model, {"x": np.ones((4, 3, 4), np.float32)}, batch_size=2)
    assert info["layers"] == []
    assert any("not constant initializers" in n for n in info["notes"])
    assert new.SerializeToString() == model.SerializeToString()


def test_too_small_batches_refused():
    model = _bn_only_model(TP.FLOAT, np.float32)
    graph_input = model.graph.input[0].type.tensor_type.shape.dim
    graph_input[2].dim_value = 1  # one value per channel per sample
    with pytest.raises(InputError, match="batch size"):
        calibrate_onnx(model, {"x": np.ones((3, 3, 1), np.float32)}, batch_size=1)


def test_cli_calibrate_then_fold(tmp_path):
    """`bnfold calibrate` writes the library's statistics; the result folds and verifies; bad data is exit 2."""
    import subprocess
    import sys

    from onnx import TensorProto, helper, numpy_helper

    from bnfold.onnx.calibrate import calibrate_onnx, load_calibration_data

    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "W"),
             numpy_helper.from_array(np.ones(4, np.float32), "g"), numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(np.full(4, 5.0, np.float32), "m"),
             numpy_helper.from_array(np.full(4, 9.0, np.float32), "v")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((10, 3, 4, 4)).astype(np.float32))

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True)
        assert "Traceback" not in proc.stderr
        return proc

    proc = run("calibrate", tmp_path / "m.onnx", "--data", tmp_path / "data.npz", "--batch-size", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "m.calibrated.onnx"
    expected, _ = calibrate_onnx(model, load_calibration_data(tmp_path / "data.npz", model), batch_size=4)
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    for t in expected.graph.initializer:
        np.testing.assert_array_equal(written[t.name], numpy_helper.to_array(t))
    assert not np.allclose(written["v"], 9.0)  # the stored statistics really changed
    assert run(out, "-o", tmp_path / "f.onnx").returncode == 0  # ready to fold, and it verifies

    np.savez(tmp_path / "bad.npz", y=np.zeros((2, 3, 4, 4), np.float32))
    proc = run("calibrate", tmp_path / "m.onnx", "--data", tmp_path / "bad.npz", "-o", tmp_path / "never.onnx")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("bnfold: error:")
    assert not (tmp_path / "never.onnx").exists()
