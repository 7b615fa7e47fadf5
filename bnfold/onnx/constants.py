"""Compile-time constants: initializers, Constant nodes and constant subgraphs evaluated ahead of time (the
explicit-stack evaluator). A mixin of :class:`bnfold.onnx.graph.GraphIndex`, whose index it reads."""

from __future__ import annotations

import functools

import numpy as np
import onnx

from ..errors import InputError
from .constant_ops import evaluate
from .external import value_of
from .nodes import OPS_WITH_SUBGRAPHS, get_attr, node_label
from .tensors import RAW_FLOAT_DTYPES, constant_node_value, tensor_to_array

# Ops whose output is not a function of their inputs: never evaluated as constants.
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"}
# Constant subgraphs evaluated ahead of time must stay small: they only ever feed BN parameters or weights.
MAX_EVAL_ELEMENTS = 1 << 24


class ConstantEvaluator:
    """Constant lookups of a :class:`~bnfold.onnx.graph.GraphIndex` (which provides ``producer``,
    ``initializers``, ``inputs``, ``parent``, ``ctx``, ``_constants``, ``_not_constant``, ``_runtime``,
    ``_inputs_of``, ``_outputs_of``, ``is_overridable_input``, ``elem_type`` and ``static_shape``)."""

    def constant(self, name: str) -> tuple[np.ndarray | None, str]:
        """The value of ``name`` if it is a compile-time constant, else ``(None, reason)``.

        Both answers are cached: a value computed at run time stays so under every fold, so asking again (every
        residual Add asks about its skip input) costs nothing.
        """
        value = self._constants.get(name)
        if value is not None:
            return value, ""
        known = self._known(name)
        if known is not None:
            return known
        return self._compute(name)

    def _compute(self, name: str) -> tuple[np.ndarray | None, str]:
        """Evaluate the producer of ``name`` after its inputs, bottom-up with an explicit stack: a deep graph must
        not exhaust Python's recursion limit."""
        constants, runtime = self._constants, self._runtime
        stack, active = [name], {name}
        while stack:
            current = stack[-1]
            node = self.producer[current]
            op = node.op_type
            values: list = []  # per input: its value, a stand-in, or None (absent, run-time or still pending)
            pending = []
            for slot, inp in enumerate(self._inputs_of[id(node)]):
                if not inp:
                    values.append(None)
                    continue
                value = constants.get(inp)
                if value is None and op == "Shape" and inp in self.initializers:  # Shape(weight): dims, not a copy
                    value = _ShapeOnly(tuple(self.initializers[inp].dims))
                if value is not None:
                    values.append(value)
                    continue
                if inp in runtime and (op == "CastLike" or op == "Shape"):  # the common run-time case, no lookup
                    values.append(self._stand_in(node, slot))
                    continue
                known = self._known(inp)
                if known is not None and known[0] is not None:
                    values.append(known[0])
                    continue
                stand_in = self._stand_in(node, slot)
                if stand_in is None and known is None:
                    pending.append(inp)
                values.append(stand_in)
            if pending:
                if any(inp in active for inp in pending):
                    self._not_constant[current] = f"'{current}' depends on itself (the graph has a cycle)"
                else:
                    stack.extend(pending)
                    active.update(pending)
                    continue
            else:
                value, reason = self._evaluate(node, current, values)
                if value is None:
                    self._not_constant[current] = reason
            stack.pop()
            active.discard(current)
        return self._known(name)

    def _known(self, name: str) -> tuple[np.ndarray | None, str] | None:
        """The answer for ``name`` if it needs no evaluation of a producer (or is cached), else None."""
        if name in self._constants:
            return self._constants[name], ""
        if name in self._not_constant:
            return None, self._not_constant[name]
        if name in self.initializers:
            if self.is_overridable_input(name):
                return None, f"'{name}' is a graph input that can be overridden at run time"
            if name in self.inputs:
                self.ctx.used_initializer_inputs = True
            if self.parent is None and name in self.ctx.replacements:
                return value_of(self.ctx.replacements[name]), ""
            tensor = self.initializers[name]
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                if self.parent is None and self.ctx.external is not None:
                    return self.ctx.external.read(tensor), ""
                return None, f"'{name}' lives in external data that was not loaded"
            return tensor_to_array(tensor), ""
        if name in self._runtime and name in self.producer:
            node = self.producer[name]
            reason = self._not_constant[name] = f"'{name}' is computed at run time by {node.op_type} {node_label(node)}"
            return None, reason
        if name not in self.producer:
            if name in self.inputs:
                return None, f"'{name}' is a graph input"
            if self.parent is not None:
                return self.parent.constant(name)
            return None, f"'{name}' is not defined"
        return None

    def _evaluate(self, node: onnx.NodeProto, name: str, values: list) -> tuple[np.ndarray | None, str]:
        """Evaluate ``node`` on ``values`` (one per input: a constant, a stand-in, or None for an absent or
        run-time input) and cache its outputs."""
        op = node.op_type
        default_domain = node.domain in ("", "ai.onnx")
        if op == "Constant" and default_domain:
            value = constant_node_value(node)
            if value is None:
                raise InputError(f"Constant node {node_label(node)} holds no numeric tensor")
            self._constants[name] = value
            return value, ""
        if not default_domain or op in NONDETERMINISTIC or op in OPS_WITH_SUBGRAPHS:
            return None, f"'{name}' is computed by {op} {node_label(node)}"
        inputs = self._inputs_of[id(node)]
        for inp, value in zip(inputs, values):
            if value is None and inp:
                return None, f"'{name}' is computed at run time by {op} {node_label(node)}"
        if op == "Shape" and type(values[0]) is _ShapeOnly:
            start, end = get_attr(node, "start", 0), get_attr(node, "end", None)
            results = [np.array(values[0].shape[start:end], dtype=np.int64)]  # ONNX clamps as slicing does
        else:
            arrays = [v.array() if type(v) is _ShapeOnly else v for v in values]
            results = evaluate(node, arrays, self.ctx.opset)
            if results is None:
                feeds = {inp: value for inp, value in zip(inputs, arrays) if inp}
                try:
                    from onnx.reference import ReferenceEvaluator

                    evaluator = ReferenceEvaluator(node, opsets={"": self.ctx.opset})
                    results = [np.asarray(r) for r in evaluator.run(None, feeds)]
                except Exception as exc:  # the reference evaluator lacks the op or rejects it: not a constant for us
                    return None, f"'{name}' could not be evaluated ahead of time ({type(exc).__name__})"
        constants = self._constants
        for out, value in zip(self._outputs_of[id(node)], results):
            if value.size > MAX_EVAL_ELEMENTS:
                return None, f"'{name}' is a computed constant too large to evaluate"
            if out:
                constants[out] = value
        value = constants.get(name)
        if value is None:
            return None, f"'{name}' is not computed by {op} {node_label(node)}"
        return value, ""

    def constant_meta(self, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
        """Shape and dtype of a constant without reading its values, when it is a plain float initializer."""
        tensor = self.initializers.get(name)
        if tensor is None or self.is_overridable_input(name) or (
                tensor.data_location == onnx.TensorProto.EXTERNAL and not self._serves_external()):
            return None
        dtype = RAW_FLOAT_DTYPES.get(tensor.data_type)
        if dtype is None:
            return None
        if name in self.inputs:
            self.ctx.used_initializer_inputs = True
        return tuple(tensor.dims), dtype

    def _serves_external(self) -> bool:
        return self.parent is None and self.ctx.external is not None

    def _stand_in(self, node: onnx.NodeProto, slot: int) -> np.ndarray | None:
        """Inputs whose value an op ignores: CastLike reads only the dtype of its second input, Shape only the
        shape of its input. When that is known, a zero-cost array of that dtype/shape stands in, and the input
        need not be constant (nor be looked up, which would walk the graph above it)."""
        name = self._inputs_of[id(node)][slot]
        if node.op_type == "CastLike" and slot == 1:
            elem = self.elem_type(name)
            if elem:
                return _dtype_stand_in(elem)
        if node.op_type == "Shape":
            shape = self.static_shape(name)
            if shape is not None:
                return _ShapeOnly(tuple(shape))
        return None


@functools.lru_cache(maxsize=None)
def _dtype_stand_in(elem_type: int) -> np.ndarray:
    """A read-only zero scalar of an ONNX element type (all a CastLike's second input contributes)."""
    value = np.zeros((), dtype=onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    value.flags.writeable = False
    return value



class _ShapeOnly:
    """Stands in for an input of which Shape reads only the shape."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape

    def array(self) -> np.ndarray:
        return np.broadcast_to(np.zeros((), dtype=np.float32), self.shape)


def is_pure_constant_producer(node: onnx.NodeProto) -> bool:
    # in the default domain only OPS_WITH_SUBGRAPHS carry graphs (see subgraphs())
    op = node.op_type
    return op not in NONDETERMINISTIC and op not in OPS_WITH_SUBGRAPHS and node.domain in ("", "ai.onnx")

