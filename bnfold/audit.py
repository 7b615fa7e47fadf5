"""Audit the statistics stored in BatchNorm layers: findings per layer (code, severity, detail).

Inputs are read without running (or even building) the model:

* ONNX models (``.onnx``): every BatchNormalization node, in the main graph and in If/Loop/Scan subgraphs, whose
  scale/B/mean/var are initializers or Constant nodes (a BN fed by graph inputs is listed in the notes).
* PyTorch checkpoints (``.pt``/``.pth``/``.ckpt``/``.bin``/``.tar``): read with
  ``torch.load(weights_only=True)``. A checkpoint that would need arbitrary unpickling is refused; there is no
  fallback. The state dict may be nested under ``state_dict``, ``model``, ``model_state_dict``, ``module``,
  ``net``, ``ema`` or ``model_ema`` (searched a few levels deep), and a leading ``module.`` (DataParallel) is
  stripped. BN layers are found by name: a prefix ``P`` with 1-D ``P.running_mean`` and ``P.running_var`` of the
  same length, optional ``P.weight``/``P.bias`` (absent: affine=False, gamma=1, beta=0) and
  ``P.num_batches_tracked``. A checkpoint does not store epsilon; 1e-5 is assumed (said in the notes).
* ``.safetensors``: the same name-based detection; nothing is unpickled.

Findings (per layer):

==================== ======== ==========================================================================
code                 severity when
==================== ======== ==========================================================================
never-updated        warning  running_mean all 0 and running_var all 1 (the initial values), or
                              num_batches_tracked == 0
non-finite           error    NaN or inf in gamma, beta, running_mean or running_var
negative-variance    error    a running_var < 0
tiny-variance        warning  0 <= running_var < 1e-6 (the folded scale is dominated by epsilon)
dead-channel         info     |gamma| < 1e-6: the channel's output is constant (prunable)
fp16-overflow        error    folding would produce a weight float16 cannot hold (> 65504). ONNX, BN fed
                              directly by a linear op of the fold's table (onnx/ops.py: Conv, ConvTranspose,
                              Gemm, MatMul on a rank-2 activation) with a constant weight: the actual
                              max |W * s| per output channel (Gemm's alpha included) is checked.
                              Everywhere else (checkpoints, other producers): max |s| > 65504 / 16, i.e. a
                              weight of magnitude 16 would overflow after folding.
==================== ======== ==========================================================================

where ``s = gamma / sqrt(running_var + eps)`` is the folded scale. Importing this module imports neither torch,
safetensors nor matplotlib; they load when a function needs them.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, first_line, require_file

__all__ = ["DEAD_GAMMA", "DEFAULT_EPS", "FP16_MAX", "GENERIC_WEIGHT_MAGNITUDE", "INVALID_STATISTICS",
           "TINY_VARIANCE", "AuditReport", "Finding", "LayerAudit", "audit", "invalid_statistics", "plot"]

FP16_MAX = 65504.0
# Finding codes that make a model wrong before any fold: folding refuses, and `bnfold MODEL` fails the check.
INVALID_STATISTICS = ("non-finite", "negative-variance")
TINY_VARIANCE = 1e-6
DEAD_GAMMA = 1e-6
GENERIC_WEIGHT_MAGNITUDE = 16.0  # checkpoint rule: a weight of this magnitude must survive folding in float16
DEFAULT_EPS = 1e-5
_MAX_LISTED = 5

_TORCH_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".tar"}
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "ema", "model_ema",
                    "state_dict_ema", "ema_state_dict")
_SEARCH_DEPTH = 4
_BN_SUFFIXES = ("running_mean", "running_var", "weight", "bias", "num_batches_tracked")
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


# --------------------------------------------------------------------------------------------------- results


@dataclass
class Finding:
    code: str
    severity: str  # "error" | "warning" | "info"
    detail: str

    def to_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "detail": self.detail}


@dataclass
class LayerAudit:
    name: str
    channels: int
    num_batches_tracked: int | None
    ranges: dict  # {"weight"|"bias"|"running_mean"|"running_var": [min, max] over finite values, or None}
    folded_scale: tuple | None  # (min, max) of gamma/sqrt(var+eps) over channels where it is finite
    findings: list[Finding] = field(default_factory=list)
    # min/median/max of running_var and |folded scale| for plot(); not part of to_dict()
    quantiles: dict = field(default_factory=dict, repr=False, compare=False)
    # with --data (ONNX): stored vs freshly estimated statistics, see _add_drift
    drift: dict | None = None

    @property
    def severity(self) -> str | None:
        """The worst severity among the findings, or None."""
        if not self.findings:
            return None
        return min((f.severity for f in self.findings), key=lambda s: _SEVERITY_ORDER.get(s, 9))

    def to_dict(self) -> dict:
        return {"name": self.name, "channels": self.channels, "num_batches_tracked": self.num_batches_tracked,
                "ranges": {k: (list(v) if v is not None else None) for k, v in self.ranges.items()},
                "folded_scale": list(self.folded_scale) if self.folded_scale is not None else None,
                "findings": [f.to_dict() for f in self.findings],
                **({"drift": self.drift} if self.drift is not None else {})}


@dataclass
class AuditReport:
    source: str
    kind: str  # "onnx" | "torch" | "safetensors"
    layers: list[LayerAudit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def findings(self) -> list[tuple[str, Finding]]:
        return [(layer.name, f) for layer in self.layers for f in layer.findings]

    @property
    def has_errors(self) -> bool:
        return any(f.severity == "error" for _, f in self.findings)

    @property
    def exit_code(self) -> int:
        return 1 if self.has_errors else 0

    def counts(self) -> dict[str, int]:
        counts = {"error": 0, "warning": 0, "info": 0}
        for _, f in self.findings:
            counts[f.severity] = counts.get(f.severity, 0) + 1
        return counts

    def to_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "layers": [layer.to_dict() for layer in self.layers],
                "notes": list(self.notes)}

    def summary_lines(self) -> list[str]:
        counts = self.counts()
        plural = "" if len(self.layers) == 1 else "s"
        lines = [(f"audit of {self.source} ({self.kind}): {len(self.layers)} BatchNorm layer{plural}, "
                  f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info")]
        if self.layers:
            width = min(max(len("layer"), *(len(layer.name) for layer in self.layers)), 48)
            lines.append(f"  {'layer':<{width}}  {'C':>5}  {'batches':>8}  {'running_var min..max':>21}  "
                         f"{'folded scale min..max':>21}  status")
            for layer in self.layers:
                name = layer.name if len(layer.name) <= width else "…" + layer.name[-(width - 1):]
                batches = "-" if layer.num_batches_tracked is None else str(layer.num_batches_tracked)
                status = layer.severity or "ok"
                lines.append(f"  {name:<{width}}  {layer.channels:>5}  {batches:>8}  "
                             f"{_span(layer.ranges.get('running_var')):>21}  {_span(layer.folded_scale):>21}  "
                             f"{status}")
                for f in sorted(layer.findings, key=lambda f: _SEVERITY_ORDER.get(f.severity, 9)):
                    lines.append(f"  {'':<{width}}    {f.severity}: {f.code}: {f.detail}")
        for note in self.notes:
            lines.append(f"note: {note}")
        lines.append("result: " + ("FAILED (error findings)" if self.has_errors else "ok (no error findings)"))
        return lines


def _span(pair) -> str:
    if pair is None:
        return "-"
    return f"{pair[0]:.3g}..{pair[1]:.3g}"


# --------------------------------------------------------------------------------------------------- checks


@dataclass
class _BNParams:
    """One BN layer's parameters, float64, as read from the file."""

    name: str
    gamma: np.ndarray | None  # None: affine=False
    beta: np.ndarray | None
    mean: np.ndarray
    var: np.ndarray
    eps: float
    num_batches_tracked: int | None = None
    # ONNX only: max |W| per output channel of the linear op feeding the BN, and a label for it
    producer_weight_max: np.ndarray | None = None
    producer_label: str | None = None
    module_path: str | None = None  # ONNX: the module path the parameter names reveal, if any
    node_output: str | None = None  # ONNX main graph: the BN node's output, to find it again after calibration


