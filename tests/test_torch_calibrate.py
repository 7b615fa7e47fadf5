"""bnfold.torch.recalibrate: precise BatchNorm statistics, single process and distributed (gloo, 2 processes).

Ground truth is INDEPENDENT of bnfold's estimator code: a deep copy of the model whose BatchNorm layers run in
torch's own training mode (and everything else in eval mode), so torch itself computes the batch statistics and
accumulates them in its running buffers:

* ``momentum=None`` makes torch keep the cumulative average: running = running + (s_B − running)/n with
  n = num_batches_tracked, so after K batches (the first one replaces the 0 / 1 initial values because its factor
  is 1/1) running_mean = 1/K Σ μ_B and running_var = 1/K Σ s²_B with s²_B torch's UNBIASED batch variance
  m/(m−1)·σ²_B. For equal batch sizes m that is m/(m−1) · 1/K Σ σ²_B, i.e. exactly Algorithm 2.
* for EMA, momentum=1.0 on the first batch makes running = batch statistics (bnfold's initialization), then
  momentum = 1 − decay reproduces v ← decay·v + (1−decay)·s_B.

torch accumulates in float32, bnfold in float64, so float32 models compare within 1e-5 relative.
"""

from __future__ import annotations

import copy
import os
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from bnfold.errors import InputError
from bnfold.torch.calibrate import recalibrate

RTOL = 1e-5


class ConvNet(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(6, 5, 3)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)
        self.bn3 = nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.drop(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.mean(dim=(2, 3))))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, a, b):
        return self.bn(a + 2 * b)


def make_convnet(dropout: float = 0.0, seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    model = ConvNet(dropout)
    for bn in (model.bn1, model.bn2, model.bn3):  # not the identity: the affine parameters must matter
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    return model


def make_batches(count: int, size: int = 8, seed: int = 1, offset: float = 3.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 7, 7, generator=generator) * 2 + offset for _ in range(count)]


def bn_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def torch_reference(model, batches, momentum_schedule):
    """Running statistics as torch's training-mode BatchNorm accumulates them (BN train, all else eval)."""
    reference = copy.deepcopy(model).eval()
    for bn in bn_layers(reference).values():
        bn.reset_running_stats()
        bn.train()
    with torch.no_grad():
        for index, batch in enumerate(batches):
            for bn in bn_layers(reference).values():
                bn.momentum = momentum_schedule(index)
            reference(batch)
    return {name: (bn.running_mean.clone(), bn.running_var.clone()) for name, bn in bn_layers(reference).items()}


