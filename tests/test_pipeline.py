"""bnfold.pipeline.fold_path (what the command runs) from Python: the folded file computes what the float64
reference computes for the original, dry runs and failed verification write nothing, streams get the file's bytes,
and jobs_for maps inputs to outputs."""

from __future__ import annotations

import importlib
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

try:
    from onnx_builders import conv_chain, digest, save_external
except ImportError:  # pragma: no cover
    from tests.onnx_builders import conv_chain, digest, save_external

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


@pytest.mark.parametrize("name", ["a.pt2", "A.PT2", ".pt2", "x/.pt2", "..pt2", "a..pt2", "dir/m.onnx", "m.pt2.",
                                  "pt2", "x.pt2/", "x.pt2//", "a/b.Pt2", "/", "./.pt2/", "a/.PT2", "m.pt2.onnx"])
def test_is_program_reads_the_suffix_as_pathlib_does(name):
    from bnfold.pipeline import is_program

    assert is_program(name) == is_program(Path(name)) == (Path(name).suffix.lower() == ".pt2")


def test_output_check_accepts_a_new_or_existing_file_and_refuses_a_directory_or_a_missing_one(tmp_path):
    from bnfold.pipeline import check_output_path

    (tmp_path / "old.onnx").write_bytes(b"")
    for fine in (tmp_path / "new.onnx", tmp_path / "old.onnx", str(tmp_path / "new.onnx")):
        check_output_path(fine)
    with pytest.raises(InputError, match="output is a directory"):
        check_output_path(tmp_path)
    with pytest.raises(InputError, match=f"output directory {tmp_path / 'nope'} does not exist"):
        check_output_path(tmp_path / "nope" / "m.onnx")
    with pytest.raises(InputError, match="does not exist"):  # a file where the directory should be
        check_output_path(tmp_path / "old.onnx" / "m.onnx")


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


# ----------------------------------------------------- verification from files (bounded memory, issue 12)

def spy_on_verify(monkeypatch, plant_error: bool = False) -> list:
    """Record what bnfold.verify.verify is given; with ``plant_error``, first scale one output channel of the
    candidate's first Conv weight by 1.01 (a real change the verdict must catch)."""
    verify_module = importlib.import_module("bnfold.verify")  # bnfold.verify is also the function
    real = verify_module.verify
    calls = []

    def spy(original, candidate, **options):
        calls.append((original, candidate, sorted(p.name for p in Path(candidate).parent.iterdir())
                      if isinstance(candidate, Path) else None))
        if plant_error:
            model = onnx.load(str(candidate))
            weight = next(t for t in model.graph.initializer
                          if t.name == next(n for n in model.graph.node if n.op_type == "Conv").input[1])
            values = onnx.numpy_helper.to_array(weight).copy()
            values[0] *= np.float32(1.01)
            weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
            onnx.save(model, str(candidate), save_as_external_data=True, location=candidate.name + ".data")
        return real(original, candidate, **options)

    monkeypatch.setattr(verify_module, "verify", spy)
    return calls


def external_model(tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "m.onnx"
    save_external(conv_chain(), src)
    return src, digest(src, tmp_path / "m.onnx.bin")


def test_external_data_model_is_verified_from_files_and_written_as_without_verification(tmp_path, monkeypatch):
    src, before = external_model(tmp_path)
    calls = spy_on_verify(monkeypatch)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    result = fold_path(src, tmp_path / "a" / "f.onnx", providers=["cpu"])
    assert result.passed and result.written and result.verification is not None
    assert set(result.seconds) == {"load", "fold", "verify", "save"}
    [(original, candidate, staged_files)] = calls
    assert original == src  # the original's path, not a loaded model
    assert candidate.name == "f.onnx" and candidate.parent.parent == tmp_path / "a"  # staged beside the output
    assert staged_files == ["f.onnx", "f.onnx.data"]
    fold_path(src, tmp_path / "b" / "f.onnx", verify=False)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["f.onnx", "f.onnx.data"]  # no staging left
    assert digest(tmp_path / "a" / "f.onnx", tmp_path / "a" / "f.onnx.data") == \
        digest(tmp_path / "b" / "f.onnx", tmp_path / "b" / "f.onnx.data")
    assert digest(src, tmp_path / "m.onnx.bin") == before


def test_failed_verification_from_files_leaves_nothing(tmp_path, monkeypatch):
    src, before = external_model(tmp_path)
    calls = spy_on_verify(monkeypatch, plant_error=True)
    out = tmp_path / "out"
    out.mkdir()
    result = fold_path(src, out / "f.onnx", providers=["cpu"])
    assert len(calls) == 1 and calls[0][2] == ["f.onnx", "f.onnx.data"]
    assert not result.passed and not result.written and result.exit_code == ExitCode.CHECK_FAILED
    assert list(out.iterdir()) == []
    dry = fold_path(src, out / "f.onnx", providers=["cpu"], write=False)  # a dry run stages elsewhere
    assert not dry.passed and not dry.written and list(out.iterdir()) == []
    assert calls[1][1].parent.parent != out
    assert digest(src, tmp_path / "m.onnx.bin") == before


def test_large_inline_model_is_verified_from_files_with_the_same_bytes(tmp_path, monkeypatch):
    pipeline = importlib.import_module("bnfold.pipeline")
    in_memory = fold_path(MLP, tmp_path / "memory.onnx", providers=["cpu"])
    calls = spy_on_verify(monkeypatch)
    monkeypatch.setattr(pipeline, "VERIFY_FROM_FILES_FROM", 0)  # every model counts as large
    from_files = fold_path(MLP, tmp_path / "files.onnx", providers=["cpu"])
    stream = io.BytesIO()
    streamed = fold_path(MLP, stream, providers=["cpu"])
    assert [type(c[1]) for c in calls] == [type(tmp_path)] * 2 and calls[0][0] == MLP
    assert in_memory.passed and from_files.passed and streamed.passed and streamed.written
    assert [o.name for o in from_files.verification.providers["cpu"].outputs] == \
        [o.name for o in in_memory.verification.providers["cpu"].outputs]
    assert (tmp_path / "files.onnx").read_bytes() == (tmp_path / "memory.onnx").read_bytes() == stream.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files.onnx", "memory.onnx"]
