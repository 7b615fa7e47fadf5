"""How much faster is the folded model, and how much of the possible gain did folding get?

:func:`benchmark` times three models side by side in onnxruntime, on each requested execution provider and graph
optimization level:

* **original**: the model as given;
* **folded**: the model folded by bnfold (in memory, unless a folded model is given);
* **ideal**: the original with every BatchNormalization node removed (:func:`strip_batchnorm`), then its parallel
  and sequential linear branches merged where bnfold's merge rules apply (:func:`ideal_model`): the merged form, a
  RepVGG-style network's deploy form. It computes the wrong function, but it is the floor that folding and merging
  can reach, so ``folded / ideal`` says how much of the possible gain was taken (1.0 = all of it).

How it is timed, so that the numbers can be trusted on a noisy machine:

* Every model gets its own session with the same options: the optimization level asked for, ``intra_op`` threads
  fixed (``threads``, default: the CPUs this process may run on) and reported, one inter-op thread, sequential
  execution. Session creation is timed ``session_repeat`` times per model, interleaved, and the median reported.
* Inputs are bound once (on the GPU for CUDA, with IO binding), so a sample is one ``run`` and nothing else; on
  CUDA, onnxruntime synchronizes the device before ``run`` returns.
* ``warmup`` untimed rounds first. Then in each round every model runs once, and the order rotates from round to
  round, so that drift (turbo, other processes, caches) hits all three alike. Rounds go on until ``repeat`` rounds,
  or, when ``repeat`` is None, until at least ``min_rounds`` rounds and ``min_time_s`` seconds have passed (at most
  ``max_rounds``). The garbage collector is paused while timing.
* Reported per model: median, 10th and 90th percentile and minimum, in milliseconds; speedup = original median /
  folded median.

Latency with optimizations ``disabled`` shows the raw effect of the fold; at ``basic`` and above onnxruntime
fuses Conv+BatchNormalization itself at session start, so the gain there is what a default user sees (often the
session start, not the latency).

Nothing is printed; pass ``progress`` (a callable taking one line) to hear what is being done.
``import bnfold.bench`` does not import onnxruntime.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import InputError, first_line
from .onnx.graph import subgraphs
from .report import FoldReport, Timing

__all__ = ["benchmark", "time_models", "strip_batchnorm", "ideal_model", "plot", "BenchReport", "BenchResult",
           "ModelTiming",
           "OPT_LEVELS"]

from .ort import OPT_LEVELS  # noqa: E402 - re-exported: the levels bench times
_MODELS = ("original", "folded", "ideal")
# Below this fraction of the original's latency, "how much of the possible gain" is noise, not a measurement.
_MIN_MEASURABLE_GAIN = 0.02


# ------------------------------------------------------------------------------------------------------ results


@dataclass
class ModelTiming:
    """One model on one provider and optimization level: session creation and run latency, in milliseconds.
    ``session_ms`` is None where there is no session (eager PyTorch)."""

    session_ms: float | None
    latency: Timing

    def to_dict(self) -> dict:
        return {"session_ms": self.session_ms, **self.latency.to_dict()}


@dataclass
class BenchResult:
    """Original, folded and ideal timed side by side on one provider at one optimization level."""

    provider: str
    opt_level: str
    available: bool = True
    reason: str = ""
    threads: int = 0
    rounds: int = 0
    timings: dict[str, ModelTiming] = field(default_factory=dict)

    def _median(self, name: str) -> float | None:
        t = self.timings.get(name)
        return t.latency.median_ms if t is not None else None

    @property
    def original_ms(self) -> float | None:
        return self._median("original")

    @property
    def folded_ms(self) -> float | None:
        return self._median("folded")

    @property
    def ideal_ms(self) -> float | None:
        return self._median("ideal")

    @property
    def speedup(self) -> float | None:
        """original / folded median latency (> 1: the folded model is faster)."""
        return _ratio(self.original_ms, self.folded_ms)

    @property
    def ideal_speedup(self) -> float | None:
        """original / ideal median latency: the most any fold could give."""
        return _ratio(self.original_ms, self.ideal_ms)

    @property
    def folded_vs_ideal(self) -> float | None:
        """folded / ideal median latency (1.0: as fast as the model without BatchNormalization)."""
        return _ratio(self.folded_ms, self.ideal_ms)

    @property
    def gain_captured(self) -> float | None:
        """(original - folded) / (original - ideal): the share of the possible saving that the fold took. None when
        the possible saving is below 2 % of the original's latency (too small to divide by)."""
        o, f, i = self.original_ms, self.folded_ms, self.ideal_ms
        if o is None or f is None or i is None or o - i <= _MIN_MEASURABLE_GAIN * o:
            return None
        return (o - f) / (o - i)

    def to_dict(self) -> dict:
        return {
            "provider": self.provider,
            "opt_level": self.opt_level,
            "available": self.available,
            "reason": self.reason,
            "threads": self.threads,
            "rounds": self.rounds,
            "original_ms": self.original_ms,
            "folded_ms": self.folded_ms,
            "ideal_ms": self.ideal_ms,
            "speedup": self.speedup,
            "ideal_speedup": self.ideal_speedup,
            "folded_vs_ideal": self.folded_vs_ideal,
            "gain_captured": self.gain_captured,
            "session_ms": {name: t.session_ms for name, t in self.timings.items()},
            "latency": {name: t.latency.to_dict() for name, t in self.timings.items()},
        }


