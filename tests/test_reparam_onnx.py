"""The ONNX branch-merge pass (bnfold/onnx/merge.py), judged as issue 16 judges it.

Models: RepVGG-, MobileOne-, ACNet- and DBB-style nets (tests/reparam_models.py) with realistic BN statistics,
exported to ONNX with torch's exporter, next to the authors' own deploy form (their ``reparameterize()``) exported
the same way. bnfold's output must have no more BatchNormalization and Conv nodes than the deploy form, and an
error (onnxruntime CPU, optimizations disabled) within 3x of the deploy form's, both against the independent
float64 reference: the ORIGINAL torch module run in float64.

Hand-built graphs check the refusals and the sequential merge against the float64 ONNX reference interpreter.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings

import numpy as np
import onnx
import pytest

import bnfold

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")  # torch's ONNX exporter

try:
    from onnx_builders import Net, count_ops, random_feeds, run_ort, run_ref
    from reparam_models import MODELS, realistic, reparameterize_model
except ImportError:  # pragma: no cover - tests/ is a package
    from tests.onnx_builders import Net, count_ops, random_feeds, run_ort, run_ref
    from tests.reparam_models import MODELS, realistic, reparameterize_model


def export(module, x) -> onnx.ModelProto:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(module, (x,), dynamo=True, optimize=False).model_proto


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return next(iter(run_ort(model, {model.graph.input[0].name: x}).values()))


@pytest.fixture(scope="module", params=sorted(MODELS))
def family(request):
    torch.manual_seed(16)
    module = realistic(MODELS[request.param](), seed=16)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        reference = copy.deepcopy(module).double()(x.double()).numpy()
        stripped_reference = without_batchnorm(module).double()(x.double()).numpy()
    return (request.param, export(module, x), export(reparameterize_model(module), x), x.numpy(), reference,
            stripped_reference)


def without_batchnorm(module):
    """A copy of ``module`` with every BatchNorm2d replaced by Identity: what bnfold.bench's ideal computes."""
    stripped = copy.deepcopy(module)
    for parent in list(stripped.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(parent, name, torch.nn.Identity())
    return stripped


def relative_error(out: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - reference).max() / np.abs(reference).max())


def test_merged_model_matches_the_authors_deploy_form(family):
    name, original, deploy, x, reference, _ = family
    before = original.SerializeToString()
    merged, report = bnfold.fold_onnx(original)
    assert original.SerializeToString() == before, "fold_onnx modified its input"
    onnx.checker.check_model(merged, full_check=True)
    for op in ("BatchNormalization", "Conv"):
        assert count_ops(merged.graph, op) <= count_ops(deploy.graph, op), (name, op, report.summary_lines())
    # there was something to merge (RepGhost's merge takes away a BN branch, not a conv)
    assert sum(count_ops(original.graph, op) - count_ops(deploy.graph, op) for op in ("Conv", "Add")) > 0
    ours, theirs = relative_error(run(merged, x), reference), relative_error(run(deploy, x), reference)
    assert ours <= 3 * theirs, (name, ours, theirs)
    assert report.merged and {m.rule for m in report.merged} <= {"merge-branches", "merge-sequential"}
    assert report.bn_after == count_ops(merged.graph)
    # Every branch sum merged. Convolutions in a row that can not be one (RepViT's strided conv before the padded
    # depthwise one, FastViT's RepCPE before a padded conv: their deploy forms keep both) are reported, with why.
    assert all(s.op_type == "Conv" and s.code == "merge-inexact" for s in report.not_merged), report.summary_lines()


def test_merging_is_deterministic_and_idempotent(family):
    _, original, _, _, _, _ = family
    first, _ = bnfold.fold_onnx(original)
    second, _ = bnfold.fold_onnx(original)
    assert first.SerializeToString() == second.SerializeToString()
    again, report = bnfold.fold_onnx(first)
    assert again.SerializeToString() == first.SerializeToString()
    assert not report.modified


def test_skipping_the_merge_rules_leaves_plain_bn_folding(family):
    _, original, _, x, reference, _ = family
    plain, report = bnfold.fold_onnx(original, skip=("merge-branches", "merge-sequential"))
    assert report.merged == []
    assert count_ops(plain.graph, "Conv") == count_ops(original.graph, "Conv")
    merged, _ = bnfold.fold_onnx(original)
    assert sum(count_ops(plain.graph, op) - count_ops(merged.graph, op) for op in ("Conv", "BatchNormalization",
                                                                                   "Add")) > 0
    assert relative_error(run(plain, x), reference) < 1e-5


