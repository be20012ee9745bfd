"""Distillation loss Modules: options only; the math is in losskit.functional.distillation."""

from __future__ import annotations

from torch import Tensor

from .. import functional as F
from ..kernels.linear_distillation import DistillationOptions
from ._base import Loss

__all__ = ["DistillationLoss", "LinearDistillationLoss", "TopKDistillationLoss"]


class _DistillationBase(Loss):
    """The options every distillation loss shares, validated at construction."""

    def __init__(self, *, beta: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", weight_hard_loss: float = 0.0, weight_soft_loss: float = 1.0) -> None:
        DistillationOptions.checked(
            type(self).__name__, beta=beta, temperature=temperature, ignore_index=ignore_index,
            weight_hard_loss=weight_hard_loss, weight_soft_loss=weight_soft_loss, reduction=reduction,
        )
        super().__init__(reduction=reduction)
        self.beta, self.temperature, self.ignore_index = beta, temperature, ignore_index
        self.weight_hard_loss, self.weight_soft_loss = weight_hard_loss, weight_soft_loss

    def _options(self) -> dict:
        return {"beta": self.beta, "temperature": self.temperature, "ignore_index": self.ignore_index,
                "reduction": self.reduction, "weight_hard_loss": self.weight_hard_loss,
                "weight_soft_loss": self.weight_soft_loss}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items())


class DistillationLoss(_DistillationBase):
    """Module form of :func:`losskit.functional.distillation_loss` (generalised JSD: ``beta``
    0 is forward KL, 1 reverse KL, and the family jumps at both ends).

    Example:
        >>> import torch
        >>> from losskit.nn import DistillationLoss
        >>> student, teacher = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
        >>> DistillationLoss(beta=0.5)(student, teacher)
        tensor(0.3278)
    """

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        return F.distillation_loss(student_logits, teacher_logits, target, **self._options())


class LinearDistillationLoss(_DistillationBase):
    """Module form of :func:`losskit.functional.linear_distillation_loss`: both output layers
    are arguments of ``forward`` (as Liger-Kernel's ``LigerFusedLinearJSDLoss``), and neither
    model's logits are formed.

    Example:
        >>> import torch
        >>> from losskit.nn import LinearDistillationLoss
        >>> loss = LinearDistillationLoss(beta=0.0)(torch.randn(5, 4), torch.randn(7, 4), torch.randn(5, 6),
        ...                                         torch.randn(7, 6))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, *, beta: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", weight_hard_loss: float = 0.0, weight_soft_loss: float = 1.0,
                 chunk_size: int | None = None) -> None:
        super().__init__(beta=beta, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                         weight_hard_loss=weight_hard_loss, weight_soft_loss=weight_soft_loss)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(
                f"LinearDistillationLoss: chunk_size must be a positive number of tokens; got {chunk_size}")
        self.chunk_size = chunk_size

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                target: Tensor | None = None, student_bias: Tensor | None = None,
                teacher_bias: Tensor | None = None) -> Tensor:
        return F.linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, target,
                                          student_bias=student_bias, teacher_bias=teacher_bias,
                                          chunk_size=self.chunk_size, **self._options())


class TopKDistillationLoss(_DistillationBase):
    """Module form of :func:`losskit.functional.topk_distillation_loss`: a teacher cached as
    its top-k token ids and log-probabilities, the rest of its mass one bucket.

    Example:
        >>> import torch
        >>> from losskit.nn import TopKDistillationLoss
        >>> student = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
        >>> ids, logps = torch.tensor([[0, 3]]), torch.tensor([[0.6, 0.3]]).log()  # tail 0.1
        >>> TopKDistillationLoss(beta=0.0)(student, ids, logps)
        tensor(0.0673)
    """

    def forward(self, student_logits: Tensor, teacher_topk_ids: Tensor, teacher_topk_logps: Tensor,
                target: Tensor | None = None) -> Tensor:
        return F.topk_distillation_loss(student_logits, teacher_topk_ids, teacher_topk_logps, target,
                                        **self._options())
