"""Divergence loss Modules, mirroring torch.nn."""

from __future__ import annotations

from torch import Tensor

from .. import functional as F
from ._base import Loss

__all__ = ["JSDivergenceLoss", "KLDivLoss"]


class KLDivLoss(Loss):
    """Module form of :func:`losskit.functional.kl_div`, as ``torch.nn.KLDivLoss``."""

    reductions = ("mean", "batchmean", "sum", "none")

    def __init__(
        self,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        log_target: bool = False,
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.log_target = log_target

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.kl_div(input, target, reduction=self.reduction, log_target=self.log_target)


class JSDivergenceLoss(Loss):
    """Module form of :func:`losskit.functional.js_divergence` (generalised Jensen-Shannon,
    for distillation: ``beta`` 0 is forward KL, 1 reverse KL).

    Example:
        >>> import torch
        >>> from losskit.nn import JSDivergenceLoss
        >>> student, teacher = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
        >>> JSDivergenceLoss(from_logits=True)(student, teacher)
        tensor(0.3278)
    """

    reductions = ("batchmean", "sum", "none")

    def __init__(
        self, beta: float = 0.5, from_logits: bool = False, ignore_index: int = -100, reduction: str = "batchmean"
    ) -> None:
        super().__init__(reduction=reduction)
        self.beta, self.from_logits, self.ignore_index = beta, from_logits, ignore_index

    def forward(self, input: Tensor, target: Tensor, labels: Tensor | None = None) -> Tensor:
        return F.js_divergence(input, target, beta=self.beta, from_logits=self.from_logits, labels=labels,
                               ignore_index=self.ignore_index, reduction=self.reduction)
