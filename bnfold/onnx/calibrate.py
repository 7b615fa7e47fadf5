"""Recompute the statistics of an ONNX model's BatchNormalization nodes from calibration data.

How: a private copy of the model is built in which every calibrated BN is replaced by its *training-mode*
computation from basic ops (per-channel batch mean and biased variance by ReduceMean over every axis but 1, then
``(x − μ_B)/sqrt(σ²_B + ε)·γ + β``), with the batch moments (and the shape of the BN input, for ``m``) exposed as
extra graph outputs. onnxruntime (CPU, graph optimizations disabled) runs it over the data in batches, so every
layer downstream of a BN sees batch-normalized activations exactly as in training. The per-batch moments go to
:mod:`bnfold.stats` (float64), and the estimates are written, cast once, into a copy of the original model.

float16 / bfloat16 activations: the replacement computation casts the BN input and parameters to float32 (to
float64 for double models) and casts the result back, so the moments are computed in float32; nothing is refused.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import stats
from ..errors import InputError, first_line
from .batchnorm import check_channels, check_parameter_lengths, inference_epsilon
from .graph import GraphIndex, ModelContext
from .nodes import free_names, node_label, subgraphs
from .plan import Refusal

__all__ = ["calibrate_onnx", "load_calibration_data"]

ESTIMATORS = ("unbiased", "ema")


# --------------------------------------------------------------------------------------------------- data loading

def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _load_file(path: Path) -> dict[str, np.ndarray]:
    try:
        # Our own handle: np.load leaks the one it opens when the archive turns out to be corrupt. The magic
        # bytes are checked first so that np.load never takes anything else for a pickle.
        with open(path, "rb") as f:
            magic = f.read(6)
            f.seek(0)
            if path.suffix == ".npy":
                if magic != b"\x93NUMPY":
                    raise InputError(f"{path}: not an .npy file")
                return {path.stem: np.load(f, allow_pickle=False)}
            if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
                raise InputError(f"{path}: not an .npz archive")
            with np.load(f, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise InputError(f"{path}: cannot read calibration data ({first_line(exc)})") from None


def load_calibration_data(path: str | os.PathLike, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The calibration data at ``path`` as ``{input name: array batched along axis 0}``, validated against
    ``model``'s real inputs (graph inputs that are not initializers).

    ``path`` is an ``.npz`` file with one array per input, or a directory of ``<input>.npy`` files and/or ``.npz``
    files (arrays of the same key in several ``.npz`` files are concatenated along axis 0, in file-name order).
    Pickled objects are never loaded. Any problem raises :class:`InputError` with one line.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".npy", ".npz"))
        if not files:
            raise InputError(f"{path}: directory holds no .npy or .npz files")
        parts: dict[str, list[np.ndarray]] = {}
        npy_names: set[str] = set()
        for f in files:
            loaded = _load_file(f)
            for key, value in loaded.items():
                if f.suffix == ".npy":
                    if key in parts:
                        raise InputError(f"{path}: input {key!r} is given by more than one file")
                    npy_names.add(key)
                elif key in npy_names:
                    raise InputError(f"{path}: input {key!r} is given by more than one file")
                parts.setdefault(key, []).append(value)
        data = {}
        for key, arrays in parts.items():
            if len(arrays) == 1:
                data[key] = arrays[0]
                continue
            if len({a.ndim for a in arrays}) != 1 or len({a.shape[1:] for a in arrays}) != 1 or arrays[0].ndim == 0:
                raise InputError(f"{path}: arrays for input {key!r} have shapes "
                                 f"{sorted({a.shape for a in arrays})} that cannot be concatenated along axis 0")
            data[key] = np.concatenate(arrays, axis=0)
    else:
        data = _load_file(path)
    _validate(data, model, str(path))
    return data


def _validate(data: dict[str, np.ndarray], model: onnx.ModelProto, where: str) -> None:
    inputs = _real_inputs(model)
    expected = [i.name for i in inputs]
    if not expected:
        raise InputError(f"{where}: the model has no inputs, so no data can be fed to it")
    missing = [n for n in expected if n not in data]
    extra = sorted(n for n in data if n not in expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unknown array(s) {', '.join(extra)}")
        raise InputError(f"{where}: {'; '.join(parts)} (the model's inputs are {', '.join(expected) or 'none'})")
    lengths = {}
    for vi in inputs:
        array = data[vi.name]
        if array.dtype.kind not in "fiub":
            raise InputError(f"{where}: input {vi.name!r} has unsupported dtype {array.dtype}")
        tensor_type = vi.type.tensor_type
        if tensor_type.elem_type:
            want = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
            want_float = want.kind == "f" or tensor_type.elem_type == TensorProto.BFLOAT16
            if want_float != (array.dtype.kind == "f"):
                raise InputError(f"{where}: input {vi.name!r} has dtype {array.dtype}, but the model expects "
                                 f"{'a float' if want_float else 'an integer'} type ({want})")
        if array.ndim == 0:
            raise InputError(f"{where}: input {vi.name!r} is a scalar; it needs a batch axis 0")
        if tensor_type.HasField("shape"):
            dims = tensor_type.shape.dim
            if len(dims) != array.ndim:
                raise InputError(f"{where}: input {vi.name!r} has rank {array.ndim} (shape {array.shape}), "
                                 f"but the model expects rank {len(dims)}")
            for axis, d in enumerate(dims):
                if axis and d.HasField("dim_value") and d.dim_value != array.shape[axis]:
                    raise InputError(f"{where}: input {vi.name!r} has size {array.shape[axis]} on axis {axis}, "
                                     f"but the model expects {d.dim_value}")
        lengths[vi.name] = array.shape[0]
    if len(set(lengths.values())) > 1:
        raise InputError(f"{where}: inputs have different numbers of samples along axis 0: "
                         + ", ".join(f"{k}={v}" for k, v in lengths.items()))
    if lengths and next(iter(lengths.values())) == 0:
        raise InputError(f"{where}: the calibration data holds no samples")


def _check_fixed_batch(model: onnx.ModelProto, data: dict[str, np.ndarray], batch_size: int) -> None:
    """An input with a fixed size on axis 0 takes only batches of exactly that many samples."""
    for vi in _real_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value"):
            continue
        fixed, samples = dims[0].dim_value, len(data[vi.name])
        sizes = ({batch_size} if samples >= batch_size else set()) | ({samples % batch_size} - {0})
        if sizes != {fixed}:
            if fixed == 0:
                raise InputError(f"input {vi.name!r} has size 0 on axis 0: the model takes no samples")
            raise InputError(f"input {vi.name!r} has a fixed batch size of {fixed} (axis 0), but {samples} samples "
                             f"in batches of {batch_size} give batches of {sorted(sizes)}: use batch size {fixed} "
                             f"and a multiple of {fixed} samples")


# ---------------------------------------------------------------------------------------------------- calibration

class _Target:
    """One BN node to calibrate and the names of its exposed batch moments."""

    def __init__(self, position: int, node: onnx.NodeProto, rank: int, epsilon: float):
        self.position = position
        self.node = node
        self.rank = rank
        self.epsilon = epsilon
        self.mean_out = self.var_out = self.shape_out = ""
        self.statistics = stats.BatchStatistics()
        self.ema_pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self.batches = 0
        self.values = 0


def _find_targets(model: onnx.ModelProto, notes: list[str]) -> list[_Target]:
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    overridable = {i.name for i in graph.input} & set(initializers)
    ctx = ModelContext(model)
    targets = []
    for position, node in enumerate(graph.node):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        label = node_label(node)
        epsilon = inference_epsilon(node, ctx.opset)  # the fold's reader: the same inference-mode checks
        if isinstance(epsilon, Refusal):
            notes.append(f"{label}: skipped, not an inference-mode BatchNormalization ({epsilon})")
            continue
        if any(name not in initializers or name in overridable for name in node.input[3:5]):
            notes.append(f"{label}: skipped, its mean/var are not constant initializers")
            continue
        lengths = [math.prod(initializers[name].dims) for name in node.input[1:5] if name in initializers]
        check_parameter_lengths(label, lengths)
        channels = lengths[0]
        shape = ctx.inferred_shapes().get(node.input[0])
        check_channels(label, channels, shape)
        if channels == 0:
            notes.append(f"{label}: skipped, it has no channels")
            continue
        if shape is None or len(shape) < 2:
            notes.append(f"{label}: skipped, the rank of its input is unknown")
            continue
        targets.append(_Target(position, node, len(shape), epsilon))
    for node in graph.node:
        for _, g in subgraphs(node):
            if any(n.op_type == "BatchNormalization" for n in g.node):
                notes.append(f"{node_label(node)}: BatchNormalization nodes inside its subgraphs are not calibrated")
                break
    return targets


def _compute_type(elem_type: int | None) -> int:
    return TensorProto.DOUBLE if elem_type == TensorProto.DOUBLE else TensorProto.FLOAT


def _build_calibration_model(model: onnx.ModelProto, targets: list[_Target]) -> onnx.ModelProto:
    """A copy of ``model`` whose target BNs run in training mode and whose outputs are the batch moments."""
    calib = onnx.ModelProto()
    calib.CopyFrom(model)
    ctx = ModelContext(calib)
    types = ModelContext(model).inferred_types()
    opset = ctx.opset
    graph = calib.graph
    new_initializers = []
    outputs = []
    by_position = {t.position: t for t in targets}
    nodes = []
    for position, node in enumerate(graph.node):
        target = by_position.get(position)
        if target is None:
            nodes.append(node)
            continue
        x, scale, bias = node.input[0], node.input[1], node.input[2]
        y = node.output[0]
        eps = target.epsilon
        x_type = types.get(x)
        ctype = _compute_type(x_type)
        np_ctype = helper.tensor_dtype_to_np_dtype(ctype)
        base = (node.name or "bn").replace("/", "_")

        def name(suffix: str, base: str = base) -> str:
            return ctx.unique_name(f"{base}_calib_{suffix}")

        axes = [0] + list(range(2, target.rank))
        xc, sc, bc = name("x"), name("scale"), name("bias")
        nodes += [helper.make_node("Cast", [x], [xc], to=ctype),
                  helper.make_node("Cast", [scale], [sc], to=ctype),
                  helper.make_node("Cast", [bias], [bc], to=ctype)]

        def reduce_mean(src: str, dst: str, axes: list[int] = axes, name=name) -> onnx.NodeProto:
            if opset >= 18:
                axes_name = name("axes")
                new_initializers.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), axes_name))
                return helper.make_node("ReduceMean", [src, axes_name], [dst], keepdims=1)
            return helper.make_node("ReduceMean", [src], [dst], axes=axes, keepdims=1)

        mean, centered, squared, var = name("mean"), name("centered"), name("squared"), name("var")
        eps_name, shifted, std = name("eps"), name("shifted"), name("std")
        shape_name, scale_r, bias_r = name("param_shape"), name("scale_r"), name("bias_r")
        normed, scaled, x_shape = name("normed"), name("scaled"), name("x_shape")
        new_initializers.append(numpy_helper.from_array(np.array(eps, dtype=np_ctype), eps_name))
        new_initializers.append(numpy_helper.from_array(
            np.array([1, -1] + [1] * (target.rank - 2), dtype=np.int64), shape_name))
        nodes += [
            reduce_mean(xc, mean),
            helper.make_node("Sub", [xc, mean], [centered]),
            helper.make_node("Mul", [centered, centered], [squared]),
            reduce_mean(squared, var),
            helper.make_node("Add", [var, eps_name], [shifted]),
            helper.make_node("Sqrt", [shifted], [std]),
            helper.make_node("Div", [centered, std], [normed]),
            helper.make_node("Reshape", [sc, shape_name], [scale_r]),
            helper.make_node("Reshape", [bc, shape_name], [bias_r]),
            helper.make_node("Mul", [normed, scale_r], [scaled]),
            helper.make_node("Shape", [x], [x_shape]),
        ]
        if x_type is not None and x_type != ctype:
            out = name("y")
            nodes += [helper.make_node("Add", [scaled, bias_r], [out]),
                      helper.make_node("Cast", [out], [y], to=x_type)]
        else:
            nodes.append(helper.make_node("Add", [scaled, bias_r], [y]))
        target.mean_out, target.var_out, target.shape_out = mean, var, x_shape
        outputs += [helper.make_tensor_value_info(mean, ctype, None),
                    helper.make_tensor_value_info(var, ctype, None),
                    helper.make_tensor_value_info(x_shape, TensorProto.INT64, None)]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_initializers)
    del graph.output[:]
    graph.output.extend(outputs)
    return calib


def _session(calib: onnx.ModelProto):
    from .. import ort as ortlib

    try:
        return ortlib.runtime().InferenceSession(calib.SerializeToString(), ortlib.session_options("disabled"),
                                                 providers=ortlib.session_providers("cpu"))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise InputError(f"onnxruntime cannot run the calibration model ({first_line(exc)})") from None


def _uses(model: onnx.ModelProto) -> dict[str, int]:
    """How many times each name is read in the main graph (node inputs, subgraph free names, graph outputs)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            if name:
                counts[name] = counts.get(name, 0) + 1
        for _, g in subgraphs(node):
            for name in free_names(g):
                counts[name] = counts.get(name, 0) + 1
    for o in model.graph.output:
        counts[o.name] = counts.get(o.name, 0) + 1
    return counts


