"""Does bnfold fold as much as its peers, as exactly, faster, and does its output run as fast as it can?

Run it from the repository root::

    python benchmarks/peers.py                  # full size (about 6 minutes), exit 0 only if every bar passes
    python benchmarks/peers.py --quick          # smoke run: 200-block synthetic model, bars reported, not enforced
    python benchmarks/peers.py --blocks 1000 --repeat 7 --min-time 2 --json
    python benchmarks/peers.py --skip-tool onnxslim --timeout 120

The tools, each given the same in-memory ``onnx.ModelProto`` (a fresh ``CopyFrom`` copy, made outside the timed
region) and returning a ModelProto. The peers are ``pip install -e .[peers]`` (onnxsim is a runtime dependency):

* bnfold: ``bnfold.onnx.fold.fold_onnx(model, inplace=True)``: the copy it is given is its to change, as it is for
  the peers (onnxscript rewrites its input in place too; onnxoptimizer and onnxsim serialize it first).
* onnxscript: ``onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=[fuse_batchnorm_into_conv_rule,
  fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule])``, the rules imported from
  ``onnxscript.rewriter.rules.common`` (older onnxscript: the rule set of ``onnxscript.rewriter.fuse_batchnorm``;
  that fallback is untested). That is onnxscript's BatchNormalization fusion and nothing else, plus the removal of unused
  nodes, functions and opsets that ``rewrite`` always does; ModelProto in, ModelProto out. It is the cheapest call
  that applies the fusion: ``onnxscript.optimizer.optimize`` runs the same rules among all its default rewrite
  rules, after constant folding and shape inference, and then CSE, initializer lifting and name fixing.
* onnxoptimizer: ``onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])``.
* onnxsim: ``onnxsim.simplify(model)[0]``, its default run (constant folding, shape inference and onnxoptimizer's
  fusions, BatchNormalization into Conv among them).
* onnxslim: ``onnxslim.slim(model)``, its default optimizations (Conv/ConvTranspose + BatchNormalization fusion
  among them).

A peer that is not installed, raises, crashes or runs past ``--timeout`` gets a row saying so (``not installed``,
``error: <first line>``, ``timeout > T s``), counts as folding nothing and is not timed. Peers' own output is
silenced (Python and file-descriptor level stdout/stderr, warnings, logging); bnfold's is not.

Models: every ``sample_models/*.onnx`` but ``*.folded.onnx``, and ``chainN``: N blocks (``--blocks``, 2,000 by
default, 200 with ``--quick``) of Conv(32->32, 3x3) -> BatchNormalization -> Relu from
``benchmarks/fold_speed.py``'s ``build_model(N, seed=0)``, written once to a private folder under
``benchmarks/_work/`` (git-ignored) for the file-to-file timing. Work files are removed at the end unless
``--keep``.

What is measured per model and tool, in this order:

1. First run. bnfold runs in this process. Each peer runs once in a forked child process (fork: it starts with
   everything this process has imported and the model in memory) that writes its output to the work folder; the
   child is killed when it runs past ``--timeout`` seconds (default 60; 0 runs peers in this process, unguarded).
   onnxoptimizer's and onnxslim's times grow much faster than the model (onnxoptimizer: 1 s at 100 blocks, 7 s at
   200, 41 s at 400; onnxslim: 27 s at 1,000 blocks), so without the timeout the 2,000-block model would hold the
   run up for many minutes. Every first run, over all models, is done before this process opens any onnxruntime
   session (whose thread pools should not be forked).
2. BN left: BatchNormalization nodes in the main graph and every subgraph of the output, and their names.
3. Errors: ``bnfold.verify.verify(original, output, providers="cpu", seed=0)``: both models run in onnxruntime CPU
   with graph optimizations disabled on the same seeded inputs; the worst absolute and relative error over every
   output. A failed verification is marked ``WRONG`` (a finding about that tool, not a failure of this script),
   an output onnxruntime cannot run ``invalid: <reason>``.
4. Fold time, in memory: the median of at least ``--repeat`` calls (default 5, 3 with ``--quick``) after one
   warm-up call, and of more for a tool whose calls are fast: as many as fill ``--min-fold-time`` seconds (default
   0.5, 0.1 with ``--quick``; judged by the warm-up call), at most 200. On the small samples a call takes a few
   milliseconds and a median of 5 moved by 20-40 % between runs on a 2-core VM. Tools are interleaved
   round-robin, the order rotated each round, so that drift hits all alike; the input copy is made and
   ``gc.collect()`` is run before each call, outside the timer, and the output is freed after the timer stops.
   What the first runs left in memory (imported modules, models) is ``gc.freeze()``-d before any timing, so that
   collection scans only what the timed calls allocated. A tool whose calls take long gets at most
   ``max(1, floor(T / t))`` calls per mode (warm-up included when there are at least two), ``t`` the time of its
   last call and ``T`` the timeout; the cell then says ``(n=k)``. Fold time, file to file: the same for load +
   fold + save of the model's file: bnfold ``bnfold.onnx.fold.fold_file(src, dst)``, a peer
   ``onnx.save(tool(onnx.load(src)), dst)``.
5. Latency: the original, the ideal (the original with every BatchNormalization removed by
   ``bnfold.bench.strip_batchnorm``: a wrong function, but the floor any fold can reach) and every tool output that
   onnxruntime can run (WRONG ones included) timed side by side in one ``bnfold.bench.time_models`` call: CPU,
   graph optimizations disabled (onnxruntime would otherwise fuse Conv + BatchNormalization itself), inputs from
   ``bnfold.verify.make_inputs(original, seed=0)`` bound once, 3 warm-up rounds, then rounds with the order rotated
   until at least ``--min-rounds`` rounds (default 30, 10 with ``--quick``) and ``--min-time`` seconds (default 1,
   0.3 with ``--quick``); intra-op threads: every CPU this process may use (time_models' default). Reported: median
   [p10, p90] in ms, and the tool's median / the ideal's median. On the synthetic model bnfold's output and the
   ideal are the same graph (Conv with bias -> Relu), so their ratio is 1 plus noise; on a busy 2-core machine one
   run's p10-p90 spread is about +-12 %, hence 30 rounds rather than time_models' default 10.

Bars, per model (measured values printed with each):

* (a) bnfold leaves no BatchNormalization that a peer folds: every BN name left by bnfold is also left by every
  peer that ran and whose output verified (a peer's WRONG or invalid output does not count as a fold). When names
  cannot be matched (a peer left BN nodes with names that are not the original's, or names are empty or
  duplicated), counts are compared instead (bnfold's <= the peer's) and the bar says so.
* (b) bnfold's fold time is below the fastest peer's that ran, in memory (median) and file to file (median), two
  bars. A peer that timed out counts as slower than the timeout. A peer that folds nothing counts too: its time is
  then the cost of its round trip (onnxoptimizer's ``fuse_bn_into_conv`` folds no BN of decoder_convtranspose,
  mlp_bn1d, mobilenet_small or resnet_small: ConvTranspose, Gemm and exporter-computed Conv biases are outside it).
  Below each pair, an ``info`` line (not a bar) compares bnfold with the fastest peer that folds at least one BN
  of the model, and names how many each folds.
* (c) bnfold's output latency / ideal latency <= 1.03.
* Correctness of bnfold: its fold succeeds and verifies on every model, and leaves no BN on the synthetic model.

Prints one table per model, then the bars with PASS/FAIL; ``--json`` also prints everything as one JSON document
(one line, after the bars). Exit status 0 when every bar passes, 1 otherwise. ``--quick`` reports the bars without
enforcing them; bnfold's correctness is always enforced. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):  # the checkout's bnfold, and fold_speed next to this file
    if _p not in sys.path:
        sys.path.insert(0, _p)

from fold_speed import build_model

from bnfold.bench import strip_batchnorm, time_models
from bnfold.errors import InputError
from bnfold.onnx.fold import fold_file, fold_onnx
from bnfold.verify import make_inputs, verify

WORK = HERE / "_work"
SAMPLES = ROOT / "sample_models"
PEERS = ("onnxscript", "onnxoptimizer", "onnxsim", "onnxslim")
TOOLS = ("bnfold", *PEERS)
BAR_LATENCY = 1.03
_MAX_INLINE_BYTES = 1_800_000_000  # above this, a protobuf must be saved with external data


# ---- the tools -----------------------------------------------------------------------------------------------


@dataclass
class Tool:
    name: str
    fold: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None
    call: str = ""
    unavailable: str = ""  # "not installed: ...", "skipped (--skip-tool)", "error: ..."

    @property
    def peer(self) -> bool:
        return self.name != "bnfold"

    def fold_file(self, src: Path, dst: Path) -> None:
        if not self.peer:
            fold_file(src, dst)
            return
        out = self.fold(onnx.load(str(src)))
        onnx.save(out, str(dst))


def _bnfold_fold(model: onnx.ModelProto) -> onnx.ModelProto:
    return fold_onnx(model, inplace=True)[0]


def _onnxscript() -> tuple[Callable, str]:
    from onnxscript.rewriter import rewrite

    try:
        from onnxscript.rewriter.rules.common import (
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        )
    except ImportError:  # older onnxscript: the rules lived in onnxscript.rewriter.fuse_batchnorm
        from onnxscript.rewriter import fuse_batchnorm

        if hasattr(fuse_batchnorm, "fuse_batchnorm_rule_set"):
            rules = fuse_batchnorm.fuse_batchnorm_rule_set()
            call = "onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=fuse_batchnorm_rule_set())"
        else:
            rules = fuse_batchnorm.rules
            call = "onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=fuse_batchnorm.rules)"
    else:
        rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]
        call = ("onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=[fuse_batchnorm_into_conv_rule, "
                "fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule])")

    def fold(model: onnx.ModelProto) -> onnx.ModelProto:
        return rewrite(model, pattern_rewrite_rules=rules)

    return fold, call


def _onnxoptimizer() -> tuple[Callable, str]:
    import onnxoptimizer

    def fold(model: onnx.ModelProto) -> onnx.ModelProto:
        return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])

    return fold, 'onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])'


def _onnxsim() -> tuple[Callable, str]:
    import onnxsim

    def fold(model: onnx.ModelProto) -> onnx.ModelProto:
        out, ok = onnxsim.simplify(model)
        if not ok:
            raise RuntimeError("onnxsim.simplify reported that its check failed")
        return out

    return fold, "onnxsim.simplify(model)[0]"


def _onnxslim() -> tuple[Callable, str]:
    import onnxslim

    def fold(model: onnx.ModelProto) -> onnx.ModelProto:
        return onnxslim.slim(model)

    return fold, "onnxslim.slim(model)"


_LOADERS = {"onnxscript": _onnxscript, "onnxoptimizer": _onnxoptimizer, "onnxsim": _onnxsim, "onnxslim": _onnxslim}
_DISTRIBUTIONS = {"onnxscript": "onnxscript", "onnxoptimizer": "onnxoptimizer", "onnxsim": "onnxsim",
                  "onnxslim": "onnxslim", "bnfold": "bnfold"}


def load_tools(skip: set[str]) -> list[Tool]:
    tools = [Tool("bnfold", _bnfold_fold, "bnfold.onnx.fold.fold_onnx(model, inplace=True)")]
    for name in PEERS:
        if name in skip:
            tools.append(Tool(name, unavailable="skipped (--skip-tool)"))
            continue
        try:
            with quiet():
                fold, call = _LOADERS[name]()
        except ImportError as e:
            tools.append(Tool(name, unavailable=f"not installed ({_one_line(e)})"))
        except Exception as e:  # noqa: BLE001 - a broken install is reported, not fatal
            tools.append(Tool(name, unavailable=f"error: {_one_line(e)}"))
        else:
            tools.append(Tool(name, fold, call))
    return tools


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTIONS[name])
    except importlib.metadata.PackageNotFoundError:
        return "?"


@contextlib.contextmanager
def quiet():
    """Silence a peer: Python-level stdout/stderr, the file descriptors 1 and 2 (C++ prints), warnings, logging."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            previous = logging.root.manager.disable
            logging.disable(logging.CRITICAL)
            try:
                yield
            finally:
                logging.disable(previous)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# ---- per-model state -----------------------------------------------------------------------------------------


