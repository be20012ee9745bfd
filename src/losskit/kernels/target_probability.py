"""The target-probability losses on logits, fused: softmax_focal_loss and poly1_cross_entropy.

Rows of logits x [N, C] and class-index targets y. With m the row's max, e = exp(x - m),
s = sum_c e_c and log p_y = (x_y - m) - log s (the composed form's log-softmax, read at the
target only: the same bits), each loss is a function L(log p_y) of the row:

  focal  L = -alpha_y (1 - p_y)^g log p_y    dL/dlog p_y = alpha_y (g (1 - p_y)^(g - 1) p_y log p_y - (1 - p_y)^g)
  poly1  L = -log p_y - eps (p_y - 1)         dL/dlog p_y = -1 - eps p_y

(1 - p_y = -expm1(log p_y), p_y = exp(log p_y)), and the gradient of the logits is
c (onehot(y) - e / s), c = dL/dlog p_y times k (1 / the rows that count, for 'mean'), 0 on
an ignored row: one pass over the logits (e, scaled in place) beside the softmax's own.
Focal's 0 < g < 1 (whose focusing term needs the composed form's guard at p_y = 1) and
inputs other than [N, C] take the composed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._core import switches
from .._core.dtypes import cast, result_dtypes
from .._core.reduction import reduce_loss
from .fused_op import compiling, fused_may_serve, FusedOp, native_module, Replay

@dataclass(frozen=True)
class TargetProbOptions:
    """kind: 'focal' (param: gamma, 0 or >= 1) or 'poly1' (param: epsilon); alpha: focal's
    scalar class weight (1: none; a per-class weight comes as a tensor)."""

    kind: str
    reduction: str
    param: float
    alpha: float


_TARGET_PROB_OPTIONS: dict[tuple, TargetProbOptions] = {}


def target_prob_options(kind: str, reduction: str, param: float, alpha: float) -> TargetProbOptions:
    key = (kind, reduction, param, alpha)
    options = _TARGET_PROB_OPTIONS.get(key)
    if options is None:
        if len(_TARGET_PROB_OPTIONS) > 256:
            _TARGET_PROB_OPTIONS.clear()
        options = _TARGET_PROB_OPTIONS[key] = TargetProbOptions(kind, reduction, param, alpha)
    return options


def fused_target_prob_applies(input: Tensor) -> bool:
    """Eager [N, C] logits that want a first-order gradient."""
    return (
        input.dim() == 2 and input.requires_grad and torch.is_grad_enabled() and not compiling()
        and fused_may_serve(input)
    )


def fused_target_prob_call(input: Tensor, safe: Tensor, valid: Tensor | None, alpha: Tensor | None,
                           options: TargetProbOptions, replay: Replay) -> Tensor:
    """The fused loss of a call :func:`fused_target_prob_applies` accepts (``safe``: the
    targets with ignored rows read as class 0; ``valid``: None where every row counts)."""
    native = native_module() if switches.native_enabled() else None
    if native is not None:
        made = native.target_prob_loss(input, safe, valid, alpha, options.kind, options.reduction, options.param,
                                       options.alpha, [True, False, False, False])
        if made is not None:
            loss, grad = made
            return fused_target_prob.attach(native, loss, [input], [grad], options.reduction == "none", replay)
    return fused_target_prob(input, safe, valid, alpha, options=options, replay=replay)


def target_prob_forward(
    input: Tensor, target: Tensor, valid: Tensor | None, alpha: Tensor | None, *, options: TargetProbOptions,
    needs: tuple[bool, ...],
) -> tuple[Tensor, tuple[Tensor | None]]:
    """(the loss reduced, (d/d input,)) of [N, C] logits (see the comment above
    TargetProbOptions). The compiled form (losskit._native's target_prob_loss) is this
    function op for op."""
    compute, _ = result_dtypes(input)
    x = cast(input, compute)
    shifted = x - x.amax(dim=1, keepdim=True)
    index = target.unsqueeze(1)
    shifted_y = shifted.gather(1, index)
    e = shifted.exp_()
    sums = e.sum(dim=1, keepdim=True)
    log_p = (shifted_y - sums.log()).squeeze(1)
    gamma = options.param
    if options.kind == "focal":
        q = -torch.expm1(log_p)
        if gamma == 0:
            loss = -log_p
            coef = torch.full_like(log_p, -1.0)
        else:
            focus = q**gamma
            loss = -focus * log_p
            # g q^(g - 1) p log p - q^g
            slope = log_p.exp().mul_(log_p)
            if gamma != 1:
                slope.mul_(q.pow_(gamma - 1))
            coef = slope.mul_(gamma).sub_(focus)
        if alpha is not None:
            weight = alpha.to(loss.dtype)[target]
            loss = weight * loss
            coef.mul_(weight)
        elif options.alpha != 1.0:
            loss = options.alpha * loss
            coef.mul_(options.alpha)
    else:  # poly1
        loss = -log_p - gamma * torch.expm1(log_p)
        coef = log_p.exp().mul_(-gamma).sub_(1)
    reduction = options.reduction
    if valid is None:
        loss = reduce_loss(loss, reduction)
        if reduction == "mean":
            coef.mul_(1.0 / max(x.shape[0], 1))
    else:
        count = valid.sum()
        loss = reduce_loss(torch.where(valid, loss, 0.0), reduction, count)
        if reduction == "mean":
            coef.div_(count)
        coef = torch.where(valid, coef, 0.0)  # after the 'mean' scale: no 0 * inf where no row counts
    grad = None
    if needs[0]:
        # c (onehot(y) - e / s): e scaled in place by -c / s, then c added at the target.
        coef = coef.unsqueeze(1)
        grad = e.mul_(-coef / sums).scatter_add_(1, index, coef)
        grad = cast(grad, input.dtype)
    return cast(loss, input.dtype), (grad,)


fused_target_prob = FusedOp(
    "target_prob_loss",
    tensors=("input", "target", "valid?", "alpha?"),
    differentiable=1,
    options=TargetProbOptions,
    forward=target_prob_forward,
    unreduced="rows",
    native_forward="target_prob_loss",
)