# ---- hand-built graphs: the sequential merge and the refusals ------------------------------------------

def conv_attrs(k, pad, stride=1, group=1):
    return dict(kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2, group=group)


def merge_and_check(model: onnx.ModelProto, convs_left: int, expected_model: onnx.ModelProto | None = None):
    """Fold and merge ``model``; the result must match the float64 reference run of the original (or of
    ``expected_model``, the same graph in ops the reference has)."""
    before = model.SerializeToString()
    merged, report = bnfold.fold_onnx(model)
    assert model.SerializeToString() == before
    onnx.checker.check_model(merged, full_check=True)
    assert count_ops(merged.graph, "Conv") == convs_left, report.summary_lines()
    feeds = random_feeds(model, seed=3)
    expected = run_ref(expected_model or model, feeds)
    actual = run_ref(merged, feeds)
    for got, value in zip(actual.values(), expected.values(), strict=True):  # outputs in order
        np.testing.assert_allclose(got, value, rtol=0, atol=1e-5 * np.abs(value).max())
    return merged, report


def test_sequential_conv_then_pointwise_conv_merges():
    net = Net(seed=1)
    x = net.input("x", [1, 4, 9, 9])
    y = net.conv(x, 4, 16, (3, 3), **conv_attrs(3, 1))
    y = net.conv(y, 16, 6, (1, 1), **conv_attrs(1, 0))
    net.output(net.node("Relu", [y]))
    _, report = merge_and_check(net.model(), 1)
    assert [m.rule for m in report.merged] == ["merge-sequential"]


def test_sequential_merge_that_would_cost_more_is_not_made():
    net = Net(seed=2)
    x = net.input("x", [1, 16, 9, 9])
    y = net.conv(x, 16, 4, (1, 1), **conv_attrs(1, 0))  # a bottleneck: 1x1 16->4 then 3x3 4->16
    y = net.conv(y, 4, 16, (3, 3), **conv_attrs(3, 0))
    net.output(y)
    _, report = merge_and_check(net.model(), 2)
    assert report.merged == []


def test_sequential_bias_under_zero_padding_is_refused_with_the_reason():
    net = Net(seed=3)
    x = net.input("x", [1, 4, 9, 9])
    y = net.conv(x, 4, 4, (1, 1), **conv_attrs(1, 0))
    y = net.conv(y, 4, 4, (3, 3), **conv_attrs(3, 1))
    net.output(y)
    _, report = merge_and_check(net.model(), 2)
    assert any("zero padding" in s.reason for s in report.not_merged), report.summary_lines()


@pytest.mark.parametrize("layout", ["x+(a-b)", "(x-b)+a", "b-a"])
def test_subtracted_branches_merge(layout):
    """FastViT's RepMixer, x + γ·(mixer(x) − norm(x)): a Sub inside the sum subtracts its second input's branch."""
    net = Net(seed=11)
    x = net.input("x", [2, 4, 8, 8])
    h = net.node("Relu", [x])
    a = net.bn(net.conv(h, 4, 4, (3, 3), bias=False, **conv_attrs(3, 1, group=4)), 4)
    b = net.bn(h, 4)
    if layout == "x+(a-b)":
        total = net.node("Add", [h, net.node("Sub", [a, b])])
    elif layout == "(x-b)+a":
        total = net.node("Add", [net.node("Sub", [h, b]), a])
    else:
        total = net.node("Sub", [b, a])
    net.output(net.node("Relu", [total]))
    merged, report = merge_and_check(net.model(), 1)
    assert count_ops(merged.graph) == 0 and count_ops(merged.graph, "Sub") == 0, report.summary_lines()
    assert count_ops(merged.graph, "Add") == 0 and {m.rule for m in report.merged} == {"merge-branches"}


