"""Module forms of the preference losses on sequence log-probs: DPO, SimPO, CPO, ORPO, KTO.
They store options only (checked at construction); the math is in
:mod:`losskit.functional.preference`."""

from __future__ import annotations

from torch import Tensor

from .. import functional as F
from ..functional.preference import _check_beta, _check_smoothing, check_dpo_options
from ._base import Loss

__all__ = ["CPOLoss", "DPOLoss", "KTOLoss", "ORPOLoss", "SimPOLoss"]


class DPOLoss(Loss):
    """Module form of :func:`losskit.functional.dpo_loss`.

    Example:
        >>> import torch
        >>> from losskit.nn import DPOLoss
        >>> loss = DPOLoss(beta=0.1)
        >>> loss(torch.tensor([-12.0]), torch.tensor([-15.0]), torch.tensor([-13.0]), torch.tensor([-14.0]))
        tensor(0.5981)
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 reduction: str = "mean", discopop_tau: float = 0.05) -> None:
        super().__init__(reduction=reduction)
        check_dpo_options("DPOLoss", beta, loss_type, label_smoothing, discopop_tau)
        self.beta, self.loss_type = beta, loss_type
        self.label_smoothing, self.discopop_tau = label_smoothing, discopop_tau

    def forward(self, chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
                ref_rejected_logps: Tensor | None = None) -> Tensor:
        return F.dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=self.beta,
                          loss_type=self.loss_type, label_smoothing=self.label_smoothing, reduction=self.reduction,
                          discopop_tau=self.discopop_tau)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}")


class SimPOLoss(Loss):
    """Module form of :func:`losskit.functional.simpo_loss` (per-token mean log-probs).

    Example:
        >>> import torch
        >>> from losskit.nn import SimPOLoss
        >>> SimPOLoss(beta=2.0, gamma=1.0)(torch.tensor([-0.8]), torch.tensor([-1.4]))
        tensor(0.5981)
    """

    def __init__(self, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0,
                 reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        _check_beta(beta, "SimPOLoss")
        _check_smoothing(label_smoothing, "SimPOLoss")
        self.beta, self.gamma, self.label_smoothing = beta, gamma, label_smoothing

    def forward(self, chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
        return F.simpo_loss(chosen_logps, rejected_logps, beta=self.beta, gamma=self.gamma,
                            label_smoothing=self.label_smoothing, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, gamma={self.gamma}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}")


class CPOLoss(Loss):
    """Module form of :func:`losskit.functional.cpo_loss` (summed log-probs; add the NLL term).

    Example:
        >>> import torch
        >>> from losskit.nn import CPOLoss
        >>> CPOLoss(beta=0.1)(torch.tensor([-20.0]), torch.tensor([-26.0]))
        tensor(0.4375)
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        _check_beta(beta, "CPOLoss")
        _check_smoothing(label_smoothing, "CPOLoss")
        self.beta, self.label_smoothing = beta, label_smoothing

    def forward(self, chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
        return F.cpo_loss(chosen_logps, rejected_logps, beta=self.beta, label_smoothing=self.label_smoothing,
                          reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, label_smoothing={self.label_smoothing}, reduction={self.reduction!r}"


class ORPOLoss(Loss):
    """Module form of :func:`losskit.functional.orpo_loss` (the odds-ratio term, per-token mean
    log-probs; add the NLL term).

    Example:
        >>> import torch
        >>> from losskit.nn import ORPOLoss
        >>> ORPOLoss(beta=0.1)(torch.tensor([-0.5]), torch.tensor([-1.5]))
        tensor(0.0171)
    """

    def __init__(self, beta: float = 0.1, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        _check_beta(beta, "ORPOLoss")
        self.beta = beta

    def forward(self, chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
        return F.orpo_loss(chosen_logps, rejected_logps, beta=self.beta, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reduction={self.reduction!r}"


class KTOLoss(Loss):
    """Module form of :func:`losskit.functional.kto_loss`; the batch's KL estimate is an
    argument of the call, not of the Module.

    Example:
        >>> import torch
        >>> from losskit.nn import KTOLoss
        >>> KTOLoss(beta=1.0)(torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.0]), torch.tensor([True, False]))
        tensor(0.2689)
    """

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        _check_beta(beta, "KTOLoss")
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight

    def forward(self, logps: Tensor, ref_logps: Tensor | None, desirable: Tensor,
                kl: Tensor | float | None = None) -> Tensor:
        return F.kto_loss(logps, ref_logps, desirable, beta=self.beta, kl=kl, desirable_weight=self.desirable_weight,
                          undesirable_weight=self.undesirable_weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, desirable_weight={self.desirable_weight}, "
                f"undesirable_weight={self.undesirable_weight}, reduction={self.reduction!r}")
