"""bnfold.audit: findings per BN layer from ONNX models, torch checkpoints and safetensors files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.audit import AuditReport, Finding, LayerAudit, audit, plot
from bnfold.errors import InputError

torch = pytest.importorskip("torch")

C = 4


def healthy(c: int = C, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"weight": rng.uniform(0.5, 1.5, c).astype(np.float32),
            "bias": rng.normal(0, 0.1, c).astype(np.float32),
            "running_mean": rng.normal(0, 0.5, c).astype(np.float32),
            "running_var": rng.uniform(0.5, 2.0, c).astype(np.float32)}


def codes(layer: LayerAudit) -> set[str]:
    return {f.code for f in layer.findings}


# ------------------------------------------------------------------------------------------- builders


def bn_onnx(path, bn: dict, *, producer: str | None = None, weight=None, eps=None, as_constant=False,
            graph_input_mean=False, matmul_rank: int = 2):
    """X -> [producer] -> BatchNormalization -> Y, parameters as initializers (or Constant nodes)."""
    c = bn["running_mean"].shape[0]
    nodes, inits = [], []
    bn_in = "X"
    x_shape = [1, c, 3, 3]
    if producer == "Conv":
        inits.append(numpy_helper.from_array(weight, "W"))
        nodes.append(helper.make_node("Conv", ["X", "W"], ["h"], name="conv", pads=[1, 1, 1, 1]))
        x_shape = [1, weight.shape[1], 3, 3]
        bn_in = "h"
    elif producer == "Gemm":
        inits.append(numpy_helper.from_array(weight, "W"))
        nodes.append(helper.make_node("Gemm", ["X", "W"], ["h"], name="gemm", transB=1))
        x_shape = [1, weight.shape[1]]
        bn_in = "h"
    elif producer == "MatMul":  # rank 2: [1, K] @ [K, C]; rank 3: [1, C, K] @ [K, C] (BN's axis 1 is not W's)
        inits.append(numpy_helper.from_array(weight, "W"))
        nodes.append(helper.make_node("MatMul", ["X", "W"], ["h"], name="matmul"))
        x_shape = [1, weight.shape[0]] if matmul_rank == 2 else [1, c, weight.shape[0]]
        bn_in = "h"
    names = {"weight": "s", "bias": "b", "running_mean": "m", "running_var": "v"}
    for key, name in names.items():
        if key == "running_mean" and graph_input_mean:
            continue
        tensor = numpy_helper.from_array(bn[key], name)
        if as_constant:
            nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        else:
            inits.append(tensor)
    attrs = {} if eps is None else {"epsilon": eps}
    nodes.append(helper.make_node("BatchNormalization", [bn_in, "s", "b", "m", "v"], ["Y"], name="bn", **attrs))
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    if graph_input_mean:
        inputs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [c]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.save(model, str(path))
    return path


def state_dict(layers: dict[str, dict], nbt: dict[str, int] | None = None) -> OrderedDict:
    sd = OrderedDict()
    sd["conv1.weight"] = torch.randn(C, 3, 3, 3)
    for prefix, bn in layers.items():
        for key, value in bn.items():
            sd[f"{prefix}.{key}"] = torch.from_numpy(np.asarray(value))
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor((nbt or {}).get(prefix, 100))
    sd["fc.weight"] = torch.randn(10, C)
    sd["fc.bias"] = torch.randn(10)
    return sd


def audit_one(tmp_path, bn: dict, **kwargs) -> LayerAudit:
    report = audit(bn_onnx(tmp_path / "m.onnx", bn, **kwargs))
    assert len(report.layers) == 1, report.notes
    return report.layers[0]


# ------------------------------------------------------------------------------------------- findings


def test_healthy_layer_has_no_findings(tmp_path):
    layer = audit_one(tmp_path, healthy())
    assert layer.findings == []
    assert layer.channels == C and layer.num_batches_tracked is None
    bn = healthy()
    assert layer.ranges["running_var"] == pytest.approx([bn["running_var"].min(), bn["running_var"].max()])
    scale = bn["weight"].astype(np.float64) / np.sqrt(bn["running_var"].astype(np.float64) + np.float32(1e-5))
    assert layer.folded_scale == pytest.approx((scale.min(), scale.max()))


def test_never_updated(tmp_path):
    bn = healthy()
    bn["running_mean"][:] = 0
    bn["running_var"][:] = 1
    layer = audit_one(tmp_path, bn)
    assert codes(layer) == {"never-updated"}
    assert layer.findings[0].severity == "warning"


def test_never_updated_from_num_batches_tracked(tmp_path):
    path = tmp_path / "c.pt"
    torch.save(state_dict({"bn1": healthy(), "bn2": healthy(seed=1)}, nbt={"bn1": 0}), path)
    layers = {layer.name: layer for layer in audit(path).layers}
    assert codes(layers["bn1"]) == {"never-updated"} and "num_batches_tracked is 0" in layers["bn1"].findings[0].detail
    assert layers["bn1"].num_batches_tracked == 0
    assert codes(layers["bn2"]) == set() and layers["bn2"].num_batches_tracked == 100


@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite(tmp_path, key, bad):
    bn = healthy()
    bn[key][2] = bad
    layer = audit_one(tmp_path, bn)
    assert "non-finite" in codes(layer)
    finding = next(f for f in layer.findings if f.code == "non-finite")
    assert finding.severity == "error" and "channel 2" in finding.detail and "\n" not in finding.detail
    assert all(np.isfinite(v) for pair in layer.ranges.values() if pair for v in pair)


def test_negative_variance(tmp_path):
    bn = healthy()
    bn["running_var"][1] = -0.5
    layer = audit_one(tmp_path, bn)
    assert codes(layer) == {"negative-variance"}
    assert layer.findings[0].severity == "error" and "channels 1" not in layer.findings[0].detail
    assert "channel 1" in layer.findings[0].detail


def test_tiny_variance_lists_at_most_five_channels(tmp_path):
    bn = healthy(c=8)
    bn["running_var"][:7] = 1e-9
    layer = audit_one(tmp_path, bn)
    assert codes(layer) == {"tiny-variance"}
    detail = layer.findings[0].detail
    assert layer.findings[0].severity == "warning"
    assert "1e-06" in detail and "0, 1, 2, 3, 4," in detail and "5," not in detail and "7 in all" in detail


def test_dead_channel(tmp_path):
    bn = healthy()
    bn["weight"][3] = 0.0
    layer = audit_one(tmp_path, bn)
    assert codes(layer) == {"dead-channel"}
    assert layer.findings[0].severity == "info" and "channel 3" in layer.findings[0].detail


def test_fp16_overflow_generic_rule(tmp_path):
    bn = healthy()
    bn["running_var"][0] = 1e-8  # scale ~ 1/sqrt(1e-5) ~ 316: fine
    assert "fp16-overflow" not in codes(audit_one(tmp_path, bn))
    bn["weight"][0] = 50.0  # scale ~ 15800 > 65504/16
    layer = audit_one(tmp_path, bn)
    finding = next(f for f in layer.findings if f.code == "fp16-overflow")
    assert finding.severity == "error" and "magnitude 16" in finding.detail


def test_fp16_overflow_uses_the_conv_weight(tmp_path):
    bn = healthy()
    bn["weight"][1] = 50.0
    bn["running_var"][1] = 1e-8  # scale ~ 15800: the generic rule would flag it
    small = np.full((C, 2, 3, 3), 0.1, np.float32)  # 0.1 * 16000 < 65504: actual folded weight fits
    assert "fp16-overflow" not in codes(audit_one(tmp_path, bn, producer="Conv", weight=small))
    big = small.copy()
    big[1, 0, 0, 0] = 10.0  # 10 * 15800 > 65504
    layer = audit_one(tmp_path, bn, producer="Conv", weight=big)
    finding = next(f for f in layer.findings if f.code == "fp16-overflow")
    assert "Conv" in finding.detail and "channel 1" in finding.detail


def test_fp16_overflow_uses_the_gemm_weight(tmp_path):
    bn = healthy()
    bn["running_var"][2] = 0.0
    bn["weight"][2] = 0.5  # scale 0.5/sqrt(1e-5) ~ 158
    w = np.full((C, 5), 0.5, np.float32)  # transB=1: [N, K]
    assert "fp16-overflow" not in codes(audit_one(tmp_path, bn, producer="Gemm", weight=w))
    w[2, 4] = 1000.0  # 1000 * 158 > 65504
    assert "fp16-overflow" in codes(audit_one(tmp_path, bn, producer="Gemm", weight=w))


@pytest.mark.parametrize("rank", [2, 3])
def test_fp16_overflow_uses_the_matmul_weight_only_on_a_rank_2_activation(tmp_path, rank):
    """MatMul's output channels are BN's axis 1 only for a rank-2 product (the op descriptor says so): on a rank-3
    activation the audit must not use the weight of the wrong axis, and falls back to the generic bound."""
    bn = healthy()
    bn["weight"][1] = 50.0
    bn["running_var"][1] = 1e-8  # scale ~ 15800: above the generic bound, harmless with this weight
    w = np.full((C, C), 0.1, np.float32)  # [K, C]; square, so a wrong axis would fit the channel count
    found = [f for f in audit_one(tmp_path, bn, producer="MatMul", weight=w, matmul_rank=rank).findings
             if f.code == "fp16-overflow"]
    if rank == 2:
        assert found == []  # 0.1 * 15800 fits float16: the actual folded weight was checked
    else:
        assert len(found) == 1 and "magnitude" in found[0].detail and "MatMul" not in found[0].detail


def test_onnx_epsilon_and_constant_nodes(tmp_path):
    bn = healthy()
    bn["running_var"][:] = 0.0
    layer = audit_one(tmp_path, bn, eps=1e-3, as_constant=True)
    expected = bn["weight"].astype(np.float64) / np.sqrt(float(np.float32(1e-3)))
    assert layer.folded_scale == pytest.approx((expected.min(), expected.max()))


def test_onnx_non_constant_parameters_noted(tmp_path):
    report = audit(bn_onnx(tmp_path / "m.onnx", healthy(), graph_input_mean=True))
    assert report.layers == [] and any("not audited" in n for n in report.notes)


def test_onnx_subgraph_bn(tmp_path):
    bn = healthy()
    bn["running_var"][0] = -1.0
    inits = [numpy_helper.from_array(bn[k], n) for k, n in
             (("weight", "s"), ("bias", "b"), ("running_mean", "m"), ("running_var", "v"))]
    branch = helper.make_graph([helper.make_node("BatchNormalization", ["X", "s", "b", "m", "v"], ["y1"],
                                                 name="inner_bn")], "then", [],
                               [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["X"], ["y2"])], "else", [],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["cond"], ["Y"], name="if", then_branch=branch, else_branch=other)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, C, 2, 2]),
                                            helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(path))
    report = audit(path)
    assert [layer.name for layer in report.layers] == ["if/then_branch/inner_bn"]
    assert codes(report.layers[0]) == {"negative-variance"} and report.exit_code == 1


# ------------------------------------------------------------------------------------------- torch / safetensors


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": []}},
    lambda sd: {"model": OrderedDict((f"module.{k}", v) for k, v in sd.items())},
    lambda sd: {"checkpoint": {"net": sd}},
])
def test_torch_checkpoint_nesting(tmp_path, wrap):
    bad = healthy(seed=1)
    bad["running_var"][0] = -1.0
    sd = state_dict({"bn1": healthy(), "layer1.0.bn2": bad})
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(sd), path)
    report = audit(path)
    assert report.kind == "torch"
    assert [layer.name for layer in report.layers] == ["bn1", "layer1.0.bn2"]
    assert codes(report.layers[0]) == set() and codes(report.layers[1]) == {"negative-variance"}
    assert report.exit_code == 1
    assert any("epsilon" in n for n in report.notes)


def test_torch_affine_false_and_ema_noted(tmp_path):
    bn = healthy()
    del bn["weight"], bn["bias"]
    sd = state_dict({"bn": bn})
    path = tmp_path / "c.ckpt"
    torch.save({"model": sd, "model_ema": state_dict({"bn": healthy()})}, path)
    report = audit(path)
    layer = report.layers[0]
    assert layer.ranges["weight"] is None and layer.findings == []
    scale = 1 / np.sqrt(bn["running_var"].astype(np.float64) + 1e-5)
    assert layer.folded_scale == pytest.approx((scale.min(), scale.max()))
    assert any("affine=False" in n for n in report.notes)
    assert any("model_ema" in n and "not audited" in n for n in report.notes)


def test_torch_real_module_state_dict(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4, affine=False))
    path = tmp_path / "m.pt"
    torch.save(torch.nn.DataParallel(model).state_dict(), path)
    report = audit(path)
    assert [(layer.name, layer.channels) for layer in report.layers] == [("1", 8), ("4", 4)]
    assert all(codes(layer) == {"never-updated"} for layer in report.layers)  # freshly initialised
    assert report.exit_code == 0


class _Malicious:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_torch_arbitrary_unpickling_is_refused(tmp_path):
    marker = tmp_path / "executed"
    evil = _Malicious()
    evil.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state_dict({"bn": healthy()}), "extra": evil}, path)
    assert not marker.exists()
    with pytest.raises(InputError, match="arbitrary unpickling") as info:
        audit(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_safetensors(tmp_path):
    from safetensors.numpy import save_file

    bad = healthy()
    bad["weight"][0] = 0.0
    tensors = {f"bn1.{k}": v for k, v in healthy().items()}
    tensors.update({f"module.block.bn.{k}": v for k, v in bad.items()})
    tensors["block.bn.num_batches_tracked"] = np.array(7, dtype=np.int64)
    tensors["conv.weight"] = np.ones((C, 3, 1, 1), np.float32)
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    report = audit(path)
    assert report.kind == "safetensors"
    layers = {layer.name: layer for layer in report.layers}
    assert set(layers) == {"bn1", "block.bn"}
    assert codes(layers["bn1"]) == set() and layers["bn1"].num_batches_tracked is None
    assert codes(layers["block.bn"]) == {"dead-channel"} and layers["block.bn"].num_batches_tracked == 7
    assert report.exit_code == 0


def test_safetensors_bfloat16(tmp_path):
    from safetensors.torch import save_file

    bn = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in healthy().items()}
    bn["running_var"][1] = -2.0
    path = tmp_path / "bf16.safetensors"
    save_file({f"bn.{k}": v for k, v in bn.items()}, str(path))
    layer = audit(path).layers[0]
    assert codes(layer) == {"negative-variance"}
    assert layer.ranges["running_var"][0] == -2.0


# ------------------------------------------------------------------------------------------- report


def test_report_dict_json_and_exit_code(tmp_path):
    bad = healthy()
    bad["running_var"][0] = np.nan
    report = audit(bn_onnx(tmp_path / "m.onnx", bad))
    d = report.to_dict()
    json.loads(json.dumps(d, allow_nan=False))
    assert set(d) == {"source", "kind", "layers", "notes"} and d["kind"] == "onnx"
    layer = d["layers"][0]
    assert set(layer) == {"name", "channels", "num_batches_tracked", "ranges", "folded_scale", "findings"}
    assert set(layer["ranges"]) == {"weight", "bias", "running_mean", "running_var"}
    assert set(layer["findings"][0]) == {"code", "severity", "detail"}
    assert report.has_errors and report.exit_code == 1
    lines = report.summary_lines()
    assert any("non-finite" in line for line in lines) and all("\n" not in line for line in lines)

    ok = audit(bn_onnx(tmp_path / "ok.onnx", healthy()))
    assert not ok.has_errors and ok.exit_code == 0
    warn = AuditReport("x", "torch", [LayerAudit("l", 1, 0, {}, None, [Finding("never-updated", "warning", "d")])])
    assert warn.exit_code == 0


def test_missing_data_is_input_error(tmp_path):
    with pytest.raises(InputError):
        audit(bn_onnx(tmp_path / "m.onnx", healthy()), data=tmp_path / "d.npz")


def test_plot_writes_png(tmp_path):
    bad = healthy()
    bad["running_var"][0] = -1.0
    sd = state_dict({"bn1": healthy(), "bn2": bad, "bn3": {**healthy(), "running_var": np.zeros(C, np.float32)}})
    path = tmp_path / "c.pt"
    torch.save(sd, path)
    report = audit(path)
    out = tmp_path / "audit.png"
    plot(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind
    empty = tmp_path / "empty.png"
    plot(AuditReport("x.onnx", "onnx"), empty)
    assert empty.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError):
        plot(report, tmp_path / "missing-dir" / "a.png")


# ------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("name", ["x.pt", "x.safetensors", "x.onnx", "x.ckpt"])
@pytest.mark.parametrize("content", [b"", os.urandom(2048), b"PK\x03\x04" + os.urandom(100)])
def test_bad_inputs_are_input_errors(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        audit(path)
    assert "\n" not in str(info.value)


def test_truncated_and_unknown_inputs(tmp_path):
    path = tmp_path / "c.pt"
    torch.save(state_dict({"bn": healthy()}), path)
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for p in (truncated, tmp_path / "nope.pt", tmp_path, tmp_path / "x.txt"):
        if p.name == "x.txt":
            p.write_text("hello world")
        with pytest.raises(InputError):
            audit(p)
    st = tmp_path / "t.safetensors"
    from safetensors.numpy import save_file

    save_file({"bn.running_mean": np.zeros(3, np.float32)}, str(st))
    st.write_bytes(st.read_bytes()[:-4])
    with pytest.raises(InputError):
        audit(st)


def test_importing_bnfold_audit_does_not_import_torch():
    code = ("import sys, bnfold, bnfold.audit; "
            "bad = [m for m in ('torch', 'safetensors', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_onnx_layer_named_by_module_path(tmp_path):
    bn = healthy()
    inits = [numpy_helper.from_array(bn[k], f"layer1.0.bn1.{k}") for k in bn]
    node = helper.make_node("BatchNormalization", ["X"] + [t.name for t in inits], ["Y"],
                            name="node__native_batch_norm_legit_no_training__0")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, C, 2, 2])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    path = tmp_path / "named.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(path))
    assert [layer.name for layer in audit(path).layers] == ["layer1.0.bn1"]


def test_cli_audit_exit_codes(tmp_path):
    bad = healthy()
    bad["running_var"][0] = -1.0
    path = tmp_path / "c.pt"
    torch.save(state_dict({"bn": bad}), path)
    run = subprocess.run([sys.executable, "-m", "bnfold", "audit", str(path), "--json"], capture_output=True,
                         text=True, check=False)
    assert run.returncode == 1, run.stderr
    assert json.loads(run.stdout)["layers"][0]["findings"][0]["code"] == "negative-variance"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    run = subprocess.run([sys.executable, "-m", "bnfold", "audit", str(junk)], capture_output=True, text=True,
                         check=False)
    assert run.returncode == 2 and run.stderr.count("\n") == 1


def test_audit_data_reports_drift_against_fresh_statistics(tmp_path):
    """--data: stored statistics far from the data's are a stats-drift warning; calibrated ones are not."""
    from onnx import TensorProto, helper, numpy_helper

    from bnfold.onnx.calibrate import calibrate_onnx, load_calibration_data

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "W"),
             numpy_helper.from_array(np.ones(4, np.float32), "g"), numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(np.full(4, 5.0, np.float32), "m"),
             numpy_helper.from_array(np.full(4, 9.0, np.float32), "v")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"]),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.save(model, str(tmp_path / "stale.onnx"))
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((64, 3, 4, 4)).astype(np.float32))

    stale = audit(tmp_path / "stale.onnx", data=tmp_path / "data.npz")
    [layer] = stale.layers
    assert [f.code for f in layer.findings] == ["stats-drift"] and layer.findings[0].severity == "warning"
    # independent check of the reported shift: the fresh mean of channel k is the mean of W[k] . x over the data
    x = np.load(tmp_path / "data.npz")["x"].astype(np.float64)
    w = numpy_helper.to_array(inits[0]).astype(np.float64)[:, :, 0, 0]
    conv = np.einsum("kc,nchw->nkhw", w, x)
    fresh_mean = conv.mean(axis=(0, 2, 3))
    assert layer.drift["mean_shift_max"] > 0.5
    assert np.isclose(layer.drift["mean_shift_max"],
                      np.max(np.abs(5.0 - fresh_mean) / np.sqrt(layer_fresh_var(conv) + float(np.float32(1e-5)))),
                      rtol=1e-3)
    json.dumps(stale.to_dict(), allow_nan=False)

    calibrated, _ = calibrate_onnx(model, load_calibration_data(tmp_path / "data.npz", model), batch_size=32)
    onnx.save(calibrated, str(tmp_path / "fresh.onnx"))
    fresh = audit(tmp_path / "fresh.onnx", data=tmp_path / "data.npz")
    assert fresh.layers[0].findings == [] and fresh.layers[0].drift["mean_shift_max"] < 1e-3
    with pytest.raises(InputError, match="ONNX"):
        torch = pytest.importorskip("torch")
        torch.save({"bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2)}, tmp_path / "c.pt")
        audit(tmp_path / "c.pt", data=tmp_path / "data.npz")


def layer_fresh_var(conv: np.ndarray) -> np.ndarray:
    """Algorithm 2 over batches of 32 (the audit's batch size) for equal batches: m/(m-1) * mean of biased vars."""
    batches = [conv[i:i + 32] for i in range(0, len(conv), 32)]
    m = batches[0].shape[0] * conv.shape[2] * conv.shape[3]
    return m / (m - 1) * np.mean([b.var(axis=(0, 2, 3)) for b in batches], axis=0)