def _finite_range(values: np.ndarray | None) -> list[float] | None:
    if values is None:
        return None
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    return [float(finite.min()), float(finite.max())]


def _indices(mask: np.ndarray) -> str:
    idx = np.flatnonzero(mask)
    listed = ", ".join(str(int(i)) for i in idx[:_MAX_LISTED])
    more = f", … ({idx.size} in all)" if idx.size > _MAX_LISTED else ""
    return f"channel{'s' if idx.size != 1 else ''} {listed}{more}"


def _check_layer(p: _BNParams) -> LayerAudit:
    c = int(p.mean.shape[0])
    gamma = p.gamma if p.gamma is not None else np.ones(c)
    beta = p.beta if p.beta is not None else np.zeros(c)
    mean, var = p.mean, p.var
    findings: list[Finding] = []

    if (p.num_batches_tracked == 0) or (mean.size and np.all(mean == 0) and np.all(var == 1)):
        why = []
        if mean.size and np.all(mean == 0) and np.all(var == 1):
            why.append("running statistics are still at their initial values (mean 0, var 1)")
        if p.num_batches_tracked == 0:
            why.append("num_batches_tracked is 0")
        findings.append(Finding("never-updated", "warning",
                                " and ".join(why) + ": the statistics were probably never estimated from data"))

    bad = []
    for label, values in (("weight (gamma)", gamma), ("bias (beta)", beta), ("running_mean", mean),
                          ("running_var", var)):
        n_nan, n_inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        if n_nan or n_inf:
            parts = ([f"{n_nan} NaN"] if n_nan else []) + ([f"{n_inf} inf"] if n_inf else [])
            bad.append(f"{label}: {' and '.join(parts)} ({_indices(~np.isfinite(values))})")
    if bad:
        findings.append(Finding("non-finite", "error", "non-finite values in " + "; ".join(bad)))

    with np.errstate(invalid="ignore"):
        negative = var < 0
        tiny = (var >= 0) & (var < TINY_VARIANCE)
        dead = np.abs(gamma) < DEAD_GAMMA
    if negative.any():
        findings.append(Finding("negative-variance", "error",
                                f"{int(negative.sum())} negative running_var value(s), min {float(var[negative].min()):.3g} "
                                f"({_indices(negative)}): the statistics are corrupt"))
    if tiny.any():
        findings.append(Finding("tiny-variance", "warning",
                                f"{int(tiny.sum())} running_var value(s) below {TINY_VARIANCE:g} ({_indices(tiny)}): "
                                f"the folded scale there is set by epsilon ({p.eps:g}) rather than by data"))
    if dead.any():
        findings.append(Finding("dead-channel", "info",
                                f"{int(dead.sum())} of {c} channel(s) have |gamma| < {DEAD_GAMMA:g} ({_indices(dead)}): "
                                "their output is constant, so they can be pruned"))

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scale = gamma / np.sqrt(var + p.eps)
    finite_scale = np.isfinite(scale)
    folded = (float(scale[finite_scale].min()), float(scale[finite_scale].max())) if finite_scale.any() else None

    overflow = _fp16_overflow(p, scale, finite_scale)
    if overflow is not None:
        findings.append(overflow)

    quantiles = {"running_var": _three(var), "abs_scale": _three(np.abs(scale))}
    ranges = {"weight": _finite_range(p.gamma), "bias": _finite_range(p.beta),
              "running_mean": _finite_range(mean), "running_var": _finite_range(var)}
    return LayerAudit(p.name, c, p.num_batches_tracked, ranges, folded, findings, quantiles)


