"""A light, mutable index over one ONNX GraphProto: producers, consumers, guarded edits.

Works on the protobuf in place and touches only what a fold changes (the tensors it rewrites, the nodes it
removes), so folding a large model costs little more than loading and saving it. Removals are recorded and
applied once in :meth:`GraphIndex.commit`, because deleting from a protobuf repeated field is linear each time.

The index's other responsibilities live beside it: constant evaluation (:mod:`.constants`), shapes
(:mod:`.shapes`), tensor storage (:mod:`.tensors`) and node/graph reading (:mod:`.nodes`).
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import numpy as np
import onnx

from ..errors import InputError
from .constants import NONDETERMINISTIC, ConstantEvaluator, is_pure_constant_producer
from .external import ExternalData
from .nodes import OPS_WITH_SUBGRAPHS, all_names, free_names, node_label, subgraphs, unique_name
from .shapes import Annotations, ShapeQueries, infer_shapes, reshape_annotations
from .tensors import fill_tensor, store_value

# Helpers that moved out of this module in the split, still importable from here by code written before it.
from .nodes import get_attr, get_attrs, set_attr  # noqa: E402,F401
from .tensors import RAW_FLOAT_DTYPES, constant_node_value, tensor_to_array  # noqa: E402,F401


class ModelContext:
    """What every graph of one model shares: opset, IR version, the set of taken names, lazy shape info."""

    def __init__(self, model: onnx.ModelProto, external: "ExternalData | None" = None, defer_writes: bool = True):
        self.model = model
        # Serves main-graph initializers that stay in external files (lazily loaded models); folded values of
        # those are spilled to disk rather than held in memory.
        self.external = external
        self.ir_version = model.ir_version
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self._names: set[str] | None = None
        # The main graph's index, which knows its names; weak, so that the context holds no cycle to break.
        self._main_index: "weakref.ReferenceType[GraphIndex] | None" = None
        self._shapes: dict[str, list[int | str | None]] | None = None
        # IR < 4 lists initializers as graph inputs too; they were read as constants (said in the report).
        self.used_initializer_inputs = False
        # New values of main-graph initializers, kept as arrays until saved or materialized: copying each folded
        # weight into the protobuf costs as much again as the fold (see io.write_streamed).
        self.replacements: dict[str, np.ndarray] = {}
        # False: a folded value is written into its tensor at once (the caller wants the protobuf folded, nothing
        # is saved from the arrays), which spares the pending table and a second walk over the tensors.
        self.defer_writes = defer_writes or external is not None
        # Set by the pass when merge rules run: written tensors then keep their float64 values (exact_wanted).
        self.merging = False

    def exact_wanted(self, dtype: np.dtype) -> bool:
        """Whether a tensor of ``dtype`` written now keeps its float64 value (before the cast) for the merges.

        A merge sums or composes weights that folds already rounded; rounding that result again is a second
        rounding. In float32 that is about an ulp, inside verification noise, and keeping a float64 copy of every
        folded weight would double the fold's memory; in the 16-bit floats (float16, bfloat16) it is not (the
        fuzz soak found an fp16 model out of tolerance). So: narrower than float32, and only while merging."""
        return self.merging and dtype.itemsize < 4

    def unique_name(self, base: str) -> str:
        if self._names is None:  # built on first need: most folds rewrite tensors in place and name nothing
            self._names = self._taken_names()
        return unique_name(base, self._names)

    def _taken_names(self) -> set[str]:
        """What :func:`all_names` finds, taken from the main graph's index where it already holds the names."""
        main = self._main_index() if self._main_index is not None else None
        if main is None:
            return all_names(self.model.graph, set())
        taken = set(main.producer)
        taken.update(main.consumers)
        taken.update(main.initializers)
        taken.update(main.inputs)
        taken.update(main.outputs)
        taken.update(main.removed_names)  # gone from the graph (committed or not): the old protobuf had them
        taken.update(main._dropped_values)
        taken.update(main.value_info_names())
        taken.update([node.name for node in main.nodes])
        for body in main.bodies:
            all_names(body, taken)
        return taken

    def inferred_shapes(self) -> dict[str, list[int | str | None]]:
        """Shapes from ONNX shape inference, run once on a copy that leaves large tensors behind."""
        if self._shapes is None:
            self._shapes, self._types = infer_shapes(self.model, self.external)
        return self._shapes

    def inferred_types(self) -> dict[str, int]:
        self.inferred_shapes()
        return self._types

    def shapes_if_inferred(self) -> "dict[str, list[int | str | None]] | None":
        """The inferred shapes when inference already ran, else None (never runs it)."""
        return self._shapes

    def set_main_index(self, index: "GraphIndex") -> None:
        self._main_index = weakref.ref(index)


