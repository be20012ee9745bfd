"""The one reduction path every losskit loss goes through."""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


def resolve_reduction(
    size_average: bool | None,
    reduce: bool | None,
    reduction: str,
    *,
    allowed: tuple[str, ...] = REDUCTIONS,
) -> str:
    """Return the reduction to apply, honouring torch's deprecated ``size_average``/``reduce``.

    As in torch, either legacy flag, when given, overrides ``reduction``: both default
    to True, ``reduce=False`` means 'none', ``size_average=False`` means 'sum'.
    """
    if size_average is not None or reduce is not None:
        size_average = True if size_average is None else size_average
        reduce = True if reduce is None else reduce
        reduction = ("mean" if size_average else "sum") if reduce else "none"
        warnings.warn(
            f"size_average and reduce args will be deprecated, please use reduction='{reduction}' instead.",
            UserWarning,
            stacklevel=3,
        )
    if reduction not in allowed:
        choices = ", ".join(repr(r) for r in allowed)
        raise ValueError(f"reduction must be one of {choices}; got {reduction!r}")
    return reduction


def reduce_loss(loss: Tensor, reduction: str, denominator: Tensor | None = None) -> Tensor:
    """Reduce an element-wise loss.

    'mean' divides the sum by ``denominator`` when one is given (the summed weight of the
    elements that count, as weighted losses define it), else by the number of elements.
    An empty or fully-ignored 'mean' is 0/0 = nan, as in torch.
    """
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        if denominator is None:
            return loss.mean()
        return loss.sum() / denominator
    raise ValueError(f"reduction must be one of 'mean', 'sum', 'none'; got {reduction!r}")