def _three(values: np.ndarray) -> tuple[float, float, float] | None:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    return float(finite.min()), float(np.median(finite)), float(finite.max())


def _fp16_overflow(p: _BNParams, scale: np.ndarray, finite_scale: np.ndarray) -> Finding | None:
    if not finite_scale.any():
        return None
    abs_scale = np.where(finite_scale, np.abs(scale), 0.0)
    if p.producer_weight_max is not None:
        folded = p.producer_weight_max * abs_scale
        over = folded > FP16_MAX
        if over.any():
            return Finding("fp16-overflow", "error",
                           f"folding into {p.producer_label} gives weights up to {float(folded.max()):.4g}, beyond "
                           f"float16's {FP16_MAX:g} ({_indices(over)})")
        return None
    limit = FP16_MAX / GENERIC_WEIGHT_MAGNITUDE
    over = abs_scale > limit
    if over.any():
        return Finding("fp16-overflow", "error",
                       f"folded scale |gamma/sqrt(var+eps)| reaches {float(abs_scale.max()):.4g} > {limit:g} "
                       f"({_indices(over)}): a weight of magnitude {GENERIC_WEIGHT_MAGNITUDE:g} would overflow "
                       "float16 after folding")
    return None


# --------------------------------------------------------------------------------------------------- entry


