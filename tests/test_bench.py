"""bnfold.bench and ``bnfold bench``: the ideal model, the timing protocol, the report, the command line.

Timings themselves are never asserted (machines are noisy); what is asserted is what was timed, how often, in
which order, and that the numbers reported are the ones measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import InputError, benchmark
from bnfold.bench import OPT_LEVELS, _interleaved, plot, strip_batchnorm, time_models

try:
    from onnx_builders import Net, count_ops, random_feeds, run_ort, run_ref
except ImportError:  # pragma: no cover
    from tests.onnx_builders import Net, count_ops, random_feeds, run_ort, run_ref

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "sample_models" / "mlp_bn1d.onnx"
CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
FAST = {"repeat": 3, "warmup": 1, "session_repeat": 1}


def conv_net(params: str = "init", bn_as_output: bool = False) -> onnx.ModelProto:
    net = Net(seed=3)
    x = net.input("x", [1, 4, 6, 6])
    h = net.bn(net.conv(x, 4, 8, [3, 3], pads=[1, 1, 1, 1]), 8, params=params)
    h = net.node("Relu", [h])
    y = net.bn(net.conv(h, 8, 8, [1, 1]), 8, "y" if bn_as_output else None, params=params)
    if not bn_as_output:
        y = net.node("Relu", [y], "y")
    net.output(y, [1, 8, 6, 6])
    return net.model()


def without_bn_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """The test's own removal: every BatchNormalization becomes Identity(X); run by the float64 interpreter."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type == "BatchNormalization":
            x, y = node.input[0], node.output[0]
            node.CopyFrom(helper.make_node("Identity", [x], [y], name=node.name))
    return copy


# ---------------------------------------------------------------------------------------------- ideal model


@pytest.mark.parametrize("params", ["init", "const"])
@pytest.mark.parametrize("bn_as_output", [False, True])
def test_ideal_removes_every_batchnorm_and_computes_the_model_without_it(params, bn_as_output):
    model = conv_net(params, bn_as_output)
    before = model.SerializeToString()
    ideal = strip_batchnorm(model)
    assert model.SerializeToString() == before  # the caller's model is not touched
    onnx.checker.check_model(ideal, full_check=True)
    assert count_ops(ideal.graph) == 0
    # Constant nodes that only fed BN parameters go with the BN
    assert count_ops(ideal.graph, "Constant") == 0
    identities = count_ops(ideal.graph, "Identity")
    assert identities == (1 if bn_as_output else 0)  # only where a graph output name must stay
    feeds = random_feeds(model)
    got = run_ort(ideal, feeds)
    want = run_ref(without_bn_reference(model), feeds)
    assert set(got) == set(want) == {"y"}
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-4, atol=1e-4)


def test_ideal_keeps_producers_used_elsewhere_and_training_mode_batchnorm_with_used_statistics():
    net = Net(seed=1, opset=15)
    x = net.input("x", [2, 3, 4, 4])
    shared = net.constant(np.ones(3, np.float32), "shared")  # BN scale and also read by a Mul
    stats = [net.init(net.fresh(r), v) for r, v in (("b", np.zeros(3, np.float32)),
                                                    ("m", np.zeros(3, np.float32)),
                                                    ("v", np.ones(3, np.float32)))]
    a = net.node("BatchNormalization", [x, shared, *stats])
    net.node("Mul", [a, net.node("Unsqueeze", [shared, net.init("axes", np.array([0, 2, 3]))])], "y")
    net.node("BatchNormalization", [x, shared, *stats], ["t", "rm", "rv"], training_mode=1)
    net.node("Identity", ["rm"], "z")
    net.output("y", [2, 3, 4, 4])
    net.output("z", [3])
    net.output("t", [2, 3, 4, 4])
    ideal = strip_batchnorm(net.model())
    onnx.checker.check_model(ideal, full_check=True)
    kinds = [n.op_type for n in ideal.graph.node]
    assert kinds.count("BatchNormalization") == 1  # the training-mode one: its running mean is an output
    assert "Constant" in kinds  # still read by the Mul
    run_ort(ideal, random_feeds(ideal))


