"""bnfold.pipeline.fold_path (what the command runs) from Python: the folded file computes what the float64
reference computes for the original, dry runs and failed verification write nothing, streams get the file's bytes,
and jobs_for maps inputs to outputs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import bnfold
from bnfold.errors import InputError
from bnfold.onnx.fold import fold_file
from bnfold.pipeline import FoldResult, default_output, fold_path, jobs_for
from bnfold.report import ExitCode

from reference import run_reference

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "sample_models" / "mlp_bn1d.onnx"
TCN = ROOT / "sample_models" / "tcn1d.onnx"


def ort_outputs(path: Path, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("verify", [True, False])
def test_folded_file_matches_the_float64_reference(tmp_path, verify):
    out = tmp_path / "o.onnx"
    result = fold_path(MLP, out, verify=verify, providers=["cpu"] if verify else None)
    assert isinstance(result, FoldResult) and result.written and result.output == out
    assert result.exit_code == ExitCode.OK and result.report.bn_before == 3 and result.report.bn_after == 0
    assert (result.verification is not None) == verify
    assert set(result.seconds) == ({"load", "fold", "verify", "save"} if verify else {"load", "fold", "save"})
    x = np.random.default_rng(5).standard_normal((7, 64)).astype(np.float32)
    want = run_reference(onnx.load(str(MLP)), {"x": x})
    [got] = ort_outputs(out, {"x": x})
    [ref] = want.values()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


def test_python_api_and_thin_wrapper_write_the_same_bytes(tmp_path):
    assert bnfold.fold_path is fold_path
    fold_path(TCN, tmp_path / "a.onnx", verify=False)
    report = fold_file(TCN, tmp_path / "b.onnx")  # bnfold.onnx.fold.fold_file: the pipeline without verification
    assert report.bn_before == 4 and report.bn_after == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_default_output_is_beside_the_input(tmp_path):
    src = tmp_path / "Model.ONNX"
    src.write_bytes(MLP.read_bytes())
    result = fold_path(src, verify=False)
    assert result.output == tmp_path / "Model.folded.onnx" and result.output.exists()
    assert default_output("a/b.pt2") == Path("a/b.folded.pt2")
    assert default_output("model") == Path("model.folded.onnx")


def test_dry_run_writes_nothing(tmp_path):
    result = fold_path(MLP, tmp_path / "o.onnx", verify=False, write=False)
    assert not result.written and result.to_dict()["output"] is None and len(result.report.folded) == 3
    assert not result.nothing_to_fold  # what --check fails on
    assert list(tmp_path.iterdir()) == []
    fold_path(MLP, tmp_path / "o.onnx", verify=False)
    assert fold_path(tmp_path / "o.onnx", verify=False, write=False).nothing_to_fold
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]


def test_failed_verification_writes_nothing(tmp_path):
    result = fold_path(MLP, tmp_path / "o.onnx", atol=0.0, rtol=0.0, providers=["cpu"])
    assert not result.passed and not result.written and result.exit_code == ExitCode.CHECK_FAILED
    assert list(tmp_path.iterdir()) == []


def test_stream_gets_the_bytes_a_file_gets(tmp_path):
    stream = io.BytesIO()
    result = fold_path(MLP, stream, verify=False)
    fold_path(MLP, tmp_path / "o.onnx", verify=False)
    assert result.written and result.output is None
    assert stream.getvalue() == (tmp_path / "o.onnx").read_bytes()


def test_bad_output_is_refused_before_any_work(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        fold_path(MLP, tmp_path / "no" / "o.onnx")
    with pytest.raises(InputError, match="is a directory"):
        fold_path(MLP, tmp_path)
    with pytest.raises(InputError, match="apply to ONNX"):
        fold_path(tmp_path / "p.pt2", tmp_path / "o.pt2", skip=["conv-bn"])


def test_jobs_for(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("b.onnx", "a.onnx", "a.folded.onnx", "c.pt2", "readme.txt"):
        (models / name).write_bytes(b"")
    (models / "sub").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    assert jobs_for([models]) == [(models / n, models / f) for n, f in
                                  (("a.onnx", "a.folded.onnx"), ("b.onnx", "b.folded.onnx"), ("c.pt2", "c.folded.pt2"))]
    assert jobs_for([models], out) == [(models / n, out / n) for n in ("a.onnx", "b.onnx", "c.pt2")]
    assert jobs_for([models / "a.onnx"], tmp_path / "x.onnx") == [(models / "a.onnx", tmp_path / "x.onnx")]
    with pytest.raises(InputError, match="existing directory"):
        jobs_for([models / "a.onnx", models / "b.onnx"], tmp_path / "x.onnx")
    with pytest.raises(InputError, match="replace their inputs"):
        jobs_for([models / "a.onnx", models / "b.onnx"], models)
    (out / "m").mkdir()
    (out / "m" / "a.onnx").write_bytes(b"")
    with pytest.raises(InputError, match="named a.onnx"):
        jobs_for([models / "a.onnx", out / "m" / "a.onnx"], tmp_path)
    with pytest.raises(InputError, match="without any"):
        jobs_for([out])
