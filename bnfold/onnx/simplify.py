"""Optional pre-simplification with onnxsim, with onnxsim's own BatchNormalization fusion turned off so that every
fold goes through bnfold's exact, reported rules."""

from __future__ import annotations

import onnx

from ..errors import InputError, first_line


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """A simplified copy of ``model`` (the argument is not modified)."""
    try:
        import onnxsim
    except ImportError:
        raise InputError("--simplify needs onnxsim: pip install 'bnfold[simplify]'") from None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        simplified, ok = onnxsim.simplify(copy, skip_fuse_bn=True, check_n=0)
    except Exception as exc:
        raise InputError(f"onnxsim failed: {first_line(exc)}") from None
    if not ok:
        raise InputError("onnxsim could not validate the simplified model")
    return simplified
