"""Loss Modules with the names and constructor arguments of ``torch.nn``."""

from .classification import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, NLLLoss
from .distillation import DistillationLoss, LinearDistillationLoss, TopKDistillationLoss
from .divergence import JSDivergenceLoss, KLDivLoss
from .focal import Poly1CrossEntropyLoss, SigmoidFocalLoss, SoftmaxFocalLoss
from .linear import LinearCrossEntropyLoss
from .overlap import DiceLoss, TverskyLoss
from .margin import (
    CosineEmbeddingLoss,
    HingeEmbeddingLoss,
    MarginRankingLoss,
    MultiLabelMarginLoss,
    MultiLabelSoftMarginLoss,
    MultiMarginLoss,
    SoftMarginLoss,
    TripletMarginLoss,
    TripletMarginWithDistanceLoss,
)
from .policy import GRPOLoss
from .preference import CPOLoss, DPOLoss, KTOLoss, ORPOLoss, SimPOLoss
from .sequence import CTCLoss
from .regression import GaussianNLLLoss, HuberLoss, L1Loss, MSELoss, PoissonNLLLoss, SmoothL1Loss

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CPOLoss",
    "CTCLoss",
    "CosineEmbeddingLoss",
    "CrossEntropyLoss",
    "DPOLoss",
    "DiceLoss",
    "DistillationLoss",
    "GRPOLoss",
    "GaussianNLLLoss",
    "HingeEmbeddingLoss",
    "HuberLoss",
    "JSDivergenceLoss",
    "KLDivLoss",
    "KTOLoss",
    "L1Loss",
    "LinearCrossEntropyLoss",
    "LinearDistillationLoss",
    "MSELoss",
    "MarginRankingLoss",
    "MultiLabelMarginLoss",
    "MultiLabelSoftMarginLoss",
    "MultiMarginLoss",
    "NLLLoss",
    "ORPOLoss",
    "PoissonNLLLoss",
    "Poly1CrossEntropyLoss",
    "SigmoidFocalLoss",
    "SimPOLoss",
    "SmoothL1Loss",
    "SoftMarginLoss",
    "SoftmaxFocalLoss",
    "TopKDistillationLoss",
    "TripletMarginLoss",
    "TripletMarginWithDistanceLoss",
    "TverskyLoss",
]
