"""Base classes of the loss Modules: they store options only; the math is in functional."""

from __future__ import annotations

from torch import Tensor, nn

from .._core.reduction import REDUCTIONS, resolve_reduction


class Loss(nn.Module):
    """A loss Module: resolves ``reduction`` (and torch's legacy flags) once, at construction."""

    reduction: str
    reductions: tuple[str, ...] = REDUCTIONS

    def __init__(self, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = resolve_reduction(size_average, reduce, reduction, allowed=self.reductions)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class WeightedLoss(Loss):
    """A loss Module with a ``weight`` buffer, which follows the Module across ``.to()``."""

    weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", weight)
