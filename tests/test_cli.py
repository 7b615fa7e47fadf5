"""The bnfold command end to end: sample models, exit codes, JSON, atomic output, bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "sample_models").glob("*.onnx"))
SAMPLES = [p for p in SAMPLES if not p.name.endswith(".folded.onnx")]
RESNET = ROOT / "sample_models" / "resnet_small.onnx"


def run_cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ort_run(model_bytes_or_path, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model_bytes_or_path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(model_path: Path, batch: int = 2):
    model = onnx.load(str(model_path))
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(123)
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def test_samples_exist():
    assert len(SAMPLES) >= 5
    for p in SAMPLES:
        assert p.stat().st_size < 2 * 1024 * 1024
        assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(p)).graph.node) > 0


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_sample_models_fold_completely(sample, tmp_path):
    before = sha(sample)
    out = tmp_path / "folded.onnx"
    proc = run_cli(sample, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout holds only the JSON
    assert report["bn_before"] > 0 and report["bn_after"] == 0
    assert len(report["folded"]) == report["bn_before"]
    assert report["verify"]["cpu"]["passed"] is True
    assert report["output"] == str(out)
    assert sha(sample) == before  # the input is never modified
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    original = onnx.load(str(sample))
    assert [(i.name, i.type) for i in folded.graph.input] == [(i.name, i.type) for i in original.graph.input]
    assert [(o.name, o.type) for o in folded.graph.output] == [(o.name, o.type) for o in original.graph.output]
    # independent of bnfold's verifier: onnxruntime on both files, fresh inputs
    feeds = random_feeds(sample)
    for a, b in zip(ort_run(str(sample), feeds), ort_run(str(out), feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(a).max())))


def test_default_output_name_deterministic_and_idempotent(tmp_path):
    src = tmp_path / "resnet.onnx"
    src.write_bytes(RESNET.read_bytes())
    assert run_cli(src, "--no-verify").returncode == 0
    first = tmp_path / "resnet.folded.onnx"
    digest = sha(first)
    assert run_cli(src, "--no-verify").returncode == 0
    assert sha(first) == digest  # byte-identical across runs
    again = tmp_path / "again.onnx"
    proc = run_cli(first, "-o", again, "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["folded"] == []
    assert sha(again) == digest  # folding twice changes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.onnx", "resnet.folded.onnx", "resnet.onnx"]


def test_text_summary(tmp_path):
    proc = run_cli(RESNET, "-o", tmp_path / "o.onnx")
    assert proc.returncode == 0
    assert "BatchNormalization nodes:" in proc.stdout and "verify cpu: PASSED" in proc.stdout
    assert "BatchNormalization 10 -> 0" in proc.stderr  # logs go to stderr


def test_fold_subcommand_is_the_same(tmp_path):
    proc = run_cli("fold", RESNET, "-o", tmp_path / "o.onnx", "--no-verify", "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["verify"] is None


def test_verification_failure_writes_nothing(tmp_path):
    out = tmp_path / "never.onnx"
    # zero tolerance: float32 rounding of the folded weights differs from running BN, so the check must fail
    proc = run_cli(RESNET, "-o", out, "--atol", "0", "--rtol", "0", "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["output"] is None and report["verify"]["cpu"]["passed"] is False
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_skip_rule_leaves_bn(tmp_path):
    proc = run_cli(RESNET, "-o", tmp_path / "o.onnx", "--skip", "conv-bn", "--json")
    assert proc.returncode == 0
    report = json.loads(proc.stdout)
    assert report["bn_after"] == report["bn_before"]
    assert all(s["reason"] for s in report["skipped"])


def test_input_shape_for_dynamic_batch(tmp_path):
    mlp = ROOT / "sample_models" / "mlp_bn1d.onnx"
    name = onnx.load(str(mlp)).graph.input[0].name
    proc = run_cli(mlp, "-o", tmp_path / "o.onnx", "--input-shape", f"{name}=5x64", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verify"]["cpu"]["passed"]


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    cases = {}
    cases["missing"] = tmp_path / "missing.onnx"
    (tmp_path / "empty.onnx").write_bytes(b"")
    cases["empty"] = tmp_path / "empty.onnx"
    rng = np.random.default_rng(0)
    (tmp_path / "random.onnx").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    cases["random bytes"] = tmp_path / "random.onnx"
    data = RESNET.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    cases["truncated"] = tmp_path / "truncated.onnx"
    (tmp_path / "text.onnx").write_text("this is not a model\n")
    cases["text"] = tmp_path / "text.onnx"
    (tmp_path / "tensor.onnx").write_bytes(numpy_helper.from_array(np.ones(3, np.float32), "t").SerializeToString())
    cases["protobuf that is not a model"] = tmp_path / "tensor.onnx"
    cases["directory"] = tmp_path
    dangling = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["nowhere"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    onnx.save(dangling, str(tmp_path / "dangling.onnx"))
    cases["dangling input"] = tmp_path / "dangling.onnx"
    cycle = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])]))
    onnx.save(cycle, str(tmp_path / "cycle.onnx"))
    cases["cycle"] = tmp_path / "cycle.onnx"
    return cases


def test_bad_input_exit_2_one_line(tmp_path):
    for what, path in _bad_inputs(tmp_path).items():
        before = sorted(p.name for p in tmp_path.iterdir())
        proc = run_cli(path, "-o", tmp_path / "out.onnx")
        assert proc.returncode == 2, (what, proc.stderr)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("bnfold: error:"), (what, proc.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, what  # nothing left behind


def test_unwritable_output_and_usage_errors(tmp_path):
    proc = run_cli(RESNET, "-o", tmp_path / "no" / "such" / "dir.onnx", "--no-verify")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli(RESNET, "--input-shape", "nonsense", "--no-verify", "-o", tmp_path / "o.onnx")
    assert proc.returncode == 2 and "NAME=" in proc.stderr
    proc = run_cli(RESNET, "--skip", "no-such-rule")
    assert proc.returncode == 2
    proc = run_cli(RESNET, "--providers", "tpu", "-o", tmp_path / "o.onnx")
    assert proc.returncode == 2 and "unknown provider" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_requested_cuda_unavailable_is_exit_2(tmp_path):
    proc = run_cli(RESNET, "--providers", "cpu,cuda", "-o", tmp_path / "o.onnx")
    assert proc.returncode == 2 and "not available" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_output_that_cannot_be_a_file(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for target in (tmp_path, blocker / "o.onnx"):  # an existing directory; a path under a regular file
        proc = run_cli(RESNET, "-o", target, "--no-verify")
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_import_bnfold_is_light():
    code = "import sys, bnfold; print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_external_data_in_and_out(tmp_path):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    model = onnx.load(str(RESNET))
    onnx.save(model, str(src_dir / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.weights", size_threshold=0)
    assert (src_dir / "m.weights").exists()
    before = {p.name: sha(p) for p in src_dir.iterdir()}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli(src_dir / "m.onnx", "-o", out_dir / "f.onnx", "--json")
    assert proc.returncode == 0, proc.stderr
    assert {p.name: sha(p) for p in src_dir.iterdir()} == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["f.onnx", "f.onnx.data"]
    skeleton = onnx.load(str(out_dir / "f.onnx"), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in skeleton.graph.initializer)
    feeds = random_feeds(RESNET)
    for a, b in zip(ort_run(str(RESNET), feeds), ort_run(str(out_dir / "f.onnx"), feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    # a missing external-data file is bad input, not a crash
    (src_dir / "m.weights").unlink()
    proc = run_cli(src_dir / "m.onnx", "-o", out_dir / "g.onnx")
    assert proc.returncode == 2 and "external data" in proc.stderr
    assert not (out_dir / "g.onnx").exists()


def test_simplify_keeps_bn_for_bnfold(tmp_path):
    proc = run_cli(RESNET, "--simplify", "-o", tmp_path / "s.onnx", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    # onnxsim ran with its own BN fusion off: every BN is still there for bnfold to fold and report
    assert report["bn_before"] == 10 and report["bn_after"] == 0 and len(report["folded"]) == 10
    assert report["verify"]["cpu"]["passed"]
    simplified = onnx.load(str(tmp_path / "s.onnx"))
    assert len(simplified.graph.node) < len(onnx.load(str(RESNET)).graph.node) - 10
