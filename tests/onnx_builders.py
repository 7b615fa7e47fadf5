"""Small ONNX model builders and the equivalence check shared by the fold tests.

The check compares the folded model with the float64 reference interpreter (tests/reference.py) run on the
ORIGINAL model, never with bnfold itself.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

try:  # tests/ on sys.path (rootdir-less "prepend" import mode)
    from reference import run_reference
except ImportError:  # pragma: no cover - tests/ is a package
    from tests.reference import run_reference

import bnfold

BF16 = np.dtype(ml_dtypes.bfloat16)
ELEM = {
    np.dtype(np.float32): TP.FLOAT,
    np.dtype(np.float16): TP.FLOAT16,
    np.dtype(np.float64): TP.DOUBLE,
    BF16: TP.BFLOAT16,
}
# Largest error allowed, relative to the largest |expected| value (at least 1).
TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10, np.dtype(np.float16): 1e-2, BF16: 3e-2}


def elem(dtype) -> int:
    return ELEM[np.dtype(dtype)]


def bn_stats(rng: np.random.Generator, channels: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Realistic inference statistics: gamma U(0.5,1.5), beta N(0,0.3), mean N(0,0.5), var U(0.2,3)."""
    return {
        "scale": rng.uniform(0.5, 1.5, channels).astype(dtype),
        "bias": rng.normal(0.0, 0.3, channels).astype(dtype),
        "mean": rng.normal(0.0, 0.5, channels).astype(dtype),
        "var": rng.uniform(0.2, 3.0, channels).astype(dtype),
    }


