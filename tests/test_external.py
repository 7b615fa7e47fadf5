"""Models with external data: folded lazily (tensors read one at a time, folded values spilled), written out by
streaming, equal to the float64 reference, deterministic, and the same bytes whichever path wrote them.

The memory bound itself (peak below the weights' size, for a > 2 GB model) is measured by
benchmarks/large_model.py, not here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from bnfold.onnx.external import ExternalData, Spilled, external_ref
from bnfold.onnx.fold import fold_file, fold_model, select_rules
from bnfold.onnx.io import load_model_lazily

try:
    from onnx_builders import Net, assert_close, conv_chain, count_ops, digest, random_feeds, run_ort, run_ref
    from onnx_builders import save_external
except ImportError:  # pragma: no cover
    from tests.onnx_builders import (Net, assert_close, conv_chain, count_ops, digest, random_feeds, run_ort,
                                     run_ref, save_external)


def test_lazy_fold_matches_the_float64_reference_and_keeps_tensors_external(tmp_path):
    model = conv_chain()
    src = tmp_path / "m.onnx"
    save_external(model, src)
    before = digest(src, tmp_path / "m.onnx.bin")
    report = fold_file(src, tmp_path / "f.onnx")
    assert digest(src, tmp_path / "m.onnx.bin") == before
    assert report.bn_before == 6 and report.bn_after == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx", "f.onnx.data", "m.onnx", "m.onnx.bin"]

    folded_refs = onnx.load(str(tmp_path / "f.onnx"), load_external_data=False)
    big = [t for t in folded_refs.graph.initializer if np.prod(t.dims) * 4 >= 1024]
    assert big and all(t.data_location == TensorProto.EXTERNAL for t in big)
    assert all({e.key: e.value for e in t.external_data}["location"] == "f.onnx.data" for t in big)
    small = [t for t in folded_refs.graph.initializer if np.prod(t.dims) * 4 < 1024]
    assert all(t.data_location != TensorProto.EXTERNAL for t in small)

    folded = onnx.load(str(tmp_path / "f.onnx"))
    onnx.checker.check_model(folded, full_check=True)
    assert count_ops(folded.graph) == 0
    feeds = random_feeds(model)
    assert_close(run_ort(folded, feeds), run_ref(model, feeds), 1e-4)


def test_lazy_load_reads_nothing_and_spills_folded_values(tmp_path):
    src = tmp_path / "m.onnx"
    save_external(conv_chain(), src)
    model, external = load_model_lazily(src)
    assert isinstance(external, ExternalData)
    weights = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert weights and not any(t.raw_data for t in weights)  # still in the file
    replacements: dict = {}
    try:
        fold_model(model, select_rules(), replacements, external)
        spilled = [v for v in replacements.values() if isinstance(v, Spilled)]
        assert spilled  # folded weights of external tensors wait on disk, not in memory
        for name, value in replacements.items():
            if isinstance(value, Spilled):
                assert value.array().shape == tuple(next(t for t in model.graph.initializer if t.name == name).dims)
    finally:
        external.close()


def test_every_path_writes_the_same_bytes_and_a_refold_changes_nothing(tmp_path):
    src = tmp_path / "m.onnx"
    save_external(conv_chain(), src)
    outputs = []
    for name, args in (("a", ["--no-verify"]), ("b", ["--no-verify"]), ("c", [])):
        out = tmp_path / name / "f.onnx"
        out.parent.mkdir()
        proc = subprocess.run([sys.executable, "-m", "bnfold", str(src), "-o", str(out), *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outputs.append(digest(out, out.with_name("f.onnx.data")))
    assert outputs[0] == outputs[1] == outputs[2]  # repeat, and the verifying (eager) path
    refold = tmp_path / "a" / "again" / "f.onnx"
    refold.parent.mkdir()
    report = fold_file(tmp_path / "a" / "f.onnx", refold)
    assert report.bn_before == 0 and not report.folded
    assert digest(refold, refold.with_name("f.onnx.data")) == outputs[0]


def test_small_external_tensors_come_back_inline_and_large_inline_ones_go_out(tmp_path):
    """Where a tensor is written depends on its size only (1 KiB, as onnx.save's default threshold)."""
    src = tmp_path / "m.onnx"
    save_external(conv_chain(), src, threshold=0)  # everything external, BN parameters included
    fold_file(src, tmp_path / "f.onnx")
    folded = onnx.load(str(tmp_path / "f.onnx"), load_external_data=False)
    for t in folded.graph.initializer:
        nbytes = int(np.prod(t.dims)) * 4
        assert (t.data_location == TensorProto.EXTERNAL) == (nbytes >= 1024), t.name


def test_large_tensors_are_aligned_in_the_output_data_file(tmp_path):
    net = Net(seed=2)
    x = net.input("x", [1, 128, 2, 2])
    for _ in range(2):  # 128*128*3*3*4 bytes = 576 KiB ... 2 MiB with 256 channels
        x = net.bn(net.conv(x, 128, 256, [3, 3], pads=[1, 1, 1, 1]), 256)
        x = net.node("Relu", [net.bn(net.conv(x, 256, 128, [1, 1]), 128)])
    net.node("Identity", [x], "y")
    net.output("y", [1, 128, 2, 2])
    src = tmp_path / "m.onnx"
    save_external(net.model(), src)
    fold_file(src, tmp_path / "f.onnx")
    folded = onnx.load(str(tmp_path / "f.onnx"), load_external_data=False)
    for t in folded.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: int(e.value) for e in t.external_data if e.key != "location"}
            if info["length"] >= 1 << 20:
                assert info["offset"] % (64 << 10) == 0, t.name


@pytest.mark.parametrize("location, message", [
    ("../outside.bin", "points outside the model's directory"),
    ("/etc/hostname", "points outside the model's directory"),
    ("sub/../../outside.bin", "points outside the model's directory"),
    ("missing.bin", "not found beside the model"),
    ("", "has no location"),
])
def test_external_references_are_checked_before_anything_is_read(tmp_path, location, message):
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64)
    base = tmp_path / "model"
    base.mkdir()
    tensor = numpy_helper.from_array(np.zeros(4, np.float32), "t")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    from bnfold.errors import InputError

    with pytest.raises(InputError, match=message):
        external_ref(tensor, base)


def test_symlink_out_of_the_model_directory_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    base = tmp_path / "model"
    base.mkdir()
    (base / "w.bin").symlink_to(tmp_path / "secret.bin")
    tensor = numpy_helper.from_array(np.zeros(4, np.float32), "t")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "w.bin"
    from bnfold.errors import InputError

    with pytest.raises(InputError, match="outside the model's directory"):
        external_ref(tensor, base)


@pytest.mark.parametrize("offset, length, message", [
    ("0", "12", "its shape"),
    ("8", "16", "asks for bytes 8..24"),
    ("x", "16", "non-integer offset or length"),
    ("-4", "16", "asks for bytes"),
])
def test_external_ranges_are_checked(tmp_path, offset, length, message):
    (tmp_path / "w.bin").write_bytes(b"\0" * 20)
    tensor = numpy_helper.from_array(np.zeros(4, np.float32), "t")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    from bnfold.errors import InputError

    with pytest.raises(InputError, match=message):
        external_ref(tensor, tmp_path)