def branch_block(use_sum: bool) -> onnx.ModelProto:
    """Grouped 3x3, depthwise 1x1, a BN identity and an AvgPool branch, each with its BN, summed."""
    net = Net(seed=4)
    x = net.input("x", [2, 4, 8, 8])
    h = net.node("Relu", [x])
    a = net.bn(net.conv(h, 4, 4, (3, 3), bias=False, **conv_attrs(3, 1, group=2)), 4)
    b = net.bn(net.conv(h, 4, 4, (1, 1), bias=False, **conv_attrs(1, 0, group=4)), 4)
    c = net.bn(h, 4)
    d = net.bn(net.node("AveragePool", [h], kernel_shape=[3, 3], pads=[1] * 4, count_include_pad=1), 4)
    total = net.node("Sum", [a, b, c, d]) if use_sum else \
        net.node("Add", [net.node("Add", [a, b]), net.node("Add", [c, d])])
    net.output(net.node("Relu", [total]))
    return net.model()


@pytest.mark.parametrize("use_sum", [True, False])
def test_branches_with_batchnorm_identity_and_avgpool_merge(use_sum):
    merged, report = merge_and_check(branch_block(use_sum), 1, expected_model=branch_block(False))
    assert count_ops(merged.graph) == 0 and count_ops(merged.graph, "AveragePool") == 0
    assert {m.rule for m in report.merged} == {"merge-branches"}  # an inner Add may merge before the outer one


@pytest.mark.parametrize("second,reason", [("dilated", "dilations"), ("avgpool", "count_include_pad")])
def test_branch_refusals_leave_the_graph_and_say_why(second, reason):
    net = Net(seed=5)
    x = net.input("x", [1, 4, 8, 8])
    h = net.node("Relu", [x])
    a = net.conv(h, 4, 4, (3, 3), **conv_attrs(3, 1))
    if second == "avgpool":  # border windows divide by fewer elements: not a convolution
        b = net.node("AveragePool", [h], kernel_shape=[3, 3], pads=[1] * 4, count_include_pad=0)
    else:
        b = net.conv(h, 4, 4, (3, 3), dilations=[2, 2], **conv_attrs(3, 2))
    net.output(net.node("Add", [a, b]))
    model = net.model()
    merged, report = merge_and_check(model, 2 if second == "dilated" else 1)
    assert any(reason in s.reason for s in report.not_merged), report.summary_lines()
    assert merged.SerializeToString() == model.SerializeToString()