@dataclass
class Run:
    """One tool on one model."""

    status: str = "ok"  # ok, error, timeout, unavailable
    note: str = ""  # error / unavailable line
    first_s: float | None = None
    output: onnx.ModelProto | None = None
    bn_left: int | None = None
    bn_names: list[str] = field(default_factory=list)
    verified: bool | None = None
    runnable: bool | None = None
    max_abs: float | None = None
    max_ratio: float | None = None  # the verifier's noise ratio (max |a - b| / noise scale)
    verify_reason: str = ""
    fold_s: list[float] = field(default_factory=list)
    file_s: list[float] = field(default_factory=list)
    timing_error: str = ""
    latency: dict | None = None
    vs_ideal: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Case:
    name: str
    path: Path
    model: onnx.ModelProto
    synthetic: bool = False
    bn: int = 0
    bn_names: list[str] = field(default_factory=list)
    runs: dict[str, Run] = field(default_factory=dict)
    latency: dict[str, dict] = field(default_factory=dict)  # original, ideal
    latency_error: str = ""
    rounds: int = 0


def batchnorms(model: onnx.ModelProto) -> list[str]:
    """Names of the BatchNormalization nodes in the main graph and every subgraph, in graph order."""
    names: list[str] = []

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                names.append(node.name)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g)

    walk(model.graph)
    return names


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _save(model: onnx.ModelProto, path: Path) -> None:
    large = model.ByteSize() > _MAX_INLINE_BYTES
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data")