def audit(path, *, data=None) -> AuditReport:
    """Audit the BatchNorm layers stored in ``path`` (.onnx, PyTorch checkpoint, .safetensors).

    Raises InputError (one line) for unreadable, unrecognised or unsafe inputs.
    """
    path = require_file(path, "a model or checkpoint file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size == 0:
        raise InputError(f"{path}: empty file")
    kind = _kind_of(path)
    if kind == "onnx":
        params, notes = _read_onnx(path)
    elif kind == "safetensors":
        params, notes = _read_safetensors(path)
    else:
        params, notes = _read_torch(path)
    layers = [_check_layer(p) for p in params]
    if data is not None:
        if kind != "onnx":
            raise InputError("--data applies to ONNX models (fresh statistics are estimated with onnxruntime)")
        _add_drift(path, data, params, layers, notes)
    if not layers:
        notes.append("no BatchNorm layers found")
    return AuditReport(str(path), kind, layers, notes)


def invalid_statistics(model, read_external=None) -> list[tuple[str, Finding]]:
    """``(layer, finding)`` for every BatchNormalization of an in-memory ONNX ``model`` whose statistics are invalid
    (codes in :data:`INVALID_STATISTICS`: NaN/inf parameters, negative variance), as :func:`audit` reports them.
    ``read_external(tensor) -> array`` reads tensors whose data is still in external files (a lazily loaded
    model); without it such tensors must already be loaded."""
    import onnx

    from .onnx.graph import ModelContext

    params: list[_BNParams] = []
    _walk_onnx_graph(model.graph, {}, "", params, [], onnx, ModelContext(model).opset, None, read_external)
    _name_by_module_path(params)
    found = []
    for p in params:
        for finding in _check_layer(p).findings:
            if finding.code in INVALID_STATISTICS:
                found.append((p.name, finding))
    return found


# Drift worth a warning: a stored mean more than half a (fresh) standard deviation away, or a variance off by 2x.
_DRIFT_MEAN_SHIFT = 0.5
_DRIFT_VAR_RATIO = 2.0


def _add_drift(path: Path, data, params: list[_BNParams], layers: list[LayerAudit], notes: list[str]) -> None:
    """Estimate each main-graph BN's statistics from ``data`` (training-mode semantics, unbiased estimator) and
    report how far the stored ones are: max |Δmean| in fresh standard deviations, and the range of
    (stored var + eps) / (fresh var + eps)."""
    from .onnx.calibrate import calibrate_onnx, load_calibration_data
    from .onnx.io import load_model

    model = load_model(path)
    calibrated, info = calibrate_onnx(model, load_calibration_data(data, model), batch_size=_DRIFT_BATCH)
    notes.extend(f"drift estimate: {note}" for note in info.get("notes", []))
    values = {t.name: t for t in calibrated.graph.initializer}
    from onnx import numpy_helper

    fresh = {}
    for node in calibrated.graph.node:
        if node.op_type == "BatchNormalization" and len(node.input) >= 5 and node.input[3] in values \
                and node.input[4] in values:
            fresh[node.output[0]] = (_f64(numpy_helper.to_array(values[node.input[3]])),
                                     _f64(numpy_helper.to_array(values[node.input[4]])))
    for p, layer in zip(params, layers):
        if p.node_output not in fresh:
            continue
        mean, var = fresh[p.node_output]
        with np.errstate(all="ignore"):
            shift = np.abs(p.mean - mean) / np.sqrt(var + p.eps)
            ratio = (p.var + p.eps) / (var + p.eps)
        layer.drift = {"mean_shift_max": _finite_or_none(np.nanmax(shift)),
                       "var_ratio_min": _finite_or_none(np.nanmin(ratio)),
                       "var_ratio_max": _finite_or_none(np.nanmax(ratio))}
        drifted = (shift > _DRIFT_MEAN_SHIFT) | (ratio > _DRIFT_VAR_RATIO) | (ratio < 1 / _DRIFT_VAR_RATIO)
        if drifted.any():
            layer.findings.append(Finding(
                "stats-drift", "warning",
                f"stored statistics differ from the data in {_indices(drifted)}: mean off by up to "
                f"{np.nanmax(shift):.3g} standard deviations, variance ratio {np.nanmin(ratio):.3g}.."
                f"{np.nanmax(ratio):.3g} (thresholds {_DRIFT_MEAN_SHIFT} and {_DRIFT_VAR_RATIO}x)"))


_DRIFT_BATCH = 32


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in _TORCH_SUFFIXES:
        return "torch"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head.startswith(b"PK\x03\x04"):
        return "torch"  # torch.save's zip format
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    raise InputError(f"{path}: unrecognised file type (expected .onnx, .safetensors or a PyTorch checkpoint "
                     ".pt/.pth/.ckpt/.bin)")


def _f64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


# --------------------------------------------------------------------------------------------------- onnx


def _read_onnx(path: Path) -> tuple[list[_BNParams], list[str]]:
    import onnx

    from .onnx.graph import GraphIndex, ModelContext
    from .onnx.io import load_model

    model = load_model(path)
    context = ModelContext(model)
    GraphIndex(model.graph, context)  # InputError for an invalid graph: dangling names, cycles, duplicates
    params: list[_BNParams] = []
    notes: list[str] = []
    _walk_onnx_graph(model.graph, {}, "", params, notes, onnx, context.opset, context.inferred_shapes())
    _name_by_module_path(params)
    return params, notes


def _name_by_module_path(params: list[_BNParams]) -> None:
    """Exporters name nodes like "node__native_batch_norm_legit_no_training__0" but keep the module path in the
    parameter names ("layer1.0.bn1.running_mean"): use that path where it names exactly one BN."""
    paths = [p.module_path for p in params]
    for p in params:
        if p.module_path and paths.count(p.module_path) == 1:
            p.name = p.module_path


def _walk_onnx_graph(graph, outer_constants: dict, prefix: str, params: list, notes: list, onnx, opset: int,
                     shapes: dict | None = None, read_external=None) -> None:
    """``shapes``: inferred shapes of the main graph's values (None in subgraphs)."""
    from onnx import numpy_helper

    from .onnx.tensors import constant_node_value

    constants = dict(outer_constants)  # name -> TensorProto or a numpy array
    for init in graph.initializer:
        constants[init.name] = init
    inputs = {i.name for i in graph.input}
    producers = {}
    for node in graph.node:
        for out in node.output:
            if out:
                producers[out] = node
                constants.pop(out, None)  # a node output shadows an outer name
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            value = constant_node_value(node)
            if value is not None:
                constants[node.output[0]] = value
    for name in inputs:  # a graph input overrides an initializer of the same name
        constants.pop(name, None)

    def get(name):
        value = constants.get(name)
        if value is None:
            return None
        if isinstance(value, np.ndarray):
            return value
        if read_external is not None and value.data_location == onnx.TensorProto.EXTERNAL:
            return read_external(value)
        try:
            return numpy_helper.to_array(value)
        except (ValueError, TypeError) as exc:  # e.g. raw_data that does not fit the tensor's shape
            raise InputError(f"invalid model: tensor {name!r} cannot be read ({exc})") from None

    for index, node in enumerate(graph.node):
        label = prefix + (node.name or f"{node.op_type}({next((o for o in node.output if o), '?')})")
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            params_or_reason = _onnx_bn(node, label, get, producers, opset, shapes)
            if isinstance(params_or_reason, str):
                notes.append(f"BatchNormalization {label!r} not audited: {params_or_reason}")
            else:
                params_or_reason.node_output = node.output[0] if not prefix else None
                params.append(params_or_reason)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _walk_onnx_graph(attr.g, constants, f"{label}/{attr.name}/", params, notes, onnx, opset, None,
                                 read_external)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for i, g in enumerate(attr.graphs):
                    _walk_onnx_graph(g, constants, f"{label}/{attr.name}[{i}]/", params, notes, onnx, opset, None,
                                     read_external)


def _onnx_bn(node, label: str, get, producers, opset: int, shapes: dict | None) -> _BNParams | str:
    """``shapes``: inferred shapes of the main graph's values; None in subgraphs (nothing known there)."""
    from .onnx.batchnorm import check_channels, check_parameter_lengths, inference_epsilon

    eps = inference_epsilon(node, opset)  # the fold's reader: same epsilon default, same inference-mode checks
    if isinstance(eps, str):
        return str(eps)
    values = []
    for slot, what in zip(range(1, 5), ("scale", "B", "mean", "var")):
        value = get(node.input[slot])
        if value is None:
            return f"its {what} ({node.input[slot]!r}) is not an initializer or Constant"
        if not np.issubdtype(value.dtype, np.floating):
            return f"its {what} has non-float type {value.dtype}"
        values.append(_f64(value))
    gamma, beta, mean, var = values
    c = mean.size
    check_parameter_lengths(repr(label), [v.size for v in values])
    check_channels(repr(label), c, (shapes or {}).get(node.input[0]))
    if c == 0:
        return "it has no channels"
    eps = float(np.float32(eps))
    p = _BNParams(label, gamma, beta, mean, var, eps)
    mean_name, var_name = node.input[3], node.input[4]
    if mean_name.endswith(".running_mean") and var_name == mean_name[: -len("mean")] + "var":
        p.module_path = label[: len(label) - len(label.split("/")[-1])] + mean_name[: -len(".running_mean")]
    producer = producers.get(node.input[0])
    if producer is not None:
        found = _producer_weight_max(producer, get, c, shapes)
        if found is not None:
            p.producer_weight_max, op = found
            p.producer_label = f"{op} {producer.name or producer.output[0]!r}"
    return p


def _producer_weight_max(node, get, channels: int, shapes: dict | None) -> tuple[np.ndarray, str] | None:
    """max |W| per output channel of the linear op producing BN's input, when its weight is constant and its
    output channels are BN's channel axis (the fold's descriptor of the op says where they are)."""
    from .onnx.nodes import get_attr
    from .onnx.ops import linear_op

    op = linear_op(node)
    if op is None or len(node.input) < 2:
        return None
    if op.activation_rank is not None:  # e.g. MatMul: its output axis is BN's axis 1 only on rank-2 activations
        shape = (shapes or {}).get(node.input[0])
        if shape is None or len(shape) != op.activation_rank:
            return None
    weight = get(node.input[1])
    if weight is None or not np.issubdtype(weight.dtype, np.floating) or op.weight_rank_reason(weight.ndim):
        return None
    w = np.abs(np.asarray(weight, dtype=np.float64))
    axis, _ = op.axes(node)
    groups = op.axis_groups(node, axis)
    if groups < 1 or w.shape[0] % groups:
        return None
    if groups == 1:
        per = w.max(axis=tuple(a for a in range(w.ndim) if a != axis))
    else:  # channel c of group g sits at column c - g*(C/groups) of the rows of group g
        per = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).max(axis=(1, 3)).reshape(-1)
    if op.output_scale_attr:
        per = per * abs(float(get_attr(node, op.output_scale_attr, 1.0)))
    if per.shape != (channels,):
        return None  # the op's output channels are not BN's channel axis
    return per, node.op_type


