"""A light, mutable index over one ONNX GraphProto: producers, consumers, constants, guarded edits.

Works on the protobuf in place and touches only what a fold changes (the tensors it rewrites, the nodes it
removes), so folding a large model costs little more than loading and saving it. Removals are recorded and
applied once in :meth:`GraphIndex.commit`, because deleting from a protobuf repeated field is linear each time.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import InputError
from .constant_ops import attribute_value, evaluate
from .external import ExternalData, value_of

# Ops whose output is not a function of their inputs: never evaluated as constants.
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"}
# Constant subgraphs evaluated ahead of time must stay small: they only ever feed BN parameters or weights.
_MAX_EVAL_ELEMENTS = 1 << 24


RAW_FLOAT_DTYPES = {onnx.TensorProto.FLOAT: np.dtype(np.float32), onnx.TensorProto.FLOAT16: np.dtype(np.float16),
                     onnx.TensorProto.DOUBLE: np.dtype(np.float64)}


# Element types whose raw_data numpy reads as is (little-endian, fixed size): a fast path past numpy_helper.
_RAW_DTYPES = {**RAW_FLOAT_DTYPES, onnx.TensorProto.INT64: np.dtype(np.int64),
               onnx.TensorProto.INT32: np.dtype(np.int32)}


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """numpy_helper.to_array, with a fast path for float and int tensors held in raw_data (the common case)."""
    dtype = _RAW_DTYPES.get(tensor.data_type)
    if dtype is not None:
        raw = tensor.raw_data
        if raw:
            dims = tuple(tensor.dims)
            if len(raw) == math.prod(dims) * dtype.itemsize:
                return np.frombuffer(raw, dtype=dtype).reshape(dims)
    return numpy_helper.to_array(tensor)


_RAW_FLOAT_TYPES = {dtype: data_type for data_type, dtype in RAW_FLOAT_DTYPES.items()}


def fill_tensor(tensor: onnx.TensorProto, value: np.ndarray, name: str) -> None:
    """Make the empty ``tensor`` what numpy_helper.from_array(value, name) gives."""
    data_type = _RAW_FLOAT_TYPES.get(value.dtype)
    if data_type is None:
        tensor.CopyFrom(numpy_helper.from_array(value, name))
        return
    tensor.dims.extend(value.shape)
    tensor.data_type = data_type
    tensor.name = name
    tensor.raw_data = value.tobytes()  # C order, whatever the array's layout, as from_array writes it


def node_label(node: onnx.NodeProto) -> str:
    """A readable, stable identifier: the node's name, or its op type and first output."""
    if node.name:
        return node.name
    out = next((o for o in node.output if o), "?")
    return f"{node.op_type}({out})"


