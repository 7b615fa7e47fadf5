"""Recompute the population statistics of a module's BatchNorm layers from data ("precise BN").

Training leaves ``running_mean`` / ``running_var`` as an exponential moving average of batch statistics taken
while the weights were still changing; after fine-tuning, pruning, weight averaging or quantization they no longer
describe what the layers see. :func:`recalibrate` runs calibration batches through the module and replaces them
by estimates from :mod:`bnfold.stats` (float64 throughout, cast once to the buffers' dtype).
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InputError
from ..stats import BatchStatistics, ema

__all__ = ["recalibrate"]

ESTIMATORS = ("unbiased", "ema")
_EMA_DISTRIBUTED = ("the ema estimator is order dependent and not defined across processes; "
                    "use estimator='unbiased'")


# Below var = 1000 * eps, recovering var from a float32 1/sqrt(var + eps) loses more than ~1e-4 relative.
_RECOVERABLE = 1000.0


class _Recorder:
    """Stands in for one BatchNorm layer's forward: records the float64 moments of each input it sees and
    normalizes by them (training-mode BatchNorm without touching the running statistics)."""

    def __init__(self, name: str, layer: _BatchNorm):
        self.name = name
        self.layer = layer
        self.means: list[torch.Tensor] = []  # per call, float64 on the activation's device (no sync per batch)
        self.variances: list[torch.Tensor] = []  # biased (divided by m)
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"BatchNorm layer {self.name!r} got input {shape}; expected [N, C, ...]")
        check_input_dim = getattr(layer, "_check_input_dim", None)
        if check_input_dim is not None:
            try:
                check_input_dim(x)
            except ValueError as e:
                raise InputError(f"BatchNorm layer {self.name!r}: {e}") from None
        if x.shape[1] != layer.num_features:
            raise InputError(f"BatchNorm layer {self.name!r} has {layer.num_features} channels but its input "
                             f"{tuple(x.shape)} has {x.shape[1]}")
        m = x.numel() // x.shape[1]
        if m < 2:
            raise InputError(f"BatchNorm layer {self.name!r} got input {tuple(x.shape)} with {m} value per "
                             "channel; batch statistics need at least 2 (use larger calibration batches)")
        dims = [0, *range(2, x.dim())]
        if x.dtype == torch.float32:
            # torch's own training-mode kernel: one fused pass that normalizes and keeps the batch mean and
            # 1/sqrt(var + eps) (accumulated in double on the CPU, stored as float32). var = invstd**-2 - eps is
            # then exact to ~1e-7 relative unless var is small against eps; those layers take the exact path.
            out, mean, invstd = torch.native_batch_norm(x, layer.weight, layer.bias, None, None, True, 0.0,
                                                        layer.eps)
            variance = invstd.detach().to(torch.float64).pow(-2) - layer.eps
            if bool((variance >= _RECOVERABLE * layer.eps).all()):
                self.means.append(mean.detach().to(torch.float64))
                self.variances.append(variance)
                self.sizes.append(m)
                return out
        return self._exact(x, layer, dims, m)

    def _exact(self, x, layer, dims, m):
        """Two passes in at least float32 (mean, then mean of squared deviations: no cancellation), recorded in
        float64; the same centered values are then normalized, as training mode does."""
        work = x.detach() if x.dtype in (torch.float32, torch.float64) else x.detach().float()
        mean = work.mean(dim=dims, keepdim=True)
        centered = work - mean
        variance = centered.square().mean(dim=dims)
        self.means.append(mean.reshape(-1).to(torch.float64))
        self.variances.append(variance.to(torch.float64))
        self.sizes.append(m)
        scale = torch.rsqrt(variance + layer.eps)
        if layer.weight is not None:
            scale = scale * layer.weight.to(scale.dtype)
        view = (1, -1) + (1,) * (x.dim() - 2)
        out = centered.mul_(scale.view(view))  # centered is this call's own buffer: scale and shift it in place
        if layer.bias is not None:
            out.add_(layer.bias.to(out.dtype).view(view))
        return out.to(x.dtype)

    def moments(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """All recorded ``(means [K, C], biased variances [K, C], sizes)`` as float64 numpy (one copy each)."""
        if not self.sizes:
            empty = np.zeros((0, self.layer.num_features))
            return empty, empty, []
        means = torch.stack(self.means).cpu().numpy()
        variances = torch.stack(self.variances).cpu().numpy()
        return means, variances, list(self.sizes)

    def statistics(self) -> BatchStatistics:
        """The recorded batches as bnfold's mergeable sufficient statistics."""
        statistics = BatchStatistics(self.layer.num_features)
        means, variances, sizes = self.moments()
        for index, m in enumerate(sizes):
            try:
                statistics.update_from_moments(means[index], variances[index], m)
            except InputError as e:
                raise InputError(f"BatchNorm layer {self.name!r}, batch {index}: {e}") from None
        return statistics


