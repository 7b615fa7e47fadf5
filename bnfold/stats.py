"""Population statistics for BatchNormalization from mini-batches: numpy only, float64 throughout, no torch.

Two estimators:

* **unbiased** — the BatchNorm paper's Algorithm 2 (Ioffe & Szegedy 2015). Over ``K`` batches of ``m`` values
  per channel each (``m = N`` for ``[N, C]``, ``N·H·W`` for ``[N, C, H, W]``)::

      E[x]   = 1/K · Σ_B μ_B
      Var[x] = m/(m−1) · 1/K · Σ_B σ²_B          (σ²_B the biased variance of batch B)

  For batches of **unequal** sizes ``m_B`` bnfold uses the size-weighted mean and the pooled unbiased variance::

      E[x]   = Σ_B m_B·μ_B / Σ_B m_B
      Var[x] = Σ_B (m_B−1)·s²_B / Σ_B (m_B−1)  =  Σ_B m_B·σ²_B / (Σ_B m_B − K)

  with ``s²_B = m_B/(m_B−1)·σ²_B`` the unbiased variance of batch B. Each ``μ_B`` has variance ``σ²/m_B`` and
  (for normal data) each ``s²_B`` has variance ``2σ⁴/(m_B−1)``, so these are the inverse-variance weighted
  combinations of unbiased per-batch estimates: still unbiased, and the least noisy such combination. When every
  ``m_B = m`` they are exactly Algorithm 2 (the weights cancel), so one definition covers both cases. bnfold does
  not use the variance of all values pooled into one sample: it adds the spread *between* batch means, which
  Algorithm 2 does not, so it would not reduce to the paper's estimator.

* **ema** — the running average that training frameworks keep: ``v ← decay·v + (1−decay)·batch_statistic``,
  with the *unbiased* batch variance (as torch's ``running_var``). ``decay = 1 − momentum`` in torch's terms.

Partial statistics live in :class:`BatchStatistics`, a set of plain sums, so they merge exactly across batches
and processes (an all-reduce by summation is a merge). EMA is a sequence, not a sum, so it has its own function.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .errors import InputError

__all__ = ["BatchStatistics", "batch_moments", "ema", "ema_population_stats", "unbiased_population_stats"]

ESTIMATORS = ("unbiased",)


def _as_float64_batch(x, channel_axis: int) -> tuple[np.ndarray, int]:
    """``x`` as a float64 array and its normalized channel axis, or InputError saying what is wrong."""
    try:
        array = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"batch is not a numeric array: {e}") from None
    if array.ndim < 2:
        raise InputError(f"batch must have a batch axis and a channel axis ([N, C, ...]), got shape {array.shape}")
    if not -array.ndim <= channel_axis < array.ndim:
        raise InputError(f"channel_axis {channel_axis} is out of range for a batch of shape {array.shape}")
    axis = channel_axis % array.ndim
    if array.shape[axis] == 0:
        raise InputError(f"batch of shape {array.shape} has no channels on axis {axis}")
    if not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise InputError(f"batch of shape {array.shape} contains {bad} NaN or infinite value(s)")
    return array, axis


def _centered_sums(x, channel_axis: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per channel: the sum of values, the sum of squared deviations from the batch mean, and ``m``.

    Two passes (mean first, then squares of centered values): ``E[x²] − E[x]²`` loses every digit when the mean is
    large next to the spread, which is common for activations after a ReLU or an offset.
    """
    array, axis = _as_float64_batch(x, channel_axis)
    m = array.size // array.shape[axis]
    if m < 2:
        # m/(m−1) is undefined for m = 1; torch refuses such a batch in training mode for the same reason.
        raise InputError(f"batch of shape {array.shape} has {m} value per channel; at least 2 are needed")
    reduce_axes = tuple(a for a in range(array.ndim) if a != axis)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below and reported as InputError
        value_sum = array.sum(axis=reduce_axes)
        mean = value_sum / m
        centered = array - np.expand_dims(mean, reduce_axes)
        squared_deviation_sum = np.square(centered).sum(axis=reduce_axes)
    if not np.isfinite(squared_deviation_sum).all() or not np.isfinite(value_sum).all():
        raise InputError(f"batch of shape {array.shape} is too large in magnitude: its moments overflow float64")
    return value_sum, squared_deviation_sum, m


