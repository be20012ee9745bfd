"""Module forms of the overlap losses for segmentation: dice and Tversky."""

from __future__ import annotations

from torch import Tensor

from .. import functional as F
from ._base import Loss

__all__ = ["DiceLoss", "TverskyLoss"]


class TverskyLoss(Loss):
    """Module form of :func:`losskit.functional.tversky_loss`; ``weight`` (per class) is a
    buffer that follows the Module across ``.to()``.

    Example:
        >>> import torch
        >>> from losskit.nn import TverskyLoss
        >>> logits = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])  # (N=1, C=2, 2 pixels), p = 0.88 right
        >>> TverskyLoss(alpha=0.3, beta=0.7, smooth=0.0)(logits, torch.tensor([[0, 1]]))  # 1 - TP / (TP + .3 FP + .7 FN)
        tensor(0.1192)
    """

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.5,
        from_logits: bool = True,
        smooth: float = 1.0,
        ignore_index: int | None = None,
        weight: Tensor | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        self.alpha, self.beta, self.from_logits, self.smooth, self.ignore_index = (
            alpha, beta, from_logits, smooth, ignore_index
        )
        self.register_buffer("weight", weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.tversky_loss(input, target, alpha=self.alpha, beta=self.beta, from_logits=self.from_logits,
                              smooth=self.smooth, ignore_index=self.ignore_index, weight=self.weight,
                              reduction=self.reduction)


class DiceLoss(TverskyLoss):
    """Module form of :func:`losskit.functional.dice_loss` (Tversky with alpha = beta = 1/2).

    Example:
        >>> import torch
        >>> from losskit.nn import DiceLoss
        >>> logits = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])  # (N=1, C=2, 2 pixels), p = 0.88 right
        >>> DiceLoss(smooth=0.0)(logits, torch.tensor([[0, 1]]))  # 1 - 2 * 0.88 / (1 + 1)
        tensor(0.1192)
    """

    def __init__(
        self,
        from_logits: bool = True,
        smooth: float = 1.0,
        ignore_index: int | None = None,
        weight: Tensor | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(0.5, 0.5, from_logits, smooth, ignore_index, weight, reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.dice_loss(input, target, from_logits=self.from_logits, smooth=self.smooth,
                           ignore_index=self.ignore_index, weight=self.weight, reduction=self.reduction)