class Net:
    """A tiny graph builder: ``net.node(...)``, ``net.init(...)``, ``net.bn(...)``, then ``net.model()``."""

    def __init__(self, dtype=np.float32, seed: int = 0, opset: int = 15, ir: int | None = None):
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.ir = ir
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}{self._n}"

    def input(self, name: str, shape, dtype=None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem(dtype or self.dtype), shape))
        return name

    def output(self, name: str, shape=None, dtype=None) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem(dtype or self.dtype), shape))
        return name

    def init(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, name: str, shape, dtype=None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        value = self.rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        return self.init(name, value.astype(dtype or self.dtype))

    def node(self, op: str, inputs, outputs=None, **attrs) -> str:
        if outputs is None:
            outputs = [self.fresh(op.lower())]
        elif isinstance(outputs, str):
            outputs = [outputs]
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), **attrs))
        return outputs[0]

    def constant(self, value, name: str | None = None) -> str:
        return self.node("Constant", [], name or self.fresh("const"),
                         value=numpy_helper.from_array(np.asarray(value)))

    def bn(self, x: str, channels: int, y: str | None = None, *, dtype=None, params: str = "init",
           stats: dict | None = None, **attrs) -> str:
        """BatchNormalization over ``channels``; ``params``: "init" (initializers) or "const" (Constant nodes)."""
        stats = stats or bn_stats(self.rng, channels, dtype or self.dtype)
        names = []
        for role in ("scale", "bias", "mean", "var"):
            value = np.asarray(stats[role]).astype(dtype or self.dtype)
            base = self.fresh(f"bn_{role}")
            names.append(self.init(base, value) if params == "init" else self.constant(value, base))
        return self.node("BatchNormalization", [x] + names, y, **attrs)

    def conv(self, x: str, c_in: int, c_out: int, kernel, *, group: int = 1, bias: bool = True,
             op: str = "Conv", **attrs) -> str:
        if op == "Conv":
            w = self.weight(self.fresh("W"), [c_out, c_in // group, *kernel])
        else:  # ConvTranspose: [C_in, C_out/group, k...]
            w = self.weight(self.fresh("W"), [c_in, c_out // group, *kernel])
        inputs = [x, w]
        if bias:
            inputs.append(self.init(self.fresh("B"), (0.3 * self.rng.standard_normal(c_out)).astype(self.dtype)))
        if group != 1:
            attrs["group"] = group
        return self.node(op, inputs, **attrs)

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = self.ir if self.ir is not None else max(8, helper.find_min_ir_version_for(opsets))
        _fill_output_shapes(model)
        return model


def _fill_output_shapes(model: onnx.ModelProto) -> None:
    """Graph outputs declared without a shape get the inferred one (the full checker wants a shape)."""
    missing = [o for o in model.graph.output if not o.type.tensor_type.HasField("shape")]
    if not missing:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.ir_version = max(probe.ir_version, 8)  # IR 3 would want initializers listed as inputs first
    inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False)
    found = {v.name: v for v in list(inferred.graph.output) + list(inferred.graph.value_info)}
    for o in missing:
        v = found.get(o.name)
        if v is not None and v.type.tensor_type.HasField("shape"):
            o.type.tensor_type.shape.CopyFrom(v.type.tensor_type.shape)


# ---------------------------------------------------------------------------------------------- running models


def _np_dtype(elem_type: int):
    return BF16 if elem_type == TP.BFLOAT16 else helper.tensor_dtype_to_np_dtype(elem_type)


def random_feeds(model: onnx.ModelProto, seed: int = 0, **overrides) -> dict[str, np.ndarray]:
    """Seeded standard-normal feeds for every graph input that is not an initializer."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if vi.name in overrides:
            feeds[vi.name] = overrides[vi.name]
            continue
        t = vi.type.tensor_type
        shape = [d.dim_value for d in t.shape.dim]
        dtype = _np_dtype(t.elem_type)
        if dtype == np.bool_:
            feeds[vi.name] = np.array(rng.integers(0, 2) == 1)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_ort(model: onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    """onnxruntime CPU with every graph optimization disabled; outputs upcast to float64."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return {n: np.asarray(v, dtype=np.float64) for n, v in zip(names, sess.run(None, feeds))}


def run_ref(model: onnx.ModelProto, feeds) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float64) for k, v in run_reference(model, feeds).items()}


def assert_close(actual: dict, expected: dict, tol: float, original=None) -> None:
    """Every output within ``tol`` times its scale of the float64 reference. ``original``: a callable giving the
    ORIGINAL model's outputs run the same way; where the folded output misses the bar, the original's own error
    counts (twice it is allowed): an ill-conditioned model (a small output computed from large intermediate values)
    misses the float64 result in float32 before anything is folded, and a fold is judged against that noise."""
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    own = None
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
        err = float(np.max(np.abs(got - want))) if want.size else 0.0
        assert np.all(np.isfinite(got)), f"{name}: non-finite output"
        if err > tol * scale and original is not None:
            own = original() if own is None else own
            own_err = float(np.max(np.abs(np.asarray(own[name], dtype=np.float64) - want)))
            assert err <= 2 * own_err, (f"{name}: max abs error {err:.3g} > {tol:g} * {scale:.3g} and > twice the "
                                        f"original's own error {own_err:.3g}")
            continue
        assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


# ---------------------------------------------------------------------------------------------- model facts


def count_ops(graph: onnx.GraphProto, op_type: str = "BatchNormalization") -> int:
    total = 0
    for node in graph.node:
        total += node.op_type == op_type
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += count_ops(attr.g, op_type)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                total += sum(count_ops(g, op_type) for g in attr.graphs)
    return total


def _subgraphs(graph: onnx.GraphProto):
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
            elif attr.type == onnx.AttributeProto.GRAPHS:
                yield from attr.graphs


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
    for g in _subgraphs(graph):
        yield from _all_nodes(g)


def _all_initializer_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    for g in _subgraphs(graph):
        names |= _all_initializer_names(g)
    return names


def _used_names(graph: onnx.GraphProto, into: set[str]) -> set[str]:
    for node in graph.node:
        into.update(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _used_names(attr.g, into)
                into.update(o.name for o in attr.g.output)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _used_names(g, into)
                    into.update(o.name for o in g.output)
    into.update(o.name for o in graph.output)
    return into


def unused_initializers(model: onnx.ModelProto) -> list[str]:
    used = _used_names(model.graph, set())
    unused = [t.name for t in model.graph.initializer if t.name not in used]

    def sub(graph):
        for node in graph.node:
            for attr in node.attribute:
                graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for g in graphs:
                    inner = _used_names(g, set())
                    unused.extend(f"{node.name}/{t.name}" for t in g.initializer if t.name not in inner)
                    sub(g)
    sub(model.graph)
    return unused


def io_signature(model: onnx.ModelProto):
    """Graph inputs (not initializers) and outputs as (name, serialized type)."""
    inits = {t.name for t in model.graph.initializer}
    ins = [(i.name, i.type.SerializeToString()) for i in model.graph.input if i.name not in inits]
    outs = [(o.name, o.type.SerializeToString()) for o in model.graph.output]
    return ins, outs


# ---------------------------------------------------------------------------------------------- the check


def fold_and_check(model: onnx.ModelProto, *, bn_left: int = 0, rules=(), runner: str = "ort",
                   tol: float | None = None, feeds: dict | list | None = None, expected_model=None,
                   skip=(), check_unused: bool = True):
    """Fold ``model`` and assert everything bnfold promises about it; return ``(folded, report)``.

    * the input model is not modified; the folded one passes the full checker;
    * ``bn_left`` BatchNormalization nodes remain (report agrees), every rule in ``rules`` was used;
    * graph inputs/outputs keep their names and types, no BatchNormalization parameter is left behind as an
      initializer, and (``check_unused``) no initializer at all is left unused;
    * numerically: the folded model (onnxruntime CPU without graph optimizations, or the float64 reference when
      ``runner="ref"``) matches the float64 reference run of the ORIGINAL model (or ``expected_model``, a
      hand-made equivalent when the reference lacks an op of the original) on each of ``feeds``.
    """
    before = model.SerializeToString()
    folded, report = bnfold.fold_onnx(model, skip=skip)
    assert model.SerializeToString() == before, "fold_onnx modified its input"
    onnx.checker.check_model(folded, full_check=True)
    assert count_ops(folded.graph) == bn_left, report.summary_lines()
    assert report.bn_before == count_ops(model.graph)
    assert report.bn_after == bn_left
    used_rules = {f.rule for f in report.folded}
    for rule in rules:
        assert rule in used_rules, (rule, report.summary_lines())
    assert io_signature(folded) == io_signature(model)
    bn_params = {n for node in _all_nodes(model.graph) if node.op_type == "BatchNormalization"
                 for n in node.input[1:5]}
    unused = {name.rsplit("/", 1)[-1] for name in unused_initializers(folded)}
    assert not bn_params & unused, f"BatchNormalization parameters left unused: {sorted(bn_params & unused)}"
    if check_unused:
        assert unused_initializers(folded) == [], unused_initializers(folded)

    dtype = np.dtype(_np_dtype(model.graph.input[0].type.tensor_type.elem_type))
    tol = TOL.get(dtype, 1e-4) if tol is None else tol
    if feeds is None:
        feeds = [random_feeds(model, seed=1)]
    elif isinstance(feeds, dict):
        feeds = [feeds]
    for f in feeds:
        expected = run_ref(expected_model if expected_model is not None else model, f)
        actual = run_ort(folded, f) if runner == "ort" else run_ref(folded, f)
        assert_close(actual, expected, tol, original=(lambda f=f: run_ort(model, f)) if runner == "ort" else None)
    return folded, report


def refuse_and_check(model: onnx.ModelProto, reason: str, *, op_type: str = "BatchNormalization", skip=()):
    """Fold ``model``, expect nothing folded: the model is byte-identical and the skip reason contains
    ``reason`` (case-insensitive). Returns the report."""
    before = model.SerializeToString()
    folded, report = bnfold.fold_onnx(model, skip=skip)
    assert model.SerializeToString() == before
    assert report.folded == [], report.summary_lines()
    assert folded.SerializeToString() == before, "a refused fold changed the model"
    assert report.bn_after == report.bn_before == count_ops(model.graph)
    matching = [s for s in report.skipped if s.op_type == op_type and reason.lower() in s.reason.lower()]
    assert matching, (reason, report.summary_lines())
    return report


# ------------------------------------------------------------------------------------- verification test models


def conv_bn_chain(blocks: int, channels: int = 8, hw: int = 8, seed: int = 0, gain: float = 1.0) -> onnx.ModelProto:
    """x[1,C,hw,hw] -> blocks × (Conv 3x3 pad 1 -> BatchNormalization -> Relu) -> y. ``gain`` scales every Conv
    weight: above 1 the outputs grow with depth (to ~1e5 and beyond), where fixed tolerances fail correct folds."""
    net = Net(seed=seed, opset=17)
    x = net.input("x", [1, channels, hw, hw])
    for _ in range(blocks):
        conv = net.conv(x, channels, channels, [3, 3], pads=[1, 1, 1, 1])
        if gain != 1.0:
            w = net.inits[-2]
            w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(gain), w.name))
        x = net.node("Relu", [net.bn(conv, channels)])
    net.node("Identity", [x], "y")
    net.output("y", [1, channels, hw, hw])
    return net.model()


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _replace(model: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _initializer(copy, name).CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return copy


def _last_conv(model: onnx.ModelProto, index: int = -1) -> onnx.NodeProto:
    """The Conv with a constant weight and bias at ``index`` in graph order (default: the last one)."""
    names = {t.name for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and len(n.input) == 3
             and n.input[1] in names and n.input[2] in names]
    return convs[index]


def most_sensitive_channel(model: onnx.ModelProto, feeds, factor: float = 1 + 1e-3, conv: int = -1,
                           return_effects: bool = False):
    """The output channel of the last Conv whose scaling by ``factor`` moves the model's outputs most on
    ``feeds``. Scaling a channel's weight and bias scales that channel of the Conv's output, so one probe model
    (the Conv's output times a per-channel multiplier fed as an input) measures every channel in one session.
    A channel that a later Relu zeroes, or a ReLU6 saturates, hides any change; this picks one that does not."""
    conv = _last_conv(model, conv)
    channels = len(numpy_helper.to_array(_initializer(model, conv.input[2])))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    raw = conv.output[0] + "__probe_raw"
    for node in graph.node:
        if node.op_type == "Conv" and list(node.output) == list(conv.output):
            node.output[0] = raw
            break
    spatial = len(_initializer(model, conv.input[1]).dims) - 2  # broadcast [C, 1, ...] over [N, C, spatial...]
    shape = [channels] + [1] * spatial
    graph.input.append(helper.make_tensor_value_info("__probe_scale", TP.FLOAT, shape))
    graph.node.append(helper.make_node("Mul", [raw, "__probe_scale"], [conv.output[0]]))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    probe = _topological(probe)
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ones = np.ones(shape, np.float32)
    base = sess.run(None, {**feeds, "__probe_scale": ones})
    effects = []
    for c in range(channels):
        scale = ones.copy()
        scale[c] = factor
        out = sess.run(None, {**feeds, "__probe_scale": scale})
        effects.append(max(float(np.abs(o.astype(np.float64) - b).max()) for o, b in zip(out, base)))
    return int(np.argmax(effects)) if not return_effects else effects


def _topological(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes reordered so that every node comes after the producers of its inputs."""
    graph = model.graph
    known = {vi.name for vi in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError("graph has a cycle")
        for n in ready:
            ordered.append(n)
            known.update(n.output)
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.node[:]
    copy.graph.node.extend(ordered)
    return copy


def plant_channel_scale(folded: onnx.ModelProto, factor: float = 1 + 1e-3, channel: int = 0,
                        conv: int = -1) -> onnx.ModelProto:
    """A copy of ``folded`` with one output channel of a Conv (weight and bias; default the last) scaled by
    ``factor``."""
    conv = _last_conv(folded, conv)
    w = numpy_helper.to_array(_initializer(folded, conv.input[1])).astype(np.float64)
    b = numpy_helper.to_array(_initializer(folded, conv.input[2])).astype(np.float64)
    w[channel] *= factor
    b[channel] *= factor
    return _replace(_replace(folded, conv.input[1], w), conv.input[2], b)


def plant_bias_shift(folded: onnx.ModelProto, fraction: float = 0.01, channel: int = 0,
                     conv: int = -1) -> onnx.ModelProto:
    """A copy of ``folded`` with one bias of a Conv (default the last) shifted by ``fraction`` of its range."""
    conv = _last_conv(folded, conv)
    b = numpy_helper.to_array(_initializer(folded, conv.input[2])).astype(np.float64)
    b[channel] += fraction * (b.max() - b.min())
    return _replace(folded, conv.input[2], b)


def plant_channel_swap(folded: onnx.ModelProto, first: int = 0, second: int = 1,
                       conv: int = -1) -> onnx.ModelProto:
    """A copy of ``folded`` whose Conv (default the last) computes two output channels in each other's place."""
    conv = _last_conv(folded, conv)
    w = numpy_helper.to_array(_initializer(folded, conv.input[1])).astype(np.float64)
    b = numpy_helper.to_array(_initializer(folded, conv.input[2])).astype(np.float64)
    w[[first, second]] = w[[second, first]]
    b[[first, second]] = b[[second, first]]
    return _replace(_replace(folded, conv.input[1], w), conv.input[2], b)


def ort_basic_optimized(model: onnx.ModelProto, directory) -> onnx.ModelProto:
    """onnxruntime's own basic-level optimization of ``model`` (its Conv+BN fusion), as a model."""
    import os

    path = os.path.join(str(directory), "ort_basic.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = path
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(path)


# ---- a small model with external data (tests/test_external.py, tests/test_pipeline.py) -------------------------

def conv_chain(blocks: int = 4, channels: int = 16) -> onnx.ModelProto:
    """Conv -> BN -> Relu blocks, a Gemm -> BN head, and one weight shared by two Convs (copied, not changed)."""
    net = Net(seed=11)
    x = net.input("x", [1, channels, 5, 5])
    shared = net.weight("shared_w", [channels, channels, 1, 1])
    for _ in range(blocks):
        x = net.node("Relu", [net.bn(net.conv(x, channels, channels, [3, 3], pads=[1, 1, 1, 1]), channels)])
    a = net.bn(net.node("Conv", [x, shared]), channels)
    b = net.node("Conv", [x, shared])
    x = net.node("Add", [a, b])
    flat = net.node("Flatten", [x])
    w = net.weight("head_w", [8, channels * 25])
    y = net.bn(net.node("Gemm", [flat, w], transB=1), 8, "y")
    net.output(y, [1, 8])
    return net.model()


def save_external(model: onnx.ModelProto, path: Path, threshold: int = 1024) -> None:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".bin", size_threshold=threshold)


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()