@dataclass
class BenchReport:
    """Everything :func:`benchmark` measured. ``results`` has one entry per (provider, optimization level)."""

    model: str
    folded_from: str  # "given" or "folded in memory"
    bn_original: int
    bn_folded: int
    bn_ideal: int
    inputs: dict[str, list[int]]
    warmup: int
    fold_ms: float | None = None
    fold: FoldReport | None = None
    results: list[BenchResult] = field(default_factory=list)
    merges_ideal: int = 0  # branch merges made in the ideal (0: it is the original without BatchNormalization)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "folded": self.folded_from,
            "fold_ms": self.fold_ms,
            "bn_nodes": {"original": self.bn_original, "folded": self.bn_folded, "ideal": self.bn_ideal},
            "merges_ideal": self.merges_ideal,
            "inputs": self.inputs,
            "warmup": self.warmup,
            "results": [r.to_dict() for r in self.results],
            "fold_report": self.fold.to_dict() if self.fold is not None else None,
        }

    def summary_lines(self) -> list[str]:
        how = f"folded in memory in {self.fold_ms:.1f} ms" if self.fold_ms is not None else "folded model given"
        lines = [
            f"{self.model}: BatchNormalization nodes {self.bn_original} original, {self.bn_folded} folded, "
            f"{self.bn_ideal} ideal ({how})",
            "latency in ms: median [p10, p90]; ideal = original with every BatchNormalization removed"
            + (f" and {self.merges_ideal} branch merge(s)" if self.merges_ideal else "")
            + " (not exact, the floor of any fold and merge)",
        ]
        header = (f"{'provider':<8} {'opt':<8} {'original':>27} {'folded':>27} {'ideal':>27} "
                  f"{'speedup':>8} {'folded/ideal':>12} {'sessions o/f/i (ms)':>22}")
        lines.append(header)
        for r in self.results:
            if not r.available:
                lines.append(f"{r.provider:<8} {r.opt_level:<8} unavailable: {r.reason}")
                continue
            cells = [_cell(r.timings[n].latency) for n in _MODELS]
            sessions = "/".join("-" if r.timings[n].session_ms is None else f"{r.timings[n].session_ms:.0f}"
                                for n in _MODELS)
            lines.append(f"{r.provider:<8} {r.opt_level:<8} {cells[0]:>27} {cells[1]:>27} {cells[2]:>27} "
                         f"{r.speedup:>7.3f}x {r.folded_vs_ideal:>12.3f} {sessions:>22}")
        threads = sorted({r.threads for r in self.results if r.available})
        rounds = [r.rounds for r in self.results if r.available]
        if rounds:
            lines.append(f"{'/'.join(map(str, threads))} intra-op thread(s), {self.warmup} warm-up round(s), "
                         f"{min(rounds)}-{max(rounds)} timed rounds per setting, order rotated each round")
        return lines


def _cell(t: Timing) -> str:
    return f"{_ms(t.median_ms)} [{_ms(t.p10_ms)}, {_ms(t.p90_ms)}]"


def _ms(value: float) -> str:
    return f"{value:.3f}" if value >= 1 else f"{value:.4g}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


# --------------------------------------------------------------------------------------------------- public API


