"""Packaging facts that can be tested here: the sdist and wheel are built (offline, with the installed setuptools)
from a copy of the source tree and their contents and metadata checked."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import bnfold

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = ("3.10", "3.11", "3.12", "3.13")  # what requires-python and the classifiers claim
HEAVY = ("torch", "onnxsim", "onnxscript", "matplotlib", "safetensors", "scikit-learn")
BUILD_JUNK = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", "_work", "*.folded.onnx", "*.folded.onnx.data")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("setuptools", reason="building needs setuptools (in the test extras)")
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=BUILD_JUNK)
    out = tmp / "dist"
    logs = ""
    for step in ("build_sdist", "build_wheel"):  # one process each: setuptools keeps state between the two
        code = f"import sys\nfrom setuptools import build_meta\nbuild_meta.{step}(sys.argv[1])"
        proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs += proc.stdout + proc.stderr
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    return sdist, wheel, logs


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        [name] = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(z.read(name))


def test_version_is_in_one_place(built):
    sdist, wheel, _ = built
    assert wheel_metadata(wheel)["Version"] == bnfold.__version__
    assert sdist.name == f"bnfold-{bnfold.__version__}.tar.gz"
    assert "version =" not in (ROOT / "pyproject.toml").read_text().split("[project]")[1].split("\n[")[0]
    assert f"bnfold, version {bnfold.__version__}" in subprocess.run(
        [sys.executable, "-m", "bnfold", "--version"], capture_output=True, text=True).stdout


def test_license_is_an_spdx_expression_with_its_file(built):
    sdist, wheel, stderr = built
    meta = wheel_metadata(wheel)
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in meta.get_all("License-File")
    assert not any(c.startswith("License ::") for c in meta.get_all("Classifier"))
    assert "License classifiers are deprecated" not in stderr and "project.license` as a TOML table" not in stderr
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    with zipfile.ZipFile(wheel) as z:
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in z.namelist())


def test_classifiers_match_the_pythons_claimed(built):
    meta = wheel_metadata(built[1])
    assert meta["Requires-Python"] == ">=3.10"
    claimed = {c.rsplit(" :: ", 1)[1] for c in meta.get_all("Classifier")
               if c.startswith("Programming Language :: Python :: 3.")}
    assert claimed == set(PYTHONS)
    assert "Typing :: Typed" in meta.get_all("Classifier")


def test_a_plain_install_pulls_nothing_heavy(built):
    requires = wheel_metadata(built[1]).get_all("Requires-Dist")
    plain = [r for r in requires if "extra ==" not in r]
    names = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in plain}
    assert names == {"numpy", "onnx", "onnxruntime", "click", "ml-dtypes"} or \
        names == {"numpy", "onnx", "onnxruntime", "click", "ml_dtypes"}
    assert not any(heavy in names for heavy in HEAVY)
    assert all(">=" in r for r in plain)  # every dependency has a floor
    simplify = [r for r in requires if 'extra == "simplify"' in r]
    assert [r.split(";")[0].strip() for r in simplify] == ["onnxsim>=0.7"]
    assert any(r.startswith("onnxsim") and 'extra == "test"' in r for r in requires)


def test_wheel_is_typed(built):
    with zipfile.ZipFile(built[1]) as z:
        names = z.namelist()
    assert "bnfold/py.typed" in names and "bnfold/pipeline.py" in names
    assert not any(n.startswith(("tests/", "sample_models/")) for n in names)


def test_sdist_carries_the_tests_and_a_sample(built):
    sdist = built[0]
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for required in ("LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "bnfold/py.typed",
                     "tests/test_cli.py", "tests/reference.py", "tests/test_packaging.py",
                     "sample_models/make_samples.py", "sample_models/resnet_small.onnx"):
        assert required in names, required
    assert not any(".venv" in n or n.endswith(".folded.onnx") for n in names)
    assert sdist.stat().st_size < 1024 * 1024


def test_changelog_names_the_version_file():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog") and "bnfold/version.py" in text
    assert f"## {bnfold.__version__}" in text
