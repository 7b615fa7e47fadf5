"""The command-line habits users bring from onnxsim, black, ruff and trtexec: IN OUT, several models, --check,
-q/-v, -o -, onnxsim/trtexec shape syntax, 'did you mean', help on every option, and the JSON producer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.cli import cli

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "sample_models" / "mlp_bn1d.onnx"  # 3 BN, dynamic batch, input "x" [batch, 64]
TCN = ROOT / "sample_models" / "tcn1d.onnx"  # 4 BN


def run_cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, cwd=cwd,
                          timeout=300)
    proc.out, proc.err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert "Traceback" not in proc.err, proc.err
    return proc


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def bn_count(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def copy_to(directory: Path, *sources: Path) -> list[Path]:
    directory.mkdir(exist_ok=True)
    copies = []
    for source in sources:
        (directory / source.name).write_bytes(source.read_bytes())
        copies.append(directory / source.name)
    return copies


# ------------------------------------------------------------------------------------------------- IN OUT


def test_second_path_is_the_output(tmp_path):
    [src] = copy_to(tmp_path / "in", MLP)
    before = src.read_bytes()
    out = tmp_path / "out.onnx"
    proc = run_cli(src, out)
    assert proc.returncode == 0, proc.err
    assert bn_count(out) == 0 and bn_count(src) == 3
    assert src.read_bytes() == before and listing(src.parent) == ["mlp_bn1d.onnx"]  # no default-named file
    assert f"output: {out}" in proc.out


def test_in_out_writes_what_dash_o_writes(tmp_path):
    assert run_cli(MLP, tmp_path / "a.onnx", "--no-verify").returncode == 0
    assert run_cli(MLP, "-o", tmp_path / "b.onnx", "--no-verify").returncode == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


# ------------------------------------------------------------------------------------------- several models


def test_several_models_into_a_directory_one_line_each(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli(MLP, TCN, "-o", out)
    assert proc.returncode == 0, proc.err
    lines = proc.out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{MLP}: BatchNormalization 3 -> 0") and "verify PASSED" in lines[0]
    assert lines[1].startswith(f"{TCN}: BatchNormalization 4 -> 0")
    assert listing(out) == ["mlp_bn1d.onnx", "tcn1d.onnx"]
    assert bn_count(out / "mlp_bn1d.onnx") == 0 and bn_count(out / "tcn1d.onnx") == 0


def test_several_models_exit_with_the_worst_code(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    proc = run_cli(MLP, broken, TCN, "-o", out, "--no-verify")
    assert proc.returncode == 2
    assert len(proc.out.strip().splitlines()) == 2  # the two good models are reported ...
    assert listing(out) == ["mlp_bn1d.onnx", "tcn1d.onnx"]  # ... and written; nothing for the broken one
    [error] = [line for line in proc.err.splitlines() if line.strip()]
    assert error.startswith("bnfold: error:") and "broken.onnx" in error
    # verification failure (zero tolerance) is 1, and outranks nothing worse
    proc = run_cli(MLP, TCN, "-o", tmp_path / "out", "--atol", "0", "--rtol", "0", "--json")
    assert proc.returncode == 1
    models = json.loads(proc.out)["models"]
    assert [m["input"] for m in models] == [str(MLP), str(TCN)]
    assert any(m["verify"]["cpu"]["passed"] is False and m["output"] is None for m in models)


def test_a_directory_of_models(tmp_path):
    src = tmp_path / "models"
    copy_to(src, MLP, TCN)
    (src / "notes.txt").write_text("not a model")
    assert run_cli(src, "--no-verify", "-q").returncode == 0  # beside each input
    assert listing(src) == ["mlp_bn1d.folded.onnx", "mlp_bn1d.onnx", "notes.txt", "tcn1d.folded.onnx", "tcn1d.onnx"]
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli(src, "-o", out, "--no-verify")  # earlier outputs (*.folded.onnx) are not inputs
    assert proc.returncode == 0, proc.err
    assert listing(out) == ["mlp_bn1d.onnx", "tcn1d.onnx"] and len(proc.out.strip().splitlines()) == 2


def test_several_models_need_an_output_directory_that_is_not_theirs(tmp_path):
    src = tmp_path / "models"
    copy_to(src, MLP, TCN)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for output in (tmp_path / "file.onnx", src):  # not a directory; the inputs' own directory
        proc = run_cli(src / "mlp_bn1d.onnx", src / "tcn1d.onnx", "-o", output, "--no-verify")
        assert proc.returncode == 2 and proc.err.startswith("bnfold: error:"), proc.err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert listing(tmp_path) == ["models"]
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(empty)
    assert proc.returncode == 2 and "without any .onnx" in proc.err


# ------------------------------------------------------------------------------------------------- --check


def test_check_fails_when_something_is_left_to_fold_and_writes_nothing(tmp_path):
    [src] = copy_to(tmp_path, MLP)
    proc = run_cli("--check", src)
    assert proc.returncode == 1
    assert "check: FAILED, 3 folds possible" in proc.out
    assert listing(tmp_path) == ["mlp_bn1d.onnx"]
    folded = tmp_path / "folded.onnx"
    assert run_cli(src, folded, "--no-verify").returncode == 0
    proc = run_cli(folded, "--check", "--json")
    assert proc.returncode == 0
    report = json.loads(proc.out)
    assert report["check"] == "passed" and report["folded"] == [] and report["output"] is None
    # two paths with --check are two models (nothing is written, so there is no output)
    proc = run_cli("--check", src, folded)
    assert proc.returncode == 1 and len(proc.out.strip().splitlines()) == 2
    assert "check FAILED" in proc.out and "check passed" in proc.out
    assert listing(tmp_path) == ["folded.onnx", "mlp_bn1d.onnx"]


# ----------------------------------------------------------------------------------------------- -q and -v


def test_quiet_prints_nothing_and_verbose_times_each_step(tmp_path):
    proc = run_cli(MLP, tmp_path / "q.onnx", "-q")
    assert proc.returncode == 0 and proc.out == "" and proc.err == ""
    assert bn_count(tmp_path / "q.onnx") == 0
    proc = run_cli(MLP, tmp_path / "v.onnx", "--verbose")
    assert proc.returncode == 0
    [timing] = [line for line in proc.err.splitlines() if "load " in line]
    for step in ("load", "fold", "verify", "save"):
        assert f"{step} " in timing
    assert "BatchNormalization nodes: 3 before, 0 after" in proc.out
    proc = run_cli(MLP, tmp_path / "x.onnx", "-q", "-v")
    assert proc.returncode == 2 and not (tmp_path / "x.onnx").exists()
    # -q keeps errors
    proc = run_cli(tmp_path / "missing.onnx", "-q")
    assert proc.returncode == 2 and "no such file" in proc.err


def test_quiet_on_every_command(tmp_path):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
    runs = {
        "audit": ("audit", MLP, "-q"),
        "calibrate": ("calibrate", MLP, "--data", data, "-o", tmp_path / "c.onnx", "--batch-size", 8, "-q"),
        "bench": ("bench", MLP, "-q", "--repeat", 1, "--warmup", 0, "--opt-level", "disabled", "--threads", 1),
    }
    for what, args in runs.items():
        proc = run_cli(*args)
        assert proc.returncode == 0 and proc.out == "" and proc.err == "", (what, proc.err)
    assert bn_count(tmp_path / "c.onnx") == 3  # calibrate wrote its model, silently
    proc = run_cli("audit", MLP, "-q", "--json")  # the JSON asked for still comes
    assert proc.returncode == 0 and json.loads(proc.out)["producer"]["name"] == "bnfold"


# ----------------------------------------------------------------------------------------------------- -o -


def test_dash_o_dash_writes_the_model_to_stdout(tmp_path):
    proc = run_cli(MLP, "-o", "-", "--no-verify", cwd=tmp_path)
    assert proc.returncode == 0, proc.err
    assert listing(tmp_path) == []  # never a file named "-"
    assert run_cli(MLP, tmp_path / "file.onnx", "--no-verify").returncode == 0
    assert proc.stdout == (tmp_path / "file.onnx").read_bytes()
    assert "BatchNormalization nodes: 3 before, 0 after" in proc.err  # the report moves to stderr


@pytest.mark.parametrize("args", [
    (MLP, "-o", "-", "--json"),  # two payloads for one stdout
    (MLP, TCN, "-o", "-"),  # several models
    ("--check", MLP, "-o", "-"),
    ("calibrate", MLP, "--data", "data.npz", "-o", "-"),
    ("audit", MLP, "--plot", "-"),
    ("bench", MLP, "--plot", "-"),
])
def test_dash_o_dash_is_refused_where_stdout_cannot_take_it(tmp_path, args):
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2 and proc.out == ""
    assert proc.err.startswith("bnfold: error:") and len(proc.err.strip().splitlines()) == 1, proc.err
    assert listing(tmp_path) == []


def test_dash_o_dash_refuses_external_data(tmp_path):
    model = onnx.load(str(MLP))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, size_threshold=0)
    before = listing(tmp_path)
    proc = run_cli(tmp_path / "ext.onnx", "-o", "-", "--no-verify", cwd=tmp_path)
    assert proc.returncode == 2 and "external data" in proc.err and proc.stdout == b""
    assert listing(tmp_path) == before


# --------------------------------------------------------------------------------------------- input shapes


@pytest.mark.parametrize("form", ["x=5x64", "x:5,64", "x:5x64", "x=5,64", "x:5X64"])
def test_input_shape_forms(tmp_path, form):
    proc = run_cli(MLP, tmp_path / "o.onnx", "--input-shape", form, "--json")
    assert proc.returncode == 0, proc.err
    assert json.loads(proc.out)["verify"]["cpu"]["passed"]


def test_input_shape_is_applied_and_checked(tmp_path):
    # the fixed dimension is 64: a shape that contradicts it is bad input, so the shape given was the shape used
    proc = run_cli(MLP, tmp_path / "o.onnx", "--input-shape", "x:5,63")
    assert proc.returncode == 2 and "x" in proc.err
    for bad in ("x", "x:", "x:5,,64", "x:5;64", ":5,64", "x=-1x64"):
        proc = run_cli(MLP, tmp_path / "o.onnx", "--input-shape", bad)
        assert proc.returncode == 2 and "--input-shape" in proc.err, (bad, proc.err)
    assert not (tmp_path / "o.onnx").exists()


def test_input_shape_for_an_input_whose_name_has_a_colon(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.uniform(-1, 1, (4, 3)).astype(np.float32)
    gamma, beta, mean = (rng.uniform(0.5, 1.5, 3).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["in:0", "w"], ["h"]),
         helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["out:0"])], "g",
        [helper.make_tensor_value_info("in:0", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("out:0", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (gamma, "g"), (beta, "b"), (mean, "m"), (var, "v"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(tmp_path / "tf.onnx"))
    proc = run_cli(tmp_path / "tf.onnx", tmp_path / "o.onnx", "--input-shape", "in:0:6,4", "--json")
    assert proc.returncode == 0, proc.err
    assert json.loads(proc.out)["bn_after"] == 0
    # independent check: the folded model against the BN formula in float64
    x = rng.standard_normal((6, 4)).astype(np.float32)
    h = x.astype(np.float64) @ w.astype(np.float64)
    want = gamma * (h - mean) / np.sqrt(var.astype(np.float64) + 1e-5) + beta
    sess = ort.InferenceSession(str(tmp_path / "o.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"in:0": x})[0], want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ commands, help


@pytest.mark.parametrize("typo, meant", [("audti", "audit"), ("calibrat", "calibrate"), ("bnech", "bench"),
                                         ("flod", "fold")])
def test_a_mistyped_command_says_which_was_meant(tmp_path, typo, meant):
    proc = run_cli(typo, "x.onnx", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.err.strip() == f"bnfold: error: no such command '{typo}' (did you mean '{meant}'?)"


def test_a_file_named_like_a_command_is_still_a_model(tmp_path):
    (tmp_path / "audti").write_bytes(MLP.read_bytes())
    proc = run_cli("audti", "out.onnx", "--no-verify", cwd=tmp_path)
    assert proc.returncode == 0, proc.err
    assert bn_count(tmp_path / "out.onnx") == 0


def test_every_option_has_help():
    commands = {"bnfold": cli, **{f"bnfold {name}": command for name, command in cli.commands.items()}}
    assert {"bnfold fold", "bnfold audit", "bnfold calibrate", "bnfold bench"} <= set(commands)
    for where, command in commands.items():
        assert command.help, where
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(), f"{where} {param.opts} has no help"


def test_help_and_version_load_no_heavy_module():
    code = ("import sys\nfrom bnfold.cli import main\n"
            "for args in (['--version'], ['--help'], ['fold', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit as e:\n        assert e.code == 0, (args, e.code)\n"
            "heavy = ('numpy', 'onnx', 'onnxruntime', 'torch', 'ml_dtypes', 'onnxsim')\n"
            "print(sorted(m for m in heavy if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"bnfold, version {bnfold.__version__}"
    assert lines[-1] == "[]"
    assert "--check" in proc.stdout and "--skip RULE" in proc.stdout


def test_import_bnfold_loads_nothing_heavy():
    code = ("import sys, bnfold\n"
            "print(sorted(m for m in ('numpy', 'onnx', 'onnxruntime', 'torch', 'ml_dtypes', 'click') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lazy_names_are_the_real_ones():
    from bnfold.onnx.fold import fold_onnx
    from bnfold.report import FoldReport

    assert bnfold.fold_onnx is fold_onnx and bnfold.FoldReport is FoldReport
    assert set(bnfold.__all__) <= set(dir(bnfold))
    for name in bnfold.__all__:
        assert getattr(bnfold, name) is not None
    with pytest.raises(AttributeError):
        bnfold.no_such_name  # noqa: B018


# ------------------------------------------------------------------------------------------------- producer


def test_json_reports_name_their_producer(tmp_path):
    producer = {"name": "bnfold", "version": bnfold.__version__}
    # merge-sequential would absorb the BN before the Conv as well (a BN -> Conv chain is one Conv): skipped too
    proc = run_cli(TCN, tmp_path / "o.onnx", "--json", "--no-verify", "--skip", "bn-conv", "--skip",
                   "merge-sequential")
    assert proc.returncode == 0, proc.err
    report = json.loads(proc.out)
    assert next(iter(report)) == "producer" and report["producer"] == producer
    assert report["skipped"] and all({"bn", "reason", "code", "op_type"} <= set(s) for s in report["skipped"])
    proc = run_cli("audit", MLP, "--json")
    assert proc.returncode == 0, proc.err
    assert json.loads(proc.out)["producer"] == producer
    proc = run_cli(MLP, TCN, "--check", "--json")
    assert json.loads(proc.out)["producer"] == producer