def batch_moments(x, channel_axis: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel ``(mean, biased variance, m)`` of one batch, float64; ``m`` is the number of values per channel.

    The variance divides by ``m`` (what BatchNormalization normalizes a training batch with), not ``m − 1``.
    """
    value_sum, squared_deviation_sum, m = _centered_sums(x, channel_axis)
    return value_sum / m, squared_deviation_sum / m, m


class BatchStatistics:
    """Per-channel sufficient statistics of the unbiased estimator, accumulated over batches; mergeable exactly.

    The state is four sums and nothing else: the number of batches ``K``, the number of values ``Σ m_B`` (both
    integers), and per channel ``Σ_B m_B·μ_B`` (the sum of all values) and ``Σ_B m_B·σ²_B`` (the sum of squared
    deviations of each value from *its own batch's* mean). So element-wise addition of two states is
    :meth:`merge`, and :meth:`to_arrays` / :meth:`from_arrays` let other processes all-reduce them by summation.
    See the module docstring for the estimator and why these sums are enough for equal and unequal batch sizes.
    """

    def __init__(self, channels: int | None = None):
        """An empty accumulator. Give ``channels`` when a process may see no batch at all but must still
        contribute a correctly shaped (all-zero) state to an all-reduce."""
        if channels is not None and (int(channels) != channels or channels < 1):
            raise InputError(f"channels must be a positive integer, got {channels!r}")
        self.batch_count = 0
        self.value_count = 0
        self.value_sum = None if channels is None else np.zeros(int(channels))
        self.squared_deviation_sum = None if channels is None else np.zeros(int(channels))

    @property
    def channels(self) -> int | None:
        """The number of channels, or None before the first batch when not given up front."""
        return None if self.value_sum is None else self.value_sum.shape[0]

    def _check_channels(self, channels: int, what: str) -> None:
        if self.channels is not None and channels != self.channels:
            raise InputError(f"{what} has {channels} channels, but the statistics so far have {self.channels}")

    def update(self, x, channel_axis: int = 1) -> BatchStatistics:
        """Add one batch ``x`` (``[N, C, ...]`` with channels on ``channel_axis``) in place; returns self."""
        value_sum, squared_deviation_sum, m = _centered_sums(x, channel_axis)
        self._add(1, m, value_sum, squared_deviation_sum, "batch")
        return self

    def update_from_moments(self, mean, biased_var, m: int) -> BatchStatistics:
        """Add one batch given its per-channel moments (e.g. computed elsewhere on an accelerator); returns self."""
        mean = np.atleast_1d(np.asarray(mean, dtype=np.float64))
        biased_var = np.atleast_1d(np.asarray(biased_var, dtype=np.float64))
        if mean.ndim != 1 or mean.shape != biased_var.shape:
            raise InputError(f"mean {mean.shape} and variance {biased_var.shape} must be equal 1-D shapes")
        if int(m) != m or m < 2:
            raise InputError(f"a batch needs at least 2 values per channel, got m={m!r}")
        if not (np.isfinite(mean).all() and np.isfinite(biased_var).all()) or (biased_var < 0).any():
            raise InputError("batch moments must be finite with non-negative variances")
        self._add(1, int(m), mean * m, biased_var * m, "batch")
        return self

    def _add(self, batches: int, values: int, value_sum: np.ndarray, squared_deviation_sum: np.ndarray,
             what: str) -> None:
        self._check_channels(value_sum.shape[0], what)
        self.batch_count += batches
        self.value_count += values
        if self.value_sum is None:
            self.value_sum = np.array(value_sum, dtype=np.float64)
            self.squared_deviation_sum = np.array(squared_deviation_sum, dtype=np.float64)
        else:
            self.value_sum = self.value_sum + value_sum
            self.squared_deviation_sum = self.squared_deviation_sum + squared_deviation_sum

    def merge(self, other: BatchStatistics) -> BatchStatistics:
        """A new accumulator holding both (neither input changes).

        Commutative exactly: every field is one addition, and IEEE addition is commutative. Associative exactly
        in the counts (integers) but only up to rounding in the float sums, since ``(a+b)+c`` and ``a+(b+c)`` may
        round differently: the results differ by a few ulps of ``Σ|terms|``, far below any statistical noise.
        """
        if not isinstance(other, BatchStatistics):
            raise InputError(f"can only merge BatchStatistics, not {type(other).__name__}")
        merged = BatchStatistics()
        for part in (self, other):
            if part.value_sum is not None:
                merged._add(part.batch_count, part.value_count, part.value_sum, part.squared_deviation_sum,
                            "merged statistics")
        return merged

    def finalize(self, estimator: str = "unbiased") -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(mean, var)`` float64: the size-weighted mean and pooled unbiased variance, which is
        Algorithm 2 of the BatchNorm paper when all batches have the same size (see the module docstring)."""
        if estimator not in ESTIMATORS:
            hint = "; EMA depends on batch order, use bnfold.stats.ema" if estimator == "ema" else ""
            raise InputError(f"unknown estimator {estimator!r}, expected one of {', '.join(ESTIMATORS)}{hint}")
        if self.batch_count == 0:
            raise InputError("no batches were accumulated")
        # Σ m_B − K ≥ K ≥ 1 because every batch has m_B ≥ 2, so the division is always defined.
        mean = self.value_sum / self.value_count
        var = self.squared_deviation_sum / (self.value_count - self.batch_count)
        return mean, var

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The state as flat float64 arrays ``(counts, sums)``: ``counts = [K, Σ m_B]`` and
        ``sums = [Σ values (C), Σ squared deviations (C)]``. Summing these element-wise over processes and
        passing the totals to :meth:`from_arrays` is the merge of all of them.

        Counts are separate so a caller can all-reduce them in an integer dtype; as float64 they stay exact up
        to 2**53 values.
        """
        if self.value_sum is None:
            raise InputError("an empty BatchStatistics without channels has no array form; pass channels=")
        counts = np.array([self.batch_count, self.value_count], dtype=np.float64)
        return counts, np.concatenate([self.value_sum, self.squared_deviation_sum])

    @classmethod
    def from_arrays(cls, counts, sums) -> BatchStatistics:
        """The inverse of :meth:`to_arrays`, checking that the arrays could be a (summed) state."""
        counts = np.asarray(counts, dtype=np.float64)
        sums = np.asarray(sums, dtype=np.float64)
        if counts.shape != (2,) or sums.ndim != 1 or sums.shape[0] == 0 or sums.shape[0] % 2:
            raise InputError(f"expected counts of shape (2,) and sums of shape (2*C,), got {counts.shape} and "
                             f"{sums.shape}")
        if not (np.isfinite(counts).all() and (counts == np.round(counts)).all() and (counts >= 0).all()):
            raise InputError(f"counts must be non-negative integers, got {counts.tolist()}")
        batches, values = int(counts[0]), int(counts[1])
        if values < 2 * batches or (batches == 0 and values != 0):
            raise InputError(f"{values} values cannot come from {batches} batches of at least 2 values each")
        if not np.isfinite(sums).all():
            raise InputError("sums contain NaN or infinity")
        channels = sums.shape[0] // 2
        state = cls(channels)
        state.batch_count, state.value_count = batches, values
        state.value_sum = sums[:channels].copy()
        state.squared_deviation_sum = sums[channels:].copy()
        if (state.squared_deviation_sum < 0).any():
            raise InputError("sums of squared deviations must not be negative")
        return state

    def __repr__(self) -> str:
        return f"BatchStatistics(channels={self.channels}, batches={self.batch_count}, values={self.value_count})"


def _check_batch_iterable(batches) -> None:
    # Iterating a single array would silently treat its first axis as the sequence of batches.
    if isinstance(batches, np.ndarray) or not isinstance(batches, Iterable):
        raise InputError("batches must be an iterable of arrays (a list or generator); wrap a single batch as [x]")


def unbiased_population_stats(batches: Iterable, channel_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, var)`` by the unbiased estimator (Algorithm 2; pooled for unequal sizes)."""
    _check_batch_iterable(batches)
    statistics = BatchStatistics()
    for x in batches:
        statistics.update(x, channel_axis)
    return statistics.finalize("unbiased")


def ema(batch_stats: Iterable, decay: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Exponential moving average over per-batch ``(mean, unbiased var)`` pairs, in the order given.

    ``v ← decay·v + (1−decay)·s`` for the mean and the variance separately; torch's ``momentum`` is
    ``1 − decay``. The first batch *initializes* ``v``: torch starts from mean 0 / variance 1 and so carries that
    default (weighted ``decay**K``) into its estimate, which bnfold deliberately does not. To reproduce torch,
    set its running statistics to the first batch's before feeding the rest.

    EMA is order dependent by definition (later batches weigh more), so unlike :class:`BatchStatistics` partial
    results cannot be merged.
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float, np.floating, np.integer)) \
            or not 0.0 <= decay <= 1.0:
        raise InputError(f"decay must be a number in [0, 1], got {decay!r}")
    decay = float(decay)
    mean = var = None
    for index, pair in enumerate(batch_stats):
        try:
            batch_mean, batch_var = pair
        except (TypeError, ValueError):
            raise InputError(f"batch statistics {index} must be a (mean, unbiased var) pair") from None
        batch_mean = np.atleast_1d(np.asarray(batch_mean, dtype=np.float64))
        batch_var = np.atleast_1d(np.asarray(batch_var, dtype=np.float64))
        if batch_mean.ndim != 1 or batch_mean.shape != batch_var.shape:
            raise InputError(f"batch statistics {index}: mean {batch_mean.shape} and variance {batch_var.shape} "
                             "must be equal 1-D shapes")
        if not (np.isfinite(batch_mean).all() and np.isfinite(batch_var).all()):
            raise InputError(f"batch statistics {index} contain NaN or infinity")
        if mean is None:
            mean, var = batch_mean.copy(), batch_var.copy()
            continue
        if batch_mean.shape != mean.shape:
            raise InputError(f"batch statistics {index} have {batch_mean.shape[0]} channels, but earlier batches "
                             f"have {mean.shape[0]}")
        mean = decay * mean + (1.0 - decay) * batch_mean
        var = decay * var + (1.0 - decay) * batch_var
    if mean is None:
        raise InputError("no batches were given")
    return mean, var


def ema_population_stats(batches: Iterable, decay: float = 0.9,
                         channel_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, var)`` as torch's running statistics would hold them (with ``momentum = 1 − decay``)
    had they started from the first batch's statistics instead of 0 / 1; see :func:`ema`."""
    _check_batch_iterable(batches)

    def unbiased_moments():
        for x in batches:
            value_sum, squared_deviation_sum, m = _centered_sums(x, channel_axis)
            yield value_sum / m, squared_deviation_sum / (m - 1)

    return ema(unbiased_moments(), decay)
