"""Fuzzing the fold: random models mixing every pattern and refusal (tests/fuzz_graphs.py), plus determinism and
idempotence over the sample models.

The profile here is modest, for CI (derandomized: the same examples on every run). ``benchmarks/fuzz_soak.py``
runs the same property over 10,000+ fresh examples.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, Phase, given, settings

import bnfold
from bnfold.onnx.merge import MERGE_RULE_NAMES
from bnfold.onnx.rules import RULE_NAMES

try:  # tests/ on sys.path (rootdir-less "prepend" import mode)
    from fuzz_graphs import _Builder, check_case, check_files, fuzz_cases
    from onnx_builders import Net
except ImportError:  # pragma: no cover - tests/ is a package
    from tests.fuzz_graphs import _Builder, check_case, check_files, fuzz_cases
    from tests.onnx_builders import Net

TESTS = Path(__file__).resolve().parent
SAMPLES = TESTS.parent / "sample_models"

CI = settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@CI
@given(fuzz_cases())
def test_fuzz_fold_is_exact_reported_deterministic_and_idempotent(case):
    check_case(case)


@settings(CI, max_examples=40)
@given(fuzz_cases(max_blocks=14))
def test_fuzz_long_chains(case):
    check_case(case)


def test_generator_covers_every_rule_and_refusal():
    """The generator must keep producing every pattern: each rule folds and each refusal shows up somewhere."""
    rules, reasons, blocks = set(), set(), set()

    @settings(CI, max_examples=800, phases=[Phase.generate])
    @given(fuzz_cases())
    def collect(case):
        _, report = bnfold.fold_onnx(case.model, skip=MERGE_RULE_NAMES)  # the fold rules' patterns
        rules.update(f.rule for f in report.folded)
        reasons.update(s.reason for s in report.skipped)
        blocks.update(b.split("[")[0] for b in case.blocks)

    collect()
    assert rules == set(RULE_NAMES)
    for part in ["training mode", "pads its input", "rank-3", "also used elsewhere", "Flatten axis=2", "transA=1",
                 "can not prove Reshape", "does not come from", "reads the same tensor twice", "overflow float16",
                 "per-sample statistics (LayerNormalization", "per-sample statistics (InstanceNormalization",
                 "no foldable linear op", "can be overridden at run time", "is not constant"]:
        assert any(part in r for r in reasons), part
    every_block = {name[len("block_"):] for name in dir(_Builder) if name.startswith("block_")}
    every_block = every_block - {"per_sample", "act"} | {"LayerNormalization", "InstanceNormalization", "relu",
                                                           "identity", "value_info", "typed_fields", "external_data"}
    assert every_block <= blocks, every_block - blocks


def test_generator_and_fold_are_deterministic_across_processes():
    """The same hypothesis draws give the same model bytes, and folding them the same folded bytes, in processes
    with different hash seeds (nothing hangs on set order, ids or the clock)."""
    script = (
        "import hashlib, sys; sys.path.insert(0, sys.argv[1])\n"
        "import bnfold\n"
        "from hypothesis import given, settings, Phase\n"
        "from fuzz_graphs import fuzz_cases\n"
        "h = hashlib.sha256()\n"
        "@settings(max_examples=40, derandomize=True, database=None, deadline=None, phases=[Phase.generate])\n"
        "@given(fuzz_cases())\n"
        "def run(case):\n"
        "    h.update(case.model.SerializeToString()); h.update(case.reference.SerializeToString())\n"
        "    h.update(repr((case.must_fold, case.must_keep, case.must_stay, case.blocks)).encode())\n"
        "    folded, report = bnfold.fold_onnx(case.model)\n"
        "    h.update(folded.SerializeToString()); h.update(repr(report.to_dict()).encode())\n"
        "run()\n"
        "print(h.hexdigest())\n"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", script, str(TESTS)], env=env, check=True, capture_output=True,
                             text=True, timeout=300)
        digests.add(out.stdout.strip())
    assert len(digests) == 1 and digests != {hashlib.sha256().hexdigest()}


# ============================================================================================ sample models


SAMPLE_MODELS = sorted(p for p in SAMPLES.glob("*.onnx") if not p.name.endswith(".folded.onnx"))


def test_there_are_sample_models():
    assert len(SAMPLE_MODELS) >= 5


@pytest.mark.parametrize("path", SAMPLE_MODELS, ids=lambda p: p.stem)
def test_sample_model_fold_is_deterministic_and_idempotent(path, tmp_path):
    model = onnx.load(path)
    before = model.SerializeToString()
    first, report = bnfold.fold_onnx(model)
    second, report2 = bnfold.fold_onnx(model)
    assert model.SerializeToString() == before
    data = first.SerializeToString()
    assert data == second.SerializeToString()
    assert report.to_dict() == report2.to_dict()
    assert report.bn_before > 0 and report.folded
    from_path, _ = bnfold.fold_onnx(path)
    assert from_path.SerializeToString() == data
    again, report3 = bnfold.fold_onnx(first)
    assert report3.folded == [] and report3.bn_before == report3.bn_after == report.bn_after
    assert again.SerializeToString() == data
    check_files(model, data, tmp_path)


# ============================================================================================ found by fuzzing


def test_refold_on_disk_after_a_bias_changed_shape(tmp_path):
    """Gemm with a bias of shape [1] -> BN -> BN: the first fold re-creates the bias ([1] -> [4]), the second
    rewrites it in place. fold_file of the output must write the same bytes again. (The re-created tensor once
    carried an empty but present doc_string, which the streamed writer put before the replaced raw_data: the
    file was not in field-number order and re-saving it wrote other bytes.)"""
    net = Net(seed=1)
    x = net.input("x", [2, 3])
    g = net.node("Gemm", [x, net.weight("W", [3, 4]), net.init("C", np.zeros([1], np.float32))])
    net.bn(net.bn(g, 4), 4, "y")
    net.output("y")
    model = net.model()
    folded, _ = bnfold.fold_onnx(model)
    assert not any(t.HasField("doc_string") for t in folded.graph.initializer)
    check_files(model, folded.SerializeToString(), tmp_path)


@pytest.mark.parametrize("opset", [11, 13])
def test_fold_file_with_external_data_folds_like_fold_onnx(opset, tmp_path):
    """Reshape(x, shape initializer) -> MatMul -> BN with every tensor in external data: fold_file must see the
    Reshape's shape (Reshape-5/13 shape inference needs its values for an output rank) and fold like fold_onnx.
    (Small external initializers were once hidden from shape inference: the BN was left for "no shape
    information", and a refold of the output, which holds them inline, folded it.)"""
    net = Net(seed=2, opset=opset)
    x = net.input("x", [2, 3, 2])
    r = net.node("Reshape", [x, net.init("shape", np.array([0, -1], np.int64))])
    net.bn(net.node("MatMul", [r, net.weight("W", [6, 4])]), 4, "y")
    net.output("y")
    model = net.model()
    folded, report = bnfold.fold_onnx(model)
    assert report.bn_after == 0
    check_files(model, folded.SerializeToString(), tmp_path, external=True)