def benchmark(
    model: onnx.ModelProto | str | os.PathLike,
    folded: onnx.ModelProto | str | os.PathLike | None = None,
    *,
    providers: Iterable[str] | str | None = None,
    opt_levels: Iterable[str] | str = ("disabled", "all"),
    input_shapes: Mapping[str, Iterable[int]] | None = None,
    inputs: Mapping[str, Any] | None = None,
    seed: int = 0,
    warmup: int = 3,
    repeat: int | None = None,
    min_time_s: float = 1.0,
    min_rounds: int = 10,
    max_rounds: int = 10_000,
    session_repeat: int = 3,
    threads: int | None = None,
    skip: Iterable[str] = (),
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Time ``model``, its folded form and the ideal (no BatchNormalization) side by side; see the module docstring.

    ``model`` / ``folded``: ModelProto or path. Without ``folded``, ``model`` is folded in memory with bnfold
    (``skip`` names rules to leave out) and the fold is timed too. ``providers``: ``"cpu"``, ``"cuda"`` (default:
    cpu, plus cuda when this onnxruntime build offers it); a provider that cannot run here is reported with
    ``available=False`` and the reason. ``opt_levels``: names from :data:`OPT_LEVELS`. Inputs are ``inputs``
    (name -> array) or seeded random values (:func:`bnfold.verify.make_inputs` with ``seed`` and ``input_shapes``).

    Raises :class:`~bnfold.errors.InputError` for unreadable models, bad arguments, inputs the models do not take,
    or a model that onnxruntime cannot run.
    """
    from . import ort as ortlib
    from .verify import check_inputs, make_inputs, real_inputs

    say = progress or (lambda _line: None)
    levels = _resolve_opt_levels(opt_levels)
    _check_counts(warmup=warmup, min_rounds=min_rounds, max_rounds=max_rounds, session_repeat=session_repeat)
    if repeat is not None:
        _check_counts(repeat=repeat)
    _check_seconds(min_time_s)
    threads = _resolve_threads(threads)
    wanted = ortlib.resolve_providers(providers)

    source = str(model) if isinstance(model, (str, os.PathLike)) else (model.graph.name or "<model>")
    original = _load_model(model, "model")
    fold_ms = fold_report = None
    if folded is None:
        from .onnx.fold import fold_onnx

        start = time.perf_counter()
        folded_model, fold_report = fold_onnx(original, skip=skip)
        fold_ms = (time.perf_counter() - start) * 1e3
        say(f"folded {source} in memory ({fold_ms:.0f} ms)")  # after: a model that cannot fold is one error line
    else:
        if skip:
            raise InputError("skip applies only when bnfold folds the model itself (no folded model given)")
        folded_model = _load_model(folded, "folded model")
    ideal, merges_ideal = ideal_model(original)

    feeds = check_inputs(original, inputs) if inputs is not None else make_inputs(original, input_shapes, seed)
    for name, m in (("folded", folded_model), ("ideal", ideal)):
        needed = [vi.name for vi in real_inputs(m.graph) if vi.name not in feeds]
        if needed:
            raise InputError(f"the {name} model needs input '{needed[0]}', which the original model does not have")

    report = BenchReport(
        model=source,
        folded_from="given" if folded is not None else "folded in memory",
        bn_original=_count_batchnorm(original),
        bn_folded=_count_batchnorm(folded_model),
        bn_ideal=_count_batchnorm(ideal),
        inputs={n: list(a.shape) for n, a in feeds.items()},
        warmup=warmup,
        fold_ms=fold_ms,
        fold=fold_report,
        merges_ideal=merges_ideal,
    )
    models = {"original": original, "folded": folded_model, "ideal": ideal}
    for provider in wanted:
        for level in levels:
            say(f"timing original, folded and ideal on {provider}, optimizations {level}")
            try:
                timings, rounds = time_models(
                    models, feeds, provider=provider, opt_level=level, warmup=warmup, repeat=repeat,
                    min_time_s=min_time_s, min_rounds=min_rounds, max_rounds=max_rounds,
                    session_repeat=session_repeat, threads=threads)
            except ProviderUnavailable as e:
                report.results.append(BenchResult(provider, level, available=False, reason=str(e)))
                continue
            report.results.append(BenchResult(provider, level, threads=threads, rounds=rounds, timings=timings))
    return report


class ProviderUnavailable(InputError):
    """The execution provider cannot run here (not in this onnxruntime build, no device, fell back to CPU)."""


def time_models(
    models: Mapping[str, onnx.ModelProto],
    feeds: Mapping[str, np.ndarray],
    *,
    provider: str = "cpu",
    opt_level: str = "disabled",
    warmup: int = 3,
    repeat: int | None = None,
    min_time_s: float = 1.0,
    min_rounds: int = 10,
    max_rounds: int = 10_000,
    session_repeat: int = 3,
    threads: int | None = None,
) -> tuple[dict[str, ModelTiming], int]:
    """Time several models side by side on one provider and optimization level: ``({name: ModelTiming}, rounds)``.

    The measurement protocol is the one in the module docstring; every model gets the inputs of ``feeds`` it
    declares. Raises :class:`ProviderUnavailable` when ``provider`` cannot run here, :class:`InputError` when a
    model cannot be run.
    """
    from . import ort as ortlib

    [short] = ortlib.resolve_providers(provider)
    [level] = _resolve_opt_levels(opt_level)
    _check_counts(warmup=warmup, min_rounds=min_rounds, max_rounds=max_rounds, session_repeat=session_repeat)
    if repeat is not None:
        _check_counts(repeat=repeat)
    threads = _resolve_threads(threads)
    if not models:
        raise InputError("time_models needs at least one model")
    unavailable = ortlib.unavailable_reason(short)
    if unavailable:
        raise ProviderUnavailable(unavailable)

    options = ortlib.session_options(level, threads=threads, timing=True)
    device = ("cuda", 0) if short == "cuda" else ("cpu", 0)
    ort = ortlib.runtime()

    names = list(models)
    creation: dict[str, list[float]] = {n: [] for n in names}
    sessions: dict[str, Any] = {}
    contexts: list = []
    try:
        for k in range(session_repeat):
            for name in names[k % len(names):] + names[:k % len(names)]:
                old = sessions.pop(name, None)
                if old is not None:
                    old[1].__exit__(None, None, None)
                    contexts.remove(old[1])
                    del old
                ctx = ortlib.open_session(models[name], options, short)
                try:
                    sess, seconds = ctx.__enter__()
                except Exception as e:  # noqa: BLE001 - onnxruntime raises many exception types
                    message = first_line(e)
                    if short == "cuda" and ortlib.is_cuda_setup_error(message):
                        raise ProviderUnavailable(f"CUDAExecutionProvider failed to start: {message}") from None
                    raise InputError(f"onnxruntime cannot create a session for the {name} model: {message}") from None
                contexts.append(ctx)
                sessions[name] = (sess, ctx)
                if not ortlib.placed_on(sess, short):
                    raise ProviderUnavailable(ortlib.CUDA_FELL_BACK)
                creation[name].append(seconds * 1e3)

        bindings = {name: _bind(ort, sess, models[name], feeds, device) for name, (sess, _) in sessions.items()}
        runners = {name: _runner(sessions[name][0], bindings[name], name) for name in names}
        samples = _interleaved(runners, warmup, repeat, min_time_s, min_rounds, max_rounds)
    finally:
        for ctx in reversed(contexts):
            ctx.__exit__(None, None, None)

    timings = {n: ModelTiming(statistics.median(creation[n]), Timing.from_samples(samples[n])) for n in names}
    return timings, len(samples[names[0]])


def strip_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every BatchNormalization node removed and its input wired to its consumers.

    The result computes a different function: it is the latency floor that folding can reach. A BN whose output is
    a graph output becomes an Identity (the output name must stay); a training-mode BN whose extra outputs are used
    is kept.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _strip_graph(copy.graph)
    return copy


def ideal_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The latency floor of folding and merging, and how many branch merges it took: ``model`` without its
    BatchNormalization nodes (:func:`strip_batchnorm`), then merged by bnfold's merge rules alone (an Add of a 3x3,
    a 1x1 and the input becomes one 3x3, as a reparameterized network is deployed). Where nothing merges, it is the
    stripped model. Like the stripped model it computes the wrong function: only its speed means something."""
    from .onnx.fold import fold_model
    from .onnx.merge import MERGES

    ideal = strip_batchnorm(model)
    report = fold_model(ideal, list(MERGES))  # in place; no fold rule: what is left to fold is nothing but merges
    return ideal, len(report.merged)


def plot(report: BenchReport, out_path) -> None:
    """Median latency of original, folded and ideal per (provider, optimization level), with p10-p90 whiskers,
    as a PNG written atomically."""
    from .plotting import check_png_path, new_figure, save_png

    out_path = check_png_path(out_path)
    runs = [r for r in report.results if r.available]
    fig = new_figure(max(8.0, 2.6 * len(runs) + 3.0), 4.5)
    ax_latency, ax_session = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    fig.suptitle(f"bnfold bench: {os.path.basename(report.model)}", fontsize=10)
    width = 0.26
    colours = {"original": "tab:gray", "folded": "tab:blue", "ideal": "tab:green"}
    x = np.arange(len(runs))
    labels = [f"{r.provider}\nopt {r.opt_level}" for r in runs]
    for j, name in enumerate(_MODELS):
        if not runs:
            break
        lat = [r.timings[name].latency for r in runs]
        ax_latency.bar(x + (j - 1) * width, [t.median_ms for t in lat], width, label=name, color=colours[name],
                       yerr=[[t.median_ms - t.p10_ms for t in lat], [t.p90_ms - t.median_ms for t in lat]],
                       capsize=3)
        ax_session.bar(x + (j - 1) * width, [r.timings[name].session_ms or 0.0 for r in runs], width, label=name,
                       color=colours[name])
    for i, r in enumerate(runs):
        top = max(r.timings[n].latency.p90_ms for n in _MODELS)
        ax_latency.annotate(f"{r.speedup:.2f}x", (i, top), textcoords="offset points", xytext=(0, 4),
                            ha="center", fontsize=8)
    for ax, title in ((ax_latency, "latency, ms: median, p10-p90 whiskers; label = original/folded"),
                      (ax_session, "session creation, ms (median)")):
        ax.set_title(title, fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        if runs:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no provider could run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    save_png(fig, out_path)


# ------------------------------------------------------------------------------------------------------ timing


def _interleaved(runners: dict[str, Callable[[], float]], warmup: int, repeat: int | None, min_time_s: float,
                 min_rounds: int, max_rounds: int) -> dict[str, list[float]]:
    names = list(runners)
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(warmup):
            for n in names:
                runners[n]()
        start = time.perf_counter()
        rounds = 0
        while True:
            k = rounds % len(names)
            for n in names[k:] + names[:k]:
                samples[n].append(runners[n]())
            rounds += 1
            if repeat is not None:
                if rounds >= repeat:
                    break
            elif rounds >= max_rounds or (rounds >= min_rounds and time.perf_counter() - start >= min_time_s):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def _bind(ort: Any, sess: Any, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], device: tuple[str, int]):
    """An IO binding with the model's inputs placed once on ``device`` and its outputs allocated there."""
    declared = {i.name for i in sess.get_inputs()}
    binding = sess.io_binding()
    for name, arr in feeds.items():
        if name not in declared:
            continue
        arr = np.ascontiguousarray(arr)
        if arr.dtype == ml_dtypes.bfloat16:
            # no device placement for bfloat16 from numpy: bound on the CPU, onnxruntime copies it where needed
            value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(np.uint16), TensorProto.BFLOAT16)
        else:
            value = ort.OrtValue.ortvalue_from_numpy(arr, device[0], device[1])
        binding.bind_ortvalue_input(name, value)
    for out in sess.get_outputs():
        binding.bind_output(out.name, device[0], device[1])
    return binding


def _runner(sess: Any, binding: Any, name: str) -> Callable[[], float]:
    def run() -> float:
        try:
            start = time.perf_counter()
            sess.run_with_iobinding(binding)
            return (time.perf_counter() - start) * 1e3
        except Exception as e:  # noqa: BLE001 - onnxruntime raises many exception types
            raise InputError(f"onnxruntime cannot run the {name} model: {first_line(e)}") from None

    return run


# ------------------------------------------------------------------------------------------------ ideal model


def _strip_graph(graph: onnx.GraphProto) -> None:
    outputs = {vi.name for vi in graph.output}
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for _, sub in subgraphs(node):
            used.update(_names_used_in(sub))
    renames: dict[str, str] = {}
    kept = []
    parameters: set[str] = set()  # scale, bias, mean, var of removed BNs
    for node in graph.node:
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx") and node.input:
            extra_used = any(o and (o in used or o in outputs) for o in node.output[1:])
            if not extra_used:
                x, y = _resolve(node.input[0], renames), node.output[0]
                if y in outputs:
                    kept.append(helper.make_node("Identity", [x], [y], name=node.name))
                else:
                    renames[y] = x
                parameters.update(node.input[1:])
                continue
        kept.append(node)
    kept = _without_dead_producers(kept, parameters, outputs)
    del graph.node[:]
    graph.node.extend(kept)
    for node in graph.node:
        _rename_inputs(node, renames)
        for _, sub in subgraphs(node):
            _strip_graph(sub)


def _without_dead_producers(nodes: list[onnx.NodeProto], names: set[str], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` less those that only computed ``names`` (the parameters of removed BNs, e.g. an exporter's
    Shape -> Expand chains), transitively: they belong to the BN and would still run if left."""
    consumers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
        for _, sub in subgraphs(node):
            for name in _names_used_in(sub):
                consumers[name] = consumers.get(name, 0) + 1
    producer = {o: i for i, node in enumerate(nodes) for o in node.output if o}
    dead: set[int] = set()
    pending = [producer[n] for n in names if n in producer]
    while pending:
        i = pending.pop()
        if i in dead or any(consumers.get(o, 0) or o in outputs for o in nodes[i].output if o):
            continue
        dead.add(i)
        for name in nodes[i].input:
            consumers[name] -= 1
            if name in producer:
                pending.append(producer[name])
        for _, sub in subgraphs(nodes[i]):
            for name in _names_used_in(sub):
                consumers[name] -= 1
                if name in producer:
                    pending.append(producer[name])
    return [node for i, node in enumerate(nodes) if i not in dead]


def _rename_inputs(node: onnx.NodeProto, renames: dict[str, str]) -> None:
    if not renames:
        return
    for i, name in enumerate(node.input):
        if name in renames:
            node.input[i] = _resolve(name, renames)
    for _, sub in subgraphs(node):  # outer-scope references inside subgraphs
        for inner in sub.node:
            _rename_inputs(inner, renames)
        for vi in sub.output:
            if vi.name in renames:
                # a subgraph output that is a BN output of the outer graph: route it through an Identity
                sub.node.append(helper.make_node("Identity", [_resolve(vi.name, renames)], [vi.name]))


def _resolve(name: str, renames: dict[str, str]) -> str:
    while name in renames:
        name = renames[name]
    return name


def _names_used_in(graph: onnx.GraphProto) -> set[str]:
    used = {vi.name for vi in graph.output}
    for node in graph.node:
        used.update(node.input)
        for _, sub in subgraphs(node):
            used.update(_names_used_in(sub))
    return used


def _count_batchnorm(model: onnx.ModelProto) -> int:
    def count(graph: onnx.GraphProto) -> int:
        return sum((node.op_type == "BatchNormalization") + sum(count(s) for _, s in subgraphs(node))
                   for node in graph.node)

    return count(model.graph)


# ------------------------------------------------------------------------------------------------- arguments


def _load_model(model: Any, what: str) -> onnx.ModelProto:
    from .onnx.graph import GraphIndex, ModelContext

    if isinstance(model, (str, os.PathLike)):
        from .onnx.io import load_model

        model = load_model(model)
    elif not isinstance(model, onnx.ModelProto):
        raise InputError(f"{what} must be an onnx.ModelProto or a path, not {type(model).__name__}")
    GraphIndex(model.graph, ModelContext(model))  # InputError for an invalid graph, before any session is made
    return model


def _resolve_opt_levels(levels: Iterable[str] | str) -> list[str]:
    if isinstance(levels, str):
        levels = [levels]
    resolved: list[str] = []
    for level in levels:
        key = str(level).strip().lower()
        if key not in OPT_LEVELS:
            raise InputError(f"unknown optimization level '{level}' (choose from {', '.join(OPT_LEVELS)})")
        if key not in resolved:
            resolved.append(key)
    if not resolved:
        raise InputError(f"give at least one optimization level ({', '.join(OPT_LEVELS)})")
    return resolved


def _resolve_threads(threads: int | None) -> int:
    if threads is None:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be an integer >= 1, got {threads!r}")
    return threads


def _check_counts(**counts: Any) -> None:
    minimum = {"warmup": 0}
    for name, value in counts.items():
        low = minimum.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_seconds(min_time_s: Any) -> None:
    if isinstance(min_time_s, bool) or not isinstance(min_time_s, (int, float)) or not min_time_s >= 0:
        raise InputError(f"min_time_s must be a number of seconds >= 0, got {min_time_s!r}")
