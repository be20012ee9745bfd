"""Module forms of the losses torch lacks for hard or imbalanced classification: focal
losses and Poly-1."""

from __future__ import annotations

from torch import Tensor

from .. import functional as F
from ._base import Loss

__all__ = ["Poly1CrossEntropyLoss", "SigmoidFocalLoss", "SoftmaxFocalLoss"]


class SigmoidFocalLoss(Loss):
    """Module form of :func:`losskit.functional.sigmoid_focal_loss` (torchvision's
    semantics: ``reduction='none'`` by default).

    Example:
        >>> import torch
        >>> from losskit.nn import SigmoidFocalLoss
        >>> SigmoidFocalLoss(reduction="sum")(torch.tensor([0.0, 3.0]), torch.tensor([1.0, 1.0]))
        tensor(0.0433)
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none") -> None:
        super().__init__(reduction=reduction)
        self.alpha, self.gamma = alpha, gamma

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return F.sigmoid_focal_loss(inputs, targets, alpha=self.alpha, gamma=self.gamma, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class SoftmaxFocalLoss(Loss):
    """Module form of :func:`losskit.functional.softmax_focal_loss`; ``alpha`` (a per-class
    tensor) is a buffer that follows the Module across ``.to()``.

    Example:
        >>> import torch
        >>> from losskit.nn import SoftmaxFocalLoss
        >>> SoftmaxFocalLoss(gamma=2.0)(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))  # 0.5^2 * ln 2
        tensor(0.1733)
    """

    def __init__(
        self, alpha: Tensor | float | None = None, gamma: float = 2.0, ignore_index: int = -100, reduction: str = "mean"
    ) -> None:
        super().__init__(reduction=reduction)
        if isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha
        self.gamma, self.ignore_index = gamma, ignore_index

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.softmax_focal_loss(input, target, alpha=self.alpha, gamma=self.gamma, ignore_index=self.ignore_index,
                                    reduction=self.reduction)


class Poly1CrossEntropyLoss(Loss):
    """Module form of :func:`losskit.functional.poly1_cross_entropy`.

    Example:
        >>> import torch
        >>> from losskit.nn import Poly1CrossEntropyLoss
        >>> Poly1CrossEntropyLoss(epsilon=1.0)(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))  # ln 2 + 0.5
        tensor(1.1931)
    """

    def __init__(self, epsilon: float = 1.0, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        self.epsilon, self.ignore_index = epsilon, ignore_index

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.poly1_cross_entropy(input, target, epsilon=self.epsilon, ignore_index=self.ignore_index,
                                     reduction=self.reduction)