# --------------------------------------------------------------------------------------------------- torch / safetensors


def _read_torch(path: Path) -> tuple[list[_BNParams], list[str]]:
    import pickle

    try:
        import torch
    except ImportError:
        raise InputError(f"{path}: reading PyTorch checkpoints needs torch (pip install 'bnfold[torch]'), or "
                         "convert it to .safetensors") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        match = re.search(r"GLOBAL\s+([\w.]+)", message)
        if match:
            raise InputError(f"{path}: refused: loading it would need arbitrary unpickling (it references "
                             f"{match.group(1)}); bnfold reads checkpoints with weights_only=True only. Save the "
                             "state_dict (or .safetensors) instead") from None
        raise InputError(f"{path}: not a PyTorch checkpoint readable with weights_only=True "
                         f"({_torch_reason(message)})") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip errors, EOF, truncated files, legacy formats ...
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                         f"{first_line(str(exc), max_chars=200)})") from None
    notes: list[str] = []
    state, where, others = _find_state_dict(obj, lambda v: isinstance(v, torch.Tensor))
    if state is None:
        if not isinstance(obj, Mapping):
            notes.append(f"the checkpoint holds a {type(obj).__name__}, not a state dict")
        return [], notes
    if where:
        notes.append(f"state dict found under {where}")
    if others:
        notes.append("BatchNorm statistics also found under " + ", ".join(others) + " (not audited)")

    def shape(v):
        return tuple(v.shape)

    def to_array(v):
        return v.detach().to(dtype=torch.float64).cpu().numpy()

    def is_float(v):
        return v.is_floating_point()

    params = _detect_bn(state, shape, to_array, is_float, notes)
    if params:
        notes.append(f"checkpoints do not store epsilon: {DEFAULT_EPS:g} assumed for the folded scale")
    return params, notes


