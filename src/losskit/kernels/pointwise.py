"""The pointwise regression losses: loss and gradient in one sweep over chunks.

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
autograd and replay machinery comes from :class:`~losskit.kernels.fused_op.FusedOp`; the
compiled form of :func:`pointwise_forward` (``losskit._native``'s pointwise_regression,
src/pointwise.cpp) is this file's Python op for op, with the same bits; for bfloat16 inputs
it forms each element's error, term and gradient by the same float32 operations in one pass
(src/half_blocks.h converts the blocks), writes the bfloat16 gradients directly and sums the
float32 terms over the same chunks as here. A small loss costs
what its Python costs, so :func:`fused_pointwise_call` takes that compiled form and
FusedOp's C++ autograd node directly, without FusedOp's general call (tens of
microseconds of Python at a batch of 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._core import switches
from .._core.dtypes import result_dtypes
from .._core.reduction import reduce_loss
from .fused_op import compiling, fused_may_serve, FusedOp, native_module, Replay

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


_OPTIONS: dict[tuple, PointwiseOptions] = {}


def pointwise_options(kind: str, param: float, reduction: str, weighted_mean: bool) -> PointwiseOptions:
    """The options object of these values, made once (a frozen dataclass costs microseconds
    to build, a call's whole budget at a batch of 64)."""
    key = (kind, param, reduction, weighted_mean)
    options = _OPTIONS.get(key)
    if options is None:
        if len(_OPTIONS) > 256:  # any float param is a key: keep the cache bounded
            _OPTIONS.clear()
        options = _OPTIONS[key] = PointwiseOptions(kind, param, reduction, weighted_mean)
    return options


def fused_pointwise_applies(input: Tensor, target: Tensor, weight: Tensor | None) -> bool:
    """Eager calls that want a first-order gradient, with input and target of one shape and
    no gradient wanted for the weight (what the fused sweep computes)."""
    return (
        (input.requires_grad or target.requires_grad)
        and torch.is_grad_enabled()
        and input.shape == target.shape
        and not compiling()
        and (fused_may_serve(input, target) if weight is None
             else not weight.requires_grad and fused_may_serve(input, target, weight))
    )


def fused_pointwise_call(
    input: Tensor, target: Tensor, weight: Tensor | None, options: PointwiseOptions, replay: Replay
) -> Tensor:
    """The fused loss of a call :func:`fused_pointwise_applies` accepts: what
    ``fused_pointwise(...)`` gives (same values, gradients, grad_fn and replay), by the
    compiled forward and FusedOp's C++ node where they serve the call."""
    chunk = switches.chunks().pointwise_elements
    native = native_module() if switches.native_enabled() else None
    if native is not None:
        # Grad mode is on (fused_pointwise_applies), so a tensor wants a gradient exactly
        # when it requires one: FusedOp's wants_grad.
        needs = [input.requires_grad, target.requires_grad]
        made = native.pointwise_regression(input, target, weight, options.kind, options.param, options.reduction,
                                           options.weighted_mean, chunk, needs)
        if made is not None:  # the loss is never a view there
            loss, grad_input, grad_target = made
            return fused_pointwise.attach(native, loss, [input, target], [grad_input, grad_target],
                                          options.reduction == "none", replay)
    return fused_pointwise(input, target, weight, options=options, replay=replay, chunk=chunk)


def pointwise_forward(
    input: Tensor, target: Tensor, weight: Tensor | None, *, options: PointwiseOptions, needs: tuple[bool, bool],
    chunk: int,
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
    """(the loss reduced by ``reduction``, (d/d input, d/d target)), in the inputs' dtypes, in
    chunks of ``chunk`` elements. The compiled form (``losskit._native``'s
    pointwise_regression, src/pointwise.cpp) is this function op for op."""
    compute, out = pointwise_dtypes(options.kind, input, target, weight)
    if input.numel() == 0:  # 'mean' is 0/0 = nan, 'sum' 0, 'none' empty; the gradients are empty
        empty = input.new_empty(input.shape, dtype=compute)
        loss, grad = reduce_loss(empty, options.reduction).to(out), empty
    else:
        loss, grad = _sweep(input, target, weight, options, compute, out, chunk)
    grad_target = -grad.to(target.dtype) if needs[1] and target.dtype.is_floating_point else None
    return loss, (grad.to(input.dtype) if needs[0] else None, grad_target)


def _sweep(input: Tensor, target: Tensor, weight: Tensor | None, options: PointwiseOptions, compute, out, chunk: int):
    kind, param, reduction = options.kind, options.param, options.reduction
    n = input.numel()
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
            # reduction='none': the errors, and the terms formed in place of them, are written
            # straight into the result (one pass fewer than a copy).
            if elementwise is not None:
                e = torch.sub(x[part].to(compute), y[part].to(compute), out=elementwise[part])
            else:
                e = torch.sub(x[part].to(compute), y[part].to(compute))
            wc = None if w is None else w[part].to(compute)
            terms, _ = _terms(e, wc, kind, param, k, flat_grad[part])
            if elementwise is None:
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
    extras=(("int", "chunk"),),
    native_forward="pointwise_regression",
)
