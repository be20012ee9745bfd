"""Regression losses: mse_loss and l1_loss, with torch 2.13's optional element weights."""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ._docs import LEGACY_ARGS, fill_doc
from ._reduction import reduce_loss, resolve_reduction, result_dtypes
from ._validation import broadcast_shape, check_floating, check_reduction_weight

__all__ = ["l1_loss", "mse_loss"]

_ARGUMENTS = f"""\
Args:
    input: predictions, any shape ``[...]``.
    target: targets, the same shape (other shapes are broadcast, with a warning).
{textwrap.indent(LEGACY_ARGS, "    ")}
    reduction: ``'mean'``, ``'sum'`` or ``'none'``.
    weight: optional element weights, exactly ``input``'s shape.

Returns:
    A scalar, or the element-wise loss for ``reduction='none'``."""


def _pointwise_loss(
    fn: str,
    error: Callable[[Tensor], Tensor],
    input: Tensor,
    target: Tensor,
    reduction: str,
    weight: Tensor | None,
) -> Tensor:
    """``error(input - target)``, weighted and reduced the way torch's regression losses are.

    Differently shaped input and target are broadcast, with a warning, as torch does; shapes
    that cannot broadcast raise a ValueError that states both. With ``weight`` (exactly the
    input's shape) 'mean' is the weighted mean: sum(w * e) / sum(w).
    """
    check_floating(input, "input", fn)
    check_floating(target, "target", fn)
    if target.shape != input.shape:
        shape = broadcast_shape(input, target, ("input", "target"), fn)
        warnings.warn(
            f"{fn}: target shape {tuple(target.shape)} differs from input shape {tuple(input.shape)}; "
            f"both are broadcast to {shape}, which is rarely what was meant",
            UserWarning,
            stacklevel=3,
        )
    compute, out = result_dtypes(input, target)
    loss = error(input.to(compute) - target.to(compute))
    if weight is None:
        return reduce_loss(loss, reduction).to(out)
    check_reduction_weight(weight, input, fn)
    weight = weight.to(compute)
    return reduce_loss(loss * weight, reduction, weight.sum()).to(out)


@fill_doc(arguments=_ARGUMENTS)
def mse_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    r"""Mean squared error.

    .. math::
        \ell_i = w_i (x_i - y_i)^2, \qquad
        \text{mean} = \frac{\sum_i \ell_i}{\sum_i w_i}

    {arguments}

    Example:
        >>> import torch
        >>> from losskit.functional import mse_loss
        >>> mse_loss(torch.tensor([2.5, 0.0, 2.0]), torch.tensor([3.0, -0.5, 2.0]))
        tensor(0.1667)

    References:
        torch.nn.MSELoss and torch.nn.functional.mse_loss (torch 2.13).
    """
    reduction = resolve_reduction(size_average, reduce, reduction)
    return _pointwise_loss("mse_loss", torch.square, input, target, reduction, weight)


@fill_doc(arguments=_ARGUMENTS)
def l1_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    r"""Mean absolute error.

    .. math::
        \ell_i = w_i \lvert x_i - y_i \rvert, \qquad
        \text{mean} = \frac{\sum_i \ell_i}{\sum_i w_i}

    The gradient at :math:`x_i = y_i` is 0, as in torch.

    {arguments}

    Example:
        >>> import torch
        >>> from losskit.functional import l1_loss
        >>> l1_loss(torch.tensor([2.5, 0.0, 2.0]), torch.tensor([3.0, -0.5, 2.0]))
        tensor(0.3333)

    References:
        torch.nn.L1Loss and torch.nn.functional.l1_loss (torch 2.13).
    """
    reduction = resolve_reduction(size_average, reduce, reduction)
    return _pointwise_loss("l1_loss", torch.abs, input, target, reduction, weight)