def _torch_reason(message: str) -> str:
    match = re.search(r"Unsupported operand \d+", message)
    if match:
        return f"pickle data: {match.group(0).lower()}"
    return "the pickle data could not be read"


def _read_safetensors(path: Path) -> tuple[list[_BNParams], list[str]]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise InputError(f"{path}: reading .safetensors needs the safetensors package") from None
    notes: list[str] = []
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            meta = {}
            for key in keys:
                sl = f.get_slice(key)
                meta[key] = (tuple(sl.get_shape()), str(sl.get_dtype()))
            state = _LazyState(f, meta, path)
            params = _detect_bn(state, lambda v: v[0], None, lambda v: v[1].startswith(("F", "BF")), notes,
                                loader=state.load)
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the library raises its own types for corrupt headers
        raise InputError(f"{path}: not a readable .safetensors file ({type(exc).__name__}: "
                         f"{first_line(str(exc), max_chars=200)})") from None
    if params:
        notes.append(f"checkpoints do not store epsilon: {DEFAULT_EPS:g} assumed for the folded scale")
    return params, notes


class _LazyState(dict):
    """name -> (shape, dtype string); tensors are read only for the names detection keeps."""

    def __init__(self, handle, meta, path: Path):
        super().__init__(meta)
        self._handle = handle
        self._path = path

    def load(self, key: str) -> np.ndarray:
        if self[key][1] == "BF16":  # numpy has no bfloat16: widen the raw bits to float32
            return _read_bf16(self._path, key)
        return np.asarray(self._handle.get_tensor(key))


