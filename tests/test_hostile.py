"""Hostile and malformed input, every command: ``bnfold`` (fold, with and without verification), ``audit``,
``calibrate`` and ``bench``.

Each (input, command) pair runs the CLI as a subprocess and checks the documented contract (README, "Exit codes"):
exit 2 for bad input (1 where a documented check fails), exactly one line on stderr that starts with
``bnfold: error:`` and no traceback, nothing on stdout, every input file byte-identical afterwards, and nothing left
behind: no output, no temporary file, neither beside the output nor in the temporary directory. Where a hostile
input is not an error (NaN statistics for fold and calibrate, a zero-channel BN) the documented outcome is checked:
the BN left in place with its reason, fresh statistics, a valid output. Pickles that would create a marker file
must never run.

Known failures in files this suite does not fix are ``xfail(strict=True)`` with the diagnosis as the reason.
The pairs run in parallel subprocesses (see ``outcomes``): the CLI's start-up dominates.

Every hostile input is built here, in ``tmp_path``; models are a few hundred bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

# ------------------------------------------------------------------------------------------------ building blocks

C_IN, C = 3, 4  # input channels, BN channels
X_SHAPE = ["N", C_IN, 4, 4]  # dynamic batch: calibration feeds batches of 8


def _model(*, bn_params: dict | None = None, conv_out: int = C, bn_channels: int | None = None,
           x_shape=None, nodes=None, raw_override: dict | None = None) -> onnx.ModelProto:
    """x -> Conv(1x1, no padding) -> BatchNormalization -> Relu -> y: the smallest model every command handles.

    ``bn_params`` replaces BN's scale/bias/mean/var values (any length), ``conv_out`` the Conv's output
    channels, ``nodes`` the whole node list, ``raw_override`` an initializer's raw bytes (name -> bytes)."""
    rng = np.random.default_rng(0)
    bn_channels = conv_out if bn_channels is None else bn_channels
    params = {"scale": rng.uniform(0.5, 1.5, bn_channels), "bias": rng.normal(0, 0.3, bn_channels),
              "mean": rng.normal(0, 0.5, bn_channels), "var": rng.uniform(0.2, 3.0, bn_channels)}
    params.update(bn_params or {})
    inits = [numpy_helper.from_array(rng.standard_normal((conv_out, C_IN, 1, 1)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(conv_out).astype(np.float32), "B")]
    inits += [numpy_helper.from_array(np.asarray(v, np.float32), f"bn_{k}") for k, v in params.items()]
    for tensor in inits:
        if raw_override and tensor.name in raw_override:
            tensor.raw_data = raw_override[tensor.name]
    x_shape = X_SHAPE if x_shape is None else x_shape
    if nodes is None:
        nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
                 helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["n"],
                                  name="bn"),
                 helper.make_node("Relu", ["n"], ["y"], name="relu")]
    y_shape = [x_shape[0], conv_out, *x_shape[2:]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _save_external(model: onnx.ModelProto, path: Path, edit: dict[str, str] | None = None,
                   tensor: str = "bn_var") -> Path:
    """Save with every tensor in ``w.data``; then set ``edit``'s keys (location, offset, length) of ``tensor``'s
    external_data entries in the saved .onnx."""
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.data",
              size_threshold=0)
    if edit:
        saved = onnx.load(str(path), load_external_data=False)
        [t] = [t for t in saved.graph.initializer if t.name == tensor]
        entries = {e.key: e for e in t.external_data}
        for key, value in edit.items():
            if key in entries:
                entries[key].value = value
            else:
                entry = t.external_data.add()
                entry.key, entry.value = key, value
        path.write_bytes(saved.SerializeToString())
    return path


def _data(path: Path, n: int = 8, **arrays) -> Path:
    """Calibration data for ``_model``: ``x`` of shape [n, 3, 4, 4] unless ``arrays`` say otherwise."""
    if not arrays:
        arrays = {"x": np.random.default_rng(1).standard_normal([n, *X_SHAPE[1:]]).astype(np.float32)}
    np.savez(path, **arrays)
    return path


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------------------------------------- the cases


@dataclass
class Paths:
    """Where one case lives: ``inputs`` holds the files under test, ``out`` the (empty) output directory,
    ``outside`` a file next to ``inputs`` that hostile references point to, ``marker`` appears if code ran."""

    root: Path
    inputs: Path = field(init=False)
    out: Path = field(init=False)
    outside: Path = field(init=False)
    marker: Path = field(init=False)

    def __post_init__(self):
        self.inputs, self.out = self.root / "in", self.root / "out"
        self.outside, self.marker = self.root / "outside.bin", self.root / "code_ran"
        self.inputs.mkdir()
        self.out.mkdir()
        (self.root / "tmp").mkdir()
        (self.root / "cwd").mkdir()


