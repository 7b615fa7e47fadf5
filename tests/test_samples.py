"""The sample models are what their generator script makes, on any machine: it reproduces them byte for byte, also
with torch's kernels forced to another instruction set and one thread (what another CPU would run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"

# torch's generic (non-SIMD) kernels and a single thread: the float kernels a different CPU would use. The old
# generator (BN statistics from float32 train-mode passes) wrote different bytes under these settings.
OTHER_CPU = {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.mark.parametrize("kernels", ["native", "generic"])
def test_generator_reproduces_the_committed_samples(tmp_path, kernels):
    pytest.importorskip("torch", reason="the generator needs torch (installed by `make test` and .ci/run)")
    env = {**os.environ, **(OTHER_CPU if kernels == "generic" else {})}
    proc = subprocess.run([sys.executable, str(SAMPLES / "make_samples.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    made = sorted(p.name for p in tmp_path.glob("*.onnx"))
    committed = sorted(p.name for p in SAMPLES.glob("*.onnx") if not p.name.endswith(".folded.onnx"))
    assert made == committed and len(made) >= 5
    for name in made:
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), f"{name} differs from its generator"
