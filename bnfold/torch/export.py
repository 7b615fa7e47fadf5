"""Fold batch norms on torch.export's ATen graph: ``.pt2`` programs (``bnfold MODEL.pt2``), and modules torch.fx
can not trace (``fold_module`` comes here when sizes are read at run time, for example).

The program's module (``ExportedProgram.module()``) is an fx graph of ATen calls whose weights are ``get_attr``
nodes; every batch-norm call the forward runs is one node there, whatever module computed it. This pass applies the
same exact folds as :mod:`bnfold.torch.fold` (the layer table and checks of :mod:`bnfold.torch.ops`), with ranks
read from the shapes the exporter recorded. A saved program is exported again with the same example inputs and
dynamic dimensions.
"""

from __future__ import annotations

import io
import json
import logging
import operator
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..affine import FoldRefused
from ..errors import InputError, first_line, require_file
from ..report import Fold, FoldReport, Skip
from .ops import (ATEN_BATCHNORM, Affine, ExactWeights, Plan, Refusal, affine_from_stats, aten_layer, before_scales,
                  check_after, exact_after, exact_before, first_refusal, frozen_affine, refusal_of, to_torch)

aten = torch.ops.aten


def _tensor(gm: fx.GraphModule, arg) -> torch.Tensor | None:
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    owner_path, _, leaf = arg.target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    value = getattr(owner, leaf, None)
    return value if isinstance(value, torch.Tensor) else None


def _rank(node) -> int | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


_SHAPE_READS = {aten.sym_size.int, aten.sym_size.default, aten.sym_numel.default, aten.sym_stride.int,
                aten.sym_stride.default, aten.sym_storage_offset.default}


def _value_users(node: fx.Node) -> list[fx.Node]:
    """The users of a node that read its values: a fold keeps every shape, so shape reads do not count."""
    return [u for u in node.users if not (u.op == "call_function" and u.target in _SHAPE_READS)]


def is_batchnorm_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in ATEN_BATCHNORM