@dataclass
class Case:
    """What the commands get: ``model`` (the argument), ``data`` (calibrate --data; a good file unless the case is
    about data), ``output`` (-o; default out/out.onnx), ``plot`` (bench/audit --plot, only when set)."""

    model: Path
    data: Path | None = None
    output: Path | None = None
    plot: Path | None = None


def good(p: Paths) -> Case:
    return Case(_save(_model(), p.inputs / "m.onnx"))


# --- not a model at all


def empty_file(p: Paths) -> Case:
    (p.inputs / "m.onnx").write_bytes(b"")
    return Case(p.inputs / "m.onnx")


def random_bytes(p: Paths) -> Case:
    (p.inputs / "m.onnx").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return Case(p.inputs / "m.onnx")


def truncated(p: Paths) -> Case:
    data = _model().SerializeToString()
    (p.inputs / "m.onnx").write_bytes(data[: len(data) // 2])
    return Case(p.inputs / "m.onnx")


def tensor_proto(p: Paths) -> Case:
    tensor = numpy_helper.from_array(np.ones((4, 4), np.float32), "t")
    (p.inputs / "m.onnx").write_bytes(tensor.SerializeToString())
    return Case(p.inputs / "m.onnx")


def graph_proto(p: Paths) -> Case:
    (p.inputs / "m.onnx").write_bytes(_model().graph.SerializeToString())
    return Case(p.inputs / "m.onnx")


def text_file(p: Paths) -> Case:
    (p.inputs / "m.onnx").write_text("ir_version: 8\ngraph { name: 'not really' }\n")
    return Case(p.inputs / "m.onnx")


def huge_length_prefix(p: Paths) -> Case:
    # field 7 (graph), length-delimited, claiming ~4 GiB that are not there
    (p.inputs / "m.onnx").write_bytes(b"\x08\x08\x3a\xff\xff\xff\xff\x0f" + b"\x00" * 32)
    return Case(p.inputs / "m.onnx")


def directory(p: Paths) -> Case:
    (p.inputs / "m.onnx").mkdir()
    return Case(p.inputs / "m.onnx")


def missing_file(p: Paths) -> Case:
    return Case(p.inputs / "missing.onnx")


def no_opset(p: Paths) -> Case:
    model = _model()
    del model.opset_import[:]
    return Case(_save(model, p.inputs / "m.onnx"))


# --- invalid graphs


def cycle(p: Paths) -> Case:
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "y"], ["s"], name="add"),  # reads y, computed below from s
             helper.make_node("BatchNormalization", ["s", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["n"],
                              name="bn"),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    return Case(_save(_model(nodes=nodes), p.inputs / "m.onnx"))


def dangling_input(p: Paths) -> Case:
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "nowhere"], ["n"],
                              name="bn"),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    return Case(_save(_model(nodes=nodes), p.inputs / "m.onnx"))


def output_never_computed(p: Paths) -> Case:
    model = _model()
    model.graph.output.append(helper.make_tensor_value_info("ghost", TensorProto.FLOAT, None))
    return Case(_save(model, p.inputs / "m.onnx"))


def defined_twice(p: Paths) -> Case:
    model = _model()
    model.graph.node.append(helper.make_node("Identity", ["x"], ["c"], name="again"))
    return Case(_save(model, p.inputs / "m.onnx"))


def unknown_op(p: Paths) -> Case:
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["n"],
                              name="bn"),
             helper.make_node("NoSuchOp", ["n"], ["y"], name="mystery")]
    return Case(_save(_model(nodes=nodes), p.inputs / "m.onnx"))


# --- bad BatchNormalization parameters


def bn_scale_wrong_length(p: Paths) -> Case:
    return Case(_save(_model(bn_params={"scale": np.ones(C - 1)}), p.inputs / "m.onnx"))


def bn_var_wrong_length(p: Paths) -> Case:
    return Case(_save(_model(bn_params={"var": np.ones(C + 2)}), p.inputs / "m.onnx"))


def bn_all_wrong_length(p: Paths) -> Case:
    """All four parameters agree with each other (5) but not with the Conv's 4 output channels."""
    return Case(_save(_model(bn_channels=C + 1), p.inputs / "m.onnx"))


def raw_data_wrong_size(p: Paths) -> Case:
    """bn_var says dims [4] but holds 3 floats of raw data."""
    raw = np.ones(C - 1, np.float32).tobytes()
    return Case(_save(_model(raw_override={"bn_var": raw}), p.inputs / "m.onnx"))


def nan_variance(p: Paths) -> Case:
    var = np.array([1.0, np.nan, 0.5, 2.0])
    return Case(_save(_model(bn_params={"var": var}), p.inputs / "m.onnx"), data=_data(p.inputs / "d.npz"))


