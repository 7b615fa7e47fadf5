"""Fold BatchNorm in a ``torch.export`` program (``.pt2`` saved with ``torch.export.save``).

The program's module (``ExportedProgram.module()``) is an fx graph of ATen calls whose weights are ``get_attr``
nodes; this pass applies the same exact folds as :mod:`bnfold.torch.fold` to those calls, with ranks read from
the shapes the exporter recorded, then exports the result again with the same example inputs and dynamic
dimensions.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..affine import FoldRefused
from ..errors import InputError, first_line, require_file
from ..report import Fold, FoldReport, Skip
from .fold import _affine, _Affine, _plan_after, _plan_before, _prove_channel_axis

aten = torch.ops.aten
_CONV = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
_CONV_TRANSPOSE = {aten.conv_transpose1d.default: 1, aten.conv_transpose2d.input: 2, aten.conv_transpose3d.input: 3}
_BATCHNORM = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


class _Layer:
    """The attributes of a Conv/ConvTranspose/Linear call that the shared fold math reads."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node):
        self.node = node
        self.kind = "linear" if node.target == aten.linear.default else \
            "convtranspose" if node.target in _CONV_TRANSPOSE else "conv"
        args = list(node.args) + [None] * 8
        self.weight = _tensor(gm, args[1])
        self.bias = _tensor(gm, args[2]) if args[2] is not None else None
        if self.kind == "conv":
            self.padding, self.groups = args[4] if args[4] is not None else 0, args[6] if args[6] is not None else 1
        elif self.kind == "convtranspose":
            self.padding, self.groups = args[4] if args[4] is not None else 0, args[6] if args[6] is not None else 1
        else:
            self.padding, self.groups = 0, 1
        if isinstance(self.padding, int):
            self.padding = (self.padding,)
        self.kernel_size = tuple(self.weight.shape[2:])
        self.padding_mode = "zeros"


def _tensor(gm: fx.GraphModule, arg) -> torch.Tensor | None:
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    owner_path, _, leaf = arg.target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return getattr(owner, leaf)


def _rank(node: fx.Node) -> int | None:
    value = node.meta.get("val")
    return value.dim() if isinstance(value, torch.Tensor) else None


def fold_exported(program) -> tuple["torch.export.ExportedProgram", FoldReport]:
    """Fold BatchNorm calls of an ExportedProgram; return a new program and the report."""
    gm = program.module()
    report = FoldReport()
    batchnorms = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _BATCHNORM]
    report.bn_before = len(batchnorms)
    for node in batchnorms:
        outcome = _fold_one(gm, node)
        if isinstance(outcome, Fold):
            report.folded.append(outcome)
        else:
            report.skipped.append(Skip(node.name, outcome, op_type=str(node.target)))
    report.bn_after = len(report.skipped)
    _drop_unused_tensors(gm)
    gm.graph.lint()
    gm.recompile()
    args, kwargs = program.example_inputs if program.example_inputs is not None else (None, None)
    if args is None:
        raise InputError("the exported program carries no example inputs to export the folded program with")
    folded = torch.export.export(gm, args, kwargs or None, dynamic_shapes=_dynamic_shapes(program, args))
    return folded, report


def _drop_unused_tensors(gm: fx.GraphModule) -> None:
    """Remove get_attr nodes nobody reads and the parameters/buffers no get_attr reads any more (the folded
    BatchNorm's statistics, weights replaced by their folded copies)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in read:
            owner_path, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner_path) if owner_path else gm, leaf)


def _dynamic_shapes(program, args):
    """Dim.AUTO for every dimension that was symbolic in the original program, so it stays dynamic."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user_inputs = [p for p in placeholders if p.name in set(program.graph_signature.user_inputs)]
    if len(user_inputs) != len(args):
        return None
    specs, dynamic = [], False
    for node in user_inputs:
        value = node.meta.get("val")
        spec = {}
        if isinstance(value, torch.Tensor):
            for i, size in enumerate(value.shape):
                if not isinstance(size, int):
                    spec[i] = torch.export.Dim.AUTO
                    dynamic = True
        specs.append(spec or None)
    return tuple(specs) if dynamic else None


