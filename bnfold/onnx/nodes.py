"""Reading nodes and graphs: labels, attributes, subgraphs, and the names a graph defines or reads."""

from __future__ import annotations

import onnx

from .constant_ops import attribute_value


def node_label(node: onnx.NodeProto) -> str:
    """A readable, stable identifier: the node's name, or its op type and first output."""
    if node.name:
        return node.name
    out = next((o for o in node.output if o), "?")
    return f"{node.op_type}({out})"


# In the default domain only these ops carry graph attributes; other domains are searched attribute by attribute.
OPS_WITH_SUBGRAPHS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    if node.op_type not in OPS_WITH_SUBGRAPHS and node.domain in ("", "ai.onnx"):
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



def get_attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return attribute_value(attr)
    return default


def get_attrs(node: onnx.NodeProto, **defaults) -> dict:
    """Several attributes in one pass over the node's attributes: ``{name: value or its default}``."""
    found = defaults  # (a dict of its own: ``**`` builds a new one each call)
    pending = set(defaults)
    for attr in node.attribute:
        name = attr.name
        if name in pending:  # the first of a name counts, as in get_attr
            found[name] = attribute_value(attr)
            pending.discard(name)
            if not pending:  # (reading each attribute of a protobuf node costs; the rest are not asked for)
                break
    return found


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))
