"""bnfold: fold inference-time BatchNormalization into neighbouring linear ops, and prove nothing changed.

Importing ``bnfold`` is cheap: it imports neither torch nor onnxruntime, nor onnx and numpy; every name below loads
its module when first used.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from .version import __version__

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily through __getattr__
    import os
    from typing import Any

    import onnx

    from .bench import benchmark
    from .errors import BnfoldError, InputError
    from .onnx.fold import fold_onnx
    from .pipeline import FoldResult, fold_path
    from .report import ExitCode, Fold, FoldReport, OutputComparison, ProviderResult, Skip, VerifyReport

# public name -> module that defines it
_LAZY = {
    "fold_onnx": "bnfold.onnx.fold",
    "fold_path": "bnfold.pipeline",
    "FoldResult": "bnfold.pipeline",
    "benchmark": "bnfold.bench",
    "FoldReport": "bnfold.report",
    "Fold": "bnfold.report",
    "Skip": "bnfold.report",
    "VerifyReport": "bnfold.report",
    "ProviderResult": "bnfold.report",
    "OutputComparison": "bnfold.report",
    "ExitCode": "bnfold.report",
    "BnfoldError": "bnfold.errors",
    "InputError": "bnfold.errors",
}

__all__ = ["fold_onnx", "fold_path", "FoldResult", "verify", "benchmark", "FoldReport", "Fold", "Skip",
           "VerifyReport", "ProviderResult", "OutputComparison", "ExitCode", "BnfoldError", "InputError",
           "__version__"]


def verify(original: onnx.ModelProto | str | os.PathLike, folded: onnx.ModelProto | str | os.PathLike,
           **options: Any) -> VerifyReport:
    """Run original and folded ONNX models on the same inputs and compare every output: a truthy VerifyReport.
    See :func:`bnfold.verify.verify` for the options (providers, input_shapes, inputs, data, atol, rtol, seed)."""
    from .verify import verify as verify_models

    return verify_models(original, folded, **options)


class _Package(types.ModuleType):
    """Importing the submodule ``bnfold.verify`` sets the package attribute of that name to the module; the
    package-level function of the same name stays (the module is in ``sys.modules`` for whoever imports it)."""

    def __setattr__(self, name: str, value) -> None:
        if name == "verify" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
