"""Regression losses, with torch 2.13's signatures and semantics: mse_loss and l1_loss (with
torch 2.13's optional element weights), smooth_l1_loss, huber_loss, poisson_nll_loss and
gaussian_nll_loss.

mse_loss, l1_loss, smooth_l1_loss and huber_loss share one fused path for eager calls that
want a gradient: with e = input - target and, for each loss, its written-out derivative g,

    mse        loss e^2                                 g = 2 e
    l1         loss |e|                                 g = sign(e)
    smooth_l1  loss c (e - c / 2) / beta, c = clamp(e, -beta, beta)   g = c / beta
    huber      loss c (e - c / 2),        c = clamp(e, -delta, delta) g = c

(c (e - c/2) is e^2 / 2 inside the clamp and beta (|e| - beta / 2) outside it, the two
branches of torch's definition), computed by :mod:`losskit.kernels.pointwise`. float64
(gradcheck's dtype), torch.func transforms, forward-mode AD and torch.compile (where
inductor fuses the composed form by itself) take the composed form, which autograd
differentiates.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._core.docs import LEGACY_ARGS, fill_doc
from ..kernels import Replay
from ..kernels.likelihood import elementwise_options, fused_elementwise_applies, fused_elementwise_call
from ..kernels.pointwise import fused_pointwise_applies, fused_pointwise_call, pointwise_dtypes, pointwise_options
from .._core.dtypes import result_dtypes
from .._core.reduction import reduce_loss, resolve_reduction
from .._core.validation import (
    broadcast_shape,
    check_floating,
    check_non_negative,
    check_real,
    check_reduction_weight,
)

__all__ = ["gaussian_nll_loss", "huber_loss", "l1_loss", "mse_loss", "poisson_nll_loss", "smooth_l1_loss"]

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
    *,
    fused: tuple[str, float],
    weighted_mean: bool = True,
) -> Tensor:
    """``error(input - target)``, weighted and reduced the way torch's regression losses are.

    Differently shaped input and target are broadcast, with a warning, as torch does; shapes
    that cannot broadcast raise a ValueError that states both. With ``weight`` (exactly the
    input's shape) 'mean' is the weighted mean sum(w * e) / sum(w), or, for huber_loss
    (``weighted_mean=False``), torch's plain mean of w * e. ``fused`` names the loss and its
    parameter for the fused path (see the module docstring), which serves the calls it can,
    and sets the result dtype (:func:`~losskit.kernels.pointwise.pointwise_dtypes`).
    """
    check_floating(input, "input", fn)
    check_real(target, "target", fn)
    if target.shape != input.shape:
        shape = broadcast_shape(input, target, ("input", "target"), fn)
        warnings.warn(
            f"{fn}: target shape {tuple(target.shape)} differs from input shape {tuple(input.shape)}; "
            f"both are broadcast to {shape}, which is rarely what was meant",
            UserWarning,
            stacklevel=3,
        )
    if weight is not None:
        check_reduction_weight(weight, input, fn)
    kind, param = fused
    if fused_pointwise_applies(input, target, weight):
        return fused_pointwise_call(
            input, target, weight, pointwise_options(kind, float(param), reduction, weighted_mean),
            Replay(fn, lambda a, b: _composed(kind, error, a, b, reduction, weight, weighted_mean), [input, target]),
        )
    return _composed(kind, error, input, target, reduction, weight, weighted_mean)


def _composed(
    kind: str,
    error: Callable[[Tensor], Tensor],
    input: Tensor,
    target: Tensor,
    reduction: str,
    weight: Tensor | None,
    weighted_mean: bool,
) -> Tensor:
    """The composed form, which autograd differentiates (and the fused path's oracle)."""
    compute, out = pointwise_dtypes(kind, input, target, weight)
    loss = error(input.to(compute) - target.to(compute))
    if weight is None:
        return reduce_loss(loss, reduction).to(out)
    weight = weight.to(compute)
    return reduce_loss(loss * weight, reduction, weight.sum() if weighted_mean else None).to(out)


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
    return _pointwise_loss("mse_loss", torch.square, input, target, reduction, weight, fused=("mse", 0.0))


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
    return _pointwise_loss("l1_loss", torch.abs, input, target, reduction, weight, fused=("l1", 0.0))


def _smooth_l1(error: Tensor, beta: float) -> Tensor:
    """0.5 e^2 / beta where |e| < beta, else |e| - 0.5 beta (plain |e| at beta = 0)."""
    if beta == 0.0:
        return error.abs()
    magnitude = error.abs()
    inside = magnitude < beta
    # The square is formed of the inside errors only, so that an infinite error outside
    # passes sign(e) and not inf * 0 = nan through `where`: e / beta inside, sign(e)
    # outside, equal at |e| = beta.
    quadratic = (0.5 / beta) * torch.where(inside, error, 0.0).square()
    return torch.where(inside, quadratic, magnitude - 0.5 * beta)


@fill_doc(legacy_args=LEGACY_ARGS)
def smooth_l1_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    beta: float = 1.0,
) -> Tensor:
    r"""Smooth L1 loss: quadratic for small errors, linear for large ones.

    .. math::
        \ell_i = \begin{cases} 0.5\, e_i^2 / \beta & |e_i| < \beta \\
        |e_i| - 0.5 \beta & \text{otherwise} \end{cases}, \qquad e_i = x_i - y_i

    Args:
        input: predictions, any shape ``[...]``.
        target: targets, the same shape (other shapes are broadcast, with a warning).
        {legacy_args}
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        beta: where the quadratic turns linear, >= 0 (0 gives the L1 loss).

    Returns:
        A scalar, or the element-wise loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import smooth_l1_loss
        >>> smooth_l1_loss(torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0]))  # (0.125 + 2.5) / 2
        tensor(1.3125)

    References:
        torch.nn.SmoothL1Loss (torch 2.13); Girshick, "Fast R-CNN", 2015.
    """
    fn = "smooth_l1_loss"
    reduction = resolve_reduction(size_average, reduce, reduction)
    if beta < 0:
        raise ValueError(f"{fn}: beta must be >= 0; got {beta}")
    return _pointwise_loss(
        fn, lambda e: _smooth_l1(e, beta), input, target, reduction, None, fused=("smooth_l1", beta)
    )


def huber_loss(
    input: Tensor,
    target: Tensor,
    reduction: str = "mean",
    delta: float = 1.0,
    weight: Tensor | None = None,
) -> Tensor:
    r"""Huber loss: ``delta * smooth_l1_loss(beta=delta)``.

    .. math::
        \ell_i = w_i \begin{cases} 0.5\, e_i^2 & |e_i| < \delta \\
        \delta (|e_i| - 0.5 \delta) & \text{otherwise} \end{cases}

    Args:
        input: predictions, any shape ``[...]``.
        target: targets, the same shape (other shapes are broadcast, with a warning).
        reduction: ``'mean'``, ``'sum'`` or ``'none'``. With ``weight``, 'mean' is torch's
            plain mean of the weighted terms (not divided by the summed weight, unlike
            mse_loss and l1_loss).
        delta: where the quadratic turns linear, > 0.
        weight: optional element weights, exactly ``input``'s shape.

    Returns:
        A scalar, or the element-wise loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import huber_loss
        >>> huber_loss(torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0]), delta=2.0)  # (0.125 + 4) / 2
        tensor(2.0625)

    References:
        torch.nn.HuberLoss (torch 2.13); Huber, "Robust Estimation of a Location
        Parameter", 1964.
    """
    fn = "huber_loss"
    reduction = resolve_reduction(None, None, reduction)
    if not delta > 0:
        raise ValueError(f"{fn}: delta must be > 0; got {delta}")
    return _pointwise_loss(
        fn, lambda e: delta * _smooth_l1(e, delta), input, target, reduction, weight, weighted_mean=False,
        fused=("huber", delta),
    )


@fill_doc(legacy_args=LEGACY_ARGS)
def poisson_nll_loss(
    input: Tensor,
    target: Tensor,
    log_input: bool = True,
    full: bool = False,
    size_average: bool | None = None,
    eps: float = 1e-8,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Negative log-likelihood of counts under a Poisson distribution with rate ``input``.

    .. math::
        \ell_i = e^{x_i} - y_i x_i \ \text{(log\_input)}, \qquad
        \ell_i = x_i - y_i \log(x_i + \epsilon) \ \text{(otherwise)}

    plus, with ``full``, Stirling's approximation of :math:`\log y_i!`,
    :math:`y \log y - y + \tfrac12 \log(2 \pi y)`, for targets above 1.

    Args:
        input: the rate's logarithm (``log_input``) or the rate, any shape ``[...]``.
        target: observed counts, broadcastable to ``input``.
        log_input: whether ``input`` is the log-rate.
        full: add the Stirling term.
        {legacy_args}
        eps: keeps log(rate) finite when ``log_input`` is False.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the element-wise loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import poisson_nll_loss
        >>> poisson_nll_loss(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]))  # (1 + e - 2) / 2
        tensor(0.8591)

    References:
        torch.nn.PoissonNLLLoss (torch 2.13).
    """
    fn = "poisson_nll_loss"
    reduction = resolve_reduction(size_average, reduce, reduction)
    check_floating(input, "input", fn)
    check_real(target, "target", fn)
    broadcast_shape(input, target, ("input", "target"), fn)
    # Eager calls that want a gradient: the loss by the composed form's ops and its gradient
    # written out beside it (kernels/likelihood.py), except the Stirling term's gradient for
    # the counts, which the kernel does not write out.
    if fused_elementwise_applies(input, target) and not (full and target.requires_grad):
        return fused_elementwise_call(
            input, target, None, elementwise_options("poisson", reduction, float(eps), 0.0, bool(log_input), bool(full)),
            Replay(fn, lambda a, b: _poisson(a, b, log_input, full, eps, reduction), [input, target]),
        )
    return _poisson(input, target, log_input, full, eps, reduction)


def _poisson(input: Tensor, target: Tensor, log_input: bool, full: bool, eps: float, reduction: str) -> Tensor:
    """poisson_nll_loss's composed form, which autograd differentiates (the fused path's oracle)."""
    compute, out = result_dtypes(input, target)
    x, y = input.to(compute), target.to(compute)
    loss = torch.exp(x) - y * x if log_input else x - y * torch.log(x + eps)
    if full:
        # As torch: the term is formed everywhere and masked where y <= 1 (0 log 0 there).
        stirling = y * torch.log(y) - y + 0.5 * torch.log(2 * math.pi * y)
        loss = loss + stirling.masked_fill(y <= 1, 0)
    return reduce_loss(loss, reduction).to(out)


def gaussian_nll_loss(
    input: Tensor,
    target: Tensor,
    var: Tensor | float,
    full: bool = False,
    eps: float = 1e-6,
    reduction: str = "mean",
) -> Tensor:
    r"""Negative log-likelihood of ``target`` under a Gaussian with mean ``input`` and ``var``.

    .. math::
        \ell_i = \tfrac12 \left(\log \max(v_i, \epsilon) + \frac{(x_i - y_i)^2}{\max(v_i, \epsilon)}\right)
        \ (+\ \tfrac12 \log 2\pi \text{ with full})

    The clamp at ``eps`` changes the value only: the gradient reaches ``var`` as if it were
    not clamped, as in torch.

    Args:
        input: predicted means, ``[N, *]``.
        target: observations, same shape.
        var: variances: shaped like ``input`` (heteroscedastic), one dimension short of it,
            with one broadcast dimension of size 1, or a float (homoscedastic); >= 0.
        full: add the constant term.
        eps: floor of the variance.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the element-wise loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import gaussian_nll_loss
        >>> gaussian_nll_loss(torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([4.0]))  # (ln 4 + 1) / 2
        tensor(1.1931)

    References:
        torch.nn.GaussianNLLLoss (torch 2.13); Nix and Weigend, "Estimating the Mean and
        Variance of the Target Probability Distribution", 1994.
    """
    fn = "gaussian_nll_loss"
    reduction = resolve_reduction(None, None, reduction)
    check_floating(input, "input", fn)
    if isinstance(var, (int, float)):
        if var < 0:
            raise ValueError(f"{fn}: var must be >= 0; got {var}")
        var = torch.full_like(input, float(var))
    else:
        check_non_negative(var, "var", fn)
    if var.shape != input.shape:
        if tuple(input.shape[:-1]) == tuple(var.shape):
            var = var.unsqueeze(-1)  # one variance per row of the last dimension
        elif not (
            input.dim() == var.dim()
            and sum(v for i, v in zip(input.shape, var.shape) if i != v) == 1
        ):
            raise ValueError(
                f"{fn}: var of shape {tuple(var.shape)} does not fit input shape {tuple(input.shape)}: it must "
                "match it, lack its last dimension, or have size 1 in the one dimension where it differs"
            )
    if fused_elementwise_applies(input, target, var):
        return fused_elementwise_call(
            input, target, var, elementwise_options("gaussian", reduction, float(eps), 0.0, bool(full), False),
            Replay(fn, lambda a, b, v: _gaussian(a, b, v, full, eps, reduction), [input, target, var]),
        )
    return _gaussian(input, target, var, full, eps, reduction)


def _gaussian(input: Tensor, target: Tensor, var: Tensor, full: bool, eps: float, reduction: str) -> Tensor:
    """gaussian_nll_loss's composed form, which autograd differentiates (the fused path's oracle)."""
    compute, out = result_dtypes(input, target, var)
    x, y, v = input.to(compute), target.to(compute), var.to(compute)
    # Clamp the value, not the gradient: (clamped - v) is a constant to autograd.
    v = v + (v.clamp(min=eps) - v).detach()
    loss = 0.5 * (torch.log(v) + (x - y).square() / v)
    if full:
        loss = loss + 0.5 * math.log(2 * math.pi)
    return reduce_loss(loss, reduction).to(out)
