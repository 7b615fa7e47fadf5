"""Check that a folded ONNX model computes the same function as the original.

Both models are run with onnxruntime on the same seeded inputs, on each requested execution provider, and every
output of the original model is compared with the folded model's output of the same name. The result is a
:class:`~bnfold.report.VerifyReport`, truthy when every provider that could run passed on every output.

How outputs are compared (``b`` = original output, ``a`` = folded output, both widened to float64):

* ``max_abs_error = max |a - b|`` and ``max_rel_error = max |a - b| / max(|b|, tiny)`` with ``tiny`` the smallest
  normal float32. Positions where both are NaN, or both are the same infinity, count as equal; NaN on one side
  only is an error of ``inf``.
* An output passes when every element satisfies ``|a - b| <= atol + rtol * |b|`` (numpy.isclose semantics).
* Integer, bool and string outputs must match exactly (``atol = rtol = 0``). Empty outputs pass.
* An output missing from the folded model, or with a different shape or element type, fails.

Default tolerances by output element type, used unless ``atol`` / ``rtol`` is given (an explicit value applies to
every floating-point output):

============  =======  =======
dtype         atol     rtol
============  =======  =======
float64       1e-7     1e-7
float32       1e-4     1e-3
float16       2e-2     2e-2
bfloat16      1e-1     1e-1
============  =======  =======

Sessions are created with graph optimizations disabled for both models: onnxruntime folds Conv+BatchNormalization
itself at session start, which would hide a wrong fold.

The onnxruntime CPU provider has no bfloat16 kernels for most operators (Conv, Gemm, MatMul, BatchNormalization,
Relu, Add, ...). When onnxruntime reports a missing float16/bfloat16 kernel, both models are converted to float32
copies and compared in that emulation, still with the original element type's tolerances; the inputs are drawn in
the original element type first, so both models see identical values. The provider's ``reason`` says so.

``import bnfold.verify`` does not import onnxruntime; it is imported when a function needs it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import InputError, first_line
from bnfold.onnx.graph import all_names, unique_name
from bnfold.report import OutputComparison, ProviderResult, VerifyReport

__all__ = ["verify", "available_providers", "default_tolerances", "make_inputs", "compare_arrays",
           "failed_comparison"]

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_SHORT = {full.lower(): short for short, full in _PROVIDERS.items()}
_CUDA_MISSING = (
    "CUDAExecutionProvider not available in this onnxruntime build (install onnxruntime-gpu and a CUDA runtime)"
)
_CUDA_FELL_BACK = (
    "CUDAExecutionProvider could not be initialized, onnxruntime fell back to CPUExecutionProvider "
    "(check the CUDA and cuDNN runtime libraries)"
)

_TOLERANCES = {
    "float64": (1e-7, 1e-7),
    "float32": (1e-4, 1e-3),
    "float16": (2e-2, 2e-2),
    "bfloat16": (1e-1, 1e-1),
    # complex outputs are judged by the precision of their parts
    "complex128": (1e-7, 1e-7),
    "complex64": (1e-4, 1e-3),
}
_TINY = float(np.finfo(np.float32).tiny)

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

# Serialized protobuf messages cannot exceed 2 GiB; above this, sessions are created from a file with external data.
_MAX_INLINE_BYTES = 1_800_000_000


# --------------------------------------------------------------------------------------------------- public API


def available_providers() -> list[str]:
    """Short names of the execution providers this onnxruntime build offers, e.g. ``["cpu"]`` or ``["cpu", "cuda"]``.

    Listing ``cuda`` means onnxruntime was built with CUDA; whether a CUDA device and runtime are really present
    only shows when a session is created (:func:`verify` then reports the provider as unavailable).
    """
    import onnxruntime as ort

    offered = set(ort.get_available_providers())
    return [short for short, full in _PROVIDERS.items() if full in offered]


def default_tolerances(dtype: Any) -> tuple[float, float]:
    """The ``(atol, rtol)`` applied to an output of element type ``dtype`` when none is given.

    ``dtype`` may be a numpy dtype or type, a dtype name (``"bfloat16"``) or an ONNX ``TensorProto`` element type.
    float64: (1e-7, 1e-7); float32: (1e-4, 1e-3); float16: (2e-2, 2e-2); bfloat16: (1e-1, 1e-1).
    Every other type (integers, bool, strings) is compared exactly: (0.0, 0.0).
    """
    return _TOLERANCES.get(_dtype_name(dtype), (0.0, 0.0))


def make_inputs(
    model: onnx.ModelProto | str | os.PathLike,
    input_shapes: Mapping[str, Iterable[int]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded random values for every real graph input of ``model`` (inputs that are not initializers).

    Floating-point inputs are standard normal in their own element type (float16, float32, float64, bfloat16),
    integer inputs are integers in ``[0, 4)``, bool inputs random bools. A static dimension is used as declared;
    a symbolic or missing one takes its value from ``input_shapes`` (``{name: full shape}``) if given, else 1.
    Raises :class:`InputError` for unknown names in ``input_shapes``, a wrong rank, a size that contradicts a
    static dimension, or an input whose values cannot be generated (non-tensor or string inputs).
    """
    model = _load(model, "model")
    inputs = _real_inputs(model.graph)
    shapes = dict(input_shapes or {})
    names = [vi.name for vi in inputs]
    unknown = [n for n in shapes if n not in names]
    if unknown:
        raise InputError(
            f"input_shapes names unknown input '{unknown[0]}' (model inputs: {', '.join(names) or 'none'})"
        )
    rng = np.random.default_rng(seed)
    return {vi.name: _random_tensor(rng, vi, shapes.get(vi.name)) for vi in inputs}


