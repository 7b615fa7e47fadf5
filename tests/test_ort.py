"""bnfold.ort: provider names, availability, session options and session creation shared by verify/bench/calibrate."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import ort as ortlib
from bnfold.errors import InputError

CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def _model():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w


def test_resolve_providers():
    assert ortlib.resolve_providers(None) == (["cpu", "cuda"] if CUDA else ["cpu"])
    assert ortlib.resolve_providers("CPUExecutionProvider") == ["cpu"]
    assert ortlib.resolve_providers([" CUDA ", "cpu", "cuda"]) == ["cuda", "cpu"]
    with pytest.raises(InputError, match=r"^unknown provider 'tpu' \(choose from cpu, cuda\)$"):
        ortlib.resolve_providers(["cpu", "tpu"])


def test_unavailable_reason():
    assert ortlib.unavailable_reason("cpu") == ""
    assert ortlib.unavailable_reason("cuda") == ("" if CUDA else ortlib.CUDA_MISSING)


def test_session_options():
    opts = ortlib.session_options("disabled")
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert opts.log_severity_level == 3
    timed = ortlib.session_options("basic", threads=2, timing=True)
    assert timed.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert timed.intra_op_num_threads == 2 and timed.inter_op_num_threads == 1
    assert timed.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert timed.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert ortlib.session_providers("cuda") == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]


@pytest.mark.parametrize("how", ["proto", "path", "large-proto"])
def test_open_session_from_proto_path_or_temporary_external_data(tmp_path, monkeypatch, how):
    model, w = _model()
    source = model
    if how == "path":
        source = tmp_path / "m.onnx"
        onnx.save(model, source)
    elif how == "large-proto":
        monkeypatch.setattr(ortlib, "MAX_INLINE_BYTES", 0)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with ortlib.open_session(source, ortlib.session_options()) as (sess, seconds):
        assert ortlib.placed_on(sess, "cpu") and seconds >= 0
        [y] = sess.run(None, {"x": x})
    np.testing.assert_array_equal(y, x.astype(np.float64) @ w.astype(np.float64))  # small integers: exact
    assert model.graph.initializer[0].raw_data  # the caller's model keeps its data


def test_error_classifiers():
    assert ortlib.is_cuda_setup_error("libcudnn.so.9: cannot open shared object file")
    assert not ortlib.is_cuda_setup_error("Invalid rank for input: x")
    assert ortlib.is_missing_kernel(RuntimeError("Could not find an implementation for Conv(11) node"))