# In the default domain only these ops carry graph attributes; other domains are searched attribute by attribute.
_OPS_WITH_SUBGRAPHS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    if node.op_type not in _OPS_WITH_SUBGRAPHS and node.domain in ("", "ai.onnx"):
        return []
    found = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append((attr.name, attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found += [(f"{attr.name}[{i}]", g) for i, g in enumerate(attr.graphs)]
    return found


def free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads from its enclosing scopes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.name for t in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for _, g in subgraphs(node):
            used |= free_names(g)
        defined.update(o for o in node.output if o)
    used.update(o.name for o in graph.output)
    return used - defined


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever is not in ``taken``; the name is added to ``taken``."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def all_names(graph: onnx.GraphProto, into: set[str]) -> set[str]:
    """Every value and node name in a graph and its subgraphs (new names must avoid all of them)."""
    into.update(i.name for i in graph.input)
    into.update(t.name for t in graph.initializer)
    into.update(o.name for o in graph.output)
    into.update(v.name for v in graph.value_info)
    for node in graph.node:
        into.update(node.input)
        into.update(node.output)
        into.add(node.name)
        for _, g in subgraphs(node):
            all_names(g, into)
    return into


class ModelContext:
    """What every graph of one model shares: opset, IR version, the set of taken names, lazy shape info."""

    def __init__(self, model: onnx.ModelProto, external: "ExternalData | None" = None):
        self.model = model
        # Serves main-graph initializers that stay in external files (lazily loaded models); folded values of
        # those are spilled to disk rather than held in memory.
        self.external = external
        self.ir_version = model.ir_version
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self._names: set[str] | None = None
        self.main_index: GraphIndex | None = None  # set by the main graph's GraphIndex, which knows its names
        self._shapes: dict[str, list[int | str | None]] | None = None
        # IR < 4 lists initializers as graph inputs too; they were read as constants (said in the report).
        self.used_initializer_inputs = False
        # New values of main-graph initializers, kept as arrays until saved or materialized: copying each folded
        # weight into the protobuf costs as much again as the fold (see io.write_streamed).
        self.replacements: dict[str, np.ndarray] = {}

    def unique_name(self, base: str) -> str:
        if self._names is None:  # built on first need: most folds rewrite tensors in place and name nothing
            self._names = self._taken_names()
        return unique_name(base, self._names)

    def _taken_names(self) -> set[str]:
        """What :func:`all_names` finds, taken from the main graph's index where it already holds the names."""
        main = self.main_index
        if main is None:
            return all_names(self.model.graph, set())
        graph = self.model.graph
        taken = set(main.producer)
        taken.update(main.consumers)
        taken.update(main.initializers)
        taken.update(main.inputs)
        taken.update(main.outputs)
        taken.update(main.removed_names)  # gone from the graph (committed or not): the old protobuf had them
        taken.update(main._dropped_values)
        taken.update(vi.name for vi in graph.value_info)
        taken.update(node.name for node in main.nodes)
        for body in main.bodies:
            all_names(body, taken)
        return taken

    def inferred_shapes(self) -> dict[str, list[int | str | None]]:
        """Shapes from ONNX shape inference, run once on a copy that leaves large tensors behind."""
        if self._shapes is None:
            self._shapes, self._types = _infer_shapes(self.model, self.external)
        return self._shapes

    def inferred_types(self) -> dict[str, int]:
        self.inferred_shapes()
        return self._types


def _shape_of(type_proto: onnx.TypeProto) -> list[int | str | None] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in type_proto.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _infer_shapes(model: onnx.ModelProto, external: "ExternalData | None" = None
                  ) -> tuple[dict[str, list[int | str | None]], dict[str, int]]:
    skeleton = onnx.ModelProto()
    skeleton.ir_version = max(model.ir_version, 4)
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g, src = skeleton.graph, model.graph
    g.node.extend(src.node)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    input_names = set()
    for i in src.input:
        input_names.add(i.name)
        g.input.append(i)
    for t in src.initializer:
        if math.prod(t.dims) <= 64 and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)  # small tensors (shapes, axes) drive inference
        elif math.prod(t.dims) <= 64 and external is not None:  # a small one left in a lazily read file
            g.initializer.append(numpy_helper.from_array(external.read(t), t.name))
        elif t.name not in input_names:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is a help, never a requirement
        return {}, {}
    shapes, types = {}, {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        shape = _shape_of(vi.type)
        if shape is not None:
            shapes[vi.name] = shape
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in src.initializer:
        shapes[t.name] = list(t.dims)
    return shapes, types


class GraphIndex:
    """Producers, consumers and constants of one graph; edits go through its methods."""

    def __init__(self, graph: onnx.GraphProto, ctx: ModelContext, parent: "GraphIndex | None" = None,
                 path: str = "", watch: frozenset[str] = frozenset()):
        self.graph = graph
        self.ctx = ctx
        self.parent = parent
        self.path = path
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self._removed_nodes: set[int] = set()
        self._removed_initializers: set[str] = set()
        self._dropped_values: set[str] = set()
        self._constants: dict[str, np.ndarray] = {}
        self._not_constant: dict[str, str] = {}  # name -> why it is not a compile-time constant
        self._runtime: set[str] = set()  # names whose value depends on a graph input
        self._local_shapes: _Annotations | None = None
        self.rewritten: set[str] = set()  # initializers given new values (invalidates prefetched math)
        # Input and output names of each node (by id), read once: reading them from the protobuf costs ~0.3 us a
        # name every time. Every edit goes through this class and keeps them current.
        self._inputs_of: dict[int, list[str]] = {}
        self._outputs_of: dict[int, list[str]] = {}
        self.bodies: list[onnx.GraphProto] = []  # subgraphs of this graph's nodes
        self.nodes_with_subgraphs: list[onnx.NodeProto] = []
        self.watched: list[onnx.NodeProto] = []  # default-domain nodes whose op is in ``watch``, in graph order
        self._watch = watch
        self.removed_names: set[str] = set()  # values that no longer exist (still not to be reused before commit)
        self._new_shapes: dict[str, tuple[int, ...]] = {}  # constants given a new shape: annotations follow at commit
        self._index(graph)
        if parent is None:
            ctx.main_index = self

    # ---- building --------------------------------------------------------------------------------------
    def _index(self, graph: onnx.GraphProto) -> None:
        known = set(self.inputs) | set(self.initializers) | {t.name for t in graph.sparse_initializer}
        consumers, producer, initializers, inputs_ = self.consumers, self.producer, self.initializers, self.inputs
        # Values that depend on a run-time input, found in the same pass: asking whether they are constant then
        # costs one lookup. (Shape reads only a shape and CastLike's second input only a dtype: not counted.)
        runtime = self._runtime
        runtime.update(n for n in inputs_ if n not in initializers or self.ctx.ir_version >= 4)
        parent_runtime = self.parent._is_runtime if self.parent is not None else (lambda _name: False)
        inputs_of, outputs_of = self._inputs_of, self._outputs_of
        watch, watched = self._watch, self.watched
        for node in self.nodes:
            op = node.op_type
            inputs = inputs_of[id(node)] = node.input[:]  # a list; slicing reads a repeated field fastest
            outputs = outputs_of[id(node)] = node.output[:]
            default_domain = node.domain in ("", "ai.onnx")
            if op in watch and default_domain:
                watched.append(node)
            if op in _NONDETERMINISTIC:
                runtime.update(outputs)
            elif default_domain and op != "Shape":
                for n in (inputs[:1] if op == "CastLike" else inputs):
                    if n in runtime or (n and n not in known and parent_runtime(n)):
                        runtime.update(outputs)
                        break
            for name in inputs:
                if name:
                    if name not in known and not self._outer_defines(name):
                        where = f" in subgraph {self.path}" if self.path else ""
                        raise InputError(f"invalid graph{where}: node {node_label(node)} reads '{name}', which is "
                                         "not defined before it (dangling input or a cycle)")
                    consumers[name].append(node)
            if (op in _OPS_WITH_SUBGRAPHS or not default_domain) and node.attribute:
                found = subgraphs(node)
                if found:
                    self.nodes_with_subgraphs.append(node)
                for _, g in found:
                    self.bodies.append(g)
                    for name in free_names(g):
                        if name in known or self._outer_defines(name):
                            consumers[name].append(node)
            for name in outputs:
                if name:
                    if name in known and (name in producer or name in initializers or name in inputs_):
                        raise InputError(f"invalid graph: '{name}' is defined twice (second time by "
                                         f"{node_label(node)})")
                    producer[name] = node
                    known.add(name)
        for name in self.outputs:
            if name not in known and not self._outer_defines(name):
                raise InputError(f"invalid graph: graph output '{name}' is never computed")

    def _is_runtime(self, name: str) -> bool:
        g = self
        while g is not None:
            if name in g._runtime:
                return True
            if name in g.producer or name in g.initializers:
                return False
            g = g.parent
        return False

    def _outer_defines(self, name: str) -> bool:
        p = self.parent
        while p is not None:
            if name in p.producer or name in p.initializers or name in p.inputs:
                return True
            p = p.parent
        return False

    # ---- queries ---------------------------------------------------------------------------------------
    def inputs_of(self, node: onnx.NodeProto) -> list[str]:
        """``list(node.input)``, cached (do not modify it)."""
        return self._inputs_of[id(node)]

    def outputs_of(self, node: onnx.NodeProto) -> list[str]:
        """``list(node.output)``, cached (do not modify it)."""
        return self._outputs_of[id(node)]

    def is_removed(self, node: onnx.NodeProto) -> bool:
        return id(node) in self._removed_nodes

    def only_consumer(self, name: str, node: onnx.NodeProto) -> bool:
        """True when ``node`` is the one reader of ``name`` and it is not a graph output."""
        users = self.consumers.get(name, [])
        return name not in self.outputs and len(users) == 1 and users[0] is node

    def usage(self, name: str) -> str:
        """Why a value can not be rewritten: who else reads it."""
        if name in self.outputs:
            return f"'{name}' is a graph output"
        users = self.consumers.get(name, [])
        return f"'{name}' has {len(users)} consumers ({', '.join(node_label(u) for u in users[:3])})"

    def is_overridable_input(self, name: str) -> bool:
        return name in self.inputs and self.ctx.ir_version >= 4

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
        if not default_domain or op in _NONDETERMINISTIC or op in _OPS_WITH_SUBGRAPHS:
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
            if value.size > _MAX_EVAL_ELEMENTS:
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

    def rank(self, name: str) -> int | None:
        shape = self.static_shape(name, allow_symbolic=True)
        return None if shape is None else len(shape)

    def static_shape(self, name: str, allow_symbolic: bool = False) -> list | None:
        """The shape of a value from type annotations or shape inference; symbolic dims as strings/None."""
        if name in self.initializers:
            return list(self.initializers[name].dims)
        shape = self._annotated_shapes().get(name)
        if shape is None and self.parent is None:
            shape = self.ctx.inferred_shapes().get(name)
        if shape is None:
            return None
        if not allow_symbolic and not all(isinstance(d, int) for d in shape):
            return None
        return shape

    def known_shape(self, name: str) -> list | None:
        """The shape of a value if annotated, an initializer's, or already inferred: never runs inference."""
        if name in self.initializers:
            return list(self.initializers[name].dims)
        shape = self._annotated_shapes().get(name)
        if shape is None and self.parent is None and self.ctx._shapes is not None:
            shape = self.ctx._shapes.get(name)
        return shape

    def _annotated_shapes(self) -> "_Annotations":
        if self._local_shapes is None:
            self._local_shapes = _Annotations(self.graph)
        return self._local_shapes

    def elem_type(self, name: str) -> int | None:
        if name in self.initializers:
            return self.initializers[name].data_type
        annotations = self._annotated_shapes()
        if annotations.annotates(name):
            return annotations.elem_type(name)
        if self.parent is not None:
            return self.parent.elem_type(name)
        return self.ctx.inferred_types().get(name)

    # ---- edits -------------------------------------------------------------------------------------------
    def write_tensor(self, node: onnx.NodeProto, slot: int, value: np.ndarray, base_name: str | None = None) -> str:
        """Give ``node``'s input ``slot`` the value ``value``.

        The initializer is rewritten in place when this node is its only reader; otherwise (shared weight,
        Constant node, computed or outer-scope constant, missing optional input) a new initializer is made for
        this node and every other reader keeps the original.
        """
        cached = self._inputs_of[id(node)]
        old = cached[slot] if slot < len(cached) else ""
        tensor = self.initializers.get(old) if old else None
        external = tensor is not None and tensor.data_location == onnx.TensorProto.EXTERNAL
        if tensor is not None and self.only_consumer(old, node) and old not in self.inputs \
                and (not external or self._serves_external()):
            value = np.ascontiguousarray(value)
            self.rewritten.add(old)
            same_layout = RAW_FLOAT_DTYPES.get(tensor.data_type) == value.dtype and tuple(tensor.dims) == value.shape
            if external and tuple(tensor.dims) == value.shape and \
                    onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type) == value.dtype:
                self.ctx.replacements[old] = self.ctx.external.spill(value)  # written out when the model is saved
            elif same_layout and tensor.HasField("raw_data"):
                if self.parent is None:  # same dtype and shape: the bytes are swapped when saved
                    self.ctx.replacements[old] = value
                else:
                    tensor.raw_data = value.tobytes()
            else:
                if self.parent is None:  # a value pending from an earlier fold is superseded, not written later
                    self.ctx.replacements.pop(old, None)
                new = numpy_helper.from_array(value, old)
                if new.data_type != tensor.data_type:
                    raise AssertionError("folding must keep the tensor's dtype")
                doc = tensor.doc_string if tensor.HasField("doc_string") else None
                tensor.CopyFrom(new)
                if doc is not None:  # an unset doc_string stays unset (set-but-empty is serialized)
                    tensor.doc_string = doc
            self._constants.pop(old, None)
            return old
        dropped = False
        if tensor is None and old in self.producer and self.only_consumer(old, node) and base_name is None:
            # A computed constant read only here (an exporter's zero-bias chain): once its producers are gone the
            # value keeps its name as an initializer. No new name, and the node's inputs stay as they were.
            self.drop_use(old, node)
            dropped = True
            if old not in self.producer and not self.consumers.get(old):
                self._constants.pop(old, None)
                self._not_constant.pop(old, None)
                self._runtime.discard(old)
                self.rewritten.add(old)
                self.add_initializer(value, old, exact=True)
                self.consumers[old].append(node)
                return old
        name = self.add_initializer(value, base_name or (f"{old}_bnfold" if old else f"{node_label(node)}_bias"))
        while len(node.input) <= slot:
            node.input.append("")
            cached.append("")
        node.input[slot] = cached[slot] = name
        self.consumers[name].append(node)
        if old and not dropped:
            self.drop_use(old, node)
        return name

    def add_initializer(self, value: np.ndarray, base_name: str, exact: bool = False) -> str:
        """A new initializer named ``base_name`` made unique (``exact``: a name known to be free)."""
        name = base_name if exact else self.ctx.unique_name(base_name)
        tensor = self.graph.initializer.add()  # filled in place: appending a finished tensor would copy it
        fill_tensor(tensor, value, name)
        self.initializers[name] = tensor
        if self.ctx.ir_version < 4:  # below IR 4 every initializer must also be a graph input
            self.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(value.shape)))
            self.inputs.add(name)
        return name

    def turn_into_add(self, node: onnx.NodeProto, x: str, bias: np.ndarray) -> None:
        """Rewrite ``node`` in place as ``Add(x, bias)``, keeping its name, output and position."""
        old_inputs = [n for n in node.input if n]
        name = self.add_initializer(bias, f"{node_label(node)}_bias")
        del node.input[:]
        node.input.extend([x, name])
        self._inputs_of[id(node)] = [x, name]
        del node.attribute[:]
        node.op_type, node.domain = "Add", ""
        for old in set(old_inputs):
            self.drop_use(old, node)
        self.consumers[x].append(node)
        self.consumers[name].append(node)

    def rename_input(self, node: onnx.NodeProto, old: str, new: str) -> None:
        cached = self._inputs_of[id(node)]
        for i, name in enumerate(cached):
            if name == old:
                node.input[i] = cached[i] = new
        self.drop_use(old, node)
        self.consumers[new].append(node)

    def move_output(self, node: onnx.NodeProto, new_name: str) -> None:
        """``node`` now produces ``new_name`` (a value whose producer was removed); its old output goes away."""
        cached = self._outputs_of[id(node)]
        old = cached[0]
        node.output[0] = cached[0] = new_name
        self.producer.pop(old, None)
        self.producer[new_name] = node
        self.consumers.pop(old, None)
        self._dropped_values.add(old)

    def remove_node(self, node: onnx.NodeProto) -> None:
        """Remove a node whose outputs nobody reads any more; constants it alone used go with it."""
        self._removed_nodes.add(id(node))
        producer = self.producer
        for name in self._outputs_of[id(node)]:
            if producer.get(name) is node:
                del producer[name]
                self._dropped_values.add(name)
        for name in dict.fromkeys(self._inputs_of[id(node)]):  # each input once, in order
            if name:
                self.drop_use(name, node)

    def drop_use(self, name: str, node: onnx.NodeProto) -> None:
        """``node`` no longer reads ``name``; a constant nobody reads any more is removed."""
        users = self.consumers.get(name)
        if users:
            if len(users) == 1:
                if users[0] is node:
                    users.clear()
            else:
                users[:] = [u for u in users if u is not node]
            if users:
                return
        if name in self.outputs:
            return
        if name in self.initializers:
            if name not in self.inputs or self.ctx.ir_version < 4:
                self._removed_initializers.add(name)
                self._constants.pop(name, None)
            return
        producer = self.producer.get(name)
        if producer is None or name not in self._constants or not _is_pure_constant_producer(producer):
            return
        for out in self._outputs_of[id(producer)]:
            if out and (self.consumers.get(out) or out in self.outputs):
                return
        self.remove_node(producer)

    def reshape_annotation(self, name: str, shape: tuple[int, ...]) -> None:
        """``name`` (a constant) now has ``shape``: its value_info and graph-input declarations follow at commit."""
        self._new_shapes[name] = tuple(shape)

    def commit(self) -> None:
        """Apply recorded removals to the protobuf, each repeated field rewritten at most once."""
        if self._new_shapes:
            new_shapes = self._new_shapes
            for info in itertools.chain(self.graph.value_info, self.graph.input):
                shape = new_shapes.get(info.name)
                if shape is not None and info.type.HasField("tensor_type"):
                    dims = info.type.tensor_type.shape.dim
                    del dims[:]
                    for d in shape:
                        dims.add().dim_value = d
            self._new_shapes = {}
            self._local_shapes = None
        if self._removed_nodes:
            keep_positions = [i for i, n in enumerate(self.nodes) if id(n) not in self._removed_nodes]
            _delete_positions(self.graph.node, len(self.nodes), keep_positions)
            self.nodes = [self.nodes[i] for i in keep_positions]
            self._removed_nodes.clear()
        if self._removed_initializers:
            gone = self._removed_initializers
            if len(self.initializers) == len(self.graph.initializer):  # the dict is in graph order: no names read
                _delete_runs(self.graph.initializer, [i for i, name in enumerate(self.initializers) if name in gone])
            else:  # duplicate initializer names (an invalid model): look at each
                _delete_where(self.graph.initializer, lambda t: t.name in gone)
            if self.ctx.ir_version < 4:
                _delete_where(self.graph.input, lambda i: i.name in gone)
                self.inputs -= gone
            for name in gone:
                self.initializers.pop(name, None)
                if self.parent is None:
                    self.ctx.replacements.pop(name, None)
            self._dropped_values |= gone
            self._removed_initializers = set()
        if self._dropped_values:
            dropped = self._dropped_values
            annotations = self._local_shapes
            if annotations is None or not annotations.names().isdisjoint(dropped):
                _delete_where(self.graph.value_info, lambda v: v.name in dropped)
            self.removed_names |= dropped
            self._dropped_values = set()
            self._local_shapes = None