def calibrate_onnx(model: onnx.ModelProto, data: dict[str, np.ndarray], *, batch_size: int,
                   estimator: str = "unbiased", decay: float = 0.9,
                   progress: Callable[[int, int], None] | None = None) -> tuple[onnx.ModelProto, dict]:
    """Recompute the running mean/var of every inference-mode BatchNormalization in ``model``'s main graph.

    ``data`` maps each real graph input to an array batched along axis 0 (see :func:`load_calibration_data`);
    it is fed in batches of ``batch_size`` samples with all calibrated BNs normalizing by their batch statistics
    (training-mode semantics), everything else running as in inference. ``estimator`` is ``"unbiased"``
    (:class:`bnfold.stats.BatchStatistics`) or ``"ema"`` (:func:`bnfold.stats.ema` with ``decay``, batches in data
    order). A batch in which some BN sees fewer than 2 values per channel is left out (with a note).

    Returns ``(new_model, info)``; ``model`` is not changed. Only the mean/var initializers of calibrated BNs
    differ in the new model; a mean/var initializer that is also read elsewhere is left as it is and this BN gets
    a new initializer. ``info = {"layers": [{"bn", "batches", "values"}], "notes": [str]}``. ``progress`` is
    called as ``progress(done_batches, total_batches)``. float16 activations are normalized in float32 copies.
    """
    if estimator not in ESTIMATORS:
        raise InputError(f"unknown estimator {estimator!r}, expected one of {', '.join(ESTIMATORS)}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    if estimator == "ema" and (isinstance(decay, bool) or not 0.0 <= float(decay) <= 1.0):
        raise InputError(f"decay must be a number in [0, 1], got {decay!r}")
    _validate(data, model, "calibration data")
    GraphIndex(model.graph, ModelContext(model))  # InputError for an invalid graph: dangling names, cycles, ...
    _check_fixed_batch(model, data, batch_size)
    notes: list[str] = []
    targets = _find_targets(model, notes)
    info = {"layers": [], "notes": notes}
    if not targets:
        notes.append("no BatchNormalization node to calibrate")
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out, info

    calib = _build_calibration_model(model, targets)
    session = _session(calib)
    inputs = {vi.name: vi for vi in _real_inputs(model)}
    feeds_full = {}
    for name, vi in inputs.items():
        elem_type = vi.type.tensor_type.elem_type
        dtype = helper.tensor_dtype_to_np_dtype(elem_type) if elem_type else data[name].dtype
        feeds_full[name] = np.asarray(data[name]).astype(dtype, copy=False)
    total_samples = next(iter(feeds_full.values())).shape[0] if feeds_full else 0
    total_batches = math.ceil(total_samples / batch_size)
    output_names = [n for t in targets for n in (t.mean_out, t.var_out, t.shape_out)]
    skipped_batches = 0
    for index in range(total_batches):
        start = index * batch_size
        feeds = {k: v[start:start + batch_size] for k, v in feeds_full.items()}
        try:
            results = session.run(output_names, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise InputError(f"onnxruntime failed on calibration batch {index} ({first_line(exc)})") from None
        moments = []
        for k, t in enumerate(targets):
            mean, var, shape = results[3 * k: 3 * k + 3]
            channels = int(shape[1])
            m = int(np.prod(shape)) // channels if channels else 0
            moments.append((np.asarray(mean, np.float64).reshape(-1), np.asarray(var, np.float64).reshape(-1), m))
        if any(m < 2 for _, _, m in moments):
            skipped_batches += 1
        else:
            for t, (mean, var, m) in zip(targets, moments):
                if not (np.isfinite(mean).all() and np.isfinite(var).all()):
                    raise InputError(f"{node_label(t.node)}: batch {index} gives NaN or infinite statistics")
                if estimator == "unbiased":
                    t.statistics.update_from_moments(mean, var, m)
                else:
                    t.ema_pairs.append((mean, var * m / (m - 1)))
                t.batches += 1
                t.values += m
        if progress is not None:
            progress(index + 1, total_batches)
    if skipped_batches:
        notes.append(f"{skipped_batches} batch(es) left out: fewer than 2 values per channel in some BN")
    if all(t.batches == 0 for t in targets):
        raise InputError(f"no usable batch: with batch_size {batch_size} some BN sees fewer than 2 values per "
                         "channel; use a larger batch size")

    out = onnx.ModelProto()
    out.CopyFrom(model)
    out_ctx = ModelContext(out)
    uses = _uses(out)
    tensors = {t.name: t for t in out.graph.initializer}
    out_nodes = out.graph.node
    for t in targets:
        if estimator == "unbiased":
            mean, var = t.statistics.finalize("unbiased")
        else:
            mean, var = stats.ema(t.ema_pairs, decay)
        node = out_nodes[t.position]
        for slot, value in ((3, mean), (4, var)):
            old = tensors[node.input[slot]]
            dtype = helper.tensor_dtype_to_np_dtype(old.data_type)
            old_shape = tuple(old.dims)
            if math.prod(old_shape) != value.size:
                raise InputError(f"{node_label(node)}: stored statistics have shape {old_shape}, but the data give "
                                 f"{value.size} channels")
            with np.errstate(over="ignore"):
                array = value.reshape(old_shape).astype(dtype)
            if not np.isfinite(array).all():
                notes.append(f"{node_label(node)}: new statistics overflow {dtype}")
            shared = uses.get(old.name, 0) > 1
            new_tensor = numpy_helper.from_array(array, old.name)
            if shared:
                new_name = out_ctx.unique_name(f"{old.name}_calibrated")
                new_tensor.name = new_name
                out.graph.initializer.append(new_tensor)
                tensors[new_name] = new_tensor
                uses[old.name] -= 1
                uses[new_name] = 1
                node.input[slot] = new_name
                notes.append(f"{node_label(node)}: {old.name} is shared, wrote {new_name}")
            else:
                old.ClearField("raw_data")
                for field in ("float_data", "double_data", "int32_data", "int64_data"):
                    old.ClearField(field)
                old.ClearField("data_location")
                del old.external_data[:]
                old.raw_data = new_tensor.raw_data
        info["layers"].append({"bn": node_label(node), "batches": t.batches, "values": t.values})
    return out, info