def compare_arrays(
    name: str,
    original: Any,
    folded: Any,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    dtype: Any = None,
) -> OutputComparison:
    """Compare one output of the folded model with the original's, by the rules in the module docstring.

    ``dtype`` is the element type that selects the default tolerances (the original's declared type; when the
    values were computed in a float32 emulation it differs from the arrays' own type). Defaults to ``original``'s.
    ``original`` and ``folded`` may be arrays, or (nested) lists/dicts of arrays as onnxruntime returns for
    sequence and map outputs.
    """
    dtype_name = _dtype_name(dtype) if dtype is not None else _leaf_dtype_name(original)
    d_atol, d_rtol = _TOLERANCES.get(dtype_name, (0.0, 0.0))
    is_float = dtype_name in _TOLERANCES
    atol = float(atol) if atol is not None and is_float else float(d_atol)
    rtol = float(rtol) if rtol is not None and is_float else float(d_rtol)
    max_abs, max_rel, passed = _diff(original, folded, atol, rtol)
    return OutputComparison(name, max_abs, max_rel, atol, rtol, passed, dtype=dtype_name)


def verify(
    original: onnx.ModelProto | str | os.PathLike,
    folded: onnx.ModelProto | str | os.PathLike,
    *,
    providers: Iterable[str] | str | None = None,
    input_shapes: Mapping[str, Iterable[int]] | None = None,
    inputs: Mapping[str, Any] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> VerifyReport:
    """Run ``original`` and ``folded`` on the same inputs and compare every output of the original.

    ``original`` / ``folded``: ModelProto or path. ``providers``: short names (``"cpu"``, ``"cuda"``, any case) or
    full onnxruntime names; default ``cpu`` plus ``cuda`` when this onnxruntime offers it. A provider that cannot
    run here is reported with ``available=False`` and the reason. ``inputs`` (name -> array) replaces generated
    inputs entirely; otherwise :func:`make_inputs` draws them with ``seed`` and ``input_shapes``. ``atol``/``rtol``
    override the per-dtype defaults (:func:`default_tolerances`) for floating-point outputs.

    Raises :class:`InputError` for an unknown provider, bad inputs or shapes, or when onnxruntime cannot run the
    original model. A folded model that onnxruntime cannot run fails the provider (with the reason) instead.
    """
    import onnxruntime as ort

    original = _load(original, "original model")
    folded = _load(folded, "folded model")
    wanted = _resolve_providers(ort, providers)
    if inputs is not None:
        feeds = _check_inputs(original, inputs)
    else:
        feeds = make_inputs(original, input_shapes, seed)

    report = VerifyReport(seed=seed)
    for short in wanted:
        report.providers[short] = _verify_on(ort, short, original, folded, feeds, atol, rtol)
    return report


# --------------------------------------------------------------------------------------------- arguments, inputs


def _load(model: Any, what: str) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        try:
            return onnx.load(os.fspath(model))
        except Exception as e:  # noqa: BLE001 - protobuf/IO errors of every kind mean "unreadable"
            raise InputError(f"cannot read {what} {os.fspath(model)!r}: {first_line(e)}") from e
    raise InputError(f"{what} must be an onnx.ModelProto or a path, not {type(model).__name__}")


def _resolve_providers(ort: Any, providers: Iterable[str] | str | None) -> list[str]:
    if providers is None:
        return ["cpu"] + (["cuda"] if _PROVIDERS["cuda"] in ort.get_available_providers() else [])
    if isinstance(providers, str):
        providers = [providers]
    resolved: list[str] = []
    for p in providers:
        key = str(p).strip().lower()
        short = key if key in _PROVIDERS else _SHORT.get(key)
        if short is None:
            raise InputError(f"unknown provider '{p}' (choose from {', '.join(_PROVIDERS)})")
        if short not in resolved:
            resolved.append(short)
    return resolved


def _real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    # Models with IR version < 4 list initializers among the inputs; those need no values.
    initialized = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    return [vi for vi in graph.input if vi.name not in initialized]


def _check_inputs(model: onnx.ModelProto, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    names = [vi.name for vi in _real_inputs(model.graph)]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise InputError(f"inputs lacks a value for model input '{missing[0]}' (model inputs: {', '.join(names)})")
    extra = [n for n in inputs if n not in names]
    if extra:
        raise InputError(f"inputs names unknown input '{extra[0]}' (model inputs: {', '.join(names) or 'none'})")
    return {n: np.asarray(inputs[n]) for n in names}


def _random_tensor(rng: np.random.Generator, vi: onnx.ValueInfoProto, given: Iterable[int] | None) -> np.ndarray:
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
        return rng.integers(0, 4, size=shape).astype(dtype)
    raise InputError(f"cannot generate values for input '{vi.name}' of type {name}; pass inputs=")


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
        self.missing_kernel = _is_missing_kernel(error)


def _verify_on(
    ort: Any,
    short: str,
    original: onnx.ModelProto,
    folded: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    atol: float | None,
    rtol: float | None,
) -> ProviderResult:
    full = _PROVIDERS[short]
    if full not in ort.get_available_providers():
        reason = _CUDA_MISSING if short == "cuda" else f"{full} not available"
        return ProviderResult(short, available=False, reason=reason)

    low = _low_precision_types(original) | _low_precision_types(folded)
    emulate = False
    try:
        out_o, used = _run(ort, original, full, feeds)
    except _OrtFailure as e:
        if short == "cuda" and _is_cuda_setup_error(str(e)):
            return ProviderResult(short, available=False, reason=f"CUDAExecutionProvider failed to start: {e}")
        if not (low and e.missing_kernel):
            raise InputError(f"onnxruntime cannot run the original model: {e}") from None
        emulate = True
    else:
        if used != full:
            return ProviderResult(short, available=False, reason=_CUDA_FELL_BACK)
        try:
            out_f, _ = _run(ort, folded, full, feeds)
        except _OrtFailure as e:
            if not (low and e.missing_kernel):
                return _folded_failed(short, original, f"onnxruntime cannot run the folded model: {e}")
            emulate = True  # both models must run the same way, so the original is rerun emulated too

    notes = []
    if emulate:
        kinds = "/".join(sorted(low, reverse=True))  # "float16", "bfloat16" or "float16/bfloat16"
        notes.append(f"{kinds} kernels missing on {short.upper()}: compared in float32 emulation")
        feeds32 = {n: _widen(a) for n, a in feeds.items()}
        try:
            out_o, used = _run(ort, _to_float32(original), full, feeds32)
        except _OrtFailure as e:
            raise InputError(f"onnxruntime cannot run the original model: {e}") from None
        if used != full:
            return ProviderResult(short, available=False, reason=_CUDA_FELL_BACK)
        try:
            out_f, _ = _run(ort, _to_float32(folded), full, feeds32)
        except _OrtFailure as e:
            return _folded_failed(short, original, f"onnxruntime cannot run the folded model: {e}", notes)

    result = ProviderResult(short)
    for vi in original.graph.output:
        name = vi.name
        dtype = _declared_dtype(vi)
        if name not in out_f:
            notes.append(f"folded model has no output '{name}'")
            result.outputs.append(failed_comparison(name, dtype, atol, rtol))
            continue
        a, b = out_f[name], out_o[name]
        shape_a, shape_b = _shape_of(a), _shape_of(b)
        if shape_a != shape_b:
            notes.append(f"output '{name}' has shape {shape_a} in the folded model, {shape_b} in the original")
            result.outputs.append(failed_comparison(name, dtype, atol, rtol))
            continue
        cmp = compare_arrays(name, b, a, atol=atol, rtol=rtol, dtype=dtype)
        dtype_f = _folded_dtype(folded, name)
        if dtype_f is not None and cmp.dtype and dtype_f != cmp.dtype:
            notes.append(f"output '{name}' has type {dtype_f} in the folded model, {cmp.dtype} in the original")
            cmp.passed = False
        result.outputs.append(cmp)
    result.reason = "; ".join(notes)
    return result


def _run(ort: Any, model: onnx.ModelProto, provider: str, feeds: dict[str, np.ndarray]) -> tuple[dict, str]:
    """Outputs by name, and the provider the session actually placed first (CUDA may silently fall back)."""
    model, renamed = _float_outputs(model)
    feed = _ort_feeds(ort, model, feeds)
    options = ort.SessionOptions()
    # onnxruntime's own Conv+BN fusion would make a wrong fold look right
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if provider == "CUDAExecutionProvider":
        session_providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    else:
        session_providers = [provider]
    try:
        with ort_session(ort, model, options, session_providers) as (sess, _):
            return _run_session(sess, feed, renamed)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises many exception types; all mean "cannot run"
        raise _OrtFailure(e) from e


@contextlib.contextmanager
def ort_session(ort: Any, model: onnx.ModelProto, options: Any, providers: list):
    """``(session, seconds it took to create)`` for ``model``. Models whose protobuf would pass 2 GiB are saved to a
    temporary file with external data first (not timed), which lives as long as the session."""
    if model.ByteSize() <= _MAX_INLINE_BYTES:
        data = model.SerializeToString()
        start = time.perf_counter()
        sess = ort.InferenceSession(data, options, providers=providers)
        elapsed = time.perf_counter() - start
        del data
        yield sess, elapsed
        return
    with tempfile.TemporaryDirectory(prefix="bnfold-ort-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # saving with external data rewrites the tensors it saves
        onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.data")
        del copy
        start = time.perf_counter()
        sess = ort.InferenceSession(path, options, providers=providers)
        elapsed = time.perf_counter() - start
        try:
            yield sess, elapsed
        finally:
            del sess  # release the files before the directory goes


def _run_session(sess: Any, feed: dict, renamed: dict[str, str]) -> tuple[dict, str]:
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(None, feed)
    return {renamed.get(n, n): v for n, v in zip(names, values)}, sess.get_providers()[0]


def _ort_feeds(ort: Any, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict:
    """The feeds this model declares; bfloat16 arrays wrapped as OrtValues (onnxruntime takes no ml_dtypes arrays)."""
    wanted = {vi.name for vi in _real_inputs(model.graph)}
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


def _folded_failed(
    short: str, original: onnx.ModelProto, reason: str, notes: list[str] | None = None
) -> ProviderResult:
    # A ProviderResult passes when all its outputs pass, so an unrunnable folded model needs failing outputs.
    outputs = [failed_comparison(vi.name, _declared_dtype(vi), None, None) for vi in original.graph.output]
    if not outputs:
        outputs = [OutputComparison("<model>", float("inf"), float("inf"), 0.0, 0.0, False)]
    return ProviderResult(short, reason="; ".join([*(notes or []), reason]), outputs=outputs)


def failed_comparison(name: str, dtype: str | None, atol: float | None, rtol: float | None) -> OutputComparison:
    """An output that could not be compared (missing, other shape or dtype, a run that raised): an infinite
    error, with the tolerances that would have applied to it."""
    d_atol, d_rtol = default_tolerances(dtype) if dtype else (0.0, 0.0)
    is_float = d_atol > 0 or d_rtol > 0
    return OutputComparison(
        name,
        float("inf"),
        float("inf"),
        float(atol) if atol is not None and is_float else d_atol,
        float(rtol) if rtol is not None and is_float else d_rtol,
        False,
        dtype=dtype or "",
    )


def _is_missing_kernel(error: Exception) -> bool:
    text = str(error)
    return (
        type(error).__name__ == "NotImplemented"
        or "NOT_IMPLEMENTED" in text
        or "Could not find an implementation" in text
    )


def _is_cuda_setup_error(message: str) -> bool:
    # A missing driver, device or CUDA/cuDNN library shows up as an exception from session creation rather than a
    # silent fallback in some onnxruntime builds; that says nothing about the model.
    lowered = message.lower()
    return any(word in lowered for word in ("cuda", "cudnn", "cublas", "libcu"))


# ------------------------------------------------------------------------------------------------ comparison


def _diff(b: Any, a: Any, atol: float, rtol: float) -> tuple[float, float, bool]:
    """(max abs error, max rel error, passed) of folded ``a`` against original ``b``, recursing into containers."""
    if isinstance(b, dict) or isinstance(a, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or set(a) != set(b):
            return float("inf"), float("inf"), False
        parts = [_diff(b[k], a[k], atol, rtol) for k in b]
        return _combine(parts)
    if isinstance(b, (list, tuple)) or isinstance(a, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))) or len(a) != len(b):
            return float("inf"), float("inf"), False
        return _combine([_diff(x, y, atol, rtol) for x, y in zip(b, a)])

    b, a = np.asarray(b), np.asarray(a)
    if a.shape != b.shape:
        return float("inf"), float("inf"), False
    if b.size == 0:
        return 0.0, 0.0, True
    kind_a, kind_b = _numeric_kind(a), _numeric_kind(b)
    if kind_a is None or kind_b is None:  # strings, objects: equal or not
        same = bool(np.array_equal(a, b))
        return (0.0, 0.0, True) if same else (float("inf"), float("inf"), False)

    wide = np.complex128 if "c" in (kind_a, kind_b) else np.float64
    a64, b64 = a.astype(wide), b.astype(wide)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        equal = (np.isnan(a64) & np.isnan(b64)) | (np.isinf(a64) & (a64 == b64))
        diff = np.abs(a64 - b64)
        diff = np.where(equal, 0.0, diff)
        diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only
        abs_b = np.abs(b64)
        rel = np.where(diff == 0, 0.0, diff / np.maximum(abs_b, _TINY))
        rel = np.where(np.isnan(rel), np.inf, rel)  # inf / inf
        ok = equal | (np.isfinite(diff) & (diff <= atol + rtol * abs_b))
    passed = bool(ok.all())
    if kind_a in "iub" and kind_b in "iub":
        passed = bool(np.array_equal(a, b))  # exact, also where float64 would round large integers
    return float(diff.max()), float(rel.max()), passed


def _combine(parts: list[tuple[float, float, bool]]) -> tuple[float, float, bool]:
    return (
        max((p[0] for p in parts), default=0.0),
        max((p[1] for p in parts), default=0.0),
        all(p[2] for p in parts),
    )


def _numeric_kind(a: np.ndarray) -> str | None:
    """'f' float (ml_dtypes too), 'c' complex, 'i'/'u' integer, 'b' bool, None for anything else."""
    if a.dtype.kind in "fciub":
        return a.dtype.kind
    if _dtype_name(a.dtype) in _TOLERANCES:  # ml_dtypes bfloat16 has kind 'V'
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


def _folded_dtype(folded: onnx.ModelProto, name: str) -> str | None:
    for vi in folded.graph.output:
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