def negative_variance(p: Paths) -> Case:
    var = np.array([1.0, -4.0, 0.5, 2.0])
    return Case(_save(_model(bn_params={"var": var}), p.inputs / "m.onnx"), data=_data(p.inputs / "d.npz"))


def zero_channels(p: Paths) -> Case:
    """A Conv with 0 output channels and a BN of 0 channels."""
    return Case(_save(_model(conv_out=0), p.inputs / "m.onnx"))


def zero_batch_input(p: Paths) -> Case:
    """An input with a 0 dimension: the model computes an empty tensor."""
    return Case(_save(_model(x_shape=[0, C_IN, 4, 4]), p.inputs / "m.onnx"))


# --- external data


def _outside_with_var_bytes(p: Paths) -> None:
    """The file outside the model's directory holds exactly bn_var's bytes: reading it would *work*, so only a
    refusal can give exit 2."""
    p.outside.write_bytes(numpy_helper.to_array(
        next(t for t in _model().graph.initializer if t.name == "bn_var")).tobytes())


def ext_dotdot(p: Paths) -> Case:
    _outside_with_var_bytes(p)
    return Case(_save_external(_model(), p.inputs / "m.onnx", {"location": "../outside.bin", "offset": "0"}))


def ext_absolute(p: Paths) -> Case:
    return Case(_save_external(_model(), p.inputs / "m.onnx",
                               {"location": "/etc/passwd", "offset": "0", "length": "16"}))


def ext_absolute_ours(p: Paths) -> Case:
    """An absolute path to a file that would be valid: still refused."""
    _outside_with_var_bytes(p)
    return Case(_save_external(_model(), p.inputs / "m.onnx", {"location": str(p.outside), "offset": "0"}))


def ext_symlink_out(p: Paths) -> Case:
    _outside_with_var_bytes(p)
    (p.inputs / "link.bin").symlink_to(p.outside)
    return Case(_save_external(_model(), p.inputs / "m.onnx", {"location": "link.bin", "offset": "0"}))


def ext_missing_file(p: Paths) -> Case:
    return Case(_save_external(_model(), p.inputs / "m.onnx", {"location": "gone.bin"}))


def ext_past_end(p: Paths) -> Case:
    return Case(_save_external(_model(), p.inputs / "m.onnx", {"offset": "100000"}))


def ext_length_mismatch(p: Paths) -> Case:
    return Case(_save_external(_model(), p.inputs / "m.onnx", {"length": "8"}))


def ext_negative_offset(p: Paths) -> Case:
    return Case(_save_external(_model(), p.inputs / "m.onnx", {"offset": "-16"}))


def ext_location_is_directory(p: Paths) -> Case:
    (p.inputs / "sub").mkdir()
    return Case(_save_external(_model(), p.inputs / "m.onnx", {"location": "sub"}))


def ext_data_file_truncated(p: Paths) -> Case:
    path = _save_external(_model(), p.inputs / "m.onnx")
    data = (p.inputs / "w.data").read_bytes()
    (p.inputs / "w.data").write_bytes(data[: len(data) - 4])
    return Case(path)


# --- PyTorch checkpoints and programs


def pt_pickle_runs_code(p: Paths) -> Case:
    """torch.save's zip layout, written by hand (the test process need not import torch), around a pickle that
    would create the marker file."""
    state = {"bn.running_mean": [0.0] * C, "bn.running_var": [1.0] * C, "evil": _Payload(p.marker)}
    with zipfile.ZipFile(p.inputs / "ckpt.pt", "w") as z:
        z.writestr("ckpt/data.pkl", pickle.dumps(state, protocol=2))
        z.writestr("ckpt/byteorder", "little")
        z.writestr("ckpt/version", "3\n")
    return Case(p.inputs / "ckpt.pt")


def pt_legacy_pickle_runs_code(p: Paths) -> Case:
    """Not torch's zip format: a bare pickle stream, the legacy format torch.load also reads."""
    (p.inputs / "ckpt.pth").write_bytes(pickle.dumps(_Payload(p.marker), protocol=2))
    return Case(p.inputs / "ckpt.pth")