def _read_bf16(path: Path, key: str) -> np.ndarray:
    import json

    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        entry = header[key]
        start, end = entry["data_offsets"]
        f.seek(8 + header_len + start)
        raw = f.read(end - start)
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(entry["shape"])


def _find_state_dict(obj, is_tensor) -> tuple[Mapping | None, str, list[str]]:
    """The first mapping holding BN statistics: the object itself, then the usual keys, then any nested mapping
    (breadth first, a few levels). Returns (state, where, other places that also hold BN statistics)."""
    found: list[tuple[str, Mapping]] = []
    queue: list[tuple[str, object, int]] = [("", obj, 0)]
    seen: set[int] = set()
    while queue:
        where, value, depth = queue.pop(0)
        if not isinstance(value, Mapping) or id(value) in seen:
            continue
        seen.add(id(value))
        if any(isinstance(k, str) and (k == "running_var" or k.endswith(".running_var")) and is_tensor(v)
               for k, v in value.items()):
            found.append((where, value))
            continue
        if depth >= _SEARCH_DEPTH:
            continue
        keys = [k for k in _STATE_DICT_KEYS if k in value]
        keys += [k for k in value if k not in keys]
        for k in keys:
            if isinstance(value[k], Mapping):
                queue.append((f"{where}[{k!r}]" if where else repr(k), value[k], depth + 1))
    if not found:
        return None, "", []
    where, state = found[0]
    return state, where, [w for w, _ in found[1:]]