def module_path(node: fx.Node) -> str:
    """The qualified name of the module whose forward made the call (innermost), or the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [value[0] for value in stack.values() if isinstance(value, tuple) and value and value[0]]
    return paths[-1] if paths else node.name


def fold_exported(program) -> tuple["torch.export.ExportedProgram", FoldReport]:
    """Fold batch-norm calls of an ExportedProgram; return a new program and the report."""
    gm = program.module()
    report = FoldReport()
    fold_aten_graph(gm, report)
    args, kwargs = program.example_inputs if program.example_inputs is not None else (None, None)
    if args is None:
        raise InputError("the exported program carries no example inputs to export the folded program with")
    folded = torch.export.export(gm, args, kwargs or None, dynamic_shapes=_dynamic_shapes(program, args))
    return folded, report


def fold_aten_graph(gm: fx.GraphModule, report: FoldReport, *, keep=frozenset(), applied=None,
                    exact: ExactWeights | None = None) -> None:
    """Fold every batch-norm call of an ATen-level GraphModule in place, as far as it folds exactly. ``keep``: names
    of batch norms to leave (Skip code ``needs-graph-module``); ``applied``: a list that receives the plans made;
    ``exact``: the float64 weights of the layers folded (a second fold into a layer, and the merges of
    :func:`bnfold.torch.merge.merge_graph`, start from them)."""
    exact = ExactWeights() if exact is None else exact
    batchnorms = [n for n in gm.graph.nodes if is_batchnorm_call(n) or _frozen(gm, n) is not None]
    report.bn_before += len(batchnorms)
    for node in batchnorms:
        outcome = _plan(gm, node, exact)
        if isinstance(outcome, Plan) and outcome.bn in keep:
            outcome = Refusal("needs-graph-module", "folding it is proven on the trace, but it can not be written "
                                                    "into the module's own class")
        if isinstance(outcome, Plan):
            report.folded.append(apply_plan(gm, outcome, exact))
            if applied is not None:
                applied.append(outcome)
        else:
            report.skipped.append(Skip(module_path(node), outcome.reason, op_type=str(node.target),
                                       code=outcome.code))
            report.bn_after += 1
    drop_unused_tensors(gm)
    gm.graph.lint()
    gm.recompile()


class _FunctionalBatchNorm(nn.Module):
    """A frozen batch norm (buffers and arithmetic) as the one ``F.batch_norm`` call it computes, so that the
    ATen graph shows it as a batch norm. Same buffer names, so the folded names stay the user's."""

    def __init__(self, frozen: nn.Module):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, getattr(frozen, name))
        self.eps = float(frozen.eps)

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def fold_module_exported(module: nn.Module, example_inputs, report: FoldReport, *, keep=frozenset(),
                         applied=None, exact: ExactWeights | None = None) -> nn.Module | None:
    """Export ``module`` on ``example_inputs`` (every dimension dynamic where the forward allows it) and fold the
    ATen graph (``keep``, ``applied``, ``exact``: as for :func:`fold_aten_graph`); the folded module, or None (with
    a note in the report) when torch.export can not trace it."""
    from .fold import copy_module, is_frozen_batchnorm, module_affine

    frozen = [name for name, m in module.named_modules() if name and is_frozen_batchnorm(m)
              and isinstance(module_affine(m), Affine)]
    if frozen:
        module = copy_module(module)
        for name in frozen:
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            setattr(owner, leaf, _FunctionalBatchNorm(getattr(owner, leaf)))
    tensors = [x for x in example_inputs]
    dynamic = tuple({i: torch.export.Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None
                    for x in tensors)
    program, errors = None, []
    for shapes in (dynamic, None):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(module, tuple(tensors), dynamic_shapes=shapes, strict=False)
            break
        except Exception as exc:
            errors.append(first_line(exc, with_type=True, max_chars=200))
    if program is None:
        report.notes.append(f"torch.export could not trace the module either ({errors[-1]})")
        return None
    gm = program.module()
    fold_aten_graph(gm, report, keep=keep, applied=applied, exact=exact)
    for m in gm.modules():  # the graph was exported in eval mode; its eval() refuses to run, so say it directly
        m.training = False
    report.notes.append("the result is torch.export's module: it accepts the input shapes the export allowed "
                        "(every dimension is dynamic where the forward allows it)")
    return gm


def drop_unused_tensors(gm: fx.GraphModule) -> None:
    """Remove get_attr nodes nobody reads and the parameters/buffers no get_attr reads any more (the folded
    batch norm's statistics, weights replaced by their folded copies)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}  # convolutions a merge added
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in read and name.rpartition(".")[0] not in called:
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


def _frozen(gm: fx.GraphModule, node: fx.Node):
    """A frozen batch norm written as arithmetic (see :func:`bnfold.torch.ops.frozen_affine`) whose constants
    broadcast along dimension 1 of its input, or None."""
    found = frozen_affine(node, lambda a: _tensor(gm, a))
    if found is None or (isinstance(found[2], Affine) and _rank(found[0]) not in found[2].ranks):
        return None
    return found


def _normalization(gm: fx.GraphModule, node: fx.Node) -> tuple[Affine | Refusal, fx.Node, fx.Node, list]:
    """(affine or refusal, the batch norm's input, the node whose users read its output, the nodes a fold
    removes)."""
    if node.target not in ATEN_BATCHNORM:
        x, nodes, affine, _ = _frozen(gm, node)
        return affine, x, node, nodes
    affine, x, output = _batchnorm_call(gm, node)
    return affine, x, output, [output, node] if output is not node else [node]


def _batchnorm_call(gm: fx.GraphModule, node: fx.Node) -> tuple[Affine | Refusal, fx.Node, fx.Node]:
    """(affine or refusal, the batch norm's input, the node whose users read its output)."""
    training_i, eps_i, returns_tuple = ATEN_BATCHNORM[node.target]
    args = list(node.args)
    x, weight, bias, mean, var = (args + [None] * 5)[:5]
    output = node
    if returns_tuple:  # (output, save_mean, save_var, ...): only output 0 may be read
        readers = list(node.users)
        if len(readers) != 1 or readers[0].target is not operator.getitem or readers[0].args[1] != 0:
            return Refusal("statistics-read", "its saved mean/variance outputs are used"), x, node
        output = readers[0]
    training = args[training_i] if training_i is not None and training_i < len(args) else False
    if training is not False:
        return Refusal("training-mode", "training mode: it normalizes by batch statistics"), x, output
    tensors = [_tensor(gm, a) if a is not None else None for a in (weight, bias, mean, var)]
    if tensors[2] is None or tensors[3] is None:
        return Refusal("non-constant", "running statistics are not constant"), x, output
    if (weight is not None and tensors[0] is None) or (bias is not None and tensors[1] is None):
        return Refusal("non-constant", "scale or shift is not constant"), x, output
    return affine_from_stats(tensors[0], tensors[1], tensors[2], tensors[3], float(args[eps_i])), x, output


def _plan(gm: fx.GraphModule, node: fx.Node, exact: ExactWeights) -> Plan | Refusal:
    affine, x, output, nodes = _normalization(gm, node)
    if isinstance(affine, Refusal):
        return affine
    after = _plan_after(gm, node, affine, x, output, nodes, exact)
    if isinstance(after, Plan):
        return after
    before = _plan_before(gm, node, affine, x, output, nodes, exact)
    return before if isinstance(before, Plan) else first_refusal(after, before)


def _layer(gm, node):
    return aten_layer(node, lambda arg: _tensor(gm, arg)) if isinstance(node, fx.Node) else None


def _plan_after(gm, bn: fx.Node, affine: Affine, x, output: fx.Node, nodes: list, exact: ExactWeights
                ) -> Plan | Refusal | None:
    layer = _layer(gm, x)
    if layer is None or isinstance(layer, Refusal):
        return layer
    label = f"{x.target} '{module_path(x)}'"
    readers = _value_users(x)
    if len(readers) != 1:
        return Refusal("output-read-elsewhere", f"the output of {label} is also used elsewhere "
                                                f"({len(readers)} users)")
    refusal = check_after(layer, affine, _rank(x), label)
    if refusal:
        return refusal
    try:
        values = exact_after(layer, affine, exact.of(layer.weight, layer.bias))
        weight, bias = to_torch(values[0], layer.weight), to_torch(values[1], layer.weight)
    except FoldRefused as exc:
        return refusal_of(exc, statistics=False)
    return Plan(module_path(bn), module_path(x), f"{layer.kind.name}-bn", x, weight, bias, bypass=output,
                replacement=x, remove=nodes, exact=values)


def _plan_before(gm, bn: fx.Node, affine: Affine, x, output: fx.Node, nodes: list, exact: ExactWeights
                 ) -> Plan | Refusal | None:
    readers = _value_users(output)
    if len(readers) != 1:
        return None
    consumer, via = readers[0], None
    if consumer.op == "call_function" and consumer.target == aten.flatten.using_ints and \
            list(consumer.args[1:]) in ([1], [1, -1]) and len(_value_users(consumer)) == 1:
        via, consumer = consumer, _value_users(consumer)[0]
    layer = _layer(gm, consumer)
    if layer is None or isinstance(layer, Refusal) or consumer.args[0] is not (via or output):
        return layer if isinstance(layer, Refusal) else None
    label = f"{consumer.target} '{module_path(consumer)}'"
    if via is not None and layer.kind.name != "linear":
        return None
    scales = before_scales(layer, affine, _rank(output), via is not None, label)
    if isinstance(scales, Refusal):
        return scales
    try:
        values = exact_before(layer, *scales, exact.of(layer.weight, layer.bias))
        weight, bias = to_torch(values[0], layer.weight), to_torch(values[1], layer.weight)
    except FoldRefused as exc:
        return refusal_of(exc, statistics=False)
    return Plan(module_path(bn), module_path(consumer), f"bn-{layer.kind.name}", consumer, weight, bias,
                bypass=output, replacement=x, remove=nodes, exact=values)


def apply_plan(gm: fx.GraphModule, plan: Plan, exact: ExactWeights | None = None) -> Fold:
    """Give the plan's layer call its new tensors (their float64 values into ``exact``), route the bypassed output to
    the replacement, drop the batch norm's nodes."""
    replaced = _layer(gm, plan.layer)
    weight, bias = _set_params(gm, plan.layer, plan.weight, plan.bias)
    plan.bypass.replace_all_uses_with(plan.replacement)
    for dead in plan.remove:
        if not dead.users:  # a constant the normalization computed may feed something else too
            gm.graph.erase_node(dead)
    if exact is not None and plan.exact is not None:
        from .merge import may_be_merged

        exact.drop(replaced.weight)
        exact.keep(replaced.kind, weight, bias, plan.exact, wanted=may_be_merged(gm, plan.layer))
    return Fold(plan.bn, plan.into, plan.rule)


def _set_params(gm: fx.GraphModule, call: fx.Node, weight: torch.Tensor, bias: torch.Tensor
                ) -> tuple[nn.Parameter, nn.Parameter]:
    """Give this call its folded weight and bias (returned, as the parameters the call now reads). A tensor only
    this call reads is replaced under its own name; a shared one (or a missing bias) becomes a new parameter next
    to the weight, so other readers keep theirs."""
    args = list(call.args) + [None] * max(0, 3 - len(call.args))
    weight_node = args[1]
    owner_path = weight_node.target.rpartition(".")[0]
    written = []
    for slot, value, leaf in ((1, weight, "weight"), (2, bias, "bias")):
        node = args[slot]
        parameter = nn.Parameter(value, requires_grad=False)
        written.append(parameter)
        if isinstance(node, fx.Node) and node.op == "get_attr" and len(node.users) == 1 and \
                sum(n.op == "get_attr" and n.target == node.target for n in gm.graph.nodes) == 1:
            path, _, name = node.target.rpartition(".")
            setattr(gm.get_submodule(path) if path else gm, name, parameter)
            continue
        owner = gm.get_submodule(owner_path) if owner_path else gm
        name = _unique_attr(owner, leaf if node is None else f"{leaf}_bnfold")
        owner.register_parameter(name, parameter)
        with gm.graph.inserting_before(call):
            args[slot] = gm.graph.get_attr(f"{owner_path}.{name}" if owner_path else name)
    call.args = tuple(args)
    return written[0], written[1]


def _unique_attr(owner: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    return name


def without_batchnorm(program) -> fx.GraphModule:
    """The program's module with every BatchNorm call removed (its input passed on): the latency floor of any fold,
    not the same function. A training-mode call whose batch statistics are read is kept."""
    gm = program.module()
    for node in [n for n in gm.graph.nodes if is_batchnorm_call(n)]:
        x = node.args[0]
        if not ATEN_BATCHNORM[node.target][2]:
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
    drop_unused_tensors(gm)
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
    from .verify import benchmark, cuda_missing, resolve_devices

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
    count = lambda gm: sum(is_batchnorm_call(n) for n in gm.graph.nodes)  # noqa: E731
    original_module, folded_module = program.module(), folded.module()
    report = BenchReport(
        model="<program>", folded_from="given" if fold_report is None else "folded in memory",
        bn_original=count(original_module), bn_folded=count(folded_module), bn_ideal=count(ideal),
        inputs={f"arg{i}": list(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)},
        warmup=warmup, fold_ms=fold_ms, fold=fold_report)
    for name, device in resolve_devices(devices):
        if device.type == "cuda" and cuda_missing(device):
            report.results.append(BenchResult(name, "eager", available=False, reason=cuda_missing(device)))
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