def _check_arguments(module, batches, estimator, decay, max_batches) -> None:
    if not isinstance(module, nn.Module):
        raise InputError(f"module must be a torch.nn.Module, not {type(module).__name__}")
    if estimator not in ESTIMATORS:
        raise InputError(f"unknown estimator {estimator!r}, expected one of {', '.join(map(repr, ESTIMATORS))}")
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 < float(decay) <= 1.0:
        raise InputError(f"decay must be a number in (0, 1], got {decay!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral)
                                    or max_batches < 1):
        raise InputError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    if isinstance(batches, (torch.Tensor, np.ndarray)) or not hasattr(batches, "__iter__"):
        raise InputError("batches must be an iterable of inputs (a list, generator or DataLoader); "
                         "wrap a single batch as [x]")


def _batchnorm_layers(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    layers = []
    for name, layer in module.named_modules():
        if not isinstance(layer, _BatchNorm) or not layer.track_running_stats:
            continue  # without running statistics a BatchNorm always normalizes by the batch: nothing to store
        if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
            raise InputError(f"lazy BatchNorm layer {name!r} is not initialized; run one forward pass first")
        layers.append((name or type(module).__name__, layer))
    if not layers:
        raise InputError(f"{type(module).__name__} has no BatchNorm layer with running statistics to recalibrate")
    return layers


def _call(module: nn.Module, batch):
    if isinstance(batch, (tuple, list)):
        return module(*batch)
    if isinstance(batch, dict):
        return module(**batch)
    return module(batch)


def _run_batches(module, recorders, batches, max_batches) -> int:
    """Feed the batches with BatchNorm in batch-statistics mode and everything else in eval mode; restores the
    layers' forwards and every submodule's training flag afterwards, also on error. Returns the batch count."""
    flags = [(submodule, submodule.training) for submodule in module.modules()]
    saved_forwards = []
    seen = 0
    try:
        module.eval()
        for recorder in recorders:
            layer = recorder.layer
            saved_forwards.append((layer, layer.__dict__.get("forward", None), "forward" in layer.__dict__))
            layer.forward = recorder.forward
        with torch.no_grad():
            for batch in batches:
                _call(module, batch)
                seen += 1
                if max_batches is not None and seen >= max_batches:
                    break  # before pulling another item: a generator is not advanced past max_batches
    finally:
        for layer, forward, had_forward in reversed(saved_forwards):
            if had_forward:
                layer.__dict__["forward"] = forward
            else:
                del layer.__dict__["forward"]
        for submodule, training in flags:
            submodule.training = training
    return seen


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _collective_device() -> torch.device:
    backend = str(torch.distributed.get_backend())
    if "nccl" in backend and "cpu:" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_statistics(recorders, seen: int,
                           local_error: Exception | None) -> tuple[int, list[BatchStatistics]]:
    """Sum every layer's sufficient statistics over all processes (two all-reduces in total).

    The first one checks, before any data is exchanged, that every process has the same layout (the same model)
    and that none failed; otherwise every process raises instead of some of them waiting forever.
    """
    dist = torch.distributed
    device = _collective_device()
    layout = sum(2 + 2 * recorder.layer.num_features for recorder in recorders)
    status = torch.tensor([1.0 if local_error is not None else 0.0, layout, -layout], dtype=torch.float64,
                          device=device)
    dist.all_reduce(status, op=dist.ReduceOp.MAX)
    failed, largest, smallest = status.tolist()
    if local_error is not None:
        raise local_error
    if failed:
        raise InputError("recalibrate failed on another process; see that process's error")
    if largest != -smallest:
        raise InputError("processes call recalibrate with different BatchNorm layers; every process must "
                         "recalibrate the same model")
    parts = [np.array([seen], dtype=np.float64)]
    for recorder in recorders:
        counts, sums = recorder.statistics().to_arrays()
        parts.extend([counts, sums])
    flat = torch.from_numpy(np.concatenate(parts)).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu().numpy()
    merged, offset = [], 1
    for recorder in recorders:
        channels = recorder.layer.num_features
        counts, sums = flat[offset:offset + 2], flat[offset + 2:offset + 2 + 2 * channels]
        offset += 2 + 2 * channels
        merged.append(BatchStatistics.from_arrays(counts, sums))
    return int(flat[0]), merged


def _write(layer: _BatchNorm, mean: np.ndarray, var: np.ndarray, batch_count: int) -> None:
    with torch.no_grad():
        for buffer, value in ((layer.running_mean, mean), (layer.running_var, var)):
            buffer.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(device=buffer.device, dtype=buffer.dtype))
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.fill_(batch_count)


