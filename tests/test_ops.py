"""Adding a linear op is one descriptor: DeformConv (opset 19+), which bnfold does not fold, folds once
:data:`bnfold.onnx.ops.LINEAR_OPS` has an entry for it — per-node rule, batched path, report and all.

The folded values are checked against a float64 numpy reference written here (``s = gamma / sqrt(var + eps)``,
``W' = s·W`` per output channel, ``b' = s·b + beta - mean·s``), not against bnfold's own math.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from bnfold.errors import InputError
from bnfold.onnx import fold as fold_module
from bnfold.onnx import ops
from bnfold.onnx.fold import fold_model, fold_onnx, select_rules
from bnfold.onnx.ops import LinearOp

DEFORM_CONV = LinearOp("DeformConv", "deformconv-bn", "DeformConv -> BatchNormalization",
                       min_weight_rank=3, max_weight_rank=None, out_axis=0, in_axis=1, groups_attr="group",
                       bias_slot=3, nc_output=True)


def _deform_conv_bn(seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(seed)
    c_in, c_out, group, eps = 4, 6, 2, 1e-3
    params = {
        "W": rng.standard_normal((c_out, c_in // group, 3, 3)).astype(np.float32),
        "B": rng.standard_normal(c_out).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, c_out).astype(np.float32),
        "beta": rng.normal(0, 0.3, c_out).astype(np.float32),
        "mean": rng.normal(0, 0.5, c_out).astype(np.float32),
        "var": rng.uniform(0.2, 3.0, c_out).astype(np.float32),
    }
    graph = helper.make_graph(
        [helper.make_node("DeformConv", ["x", "W", "offset", "B"], ["y"], name="dconv", group=group),
         helper.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["z"], name="bn",
                          epsilon=eps)],
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [1, c_in, 6, 6]),
         helper.make_tensor_value_info("offset", TP.FLOAT, [1, 2 * 9, 4, 4])],
        [helper.make_tensor_value_info("z", TP.FLOAT, [1, c_out, 4, 4])],
        [numpy_helper.from_array(v, k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    model.ir_version = 10
    params["eps"] = np.float32(eps)  # an ONNX float attribute: the runtime reads float32(1e-3)
    return model, params


def test_without_a_descriptor_deformconv_bn_is_not_folded():
    model, _ = _deform_conv_bn()
    _, report = fold_onnx(model)
    assert report.bn_after == 1 and [s.code for s in report.skipped] == ["no-linear-neighbour"]


def test_one_descriptor_makes_deformconv_bn_fold(monkeypatch):
    monkeypatch.setitem(ops.LINEAR_OPS, "DeformConv", DEFORM_CONV)
    assert "deformconv-bn" in [r.name for r in select_rules()]
    planned = []
    real = fold_module.prefetch_linear_plans

    def spy(*args):
        ready = real(*args)
        planned.extend(plan.rule for plan, _ in ready.values())
        return ready

    monkeypatch.setattr(fold_module, "prefetch_linear_plans", spy)
    model, p = _deform_conv_bn()
    folded, report = fold_onnx(model)
    assert [(f.bn, f.into, f.rule) for f in report.folded] == [("bn", "dconv", "deformconv-bn")]
    assert planned == ["deformconv-bn"], "the batched path plans the new op too"
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == ["DeformConv"]
    node = folded.graph.node[0]
    assert list(node.output) == ["z"] and list(node.input[:3]) == ["x", "W", "offset"]
    values = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    # float64 reference, independent of bnfold.affine
    s = p["gamma"].astype(np.float64) / np.sqrt(p["var"].astype(np.float64) + np.float64(p["eps"]))
    t = p["beta"].astype(np.float64) - p["mean"].astype(np.float64) * s
    want_w = p["W"].astype(np.float64) * s[:, None, None, None]
    want_b = s * p["B"].astype(np.float64) + t
    got_w, got_b = values[node.input[1]], values[node.input[3]]
    assert got_w.dtype == np.float32 and got_b.dtype == np.float32
    np.testing.assert_allclose(got_w, want_w, rtol=2e-7, atol=0)
    np.testing.assert_allclose(got_b, want_b, rtol=2e-7, atol=1e-7)
    # and the per-node path gives the same bytes
    per_node = onnx.ModelProto()
    per_node.CopyFrom(model)
    fold_model(per_node, select_rules(), batched=False)
    assert per_node.SerializeToString() == folded.SerializeToString()


@pytest.mark.parametrize("field, value", [("out_axis", 1), ("bias_slot", 2)])
def test_the_descriptor_is_what_the_fold_reads(monkeypatch, field, value):
    """A wrong descriptor gives a different fold: the rules have no DeformConv knowledge of their own."""
    import dataclasses

    monkeypatch.setitem(ops.LINEAR_OPS, "DeformConv", dataclasses.replace(DEFORM_CONV, **{field: value}))
    model, _ = _deform_conv_bn()
    if field == "out_axis":  # axis 1 holds 2 channels per group x 2 groups = 4, not the BN's 6
        with pytest.raises(InputError, match="has 6 channels, but its input has 4"):
            fold_onnx(model)
    else:  # slot 2 holds the offsets, a graph input: read as the bias, it is not constant
        _, report = fold_onnx(model)
        assert report.bn_after == 1 and report.skipped[0].code == "bias-not-constant"
