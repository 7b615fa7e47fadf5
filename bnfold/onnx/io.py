"""Loading and saving ONNX models: clear errors for bad files, atomic writes, external data kept external."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..errors import InputError

_PROTOBUF_LIMIT = 2**31 - 1


def load_model(path: "str | os.PathLike") -> onnx.ModelProto:
    """Read a model and its external data; any problem becomes an InputError with one line."""
    return load_model_with_info(path)[0]


def load_model_with_info(path: "str | os.PathLike") -> tuple[onnx.ModelProto, bool]:
    """``(model, external)``: the model with its external data loaded, and whether the file used external data
    (so that the output can keep it)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an ONNX file")
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not head:
        raise InputError(f"{path}: empty file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not an ONNX model (protobuf parse failed: {_first_line(exc)})") from None
    except Exception as exc:  # onnx raises a variety of types for garbage
        raise InputError(f"{path}: not an ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise InputError(f"{path}: not an ONNX model (no graph)")
    if not model.opset_import and model.ir_version >= 3:
        raise InputError(f"{path}: invalid model: no opset_import")
    external = has_external_data(model)
    if external:
        try:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise InputError(f"{path}: cannot load external data ({_first_line(exc)})") from None
    return model, external


def has_external_data(model: onnx.ModelProto) -> bool:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return any(uses_external_data(t) for t in _get_all_tensors(model))


def save_model(model: onnx.ModelProto, path: "str | os.PathLike", *, external_data: bool | None = None) -> None:
    """Write atomically: a temporary file beside the target, then a rename. No partial output on failure.

    ``external_data``: write tensors to ``<name>.data`` beside the model (None: only when the model exceeds the 2 GB
    protobuf limit). Saving with external data moves the tensors out of the in-memory model.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"{path}: output directory {directory} does not exist")
    if external_data is None:
        external_data = model.ByteSize() > _PROTOBUF_LIMIT
    try:
        tmp_dir = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        tmp_model = Path(tmp_dir) / path.name
        data_name = f"{path.name}.data"
        if external_data:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(Path(tmp_dir) / data_name, directory / data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(tmp_model, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
