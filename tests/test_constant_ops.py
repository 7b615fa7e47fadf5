"""bnfold.onnx.constant_ops: each numpy kernel gives exactly what onnxruntime gives for the same node (same dtype,
same shape, same values), and declines (None) what it does not cover."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx.constant_ops import evaluate

F32 = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
I64 = np.array([1, 3], dtype=np.int64)

CASES = [
    ("Identity", [F32], {}, 17),
    ("Shape", [F32], {}, 13),
    ("Shape", [np.zeros((2, 3, 4, 5), np.float32)], {"start": 1, "end": -1}, 17),
    ("Shape", [np.zeros((2, 3, 4, 5), np.float32)], {"start": -10, "end": 10}, 17),
    ("Cast", [F32], {"to": TensorProto.FLOAT16}, 17),
    ("Cast", [F32.astype(np.float64) / 3], {"to": TensorProto.FLOAT}, 17),
    ("Cast", [I64], {"to": TensorProto.DOUBLE}, 17),
    ("Cast", [np.array([1, 2], np.int32)], {"to": TensorProto.INT64}, 17),
    ("CastLike", [F32 / 7, np.zeros((), np.float16)], {}, 17),
    ("CastLike", [np.array(0, np.int64), np.zeros((), np.float32)], {}, 17),
    ("Expand", [np.array([1.5], np.float32), np.array([2, 3], np.int64)], {}, 17),
    ("Expand", [np.ones((3, 1), np.float32), np.array([2, 1, 4], np.int64)], {}, 17),
    ("Unsqueeze", [F32, np.array([0, -1], np.int64)], {}, 17),
    ("Unsqueeze", [F32], {"axes": [1]}, 11),
    ("Squeeze", [np.zeros((1, 3, 1), np.float32), np.array([0], np.int64)], {}, 17),
    ("Squeeze", [np.zeros((1, 3, 1), np.float32)], {}, 17),
    ("Squeeze", [np.zeros((1, 3, 1), np.float32)], {"axes": [2]}, 11),
    ("Reshape", [F32, np.array([3, -1], np.int64)], {}, 17),
    ("Reshape", [F32, np.array([0, 3], np.int64)], {}, 17),
    ("Reshape", [np.zeros((0, 3), np.float32), np.array([0, 3], np.int64)], {"allowzero": 1}, 17),
    ("Concat", [F32, F32 * 2], {"axis": 0}, 17),
    ("Concat", [I64, I64], {"axis": -1}, 17),
    ("ConstantOfShape", [np.array([2, 2], np.int64)], {}, 17),
    ("ConstantOfShape", [np.array([3], np.int64)], {"value": numpy_helper.from_array(np.array([7], np.int64))}, 17),
    ("Add", [F32, np.float32(0.1) * F32], {}, 17),
    ("Sub", [F32.astype(np.float16), np.ones(3, np.float16)], {}, 17),
    ("Mul", [F32.astype(np.float64), np.full((2, 1), 1 / 3)], {}, 17),
    ("Div", [F32, np.full(3, 3.0, np.float32)], {}, 17),
]


def _reference(op, inputs, attrs, opset):
    """onnxruntime on a one-node model (onnx's ReferenceEvaluator mixes up opset versions of single nodes)."""
    names = [f"i{k}" for k in range(len(inputs))]
    node = helper.make_node(op, names, ["out"], **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), np.shape(v))
         for n, v in zip(names, inputs)],
        [helper.make_empty_tensor_value_info("out")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {n: np.asarray(v) for n, v in zip(names, inputs)})[0]


@pytest.mark.parametrize("op, inputs, attrs, opset", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_kernel_matches_the_reference_evaluator(op, inputs, attrs, opset):
    node = helper.make_node(op, [f"i{k}" for k in range(len(inputs))], ["out"], **attrs)
    got = evaluate(node, list(inputs), opset)
    want = np.asarray(_reference(op, inputs, attrs, opset))
    assert got is not None
    [got] = got
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("op, inputs, attrs, opset", [
    ("Div", [np.array([7, -7], np.int64), np.array([2, 2], np.int64)], {}, 17),  # integer division
    ("Add", [F32, F32.astype(np.float64)], {}, 17),  # mixed dtypes: invalid, the reference judges it
    ("Add", [F32, F32], {}, 6),  # legacy broadcast attributes
    ("Cast", [F32], {"to": TensorProto.INT32}, 17),  # float -> int
    ("Cast", [I64], {"to": TensorProto.INT32}, 17),  # narrowing int
    ("Cast", [F32], {"to": TensorProto.BFLOAT16}, 17),
    ("CastLike", [F32.astype(ml_dtypes.bfloat16), np.zeros((), np.float32)], {}, 17),
    ("Reshape", [F32, np.array([4, -1], np.int64)], {}, 17),  # impossible shape
    ("Gather", [F32, np.array([0], np.int64)], {}, 17),  # not covered
])
def test_kernel_declines_what_it_does_not_cover(op, inputs, attrs, opset):
    node = helper.make_node(op, [f"i{k}" for k in range(len(inputs))], ["out"], **attrs)
    assert evaluate(node, list(inputs), opset) is None
