"""bnfold for PyTorch modules. Importing this package imports torch (``import bnfold`` alone does not).

``fold_module`` folds BatchNorm layers into the Conv/ConvTranspose/Linear layers next to them, with the same
float64 math and report types as the ONNX side; ``verify`` and ``benchmark`` compare the result with the original;
``recalibrate`` recomputes BatchNorm statistics from data (PreciseBN-style, all-reduced under torch.distributed);
``bnfold.torch.export.fold_exported`` folds ``torch.export`` programs (``bnfold MODEL.pt2``).
"""

from .calibrate import recalibrate
from .fold import fold_module
from .verify import benchmark, verify

__all__ = ["fold_module", "verify", "benchmark", "recalibrate"]
