"""bnfold for PyTorch modules. Importing this package imports torch (``import bnfold`` alone does not).

``fold_module`` folds every batch norm the forward computes (BatchNorm modules and subclasses, functional
``batch_norm`` calls, frozen batch norms) into the Conv/ConvTranspose/Linear layers next to them, with the same
float64 math and report types as the ONNX side, as a GraphModule or (``keep_class=True``) as the user's own
module; ``verify`` and ``benchmark`` compare the result with the original;
``recalibrate`` recomputes BatchNorm statistics from data (PreciseBN-style, all-reduced under torch.distributed);
``bnfold.torch.export.fold_exported`` folds ``torch.export`` programs (``bnfold MODEL.pt2``).
"""

from .calibrate import recalibrate
from .fold import fold_module
from .verify import benchmark, verify

__all__ = ["fold_module", "verify", "benchmark", "recalibrate"]
