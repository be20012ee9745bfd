"""Fused pointwise regression losses: loss and gradient in one sweep over chunks.

With e = input - target and, for each loss, its written-out derivative g:

    mse        loss e^2                                            g = 2 e
    l1         loss |e|                                            g = sign(e)
    smooth_l1  loss c (e - c / 2) / beta, c = clamp(e, -beta, beta) g = c / beta
    huber      loss c (e - c / 2),        c = clamp(e, -delta, delta) g = c

c (e - c/2) is e^2 / 2 inside the clamp and beta (|e| - beta / 2) outside it, the two
branches of torch's definition, and at e = +-inf an inf, never inf * 0 = nan. The terms and
the gradient carry the element weights and one factor k (1 / beta for smooth_l1, times
1 / the 'mean' divisor: the summed weight or the number of elements), so that the sum of
the terms is the loss and backward only multiplies the gradient by grad_output. A chunk's
temporaries stay in cache; the gradient is the only full-size buffer written (torch keeps
input and target for backward instead). The gradient of the target is minus the input's.

Eager calls only: under torch.compile inductor fuses the composed form by itself. The
autograd and replay machinery comes from :class:`~losskit.kernels.fused_op.FusedOp`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._core import switches
from .._core.dtypes import result_dtypes
from .._core.reduction import reduce_loss
from .fused_op import FusedOp, compiling, fused_may_serve


@dataclass(frozen=True)
class PointwiseOptions:
    """kind: 'mse', 'l1', 'smooth_l1' or 'huber'; param: beta or delta; weighted_mean:
    'mean' divides by the summed weight (False: huber's plain mean of w * loss)."""

    kind: str
    param: float
    reduction: str
    weighted_mean: bool


def pointwise_dtypes(
    kind: str, input: Tensor, target: Tensor, weight: Tensor | None
) -> tuple[torch.dtype, torch.dtype]:
    """(compute, result) dtypes, as torch 2.13's: the promoted dtype of input, target and
    weight, except huber_loss, whose kernel writes into a tensor like the input (a float64
    target of a float32 input is subtracted in float64, then rounded to float32) and which
    multiplies by the weight afterwards: the input's dtype promoted with the weight's."""
    return result_dtypes(input, target, weight, result=(input, weight) if kind == "huber" else None)


def fused_pointwise_applies(input: Tensor, target: Tensor, weight: Tensor | None) -> bool:
    """Eager calls that want a first-order gradient, with input and target of one shape and
    no gradient wanted for the weight (what the fused sweep computes)."""
    return (
        torch.is_grad_enabled()
        and (input.requires_grad or target.requires_grad)
        and not compiling()
        and input.shape == target.shape
        and fused_may_serve(input, target)
        and (weight is None or (not weight.requires_grad and fused_may_serve(weight)))
    )


def pointwise_forward(
    input: Tensor, target: Tensor, weight: Tensor | None, *, options: PointwiseOptions, needs: tuple[bool, bool]
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
    """(the loss reduced by ``reduction``, (d/d input, d/d target)), in the inputs' dtypes."""
    compute, out = pointwise_dtypes(options.kind, input, target, weight)
    if input.numel() == 0:  # 'mean' is 0/0 = nan, 'sum' 0, 'none' empty; the gradients are empty
        empty = input.new_empty(input.shape, dtype=compute)
        loss, grad = reduce_loss(empty, options.reduction).to(out), empty
    else:
        loss, grad = _sweep(input, target, weight, options, compute, out)
    grad_target = -grad.to(target.dtype) if needs[1] and target.dtype.is_floating_point else None
    return loss, (grad.to(input.dtype) if needs[0] else None, grad_target)


def _sweep(input: Tensor, target: Tensor, weight: Tensor | None, options: PointwiseOptions, compute, out):
    kind, param, reduction = options.kind, options.param, options.reduction
    n = input.numel()
    chunk = switches.chunks().pointwise_elements
    k: float | Tensor = 1.0 / param if kind == "smooth_l1" and param > 0 else 1.0
    if reduction == "mean":
        k = k / weight.to(compute).sum() if weight is not None and options.weighted_mean else k / n
    if n <= chunk:  # one chunk: no slicing, no gathering of partial sums
        x = input if input.dtype == compute else input.to(compute)
        e = x - (target if target.dtype == compute else target.to(compute))
        w = None if weight is None else weight.to(compute)
        loss, grad = _terms(e, w, kind, param, k, None)
        if reduction != "none":
            loss = loss.sum()
    else:
        x, y = input.reshape(-1), target.reshape(-1)
        w = None if weight is None else weight.reshape(-1)
        grad = torch.empty(input.shape, dtype=compute, device=input.device)
        flat_grad = grad.view(-1)
        elementwise = torch.empty(n, dtype=compute, device=input.device) if reduction == "none" else None
        partials = []
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            e = torch.sub(x[part].to(compute), y[part].to(compute))
            wc = None if w is None else w[part].to(compute)
            terms, _ = _terms(e, wc, kind, param, k, flat_grad[part])
            if elementwise is not None:
                elementwise[part] = terms
            else:
                partials.append(terms.sum())
        loss = elementwise.view(input.shape) if elementwise is not None else torch.stack(partials).sum()
    return (loss if loss.dtype == out else loss.to(out)), grad


def _terms(
    e: Tensor, w: Tensor | None, kind: str, param: float, k: float | Tensor, g: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(loss terms times w k, formed in place of the errors ``e``; their gradient times w k,
    written into ``g`` when given)."""
    unit = isinstance(k, float) and k == 1.0
    if kind == "mse":
        # e (e k) = e^2 k; the gradient 2 e k.
        g = torch.mul(e, k, out=g)
        if w is not None:
            g.mul_(w)
        loss = e.mul_(g)
        g.mul_(2.0)
        return loss, g
    if kind == "l1" or param == 0.0:  # smooth_l1 at beta = 0 is the L1 loss
        g = torch.sign(e, out=g)
    else:
        g = torch.clamp(e, -param, param, out=g)
        e.sub_(g, alpha=0.5)
    if w is not None:
        g.mul_(w)
    if not unit:
        g.mul_(k)
    # l1: e sign(e) = |e|, exactly; smooth_l1 / huber: (e - c / 2) c.
    return e.mul_(g), g


fused_pointwise = FusedOp(
    "pointwise_regression",
    tensors=("input", "target", "weight?"),
    differentiable=2,
    options=PointwiseOptions,
    forward=pointwise_forward,
    unreduced="elements",
)