@functools.lru_cache(maxsize=None)
def _dtype_stand_in(elem_type: int) -> np.ndarray:
    """A read-only zero scalar of an ONNX element type (all a CastLike's second input contributes)."""
    value = np.zeros((), dtype=onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    value.flags.writeable = False
    return value


class _Annotations:
    """Shapes and element types annotated in one graph (inputs, outputs, value_info), each parsed on first lookup:
    a fold asks for a few of them, and parsing every annotation of an exported model cost more than the fold.

    Where a name is annotated twice the last shape and the first tensor type count."""

    __slots__ = ("_graph", "_last", "_first", "_shapes", "_types")

    def __init__(self, graph: onnx.GraphProto):
        last: dict[str, onnx.ValueInfoProto] = {}
        first: dict[str, onnx.ValueInfoProto] = {}
        for field in (graph.input, graph.output, graph.value_info):
            for vi in field:
                name = vi.name
                last[name] = vi
                if name not in first:
                    first[name] = vi
        self._graph, self._last, self._first, self._shapes, self._types = graph, last, first, {}, {}

    def names(self):
        """Every annotated name (a view)."""
        return self._last.keys()

    def get(self, name: str) -> list | None:
        """The annotated shape of ``name`` (symbolic dims as strings/None), or None."""
        try:
            return self._shapes[name]
        except KeyError:
            vi = self._last.get(name)
            shape = None if vi is None else _shape_of(vi.type)
            self._shapes[name] = shape
            return shape

    def annotates(self, name: str) -> bool:
        """Whether ``name`` has a tensor-type annotation here."""
        vi = self._first.get(name)
        if vi is None:
            return False
        if vi.type.HasField("tensor_type"):
            return True
        for field in (self._graph.input, self._graph.output, self._graph.value_info):  # rare: a later one may
            for other in field:
                if other.name == name and other.type.HasField("tensor_type"):
                    self._first[name] = other
                    return True
        self._first.pop(name)
        return False

    def elem_type(self, name: str) -> int | None:
        try:
            return self._types[name]
        except KeyError:
            elem = self._first[name].type.tensor_type.elem_type or None
            self._types[name] = elem
            return elem


class _ShapeOnly:
    """Stands in for an input of which Shape reads only the shape."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape

    def array(self) -> np.ndarray:
        return np.broadcast_to(np.zeros((), dtype=np.float32), self.shape)


def _is_pure_constant_producer(node: onnx.NodeProto) -> bool:
    # in the default domain only _OPS_WITH_SUBGRAPHS carry graphs (see subgraphs())
    op = node.op_type
    return op not in _NONDETERMINISTIC and op not in _OPS_WITH_SUBGRAPHS and node.domain in ("", "ai.onnx")


def _delete_positions(field, length: int, keep_positions: list[int]) -> None:
    keep = set(keep_positions)
    _delete_runs(field, [i for i in range(length) if i not in keep])


def _delete_where(field, predicate) -> None:
    _delete_runs(field, [i for i, item in enumerate(field) if predicate(item)])


def _delete_runs(field, positions: list[int]) -> None:
    """Delete sorted positions from a repeated field, back to front, one slice per contiguous run."""
    end = len(positions)
    while end:
        start = end - 1
        while start and positions[start - 1] == positions[start] - 1:
            start -= 1
        del field[positions[start]:positions[end - 1] + 1]
        end = start


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, or None for attributes that hold no numeric tensor (strings, sparse)."""
    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            return tensor_to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def get_attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return attribute_value(attr)
    return default


def get_attrs(node: onnx.NodeProto, **defaults) -> dict:
    """Several attributes in one pass over the node's attributes: ``{name: value or its default}``."""
    found = dict(defaults)
    pending = set(defaults)
    for attr in node.attribute:
        name = attr.name
        if name in pending:  # the first of a name counts, as in get_attr
            found[name] = attribute_value(attr)
            pending.discard(name)
    return found


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))
