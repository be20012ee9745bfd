"""Sequence loss Modules, mirroring torch.nn."""

from __future__ import annotations

from torch import Tensor

from .. import functional as F
from ._base import Loss

__all__ = ["CTCLoss"]


class CTCLoss(Loss):
    """Module form of :func:`losskit.functional.ctc_loss`, as ``torch.nn.CTCLoss``."""

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False) -> None:
        super().__init__(reduction=reduction)
        self.blank, self.zero_infinity = blank, zero_infinity

    def forward(self, log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor) -> Tensor:
        return F.ctc_loss(
            log_probs, targets, input_lengths, target_lengths, blank=self.blank, reduction=self.reduction,
            zero_infinity=self.zero_infinity,
        )