def test_ideal_rewires_batchnorm_outputs_read_inside_subgraphs():
    net = Net(seed=2)
    x = net.input("x", [1, 2, 3, 3])
    net.inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    h = net.bn(x, 2)
    then = helper.make_graph([helper.make_node("Relu", [h], ["t_out"])], "then", [],
                             [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 2, 3, 3])])
    inner_bn_stats = [numpy_helper.from_array(v, f"e_{k}") for k, v in
                      (("s", np.full(2, 2.0, np.float32)), ("b", np.ones(2, np.float32)),
                       ("m", np.zeros(2, np.float32)), ("v", np.ones(2, np.float32)))]
    orelse = helper.make_graph(
        [helper.make_node("BatchNormalization", [h] + [t.name for t in inner_bn_stats], ["e_bn"]),
         helper.make_node("Neg", ["e_bn"], ["e_out"])],
        "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 2, 3, 3])], inner_bn_stats)
    net.node("If", ["cond"], "y", then_branch=then, else_branch=orelse)
    net.output("y", [1, 2, 3, 3])
    model = net.model()
    ideal = strip_batchnorm(model)
    onnx.checker.check_model(ideal, full_check=True)
    assert count_ops(ideal.graph) == 0
    xv = np.random.default_rng(0).standard_normal((1, 2, 3, 3)).astype(np.float32)
    for c, want in ((True, np.maximum(xv, 0)), (False, -xv)):
        got = run_ort(ideal, {"x": xv, "cond": np.array(c)})["y"]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- timing protocol


def test_rounds_rotate_the_order_and_warmup_is_not_counted():
    calls: list[str] = []

    def runner(name):
        def run():
            calls.append(name)
            return float(len(calls))
        return run

    samples = _interleaved({n: runner(n) for n in "abc"}, warmup=2, repeat=4, min_time_s=0, min_rounds=1,
                           max_rounds=100)
    warm, timed = calls[:6], calls[6:]
    assert warm == list("abcabc")
    assert timed == list("abc" "bca" "cab" "abc")
    assert {n: len(v) for n, v in samples.items()} == {"a": 4, "b": 4, "c": 4}
    # each sample is what the runner measured, in order
    assert samples["a"] == [7.0, 12.0, 14.0, 16.0]


def test_without_repeat_rounds_run_until_both_minimums():
    counter = {"n": 0}

    def run():
        counter["n"] += 1
        return 0.0

    samples = _interleaved({"a": run}, warmup=0, repeat=None, min_time_s=0.0, min_rounds=7, max_rounds=100)
    assert len(samples["a"]) == 7
    samples = _interleaved({"a": run}, warmup=0, repeat=None, min_time_s=1e9, min_rounds=1, max_rounds=13)
    assert len(samples["a"]) == 13  # max_rounds caps a time budget that would never end


def test_time_models_times_each_model_with_the_inputs_it_declares():
    model = conv_net()
    ideal = strip_batchnorm(model)
    feeds = random_feeds(model)
    timings, rounds = time_models({"m": model, "i": ideal}, feeds, repeat=4, warmup=0, session_repeat=2,
                                  threads=1)
    assert rounds == 4
    for t in timings.values():
        assert len(t.latency.samples_ms) == 4
        assert t.latency.median_ms == pytest.approx(float(np.median(t.latency.samples_ms)))
        assert t.latency.min_ms <= t.latency.p10_ms <= t.latency.median_ms <= t.latency.p90_ms
        assert t.session_ms > 0


def test_time_models_rejects_bad_arguments():
    model = conv_net()
    feeds = random_feeds(model)
    with pytest.raises(InputError, match="unknown optimization level 'fast'"):
        time_models({"m": model}, feeds, opt_level="fast")
    with pytest.raises(InputError, match="repeat must be an integer >= 1"):
        time_models({"m": model}, feeds, repeat=0)
    with pytest.raises(InputError, match="threads must be an integer >= 1"):
        time_models({"m": model}, feeds, threads=0)
    with pytest.raises(InputError, match="at least one model"):
        time_models({}, feeds)
    with pytest.raises(InputError, match="unknown provider 'tpu'"):
        time_models({"m": model}, feeds, provider="tpu")


# ------------------------------------------------------------------------------------------------ benchmark


def test_benchmark_reports_what_it_measured_and_prints_nothing(capsys):
    heard: list[str] = []
    report = benchmark(MLP, providers="cpu", opt_levels=("disabled", "basic"), threads=1, progress=heard.append,
                       **FAST)
    assert capsys.readouterr() == ("", "")
    assert heard and all(isinstance(line, str) for line in heard)
    assert report.folded_from == "folded in memory" and report.fold_ms > 0
    assert (report.bn_original, report.bn_folded, report.bn_ideal) == (3, 0, 0)
    assert report.fold is not None and len(report.fold.folded) == 3
    assert [(r.provider, r.opt_level) for r in report.results] == [("cpu", "disabled"), ("cpu", "basic")]
    for r in report.results:
        assert r.available and r.threads == 1 and r.rounds == 3
        assert set(r.timings) == {"original", "folded", "ideal"}
        assert r.speedup == pytest.approx(r.original_ms / r.folded_ms)
        assert r.folded_vs_ideal == pytest.approx(r.folded_ms / r.ideal_ms)
        assert r.ideal_speedup == pytest.approx(r.original_ms / r.ideal_ms)
    d = report.to_dict()
    json.dumps(d)
    for row in d["results"]:
        for key in ("provider", "opt_level", "original_ms", "folded_ms", "ideal_ms", "speedup", "threads",
                    "session_ms", "latency"):
            assert key in row
        assert row["latency"]["folded"]["samples"] == 3
    text = "\n".join(report.summary_lines())
    assert "cpu" in text and "basic" in text and "speedup" in text


def test_benchmark_with_a_given_folded_model(tmp_path):
    from bnfold import fold_onnx

    folded, _ = fold_onnx(str(MLP))
    path = tmp_path / "f.onnx"
    onnx.save(folded, path)
    report = benchmark(str(MLP), str(path), providers=["cpu"], opt_levels="disabled", **FAST)
    assert report.folded_from == "given" and report.fold_ms is None and report.fold is None
    assert report.bn_folded == 0
    with pytest.raises(InputError, match="skip applies only"):
        benchmark(str(MLP), str(path), skip=["gemm-bn"], **FAST)


def test_gain_captured_is_withheld_when_there_is_nothing_to_gain():
    from bnfold.bench import BenchResult, ModelTiming
    from bnfold.report import Timing

    def res(o, f, i):
        t = {n: ModelTiming(1.0, Timing.from_samples([v])) for n, v in (("original", o), ("folded", f),
                                                                          ("ideal", i))}
        return BenchResult("cpu", "all", timings=t)

    assert res(10.0, 7.0, 6.0).gain_captured == pytest.approx(0.75)
    assert res(10.0, 10.0, 9.9).gain_captured is None
    assert res(10.0, 9.0, 8.0).folded_vs_ideal == pytest.approx(9.0 / 8.0)


def test_benchmark_rejects_inputs_the_models_cannot_take():
    model = conv_net()
    other = conv_net()
    other.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    with pytest.raises(InputError, match="the folded model needs input 'extra'"):
        benchmark(model, other, **FAST)
    with pytest.raises(InputError, match="names unknown input 'nope'"):
        benchmark(model, inputs={"x": np.zeros((1, 4, 6, 6), np.float32), "nope": np.zeros(1)}, **FAST)
    with pytest.raises(InputError, match="no such file"):
        benchmark("/nonexistent/model.onnx")
    with pytest.raises(InputError, match="min_time_s"):
        benchmark(model, min_time_s=-1)


@pytest.mark.skipif(CUDA, reason="CUDAExecutionProvider is available here; tested by test_cuda_benchmark")
def test_cuda_unavailable_is_reported_not_raised():
    report = benchmark(conv_net(), providers=["cpu", "cuda"], opt_levels="disabled", **FAST)
    cuda = [r for r in report.results if r.provider == "cuda"]
    assert len(cuda) == 1 and not cuda[0].available
    assert "onnxruntime-gpu" in cuda[0].reason
    assert report.results[0].available
    assert "unavailable" in "\n".join(report.summary_lines())


@pytest.mark.skipif(not CUDA, reason="CUDAExecutionProvider not available (needs onnxruntime-gpu and a GPU)")
def test_cuda_benchmark():
    report = benchmark(conv_net(), providers="cuda", opt_levels=OPT_LEVELS, **FAST)
    for r in report.results:
        assert r.available, r.reason
        assert r.speedup > 0 and r.rounds == 3


def test_plot_writes_a_png_atomically(tmp_path):
    report = benchmark(conv_net(), providers=["cpu", "cuda"], opt_levels="disabled", **FAST)
    out = tmp_path / "bench.png"
    plot(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]
    report.results = [r for r in report.results if not r.available]
    plot(report, tmp_path / "empty.png")  # nothing could run: still a figure, saying so
    with pytest.raises(InputError, match="does not exist"):
        plot(report, tmp_path / "missing" / "x.png")


# ---------------------------------------------------------------------------------------------- command line


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_cli_bench_json_and_plot(tmp_path):
    before = MLP.read_bytes()
    png = tmp_path / "b.png"
    proc = run_cli("bench", MLP, "--json", "--repeat", 2, "--warmup", 0, "--opt-level", "disabled,basic",
                   "--threads", 1, "--plot", png)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)  # stdout is the JSON and nothing else
    assert [(r["provider"], r["opt_level"]) for r in payload["results"]] == [("cpu", "disabled"), ("cpu", "basic")]
    assert all(r["threads"] == 1 and r["rounds"] == 2 for r in payload["results"])
    assert payload["bn_nodes"] == {"original": 3, "folded": 0, "ideal": 0}
    assert "timing" in proc.stderr and "wrote" in proc.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert MLP.read_bytes() == before


