"""Tests of bnfold.torch.verify: comparing a folded PyTorch module with the original, and timing both."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from bnfold.errors import InputError
from bnfold.torch.verify import TorchBenchmark, benchmark, perturb_, verify

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: torch.cuda.is_available() is False")


# ------------------------------------------------------------------------------------------------- modules


def _linear(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(4, 3).to(dtype).eval()


def _conv_bn(seed=0):
    """Conv -> BN (non-trivial statistics) -> ReLU."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.2, 0.2)
    return m.eval()


class Multi(nn.Module):
    """Returns (tensor, {"logits": tensor, "aux": [tensor]})."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 2)
        self.c = nn.Linear(4, 5)

    def forward(self, x):
        return self.a(x), {"logits": self.b(x), "aux": [self.c(x)]}


class TwoArgs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x, y):
        return self.lin(x) * y


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("kaput\nsecond line")


class InPlace(nn.Module):
    def forward(self, x):
        return x.mul_(2.0)


def _np_linear(lin: nn.Linear, x: torch.Tensor) -> np.ndarray:
    """float64 numpy reference of a Linear layer, from its float32 parameters."""
    w = lin.weight.detach().double().numpy()
    b = lin.bias.detach().double().numpy()
    return x.double().numpy() @ w.T + b


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- verify


def test_identical_modules_pass():
    m = _conv_bn()
    report = verify(m, copy.deepcopy(m), torch.randn(2, 3, 6, 6))
    assert report and report.passed
    assert list(report.providers) == ["cpu"]
    [out] = report.providers["cpu"].outputs
    assert out.name == "output" and out.passed
    assert out.max_abs_error == 0.0 and out.scaled_error == 0.0 and out.ratio == 0.0
    assert (out.rule, out.limit, out.dtype) == ("noise", 8.0, "float32") and out.noise > 0
    assert report.summary_lines()[0] == "verify cpu: PASSED"
    json.dumps(report.to_dict())


def test_perturbed_copy_fails_and_names_the_output_with_the_error():
    torch.manual_seed(1)
    m = _linear()
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.weight[1, 2] += 0.25
    x = torch.randn(5, 4)
    expected = np.abs(_np_linear(bad, x) - _np_linear(m, x)).max()  # 0.25 * max |x[:, 2]|
    assert expected > 1e-3

    report = verify(m, bad, x)
    assert not report
    [out] = report.providers["cpu"].outputs
    assert out.name == "output" and not out.passed
    assert out.max_abs_error == pytest.approx(expected, rel=1e-5)
    assert any("output" in line and "MISMATCH" in line for line in report.summary_lines())


def test_tuple_and_dict_outputs_are_compared_separately():
    m = Multi()
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.b.bias[0] += 0.5  # only output[1]['logits'] changes
    report = verify(m, bad, torch.randn(3, 4))
    outs = {o.name: o for o in report.providers["cpu"].outputs}
    assert list(outs) == ["output[0]", "output[1]['logits']", "output[1]['aux'][0]"]
    assert outs["output[0]"].passed and outs["output[0]"].max_abs_error == 0.0
    assert outs["output[1]['aux'][0]"].passed
    assert not outs["output[1]['logits']"].passed
    assert outs["output[1]['logits']"].max_abs_error == pytest.approx(0.5, rel=1e-5)
    assert not report


def test_several_batches_take_the_worst_error_over_all_batches():
    m = _linear()
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.weight[0, 3] += 0.1
    torch.manual_seed(2)
    batches = [torch.randn(2, 4), torch.randn(7, 4), torch.randn(1, 4)]
    batches[1][4, 3] = 30.0  # the worst error comes from the second batch
    expected = max(np.abs(_np_linear(bad, x) - _np_linear(m, x)).max() for x in batches)
    assert expected == pytest.approx(3.0, rel=1e-6)

    report = verify(m, bad, batches)
    [out] = report.providers["cpu"].outputs
    assert out.max_abs_error == pytest.approx(expected, rel=1e-5)
    assert not out.passed
    assert verify(m, copy.deepcopy(m), batches).passed


def test_positional_tuple_inputs_and_a_list_of_them():
    m = TwoArgs()
    one = (torch.randn(2, 4), torch.randn(2, 3))
    assert verify(m, copy.deepcopy(m), one)
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.lin.bias += 1.0
    x2, y2 = torch.randn(3, 4), torch.full((3, 3), 2.0)
    report = verify(m, bad, [one, (x2, y2)])
    [out] = report.providers["cpu"].outputs
    expected = max(np.abs(one[1].double().numpy()).max(), 2.0)  # |y| * 1.0
    assert out.max_abs_error == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dtype, name", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_low_precision_modules_judged_against_their_own_noise(dtype, name):
    m = _linear(dtype=dtype)
    x = torch.randn(4, 4).to(dtype)
    near = copy.deepcopy(m)
    perturb_(near, torch.Generator().manual_seed(5))  # every weight one ulp off: the size of a fold's rounding
    report = verify(m, near, x)
    [out] = report.providers["cpu"].outputs
    assert (out.dtype, out.rule) == (name, "noise")
    assert out.passed and 0 < out.max_abs_error
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.bias[0] += 0.5 * float(m.bias.abs().max())  # one output shifted by half the bias range
    assert not verify(m, bad, x)
    # an explicit tolerance replaces the noise rule
    loose = verify(m, bad, x, atol=1.0, rtol=0.0)
    [out] = loose.providers["cpu"].outputs
    assert (out.rule, out.atol, out.rtol) == ("tolerance", 1.0, 0.0) and out.passed


def test_perturb_moves_each_parameter_one_ulp():
    m = _linear(dtype=torch.float32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    perturb_(m, torch.Generator().manual_seed(0))
    for k, v in m.state_dict().items():
        old = before[k].double().numpy()
        new = v.double().numpy()
        ref = np.spacing(np.abs(before[k].numpy())).astype(np.float64)  # numpy's ulp, independent of the code
        step = np.abs(new - old)
        assert np.all((step == ref) | (step == ref / 2) | (old == 0)), k


def test_modules_training_flags_parameters_and_inputs_are_unchanged():
    m = _conv_bn()
    m.train()
    m[2].eval()  # mixed flags must come back exactly, not as one .train(True)
    other = _conv_bn(seed=3)
    other.train()
    flags_m = [s.training for s in m.modules()]
    flags_o = [s.training for s in other.modules()]
    state_m, state_o = _state(m), _state(other)
    x = torch.randn(2, 3, 6, 6)
    x_before = x.clone()

    verify(m, other, [x, x * 2])
    benchmark(m, other, x, ideal=other, warmup=1, repeat=2)

    assert [s.training for s in m.modules()] == flags_m
    assert [s.training for s in other.modules()] == flags_o
    for before, module in ((state_m, m), (state_o, other)):
        after = module.state_dict()
        assert set(after) == set(before)
        for k in before:  # BN running statistics and num_batches_tracked included
            assert torch.equal(after[k], before[k]), k
    assert torch.equal(x, x_before)


def test_runs_in_eval_mode():
    m = _conv_bn()
    m.train()  # in train mode BN would use batch statistics: outputs would differ from the eval-mode copy
    ref = copy.deepcopy(m).eval()
    x = torch.randn(4, 3, 6, 6)
    assert verify(m, ref, x).passed


def test_a_module_writing_into_its_input_does_not_change_the_other_run():
    x = torch.ones(2, 3)
    report = verify(InPlace(), InPlace(), x)
    assert report.passed
    assert torch.equal(x, torch.ones(2, 3))


def test_folded_module_that_raises_fails_the_device():
    report = verify(_linear(), Boom(), torch.randn(2, 4))
    result = report.providers["cpu"]
    assert not report and result.available
    assert [o.name for o in result.outputs] == ["output"] and not result.outputs[0].passed
    assert "folded module raised" in result.reason and "kaput" in result.reason
    assert "second line" not in result.reason


def test_original_module_that_raises_is_an_input_error():
    with pytest.raises(InputError, match="original module raised"):
        verify(Boom(), _linear(), torch.randn(2, 4))


def test_structure_shape_and_dtype_differences_fail():
    class AsTuple(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return (self.inner(x),)

    m = _linear()
    x = torch.randn(2, 4)
    report = verify(m, AsTuple(copy.deepcopy(m)), x)
    names = {o.name: o.passed for o in report.providers["cpu"].outputs}
    assert names == {"output": False, "output[0]": False}
    assert "returns no output" in report.providers["cpu"].reason

    wider = nn.Linear(4, 4).eval()
    report = verify(m, wider, x)
    assert not report and "shape (2, 4)" in report.providers["cpu"].reason

    class Widened(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).double()

    report = verify(m, Widened(copy.deepcopy(m)), x)
    assert not report
    assert "float64 from the folded module, float32 from the original" in report.providers["cpu"].reason


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "meta", "", 3, "cpu:1"])
def test_unknown_device_raises_input_error(device):
    m = _linear()
    with pytest.raises(InputError, match="unknown device"):
        verify(m, m, torch.randn(1, 4), devices=[device])


@pytest.mark.parametrize("inputs", [[], {"x": torch.randn(1, 4)}, [torch.randn(1, 4), [torch.randn(1, 4)]], 3.0])
def test_bad_inputs_raise_input_error(inputs):
    m = _linear()
    with pytest.raises(InputError):
        verify(m, m, inputs)


def test_non_module_raises_input_error():
    with pytest.raises(InputError, match="nn.Module"):
        verify(lambda x: x, _linear(), torch.randn(1, 4))


@pytest.mark.skipif(CUDA, reason="a CUDA device is present: unavailability cannot be observed")
def test_cuda_unavailable_is_reported():
    m = _linear()
    report = verify(m, copy.deepcopy(m), torch.randn(2, 4), devices=["cpu", "cuda"])
    assert list(report.providers) == ["cpu", "cuda"]
    cuda = report.providers["cuda"]
    assert not cuda.available and cuda.reason == "torch.cuda.is_available() is False"
    assert report.passed  # cpu ran and passed
    assert report.summary_lines()[-1] == "verify cuda: unavailable (torch.cuda.is_available() is False)"
    assert list(verify(m, m, torch.randn(2, 4)).providers) == ["cpu"]  # default: cpu only here
    only_cuda = verify(m, m, torch.randn(2, 4), devices="cuda")
    assert not only_cuda  # nothing ran
    with pytest.raises(InputError, match="is_available"):
        benchmark(m, m, torch.randn(2, 4), device="cuda", repeat=1)


@needs_cuda
def test_cuda_verify_and_benchmark_on_a_real_device():
    m = _conv_bn()
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad[0].bias[1] += 0.5
    x = torch.randn(2, 3, 6, 6)
    report = verify(m, copy.deepcopy(m), x)  # default devices include cuda here
    assert list(report.providers) == ["cpu", "cuda"] and report.providers["cuda"].passed
    failed = verify(m, bad, x, devices=["cuda"])
    assert not failed.providers["cuda"].passed
    assert failed.providers["cuda"].max_abs_error > 0.1
    assert all(p.device.type == "cpu" for p in m.parameters())  # the caller's module stays where it was
    result = benchmark(m, bad, x, device="cuda", warmup=1, repeat=3)
    assert result.device == "cuda" and result.original.median_ms > 0


# ------------------------------------------------------------------------------------------------- benchmark


def test_benchmark_returns_positive_numbers_and_a_consistent_speedup():
    m = _conv_bn()
    ideal = nn.Sequential(m[0], nn.Identity(), m[2])
    threads_before = torch.get_num_threads()
    result = benchmark(m, copy.deepcopy(m), torch.randn(2, 3, 8, 8), ideal=ideal, warmup=2, repeat=7, threads=1)
    assert isinstance(result, TorchBenchmark)
    assert torch.get_num_threads() == threads_before
    assert result.threads == 1 and result.repeat == 7 and result.warmup == 2 and result.device == "cpu"
    for t in (result.original, result.folded, result.ideal):
        assert len(t.samples_ms) == 7
        assert 0 < t.min_ms <= t.p10_ms <= t.median_ms <= t.p90_ms
    assert result.speedup > 0
    assert result.speedup == pytest.approx(result.original.median_ms / result.folded.median_ms)
    assert result.folded_vs_ideal == pytest.approx(result.folded.median_ms / result.ideal.median_ms)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["speedup"] == pytest.approx(result.speedup) and d["ideal"]["samples"] == 7
    assert any("speedup" in line for line in result.summary_lines())


def test_benchmark_without_ideal_and_with_several_batches():
    m = _linear()
    result = benchmark(m, m, [torch.randn(2, 4), torch.randn(3, 4)], warmup=0, repeat=3)
    assert result.ideal is None and result.folded_vs_ideal is None and result.batches == 2
    assert result.to_dict()["ideal"] is None
    assert result.threads == torch.get_num_threads()


@pytest.mark.parametrize(
    "kwargs", [{"repeat": 0}, {"warmup": -1}, {"threads": 0}, {"device": "tpu"}, {"device": ["cpu", "cpu"]}]
)
def test_benchmark_bad_arguments_raise_input_error(kwargs):
    m = _linear()
    with pytest.raises(InputError):
        benchmark(m, m, torch.randn(1, 4), **kwargs)


def test_benchmark_module_that_raises_is_an_input_error_and_restores_threads():
    before = torch.get_num_threads()
    with pytest.raises(InputError, match="folded module raised"):
        benchmark(_linear(), Boom(), torch.randn(1, 4), threads=1, repeat=1)
    assert torch.get_num_threads() == before


# --------------------------------------------------------------------------------------- with the folder


def test_fold_module_result_verifies():
    from bnfold.torch import fold_module

    m = _conv_bn()
    x = torch.randn(2, 3, 6, 6)
    folded, _ = fold_module(m, (x,))
    report = verify(m, folded, [x, torch.randn(3, 3, 6, 6)])
    assert report.passed
    assert 0 < report.providers["cpu"].max_abs_error < 1e-4  # folding rounds differently, but barely


# ----------------------------------------------------------------------------------------------- imports


def test_import_bnfold_does_not_import_torch():
    code = "import sys, bnfold, bnfold.verify, bnfold.report; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