def pt_random(p: Paths) -> Case:
    (p.inputs / "ckpt.pt").write_bytes(np.random.default_rng(2).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    return Case(p.inputs / "ckpt.pt")


def safetensors_random(p: Paths) -> Case:
    (p.inputs / "w.safetensors").write_bytes(
        np.random.default_rng(3).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    return Case(p.inputs / "w.safetensors")


def safetensors_huge_header(p: Paths) -> Case:
    """A header length of 2**62 bytes in a 40-byte file."""
    (p.inputs / "w.safetensors").write_bytes((1 << 62).to_bytes(8, "little") + b'{"a": 1}' + b" " * 24)
    return Case(p.inputs / "w.safetensors")


def safetensors_offsets_past_end(p: Paths) -> Case:
    header = json.dumps({"bn.running_mean": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "bn.running_var": {"dtype": "F32", "shape": [4], "data_offsets": [16, 4096]}}).encode()
    (p.inputs / "w.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 32)
    return Case(p.inputs / "w.safetensors")


def pt2_random(p: Paths) -> Case:
    (p.inputs / "prog.pt2").write_bytes(np.random.default_rng(4).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    return Case(p.inputs / "prog.pt2", output=p.out / "out.pt2")


def pt2_zip_not_program(p: Paths) -> Case:
    with zipfile.ZipFile(p.inputs / "prog.pt2", "w") as z:
        z.writestr("prog/readme.txt", "not a torch.export program")
        z.writestr("prog/data/weights/weight_0", b"\0" * 64)
    return Case(p.inputs / "prog.pt2", output=p.out / "out.pt2")


def pt2_pickled_weights(p: Paths) -> Case:
    config = {"config": {"conv.weight": {"path_name": "weight_0", "is_param": True, "use_pickle": True}}}
    with zipfile.ZipFile(p.inputs / "prog.pt2", "w") as z:
        z.writestr("prog/data/weights/model_weights_config.json", json.dumps(config))
        z.writestr("prog/data/weights/weight_0", pickle.dumps(_Payload(p.marker)))
    return Case(p.inputs / "prog.pt2", output=p.out / "out.pt2")


# --- calibration data


def data_corrupt_npz(p: Paths) -> Case:
    good_data = _data(p.inputs / "d.npz").read_bytes()
    (p.inputs / "d.npz").write_bytes(good_data[: len(good_data) // 2])
    return Case(_save(_model(), p.inputs / "m.onnx"), data=p.inputs / "d.npz")


def data_random_bytes(p: Paths) -> Case:
    (p.inputs / "d.npz").write_bytes(np.random.default_rng(5).integers(0, 256, 1024, dtype=np.uint8).tobytes())
    return Case(_save(_model(), p.inputs / "m.onnx"), data=p.inputs / "d.npz")


def data_wrong_name(p: Paths) -> Case:
    x = np.zeros([8, *X_SHAPE[1:]], np.float32)
    return Case(_save(_model(), p.inputs / "m.onnx"), data=_data(p.inputs / "d.npz", input=x))


def data_wrong_shape(p: Paths) -> Case:
    x = np.zeros([8, C_IN + 2, 4, 4], np.float32)
    return Case(_save(_model(), p.inputs / "m.onnx"), data=_data(p.inputs / "d.npz", x=x))


def data_wrong_rank(p: Paths) -> Case:
    x = np.zeros([8, C_IN * 16], np.float32)
    return Case(_save(_model(), p.inputs / "m.onnx"), data=_data(p.inputs / "d.npz", x=x))


def data_wrong_dtype(p: Paths) -> Case:
    x = np.zeros([8, *X_SHAPE[1:]], np.int64)
    return Case(_save(_model(), p.inputs / "m.onnx"), data=_data(p.inputs / "d.npz", x=x))


def data_strings(p: Paths) -> Case:
    x = np.full([8, *X_SHAPE[1:]], "a", dtype="<U1")
    return Case(_save(_model(), p.inputs / "m.onnx"), data=_data(p.inputs / "d.npz", x=x))


def data_empty_npz(p: Paths) -> Case:
    np.savez(p.inputs / "d.npz")
    return Case(_save(_model(), p.inputs / "m.onnx"), data=p.inputs / "d.npz")


def data_no_samples(p: Paths) -> Case:
    return Case(_save(_model(), p.inputs / "m.onnx"), data=_data(p.inputs / "d.npz", n=0))


def data_nan(p: Paths) -> Case:
    x = np.full([8, *X_SHAPE[1:]], np.nan, np.float32)
    return Case(_save(_model(), p.inputs / "m.onnx"), data=_data(p.inputs / "d.npz", x=x))


def data_pickled_object(p: Paths) -> Case:
    """An .npz whose array is a pickled object array that would run code: np.load(allow_pickle=False) only."""
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Payload(p.marker)], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(p.inputs / "d.npz", "w") as z:
        z.writestr("x.npy", buffer.getvalue())
    return Case(_save(_model(), p.inputs / "m.onnx"), data=p.inputs / "d.npz")


def data_missing(p: Paths) -> Case:
    return Case(_save(_model(), p.inputs / "m.onnx"), data=p.inputs / "nothing.npz")


def data_empty_directory(p: Paths) -> Case:
    (p.inputs / "data").mkdir()
    return Case(_save(_model(), p.inputs / "m.onnx"), data=p.inputs / "data")


# --- output that cannot be written


def out_dir_missing(p: Paths) -> Case:
    return Case(_save(_model(), p.inputs / "m.onnx"), output=p.out / "no" / "such" / "out.onnx",
                plot=p.out / "no" / "such" / "plot.png")


def out_is_directory(p: Paths) -> Case:
    (p.out / "taken.onnx").mkdir()
    return Case(_save(_model(), p.inputs / "m.onnx"), output=p.out / "taken.onnx", plot=p.out / "taken.onnx")


def out_under_a_file(p: Paths) -> Case:
    (p.out / "blocker").write_text("x")
    return Case(_save(_model(), p.inputs / "m.onnx"), output=p.out / "blocker" / "out.onnx",
                plot=p.out / "blocker" / "plot.png")


def pt2_out_dir_missing(p: Paths) -> Case:
    (p.inputs / "prog.pt2").write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: never reached
    return Case(p.inputs / "prog.pt2", output=p.out / "no" / "such" / "out.pt2")




def data_for_model_without_inputs(p: Paths) -> Case:
    """A model that reads no input (BN of a Constant) and an empty .npz: there is nothing to feed."""
    value = numpy_helper.from_array(np.ones((2, C, 2, 2), np.float32))
    nodes = [helper.make_node("Constant", [], ["c"], value=value),
             helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["y"],
                              name="bn")]
    model = _model(nodes=nodes)
    del model.graph.input[:]
    del model.graph.initializer[:2]  # W and B
    np.savez(p.inputs / "d.npz")
    return Case(_save(model, p.inputs / "m.onnx"), data=p.inputs / "d.npz")


# ------------------------------------------------------------------------------------------ checks of outputs


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def statistics_recomputed(case: Case, p: Paths) -> None:
    """calibrate replaced the corrupt variance by one estimated from the data."""
    var = _initializers(p.out / "out.onnx")["bn_var"]
    assert var.shape == (C,) and np.isfinite(var).all() and (var >= 0).all(), var


def loads_and_checks(case: Case, p: Paths) -> None:
    onnx.checker.check_model(onnx.load(str(p.out / "out.onnx")), full_check=True)


# ------------------------------------------------------------------------------------------ the expectations


@dataclass(frozen=True)
class Expect:
    """``code``: the exit code. ``text``: must be in the error line (exit 2) or on stdout (exit 0/1).
    ``writes``: what a successful run may create (relative to the case's root); ``check`` looks at it.
    ``progress_ok``: progress lines may precede the error line (only where onnxruntime alone can tell).
    ``xfail``: a known failure (strict: the test fails once it is fixed, so the mark gets removed)."""

    code: int = 2
    text: str = ""
    writes: tuple[str, ...] = ()
    check: Callable[[Case, Paths], None] | None = None
    progress_ok: bool = False
    xfail: str = ""


OUT = ("out/out.onnx",)
ONNX_COMMANDS = ("fold", "fold-noverify", "audit", "calibrate", "bench")


def every(text: str, commands=ONNX_COMMANDS, **kw) -> dict[str, Expect]:
    return {command: Expect(2, text, **kw) for command in commands}


def ok(command: str, text: str = "", check=None, code: int = 0) -> Expect:
    writes = OUT if command in ("fold", "fold-noverify", "calibrate") else ()
    return Expect(code, text, writes, check)


CASES: dict[str, tuple[Callable[[Paths], Case], dict[str, Expect]]] = {
    # Each command reaches the file through its own loader (fold: load_model_with_info, --no-verify:
    # load_model_lazily, audit: by suffix then load_model, calibrate: load_model_with_info + data, bench:
    # load_model + fold_onnx); the key inputs go through all five, variations of one through a few.
    #
    # control: the base model passes every command, so every failure below is the hostile part's doing
    "good": (good, {"fold": ok("fold", "output:", loads_and_checks),
                    "fold-noverify": ok("fold-noverify", "output:", loads_and_checks),
                    "audit": ok("audit", "result: ok"), "calibrate": ok("calibrate", "calibrated 1"),
                    "bench": ok("bench", "latency")}),
    # not a model
    "empty-file": (empty_file, every("empty file", ("fold", "fold-noverify", "audit"))),
    "random-bytes": (random_bytes, every("not an ONNX model")),
    "truncated-protobuf": (truncated, every("not an ONNX model", ("fold-noverify", "bench"))),
    "tensorproto-not-model": (tensor_proto, every("not an ONNX model", ("fold-noverify",))),
    "graphproto-not-model": (graph_proto, every("not an ONNX model (no graph)", ("audit",))),
    "text-file": (text_file, every("not an ONNX model", ("calibrate",))),
    "length-prefix-past-end": (huge_length_prefix, every("not an ONNX model", ("fold-noverify",))),
    "model-is-directory": (directory, every("is a directory", ("fold", "audit"))),
    "model-missing": (missing_file, every("no such file", ("fold-noverify", "calibrate"))),
    "no-opset-import": (no_opset, every("no opset_import", ("fold",))),
    # invalid graphs
    "cycle": (cycle, every("invalid graph")),
    "dangling-input": (dangling_input, every("invalid graph", ("fold-noverify", "audit", "calibrate"))),
    "output-never-computed": (output_never_computed, every("never computed", ("audit", "bench"))),
    "name-defined-twice": (defined_twice, every("defined twice", ("fold", "calibrate"))),
    "unknown-op": (unknown_op, {"fold": Expect(2, "onnxruntime cannot run", progress_ok=True),
                                "calibrate": Expect(2, "onnxruntime cannot run the calibration model")}),
    # BN parameters
    "bn-scale-wrong-length": (bn_scale_wrong_length, {
        **every("lengths [3, 4, 4, 4]")}),
    "bn-var-wrong-length": (bn_var_wrong_length, {"audit": Expect(2, "lengths [4, 4, 4, 6]"),
                                                  "calibrate": Expect(2, "lengths [4, 4, 4, 6]")}),
    "bn-channels-not-conv-channels": (bn_all_wrong_length, {
        "fold-noverify": Expect(2, "has 5 channels, but its input has 4"),
        "audit": Expect(2, "has 5 channels, but its input has 4"),
        "calibrate": Expect(2, "has 5 channels, but its input has 4")}),
    "raw-data-wrong-size": (raw_data_wrong_size, {
        **every("tensor 'bn_var' has 12 bytes, but its shape [4] needs 16",
                ("fold-noverify", "calibrate", "bench", "audit"))}),
    # documented checks: invalid statistics are a failed check for fold (the layer reported, nothing written,
    # exit 1; issue 12), audit reports an error finding (exit 1), calibrate recomputes the statistics from data
    "nan-variance": (nan_variance, {
        "fold": Expect(1, "invalid statistics: bn: non-finite: non-finite values in running_var"),
        "fold-noverify": Expect(1, "invalid statistics: bn: non-finite: non-finite values in running_var"),
        "audit": ok("audit", "error: non-finite", code=1),
        "calibrate": ok("calibrate", "calibrated 1", statistics_recomputed)}),
    "negative-variance": (negative_variance, {
        "fold": Expect(1, "invalid statistics: bn: negative-variance"),
        "audit": ok("audit", "error: negative-variance", code=1),
        "calibrate": ok("calibrate", "calibrated 1", statistics_recomputed)}),
    # zero-sized: a Conv with 0 output channels and a 0-channel BN is degenerate but valid ONNX
    "zero-channels": (zero_channels, {
        "fold": ok("fold", "1 before, 0 after", loads_and_checks),
        "fold-noverify": ok("fold-noverify", "1 before, 0 after", loads_and_checks),
        "audit": ok("audit", "it has no channels"), "calibrate": ok("calibrate", "it has no channels")}),
    "zero-size-batch-input": (zero_batch_input, {
        "fold": ok("fold", "1 before, 0 after", loads_and_checks),
        "calibrate": Expect(2, "input 'x' has size 0 on axis 0")}),
    # external data: never read outside the model's directory
    "external-dotdot": (ext_dotdot, every("points outside the model's directory ('../outside.bin')")),
    "external-symlink-out": (ext_symlink_out, every("points outside the model's directory ('link.bin' resolves")),
    "external-etc-passwd": (ext_absolute, every("points outside the model's directory ('/etc/passwd')",
                                                ("fold-noverify", "audit"))),
    "external-absolute-path": (ext_absolute_ours, every("points outside the model's directory",
                                                        ("fold-noverify", "bench"))),
    "external-file-missing": (ext_missing_file, every("file 'gone.bin' not found beside the model",
                                                      ("fold", "audit"))),
    "external-offset-past-end": (ext_past_end, every("asks for bytes 100000..100016 of 'w.data', which has",
                                                     ("fold-noverify", "calibrate"))),
    "external-length-not-shape": (ext_length_mismatch, every("but its shape [4] needs 16", ("fold-noverify",))),
    "external-negative-offset": (ext_negative_offset, every("asks for bytes -16..0", ("audit",))),
    "external-location-directory": (ext_location_is_directory, every("'sub' is not a regular file", ("fold",))),
    "external-data-truncated": (ext_data_file_truncated, every("which has 124", ("fold-noverify",))),
    # checkpoints (audit): nothing is ever unpickled beyond weights_only
    "pt-pickle-runs-code": (pt_pickle_runs_code, {"audit": Expect(2, "refused: loading it would need arbitrary "
                                                                     "unpickling")}),
    "pt-legacy-pickle-runs-code": (pt_legacy_pickle_runs_code, {"audit": Expect(2, "refused")}),
    "pt-random-bytes": (pt_random, {"audit": Expect(2, "not a PyTorch checkpoint readable with weights_only")}),
    "safetensors-random-bytes": (safetensors_random, {"audit": Expect(2, "not a readable .safetensors file")}),
    "safetensors-header-too-large": (safetensors_huge_header, {"audit": Expect(2, "not a readable .safetensors")}),
    "safetensors-offsets-past-end": (safetensors_offsets_past_end,
                                     {"audit": Expect(2, "not a readable .safetensors")}),
    # torch.export programs (fold, bench)
    # (each of these imports torch: about 3 s of CPU, so one command each)
    "pt2-random-bytes": (pt2_random, {"fold": Expect(2, "not a torch.export program"),
                                      "audit": Expect(2, "unrecognised file type")}),
    "pt2-zip-not-program": (pt2_zip_not_program, {"bench": Expect(2, "not a torch.export program")}),
    "pt2-pickled-weights": (pt2_pickled_weights, {"fold-noverify": Expect(2, "refused: 'conv.weight' is stored "
                                                                             "as a pickle")}),
    # calibration data
    "data-corrupt-npz": (data_corrupt_npz, every("cannot read calibration data", ("calibrate", "audit-data"))),
    "data-random-bytes": (data_random_bytes, every("not an .npz archive", ("calibrate",))),
    "data-wrong-name": (data_wrong_name, every("missing input(s) x; unknown array(s) input",
                                               ("calibrate", "audit-data"))),
    "data-wrong-shape": (data_wrong_shape, every("has size 5 on axis 1, but the model expects 3", ("calibrate",))),
    "data-wrong-rank": (data_wrong_rank, every("has rank 2", ("calibrate",))),
    "data-wrong-dtype": (data_wrong_dtype, every("has dtype int64, but the model expects a float",
                                                 ("calibrate",))),
    "data-strings": (data_strings, every("unsupported dtype", ("calibrate",))),
    "data-empty-npz": (data_empty_npz, every("missing input(s) x", ("calibrate",))),
    "data-no-samples": (data_no_samples, every("holds no samples", ("calibrate",))),
    "data-nan": (data_nan, every("NaN or infinite statistics", ("calibrate",))),
    "data-pickled-object": (data_pickled_object, every("Object arrays cannot be loaded", ("calibrate",))),
    "data-missing": (data_missing, every("no such file or directory", ("calibrate", "audit-data"))),
    "data-empty-directory": (data_empty_directory, every("holds no .npy or .npz files", ("calibrate",))),
    "data-model-without-inputs": (data_for_model_without_inputs, every("the model has no inputs",
                                                                       ("calibrate",))),
    # outputs that cannot be written: -o (fold, calibrate) and --plot (bench, audit)
    "output-dir-missing": (out_dir_missing, every("does not exist")),
    "output-is-directory": (out_is_directory, every("output is a directory", ("calibrate", "bench", "audit"))),
    "output-under-a-file": (out_under_a_file, every("does not exist", ("fold-noverify", "audit"))),
    "pt2-output-dir-missing": (pt2_out_dir_missing, every("does not exist", ("fold",))),
    # bench's FOLDED argument
    "bench-folded-random-bytes": (random_bytes, every("not an ONNX model", ("bench-folded",))),
    "bench-folded-cycle": (cycle, every("invalid graph", ("bench-folded",))),
}


# ------------------------------------------------------------------------------------------------- running


def command_args(command: str, case: Case, p: Paths) -> list[str]:
    output = str(case.output or p.out / "out.onnx")
    bench = ["--repeat", "1", "--warmup", "0", "--providers", "cpu"]
    if case.model.suffix != ".pt2":
        bench += ["--opt-level", "disabled"]
    plot = ["--plot", str(case.plot)] if case.plot else []
    return {
        "fold": [str(case.model), "-o", output],
        "fold-noverify": [str(case.model), "-o", output, "--no-verify"],
        "audit": ["audit", str(case.model), *plot],
        "audit-data": ["audit", str(case.model), "--data", str(case.data)],
        "calibrate": ["calibrate", str(case.model), "--data", str(case.data), "-o", output],
        "bench": ["bench", str(case.model), *bench, *plot],
        "bench-folded": ["bench", str(p.inputs / "base.onnx"), str(case.model), *bench],
    }[command]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: relative path -> content hash, 'dir' or 'link -> target'."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _third_party(rel: str) -> bool:
    """What the libraries bnfold calls leave in $TMPDIR on their own: onnxruntime's session id file and torch's
    inductor cache directory (created on import). Not bnfold's temporary files, which must all be gone."""
    return rel == "tmp/.ses" or rel.startswith("tmp/torchinductor_")


@dataclass
class Outcome:
    case: Case
    paths: Paths
    proc: subprocess.CompletedProcess
    before: dict[str, str]
    after: dict[str, str]


def _prepare(name: str, command: str, root: Path) -> tuple[Case, Paths, list[str], dict[str, str]]:
    p = Paths(root)
    case = CASES[name][0](p)
    if command in ("calibrate", "audit-data") and case.data is None:
        case.data = _data(p.inputs / "d.npz")
    if command == "bench-folded":
        _save(_model(), p.inputs / "base.onnx")
    return case, p, command_args(command, case, p), snapshot(root)


def _run(case: Case, p: Paths, args: list[str], before: dict[str, str]) -> Outcome:
    env = dict(os.environ, TMPDIR=str(p.root / "tmp"), PYTHONWARNINGS="default::ResourceWarning")
    env.pop("BNFOLD_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "bnfold", *args], capture_output=True, text=True,
                          cwd=p.root / "cwd", env=env, timeout=300, check=False)
    return Outcome(case, p, proc, before, snapshot(p.root))


PAIRS = [pytest.param(name, command, id=f"{name}:{command}",
                      marks=[pytest.mark.xfail(strict=True, reason=expect.xfail)] if expect.xfail else [])
         for name, (_, expects) in CASES.items() for command, expect in expects.items()]


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict[tuple[str, str], Outcome]:
    """Every selected (case, command) pair, run as subprocesses a few at a time: the CLI's start-up (imports)
    dominates, and the pairs are independent, each in its own directory."""
    from concurrent.futures import ThreadPoolExecutor

    wanted = [(item.callspec.params["name"], item.callspec.params["command"]) for item in request.session.items
              if getattr(item, "originalname", "") == "test_hostile_input"]
    jobs = {}
    for name, command in wanted:  # builders run here, one at a time; only the subprocesses run in parallel
        root = tmp_path_factory.mktemp(f"{name}-{command}".replace(":", "-"), numbered=True)
        jobs[(name, command)] = _prepare(name, command, root)
    workers = min(6, (os.cpu_count() or 2) + 1)
    with ThreadPoolExecutor(workers) as pool:
        futures = {key: pool.submit(_run, *job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


# What commands print to stderr while they work (fold's summary line, verification, bench's steps).
PROGRESS = re.compile(r"\S+: \d+ folds, BatchNormalization \d+ -> \d+$|verifying in onnxruntime|folded |timing ")


@pytest.mark.parametrize("name, command", PAIRS)
def test_hostile_input(name, command, outcomes):
    expect = CASES[name][1][command]
    o = outcomes[(name, command)]
    out, err = o.proc.stdout, o.proc.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    where = f"exit {o.proc.returncode}\nstderr:\n{err}\nstdout:\n{out}"
    assert "Traceback" not in err and "ResourceWarning" not in err, where  # (unclosed files are reported)
    assert o.proc.returncode == expect.code, where
    if expect.code == 2:
        assert out == "", where
        if expect.progress_ok:  # the error line last, after lines the command prints while it works
            assert all(PROGRESS.match(line) for line in lines[:-1]), where
            lines = lines[-1:]
        assert len(lines) == 1, where
        [line] = lines
        assert line.startswith("bnfold: error: ") and expect.text in line, where
        assert "InputError" not in line and "warnings above" not in line, where  # the message, not its class
    else:
        assert expect.text in out, where
        assert not any(line.startswith("bnfold:") for line in lines), where
    assert not o.paths.marker.exists(), "code in a pickle ran"
    changed = {rel for rel in o.before.keys() | o.after.keys() if o.before.get(rel) != o.after.get(rel)}
    changed = {rel for rel in changed if not _third_party(rel)}
    assert changed == set(expect.writes), f"inputs changed or files left behind: {sorted(changed)}\n{where}"
    if expect.check is not None:
        expect.check(o.case, o.paths)


def test_every_required_input_is_covered():
    """The issue's list, by case name: at least 25 hostile inputs, each run by at least one command."""
    required = {"empty-file", "random-bytes", "truncated-protobuf", "tensorproto-not-model", "text-file", "cycle",
                "dangling-input", "bn-scale-wrong-length", "nan-variance", "negative-variance", "zero-channels",
                "zero-size-batch-input", "external-dotdot", "external-etc-passwd", "external-symlink-out",
                "external-file-missing", "external-offset-past-end", "pt-pickle-runs-code", "pt-random-bytes",
                "safetensors-random-bytes", "data-corrupt-npz", "data-wrong-name", "data-wrong-shape",
                "data-wrong-dtype", "data-empty-npz", "output-dir-missing", "pt2-random-bytes",
                "pt2-zip-not-program", "model-is-directory"}
    assert required <= set(CASES)
    assert len(CASES) - 1 >= 25
    writers = {command for command, e in CASES["output-dir-missing"][1].items()}
    assert writers == {"fold", "fold-noverify", "calibrate", "bench", "audit"}