def test_cli_bench_text_with_folded_file(tmp_path):
    folded = tmp_path / "f.onnx"
    assert run_cli(MLP, "-o", folded, "--no-verify").returncode == 0
    proc = run_cli("bench", MLP, folded, "--repeat", 2, "--opt-level", "all")
    assert proc.returncode == 0, proc.stderr
    assert "folded model given" in proc.stdout and "cpu      all" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--opt-level", "fast"], "'fast' is not one of disabled, basic, extended, all"),
    (["--providers", "tpu"], "unknown provider 'tpu'"),
    (["--repeat", "0"], "--repeat"),
    (["--plot", "/nonexistent/dir/x.png"], "does not exist"),
    (["--skip", "gemm-bn", "FOLDED"], "--skip applies when bnfold folds MODEL itself"),
])
def test_cli_bench_bad_usage_exits_2_with_one_line(args, message):
    args = [str(MLP) if a == "FOLDED" else a for a in args]
    proc = run_cli("bench", MLP, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stdout == ""


@pytest.mark.skipif(CUDA, reason="CUDAExecutionProvider is available here")
def test_cli_bench_requested_cuda_unavailable_exits_2():
    proc = run_cli("bench", MLP, "--providers", "cuda", "--repeat", 1)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("bnfold: error: requested provider cuda is not available")


def test_cli_bench_bad_model_exits_2(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    proc = run_cli("bench", bad)
    assert proc.returncode == 2 and "not an ONNX model" in proc.stderr
    assert bad.read_bytes() == b"\x00garbage"


# ------------------------------------------------------------------------------------------- torch.export .pt2


def _mlp_program(tmp_path):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3)).eval()
    for bn in (model[1], model[4]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    program = torch.export.export(model, (torch.randn(4, 5),))
    path = tmp_path / "mlp.pt2"
    torch.export.save(program, path)
    return model, program, path


def test_program_without_batchnorm_computes_the_model_without_it(tmp_path):
    import torch

    from bnfold.torch.export import without_batchnorm

    model, program, _ = _mlp_program(tmp_path)
    ideal = without_batchnorm(program)
    calls = [str(n.target) for n in ideal.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in c for c in calls), calls
    x = np.random.default_rng(0).standard_normal((4, 5))
    w1, b1 = (p.detach().double().numpy() for p in (model[0].weight, model[0].bias))
    w2, b2 = (p.detach().double().numpy() for p in (model[3].weight, model[3].bias))
    want = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2  # float64 numpy: the model with both BatchNorms removed
    with torch.inference_mode():
        got = ideal(torch.from_numpy(x).float()).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cli_bench_program(tmp_path):
    _, _, path = _mlp_program(tmp_path)
    before = path.read_bytes()
    proc = run_cli("bench", path, "--json", "--repeat", 2, "--warmup", 0, "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["bn_nodes"] == {"original": 2, "folded": 0, "ideal": 0}
    [row] = [r for r in payload["results"] if r["provider"] == "cpu"]
    assert row["opt_level"] == "eager" and row["rounds"] == 2 and row["threads"] == 1
    assert row["speedup"] == pytest.approx(row["original_ms"] / row["folded_ms"])
    assert row["session_ms"] == {"original": None, "folded": None, "ideal": None}
    assert path.read_bytes() == before
    proc = run_cli("bench", path, "--opt-level", "all")
    assert proc.returncode == 2 and "apply to ONNX models" in proc.stderr


def test_program_bench_reports_cuda_unavailable_or_runs_on_it(tmp_path):
    import torch

    from bnfold.torch.export import benchmark_program

    _, program, _ = _mlp_program(tmp_path)
    report = benchmark_program(program, devices=["cpu", "cuda"], warmup=0, repeat=2, threads=1)
    cpu, cuda = report.results
    assert cpu.available and cpu.rounds == 2
    if torch.cuda.is_available():
        assert cuda.available and cuda.speedup > 0, cuda.reason
    else:
        assert not cuda.available and cuda.reason == "torch.cuda.is_available() is False"