def _detect_bn(state: Mapping, shape, to_array, is_float, notes: list[str], loader=None) -> list[_BNParams]:
    """BN layers from parameter names: P.running_mean + P.running_var (+ P.weight, P.bias, P.num_batches_tracked)."""
    names: dict[str, object] = {}
    originals: dict[str, str] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            continue
        stripped = key
        while stripped.startswith("module."):
            stripped = stripped[len("module."):]
        if stripped not in names:
            names[stripped] = value
            originals[stripped] = key

    def load(key):
        return loader(originals[key]) if loader is not None else to_array(names[key])

    params: list[_BNParams] = []
    for key in list(names):
        if not (key == "running_mean" or key.endswith(".running_mean")):
            continue
        prefix = key[: -len("running_mean")]
        label = prefix[:-1] if prefix else "(root)"
        var_key = prefix + "running_var"
        if var_key not in names:
            continue
        mean_v, var_v = names[key], names[var_key]
        if not (is_float(mean_v) and is_float(var_v)):
            continue
        s_mean, s_var = shape(mean_v), shape(var_v)
        if len(s_mean) != 1 or s_mean != s_var or s_mean[0] == 0:
            notes.append(f"{label!r}: running_mean/running_var shapes {list(s_mean)}/{list(s_var)} are not 1-D of "
                         "one length: not a BatchNorm layer, not audited")
            continue
        c = s_mean[0]
        affine = {}
        for part in ("weight", "bias"):
            k = prefix + part
            if k in names:
                if is_float(names[k]) and tuple(shape(names[k])) == (c,):
                    affine[part] = k
                else:
                    notes.append(f"{label!r}: {part} has shape {list(shape(names[k]))}, not [{c}]: ignored "
                                 "(treated as affine=False)")
        nbt = None
        k = prefix + "num_batches_tracked"
        if k in names and math.prod(shape(names[k])) == 1:
            nbt = int(np.asarray(load(k)).reshape(-1)[0])
        gamma = _f64(load(affine["weight"])) if "weight" in affine else None
        beta = _f64(load(affine["bias"])) if "bias" in affine else None
        if gamma is None or beta is None:
            missing = " and ".join(p for p in ("weight", "bias") if p not in affine)
            notes.append(f"{label!r}: no {missing}: affine=False assumed (gamma=1, beta=0)")
        params.append(_BNParams(label, gamma, beta, _f64(load(key)), _f64(load(var_key)), DEFAULT_EPS, nbt))
    return params


# --------------------------------------------------------------------------------------------------- plot


def plot(report: AuditReport, out_path) -> None:
    """Per-layer min/median/max of running_var and of |folded scale|, on log axes, as a PNG (written atomically)."""
    from .plotting import check_png_path, new_figure, save_png

    out_path = check_png_path(out_path)
    layers = report.layers
    n = len(layers)
    fig = new_figure(max(6.0, min(0.18 * n + 2.0, 40.0)), 7.0)
    ax_var, ax_scale = fig.subplots(2, 1, sharex=True)
    fig.suptitle(f"BatchNorm audit: {Path(report.source).name} ({n} layer{'s' if n != 1 else ''})")
    if n == 0:
        ax_var.text(0.5, 0.5, "no BatchNorm layers found", ha="center", va="center", transform=ax_var.transAxes)
    floor = 1e-12  # log axes: values at or below zero are drawn at the floor
    x = np.arange(n)
    colours = {"error": "tab:red", "warning": "tab:orange", "info": "tab:blue", None: "tab:green"}
    for ax, key, title, threshold, threshold_label in (
            (ax_var, "running_var", "running_var (min / median / max)", TINY_VARIANCE, f"tiny < {TINY_VARIANCE:g}"),
            (ax_scale, "abs_scale", "|gamma / sqrt(var + eps)| (min / median / max)",
             FP16_MAX / GENERIC_WEIGHT_MAGNITUDE, "fp16 limit for |W| = 16")):
        any_drawn = False
        for i, layer in enumerate(layers):
            q = layer.quantiles.get(key)
            if q is None:
                continue
            lo, med, hi = (max(v, floor) for v in q)
            colour = colours.get(layer.severity, "tab:gray")
            ax.vlines(i, lo, hi, color=colour, linewidth=1.5)
            ax.plot([i], [med], marker="o", markersize=3, color=colour)
            any_drawn = True
        if any_drawn:
            ax.set_yscale("log")
            ax.axhline(threshold, color="gray", linestyle="--", linewidth=0.8, label=threshold_label)
            ax.legend(loc="upper right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="major", axis="y", alpha=0.3)
    if n:
        ax_scale.set_xlim(-0.5, n - 0.5)
        if n <= 60:
            ax_scale.set_xticks(x)
            ax_scale.set_xticklabels([layer.name for layer in layers], rotation=90, fontsize=6)
        else:
            ax_scale.set_xlabel("layer index")
    fig.tight_layout()
    save_png(fig, out_path)
