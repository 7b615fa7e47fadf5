"""Check that a candidate ONNX model (a fold, another tool's output, a hand edit) computes the same function as the
original, with a verdict that is right both ways: it passes every correct fold, however deep the network, and fails
every real change.

The verdict (per output, per execution provider)
-------------------------------------------------
A correct fold changes the model's weights by rounding only, so the candidate may differ from the original by as
much as the model's own rounding noise, and not more. That noise is measured for *this* model and *these* inputs:

1. Run the original: ``b``. Run the candidate: ``a``. Both on the same inputs, graph optimizations disabled.
2. Run the original :data:`NOISE_DRAWS` more times with every floating-point weight (initializers and Constant
   tensors, subgraphs included) moved by one unit in the last place, up or down at random (seeded, a fresh
   draw each time): ``p₁, p₂``. The **noise** of an output is ``max_d max |p_d − b|`` over its elements.
3. **Noise scale** ``n = max(noise, ε · scale)``: ``scale = max |b|`` and ``ε`` the machine epsilon of the
   output's element type (the floor: an output the weights do not touch is reproduced to about one ulp).
4. **Ratio** ``r = max |a − b| / n``. The output **passes when r ≤** :data:`NOISE_FACTOR` (K = 8).

Why K = 8: a correct fold rounds each folded weight once (≤ ½ ulp), the perturbation moves each weight a full
ulp, so correct folds land at r ≈ 0.25–1.7 (onnxruntime's own float32 Conv+BN fusion too); the separation benchmark
(``benchmarks/verify_separation.py``) measures the largest accepted ratio of correct folds of deep chains and real
architectures (1.68) and the smallest ratio of planted errors (one channel ×(1+1e-3), one bias moved by 1 % of its
range, two channels swapped: 121), 72x apart; K sits 5x above the first.

Integer, bool and string outputs must match exactly. NaN at the same place on both sides, or the same infinity,
counts as equal; NaN or inf on one side only is an infinite error. An output missing from the candidate, or with
another shape or element type, fails.

Reported per output: ``max_abs_error = max |a − b|``, ``scale = max |b|``, ``scaled_error = max_abs_error /
scale`` (the error relative to the output's range, not element by element: no division by outputs that happen to
be near zero), ``noise``, ``ratio`` and the limit K. With real inputs (``data`` / ``inputs``) and a
classifier-shaped output (float, rank 2, at least 2 classes), also the **top-1 agreement** (share of rows whose
argmax is the same); it is reported, not judged.

**Explicit tolerances override the noise rule**: given ``atol`` and/or ``rtol`` (the other defaults to 0), an
output passes when every element has ``|a − b| <= atol + rtol·|b|`` (numpy.isclose), and the perturbed runs are
skipped.

Limits: the noise is measured on the inputs used (random ones unless ``data``/``inputs`` are given); inputs that
exercise other ranges may show other differences. Float tensors read by Resize/Upsample (scales, roi) and Range
are not perturbed (a moved scale can change an output's shape). A candidate whose error is below K times the
rounding noise is indistinguishable from a correct fold by this test, by construction.

Inputs
------
Random inputs are seeded: floating-point inputs standard normal; integer inputs that only index a constant table
(Gather indices, e.g. token ids) uniform over the table's valid range; integer inputs the verifier cannot bound
(shapes, counts, indices of anything else) raise :class:`InputError` asking for real data. ``data`` (the
calibration data format, see :func:`bnfold.onnx.calibrate.load_calibration_data`) runs the real samples in
batches (the model's fixed batch size, else :data:`DATA_BATCH` samples).

Memory: models given as paths are handed to onnxruntime as paths, and the original, the perturbed copies and the
candidate run one after another, each session freed before the next; a perturbed copy is written tensor by tensor
to a temporary directory. The peak is about what onnxruntime needs for one session plus the outputs.

The onnxruntime CPU provider has no bfloat16 kernels for most operators: when onnxruntime reports a missing
float16/bfloat16 kernel, both models are converted to float32 copies and compared in that emulation (the weights
are perturbed in their own type first); the provider's ``reason`` says so.

``import bnfold.verify`` does not import onnxruntime; it is imported when a function needs it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold import ort as ortlib
from bnfold.errors import InputError, first_line
from bnfold.onnx.graph import all_names, unique_name
from bnfold.report import OutputComparison, ProviderResult, VerifyReport

__all__ = ["verify", "available_providers", "make_inputs", "data_batches", "compare_arrays", "failed_comparison",
           "perturb_array", "write_perturbed", "max_abs_difference", "top1_agreement", "NOISE_FACTOR",
           "NOISE_DRAWS", "DATA_BATCH", "machine_epsilon", "real_inputs", "check_inputs"]

NOISE_FACTOR = 8.0
NOISE_DRAWS = 2
DATA_BATCH = 32

available_providers = ortlib.available_providers

_FLOAT_NAMES = ("float16", "float32", "float64", "bfloat16", "complex64", "complex128")
_EPSILON = {
    "float16": float(np.finfo(np.float16).eps),
    "float32": float(np.finfo(np.float32).eps),
    "float64": float(np.finfo(np.float64).eps),
    "bfloat16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps),
    "complex64": float(np.finfo(np.float32).eps),
    "complex128": float(np.finfo(np.float64).eps),
}
# ONNX float element types whose tensors the noise estimate perturbs.
_PERTURBED_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
# Float tensors read here may change shapes when moved by an ulp: left as they are.
_SHAPE_READERS = {"Resize", "Upsample", "Range"}
# Element types that the float32 emulation widens, and their names for messages.
_LOW_PRECISION = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
# Operators whose integer attribute names an output element type.
_DTYPE_ATTRS = {
    "Cast": "to",
    "EyeLike": "dtype",
    "RandomNormal": "dtype",
    "RandomUniform": "dtype",
    "RandomNormalLike": "dtype",
    "RandomUniformLike": "dtype",
    "Bernoulli": "dtype",
}
# Integer inputs read only by these ops (as values, not as shapes or indices) take any small value.
_VALUE_READERS = {"Cast", "Add", "Sub", "Mul", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
                  "Identity", "Abs", "Neg", "Max", "Min"}
_EXTERNAL_MIN_BYTES = 1024  # perturbed main-graph tensors this large go to the temporary data file


def machine_epsilon(dtype: Any) -> float:
    """Machine epsilon of a floating-point element type (name, numpy dtype or ONNX type); 0 for other types."""
    return _EPSILON.get(_dtype_name(dtype), 0.0)


# --------------------------------------------------------------------------------------------------- public API


def verify(
    original: onnx.ModelProto | str | os.PathLike,
    candidate: onnx.ModelProto | str | os.PathLike,
    *,
    providers: Iterable[str] | str | None = None,
    input_shapes: Mapping[str, Iterable[int]] | None = None,
    inputs: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
    data: str | os.PathLike | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> VerifyReport:
    """Run ``original`` and ``candidate`` on the same inputs and judge every output of the original by the rule in
    the module docstring.

    ``original`` / ``candidate``: ModelProto or path (a path keeps the weights out of bnfold's memory).
    ``providers``: short names (``"cpu"``, ``"cuda"``, any case) or full onnxruntime names; default ``cpu`` plus
    ``cuda`` when this onnxruntime offers it; a provider that cannot run here is reported with
    ``available=False`` and the reason. Inputs: ``data`` (a calibration-data path), or ``inputs`` (name -> array,
    or a list of such batches), or seeded random values (:func:`make_inputs` with ``seed`` and ``input_shapes``).
    ``atol``/``rtol``: explicit tolerances instead of the noise rule.

    Raises :class:`InputError` for an unknown provider, bad inputs, data or shapes, or when onnxruntime cannot run
    the original model. A candidate that onnxruntime cannot run fails the provider (with the reason) instead.
    """
    original_proto = _load(original, "original model", weights=False)
    candidate_proto = _load(candidate, "candidate model", weights=False)
    wanted = ortlib.resolve_providers(providers)
    _check_tolerances(atol, rtol)
    if data is not None:
        if inputs is not None:
            raise InputError("give data or inputs, not both")
        from bnfold.onnx.calibrate import load_calibration_data

        batches = data_batches(original_proto, load_calibration_data(data, original_proto))
    elif inputs is not None:
        batches = [check_inputs(original_proto, b) for b in (inputs if isinstance(inputs, list) else [inputs])]
        if not batches:
            raise InputError("inputs is an empty list")
    else:
        batches = [make_inputs(original_proto, input_shapes, seed)]
    real = data is not None or inputs is not None

    report = VerifyReport(seed=seed)
    job = _Job(original, candidate, original_proto, candidate_proto, batches, atol, rtol, seed, real)
    for short in wanted:
        report.providers[short] = job.run_on(short)
    return report


def make_inputs(
    model: onnx.ModelProto | str | os.PathLike,
    input_shapes: Mapping[str, Iterable[int]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded random values for every real graph input of ``model`` (inputs that are not initializers).

    Floating-point inputs are standard normal in their own element type (float16, float32, float64, bfloat16),
    bool inputs random bools. Integer inputs that are only Gather indices into constant tables are uniform over
    the valid indices; integer inputs read only as values (Cast, Add, comparisons, ...) are integers in ``[0, 4)``;
    any other integer input raises :class:`InputError` asking for real data (``--data``). A static dimension is
    used as declared; a symbolic or missing one takes its value from ``input_shapes`` (``{name: full shape}``) if
    given, else 1. Raises :class:`InputError` for unknown names in ``input_shapes``, a wrong rank, a size that
    contradicts a static dimension, or an input whose values cannot be generated.
    """
    model = _load(model, "model", weights=False)
    inputs = real_inputs(model.graph)
    shapes = dict(input_shapes or {})
    names = [vi.name for vi in inputs]
    unknown = [n for n in shapes if n not in names]
    if unknown:
        raise InputError(
            f"input_shapes names unknown input '{unknown[0]}' (model inputs: {', '.join(names) or 'none'})"
        )
    rng = np.random.default_rng(seed)
    return {vi.name: _random_tensor(rng, model.graph, vi, shapes.get(vi.name)) for vi in inputs}


def data_batches(model: onnx.ModelProto, data: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Calibration data (``{input: array batched along axis 0}``, already validated) as feeds: batches of the
    model's fixed batch size (samples beyond the last full batch are left out), else of :data:`DATA_BATCH`; each
    array cast to the input's declared element type."""
    inputs = real_inputs(model.graph)
    samples = len(next(iter(data.values())))
    size = DATA_BATCH
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            size = dims[0].dim_value
            if samples < size:
                raise InputError(f"input '{vi.name}' takes batches of exactly {size} samples, the data holds "
                                 f"{samples}")
            samples -= samples % size
            break
    batches = []
    for start in range(0, samples, size):
        feed = {}
        for vi in inputs:
            arr = data[vi.name][start:start + size]
            elem = vi.type.tensor_type.elem_type
            if elem:
                arr = arr.astype(helper.tensor_dtype_to_np_dtype(elem), copy=False)
            feed[vi.name] = np.ascontiguousarray(arr)
        batches.append(feed)
    return batches


def compare_arrays(
    name: str,
    original: Any,
    candidate: Any,
    *,
    noise: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    dtype: Any = None,
) -> OutputComparison:
    """Judge one output by the rule in the module docstring.

    ``noise``: the output's measured rounding noise (``max |p − b|`` over the perturbed runs; see
    :func:`max_abs_difference`); None counts as 0 (the floor alone). ``atol``/``rtol``: explicit tolerances,
    which replace the noise rule. ``dtype``: the element type that selects ε (the original's declared type; in a
    float32 emulation it differs from the arrays'); defaults to ``original``'s. ``original`` and ``candidate`` may
    be arrays or (nested) lists/dicts of arrays (several batches, or onnxruntime's sequence and map outputs).
    """
    dtype_name = _dtype_name(dtype) if dtype is not None else _leaf_dtype_name(original)
    is_float = dtype_name in _FLOAT_NAMES
    max_abs, scale, exact, close = _diff(original, candidate, atol or 0.0, rtol or 0.0)
    scaled = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    if not is_float:
        passed = exact
        return OutputComparison(name, max_abs, scale, scaled, None, None, None, passed, dtype=dtype_name)
    if atol is not None or rtol is not None:
        return OutputComparison(name, max_abs, scale, scaled, None, None, None, close, dtype=dtype_name,
                                atol=float(atol or 0.0), rtol=float(rtol or 0.0))
    measured = float(noise or 0.0)
    noise_scale = max(measured, machine_epsilon(dtype_name) * scale)
    if max_abs == 0:
        ratio = 0.0
    elif noise_scale > 0 and np.isfinite(max_abs):
        ratio = max_abs / noise_scale
    else:
        ratio = float("inf")
    return OutputComparison(name, max_abs, scale, scaled, measured, noise_scale, ratio, ratio <= NOISE_FACTOR,
                            dtype=dtype_name, limit=NOISE_FACTOR)


def failed_comparison(name: str, dtype: str | None) -> OutputComparison:
    """An output that could not be compared (missing, other shape or dtype, a run that raised): infinite error."""
    inf = float("inf")
    return OutputComparison(name, inf, 0.0, inf, None, None, None, False, dtype=dtype or "")


def max_abs_difference(original: Any, other: Any) -> float:
    """``max |other − original|`` over every element (containers recursed); NaN/inf at the same place on both sides
    count as equal; inf when the structures or shapes differ or one side alone is NaN/inf."""
    return _diff(original, other, 0.0, 0.0)[0]


def top1_agreement(original: Any, candidate: Any) -> float | None:
    """Share of rows whose argmax agrees, for a classifier-shaped output (float, rank 2, >= 2 classes; a list of
    batches is concatenated); None for any other output."""
    if isinstance(original, list):
        if not original or not all(isinstance(x, np.ndarray) for x in (*original, *candidate)):
            return None
        try:
            original, candidate = np.concatenate(original), np.concatenate(candidate)
        except ValueError:
            return None
    b, a = np.asarray(original), np.asarray(candidate)
    if b.ndim != 2 or b.shape != a.shape or b.shape[1] < 2 or b.shape[0] == 0 or _numeric_kind(b) != "f":
        return None
    return float(np.mean(np.argmax(b.astype(np.float64), 1) == np.argmax(a.astype(np.float64), 1)))


def perturb_array(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``values`` with every finite non-zero element moved one ulp up or down in magnitude (random
    signs from ``rng``); zeros, NaN and inf are kept (as is a largest finite value that would round to inf).
    Works on float16, bfloat16, float32 and float64 by stepping the bit pattern."""
    values = np.asarray(values)
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[values.dtype.itemsize]
    bits = np.ascontiguousarray(values).view(uint)
    up = rng.integers(0, 2, size=values.shape, dtype=np.uint8).astype(bool)
    # (a NaN's stepped bits may be a signalling NaN, whose cast sets 'invalid': ``keep`` restores the NaN)
    with np.errstate(over="ignore", invalid="ignore"):
        stepped = np.where(up, bits + uint(1), bits - uint(1)).astype(uint).view(values.dtype).reshape(values.shape)
        wide = values.astype(np.float64)
        keep = (wide == 0) | ~np.isfinite(wide) | ~np.isfinite(stepped.astype(np.float64))
    return np.where(keep, values, stepped).astype(values.dtype)


def write_perturbed(model: onnx.ModelProto | str | os.PathLike, directory: str | os.PathLike, seed: Any) -> Path:
    """Write ``model`` with every floating-point initializer and Constant tensor perturbed by :func:`perturb_array`
    to ``directory``/model.onnx and return that path. Main-graph tensors of 1 KiB or more (and every tensor that
    was external) go to ``perturbed.data`` beside it, one tensor at a time, so a path with external data is never
    held whole. The caller's ModelProto is not modified."""
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        base = None
    else:
        proto = _load(model, "model", weights=False)
        base = Path(model).parent
    from bnfold.onnx.external import ExternalData

    reader = ExternalData(base) if base is not None else None
    data_name = "perturbed.data"
    with open(directory / data_name, "wb") as data_file:
        def visit(tensor: TensorProto, main: bool, frozen: bool) -> None:
            external = tensor.data_location == TensorProto.EXTERNAL
            perturb = tensor.data_type in _PERTURBED_TYPES and not frozen
            if not (perturb or external):
                return
            if external:
                if reader is None:
                    raise InputError(f"tensor '{tensor.name}' has external data but the model was given in memory")
                values = reader.read(tensor)
            else:
                values = _tensor_values(tensor)
            if perturb:
                values = perturb_array(values, rng)
            raw = np.ascontiguousarray(values).tobytes()
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "raw_data",
                          "external_data"):
                tensor.ClearField(field)
            if external or (main and len(raw) >= _EXTERNAL_MIN_BYTES):
                offset = data_file.tell()
                data_file.write(raw)
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
            else:
                tensor.data_location = TensorProto.DEFAULT
                tensor.raw_data = raw

        _visit_tensors(proto, visit)
    path = directory / "model.onnx"
    onnx.save(proto, str(path))
    return path


def real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that need values (models with IR version < 4 also list initializers among the inputs)."""
    initialized = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    return [vi for vi in graph.input if vi.name not in initialized]


def check_inputs(model: onnx.ModelProto, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``inputs`` as arrays, checked to name exactly the model's real inputs (InputError otherwise)."""
    if not isinstance(inputs, Mapping):
        raise InputError(f"inputs must map input names to arrays, not {type(inputs).__name__}")
    names = [vi.name for vi in real_inputs(model.graph)]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise InputError(f"inputs lacks a value for model input '{missing[0]}' (model inputs: {', '.join(names)})")
    extra = [n for n in inputs if n not in names]
    if extra:
        raise InputError(f"inputs names unknown input '{extra[0]}' (model inputs: {', '.join(names) or 'none'})")
    return {n: np.asarray(inputs[n]) for n in names}


# --------------------------------------------------------------------------------------------- arguments, inputs


def _load(model: Any, what: str, *, weights: bool = True) -> onnx.ModelProto:
    """A ModelProto as it is, or read from a path (``weights=False``: external data stays in its files)."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise InputError(f"cannot read {what} {path!r}: " + ("is a directory" if os.path.isdir(path)
                                                                    else "no such file"))
        try:
            return onnx.load(path, load_external_data=weights)
        except Exception as e:  # noqa: BLE001 - protobuf/IO errors of every kind mean "unreadable"
            raise InputError(f"cannot read {what} {path!r}: {first_line(e)}") from e
    raise InputError(f"{what} must be an onnx.ModelProto or a path, not {type(model).__name__}")


def _check_tolerances(atol: float | None, rtol: float | None) -> None:
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
            raise InputError(f"{name} must be a finite number >= 0, got {value!r}")


def _random_tensor(rng: np.random.Generator, graph: onnx.GraphProto, vi: onnx.ValueInfoProto,
                   given: Iterable[int] | None) -> np.ndarray:
    if vi.type.WhichOneof("value") != "tensor_type":
        raise InputError(f"cannot generate values for non-tensor input '{vi.name}'; pass inputs=")
    tt = vi.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    except Exception as e:  # noqa: BLE001 - unknown/undefined element type
        raise InputError(f"input '{vi.name}' has no usable element type ({tt.elem_type}); pass inputs=") from e
    shape = _input_shape(vi, given)

    name = _dtype_name(dtype)
    if name in ("float16", "float32", "float64", "bfloat16"):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, _integer_bound(graph, vi.name), size=shape).astype(dtype)
    raise InputError(f"cannot generate values for input '{vi.name}' of type {name}; pass inputs=")


def _integer_bound(graph: onnx.GraphProto, name: str) -> int:
    """Exclusive upper bound of valid random values for integer input ``name``: the smallest table it indexes
    (Gather indices into a constant), or 4 where it is only read as a value; InputError where it cannot tell."""
    tables = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tables[node.output[0]] = list(attr.t.dims)
    sizes = []
    for node in (n for n in graph.node if name in n.input):
        slots = [i for i, n in enumerate(node.input) if n == name]
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and slots == [1] and node.input[0] in tables:
            dims = tables[node.input[0]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0:
                sizes.append(dims[axis])
                continue
        elif node.op_type in _VALUE_READERS and node.domain in ("", "ai.onnx"):
            continue
        raise InputError(f"integer input '{name}' is read by {node.op_type} '{node.name or node.output[0]}', so "
                         f"bnfold cannot tell which values are valid: give real inputs with --data (or inputs=)")
    return min(sizes) if sizes else 4


def _input_shape(vi: onnx.ValueInfoProto, given: Iterable[int] | None) -> tuple[int, ...]:
    tt = vi.type.tensor_type
    if given is not None:
        try:
            given = tuple(int(d) for d in given)
        except (TypeError, ValueError) as e:
            raise InputError(f"input_shapes['{vi.name}'] must be a tuple of ints, got {given!r}") from e
        if any(d < 0 for d in given):
            raise InputError(f"input_shapes['{vi.name}'] = {given} has a negative dimension")
    if not tt.HasField("shape"):
        if given is None:
            raise InputError(f"input '{vi.name}' has unknown rank; give its shape with input_shapes")
        return given
    dims = tt.shape.dim
    if given is not None and len(given) != len(dims):
        raise InputError(
            f"input_shapes['{vi.name}'] = {given} has rank {len(given)}, but the model input has rank {len(dims)}"
        )
    shape = []
    for i, d in enumerate(dims):
        if d.HasField("dim_value"):
            if given is not None and given[i] != d.dim_value:
                raise InputError(
                    f"input_shapes['{vi.name}'] = {given} sets dimension {i} to {given[i]}, "
                    f"but the model fixes it to {d.dim_value}"
                )
            shape.append(d.dim_value)
        else:  # symbolic (dim_param) or unknown
            shape.append(given[i] if given is not None else 1)
    return tuple(shape)


# ------------------------------------------------------------------------------------------------ running models


class _OrtFailure(Exception):
    """onnxruntime could not create a session for, or run, one model."""

    def __init__(self, error: Exception):
        super().__init__(first_line(error))
        self.missing_kernel = ortlib.is_missing_kernel(error)


class _FellBack(Exception):
    """onnxruntime placed a CUDA session on CPU."""


class _Job:
    """One verification: the models, the input batches and the tolerances, run on one provider at a time."""

    def __init__(self, original, candidate, original_proto, candidate_proto, batches, atol, rtol, seed, real):
        self.original, self.candidate = original, candidate
        self.original_proto, self.candidate_proto = original_proto, candidate_proto
        self.batches = batches
        self.atol, self.rtol, self.seed, self.real = atol, rtol, seed, real
        self.low = _low_precision_types(original_proto) | _low_precision_types(candidate_proto)

    def run_on(self, short: str) -> ProviderResult:
        reason = ortlib.unavailable_reason(short)
        if reason:
            return ProviderResult(short, available=False, reason=reason)
        notes: list[str] = []
        emulate = False
        try:
            outs_o = _run(self.original, short, self.batches)
        except _FellBack:
            return ProviderResult(short, available=False, reason=ortlib.CUDA_FELL_BACK)
        except _OrtFailure as e:
            if short == "cuda" and ortlib.is_cuda_setup_error(str(e)):
                return ProviderResult(short, available=False, reason=f"CUDAExecutionProvider failed to start: {e}")
            if not (self.low and e.missing_kernel):
                raise InputError(f"onnxruntime cannot run the original model: {e}") from None
            emulate = True
        if not emulate:
            try:
                outs_c = _run(self.candidate, short, self.batches)
            except _OrtFailure as e:
                if not (self.low and e.missing_kernel):
                    return self._candidate_failed(short, f"onnxruntime cannot run the candidate model: {e}")
                emulate = True  # both models must run the same way, so the original is rerun emulated too

        batches = self.batches
        if emulate:
            kinds = "/".join(sorted(self.low, reverse=True))  # "float16", "bfloat16" or "float16/bfloat16"
            notes.append(f"{kinds} kernels missing on {short.upper()}: compared in float32 emulation")
            batches = [{n: _widen(a) for n, a in b.items()} for b in self.batches]
            original32 = _to_float32(_load(self.original, "original model"))
            try:
                outs_o = _run(original32, short, batches)
            except _OrtFailure as e:
                raise InputError(f"onnxruntime cannot run the original model: {e}") from None
            del original32
            try:
                outs_c = _run(_to_float32(_load(self.candidate, "candidate model")), short, batches)
            except _OrtFailure as e:
                return self._candidate_failed(short, f"onnxruntime cannot run the candidate model: {e}", notes)

        noise: dict[str, float] = {}
        if self.atol is None and self.rtol is None:
            noise = self._noise(short, batches, outs_o, emulate, notes)

        result = ProviderResult(short)
        for vi in self.original_proto.graph.output:
            name, dtype = vi.name, _declared_dtype(vi)
            if name not in outs_c[0]:
                notes.append(f"candidate model has no output '{name}'")
                result.outputs.append(failed_comparison(name, dtype))
                continue
            b, a = [o[name] for o in outs_o], [c[name] for c in outs_c]
            shape_b, shape_a = _shape_of(b[0]), _shape_of(a[0])
            if any(_shape_of(x) != _shape_of(y) for x, y in zip(b, a)):
                notes.append(f"output '{name}' has shape {shape_a} in the candidate model, {shape_b} in the original")
                result.outputs.append(failed_comparison(name, dtype))
                continue
            cmp = compare_arrays(name, b, a, noise=noise.get(name), atol=self.atol, rtol=self.rtol, dtype=dtype)
            if self.real:
                cmp.top1_agreement = top1_agreement(b, a)
            dtype_c = _declared_output_dtype(self.candidate_proto, name)
            if dtype_c is not None and cmp.dtype and dtype_c != cmp.dtype:
                notes.append(f"output '{name}' has type {dtype_c} in the candidate model, {cmp.dtype} in the original")
                cmp.passed = False
            result.outputs.append(cmp)
        result.reason = "; ".join(notes)
        return result

    def _noise(self, short: str, batches: list[dict], outs_o: list[dict], emulate: bool,
               notes: list[str]) -> dict[str, float]:
        """Per output, the largest difference the perturbed originals show (module docstring, step 2)."""
        noise: dict[str, float] = {}
        unstable: set[str] = set()
        for draw in range(NOISE_DRAWS):
            with tempfile.TemporaryDirectory(prefix="bnfold-noise-") as tmp:
                source = self.original if not emulate else _load(self.original, "original model")
                path = write_perturbed(source, tmp, seed=(self.seed, draw))
                model = _to_float32(_load(path, "perturbed model")) if emulate else path
                try:
                    outs_p = _run(model, short, batches)
                except (_OrtFailure, _FellBack) as e:
                    raise InputError(f"onnxruntime cannot run the original model with perturbed weights: {e}") \
                        from None
                del model
            for name in outs_o[0]:
                d = max_abs_difference([o[name] for o in outs_o], [p.get(name) for p in outs_p])
                if np.isfinite(d):
                    noise[name] = max(noise.get(name, 0.0), d)
                else:
                    unstable.add(name)
        for name in sorted(unstable):
            notes.append(f"output '{name}' changed shape or finiteness under the perturbation: judged against the "
                         "finite draws only")
        return noise

    def _candidate_failed(self, short: str, reason: str, notes: list[str] | None = None) -> ProviderResult:
        # A ProviderResult passes when all its outputs pass, so an unrunnable candidate needs failing outputs.
        outputs = [failed_comparison(vi.name, _declared_dtype(vi)) for vi in self.original_proto.graph.output]
        if not outputs:
            outputs = [failed_comparison("<model>", "")]
        return ProviderResult(short, reason="; ".join([*(notes or []), reason]), outputs=outputs)


def _run(model: onnx.ModelProto | str | os.PathLike, short: str, batches: list[dict]) -> list[dict]:
    """Every batch's outputs by name, from one session (freed before returning)."""
    renamed: dict[str, str] = {}
    if isinstance(model, onnx.ModelProto):
        model, renamed = _float_outputs(model)
    elif any(_elem_type(vi.type) == TensorProto.BFLOAT16 for vi in _load(model, "model", weights=False).graph.output):
        model, renamed = _float_outputs(_load(model, "model"))
    try:
        with ortlib.open_session(model, ortlib.session_options("disabled"), short) as (sess, _):
            if not ortlib.placed_on(sess, short):
                raise _FellBack()
            wanted = {i.name for i in sess.get_inputs()}
            names = [o.name for o in sess.get_outputs()]
            results = []
            for feeds in batches:
                values = sess.run(None, _ort_feeds(feeds, wanted))
                results.append({renamed.get(n, n): v for n, v in zip(names, values)})
            return results
    except _FellBack:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises many exception types; all mean "cannot run"
        raise _OrtFailure(e) from e


def _ort_feeds(feeds: dict[str, np.ndarray], wanted: set[str]) -> dict:
    """The feeds this session declares; bfloat16 arrays wrapped as OrtValues (onnxruntime takes no ml_dtypes)."""
    ort = ortlib.runtime()
    feed = {}
    for name, arr in feeds.items():
        if name not in wanted:
            continue
        if arr.dtype == ml_dtypes.bfloat16:
            arr = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(arr).view(np.uint16), TensorProto.BFLOAT16
            )
        feed[name] = arr
    return feed


def _float_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Append an exact Cast to float32 behind each bfloat16 graph output, which onnxruntime cannot hand to numpy.

    Returns the model (a copy when changed) and a map from the new output names back to the original ones.
    """
    graph = model.graph
    bf16 = [
        i
        for i, vi in enumerate(graph.output)
        if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.elem_type == TensorProto.BFLOAT16
    ]
    if not bf16:
        return model, {}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    taken = all_names(graph, set())
    renamed = {}
    for i in bf16:
        vi = graph.output[i]
        old = vi.name
        new = unique_name(f"{old}__bnfold_float32", taken)
        graph.node.append(helper.make_node("Cast", [old], [new], to=TensorProto.FLOAT, name=new))
        vi.name = new
        vi.type.tensor_type.elem_type = TensorProto.FLOAT
        renamed[new] = old
    return copy, renamed




def _tensor_values(tensor: TensorProto) -> np.ndarray:
    if tensor.data_type == TensorProto.BFLOAT16:  # numpy_helper gives bfloat16 back as float32 in older onnx
        if tensor.raw_data:
            return np.frombuffer(tensor.raw_data, dtype=ml_dtypes.bfloat16).reshape(tuple(tensor.dims)).copy()
        return np.asarray(tensor.int32_data, dtype=np.uint16).view(ml_dtypes.bfloat16).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def _visit_tensors(model: onnx.ModelProto, visit) -> None:
    """``visit(tensor, in_main_graph, frozen)`` for every initializer and Constant tensor, subgraphs and
    functions included; ``frozen``: read by an op in :data:`_SHAPE_READERS`."""

    def graph(g: onnx.GraphProto, main: bool) -> None:
        frozen = {n for node in g.node if node.op_type in _SHAPE_READERS for n in node.input}
        for t in g.initializer:
            visit(t, main, t.name in frozen)
        nodes(g.node, frozen)

    def nodes(node_list, frozen: set[str]) -> None:
        for node in node_list:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                    visit(attr.t, False, bool(set(node.output) & frozen))
                elif attr.type == onnx.AttributeProto.GRAPH:
                    graph(attr.g, False)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        graph(g, False)

    graph(model.graph, True)
    for f in model.functions:
        nodes(f.node, {n for node in f.node if node.op_type in _SHAPE_READERS for n in node.input})


# ------------------------------------------------------------------------------------------------ comparison


def _diff(b: Any, a: Any, atol: float, rtol: float) -> tuple[float, float, bool, bool]:
    """(max |a − b|, max |b| over finite values, exactly equal, every element within atol + rtol·|b|) of candidate
    ``a`` against original ``b``, recursing into containers."""
    if isinstance(b, dict) or isinstance(a, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or set(a) != set(b):
            return float("inf"), 0.0, False, False
        return _combine([_diff(b[k], a[k], atol, rtol) for k in b])
    if isinstance(b, (list, tuple)) or isinstance(a, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))) or len(a) != len(b):
            return float("inf"), 0.0, False, False
        return _combine([_diff(x, y, atol, rtol) for x, y in zip(b, a)])
    if a is None:
        return float("inf"), 0.0, False, False

    b, a = np.asarray(b), np.asarray(a)
    if a.shape != b.shape:
        return float("inf"), 0.0, False, False
    if b.size == 0:
        return 0.0, 0.0, True, True
    kind_a, kind_b = _numeric_kind(a), _numeric_kind(b)
    if kind_a is None or kind_b is None:  # strings, objects: equal or not
        same = bool(np.array_equal(a, b))
        return (0.0, 0.0, True, True) if same else (float("inf"), 0.0, False, False)

    wide = np.complex128 if "c" in (kind_a, kind_b) else np.float64
    a64, b64 = a.astype(wide), b.astype(wide)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        equal = (np.isnan(a64) & np.isnan(b64)) | (np.isinf(a64) & (a64 == b64))
        diff = np.abs(a64 - b64)
        diff = np.where(equal, 0.0, diff)
        diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only
        abs_b = np.abs(b64)
        finite_b = abs_b[np.isfinite(abs_b)]
        scale = float(finite_b.max()) if finite_b.size else 0.0
        close = bool((equal | (np.isfinite(diff) & (diff <= atol + rtol * abs_b))).all())
    max_abs = float(diff.max())
    exact = max_abs == 0.0
    if kind_a in "iub" and kind_b in "iub":
        exact = close = bool(np.array_equal(a, b))  # exact, also where float64 would round large integers
    return max_abs, scale, exact, close


def _combine(parts: list[tuple[float, float, bool, bool]]) -> tuple[float, float, bool, bool]:
    return (
        max((p[0] for p in parts), default=0.0),
        max((p[1] for p in parts), default=0.0),
        all(p[2] for p in parts),
        all(p[3] for p in parts),
    )


def _numeric_kind(a: np.ndarray) -> str | None:
    """'f' float (ml_dtypes too), 'c' complex, 'i'/'u' integer, 'b' bool, None for anything else."""
    if a.dtype.kind in "fciub":
        return a.dtype.kind
    if _dtype_name(a.dtype) in _FLOAT_NAMES:  # ml_dtypes bfloat16 has kind 'V'
        return "f"
    return None


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(int(dtype))).name
        except Exception:  # noqa: BLE001 - undefined element type
            return ""
    if isinstance(dtype, str):
        return dtype.lower()
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def _leaf_dtype_name(value: Any) -> str:
    if isinstance(value, dict):
        return next((_leaf_dtype_name(v) for v in value.values()), "")
    if isinstance(value, (list, tuple)):
        return next((_leaf_dtype_name(v) for v in value), "")
    return np.asarray(value).dtype.name


def _shape_of(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)}>"
    return tuple(np.shape(value))


def _declared_dtype(vi: onnx.ValueInfoProto) -> str | None:
    t = _elem_type(vi.type)
    return (_dtype_name(t) or None) if t else None


def _declared_output_dtype(model: onnx.ModelProto, name: str) -> str | None:
    for vi in model.graph.output:
        if vi.name == name:
            return _declared_dtype(vi)
    return None


def _elem_type(tp: onnx.TypeProto) -> int:
    """Element type of a tensor type, or of the tensors inside a sequence/optional type; 0 when unknown."""
    which = tp.WhichOneof("value")
    if which in ("tensor_type", "sparse_tensor_type"):
        return getattr(tp, which).elem_type
    if which in ("sequence_type", "optional_type"):
        return _elem_type(getattr(tp, which).elem_type)
    return 0


# --------------------------------------------------------------------------------------------- float32 emulation


def _widen(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.float16 or arr.dtype == ml_dtypes.bfloat16:
        return arr.astype(np.float32)  # exact: every float16/bfloat16 value is a float32 value
    return arr


def _low_precision_types(model: onnx.ModelProto) -> set[str]:
    """Names of the float16/bfloat16 element types used anywhere in the model (tensors, value types, casts)."""
    found: set[str] = set()

    def tensor(t: onnx.TensorProto) -> None:
        if t.data_type in _LOW_PRECISION:
            found.add(_LOW_PRECISION[t.data_type])

    def type_(tp: onnx.TypeProto) -> None:
        if _elem_type(tp) in _LOW_PRECISION:
            found.add(_LOW_PRECISION[_elem_type(tp)])

    def dtype_attr(node: onnx.NodeProto, attr: onnx.AttributeProto) -> None:
        if attr.i in _LOW_PRECISION:
            found.add(_LOW_PRECISION[attr.i])

    _walk_model(model, tensor, type_, dtype_attr)
    return found


def _to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every float16/bfloat16 tensor, value type and target type turned into float32.

    Covers initializers, Constant/ConstantOfShape (any tensor attribute), Cast targets and similar dtype attributes,
    graph inputs/outputs/value_info, in subgraphs of If/Loop/Scan and in model-local functions.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)

    def tensor(t: onnx.TensorProto) -> None:
        if t.data_type in _LOW_PRECISION:
            wide = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)
            wide.doc_string = t.doc_string
            t.CopyFrom(wide)

    def type_(tp: onnx.TypeProto) -> None:
        which = tp.WhichOneof("value")
        if which in ("tensor_type", "sparse_tensor_type"):
            inner = getattr(tp, which)
            if inner.elem_type in _LOW_PRECISION:
                inner.elem_type = TensorProto.FLOAT
        elif which in ("sequence_type", "optional_type"):
            type_(getattr(tp, which).elem_type)
        elif which == "map_type":
            type_(tp.map_type.value_type)

    def dtype_attr(node: onnx.NodeProto, attr: onnx.AttributeProto) -> None:
        if attr.i in _LOW_PRECISION:
            attr.i = TensorProto.FLOAT

    _walk_model(copy, tensor, type_, dtype_attr)
    return copy


def _walk_model(model: onnx.ModelProto, tensor, type_, dtype_attr) -> None:
    """Call the visitors on every tensor, value type and dtype attribute of the model, subgraphs included."""

    def nodes(node_list) -> None:
        for node in node_list:
            dtype_name = _DTYPE_ATTRS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    tensor(attr.t)
                elif attr.type == onnx.AttributeProto.TENSORS:
                    for t in attr.tensors:
                        tensor(t)
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    tensor(attr.sparse_tensor.values)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    graph(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        graph(g)
                elif attr.type == onnx.AttributeProto.TYPE_PROTO:
                    type_(attr.tp)
                elif attr.type == onnx.AttributeProto.INT and attr.name == dtype_name:
                    dtype_attr(node, attr)

    def graph(g: onnx.GraphProto) -> None:
        for t in g.initializer:
            tensor(t)
        for st in g.sparse_initializer:
            tensor(st.values)
        for vi in (*g.input, *g.output, *g.value_info):
            type_(vi.type)
        nodes(g.node)

    graph(model.graph)
    for f in model.functions:
        for vi in f.value_info:
            type_(vi.type)
        nodes(f.node)