def recalibrate(module: nn.Module, batches, estimator: str = "unbiased", decay: float = 0.9,
                max_batches: int | None = None) -> nn.Module:
    """Recompute the running statistics of every BatchNorm layer of ``module`` from ``batches``; in place.

    ``batches`` is an iterable of inputs (a list, generator or ``DataLoader``); each item is a tensor passed as
    ``module(x)``, a tuple/list of positional arguments ``module(*x)``, or a dict of keyword arguments. Inputs are
    not moved: put them on the module's device. At most ``max_batches`` items are taken (a generator is not
    advanced further). Every ``_BatchNorm`` subclass with ``track_running_stats=True`` is recalibrated
    (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, their lazy variants once initialized).

    **Semantics.** Under ``torch.no_grad()`` the batches run the way training sees them as far as BatchNorm is
    concerned and the way inference does otherwise: each BatchNorm layer normalizes by the statistics of the
    current batch (so the inputs of later layers are what they were in training), while dropout and every other
    module stay in eval mode. For each layer the per-channel mean and biased variance of its input (over all
    dimensions but 1) are computed in float64. Afterwards the layers' forwards and every submodule's
    ``training`` flag are restored exactly as they were, also when an exception is raised; parameters are not
    touched. Then ``running_mean`` and ``running_var`` are overwritten in place (float64, cast once to the
    buffers' dtype and device) and ``num_batches_tracked`` is set to the number of batches the layer saw.
    A layer that no batch reached keeps its statistics, with a warning.

    **Estimators** (see :mod:`bnfold.stats`):

    * ``"unbiased"`` (default): the BatchNorm paper's Algorithm 2, ``E[x] = mean of batch means`` and
      ``Var[x] = m/(m−1) · mean of batch variances``; for unequal batch sizes the size-weighted mean and pooled
      unbiased variance, which reduce to Algorithm 2 when all sizes are equal. Order independent.
    * ``"ema"``: the exponential moving average training keeps, ``v ← decay·v + (1−decay)·s_B`` over batch means
      and *unbiased* batch variances in the order given (``decay = 1 − momentum`` in torch's terms), except that
      the first batch initializes ``v`` instead of torch's 0 / 1 defaults. ``decay`` must be in ``(0, 1]``.

    **Distributed.** When ``torch.distributed`` is initialized, every process must call ``recalibrate`` with the
    same model and its own share of the data (any number of batches, including none). The unbiased estimator's
    sufficient statistics (batch and value counts, per-channel sums of values and of squared deviations) are
    sums, so an all-reduce by summation merges them exactly: every process ends with identical statistics equal
    to the single-process result over the union of all processes' batches (up to float64 rounding). The backend
    must support float64 all-reduce (gloo, nccl); nccl reduces on the current CUDA device. Each layer still
    normalizes by its own process's batch during the forward passes, also for ``SyncBatchNorm`` (training would
    normalize by the global batch); only the collected statistics are global. When one process fails, the others
    raise too instead of waiting. ``"ema"`` raises InputError in distributed mode: an EMA is a function of one
    ordered sequence of batches, and batches from several processes have no order (interleaving them differently
    gives different results), so there is no "result over the union" to agree on.

    Raises :class:`bnfold.errors.InputError` for an unknown estimator, ``decay`` outside ``(0, 1]``, a bad
    ``max_batches``, no batches at all (over all processes), a module without such BatchNorm layers, and a
    BatchNorm input with fewer than 2 values per channel. Returns ``module``.
    """
    _check_arguments(module, batches, estimator, decay, max_batches)
    distributed = _distributed()
    if distributed and estimator == "ema":
        raise InputError(_EMA_DISTRIBUTED)
    recorders = [_Recorder(name, layer) for name, layer in _batchnorm_layers(module)]

    if not distributed:
        seen = _run_batches(module, recorders, batches, max_batches)
        if seen == 0:
            raise InputError("batches is empty: recalibrate needs at least one batch")
        if estimator == "ema":
            results = []
            for recorder in recorders:
                means, variances, sizes = recorder.moments()
                if not sizes:
                    results.append(None)
                    continue
                ordered = [(means[i], variances[i] * (m / (m - 1))) for i, m in enumerate(sizes)]
                try:
                    mean, var = ema(ordered, float(decay))
                except InputError as e:
                    raise InputError(f"BatchNorm layer {recorder.name!r}: {e}") from None
                results.append((mean, var, len(sizes)))
        else:
            results = [_finalize(recorder.statistics()) for recorder in recorders]
    else:
        error, seen = None, 0
        try:
            seen = _run_batches(module, recorders, batches, max_batches)
            for recorder in recorders:  # surface a bad batch (NaN, ...) here, before the collective
                recorder.statistics()
        except Exception as e:  # noqa: BLE001 - re-raised after telling the other processes
            error = e
        seen, merged = _all_reduce_statistics(recorders, seen, error)
        if seen == 0:
            raise InputError("batches is empty on every process: recalibrate needs at least one batch")
        results = [_finalize(statistics) for statistics in merged]

    unreached = []
    for recorder, result in zip(recorders, results):
        if result is None:
            unreached.append(recorder.name)
            continue
        mean, var, count = result
        _write(recorder.layer, mean, var, count)
    if unreached:
        warnings.warn(f"no calibration batch reached BatchNorm layer(s) {', '.join(unreached)}; their running "
                      "statistics were left unchanged", stacklevel=2)
    return module


def _finalize(statistics: BatchStatistics):
    if statistics.batch_count == 0:
        return None
    mean, var = statistics.finalize("unbiased")
    return mean, var, statistics.batch_count
