"""onnxruntime in one place: provider names, which providers can run here, session options and session creation.

verify, bench and onnx/calibrate create every session through :func:`open_session`, so the rules below hold for
all of them:

* Providers have short names (``cpu``, ``cuda``); full onnxruntime names and any case are accepted too.
  The default is ``cpu`` plus ``cuda`` when this onnxruntime build offers it.
* A CUDA session lists CPU as its fallback; a session that onnxruntime silently placed on CPU instead (no driver,
  no cuDNN) is detected with :func:`placed_on` and reported as "provider unavailable", never as a result.
* A session is created from a file path when the model is a path (onnxruntime reads or maps the weights itself,
  bnfold holds no copy), from serialized bytes when it is a ModelProto under the 2 GiB protobuf limit, and from a
  temporary file with external data above it.

``import bnfold.ort`` does not import onnxruntime; every function imports it when called.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

import onnx

from .errors import InputError

__all__ = ["PROVIDERS", "OPT_LEVELS", "CUDA_MISSING", "CUDA_FELL_BACK", "MAX_INLINE_BYTES", "runtime",
           "available_providers", "resolve_providers", "unavailable_reason", "session_options",
           "session_providers", "open_session", "placed_on", "is_cuda_setup_error", "is_missing_kernel"]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_SHORT = {full.lower(): short for short, full in PROVIDERS.items()}

# bnfold's names of onnxruntime's graph optimization levels.
OPT_LEVELS = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

CUDA_MISSING = (
    "CUDAExecutionProvider not available in this onnxruntime build (install onnxruntime-gpu and a CUDA runtime)"
)
CUDA_FELL_BACK = (
    "CUDAExecutionProvider could not be initialized, onnxruntime fell back to CPUExecutionProvider "
    "(check the CUDA and cuDNN runtime libraries)"
)

# Serialized protobuf messages cannot exceed 2 GiB; above this, sessions are created from a file with external data.
MAX_INLINE_BYTES = 1_800_000_000


def runtime() -> Any:
    """The onnxruntime module (imported now; looked up at every call so that tests can stand in for it)."""
    import onnxruntime

    return onnxruntime


def available_providers() -> list[str]:
    """Short names of the execution providers this onnxruntime build offers, e.g. ``["cpu"]`` or ``["cpu", "cuda"]``.

    Listing ``cuda`` means onnxruntime was built with CUDA; whether a CUDA device and runtime are really present
    only shows when a session is created (see :func:`placed_on`).
    """
    offered = set(runtime().get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in offered]


def resolve_providers(providers: Iterable[str] | str | None) -> list[str]:
    """Short names, in order, without duplicates. ``None``: ``cpu`` plus ``cuda`` when this build offers it.
    Raises :class:`InputError` for a name that is not a provider bnfold knows."""
    if providers is None:
        return ["cpu"] + (["cuda"] if "cuda" in available_providers() else [])
    if isinstance(providers, str):
        providers = [providers]
    resolved: list[str] = []
    for p in providers:
        key = str(p).strip().lower()
        short = key if key in PROVIDERS else _SHORT.get(key)
        if short is None:
            raise InputError(f"unknown provider '{p}' (choose from {', '.join(PROVIDERS)})")
        if short not in resolved:
            resolved.append(short)
    return resolved


def unavailable_reason(short: str) -> str:
    """Why provider ``short`` cannot run in this onnxruntime build, or "" when the build offers it."""
    if PROVIDERS[short] in runtime().get_available_providers():
        return ""
    return CUDA_MISSING if short == "cuda" else f"{PROVIDERS[short]} not available"


def session_options(opt_level: str = "disabled", *, threads: int | None = None, timing: bool = False) -> Any:
    """SessionOptions at one of :data:`OPT_LEVELS`, quiet (warnings off).

    ``disabled`` is what verification and calibration use: onnxruntime's own Conv+BN fusion would make a wrong
    fold look right. ``threads`` sets intra-op threads. ``timing`` adds what a fair latency measurement needs:
    one inter-op thread, sequential execution, and no spinning workers (each session owns a thread pool, and idle
    workers that spin would steal the cores from the next model's run).
    """
    ort = runtime()
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if timing:
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def session_providers(short: str) -> list:
    """The provider list a session for ``short`` is created with (CUDA device 0 with CPU as fallback)."""
    if short == "cuda":
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    return [PROVIDERS[short]]


@contextlib.contextmanager
def open_session(model: onnx.ModelProto | str | os.PathLike, options: Any, short: str = "cpu"
                 ) -> Iterator[tuple[Any, float]]:
    """``(session, seconds its creation took)`` for ``model`` on provider ``short``; closed (released) on exit.

    A path is handed to onnxruntime as it is (external data is read from beside it). A ModelProto under
    :data:`MAX_INLINE_BYTES` is serialized; a larger one is saved to a temporary directory with external data
    first (not timed), which lives as long as the session. onnxruntime's exceptions pass through unchanged.
    """
    ort = runtime()
    providers = session_providers(short)
    if isinstance(model, (str, os.PathLike)):
        start = time.perf_counter()
        sess = ort.InferenceSession(os.fspath(model), options, providers=providers)
        yield sess, time.perf_counter() - start
        return
    if model.ByteSize() <= MAX_INLINE_BYTES:
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


def placed_on(session: Any, short: str) -> bool:
    """Whether onnxruntime really placed ``session`` on provider ``short`` (CUDA may silently fall back)."""
    return session.get_providers()[0] == PROVIDERS[short]


def is_cuda_setup_error(message: str) -> bool:
    """A missing driver, device or CUDA/cuDNN library shows up as an exception from session creation rather than a
    silent fallback in some onnxruntime builds; that says nothing about the model."""
    lowered = message.lower()
    return any(word in lowered for word in ("cuda", "cudnn", "cublas", "libcu"))


def is_missing_kernel(error: Exception) -> bool:
    """onnxruntime has no kernel for an operator at this element type (float16/bfloat16 on CPU, mostly)."""
    text = str(error)
    return (type(error).__name__ == "NotImplemented" or "NOT_IMPLEMENTED" in text
            or "Could not find an implementation" in text)