def _normalization(gm: fx.GraphModule, node: fx.Node) -> tuple[_Affine | str, fx.Node, fx.Node]:
    """(affine or reason, the BN's input, the node whose users read the BN output)."""
    args = list(node.args)
    x, weight, bias, mean, var = args[:5]
    if node.target == aten.batch_norm.default:
        training, eps, output = args[5], args[7], node
    else:  # _native_batch_norm_legit_no_training returns (output, save_mean, save_var)
        training, eps = False, args[6]
        readers = list(node.users)
        if any(r.target is not __import__("operator").getitem or r.args[1] != 0 for r in readers) or len(readers) != 1:
            return "its statistics outputs are used", x, node
        output = readers[0]
    if training:
        return "training mode: it normalizes by batch statistics", x, output
    tensors = [_tensor(gm, a) if a is not None else None for a in (weight, bias, mean, var)]
    if tensors[2] is None or tensors[3] is None:
        return "running statistics are not constant", x, output
    if (weight is not None and tensors[0] is None) or (bias is not None and tensors[1] is None):
        return "scale or shift is not constant", x, output
    scale = tensors[0] if tensors[0] is not None else torch.ones_like(tensors[2])
    shift = tensors[1] if tensors[1] is not None else torch.zeros_like(tensors[2])
    return _affine(scale, shift, tensors[2], tensors[3], float(eps), None), x, output


def _fold_one(gm: fx.GraphModule, node: fx.Node) -> Fold | str:
    affine, x, output = _normalization(gm, node)
    if isinstance(affine, str):
        return affine
    reasons = []
    for attempt in (_fold_after, _fold_before):
        outcome = attempt(gm, node, affine, x, output)
        if isinstance(outcome, Fold):
            return outcome
        if outcome:
            reasons.append(outcome)
    return "; ".join(reasons) or "no Conv/ConvTranspose/Linear next to it whose output (or input) it alone reads"


