"""One fold engine: the batched path and the per-node rules produce the same plans, and the same bytes.

* differential: folding with the batched path (``bnfold.onnx.prefetch``) and without it gives byte-identical models
  and identical reports, over the sample models and fuzz models (every pattern and refusal);
* a prefetched plan equals, edit for edit and bit for bit, the plan the conv-bn rule makes for the same layer;
* every skip the ONNX fold reports carries a stable kebab-case code listed in the README's table.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnfold.onnx import fold as fold_module
from bnfold.onnx.fold import fold_model, select_rules
from bnfold.onnx.graph import GraphIndex, ModelContext
from bnfold.onnx.merge import forget_unmergeable_exact
from bnfold.onnx.ops import LINEAR_OPS
from bnfold.onnx.plan import MoveOutput, Plan, WriteTensor, apply_plan
from bnfold.onnx.prefetch import prefetch_batchnorm_affines, prefetch_linear_plans
from bnfold.onnx.rules import RULE_NAMES, RULES, batchnorm_affine

try:  # tests/ on sys.path (rootdir-less "prepend" import mode)
    from fuzz_graphs import fuzz_cases
    from onnx_builders import Net
except ImportError:  # pragma: no cover - tests/ is a package
    from tests.fuzz_graphs import fuzz_cases
    from tests.onnx_builders import Net

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "sample_models").glob("*.onnx"))
_README = (ROOT / "README.md").read_text()
_CODE_TABLE = _README[_README.index("| code | the normalization stays because |"):].split("\n\n")[0]
README_CODES = set(re.findall(r"^\| `([a-z0-9-]+)` +\|", _CODE_TABLE, re.M))
KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def _both_paths(model: onnx.ModelProto, skip=()):
    out = []
    for batched in (True, False):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        report = fold_model(copy, select_rules(skip), batched=batched)
        out.append((copy.SerializeToString(), report.to_dict()))
    return out


def _assert_same_and_coded(model: onnx.ModelProto, skip=()):
    (batched_bytes, batched_report), (node_bytes, node_report) = _both_paths(model, skip)
    assert batched_bytes == node_bytes
    assert batched_report == node_report
    for skip in batched_report["skipped"] + batched_report["not_merged"]:
        assert KEBAB.match(skip["code"]), skip
        assert skip["code"] in README_CODES, f"skip code {skip['code']!r} is not in README's table"
    return batched_report


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_batched_and_per_node_paths_give_identical_bytes_on_samples(path, monkeypatch):
    used = []
    real = fold_module.prefetch_linear_plans

    def spy(*args):
        ready = real(*args)
        used.append(len(ready))
        return ready

    monkeypatch.setattr(fold_module, "prefetch_linear_plans", spy)
    report = _assert_same_and_coded(onnx.load(path))
    assert report["folded"], "every sample has a BN to fold"
    if any(f["rule"] in ("conv-bn", "convtranspose-bn", "gemm-bn") for f in report["folded"]):
        assert sum(used) > 0, "the batched path planned none of this sample's folds: the comparison is empty"


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fuzz_cases(max_blocks=8), st.sets(st.sampled_from(RULE_NAMES), max_size=3))
def test_batched_and_per_node_paths_give_identical_bytes_on_fuzz_models(case, skip):
    """Also with rules left out: the batched path plans only what the first enabled rule would fold."""
    _assert_same_and_coded(case.model, sorted(skip))


@pytest.mark.parametrize("dtype,merging", [(np.float32, False), (np.float32, True), (np.float16, True)])
def test_a_prefetched_plan_is_the_plan_the_rule_makes(dtype, merging):
    """Also for 16-bit floats with merge rules on, where the rule's plan carries the float64 values for merges to
    compose from: this Conv feeds no merge, so the pass drops them once applied, and the prefetched plan has none."""
    net = Net(dtype=dtype, opset=17, seed=3)
    x = net.input("x", [2, 3, 5, 5])
    y = net.conv(x, 3, 4, [3, 3], pads=[1, 1, 1, 1])
    net.output(net.bn(y, 4, "y"))
    model = net.model()
    ctx = ModelContext(model)
    ctx.merging = merging
    g = GraphIndex(model.graph, ctx)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    with np.errstate(all="ignore"):
        affines = prefetch_batchnorm_affines(g, [bn])
        prefetched, channels = prefetch_linear_plans(g, [bn], dict(affines),
                                                     {"Conv": (LINEAR_OPS["Conv"], "conv-bn")})[id(bn)]
    per_node = next(r for r in RULES if r.name == "conv-bn").match(g, batchnorm_affine(g, bn))
    assert isinstance(per_node, Plan) and isinstance(prefetched, Plan) and channels == 4
    assert (prefetched.rule, prefetched.into, prefetched.remove) == (per_node.rule, per_node.into, per_node.remove)
    assert [type(e) for e in prefetched.edits] == [type(e) for e in per_node.edits] == \
        [WriteTensor, WriteTensor, MoveOutput]
    for a, e in zip(prefetched.edits, per_node.edits):
        if isinstance(a, WriteTensor):
            assert (a.node, a.slot) == (e.node, e.slot)
            assert a.value.dtype == e.value.dtype and a.value.tobytes() == e.value.tobytes()
            assert a.exact is None
            assert (e.exact is not None) == (merging and np.dtype(dtype).itemsize < 4)
            if e.exact is not None:
                assert e.exact.dtype == np.float64 and e.exact.astype(dtype).tobytes() == e.value.tobytes()
        else:
            assert (a.node, a.name) == (e.node, e.name)
    assert prefetched.holds(g) and per_node.holds(g)
    fold = apply_plan(g, per_node)
    assert (fold.bn, fold.into, fold.rule) == (bn.name or f"BatchNormalization({bn.output[0]})", per_node.into,
                                               "conv-bn")
    assert not prefetched.holds(g), "the weight was rewritten: the plan computed ahead no longer holds"
    forget_unmergeable_exact(g, per_node)  # as the pass does after each plan
    assert g.exact == {}, "a Conv whose output is the graph's keeps no float64 copy"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_layer_a_merge_may_read_is_left_to_the_rules_when_its_float64_values_are_kept(dtype):
    """fp16 with merge rules on: a Conv -> BN summed with another branch keeps its float64 weights for the merge;
    the batched path leaves it to the per-node rules (plans computed ahead would hold float64 copies of every
    layer at once); the plain Conv -> BN -> Relu is still planned ahead. fp32 keeps none: both are."""
    net = Net(dtype=dtype, opset=17, seed=4)
    x = net.node("Relu", [net.input("x", [1, 4, 5, 5])])
    plain = net.node("Relu", [net.bn(net.conv(x, 4, 4, [3, 3], pads=[1, 1, 1, 1]), 4)])
    branch = net.bn(net.conv(plain, 4, 4, [3, 3], pads=[1, 1, 1, 1]), 4)
    net.output(net.node("Add", [branch, net.conv(plain, 4, 4, [1, 1])]))
    model = net.model()
    ctx = ModelContext(model)
    ctx.merging = True
    g = GraphIndex(model.graph, ctx)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    with np.errstate(all="ignore"):
        ready = prefetch_linear_plans(g, bns, prefetch_batchnorm_affines(g, bns),
                                      {"Conv": (LINEAR_OPS["Conv"], "conv-bn")})
    assert id(bns[0]) in ready
    assert (id(bns[1]) in ready) == (dtype == np.float32)
    _assert_same_and_coded(model)  # the two paths still give the same bytes


def test_every_code_in_the_source_is_in_the_readme_table():
    """Every refusal code written in the engine (Refusal, FoldRefused, Skip) is documented, and kebab-case."""
    sources = [*(ROOT / "bnfold" / "onnx").glob("*.py"), ROOT / "bnfold" / "affine.py"]
    text = "\n".join(p.read_text() for p in sources)
    found = set(re.findall(r'Refusal\(\s*"([^"]+)"', text))
    found |= set(re.findall(r'FoldRefused\([^()]*(?:\([^()]*\)[^()]*)*,\s*"([a-z0-9-]+)"\s*\)', text))
    found |= set(re.findall(r'code="([^"]+)"', text))
    found |= {"fold-refused"}  # FoldRefused's default code
    assert len(found) > 20, found  # the patterns above still find the codes
    assert all(KEBAB.match(code) for code in found), found
    assert found <= README_CODES, f"undocumented codes: {sorted(found - README_CODES)}"
    assert README_CODES <= found, f"documented codes no longer produced: {sorted(README_CODES - found)}"


def test_a_bn_inside_a_model_local_function_is_reported_with_its_code():
    from onnx import TensorProto as TP
    from onnx import helper

    body = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="fbn")
    function = helper.make_function("local", "Norm", ["x", "s", "b", "m", "v"], ["y"], [body],
                                    [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("Norm", ["x", "s", "b", "m", "v"], ["y"], domain="local")], "g",
                              [helper.make_tensor_value_info(n, TP.FLOAT, None) for n in "xsbmv"],
                              [helper.make_tensor_value_info("y", TP.FLOAT, None)])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    report = fold_model(model, select_rules())
    assert [(s.bn, s.code) for s in report.skipped] == [("fbn", "inside-function")]
    assert report.bn_before == report.bn_after == 1
