"""Classification loss Modules, mirroring torch.nn."""

from __future__ import annotations

from torch import Tensor

from .. import functional as F
from .._core.options import CrossEntropyOptions
from ._base import WeightedLoss

__all__ = ["BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss", "NLLLoss"]


class CrossEntropyLoss(WeightedLoss):
    """Module form of :func:`losskit.functional.cross_entropy`, as ``torch.nn.CrossEntropyLoss``,
    with the options beyond torch (``lse_square_scale``, ``softcap``, ``temperature``) as
    keyword-only arguments.

    Example:
        >>> import torch
        >>> from losskit.nn import CrossEntropyLoss
        >>> CrossEntropyLoss(label_smoothing=0.1)(torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([0]))
        tensor(0.3913)
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        lse_square_scale: float = 0.0,
        softcap: float | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        # Checked here once, with the messages of the functional form.
        CrossEntropyOptions.checked(
            "CrossEntropyLoss", ignore_index=ignore_index, label_smoothing=label_smoothing,
            lse_square_scale=lse_square_scale, softcap=softcap, temperature=temperature, reduction=self.reduction,
        )
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.lse_square_scale, self.softcap, self.temperature = lse_square_scale, softcap, temperature

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            lse_square_scale=self.lse_square_scale,
            softcap=self.softcap,
            temperature=self.temperature,
        )


class NLLLoss(WeightedLoss):
    """Module form of :func:`losskit.functional.nll_loss`, as ``torch.nn.NLLLoss``."""

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction)


class BCELoss(WeightedLoss):
    """Module form of :func:`losskit.functional.binary_cross_entropy`, as ``torch.nn.BCELoss``."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(WeightedLoss):
    """Module form of :func:`losskit.functional.binary_cross_entropy_with_logits`, as
    ``torch.nn.BCEWithLogitsLoss``; ``weight`` and ``pos_weight`` are buffers."""

    pos_weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        pos_weight: Tensor | None = None,
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            input, target, weight=self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )
