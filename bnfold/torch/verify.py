"""Check that a folded PyTorch module computes the same function as the original, and time both.

:func:`verify` runs the original and the folded module on the same inputs, on each requested device, and judges
every output with :func:`bnfold.verify.compare_arrays`: the rule is the ONNX verifier's (see :mod:`bnfold.verify`).
The rounding noise is measured the same way: the original is run :data:`bnfold.verify.NOISE_DRAWS` more times as a
copy whose floating-point parameters and buffers are moved one ulp up or down at random (seeded), and an output
passes when ``max |folded − original| <= NOISE_FACTOR · max(noise, ε·max |original|)``; integers and bools must
match exactly; explicit ``atol``/``rtol`` replace the rule. The result is a :class:`~bnfold.report.VerifyReport`,
truthy when every device that could run passed.

:func:`benchmark` times eager forward passes of the original, the folded and optionally an "ideal" module
(e.g. the original with every BatchNorm removed) on the same inputs, interleaved, and returns a
:class:`TorchBenchmark`.

Inputs (both functions): a tensor (the one positional argument), a tuple of positional arguments, or a list of
such, one per batch. Outputs may be a tensor or any nesting of tuples, lists and dicts (named tuples and
``OrderedDict``-based model outputs included); they are flattened in order with names like ``output``,
``output[0]``, ``output['logits']``, ``output[1]['boxes']``.

The caller's modules are never modified. A module that already lives on the target device is run as it is, in
eval mode, under ``torch.inference_mode()``; the ``training`` flag of every submodule is restored afterwards.
A module that lives elsewhere (CPU module, ``cuda`` device) is deep-copied and the copy moved. Every run gets its
own copy of the inputs, so a module that writes into its input cannot change what the other one sees.

This module imports torch; ``import bnfold`` does not import it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from bnfold.errors import InputError, first_line
from bnfold.report import ProviderResult, Timing, VerifyReport
from bnfold.verify import NOISE_DRAWS, compare_arrays, failed_comparison, max_abs_difference

__all__ = ["verify", "benchmark", "perturb_", "TorchBenchmark", "Timing"]

_CUDA_MISSING = "torch.cuda.is_available() is False"


# --------------------------------------------------------------------------------------------------- verify


def verify(
    original: nn.Module,
    folded: nn.Module,
    inputs: Any,
    *,
    devices: Iterable[str | torch.device] | str | torch.device | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> VerifyReport:
    """Run ``original`` and ``folded`` on ``inputs`` on each device and judge every output (module docstring).

    ``devices``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (a name, a ``torch.device`` or a list of them); default
    ``cpu`` plus ``cuda`` when ``torch.cuda.is_available()``. A CUDA device that is not there is reported with
    ``available=False`` and the reason. ``atol``/``rtol``: explicit tolerances instead of the noise rule.
    ``seed`` seeds the weight perturbations of the noise estimate.

    With several batches, each output's errors are the worst over all batches. An output of the original that
    the folded module does not return, returns with another shape or dtype, or an extra output of the folded
    module, fails (the device's ``reason`` says which).

    Raises :class:`~bnfold.errors.InputError` for an unknown device, inputs of an unsupported form, a module that
    is not an ``nn.Module``, or when the original module raises. A folded module that raises fails the device.
    """
    _check_module(original, "original")
    _check_module(folded, "folded")
    batches = _batches(inputs)
    wanted = resolve_devices(devices)

    report = VerifyReport()
    for name, device in wanted:
        if device.type == "cuda":
            missing = cuda_missing(device)
            if missing:
                report.providers[name] = ProviderResult(name, available=False, reason=missing)
                continue
        report.providers[name] = _verify_on(name, device, original, folded, batches, atol, rtol, seed)
    return report


def _verify_on(
    name: str,
    device: torch.device,
    original: nn.Module,
    folded: nn.Module,
    batches: list[tuple],
    atol: float | None,
    rtol: float | None,
    seed: int = 0,
) -> ProviderResult:
    outs_o: list[list[tuple[str, Any]]] = []
    outs_f: list[list[tuple[str, Any]]] = []
    failure = ""
    with _placed(original, device) as mod_o:
        for i, args in enumerate(batches):
            try:
                out = _forward(mod_o, args, device)
            except Exception as e:  # noqa: BLE001 - any exception from user code means "cannot run"
                raise InputError(f"the original module raised{_on_batch(i, batches)}: "
                                 f"{first_line(e, with_type=True)}") from None
            outs_o.append(_flatten(out))
    with _placed(folded, device) as mod_f:
        for i, args in enumerate(batches):
            try:
                out = _forward(mod_f, args, device)
            except Exception as e:  # noqa: BLE001
                failure = f"the folded module raised{_on_batch(i, batches)}: {first_line(e, with_type=True)}"
                break
            outs_f.append(_flatten(out))

    result = ProviderResult(name)
    names = _ordered_names(outs_o)
    if failure:
        result.reason = failure
        result.outputs = [failed_comparison(n, _dtype_of(_first_value(outs_o, n))) for n in names]
        if not result.outputs:
            result.outputs = [failed_comparison("<module>", "")]
        return result

    noise = {} if atol is not None or rtol is not None else _noise(original, device, batches, outs_o, seed)

    notes: list[str] = []
    for out_name in names:
        per_o, per_f = [], []
        dtype, problem = "", ""
        for i, (o, f) in enumerate(zip(outs_o, outs_f)):
            got_o, got_f = dict(o), dict(f)
            if out_name not in got_o:  # the original's outputs may differ from batch to batch
                continue
            b = got_o[out_name]
            dtype = dtype or _dtype_of(b)
            if out_name not in got_f:
                problem = f"the folded module returns no {out_name}{_on_batch(i, batches)}"
                break
            a = got_f[out_name]
            if _dtype_of(a) != _dtype_of(b):
                problem = (f"{out_name} is {_dtype_of(a) or 'None'} from the folded module, "
                           f"{_dtype_of(b) or 'None'} from the original{_on_batch(i, batches)}")
                break
            b_np, a_np = _to_numpy(b), _to_numpy(a)
            if np.shape(a_np) != np.shape(b_np):
                problem = (f"{out_name} has shape {tuple(np.shape(a_np))} from the folded module, "
                           f"{tuple(np.shape(b_np))} from the original{_on_batch(i, batches)}")
                break
            per_o.append(b_np)
            per_f.append(a_np)
        if problem:
            notes.append(problem)
            result.outputs.append(failed_comparison(out_name, dtype))
            continue
        result.outputs.append(compare_arrays(out_name, per_o, per_f, noise=noise.get(out_name), atol=atol,
                                             rtol=rtol, dtype=dtype))

    for i, (o, f) in enumerate(zip(outs_o, outs_f)):
        known = {n for n, _ in o}
        for out_name, value in f:
            if out_name not in known:
                notes.append(f"the folded module returns {out_name}, which the original does not"
                             f"{_on_batch(i, batches)}")
                if out_name not in {c.name for c in result.outputs}:
                    result.outputs.append(failed_comparison(out_name, _dtype_of(value)))
    result.reason = "; ".join(notes)
    return result


# Integer views that step a float's bit pattern by one ulp (two's-complement addition on the sign-magnitude bits).
_BIT_VIEWS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
              torch.float64: torch.int64}


def perturb_(module: nn.Module, generator: torch.Generator) -> None:
    """Move every finite non-zero element of the module's floating-point parameters and buffers one ulp up or down
    in magnitude, in place (random signs from ``generator``; zeros, NaN and inf kept; shared tensors once)."""
    seen: set[int] = set()
    with torch.no_grad():
        for t in itertools.chain(module.parameters(), module.buffers()):
            if t.dtype not in _BIT_VIEWS or id(t) in seen or t.numel() == 0:
                continue
            seen.add(id(t))
            host = t.detach().cpu().contiguous()
            up = torch.randint(0, 2, host.shape, generator=generator, dtype=torch.bool)
            step = torch.where(up, 1, -1).to(_BIT_VIEWS[t.dtype])
            moved = (host.view(_BIT_VIEWS[t.dtype]) + step).view(t.dtype)
            keep = (host == 0) | ~torch.isfinite(host) | ~torch.isfinite(moved)
            t.copy_(torch.where(keep, host, moved).to(t.device))


def _noise(original: nn.Module, device: torch.device, batches: list[tuple], outs_o: list[list[tuple[str, Any]]],
           seed: int) -> dict[str, float]:
    """Per output name, the largest difference the perturbed copies of the original show."""
    noise: dict[str, float] = {}
    for draw in range(NOISE_DRAWS):
        generator = torch.Generator().manual_seed(seed * 1000 + draw + 1)
        copy_ = copy.deepcopy(original)
        perturb_(copy_, generator)
        with _placed(copy_, device) as mod_p:
            try:
                outs_p = [_flatten(_forward(mod_p, args, device)) for args in batches]
            except Exception as e:  # noqa: BLE001 - any exception from user code
                raise InputError(f"the original module raised with perturbed weights: {first_line(e)}") from None
        del copy_
        for name in _ordered_names(outs_o):
            per_o, per_p = [], []
            for o, p in zip(outs_o, outs_p):
                got_o, got_p = dict(o), dict(p)
                if name in got_o:
                    per_o.append(_to_numpy(got_o[name]))
                    per_p.append(_to_numpy(got_p[name]) if name in got_p else None)
            d = max_abs_difference(per_o, per_p)
            if np.isfinite(d):
                noise[name] = max(noise.get(name, 0.0), d)
    return noise



# ------------------------------------------------------------------------------------------------- benchmark


@dataclass
class TorchBenchmark:
    """Eager latencies of the original, folded and (optionally) ideal module; ``speedup`` = original / folded."""

    original: Timing
    folded: Timing
    ideal: Timing | None
    speedup: float
    device: str
    threads: int
    warmup: int
    repeat: int
    batches: int = 1

    @property
    def folded_vs_ideal(self) -> float | None:
        """folded median / ideal median (1.0 = as fast as the module without BatchNorm); None without ``ideal``."""
        if self.ideal is None:
            return None
        return self.folded.median_ms / self.ideal.median_ms

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "threads": self.threads,
            "warmup": self.warmup,
            "repeat": self.repeat,
            "batches": self.batches,
            "original": self.original.to_dict(),
            "folded": self.folded.to_dict(),
            "ideal": self.ideal.to_dict() if self.ideal is not None else None,
            "speedup": self.speedup,
            "folded_vs_ideal": self.folded_vs_ideal,
        }

    def summary_lines(self) -> list[str]:
        rows = [("original", self.original), ("folded", self.folded)]
        if self.ideal is not None:
            rows.append(("ideal", self.ideal))
        lines = [f"eager latency on {self.device}, {self.threads} thread(s), median of {self.repeat} "
                 f"after {self.warmup} warm-up(s):"]
        lines += [f"  {name:<8} {t.median_ms:9.3f} ms  (p10 {t.p10_ms:.3f}, p90 {t.p90_ms:.3f})" for name, t in rows]
        lines.append(f"  speedup original/folded: {self.speedup:.3f}x")
        if self.ideal is not None:
            lines.append(f"  folded/ideal: {self.folded_vs_ideal:.3f}")
        return lines


def benchmark(
    original: nn.Module,
    folded: nn.Module,
    inputs: Any,
    *,
    ideal: nn.Module | None = None,
    device: str | torch.device = "cpu",
    warmup: int = 5,
    repeat: int = 30,
    threads: int | None = None,
) -> TorchBenchmark:
    """Time eager forward passes of ``original``, ``folded`` (and ``ideal``) on the same inputs.

    Each module runs in eval mode under ``torch.inference_mode()`` (flags restored afterwards; a module not on
    ``device`` is timed as a deep copy moved there). One sample is one forward pass per input batch. The modules
    take turns within each round, and the order rotates from round to round, so that drift on a noisy machine
    hits all of them alike; ``warmup`` rounds come first and are not counted. On CUDA, the device is synchronized
    before and after every timed call. ``threads`` sets ``torch.set_num_threads`` for the measurement and is
    restored afterwards. The garbage collector is paused while timing.

    Raises :class:`~bnfold.errors.InputError` for bad arguments, an unknown or absent device, or a module that
    raises.
    """
    for module, what in ((original, "original"), (folded, "folded"), (ideal, "ideal")):
        if module is not None or what != "ideal":
            _check_module(module, what)
    batches = _batches(inputs)
    if not isinstance(device, (str, torch.device)):
        raise InputError(f"device must be one name such as 'cpu' or 'cuda', got {type(device).__name__}")
    [(dev_name, dev)] = resolve_devices(device)
    if dev.type == "cuda":
        missing = cuda_missing(dev)
        if missing:
            raise InputError(f"cannot benchmark on {dev_name}: {missing}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"warmup must be an integer >= 0, got {warmup!r}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise InputError(f"repeat must be an integer >= 1, got {repeat!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be an integer >= 1, got {threads!r}")

    named = [("original", original), ("folded", folded)] + ([("ideal", ideal)] if ideal is not None else [])
    saved_threads = torch.get_num_threads()
    gc_was_enabled = gc.isenabled()
    samples: dict[str, list[float]] = {n: [] for n, _ in named}
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
        with contextlib.ExitStack() as stack:
            placed = [(n, stack.enter_context(_placed(m, dev))) for n, m in named]
            # inputs are moved once; timing covers the forward passes only
            moved = [_to_device(args, dev) for args in batches]
            gc.collect()
            gc.disable()
            for rnd in range(warmup + repeat):
                k = rnd % len(placed)
                for out_name, module in placed[k:] + placed[:k]:
                    elapsed = _timed(module, moved, dev, out_name)
                    if rnd >= warmup:
                        samples[out_name].append(elapsed)
    finally:
        if gc_was_enabled:
            gc.enable()
        if threads is not None:
            torch.set_num_threads(saved_threads)

    t_o = Timing.from_samples(samples["original"])
    t_f = Timing.from_samples(samples["folded"])
    t_i = Timing.from_samples(samples["ideal"]) if ideal is not None else None
    return TorchBenchmark(
        original=t_o,
        folded=t_f,
        ideal=t_i,
        speedup=t_o.median_ms / t_f.median_ms,
        device=dev_name,
        threads=used_threads,
        warmup=warmup,
        repeat=repeat,
        batches=len(batches),
    )


def _timed(module: nn.Module, batches: list[tuple], device: torch.device, what: str) -> float:
    """Milliseconds for one forward pass per batch."""
    cuda = device.type == "cuda"
    try:
        with torch.inference_mode():
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for args in batches:
                module(*args)
            if cuda:
                torch.cuda.synchronize(device)
            end = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - any exception from user code
        raise InputError(f"the {what} module raised: {first_line(e, with_type=True)}") from None
    return (end - start) * 1e3


# ------------------------------------------------------------------------------------------ running modules


def _check_module(module: Any, what: str) -> None:
    if not isinstance(module, nn.Module):
        raise InputError(f"the {what} module must be a torch.nn.Module, got {type(module).__name__}")


def _batches(inputs: Any) -> list[tuple]:
    """The batches as tuples of positional arguments."""
    items = inputs if isinstance(inputs, list) else [inputs]
    if not items:
        raise InputError("inputs is an empty list: give a tensor, a tuple of arguments, or a list of them")
    batches = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            batches.append((item,))
        elif isinstance(item, tuple):
            batches.append(item)
        else:
            where = f"inputs[{i}]" if isinstance(inputs, list) else "inputs"
            raise InputError(
                f"{where} is a {type(item).__name__}: expected a tensor or a tuple of positional arguments"
            )
    return batches


def resolve_devices(devices: Any) -> list[tuple[str, torch.device]]:
    """(report name, torch.device) for each requested device, in order, without duplicates."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    elif isinstance(devices, (str, torch.device)):
        devices = [devices]
    resolved: list[tuple[str, torch.device]] = []
    for d in devices:
        name = str(d).strip().lower() if isinstance(d, (str, torch.device)) else None
        try:
            dev = torch.device(name) if name else None
        except (RuntimeError, ValueError, TypeError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
            raise InputError(f"unknown device {d!r} (expected 'cpu', 'cuda' or 'cuda:N')")
        if dev.type == "cpu":
            name, dev = "cpu", torch.device("cpu")
        if name not in (n for n, _ in resolved):
            resolved.append((name, dev))
    return resolved


def cuda_missing(device: torch.device) -> str:
    """Why ``device`` (type cuda) cannot be used, or ""."""
    if not torch.cuda.is_available():
        return _CUDA_MISSING
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"{device} requested but torch.cuda.device_count() is {count}"
    return ""


def _concrete(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, so that it compares equal with tensors' devices."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _to_eval(module: nn.Module) -> None:
    """module.eval(); a torch.export program's module refuses eval() (its graph is fixed): clear the flags."""
    try:
        module.eval()
    except NotImplementedError:
        for m in module.modules():
            m.training = False


@contextlib.contextmanager
def _placed(module: nn.Module, device: torch.device):
    """The module on ``device`` in eval mode: the module itself if it is there (flags restored after), else a
    deep copy moved there."""
    target = _concrete(device)
    tensors = itertools.chain(module.parameters(), module.buffers())
    if all(t.device == target for t in tensors):
        flags = [(m, m.training) for m in module.modules()]
        _to_eval(module)
        try:
            yield module
        finally:
            for m, training in flags:
                m.training = training
        return
    moved = copy.deepcopy(module).to(target)
    _to_eval(moved)
    try:
        yield moved
    finally:
        del moved


def _forward(module: nn.Module, args: tuple, device: torch.device) -> Any:
    with torch.inference_mode():
        out = module(*_to_device(args, device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return out


def _to_device(value: Any, device: torch.device) -> Any:
    """A copy of ``value`` with every tensor (in tuples, lists, dicts) copied to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuple
        return type(value)(*(_to_device(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _to_device(v, device)) for k, v in value.items())
    return value


# -------------------------------------------------------------------------------------------------- outputs


def _flatten(value: Any, name: str = "output") -> list[tuple[str, Any]]:
    """(name, leaf) pairs in order: tensors and anything that is not a tuple, list or dict."""
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if isinstance(value, Mapping):
        return [pair for k, v in value.items() for pair in _flatten(v, f"{name}[{k!r}]")]
    if isinstance(value, (list, tuple)):
        return [pair for i, v in enumerate(value) for pair in _flatten(v, f"{name}[{i}]")]
    return [(name, value)]


def _ordered_names(outs: list[list[tuple[str, Any]]]) -> list[str]:
    seen: dict[str, None] = {}
    for batch in outs:
        for n, _ in batch:
            seen.setdefault(n, None)
    return list(seen)


def _first_value(outs: list[list[tuple[str, Any]]], name: str) -> Any:
    return next((v for batch in outs for n, v in batch if n == name), None)


def _dtype_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch.")
    if value is None:
        return ""
    return np.asarray(value).dtype.name


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy array of the leaf; types numpy lacks (bfloat16, float8, complex32) are widened exactly first."""
    if not isinstance(value, torch.Tensor):
        return np.asarray(value)
    t = value.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.cpu().resolve_conj().resolve_neg()
    try:
        return t.numpy()
    except TypeError:
        if t.is_complex():
            return t.to(torch.complex64).numpy()
        if t.is_floating_point():
            return t.to(torch.float32).numpy()
        raise


def _on_batch(i: int, batches: list) -> str:
    return f" on batch {i}" if len(batches) > 1 else ""