def test_cli_merges_by_default_verifies_and_takes_the_merge_rules_to_skip(tmp_path):
    import json
    import subprocess
    import sys

    source = tmp_path / "block.onnx"
    onnx.save(branch_block(False), source)
    before = source.read_bytes()
    runs = {}
    for name, skip in (("merged", []), ("plain", ["--skip", "merge-branches", "--skip", "merge-sequential"])):
        out = tmp_path / f"{name}.onnx"
        proc = subprocess.run([sys.executable, "-m", "bnfold", str(source), "-o", str(out), "--json", *skip],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs[name] = (json.loads(proc.stdout), onnx.load(out))
    assert source.read_bytes() == before
    report, model = runs["merged"]
    assert report["verify"]["cpu"]["passed"] and report["merged"] and report["bn_after"] == 0
    assert count_ops(model.graph, "Conv") == 1
    report, model = runs["plain"]
    assert report["merged"] == [] and count_ops(model.graph, "Conv") == 2
    proc = subprocess.run([sys.executable, "-m", "bnfold", str(source), "--skip", "merge-everything"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "merge-everything" in proc.stderr


@pytest.mark.parametrize("combine", ["Add", "Sub"])
@pytest.mark.parametrize("kinds", [("gemm", "matmul", "identity"), ("matmul", "matmul"), ("gemm", "gemm")])
def test_fully_connected_branches_merge(kinds, combine):
    net = Net(seed=6)
    x = net.input("x", [3, 6])
    h = net.node("Relu", [x])
    terms = []
    for kind in kinds:
        if kind == "gemm":
            w = net.weight(net.fresh("W"), [6, 6])
            terms.append(net.node("Gemm", [h, w, net.init(net.fresh("C"), net.rng.standard_normal(6).astype(
                np.float32))], transB=1, alpha=0.5))
        elif kind == "matmul":
            terms.append(net.node("MatMul", [h, net.weight(net.fresh("W"), [6, 6])]))
        else:
            terms.append(h)
    total = terms[0]
    for term in terms[1:]:
        total = net.node(combine, [total, term])
    net.output(net.node("Relu", [total]))
    before = net.model()
    merged, report = merge_and_check(before, 0)
    left = [n.op_type for n in merged.graph.node]
    assert left.count("Gemm") + left.count("MatMul") == 1 and "Add" not in left, left
    assert {m.rule for m in report.merged} == {"merge-branches"}


def test_fully_connected_branches_on_different_inputs_stay():
    net = Net(seed=7)
    x, z = net.input("x", [3, 6]), net.input("z", [3, 6])
    a = net.node("MatMul", [x, net.weight("W1", [6, 6])])
    b = net.node("MatMul", [z, net.weight("W2", [6, 6])])
    net.output(net.node("Add", [a, b]))
    model = net.model()
    merged, report = merge_and_check(model, 0)
    assert report.merged == [] and merged.SerializeToString() == model.SerializeToString()


def test_merged_models_pass_the_verification_of_bnfold(family, tmp_path):
    """``bnfold MODEL`` folds and merges each family and its own verification (the noise rule) accepts the result."""
    import json
    import subprocess
    import sys

    name, original, _, _, _, _ = family
    source = tmp_path / f"{name}.onnx"
    onnx.save(original, source)
    out = tmp_path / f"{name}.merged.onnx"
    proc = subprocess.run([sys.executable, "-m", "bnfold", str(source), "-o", str(out), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["merged"] and report["verify"]["cpu"]["passed"], report
    assert len(onnx.load(out).graph.node) < len(original.graph.node)


def test_bench_ideal_is_the_merged_form(family):
    """The ideal is the stripped model merged: as few Convs as the authors' deploy form, no BN, and (a wrong
    function, but the same wrong function) the outputs of the torch module without its BNs, run in float64."""
    from bnfold.bench import ideal_model

    name, original, deploy, x, _, want = family
    before = original.SerializeToString()
    ideal, merges = ideal_model(original)
    assert original.SerializeToString() == before
    assert merges > 0
    onnx.checker.check_model(ideal, full_check=True)
    assert count_ops(ideal.graph, "BatchNormalization") == 0
    assert count_ops(ideal.graph, "Conv") <= count_ops(deploy.graph, "Conv"), name
    assert relative_error(run(ideal, x), want) <= 1e-4, name


def test_bench_reports_the_merges_of_its_ideal():
    from bnfold.bench import benchmark

    report = benchmark(branch_block(False), providers="cpu", opt_levels="disabled", threads=1, warmup=0, repeat=2,
                       session_repeat=1)
    assert report.merges_ideal >= 1 and report.to_dict()["merges_ideal"] == report.merges_ideal
    assert f"{report.merges_ideal} branch merge(s)" in "\n".join(report.summary_lines())
    assert report.fold is not None and report.fold.merged  # folded = bnfold's output, merged as well


def zero_bias_chain(other_reader: bool, plain: bool = False) -> onnx.ModelProto:
    """A 1x1 then a 3x3 Conv whose zero bias torch's exporter computes from the 1x1's output dtype
    (CastLike(0, a) -> Expand): a reader of the 1x1's type only. ``plain``: the same with a zero initializer."""
    net = Net(seed=7)
    x = net.input("x", [1, 4, 8, 8])
    a = net.conv(net.node("Relu", [x]), 4, 8, (1, 1), bias=False)
    w = net.weight(net.fresh("W"), [6, 8, 3, 3])
    if plain:
        bias = net.init(net.fresh("B"), np.zeros(6, np.float32))
    else:
        like = net.node("CastLike", [net.constant(np.array(0, np.float32)), a])
        bias = net.node("Expand", [like, net.constant(np.array([6], np.int64))])
    y = net.node("Relu", [net.node("Conv", [a, w, bias])])
    net.output(net.node("Add", [y, like]) if other_reader else y)
    return net.model()


def test_a_reader_of_only_the_dtype_goes_with_the_merge():
    merged, report = merge_and_check(zero_bias_chain(False), 1, expected_model=zero_bias_chain(False, plain=True))
    assert [m.rule for m in report.merged] == ["merge-sequential"]
    assert count_ops(merged.graph, "CastLike") == count_ops(merged.graph, "Expand") == 0


def test_a_dtype_reader_that_would_stay_refuses_the_merge():
    model = zero_bias_chain(True)
    merged, report = bnfold.fold_onnx(model)
    assert report.merged == [] and merged.SerializeToString() == model.SerializeToString()
    assert [s.code for s in report.not_merged] == ["output-shared"], report.summary_lines()


def test_a_merge_rule_answers_a_plan_and_only_apply_plan_edits():
    from bnfold.onnx.graph import GraphIndex, ModelContext
    from bnfold.onnx.io import materialize
    from bnfold.onnx.merge import MERGES
    from bnfold.onnx.plan import MergePlan, apply_plan
    from bnfold.report import Merge

    net = Net(seed=8)
    x = net.input("x", [1, 4, 6, 6])
    h = net.node("Relu", [x])
    a = net.conv(h, 4, 4, (3, 3), **conv_attrs(3, 1))
    b = net.conv(h, 4, 4, (1, 1), **conv_attrs(1, 0))
    net.output(net.node("Relu", [net.node("Add", [a, b])]))
    model = net.model()
    expected = run_ref(model, random_feeds(model, seed=1))
    before = model.SerializeToString()
    ctx = ModelContext(model)
    g = GraphIndex(model.graph, ctx)
    add = next(n for n in model.graph.node if n.op_type == "Add")
    branches = next(r for r in MERGES if r.name == "merge-branches")
    plan = branches.match(g, add)
    assert isinstance(plan, MergePlan) and model.SerializeToString() == before  # matching never edits
    assert plan.source is add and len(plan.remove) == 2  # the 1x1 branch and the Add
    record = apply_plan(g, plan)
    g.commit()
    materialize(model, ctx.replacements, g.initializers)  # new values of the main graph wait there until saved
    assert isinstance(record, Merge) and record.rule == "merge-branches" and record.absorbed == ()
    onnx.checker.check_model(model, full_check=True)
    assert count_ops(model.graph, "Conv") == 1 and count_ops(model.graph, "Add") == 0
    got = run_ref(model, random_feeds(model, seed=1))
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_check_fails_when_only_a_merge_is_left(tmp_path):
    """``bnfold --check`` gates on merges too: a Conv then a 1x1 Conv, no BatchNorm, is one Conv once merged."""
    import subprocess
    import sys

    net = Net(seed=1)
    x = net.input("x", [1, 4, 9, 9])
    y = net.conv(x, 4, 16, (3, 3), **conv_attrs(3, 1))
    y = net.conv(y, 16, 6, (1, 1), **conv_attrs(1, 0))
    net.output(net.node("Relu", [y]))
    source = tmp_path / "seq.onnx"
    onnx.save(net.model(), source)
    proc = subprocess.run([sys.executable, "-m", "bnfold", "--check", str(source)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "check: FAILED, 0 folds, 1 merge possible" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq.onnx"]
    merged = tmp_path / "merged.onnx"
    assert subprocess.run([sys.executable, "-m", "bnfold", str(source), str(merged)], capture_output=True,
                          timeout=300).returncode == 0
    proc = subprocess.run([sys.executable, "-m", "bnfold", "--check", str(merged)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "check: passed" in proc.stdout


def test_the_repvgg_sample_merges_to_its_deploy_form():
    from pathlib import Path

    model = onnx.load(Path(__file__).resolve().parents[1] / "sample_models" / "repvgg_small.onnx")
    assert count_ops(model.graph, "BatchNormalization") == 10 and count_ops(model.graph, "Conv") == 8
    merged, report = merge_and_check(model, 4)
    assert count_ops(merged.graph, "BatchNormalization") == 0 and report.bn_after == 0
    assert {m.rule for m in report.merged} == {"merge-branches"}


@pytest.mark.parametrize("which", [0, 2])  # the BN after the grouped conv; the lone BN identity branch
def test_a_branch_bn_with_invalid_statistics_is_neither_merged_nor_written(tmp_path, which):
    """The merge reads BNs with the fold's reader: a negative variance stops the merge, stays in the model, and
    ``bnfold MODEL`` reports it as invalid statistics (exit 1, nothing written)."""
    import subprocess
    import sys

    from onnx import numpy_helper

    model = branch_block(False)
    bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"][which]
    var = next(t for t in model.graph.initializer if t.name == bn.input[4])
    values = numpy_helper.to_array(var).copy()
    values[1] = -0.5
    var.CopyFrom(numpy_helper.from_array(values, var.name))
    merged, report = bnfold.fold_onnx(model)
    assert bn.input[4] in {i for n in merged.graph.node if n.op_type == "BatchNormalization" for i in n.input}
    source = tmp_path / "block.onnx"
    onnx.save(model, source)
    proc = subprocess.run([sys.executable, "-m", "bnfold", str(source), str(tmp_path / "out.onnx")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "negative-variance" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.onnx"]


# ---- a merged weight is rounded once -----------------------------------------------------------------------

_EPS = float(np.float32(1e-5))  # BatchNormalization's default epsilon, as the float32 attribute holds it


def _affine64(stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """The float64 per-channel affine of BatchNormalization statistics (independent of bnfold)."""
    scale, bias, mean, var = (np.asarray(stats[k], np.float64) for k in ("scale", "bias", "mean", "var"))
    s = scale / np.sqrt(var + _EPS)
    return s, bias - mean * s


def repvgg_block(net: Net, h: str, channels: int, variant: str = "plain", store: Net | None = None
                 ) -> tuple[str, np.ndarray, np.ndarray]:
    """A RepVGG block added to ``net`` (3x3 conv+BN, 1x1 conv+BN, BN identity, summed) reading ``h``; returns its
    output and the float64 kernel and bias of its merge, computed here in numpy from the ORIGINAL weights and
    statistics. ``store``: where the weights and BN parameters live (an enclosing graph's Net: outer-scope values).

    ``variant``: "plain"; "bn-chain" (the 3x3 branch has two BNs in a row, folded one after the other);
    "shared-weight" (the 1x1 branch is a second 3x3 reading the same weight initializer, as the soak's case)."""
    from onnx_builders import bn_stats

    store = store or net
    dtype = net.dtype
    w3 = (net.rng.standard_normal((channels, channels, 3, 3)) / 12).astype(dtype)
    w1 = (net.rng.standard_normal((channels, channels, 1, 1)) / 4).astype(dtype)
    stats = [bn_stats(net.rng, channels, dtype) for _ in range(4)]

    def bn(x, i):
        names = [store.init(store.fresh(f"bn_{k}"), stats[i][k]) for k in ("scale", "bias", "mean", "var")]
        return net.node("BatchNormalization", [x, *names])

    w3_name = store.init(store.fresh("W3_"), w3)
    a = bn(net.node("Conv", [h, w3_name], **conv_attrs(3, 1)), 0)
    s, t = _affine64(stats[0])
    if variant == "bn-chain":
        a = bn(a, 3)
        s2, t2 = _affine64(stats[3])
        s, t = s2 * s, s2 * t + t2
    kernel = w3.astype(np.float64) * s[:, None, None, None]
    bias = t
    if variant == "shared-weight":
        b = bn(net.node("Conv", [h, w3_name], **conv_attrs(3, 1)), 1)
        s, t = _affine64(stats[1])
        kernel = kernel + w3.astype(np.float64) * s[:, None, None, None]
    else:
        b = bn(net.node("Conv", [h, store.init(store.fresh("W1_"), w1)], **conv_attrs(1, 0)), 1)
        s, t = _affine64(stats[1])
        kernel[:, :, 1:2, 1:2] += w1.astype(np.float64) * s[:, None, None, None]
    bias = bias + t
    c = bn(h, 2)
    s, t = _affine64(stats[2])
    kernel[np.arange(channels), np.arange(channels), 1, 1] += s
    bias = bias + t
    return net.node("Add", [net.node("Add", [a, b]), c]), kernel, bias


def repvgg_model(variant: str, dtype=np.float16, channels: int = 16) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A RepVGG block (fp16 by default) after a Relu, then a Relu, and the float64 kernel and bias of its merge."""
    net = Net(dtype=dtype, seed=23)
    h = net.node("Relu", [net.input("x", [1, channels, 8, 8])])
    y, kernel, bias = repvgg_block(net, h, channels, variant)
    net.output(net.node("Relu", [y]))
    return net.model(), kernel, bias


def merged_kernel(graph: onnx.GraphProto) -> tuple[np.ndarray, np.ndarray]:
    """The weight and bias of the one Conv of ``graph`` (initializers of that graph)."""
    conv, = [n for n in graph.node if n.op_type == "Conv"]
    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    return values[conv.input[1]], values[conv.input[2]]


def assert_rounded_once(got: np.ndarray, exact: np.ndarray) -> None:
    want = exact.astype(got.dtype)
    assert got.tobytes() == want.tobytes(), \
        f"{int((got != want).sum())} of {got.size} values differ from one rounding of the float64 merge"


@pytest.mark.parametrize("variant", ["plain", "bn-chain", "shared-weight"])
def test_an_fp16_merged_kernel_is_rounded_once_from_the_original_weights(variant):
    """Folds write each branch's weight rounded to fp16; the merge must sum their float64 values, not those
    roundings (a second rounding of the sum is off by up to an ulp more, which the 10k soak caught)."""
    model, kernel, bias = repvgg_model(variant)
    merged, report = bnfold.fold_onnx(model)
    assert count_ops(merged.graph, "Conv") == 1 and count_ops(merged.graph) == 0, report.summary_lines()
    got_w, got_b = merged_kernel(merged.graph)
    assert got_w.dtype == got_b.dtype == np.float16
    assert_rounded_once(got_w, kernel)
    assert_rounded_once(got_b, bias)


@pytest.mark.parametrize("dtype,skip,kept", [(np.float16, (), True), (np.float32, (), False),
                                              (np.float16, ("merge-branches", "merge-sequential"), False)])
def test_float64_values_are_kept_only_for_16_bit_floats_while_merging(monkeypatch, dtype, skip, kept):
    """Keeping the float64 value of every folded fp32 weight would double the fold's memory, and fp32's second
    rounding is an ulp: they are kept only for 16-bit floats, and only while the merge rules run."""
    from bnfold.onnx.graph import GraphIndex

    recorded, written = [], []
    real_set, real_write = GraphIndex.set_exact, GraphIndex.write_tensor

    def spy(self, name, value):
        recorded.append(value)
        return real_set(self, name, value)

    def count(self, *args, **kwargs):
        written.append(args[1])
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(GraphIndex, "set_exact", spy)
    monkeypatch.setattr(GraphIndex, "write_tensor", count)
    model, _, _ = repvgg_model("bn-chain", dtype)
    bnfold.fold_onnx(model, skip=skip)
    assert len(written) >= 4  # tensors were written; set_exact records the float64 value of each, where kept
    assert any(v is not None for v in recorded) == kept
    assert all(v.dtype == np.float64 for v in recorded if v is not None)


# ---- merges inside subgraphs ----------------------------------------------------------------------------

def if_with_repvgg_branches(dtype, else_weights: str) -> tuple[onnx.ModelProto, dict[str, tuple]]:
    """``If(cond)`` whose two branches each hold a RepVGG block reading the main graph's ``h`` (an outer value).
    The then-branch keeps its weights and BN parameters as its own initializers; the else-branch reads them from
    the main graph (``else_weights="outer"``: outer-scope constants) or has its own under the same names as the
    then-branch's (``"same-names"``: sibling scopes). Returns the model and each branch's float64 merge."""
    channels = 8
    net = Net(dtype=dtype, seed=31)
    h = net.node("Relu", [net.input("x", [1, channels, 6, 6])], "h")
    net.inputs.append(onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    branches, merges = {}, {}
    for name, outer in (("then", False), ("else", else_weights == "outer")):
        body = Net(dtype=dtype, seed=32 if name == "else" else 33)
        body._n = 100  # names apart from the main graph's
        y, kernel, bias = repvgg_block(body, h, channels, store=net if outer else None)
        body.node("Relu", [y], f"{name}_y")
        out = onnx.helper.make_tensor_value_info(f"{name}_y", onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                                 [1, channels, 6, 6])
        branches[f"{name}_branch"] = onnx.helper.make_graph(body.nodes, name, [], [out], body.inits)
        merges[name] = kernel, bias
    net.nodes.append(onnx.helper.make_node("If", ["cond"], ["y"], name="If_0", **branches))
    net.output("y", [1, channels, 6, 6])
    return net.model(), merges


@pytest.mark.parametrize("else_weights", ["outer", "same-names"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_repvgg_blocks_inside_if_branches_are_merged(dtype, else_weights):
    model, merges = if_with_repvgg_branches(dtype, else_weights)
    if else_weights == "same-names":
        then, other = (a.g for a in model.graph.node[-1].attribute)
        assert [t.name for t in then.initializer] == [t.name for t in other.initializer]
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    merged, report = bnfold.fold_onnx(model)
    assert model.SerializeToString() == before
    onnx.checker.check_model(merged, full_check=True)
    assert {m.graph for m in report.merged} == {"If_0.then_branch", "If_0.else_branch"}, report.summary_lines()
    assert all(m.rule == "merge-branches" for m in report.merged)
    assert report.bn_before == 6 and report.bn_after == 0 and report.not_merged == []
    if_node, = [n for n in merged.graph.node if n.op_type == "If"]
    bodies = {a.name.split("_")[0]: a.g for a in if_node.attribute}
    for name, body in bodies.items():
        assert [n.op_type for n in body.node] == ["Conv", "Relu"], (name, [n.op_type for n in body.node])
        if dtype == np.float16:  # rounded once, from the original weights, in a subgraph too
            got_w, got_b = merged_kernel(body)
            assert_rounded_once(got_w, merges[name][0])
            assert_rounded_once(got_b, merges[name][1])
    # the outer weights and BN parameters the else-branch read are gone with the branches that read them
    assert [t.name for t in merged.graph.initializer] == [], [t.name for t in merged.graph.initializer]
    tol = 2e-3 if dtype == np.float16 else 1e-5
    for cond in (True, False):
        feeds = random_feeds(model, seed=5, cond=np.array(cond))
        want = run_ref(model, feeds)["y"]
        for got in (run_ref(merged, feeds)["y"], run_ort(merged, feeds)["y"]):
            np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=tol * np.abs(want).max())
    again, again_report = bnfold.fold_onnx(merged)
    assert not again_report.modified and again.SerializeToString() == merged.SerializeToString()


def test_a_merge_refused_inside_a_branch_names_its_graph():
    net = Net(seed=34)
    h = net.node("Relu", [net.input("x", [1, 4, 8, 8])], "h")
    net.inputs.append(onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    branches = {}
    for name in ("then", "else"):
        body = Net(seed=35)
        body._n = 100
        a = body.conv(h, 4, 4, (3, 3), **conv_attrs(3, 1))
        if name == "then":  # a second branch with other dilations: not one convolution
            y = body.node("Add", [a, body.conv(h, 4, 4, (3, 3), dilations=[2, 2], **conv_attrs(3, 2))], "then_y")
        else:
            y = body.node("Relu", [a], "else_y")
        out = onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, [1, 4, 8, 8])
        branches[f"{name}_branch"] = onnx.helper.make_graph(body.nodes, name, [], [out], body.inits)
    net.nodes.append(onnx.helper.make_node("If", ["cond"], ["y"], name="If_0", **branches))
    net.output("y", [1, 4, 8, 8])
    model = net.model()
    merged, report = bnfold.fold_onnx(model)
    assert [(s.code, s.graph) for s in report.not_merged] == [("merge-inexact", "If_0.then_branch")]
    assert "dilations" in report.not_merged[0].reason
    assert any(line.endswith("(in If_0.then_branch)") for line in report.summary_lines())
    assert merged.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("batched", [True, False])
def test_a_plain_fp16_network_keeps_no_float64_copies(monkeypatch, batched):
    """Conv -> BN -> Relu blocks can not be merged: no float64 value outlives the plan that computed it (memory stays
    that of merging off; benchmarks/fold_speed.py measures it), while a RepVGG block keeps its branches' values
    until they are merged, and its merged Conv (between Relus) none after."""
    from bnfold.onnx import fold as fold_module
    from bnfold.onnx.fold import fold_model, select_rules
    from bnfold.onnx.graph import GraphIndex

    kept = []  # the size of the table after each applied plan that computed float64 values
    real_forget, real_set = fold_module.forget_unmergeable_exact, GraphIndex.set_exact

    def forget(g, plan):
        real_forget(g, plan)
        kept.append(len(g.exact))

    def set_exact(self, name, value):  # the batched path plans these folds ahead, with no float64 values at all
        real_set(self, name, value)
        if batched and value is not None:
            kept.append(len(self.exact))

    monkeypatch.setattr(fold_module, "forget_unmergeable_exact", forget)
    monkeypatch.setattr(GraphIndex, "set_exact", set_exact)
    net = Net(dtype=np.float16, seed=36)
    y = net.input("x", [1, 4, 6, 6])
    for _ in range(4):
        y = net.node("Relu", [net.bn(net.conv(y, 4, 4, (3, 3), **conv_attrs(3, 1)), 4)])
    net.output(y)
    report = fold_model(net.model(), select_rules(), batched=batched)
    assert len(report.folded) == 4 and kept == ([] if batched else [0, 0, 0, 0]), kept
    kept.clear()
    report = fold_model(repvgg_model("plain")[0], select_rules(), batched=batched)
    assert report.merged and max(kept) >= 2 and kept[-1] == 0, kept  # the branch convs, then the merged one
