"""Module form of the policy-gradient loss on per-token log-probs (GRPO and its family). It
stores options only; the math is in :mod:`losskit.functional.policy`."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .. import functional as F
from ..functional.policy import _check_options

__all__ = ["GRPOLoss"]


class GRPOLoss(nn.Module):
    """Module form of :func:`losskit.functional.grpo_loss`. The options of the objective are
    fixed at construction (and checked there); what changes per batch, the reference
    log-probs and the global token count ``num_items``, are arguments of the call.

    Example:
        >>> import torch
        >>> from losskit.nn import GRPOLoss
        >>> loss = GRPOLoss(beta=0.0, loss_type="grpo")
        >>> log_probs = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.2, 0.0]])
        >>> loss(log_probs, None, torch.tensor([1.0, -1.0]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
        tensor(0.)
    """

    def __init__(self, beta: float = 0.04, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 loss_type: str = "dapo", importance_sampling_level: str = "token",
                 max_completion_length: int | None = None, delta: float | None = None,
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                 use_bias_correction_kl: bool = True) -> None:
        super().__init__()
        self.options: dict[str, Any] = dict(
            beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type,
            importance_sampling_level=importance_sampling_level, max_completion_length=max_completion_length,
            delta=delta, sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
            use_bias_correction_kl=use_bias_correction_kl)
        # A stand-in reference: whether one is passed is known only per call.
        _check_options("GRPOLoss", loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high,
                       max_completion_length, None, delta, sapo_temperature_pos, sapo_temperature_neg, object())

    def forward(self, log_probs: Tensor, old_log_probs: Tensor | None, advantages: Tensor, mask: Tensor,
                ref_log_probs: Tensor | None = None, num_items: Tensor | int | float | None = None) -> Tensor:
        return F.grpo_loss(log_probs, old_log_probs, advantages, mask, ref_log_probs=ref_log_probs,
                           num_items=num_items, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
