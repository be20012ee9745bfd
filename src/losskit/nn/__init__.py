"""Loss Modules with the names and constructor arguments of ``torch.nn``."""

from .classification import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, NLLLoss
from .divergence import KLDivLoss
from .linear import LinearCrossEntropyLoss
from .regression import GaussianNLLLoss, HuberLoss, L1Loss, MSELoss, PoissonNLLLoss, SmoothL1Loss

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "GaussianNLLLoss",
    "HuberLoss",
    "KLDivLoss",
    "L1Loss",
    "LinearCrossEntropyLoss",
    "MSELoss",
    "NLLLoss",
    "PoissonNLLLoss",
    "SmoothL1Loss",
]