def assert_stats_close(model, expected, rtol=RTOL, atol=0.0):
    for name, bn in bn_layers(model).items():
        mean, var = expected[name]
        torch.testing.assert_close(bn.running_mean, mean.to(bn.running_mean.dtype), rtol=rtol, atol=atol)
        torch.testing.assert_close(bn.running_var, var.to(bn.running_var.dtype), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------- estimators


def test_unbiased_matches_torch_cumulative_average():
    model, batches = make_convnet(), make_batches(5)
    expected = torch_reference(model, batches, lambda i: None)
    assert recalibrate(model, batches) is model
    assert_stats_close(model, expected)
    for bn in bn_layers(model).values():
        assert bn.num_batches_tracked.item() == 5
        assert bn.running_mean.dtype == torch.float32


def test_unbiased_float64_model_tight():
    model, batches = make_convnet().double(), [b.double() for b in make_batches(4)]
    expected = torch_reference(model, batches, lambda i: None)
    recalibrate(model, batches)
    assert_stats_close(model, expected, rtol=1e-11)


@pytest.mark.parametrize("decay", [0.9, 0.5, 1.0])
def test_ema_matches_torch_momentum(decay):
    model, batches = make_convnet(), make_batches(6)
    expected = torch_reference(model, batches, lambda i: 1.0 if i == 0 else 1.0 - decay)
    recalibrate(model, batches, estimator="ema", decay=decay)
    assert_stats_close(model, expected)
    assert all(bn.num_batches_tracked.item() == 6 for bn in bn_layers(model).values())


def test_unequal_batch_sizes_pooled_against_numpy():
    # The first BatchNorm sees the raw data, so numpy float64 on the data is an independent reference.
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3), nn.BatchNorm1d(3))
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 4, generator=generator) * 3 + 1 for n in (5, 17, 2, 9)]
    recalibrate(model, batches)
    data = [b.double().numpy() for b in batches]
    sizes = np.array([len(d) for d in data])
    mean = sum(d.sum(axis=0) for d in data) / sizes.sum()
    var = sum(((d - d.mean(axis=0)) ** 2).sum(axis=0) for d in data) / (sizes.sum() - len(data))
    np.testing.assert_allclose(model[0].running_mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(model[0].running_var.numpy(), var, rtol=1e-6)
    assert model[0].num_batches_tracked.item() == 4


def test_tuple_and_dict_batches():
    generator = torch.Generator().manual_seed(5)
    pairs = [(torch.randn(6, 3, generator=generator), torch.randn(6, 3, generator=generator)) for _ in range(3)]
    model = recalibrate(TwoInputs(), pairs)
    keyword = recalibrate(TwoInputs(), [{"a": a, "b": b} for a, b in pairs])
    data = [(a + 2 * b).double().numpy() for a, b in pairs]
    np.testing.assert_allclose(model.bn.running_mean.numpy(), np.mean([d.mean(0) for d in data], 0), rtol=1e-6)
    np.testing.assert_allclose(model.bn.running_var.numpy(), np.mean([d.var(0, ddof=1) for d in data], 0),
                               rtol=1e-6)
    torch.testing.assert_close(keyword.bn.running_var, model.bn.running_var)


# ---------------------------------------------------------------------------------------------- semantics


def test_dropout_stays_in_eval_mode():
    batches = make_batches(4)
    model = make_convnet(dropout=0.5)
    expected = torch_reference(make_convnet(dropout=0.0), batches, lambda i: None)
    recalibrate(model, batches)
    assert_stats_close(model, expected)  # bn2 follows the Dropout: identical to the model without dropout
    # Sanity: with dropout active the statistics after it would be clearly different.
    active = copy.deepcopy(make_convnet(dropout=0.5)).train()
    for bn in bn_layers(active).values():
        bn.momentum = None
        bn.reset_running_stats()
    torch.manual_seed(0)
    with torch.no_grad():
        for batch in batches:
            active(batch)
    assert not torch.allclose(active.bn2.running_var, expected["bn2"][1], rtol=1e-2)


def test_flags_parameters_and_forwards_restored():
    model, batches = make_convnet(dropout=0.5), make_batches(3)
    model.train()
    model.drop.eval()
    model.bn2.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers_before = {name: b for name, b in model.named_buffers()}
    recalibrate(model, batches)
    assert {name: m.training for name, m in model.named_modules()} == flags
    for name, p in model.named_parameters():
        assert torch.equal(p, parameters[name]), name
    for name, b in model.named_buffers():
        assert b is buffers_before[name], f"{name} was replaced instead of updated in place"
    assert all("forward" not in bn.__dict__ for bn in bn_layers(model).values())
    assert not model.bn1.running_var.requires_grad


def test_restored_after_exception():
    model = make_convnet()
    model.train()
    model.bn1.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    statistics = {name: b.clone() for name, b in model.named_buffers()}

    def batches():
        yield make_batches(1)[0]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        recalibrate(model, batches())
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all("forward" not in bn.__dict__ for bn in bn_layers(model).values())
    for name, b in model.named_buffers():
        assert torch.equal(b, statistics[name]), f"{name} changed although recalibrate failed"
    # the model still works normally afterwards
    model.eval()
    with torch.no_grad():
        model(make_batches(1)[0])
    assert model.bn1.num_batches_tracked.item() == 0


def test_max_batches_does_not_advance_generator():
    batches = make_batches(5)
    pulled = []

    def generator():
        for batch in batches:
            pulled.append(1)
            yield batch

    model = recalibrate(make_convnet(), generator(), max_batches=2)
    assert len(pulled) == 2
    expected = recalibrate(make_convnet(), batches[:2])
    for name, bn in bn_layers(model).items():
        assert bn.num_batches_tracked.item() == 2
        torch.testing.assert_close(bn.running_var, bn_layers(expected)[name].running_var, rtol=0, atol=0)


def test_unreached_layer_is_left_alone_with_warning():
    model = nn.ModuleDict({"used": nn.BatchNorm1d(3), "unused": nn.BatchNorm1d(3)})
    model.forward = lambda x: model["used"](x)
    with pytest.warns(UserWarning, match="unused"):
        recalibrate(model, [torch.randn(4, 3), torch.randn(4, 3)])
    assert model["unused"].num_batches_tracked.item() == 0
    assert torch.equal(model["unused"].running_var, torch.ones(3))
    assert model["used"].num_batches_tracked.item() == 2


def test_track_running_stats_false_is_ignored():
    model = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False), nn.BatchNorm1d(3))
    recalibrate(model, [torch.randn(5, 3) + 4])
    assert model[1].num_batches_tracked.item() == 1


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, message", [
    ({"estimator": "median"}, "unknown estimator"),
    ({"decay": 0.0}, r"decay must be a number in \(0, 1\]"),
    ({"decay": 1.5}, "decay must be"),
    ({"decay": True}, "decay must be"),
    ({"decay": "0.9"}, "decay must be"),
    ({"max_batches": 0}, "max_batches"),
    ({"max_batches": 1.5}, "max_batches"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(InputError, match=message):
        recalibrate(make_convnet(), make_batches(1), **kwargs)


def test_bad_inputs():
    with pytest.raises(InputError, match="batches is empty"):
        recalibrate(make_convnet(), [])
    with pytest.raises(InputError, match="no BatchNorm"):
        recalibrate(nn.Linear(3, 3), [torch.randn(2, 3)])
    with pytest.raises(InputError, match="wrap a single batch"):
        recalibrate(make_convnet(), make_batches(1)[0])
    with pytest.raises(InputError, match="must be a torch.nn.Module"):
        recalibrate(lambda x: x, [torch.randn(2, 3)])
    with pytest.raises(InputError, match="at least 2"):
        recalibrate(nn.BatchNorm1d(3), [torch.randn(1, 3)])
    model = nn.BatchNorm1d(3)
    with pytest.raises(InputError, match="3 channels"):
        recalibrate(model, [torch.randn(4, 5)])
    assert "forward" not in model.__dict__ and model.training
    with pytest.raises(InputError, match="finite"):
        recalibrate(nn.BatchNorm1d(2), [torch.tensor([[1.0, float("nan")], [2.0, 3.0]])])


def test_ema_refused_when_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(InputError, match="order dependent"):
        recalibrate(make_convnet(), make_batches(1), estimator="ema")


# ---------------------------------------------------------------------------------------------- distributed


def _all_batches():
    # unequal sizes across ranks exercise the pooled estimator; rank 0 gets 3 batches, rank 1 gets 2
    return make_batches(3, size=8, seed=11) + make_batches(2, size=5, seed=12, offset=-1.0)


def _distributed_worker(rank: int, world_size: int, directory: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank,
                                         world_size=world_size)
    try:
        batches = _all_batches()
        mine = batches[:3] if rank == 0 else batches[3:]
        model = recalibrate(make_convnet(dropout=0.5), mine)
        torch.save({name: b for name, b in model.named_buffers()}, os.path.join(directory, f"rank{rank}.pt"))
        # a process without batches still takes part and receives the union's statistics
        empty = recalibrate(make_convnet(dropout=0.5), mine if rank == 0 else [])
        torch.save({name: b for name, b in empty.named_buffers()}, os.path.join(directory, f"empty{rank}.pt"))
        try:
            recalibrate(make_convnet(), mine, estimator="ema")
        except InputError as e:
            assert "order dependent" in str(e)
        else:
            raise AssertionError("ema did not raise in distributed mode")
        # a failure on one process makes every process raise instead of hanging
        try:
            recalibrate(make_convnet(), mine if rank == 0 else [torch.randn(1, 3, 7, 7)])
        except InputError as e:
            assert ("at least 2" in str(e)) if rank == 1 else ("another process" in str(e)), str(e)
        else:
            raise AssertionError("a failure on rank 1 did not raise")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_distributed_two_processes_match_single_process(tmp_path):
    context = mp.start_processes(_distributed_worker, args=(2, str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    try:
        # a hang guard, not a speed check: spawning two processes that import torch is slow on a busy machine
        finished, deadline = False, 600
        start = time.monotonic()
        while not finished:
            finished = context.join(timeout=1)  # raises ProcessRaisedException when a child fails
            if time.monotonic() - start > deadline:
                raise AssertionError("distributed workers did not finish in time")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    batches = _all_batches()
    for kind, data in (("rank", batches), ("empty", batches[:3])):
        expected = dict(recalibrate(make_convnet(dropout=0.5), data).named_buffers())
        results = [torch.load(tmp_path / f"{kind}{rank}.pt") for rank in (0, 1)]
        for name, value in results[0].items():
            assert torch.equal(results[1][name], value), f"{kind}: {name} differs between processes"
            torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7)
        assert results[0]["bn1.num_batches_tracked"].item() == len(data)
