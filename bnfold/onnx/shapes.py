"""Shapes and element types: annotations of a graph, ONNX shape inference of the model, and the index's
shape queries (a mixin of :class:`bnfold.onnx.graph.GraphIndex`)."""

from __future__ import annotations

import itertools
import math

import onnx
from onnx import numpy_helper

from .external import ExternalData


def shape_of(type_proto: onnx.TypeProto) -> list[int | str | None] | None:
    if not type_proto.HasField("tensor_type"):
        return None
    tensor_type = type_proto.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in tensor_type.shape.dim:
        value = d.dim_value
        if value or d.HasField("dim_value"):  # (a non-zero value is set: one read, not two, for the usual dim)
            dims.append(value)
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def infer_shapes(model: onnx.ModelProto, external: "ExternalData | None" = None
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
        shape = shape_of(vi.type)
        if shape is not None:
            shapes[vi.name] = shape
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in src.initializer:
        shapes[t.name] = list(t.dims)
    return shapes, types


def reshape_annotations(graph: onnx.GraphProto, new_shapes: "dict[str, tuple[int, ...]]") -> None:
    """Constants that were given a new shape: their value_info and graph-input declarations say so."""
    for info in itertools.chain(graph.value_info, graph.input):
        shape = new_shapes.get(info.name)
        if shape is not None and info.type.HasField("tensor_type"):
            dims = info.type.tensor_type.shape.dim
            del dims[:]
            for d in shape:
                dims.add().dim_value = d


class ShapeQueries:
    """Shape and element-type lookups of a :class:`~bnfold.onnx.graph.GraphIndex` (which provides ``graph``,
    ``ctx``, ``parent``, ``initializers`` and ``_local_shapes``)."""

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
        if shape is None and self.parent is None and self.ctx.shapes_if_inferred() is not None:
            shape = self.ctx.shapes_if_inferred().get(name)
        return shape

    def _annotated_shapes(self) -> "Annotations":
        if self._local_shapes is None:
            self._local_shapes = Annotations(self.graph)
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


class Annotations:
    """Shapes and element types annotated in one graph (inputs, outputs, value_info), each parsed on first lookup:
    a fold asks for a few of them, and parsing every annotation of an exported model cost more than the fold.

    Where a name is annotated twice the last shape and the first tensor type count."""

    __slots__ = ("_graph", "_last", "_first", "_shapes", "_types", "value_info_names")

    def __init__(self, graph: onnx.GraphProto):
        infos = [*graph.input, *graph.output, *graph.value_info]
        names = [vi.name for vi in infos]
        last = dict(zip(names, infos))  # (comprehensions: an exported model annotates every value)
        if len(last) == len(infos):
            first = last  # no name annotated twice (the usual case): the same annotations (annotates() copies
            # before it edits its own)
        else:
            first = {}
            for name, vi in zip(names, infos):
                first.setdefault(name, vi)
        self._graph, self._last, self._first, self._shapes, self._types = graph, last, first, {}, {}
        #: The names of ``graph.value_info`` in order, read once here: the index's commit (the one writer of
        #: value_info, which drops this object after) finds the annotations of removed values by position.
        self.value_info_names = names[len(infos) - len(graph.value_info):]

    def names(self):
        """Every annotated name (a view)."""
        return self._last.keys()

    def get(self, name: str) -> list | None:
        """The annotated shape of ``name`` (symbolic dims as strings/None), or None."""
        try:
            return self._shapes[name]
        except KeyError:
            vi = self._last.get(name)
            shape = None if vi is None else shape_of(vi.type)
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
                    self._own_first()[name] = other
                    return True
        self._own_first().pop(name)
        return False

    def _own_first(self) -> dict:
        if self._first is self._last:
            self._first = dict(self._last)
        return self._first

    def elem_type(self, name: str) -> int | None:
        try:
            return self._types[name]
        except KeyError:
            elem = self._first[name].type.tensor_type.elem_type or None
            self._types[name] = elem
            return elem

