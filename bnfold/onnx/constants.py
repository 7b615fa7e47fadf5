"""Compile-time constants: initializers, Constant nodes and constant subgraphs evaluated ahead of time (the
explicit-stack evaluator). A mixin of :class:`bnfold.onnx.graph.GraphIndex`, whose index it reads."""

from __future__ import annotations

import functools

import numpy as np
import onnx

from ..errors import InputError
from .constant_ops import evaluate, evaluate_without_attributes
from .external import value_of
from .nodes import OPS_WITH_SUBGRAPHS, get_attr, get_attrs, node_label
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
        chain = self._zero_bias_chain(name)
        if chain is not None:
            return self._evaluate_chain(chain, name)
        return self._compute(name)

    def _zero_bias_chain(self, name: str) -> list[tuple[onnx.NodeProto, str, list]] | None:
        """The exporter's zero bias of a bias-less Conv, ``Expand(CastLike(Constant, x), Expand(Shape(W),
        Constant))`` with W an initializer and x a run-time value of known dtype, as its nodes in evaluation order,
        each with its output and its inputs as :meth:`_compute` would pass them; None for anything else.

        Recognising it costs a few lookups, where the generic walk (a quarter of a small model's fold) looks up
        every input's producer and stand-in; the values come from the same :meth:`_evaluate`, so they are
        identical."""
        producer, inputs_of = self.producer, self._inputs_of
        expand = producer[name]
        if expand.op_type != "Expand":
            return None
        inputs = inputs_of[id(expand)]
        if len(inputs) != 2:
            return None
        cast_like, count = producer.get(inputs[0]), producer.get(inputs[1])
        if cast_like is None or count is None or cast_like.op_type != "CastLike" or count.op_type != "Expand":
            return None
        if len(inputs_of[id(cast_like)]) != 2 or len(inputs_of[id(count)]) != 2:
            return None
        (fill, x), (shape_out, one) = inputs_of[id(cast_like)], inputs_of[id(count)]
        fill_node, shape, one_node = producer.get(fill), producer.get(shape_out), producer.get(one)
        if fill_node is None or shape is None or one_node is None or fill_node.op_type != "Constant" \
                or one_node.op_type != "Constant" or shape.op_type != "Shape" or x not in self._runtime:
            return None
        weight = inputs_of[id(shape)]
        if len(weight) != 1 or weight[0] not in self.initializers or weight[0] in self._constants:
            return None
        nodes = (shape, one_node, count, fill_node, cast_like, expand)
        for node in nodes:
            outputs = self._outputs_of[id(node)]
            if node.domain not in ("", "ai.onnx") or len(outputs) != 1 or outputs[0] in self._not_constant \
                    or outputs[0] in self._runtime:
                return None
        stand_in = self._stand_in(cast_like, 1)
        if stand_in is None:
            return None
        dims = _ShapeOnly(tuple(self.initializers[weight[0]].dims[:]))
        # A string input is the output of an earlier node of the chain, read from the cache when its turn comes.
        return [(shape, shape_out, [dims]), (one_node, one, []), (count, inputs[1], [shape_out, one]),
                (fill_node, fill, []), (cast_like, inputs[0], [fill, stand_in]), (expand, name, inputs[:])]

    def _evaluate_chain(self, chain: list[tuple[onnx.NodeProto, str, list]], name: str
                        ) -> tuple[np.ndarray | None, str]:
        """Evaluate a chain found by :meth:`_zero_bias_chain` node by node (string inputs are earlier outputs); a
        node whose value is cached (the exporter shares the zero Constant) is not evaluated again, as in
        :meth:`_compute`. A node that can not be evaluated is recorded as :meth:`_compute` records it, which then
        finishes the walk, so the answer and every cached reason are the generic ones."""
        constants, opset = self._constants, self.ctx.opset
        for node, out, values in chain:
            if out in constants:
                continue
            values = [constants[v] if type(v) is str else v for v in values]
            # The chain's four ops by hand (what _evaluate computes for them, without its generic dispatch); any
            # other outcome (an odd Constant, a kernel that declines, a huge value) takes the generic path.
            op = node.op_type
            if op == "Shape":
                a = get_attrs(node, start=0, end=None)
                value = np.array(values[0].shape[a["start"]:a["end"]], dtype=np.int64)
            elif op == "Constant":
                value = constant_node_value(node)
            else:
                value = evaluate_without_attributes(op, values, opset)
            if value is not None and value.size <= MAX_EVAL_ELEMENTS:
                constants[out] = value
                continue
            value, reason = self._evaluate(node, out, values)
            if value is None:
                self._not_constant[out] = reason
                return self._compute(name)
        return constants[name], ""

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
                    value = _ShapeOnly(tuple(self.initializers[inp].dims[:]))
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
        return tuple(tensor.dims[:]), dtype

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