class GraphIndex(ConstantEvaluator, ShapeQueries):
    """Producers, consumers and constants of one graph; edits go through its methods."""

    def __init__(self, graph: onnx.GraphProto, ctx: ModelContext, parent: "GraphIndex | None" = None,
                 path: str = "", watch: frozenset[str] = frozenset(), exact: "dict[str, np.ndarray] | None" = None):
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
        self._local_shapes: Annotations | None = None
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
        self._new_shapes: dict[str, tuple[int, ...]] = {}  # constants rewritten with a new shape (a branch merge)
        # The float64 values of tensors written in this graph (ModelContext.exact_wanted), by name; a graph's own
        # table because sibling subgraphs may use the same names. A new index of the same graph takes it over.
        self.exact: dict[str, np.ndarray] = {} if exact is None else exact
        self._index(graph)
        if parent is None:
            ctx.set_main_index(self)

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
            if op in NONDETERMINISTIC:
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
            if (op in OPS_WITH_SUBGRAPHS or not default_domain) and node.attribute:
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

    def exact_value(self, name: str) -> np.ndarray | None:
        """The float64 value that the tensor ``name`` holds rounded (a fold or merge wrote it), else None. A name
        this graph does not define is looked up in the enclosing graphs."""
        g = self
        while g is not None:
            value = g.exact.get(name)
            if value is not None or name in g.initializers or name in g.producer or name in g.inputs:
                return value
            g = g.parent
        return None

    def set_exact(self, name: str, value: np.ndarray | None) -> None:
        """Record (or, with None, forget) the float64 value of the tensor ``name`` just written."""
        if value is None:
            if self.exact:
                self.exact.pop(name, None)
        else:
            self.exact[name] = value

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
            self.rewritten.add(old)
            dims = tuple(tensor.dims[:])  # (a slice reads a repeated field faster than iterating it)
            if dims != value.shape:  # its annotations (value_info, graph input) follow at commit
                self._new_shapes[old] = value.shape
            store_value(tensor, np.ascontiguousarray(value),
                        self.ctx.replacements if self.parent is None and self.ctx.defer_writes else None,
                        self.ctx.external, name=old, dims=dims, in_file=external)
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
                if self.exact:
                    self.exact.pop(name, None)
            return
        producer = self.producer.get(name)
        if producer is None or name not in self._constants or not is_pure_constant_producer(producer):
            return
        for out in self._outputs_of[id(producer)]:
            if out and (self.consumers.get(out) or out in self.outputs):
                return
        self.remove_node(producer)

    def value_info_names(self) -> list[str]:
        """The names of the graph's value_info, in order: those the shape annotations read, when a lookup has
        built them (value_info changes only at commit, which drops them), else read now."""
        if self._local_shapes is not None:
            return self._local_shapes.value_info_names
        return [vi.name for vi in self.graph.value_info]

    def commit(self) -> None:
        """Apply recorded removals to the protobuf, each repeated field rewritten at most once."""
        if self._new_shapes:
            reshape_annotations(self.graph, self._new_shapes)
            self._new_shapes = {}
            self._local_shapes = None
        if self._removed_nodes:
            removed = self._removed_nodes
            _delete_runs(self.graph.node, [i for i, n in enumerate(self.nodes) if id(n) in removed])
            self.nodes = [n for n in self.nodes if id(n) not in removed]
            removed.clear()
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
                _delete_runs(self.graph.value_info,
                             [i for i, name in enumerate(self.value_info_names()) if name in dropped])
            self.removed_names |= dropped
            self._dropped_values = set()
            self._local_shapes = None



def _delete_where(field, predicate) -> None:
    _delete_runs(field, [i for i, item in enumerate(field) if predicate(item)])


def _delete_runs(field, positions: list[int]) -> None:
    """Delete sorted positions from a repeated field, back to front, one slice per contiguous run."""
    if not positions:
        return
    start = positions[-1]
    end = start + 1  # the run [start, end) grows downwards while positions are consecutive
    for position in reversed(positions):
        if position < start - 1:
            del field[start:end]
            end = position + 1
        start = position
    del field[start:end]
