"""bnfold: fold inference-time BatchNormalization into neighbouring linear ops, and prove nothing changed.

Importing ``bnfold`` imports neither torch nor onnxruntime; those load when a function needs them.
"""

from .errors import BnfoldError, InputError
from .report import ExitCode, Fold, FoldReport, OutputComparison, ProviderResult, Skip, VerifyReport
from .bench import benchmark  # imports onnxruntime only when called
from .verify import verify  # imports onnxruntime only when called

__all__ = ["fold_onnx", "verify", "benchmark", "FoldReport", "Fold", "Skip", "VerifyReport", "ProviderResult",
           "OutputComparison", "ExitCode", "BnfoldError", "InputError"]
__version__ = "0.1.0"


def fold_onnx(model, *, skip=(), inplace=False):
    """Fold BatchNormalization in an ONNX model: ``(folded ModelProto, FoldReport)``. See bnfold.onnx.fold."""
    from .onnx.fold import fold_onnx as _fold_onnx

    return _fold_onnx(model, skip=skip, inplace=inplace)