def _is_linear_call(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and (
        node.target in _CONV or node.target in _CONV_TRANSPOSE or node.target == aten.linear.default)


def _fold_after(gm, bn: fx.Node, affine: _Affine, x, output: fx.Node) -> Fold | str:
    if not _is_linear_call(x):
        return ""
    layer = _Layer(gm, x)
    label = f"{x.target} '{x.name}'"
    if layer.weight is None or (len(x.args) > 2 and x.args[2] is not None and layer.bias is None):
        return f"weight or bias of {label} is not constant"
    if len(x.users) != 1:
        return f"the output of {label} is also used elsewhere ({len(x.users)} users)"
    channels = layer.weight.shape[0] if layer.kind != "convtranspose" else layer.weight.shape[1] * layer.groups
    if channels != affine.s.shape[0]:
        return f"{label} writes {channels} channels, the BatchNorm has {affine.s.shape[0]}"
    reason = _prove_channel_axis(layer, layer.kind, _rank(x), affine)
    if reason:
        return reason
    return _commit(gm, bn, output, x, lambda: _plan_after(layer, layer.kind, affine), x, f"{layer.kind}-bn")


def _fold_before(gm, bn: fx.Node, affine: _Affine, x, output: fx.Node) -> Fold | str:
    if len(output.users) != 1:
        return ""
    consumer, via = next(iter(output.users)), None
    if consumer.op == "call_function" and consumer.target == aten.flatten.using_ints and \
            list(consumer.args[1:]) in ([1], [1, -1]) and len(consumer.users) == 1:
        via, consumer = consumer, next(iter(consumer.users))
    if not _is_linear_call(consumer) or consumer.args[0] is not (via or output):
        return ""
    layer = _Layer(gm, consumer)
    label = f"{consumer.target} '{consumer.name}'"
    if layer.kind == "convtranspose" or (via is not None and layer.kind != "linear"):
        return ""
    if layer.weight is None or (len(consumer.args) > 2 and consumer.args[2] is not None and layer.bias is None):
        return f"weight or bias of {label} is not constant"
    s, t = affine.s, affine.t
    if layer.kind == "conv":
        padding = layer.padding
        if (isinstance(padding, str) and padding == "same" and any(k != 1 for k in layer.kernel_size)) or \
                (not isinstance(padding, str) and any(p != 0 for p in padding)):
            return f"{label} pads its input (padding={padding}): the shift would not reach the padded border"
        if layer.weight.shape[1] * layer.groups != s.shape[0]:
            return f"{label} reads {layer.weight.shape[1] * layer.groups} channels, the BatchNorm has {s.shape[0]}"
    else:
        if via is None and _rank(output) != 2:
            return f"{label} contracts the last dimension of a rank-{_rank(output)} tensor, not the BatchNorm's"
        features = layer.weight.shape[1]
        if features % s.shape[0]:
            return f"{label} reads {features} features, not a multiple of {s.shape[0]} channels"
        s, t = np.repeat(s, features // s.shape[0]), np.repeat(t, features // s.shape[0])
    return _commit(gm, bn, output, consumer, lambda: _plan_before(layer, layer.kind, s, t), x, f"bn-{layer.kind}")


def _commit(gm, bn: fx.Node, output: fx.Node, call: fx.Node, plan, replacement: fx.Node, rule: str) -> Fold | str:
    """Do the math (a refusal leaves the graph as it was), then give the call its new tensors and drop the BN."""
    try:
        new_w, new_b = plan()
    except FoldRefused as exc:
        return str(exc)
    _set_params(gm, call, new_w, new_b)
    output.replace_all_uses_with(replacement)
    for dead in (output, bn) if output is not bn else (bn,):
        gm.graph.erase_node(dead)
    return Fold(bn.name, call.name, rule)


def _set_params(gm: fx.GraphModule, call: fx.Node, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Give this call its folded weight and bias. A tensor only this call reads is replaced under its own name;
    a shared one (or a missing bias) becomes a new parameter next to the weight, so other readers keep theirs."""
    args = list(call.args) + [None] * max(0, 3 - len(call.args))
    weight_node = args[1]
    owner_path = weight_node.target.rpartition(".")[0]
    for slot, value, leaf in ((1, weight, "weight"), (2, bias, "bias")):
        node = args[slot]
        if isinstance(node, fx.Node) and node.op == "get_attr" and len(node.users) == 1 and \
                sum(n.op == "get_attr" and n.target == node.target for n in gm.graph.nodes) == 1:
            path, _, name = node.target.rpartition(".")
            setattr(gm.get_submodule(path) if path else gm, name, nn.Parameter(value, requires_grad=False))
            continue
        owner = gm.get_submodule(owner_path) if owner_path else gm
        name = _unique_attr(owner, leaf if node is None else f"{leaf}_bnfold")
        owner.register_parameter(name, nn.Parameter(value, requires_grad=False))
        with gm.graph.inserting_before(call):
            args[slot] = gm.graph.get_attr(f"{owner_path}.{name}" if owner_path else name)
    call.args = tuple(args)


def _unique_attr(owner: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    return name


def without_batchnorm(program) -> fx.GraphModule:
    """The program's module with every BatchNorm call removed (its input passed on): the latency floor of any fold,
    not the same function. A training-mode call whose batch statistics are read is kept."""
    import operator

    gm = program.module()
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _BATCHNORM]:
        x = node.args[0]
        if node.target == aten.batch_norm.default:
            node.replace_all_uses_with(x)
        else:
            users = list(node.users)
            if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
                continue
            for user in users:
                user.replace_all_uses_with(x)
                gm.graph.erase_node(user)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    _drop_unused_tensors(gm)
    gm.recompile()
    return gm


def benchmark_program(program, folded=None, *, devices=None, warmup: int = 5, repeat: int = 30,
                      threads: int | None = None, progress=None):
    """Time a ``torch.export`` program, its folded form (``folded``, or folded here) and the ideal (every BatchNorm
    call removed) in eager mode on each device, with :func:`bnfold.torch.benchmark` on the program's example
    inputs. Returns a :class:`bnfold.bench.BenchReport` (``opt_level`` is ``"eager"``, no session times);
    a CUDA device that is not there is reported unavailable."""
    import time

    from ..bench import BenchReport, BenchResult, ModelTiming
    from .verify import _cuda_missing, _resolve_devices, benchmark

    say = progress or (lambda _line: None)
    if program.example_inputs is None:
        raise InputError("the exported program carries no example inputs to time it with")
    args, kwargs = program.example_inputs
    if kwargs:
        raise InputError("programs with keyword example inputs are not supported by bench")
    fold_ms = fold_report = None
    if folded is None:
        say("folding the program in memory")
        start = time.perf_counter()
        folded, fold_report = fold_exported(program)
        fold_ms = (time.perf_counter() - start) * 1e3
    ideal = without_batchnorm(program)
    count = lambda gm: sum(n.op == "call_function" and n.target in _BATCHNORM for n in gm.graph.nodes)  # noqa: E731
    original_module, folded_module = program.module(), folded.module()
    report = BenchReport(
        model="<program>", folded_from="given" if fold_report is None else "folded in memory",
        bn_original=count(original_module), bn_folded=count(folded_module), bn_ideal=count(ideal),
        inputs={f"arg{i}": list(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)},
        warmup=warmup, fold_ms=fold_ms, fold=fold_report)
    for name, device in _resolve_devices(devices):
        if device.type == "cuda" and _cuda_missing(device):
            report.results.append(BenchResult(name, "eager", available=False, reason=_cuda_missing(device)))
            continue
        say(f"timing original, folded and ideal on {name} (eager)")
        timed = benchmark(original_module, folded_module, tuple(args), ideal=ideal, device=device, warmup=warmup,
                          repeat=repeat, threads=threads)
        report.results.append(BenchResult(
            name, "eager", threads=timed.threads, rounds=timed.repeat,
            timings={"original": ModelTiming(None, timed.original), "folded": ModelTiming(None, timed.folded),
                     "ideal": ModelTiming(None, timed.ideal)}))
    return report


def load_program(path: "str | os.PathLike"):
    """torch.export.load with one-line errors, after checking that nothing in the archive needs unpickling."""
    path = require_file(path, "a torch.export program")
    _refuse_pickles(path)
    # torch logs the real error with a traceback, then raises one that points at "the warnings above": keep the
    # log quiet, and name the logged error instead.
    logger = logging.getLogger("torch.export")
    logged = _LoggedError()
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [logged], False
    try:
        return torch.export.load(str(path))
    except Exception as exc:
        cause = logged.error if logged.error is not None and "warnings above" in str(exc) else exc
        first = first_line(str(cause)).split("  (Could this error message be improved?")[0].rstrip()
        raise InputError(f"{path}: not a torch.export program ({type(cause).__name__}: {first})") from None
    finally:
        logger.handlers, logger.propagate = handlers, propagate


class _LoggedError(logging.Handler):
    """Remembers the last exception logged with exc_info, and prints nothing."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.error = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.error = record.exc_info[1]


def _refuse_pickles(path: Path) -> None:
    """torch.export.load unpickles (``weights_only=False``) weights or constants marked ``use_pickle``, opaque
    objects, and example inputs that a safe load rejects: any of those could run code. Look before loading."""
    from torch.export.pt2_archive.constants import TENSOR_CONSTANT_FILENAME_PREFIX

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path}: not a torch.export program ({exc})") from None
    with archive:
        for name in archive.namelist():
            inner = name.split("/", 1)[-1]  # entries sit under the archive's own root folder
            try:
                if inner.startswith(("data/weights/", "data/constants/")) and inner.endswith("_config.json"):
                    for fqn, payload in json.loads(archive.read(name)).get("config", {}).items():
                        plain = not payload.get("use_pickle") and (
                            inner.startswith("data/weights/")
                            or str(payload.get("path_name", "")).startswith(TENSOR_CONSTANT_FILENAME_PREFIX))
                        if not plain:
                            raise InputError(f"{path}: refused: '{fqn}' is stored as a pickle, which could run code "
                                             "when loaded (re-save the program with plain tensors)")
                elif inner.startswith("data/sample_inputs/"):
                    with warnings.catch_warnings():  # torch warns about what it refuses; the error says it
                        warnings.simplefilter("ignore")
                        torch.load(io.BytesIO(archive.read(name)), weights_only=True)
            except InputError:
                raise
            except Exception as exc:
                raise InputError(f"{path}: refused: '{inner}' can not be read safely ({type(exc).__name__}); it "
                                 "may need arbitrary unpickling") from None


def save_program(program, path: "str | os.PathLike") -> None:
    """torch.export.save to a temporary file beside ``path``, then rename: no partial output."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path}: output directory {path.parent} does not exist")
    tmp_dir = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        tmp = Path(tmp_dir) / path.name
        torch.export.save(program, str(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
