"""bnfold.stats against numbers worked out by hand, explicit loops written here, and torch's own running stats.

The references never call the code under test: each writes the paper's or torch's formula out in plain numpy.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnfold.errors import InputError
from bnfold.stats import (
    BatchStatistics,
    batch_moments,
    ema,
    ema_population_stats,
    unbiased_population_stats,
)

# --------------------------------------------------------------------------------------- hand-computed values


def test_batch_moments_by_hand_2d():
    x = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [6.0, 40.0]])
    mean, var, m = batch_moments(x)
    # channel 0: mean 12/4 = 3, deviations -2 -1 0 3, squares 4+1+0+9 = 14, 14/4 = 3.5
    # channel 1: mean 100/4 = 25, deviations -15 -5 5 15, squares 225+25+25+225 = 500, 500/4 = 125
    assert m == 4
    assert mean.tolist() == [3.0, 25.0]
    assert var.tolist() == [3.5, 125.0]
    assert mean.dtype == np.float64 and var.dtype == np.float64


def test_batch_moments_by_hand_4d_and_channel_axis():
    # [N=2, C=2, H=1, W=2]; channel 0 holds 1 3 5 7, channel 1 holds 0 0 4 4
    x = np.array([[[[1, 3]], [[0, 0]]], [[[5, 7]], [[4, 4]]]], dtype=np.int32)
    mean, var, m = batch_moments(x)
    # channel 0: mean 4, deviations -3 -1 1 3 -> 20/4 = 5; channel 1: mean 2, deviations ±2 -> 16/4 = 4
    assert m == 4
    assert mean.tolist() == [4.0, 2.0]
    assert var.tolist() == [5.0, 4.0]
    # channels last (NHWC) gives the same numbers
    mean_last, var_last, m_last = batch_moments(np.moveaxis(x, 1, -1), channel_axis=-1)
    assert (mean_last.tolist(), var_last.tolist(), m_last) == ([4.0, 2.0], [5.0, 4.0], 4)


def test_batch_moments_two_pass_keeps_digits_with_large_offset():
    # values 1e9 + {0, 1, 2, 3}: variance 1.25 exactly; E[x²] − E[x]² would return garbage (often 0 or negative)
    x = (1e9 + np.array([0.0, 1.0, 2.0, 3.0]))[:, None]
    mean, var, _ = batch_moments(x)
    assert mean.tolist() == [1e9 + 1.5]
    assert var.tolist() == [1.25]


def test_unbiased_equal_batches_by_hand():
    batch_a = np.array([[1.0], [3.0]])  # μ 2, σ² 1
    batch_b = np.array([[2.0], [6.0]])  # μ 4, σ² 4
    mean, var = unbiased_population_stats([batch_a, batch_b])
    # E = (2+4)/2 = 3; Var = m/(m−1)·mean(σ²) = 2/1 · (1+4)/2 = 5
    assert mean.tolist() == [3.0]
    assert var.tolist() == [5.0]


def test_unbiased_unequal_batches_by_hand():
    batch_a = np.array([[1.0], [3.0]])  # m 2, μ 2, squared deviations 1+1 = 2 (s² = 2)
    batch_b = np.array([[0.0], [3.0], [6.0]])  # m 3, μ 3, squared deviations 9+0+9 = 18 (s² = 9)
    mean, var = unbiased_population_stats([batch_a, batch_b])
    # weighted mean (2·2 + 3·3)/5 = 13/5; pooled variance (1·2 + 2·9)/(1 + 2) = 20/3
    assert mean.tolist() == [13 / 5]
    assert var.tolist() == pytest.approx([20 / 3], rel=1e-15)


def test_ema_by_hand():
    batches = [np.array([[1.0], [3.0]]), np.array([[2.0], [6.0]])]  # μ 2, 4; unbiased var 2, 8
    mean, var = ema_population_stats(batches, decay=0.5)
    # the first batch initializes: (2, 2); then 0.5·2 + 0.5·4 = 3 and 0.5·2 + 0.5·8 = 5
    assert mean.tolist() == [3.0]
    assert var.tolist() == [5.0]
    assert [v.tolist() for v in ema([(2.0, 2.0)], decay=0.3)] == [[2.0], [2.0]]
    assert [v.tolist() for v in ema([(1.0, 1.0), (5.0, 9.0)], decay=0.0)] == [[5.0], [9.0]]
    assert [v.tolist() for v in ema([(1.0, 1.0), (5.0, 9.0)], decay=1.0)] == [[1.0], [1.0]]


# --------------------------------------------------------------------------------------- explicit references


def random_batches(rng, sizes, channels=3, spatial=(2, 3), offset=5.0):
    return [rng.normal(offset, 2.0, size=(n, channels, *spatial)) * rng.uniform(0.5, 2.0, size=(1, channels, 1, 1))
            for n in sizes]


def algorithm2_loop(batches):
    """Ioffe & Szegedy, Algorithm 2 step 10, written out channel by channel with Python floats."""
    channels = batches[0].shape[1]
    mean, var = [], []
    for c in range(channels):
        batch_means, batch_vars = [], []
        for x in batches:
            values = x[:, c].ravel().tolist()
            m = len(values)
            mu = math.fsum(values) / m
            batch_means.append(mu)
            batch_vars.append(math.fsum((v - mu) ** 2 for v in values) / m)
        mean.append(math.fsum(batch_means) / len(batches))
        var.append(m / (m - 1) * math.fsum(batch_vars) / len(batches))
    return np.array(mean), np.array(var)


def pooled_loop(batches):
    """The unequal-size definition written from per-batch unbiased variances s²_B and sizes m_B."""
    channels = batches[0].shape[1]
    mean, var = [], []
    for c in range(channels):
        sizes, means, unbiased_vars = [], [], []
        for x in batches:
            values = x[:, c].ravel().tolist()
            m = len(values)
            mu = math.fsum(values) / m
            sizes.append(m)
            means.append(mu)
            unbiased_vars.append(math.fsum((v - mu) ** 2 for v in values) / (m - 1))
        mean.append(math.fsum(m * mu for m, mu in zip(sizes, means)) / sum(sizes))
        var.append(math.fsum((m - 1) * s2 for m, s2 in zip(sizes, unbiased_vars)) / sum(m - 1 for m in sizes))
    return np.array(mean), np.array(var)


def test_unbiased_matches_algorithm2_loop_on_equal_batches():
    batches = random_batches(np.random.default_rng(0), [4] * 7)
    mean, var = unbiased_population_stats(batches)
    ref_mean, ref_var = algorithm2_loop(batches)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-13)
    np.testing.assert_allclose(var, ref_var, rtol=1e-13)


def test_pooled_definition_reduces_to_algorithm2_for_equal_sizes():
    # The two reference formulas agree with each other on equal sizes (the weights m_B and m_B−1 cancel) ...
    batches = random_batches(np.random.default_rng(1), [5] * 4)
    for pooled, paper in zip(pooled_loop(batches), algorithm2_loop(batches)):
        np.testing.assert_allclose(pooled, paper, rtol=1e-14)
    # ... but not on unequal sizes, where the library follows the pooled one.
    unequal = random_batches(np.random.default_rng(2), [2, 3, 9, 4])
    mean, var = unbiased_population_stats(unequal)
    ref_mean, ref_var = pooled_loop(unequal)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-13)
    np.testing.assert_allclose(var, ref_var, rtol=1e-13)
    assert not np.allclose(var, unweighted_mean_of_unbiased_variances(unequal), rtol=1e-6)


def unweighted_mean_of_unbiased_variances(batches):
    """A naive 'Algorithm 2' for unequal sizes (unweighted average of s²_B): what the pooled definition is not."""
    return np.mean([x.var(axis=(0, 2, 3), ddof=1) for x in batches], axis=0)


def torch_running_stats_loop(batches, momentum):
    """torch.nn.BatchNorm2d's documented update, started from the first batch's (mean, unbiased var)."""
    def stats(x):
        m = x.size // x.shape[1]
        mean = x.mean(axis=(0, 2, 3))
        return mean, ((x - mean[None, :, None, None]) ** 2).sum(axis=(0, 2, 3)) / (m - 1)

    running_mean, running_var = stats(batches[0])
    for x in batches[1:]:
        mean, var = stats(x)
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var = (1 - momentum) * running_var + momentum * var
    return running_mean, running_var


def test_ema_matches_torch_update_rule_loop():
    batches = random_batches(np.random.default_rng(3), [4, 6, 2, 5, 3])
    mean, var = ema_population_stats(batches, decay=0.9)
    ref_mean, ref_var = torch_running_stats_loop(batches, momentum=0.1)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-13)
    np.testing.assert_allclose(var, ref_var, rtol=1e-13)


def test_ema_matches_torch_batchnorm2d_started_from_first_batch():
    torch = pytest.importorskip("torch")
    momentum = 0.25
    batches = random_batches(np.random.default_rng(4), [4, 6, 2, 5, 3])
    bn = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=torch.float64).train()
    first = torch.from_numpy(batches[0])
    with torch.no_grad():
        bn.running_mean.copy_(first.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(first.var(dim=(0, 2, 3), unbiased=True))
        for x in batches[1:]:
            bn(torch.from_numpy(x))
    mean, var = ema_population_stats(batches, decay=1 - momentum)
    np.testing.assert_allclose(mean, bn.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(var, bn.running_var.numpy(), rtol=1e-12)


def test_ema_depends_on_order():
    forward = ema([(0.0, 1.0), (10.0, 1.0), (0.0, 1.0)], decay=0.5)[0]  # 0 -> 5 -> 2.5
    backward = ema([(0.0, 1.0), (0.0, 1.0), (10.0, 1.0)], decay=0.5)[0]  # 0 -> 0 -> 5
    assert forward.tolist() == [2.5] and backward.tolist() == [5.0]


def test_update_from_moments_equals_update():
    batches = random_batches(np.random.default_rng(5), [3, 4])
    from_batches = BatchStatistics()
    from_moments = BatchStatistics()
    for x in batches:
        from_batches.update(x)
        mean, var, m = batch_moments(x)
        from_moments.update_from_moments(mean, var, m)
    for a, b in zip(from_batches.finalize(), from_moments.finalize()):
        np.testing.assert_allclose(a, b, rtol=1e-14)


# --------------------------------------------------------------------------------------- merge properties

CHANNELS = 2


@st.composite
def batch_lists(draw, min_count=1):
    count = draw(st.integers(min_count, 6))
    elements = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=64)
    return [draw(hnp.arrays(np.float64, (draw(st.integers(2, 5)), CHANNELS), elements=elements))
            for _ in range(count)]


def one_batch_states(batches):
    return [BatchStatistics().update(x) for x in batches]


def assert_states_close(a, b, batches):
    """Counts equal exactly; float sums within 1e-12 of Σ|terms| (reordering a float sum changes only rounding)."""
    counts_a, sums_a = a.to_arrays()
    counts_b, sums_b = b.to_arrays()
    assert counts_a.tolist() == counts_b.tolist()
    scale = np.sum([np.abs(s.to_arrays()[1]) for s in one_batch_states(batches)], axis=0)
    np.testing.assert_array_less(np.abs(sums_a - sums_b), 1e-12 * scale + 1e-300)


def random_tree_merge(states, rng):
    """Merge in a random order and a random bracketing."""
    states = list(states)
    rng.shuffle(states)
    while len(states) > 1:
        i = rng.randrange(len(states) - 1)
        states[i:i + 2] = [states[i].merge(states[i + 1])]
    return states[0]


@settings(max_examples=60, deadline=None)
@given(batch_lists(), st.integers(0, 2**32 - 1))
def test_merge_any_order_and_grouping_equals_sequential(batches, seed):
    sequential = BatchStatistics()
    for x in batches:
        sequential.update(x)
    merged = random_tree_merge(one_batch_states(batches), random.Random(seed))
    assert_states_close(merged, sequential, batches)
    for got, want in zip(merged.finalize(), sequential.finalize()):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * max(1.0, float(np.abs(batches[0]).max())))


@settings(max_examples=60, deadline=None)
@given(batch_lists(), batch_lists())
def test_merge_is_exactly_commutative(first, second):
    a, b = BatchStatistics().update(first[0]), BatchStatistics().update(second[0])
    for x in first[1:]:
        a.update(x)
    for x in second[1:]:
        b.update(x)
    ab, ba = a.merge(b).to_arrays(), b.merge(a).to_arrays()
    assert ab[0].tolist() == ba[0].tolist()
    assert ab[1].tolist() == ba[1].tolist()  # bit for bit: a single IEEE addition per field


@settings(max_examples=60, deadline=None)
@given(batch_lists(min_count=3))
def test_merge_is_associative_up_to_rounding(batches):
    a, b, c = one_batch_states(batches[:3])
    assert_states_close(a.merge(b).merge(c), a.merge(b.merge(c)), batches[:3])


@settings(max_examples=60, deadline=None)
@given(batch_lists(), batch_lists())
def test_summing_arrays_is_merge(first, second):
    a = BatchStatistics()
    b = BatchStatistics()
    for x in first:
        a.update(x)
    for x in second:
        b.update(x)
    (counts_a, sums_a), (counts_b, sums_b) = a.to_arrays(), b.to_arrays()
    reduced = BatchStatistics.from_arrays(counts_a + counts_b, sums_a + sums_b)
    merged = a.merge(b)
    assert reduced.to_arrays()[0].tolist() == merged.to_arrays()[0].tolist()
    assert reduced.to_arrays()[1].tolist() == merged.to_arrays()[1].tolist()
    for got, want in zip(reduced.finalize(), merged.finalize()):
        assert got.tolist() == want.tolist()


def test_all_reduce_over_processes_with_an_empty_rank():
    batches = random_batches(np.random.default_rng(6), [2, 3, 4, 5, 6, 7])
    ranks = [BatchStatistics(channels=3) for _ in range(4)]  # rank 3 sees no batch
    for i, x in enumerate(batches):
        ranks[i % 3].update(x)
    arrays = [r.to_arrays() for r in ranks]
    total = BatchStatistics.from_arrays(np.sum([c for c, _ in arrays], axis=0), np.sum([s for _, s in arrays], axis=0))
    mean, var = total.finalize()
    ref_mean, ref_var = pooled_loop(batches)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-13)
    np.testing.assert_allclose(var, ref_var, rtol=1e-13)
    assert total.batch_count == 6 and total.value_count == (2 + 3 + 4 + 5 + 6 + 7) * 6


# --------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call, message", [
    (lambda: batch_moments(np.array([[1.0, np.nan], [2.0, 3.0]])), "NaN or infinite"),
    (lambda: batch_moments(np.array([[1.0, np.inf], [2.0, 3.0]])), "NaN or infinite"),
    (lambda: batch_moments(np.ones((1, 3))), "at least 2"),
    (lambda: batch_moments(np.ones((1, 3, 1, 1))), "at least 2"),
    (lambda: batch_moments(np.ones(4)), "channel axis"),
    (lambda: batch_moments(np.ones((2, 3)), channel_axis=2), "out of range"),
    (lambda: batch_moments(np.ones((2, 0))), "no channels"),
    (lambda: batch_moments([["a", "b"], ["c", "d"]]), "not a numeric array"),
    (lambda: batch_moments(np.full((2, 1), 1e200) * [[1.0], [-1.0]]), "overflow"),
    (lambda: unbiased_population_stats([np.ones((2, 3)), np.ones((2, 4))]), "4 channels"),
    (lambda: ema_population_stats([np.ones((2, 3)), np.ones((2, 4))]), "4 channels"),
    (lambda: unbiased_population_stats([]), "no batches"),
    (lambda: ema_population_stats([]), "no batches"),
    (lambda: unbiased_population_stats(np.ones((4, 3))), "iterable of arrays"),
    (lambda: ema_population_stats([np.ones((2, 3))], decay=1.5), "decay"),
    (lambda: ema([(np.nan, 1.0)]), "NaN"),
    (lambda: BatchStatistics(3).update(np.ones((2, 2))), "2 channels"),
    (lambda: BatchStatistics().update(np.ones((2, 3))).merge(BatchStatistics(4)), "4 channels"),
    (lambda: BatchStatistics().update(np.ones((2, 3))).finalize("ema"), "bnfold.stats.ema"),
    (lambda: BatchStatistics(3).finalize(), "no batches"),
    (lambda: BatchStatistics().to_arrays(), "channels="),
    (lambda: BatchStatistics.from_arrays([1.0, 1.0], np.zeros(2)), "cannot come from"),
    (lambda: BatchStatistics.from_arrays([1.5, 4.0], np.zeros(2)), "integers"),
    (lambda: BatchStatistics.from_arrays([1.0, 4.0], np.zeros(3)), "shape"),
    (lambda: BatchStatistics.from_arrays([1.0, 4.0], [0.0, -1.0]), "negative"),
    (lambda: BatchStatistics().update_from_moments([0.0], [1.0], 1), "at least 2"),
])
def test_input_errors(call, message):
    with pytest.raises(InputError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_inputs_are_not_modified_and_results_are_float64():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    before = x.copy()
    mean, var = unbiased_population_stats([x, x])
    assert (x == before).all() and mean.dtype == np.float64 and var.dtype == np.float64
