"""bnfold for PyTorch modules. Importing this package imports torch (``import bnfold`` alone does not).

``fold_module`` folds BatchNorm layers into the Conv/ConvTranspose/Linear layers next to them, with the same
float64 math and report types as the ONNX side; ``verify`` and ``benchmark`` compare the result with the original.
"""

from .fold import fold_module

__all__ = ["fold_module", "verify", "benchmark"]


def __getattr__(name):  # verify/benchmark live in their own module, loaded on first use
    if name in ("verify", "benchmark"):
        import importlib

        module = importlib.import_module(f"{__name__}.verify")
        # importing the submodule bound the name "verify" to it: bind the functions instead
        globals().update(verify=module.verify, benchmark=module.benchmark)
        return globals()[name]
    raise AttributeError(f"module 'bnfold.torch' has no attribute {name!r}")
