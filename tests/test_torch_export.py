"""torch.export programs: bnfold.torch.export.fold_exported and `bnfold MODEL.pt2`."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="the .pt2 path needs torch (installed by `make test` and .ci/run)")
from torch import nn  # noqa: E402

from bnfold.torch.export import fold_exported, load_program, save_program  # noqa: E402


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4, affine=False),
        nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1),
        nn.Flatten(), nn.BatchNorm1d(6 * 12 * 12), nn.Linear(6 * 12 * 12, 5), nn.BatchNorm1d(5))
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.3, 2.0)
            if bn.affine:
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.normal_(0, 0.3)
    return model.eval()


def _program(model, dynamic=True):
    x = torch.randn(2, 3, 8, 8)
    shapes = ({0: torch.export.Dim("batch", min=2, max=64)},) if dynamic else None
    return torch.export.export(model, (x,), dynamic_shapes=shapes)


def test_fold_exported_matches_float64_reference_and_keeps_dynamic_batch():
    model = _model()
    folded, report = fold_exported(_program(model))
    assert report.bn_before == 5 and report.bn_after == 0
    assert {f.rule for f in report.folded} == {"conv-bn", "convtranspose-bn", "bn-linear", "linear-bn"}
    ops = [str(n.target) for n in folded.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in op for op in ops)
    reference = copy.deepcopy(model).double()
    for batch in (2, 7):  # 7: a batch size the example never had, so the dimension must still be dynamic
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            expected = reference(x.double())
        got = folded.module()(x).double()
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    names = set(folded.state_dict)
    assert {"0.weight", "0.bias"} <= names  # folded weights keep their names; BN tensors are gone
    assert not any(name.startswith(("1.", "4.", "5.", "8.", "10.")) for name in names)


def test_cli_pt2_round_trip_and_errors(tmp_path):
    model = _model()
    path = tmp_path / "net.pt2"
    save_program(_program(model, dynamic=False), path)
    before = path.read_bytes()

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True)
        assert "Traceback" not in proc.stderr
        return proc

    proc = run(path, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["bn_after"] == 0 and report["verify"]["cpu"]["passed"]
    out = tmp_path / "net.folded.pt2"
    assert report["output"] == str(out) and path.read_bytes() == before
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
    got = load_program(out).module()(x).double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

    failed = run(path, "-o", tmp_path / "never.pt2", "--atol", "0", "--rtol", "0", "--json")
    assert failed.returncode == 1 and json.loads(failed.stdout)["output"] is None
    assert not (tmp_path / "never.pt2").exists()

    (tmp_path / "bad.pt2").write_bytes(b"not a zip archive")
    for args in ((tmp_path / "bad.pt2",), (path, "--skip", "conv-bn"), (tmp_path / "missing.pt2",)):
        proc = run(*args)
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("bnfold: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt2", "net.folded.pt2", "net.pt2"]


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _rewrite_archive(src, dst, edit):
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, edit(item.filename, zin.read(item.filename)))


@pytest.mark.parametrize("where", ["weights", "sample_inputs"])
def test_pickled_payloads_are_refused_and_never_run(tmp_path, where):
    import pickle

    path = tmp_path / "net.pt2"
    save_program(_program(_model(), dynamic=False), path)
    marker = tmp_path / "code_ran"

    def edit(name, data):
        if where == "weights" and name.endswith("data/weights/model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"]))
            config["config"][first]["use_pickle"] = True
            return json.dumps(config).encode()
        if where == "weights" and name.endswith("data/weights/weight_0"):
            return pickle.dumps(_Payload(marker))
        if where == "sample_inputs" and "/data/sample_inputs/" in name:
            return pickle.dumps(_Payload(marker))
        return data

    hostile = tmp_path / "hostile.pt2"
    _rewrite_archive(path, hostile, edit)
    proc = subprocess.run([sys.executable, "-m", "bnfold", str(hostile), "--no-verify"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "refused" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    assert not (tmp_path / "hostile.folded.pt2").exists()


class _Leftovers(nn.Module):
    """Batch norms an exported program must keep, each for its own reason, beside one that folds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn_shared_input = nn.BatchNorm2d(4)
        self.bn_after_relu = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn_folds = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn_shared_input(y) + y
        z = self.bn_after_relu(torch.relu(z))
        return self.bn_folds(self.conv2(z))


def test_fold_exported_skips_carry_codes_and_module_names():
    torch.manual_seed(1)
    model = _Leftovers().eval()
    for bn in (model.bn_shared_input, model.bn_after_relu, model.bn_folds):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 2.0)
    folded, report = fold_exported(_program(model))
    assert report.bn_before == 3 and report.bn_after == 2
    assert [(f.bn, f.into, f.rule) for f in report.folded] == [("bn_folds", "conv2", "conv-bn")]
    assert {s.bn: s.code for s in report.skipped} == {"bn_shared_input": "output-read-elsewhere",
                                                       "bn_after_relu": "padding-reads-zero"}
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
    got = folded.module()(x).double()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_two_folds_into_one_conv_round_once(dtype):
    """BN -> 1x1 Conv -> BN: both batch norms fold into the one conv. The second fold starts from the first's
    float64 result, not its 16-bit cast: the weights equal a float64 numpy fold of the original parameters, rounded
    once (numpy/ml_dtypes round float64 directly)."""
    import ml_dtypes
    import numpy as np

    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6))
    with torch.no_grad():
        for bn in (model[0], model[2]):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
            bn.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.3)
            bn.weight.copy_(torch.rand(c, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=generator) * 0.3)
    model = model.to(dtype).eval()

    def affine(bn):
        gamma, beta, mean, var = (t.detach().double().numpy() for t in (bn.weight, bn.bias, bn.running_mean,
                                                                         bn.running_var))
        scale = gamma / np.sqrt(var + bn.eps)
        return scale, beta - mean * scale

    (s0, t0), (s1, t1) = affine(model[0]), affine(model[2])
    w = model[1].weight.detach().double().numpy()[:, :, 0, 0]
    b = model[1].bias.detach().double().numpy()
    weight = (s1[:, None] * w * s0[None, :])[:, :, None, None]
    bias = s1 * (w @ t0 + b) + t1
    to_dtype = ml_dtypes.bfloat16 if dtype == torch.bfloat16 else np.float16

    x = torch.randn(2, 8, 5, 5).to(dtype)
    folded, report = fold_exported(torch.export.export(model, (x,)))
    assert report.bn_after == 0 and len(report.folded) == 2
    state = folded.state_dict
    for got, want in ((state["1.weight"], weight), (state["1.bias"], bias)):
        assert got.dtype == dtype
        expected = torch.from_numpy(want.astype(to_dtype).astype(np.float32)).to(dtype)
        assert torch.equal(got, expected)