# ---- 1. first runs -------------------------------------------------------------------------------------------


def _child(tool: Tool, model: onnx.ModelProto, out_path: Path, conn) -> None:
    """In the forked child: run the peer once, silently, save its output, send (status, seconds | error line)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.stdout = sys.stderr = io.StringIO()
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    try:
        copy = _copy(model)
        start = time.perf_counter()
        out = tool.fold(copy)
        seconds = time.perf_counter() - start
        if not isinstance(out, onnx.ModelProto):
            raise TypeError(f"returned {type(out).__name__}, not a ModelProto")
        _save(out, out_path)
        conn.send(("ok", seconds))
    except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
        conn.send(("error", _one_line(e)))
    finally:
        conn.close()


def first_run(tool: Tool, case: Case, work: Path, timeout: float) -> Run:
    if tool.unavailable:
        return Run(status="unavailable", note=tool.unavailable)
    if not tool.peer or timeout <= 0:
        copy = _copy(case.model)
        try:
            with quiet() if tool.peer else contextlib.nullcontext():
                start = time.perf_counter()
                out = tool.fold(copy)
                seconds = time.perf_counter() - start
            if not isinstance(out, onnx.ModelProto):
                raise TypeError(f"returned {type(out).__name__}, not a ModelProto")
        except Exception as e:  # noqa: BLE001
            if not tool.peer:  # bnfold's own failure: show all of it
                traceback.print_exc()
            return Run(status="error", note=f"error: {_one_line(e)}")
        return Run(first_s=seconds, output=out)

    out_path = work / f"first.{case.name}.{tool.name}.onnx"
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(tool, case.model, out_path, sender), daemon=True)
    sys.stdout.flush()  # nothing buffered may be copied into the child
    sys.stderr.flush()
    proc.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            proc.kill()
            proc.join()
            return Run(status="timeout", note=f"timeout > {timeout:g} s")
        try:
            status, value = receiver.recv()
        except EOFError:
            proc.join()
            return Run(status="error", note=f"error: crashed (exit code {proc.exitcode})")
    finally:
        receiver.close()
    proc.join()
    if status != "ok":
        return Run(status="error", note=f"error: {value}")
    try:
        out = onnx.load(str(out_path))
    finally:
        out_path.unlink(missing_ok=True)
        Path(str(out_path) + ".data").unlink(missing_ok=True)
    return Run(first_s=value, output=out)


# ---- 2.-3. what is left, and is it right -----------------------------------------------------------------------


def check(case: Case, run: Run) -> None:
    run.bn_names = batchnorms(run.output)
    run.bn_left = len(run.bn_names)
    try:
        rep = verify(case.model, run.output, providers="cpu", seed=0)
    except InputError as e:  # the original cannot run, bad inputs: nothing about this tool can be said
        run.runnable, run.verified, run.verify_reason = False, False, f"invalid: {_one_line(e)}"
        return
    res = rep.providers["cpu"]
    cannot_run = "cannot run the candidate model" in res.reason
    run.runnable = not cannot_run
    run.verified = bool(res.passed)
    run.verify_reason = res.reason
    if cannot_run:
        reason = res.reason.split("cannot run the candidate model: ", 1)[-1]
        run.verify_reason = f"invalid: {reason}"
    else:
        run.max_abs, run.max_ratio = res.max_abs_error, res.max_ratio


# ---- 4. fold times -------------------------------------------------------------------------------------------


def _budget_calls(seconds: float, budget: float) -> int:
    if budget <= 0 or seconds <= 0:
        return 1 << 30
    return max(1, math.floor(budget / seconds))


MAX_FOLD_CALLS = 200  # per tool and mode: enough for a stable median of a millisecond-long call


def time_folds(case: Case, tools: list[Tool], mode: str, repeat: int, budget: float, work: Path,
               min_fold_time: float = 0.0) -> None:
    """Median-able samples of ``mode`` ("memory" or "file") for every tool whose first run succeeded: at least
    ``repeat`` calls, and more for a fast tool, until its calls add up to ``min_fold_time`` seconds (at most
    MAX_FOLD_CALLS); a slow one is held to its ``budget`` (see the module docstring)."""
    active = [t for t in tools if case.runs[t.name].ok]
    dst = {t.name: work / f"out.{case.name}.{t.name}.onnx" for t in active}

    def call(tool: Tool) -> float:
        if mode == "memory":
            args = (_copy(case.model),)
            fn = tool.fold
        else:
            args = (case.path, dst[tool.name])
            fn = tool.fold_file
        gc.collect()
        with quiet() if tool.peer else contextlib.nullcontext():
            start = time.perf_counter()
            out = fn(*args)
            seconds = time.perf_counter() - start
        del out, args
        return seconds

    samples: dict[str, list[float]] = {t.name: [] for t in active}
    runs: dict[str, int] = {}
    failed: set[str] = set()

    def attempt(tool: Tool) -> float | None:
        try:
            return call(tool)
        except Exception as e:  # noqa: BLE001
            if not tool.peer:
                traceback.print_exc()
            case.runs[tool.name].timing_error = f"{mode} timing: {_one_line(e)}"
            failed.add(tool.name)
            return None

    # warm-up, one call each (skipped for a tool whose single call would take most of its budget)
    for tool in active:
        r = case.runs[tool.name]
        estimate = statistics.median(r.fold_s) if (mode == "file" and r.fold_s) else r.first_s
        calls = _budget_calls(estimate or 0.0, budget)
        wanted = repeat
        if calls >= 2:
            seconds = attempt(tool)
            if seconds is None:
                continue
            calls = _budget_calls(seconds, budget) - 1
            if seconds > 0:  # a few milliseconds a call: a median of 5 moves by tens of percent between runs
                wanted = min(max(repeat, math.ceil(min_fold_time / seconds)), max(repeat, MAX_FOLD_CALLS))
        runs[tool.name] = max(1, min(wanted, calls))
    names = [t.name for t in active if t.name not in failed]
    by_name = {t.name: t for t in active}
    for k in range(max(runs.values(), default=0)):
        order = names[k % len(names):] + names[:k % len(names)] if names else []
        gc.collect()
        for name in order:
            if name in failed or len(samples[name]) >= runs[name]:
                continue
            seconds = attempt(by_name[name])
            if seconds is not None:
                samples[name].append(seconds)
    for name, values in samples.items():
        if name in failed:
            continue
        if mode == "memory":
            case.runs[name].fold_s = values
        else:
            case.runs[name].file_s = values
    for path in dst.values():
        path.unlink(missing_ok=True)
        Path(str(path) + ".data").unlink(missing_ok=True)


# ---- 5. latency ----------------------------------------------------------------------------------------------


def time_latency(case: Case, tools: list[Tool], min_time: float, min_rounds: int) -> None:
    feeds = make_inputs(case.model, seed=0)
    models = {"original": case.model, "ideal": strip_batchnorm(case.model)}
    for tool in tools:
        r = case.runs[tool.name]
        if r.ok and r.runnable:
            models[tool.name] = r.output
    while True:
        try:
            timings, rounds = time_models(models, feeds, provider="cpu", opt_level="disabled",
                                          min_time_s=min_time, min_rounds=min_rounds, warmup=3)
            break
        except InputError as e:  # one model cannot be run after all: drop it and time the rest
            culprit = next((n for n in models if f"the {n} model" in str(e)), None)
            if culprit is None or culprit in ("original", "ideal"):
                case.latency_error = _one_line(e)
                return
            case.runs[culprit].runnable = False
            case.runs[culprit].verify_reason = f"invalid: {_one_line(e)}"
            del models[culprit]
    case.rounds = rounds
    ideal = timings["ideal"].latency.median_ms
    for name, t in timings.items():
        entry = {"median_ms": t.latency.median_ms, "p10_ms": t.latency.p10_ms, "p90_ms": t.latency.p90_ms,
                 "min_ms": t.latency.min_ms, "samples": len(t.latency.samples_ms), "session_ms": t.session_ms,
                 "vs_ideal": t.latency.median_ms / ideal if ideal > 0 else None}
        if name in ("original", "ideal"):
            case.latency[name] = entry
        else:
            case.runs[name].latency = entry
            case.runs[name].vs_ideal = entry["vs_ideal"]


# ---- the table -----------------------------------------------------------------------------------------------


def _ms(values: list[float], repeat: int) -> str:
    if not values:
        return "-"
    cell = f"{statistics.median(values) * 1e3:.1f}"
    return cell if len(values) >= repeat else f"{cell} (n={len(values)})"


def _err(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _lat(entry: dict | None) -> str:
    if entry is None:
        return "-"
    return f"{entry['median_ms']:.3f} [{entry['p10_ms']:.3f}, {entry['p90_ms']:.3f}]"


def _ratio(entry: dict | None) -> str:
    return "-" if entry is None or entry.get("vs_ideal") is None else f"{entry['vs_ideal']:.3f}"


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(n or "<unnamed>" for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def table(case: Case, tools: list[Tool], repeat: int) -> list[str]:
    header = ("tool", "BN left", "worst abs err", "noise ratio", "fold ms (in memory)", "fold ms (file->file)",
              "latency ms (median [p10, p90])", "/ideal", "note")
    rows = [("original", str(case.bn), "-", "-", "-", "-", _lat(case.latency.get("original")),
             _ratio(case.latency.get("original")), ""),
            ("ideal", "0", "-", "-", "-", "-", _lat(case.latency.get("ideal")), _ratio(case.latency.get("ideal")),
             "BN stripped: wrong function, the floor")]
    for tool in tools:
        r = case.runs[tool.name]
        if not r.ok:
            rows.append((tool.name, "-", "-", "-", "-", "-", "-", "-", r.note))
            continue
        notes = []
        if r.runnable is False:
            notes.append(r.verify_reason)
        elif r.verified is False:
            notes.append("WRONG" + (f" ({r.verify_reason})" if r.verify_reason else ""))
        elif r.verify_reason:
            notes.append(r.verify_reason)
        if r.timing_error:
            notes.append(r.timing_error)
        note = "; ".join(notes)
        note = note if len(note) <= 100 else note[:97] + "..."  # the whole reason is in the JSON
        rows.append((tool.name, str(r.bn_left), _err(r.max_abs), _err(r.max_ratio), _ms(r.fold_s, repeat),
                     _ms(r.file_s, repeat), _lat(r.latency), _ratio(r.latency), note))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    size = case.path.stat().st_size
    nodes = len(case.model.graph.node)
    lines = [f"== {case.name}: {case.bn} BatchNormalization of {nodes} nodes, {size / 1e6:.2f} MB"
             + (" (synthetic)" if case.synthetic else "") + " =="]

    def fmt(row: tuple[str, ...]) -> str:  # tool and note left-aligned, numbers right-aligned
        cells = (c.ljust(w) if i in (0, 8) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        return "  ".join(cells).rstrip()

    lines.append(fmt(header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt(row) for row in rows)
    for tool in tools:
        r = case.runs[tool.name]
        if r.ok and r.bn_left:
            lines.append(f"  {tool.name} leaves: {_names(r.bn_names)}")
    if case.latency_error:
        lines.append(f"  latency not measured: {case.latency_error}")
    elif case.rounds:
        lines.append(f"  latency: {case.rounds} rounds, CPU, graph optimizations disabled")
    return lines


# ---- the bars ------------------------------------------------------------------------------------------------


@dataclass
class Bar:
    key: str
    model: str
    measured: str
    ok: bool
    enforced: bool
    result: str = ""
    info: bool = False  # printed for the reader, never a bar


def _matchable(case: Case, names: list[str]) -> bool:
    original = case.bn_names
    if any(not n for n in original) or len(set(original)) != len(original):
        return False
    return len(set(names)) == len(names) and set(names) <= set(original)


def bars_for(case: Case, tools: list[Tool], timeout: float, quick: bool) -> list[Bar]:
    bars: list[Bar] = []
    mine = case.runs["bnfold"]
    peers = [t for t in tools if t.peer]

    # correctness of bnfold: always enforced
    if not mine.ok:
        bars.append(Bar("correct", case.name, f"bnfold failed: {mine.note}", False, True))
    else:
        problems = []
        if mine.verified:
            what = f"verify passed (max abs {_err(mine.max_abs)}, noise ratio {_err(mine.max_ratio)})"
        else:
            what = f"verify FAILED ({mine.verify_reason or 'outputs differ'})"
            problems.append("verify")
        if mine.timing_error:
            problems.append("timing")
            what += f"; {mine.timing_error}"
        if case.synthetic:
            what += f"; BN left {mine.bn_left} (must be 0)"
            if mine.bn_left:
                problems.append("BN left")
        bars.append(Bar("correct", case.name, what, not problems, True))
    if not mine.ok:
        return bars

    # (a) no BN left that a peer folds
    parts, ok = [], True
    left = set(mine.bn_names)
    for tool in peers:
        r = case.runs[tool.name]
        if not r.ok:
            status = r.note.split(" (")[0] if r.status == "unavailable" else r.status
            parts.append(f"{tool.name} {status} (no fold)")
            continue
        if not r.verified:
            parts.append(f"{tool.name} excluded ({'invalid' if r.runnable is False else 'WRONG'})")
            continue
        if _matchable(case, mine.bn_names) and _matchable(case, r.bn_names):
            folded_by_peer = sorted(left - set(r.bn_names))
            if folded_by_peer:
                ok = False
                parts.append(f"{tool.name} folds {len(folded_by_peer)} that bnfold keeps: {_names(folded_by_peer)}")
            else:
                parts.append(f"{tool.name} {r.bn_left}")
        else:
            good = mine.bn_left <= r.bn_left
            ok &= good
            parts.append(f"{tool.name} {r.bn_left} (names unmatchable: counts compared)")
    measured = f"bnfold leaves {mine.bn_left}; peers leave: " + ", ".join(parts)
    bars.append(Bar("a", case.name, measured, ok, not quick))

    # (b) fold time, in memory and file to file
    for attr, label in (("fold_s", "in memory"), ("file_s", "file->file")):
        own = getattr(mine, attr)
        if not own:
            bars.append(Bar(f"b {label}", case.name, "bnfold not timed", False, not quick))
            continue
        own_ms = statistics.median(own) * 1e3
        timed = {t.name: statistics.median(getattr(case.runs[t.name], attr)) * 1e3
                 for t in peers if case.runs[t.name].ok and case.runs[t.name].verified
                 and getattr(case.runs[t.name], attr)}
        slow = [t.name for t in peers if case.runs[t.name].status == "timeout"]
        bad = [t.name for t in peers if case.runs[t.name].ok and not case.runs[t.name].verified]
        excluded = [f"{n} excluded ({'invalid' if case.runs[n].runnable is False else 'WRONG'})" for n in bad]
        if not timed and not slow:
            bars.append(Bar(f"b {label}", case.name, "; ".join([f"bnfold {own_ms:.1f} ms; no peer ran", *excluded]),
                            True, not quick))
            continue
        parts = [f"{n} {ms:.1f} ms" for n, ms in sorted(timed.items(), key=lambda kv: kv[1])]
        parts += [f"{n} > {timeout:g} s (timeout)" for n in slow]
        parts += excluded
        if timed:
            fastest = min(timed, key=timed.get)
            ok = own_ms < timed[fastest]
            ratio = f" = {own_ms / timed[fastest]:.2f}x the fastest ({fastest})"
        else:
            ok = own_ms < timeout * 1e3
            ratio = ""
        bars.append(Bar(f"b {label}", case.name, f"bnfold {own_ms:.1f} ms{ratio}; " + ", ".join(parts), ok,
                        not quick))

    # (b) again, against the peers that fold at least one BN of this model: information for the reader, not a bar.
    # A peer that folds nothing still pays its round trip, which is all (b) measures on such a model.
    folding = [t.name for t in peers if case.runs[t.name].ok and case.runs[t.name].verified
               and case.runs[t.name].bn_left is not None and case.runs[t.name].bn_left < case.bn]
    for attr, label in (("fold_s", "in memory"), ("file_s", "file->file")):
        own = getattr(mine, attr)
        timed = {n: statistics.median(getattr(case.runs[n], attr)) * 1e3 for n in folding
                 if getattr(case.runs[n], attr)}
        if not own or not timed:
            why = "bnfold not timed" if not own else "no peer folds a BN of this model"
            bars.append(Bar(f"b' {label}", case.name, why, True, False, info=True))
            continue
        own_ms = statistics.median(own) * 1e3
        fastest = min(timed, key=timed.get)
        parts = [f"{n} {ms:.1f} ms (folds {case.bn - case.runs[n].bn_left} of {case.bn})"
                 for n, ms in sorted(timed.items(), key=lambda kv: kv[1])]
        bars.append(Bar(f"b' {label}", case.name, f"bnfold {own_ms:.1f} ms = {own_ms / timed[fastest]:.2f}x the "
                        f"fastest that folds ({fastest}); " + ", ".join(parts), own_ms < timed[fastest], False,
                        info=True))

    # (c) latency of bnfold's output / ideal
    if mine.vs_ideal is None:
        why = case.latency_error or mine.verify_reason or "not timed"
        bars.append(Bar("c", case.name, f"no latency ({why})", False, not quick))
    else:
        measured = (f"bnfold {mine.latency['median_ms']:.3f} ms / ideal {case.latency['ideal']['median_ms']:.3f} ms"
                    f" = {mine.vs_ideal:.3f} (original {case.latency['original']['vs_ideal']:.3f})")
        bars.append(Bar("c", case.name, measured, mine.vs_ideal <= BAR_LATENCY, not quick))
    return bars


_BAR_TITLES = {
    "correct": "bnfold folds and verifies (synthetic: no BN left)",
    "a": "(a) bnfold leaves no BN that a peer folds",
    "b in memory": "(b) bnfold folds faster than the fastest peer, in memory",
    "b file->file": "(b) bnfold folds faster than the fastest peer, file->file",
    "b' in memory": "    (info) the same against peers that fold a BN, in memory",
    "b' file->file": "    (info) the same against peers that fold a BN, file->file",
    "c": f"(c) bnfold latency / ideal <= {BAR_LATENCY}",
}


# ---- the run -------------------------------------------------------------------------------------------------


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="200-block synthetic model, fewer runs; bars not enforced")
    parser.add_argument("--blocks", type=int, default=None,
                        help="blocks of the synthetic model (default 2000; 200 quick)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed fold calls per tool and mode (default 5; 3 quick)")
    parser.add_argument("--min-fold-time", type=float, default=None,
                        help="seconds of timed fold calls per tool and mode that a fast tool gets at least, up to "
                             f"{MAX_FOLD_CALLS} calls (default 0.5; 0.1 quick)")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of latency rounds per model, at least (default 1; 0.3 quick)")
    parser.add_argument("--min-rounds", type=int, default=None,
                        help="latency rounds per model, at least (default 30; 10 quick)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a peer's first run may take before it is killed, also the budget of its timed "
                             "calls per mode (default 60; 0: no timeout, peers run in this process)")
    parser.add_argument("--skip-tool", action="append", default=[], choices=PEERS, metavar="PEER",
                        help=f"leave a peer out entirely (repeatable; one of {', '.join(PEERS)})")
    parser.add_argument("--json", action="store_true", help="also print all results as one JSON line at the end")
    parser.add_argument("--keep", action="store_true", help="keep the work folder under benchmarks/_work/")
    args = parser.parse_args(argv)
    quick = args.quick
    blocks = args.blocks if args.blocks is not None else (200 if quick else 2000)
    repeat = args.repeat if args.repeat is not None else (3 if quick else 5)
    min_time = args.min_time if args.min_time is not None else (0.3 if quick else 1.0)
    min_fold_time = args.min_fold_time if args.min_fold_time is not None else (0.1 if quick else 0.5)
    min_rounds = args.min_rounds if args.min_rounds is not None else (10 if quick else 30)
    if min(blocks, repeat, min_rounds) < 1 or min(min_time, min_fold_time, args.timeout) < 0:
        parser.error("--blocks, --repeat and --min-rounds must be positive, --min-time, --min-fold-time and "
                     "--timeout not negative")

    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="peers-", dir=WORK))
    try:
        return _bench(args, quick, blocks, repeat, min_time, min_rounds, min_fold_time, work)
    finally:
        if args.keep:
            _progress(f"work files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):
                WORK.rmdir()  # only if empty: other benchmarks may be using it


def _bench(args, quick: bool, blocks: int, repeat: int, min_time: float, min_rounds: int, min_fold_time: float,
           work: Path) -> int:
    t0 = time.perf_counter()
    tools = load_tools(set(args.skip_tool))
    import onnxruntime as ort

    cases: list[Case] = []
    for path in sorted(SAMPLES.glob("*.onnx")):
        if path.name.endswith(".folded.onnx"):
            continue
        cases.append(Case(path.stem, path, onnx.load(str(path))))
    synthetic = build_model(blocks, seed=0)
    syn_path = work / f"chain{blocks}.onnx"
    with open(syn_path, "wb") as f:
        f.write(synthetic.SerializeToString())
    cases.append(Case(f"chain{blocks}", syn_path, synthetic, synthetic=True))
    for case in cases:
        case.bn_names = batchnorms(case.model)
        case.bn = len(case.bn_names)

    print(f"python {sys.version.split()[0]}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
          f"numpy {np.__version__}, {os.cpu_count()} CPUs")
    for tool in tools:
        print(f"  {tool.name}: {tool.unavailable}" if tool.unavailable
              else f"  {tool.name} {_version(tool.name)}: {tool.call}")
    limit = f"a peer's first run times out after {args.timeout:g} s" if args.timeout > 0 else "no timeout"
    print(f"models: {len(cases) - 1} sample models + chain{blocks}; fold times: median of >= {repeat} interleaved "
          f"calls and >= {min_fold_time:g} s of calls (at most {MAX_FOLD_CALLS}) after one warm-up; {limit}; "
          f"latency: >= {min_rounds} rounds and >= {min_time:g} s per model")
    print(flush=True)

    # 1. first runs of every tool on every model, before any onnxruntime session exists in this process
    for case in cases:
        for tool in tools:
            case.runs[tool.name] = first_run(tool, case, work, args.timeout)
            r = case.runs[tool.name]
            took = f"{r.first_s:.2f} s" if r.first_s is not None else r.note
            _progress(f"[{time.perf_counter() - t0:5.0f} s] {case.name}: {tool.name} first run: {took}")
    # Everything imported and loaded so far (the peers' modules, the models) is moved out of the collector's way:
    # the gc.collect() before each timed call then costs milliseconds, not a scan of the whole heap, and still
    # frees what earlier calls left behind.
    gc.collect()
    gc.freeze()

    failures = 0
    all_bars: list[Bar] = []
    for case in cases:
        for tool in tools:  # 2.-3.
            r = case.runs[tool.name]
            if r.ok:
                check(case, r)
        _progress(f"[{time.perf_counter() - t0:5.0f} s] {case.name}: verified")
        for mode in ("memory", "file"):  # 4.
            time_folds(case, tools, mode, repeat, args.timeout, work, min_fold_time)
            _progress(f"[{time.perf_counter() - t0:5.0f} s] {case.name}: fold times ({mode})")
        time_latency(case, tools, min_time, min_rounds)  # 5.
        _progress(f"[{time.perf_counter() - t0:5.0f} s] {case.name}: latency")
        print("\n".join(table(case, tools, repeat)))
        print(flush=True)
        all_bars.extend(bars_for(case, tools, args.timeout, quick))
        for r in case.runs.values():
            r.output = None  # free the outputs of this model

    print("bars")
    width = max(len(_BAR_TITLES[b.key]) for b in all_bars)
    mwidth = max(len(b.model) for b in all_bars)
    for b in all_bars:
        if b.info:
            b.result = "info"
        elif b.enforced:
            b.result = "PASS" if b.ok else "FAIL"
            failures += not b.ok
        else:
            b.result = "pass" if b.ok else "fail (not enforced)"
        print(f"  {_BAR_TITLES[b.key]:<{width}}  {b.model:<{mwidth}}  {b.result:<4}  {b.measured}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; "
          + (f"{failures} FAILED" if failures else "quick run: bars not enforced, bnfold correct" if quick
             else "all bars pass"))

    if args.json:
        print(json.dumps(_to_json(cases, tools, all_bars, blocks, repeat, min_time, min_rounds, args.timeout, quick,
                                  failures, min_fold_time)))
    return 1 if failures else 0


def _to_json(cases, tools, bars, blocks, repeat, min_time, min_rounds, timeout, quick, failures,
             min_fold_time) -> dict:
    def run_dict(r: Run) -> dict:
        return {
            "status": r.status, "note": r.note, "first_run_s": r.first_s, "bn_left": r.bn_left,
            "bn_left_names": r.bn_names, "verified": r.verified, "runnable": r.runnable,
            "max_abs_error": r.max_abs, "noise_ratio": r.max_ratio, "verify_reason": r.verify_reason,
            "fold_ms": [s * 1e3 for s in r.fold_s], "file_ms": [s * 1e3 for s in r.file_s],
            "fold_ms_median": statistics.median(r.fold_s) * 1e3 if r.fold_s else None,
            "file_ms_median": statistics.median(r.file_s) * 1e3 if r.file_s else None,
            "timing_error": r.timing_error, "latency": r.latency,
        }

    def finite(x):  # JSON has no inf/nan
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list):
            return [finite(v) for v in x]
        return x

    return finite({
        "config": {"blocks": blocks, "repeat": repeat, "min_fold_time_s": min_fold_time, "min_time_s": min_time,
                   "min_rounds": min_rounds,
                   "timeout_s": timeout,
                   "quick": quick, "cpus": os.cpu_count()},
        "tools": {t.name: {"call": t.call, "unavailable": t.unavailable, "version": _version(t.name)}
                  for t in tools},
        "models": {c.name: {"file": str(c.path.relative_to(ROOT)) if c.path.is_relative_to(ROOT) else c.path.name,
                            "synthetic": c.synthetic, "bn": c.bn, "latency_rounds": c.rounds,
                            "latency_error": c.latency_error, "latency": c.latency,
                            "tools": {n: run_dict(r) for n, r in c.runs.items()}} for c in cases},
        "bars": [{"bar": b.key, "model": b.model, "ok": b.ok, "enforced": b.enforced, "result": b.result,
                  "measured": b.measured} for b in bars],
        "failures": failures,
    })


if __name__ == "__main__":
    sys.exit(main())
