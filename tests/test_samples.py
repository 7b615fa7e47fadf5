"""The sample models are what their generator script makes: it runs here and reproduces them byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def test_generator_reproduces_the_committed_samples(tmp_path):
    pytest.importorskip("torch", reason="the generator needs torch (installed by `make test` and .ci/run)")
    proc = subprocess.run([sys.executable, str(SAMPLES / "make_samples.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    made = sorted(p.name for p in tmp_path.glob("*.onnx"))
    committed = sorted(p.name for p in SAMPLES.glob("*.onnx") if not p.name.endswith(".folded.onnx"))
    assert made == committed and len(made) >= 5
    for name in made:
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), f"{name} differs from its generator"
