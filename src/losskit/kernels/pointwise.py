"""Fused pointwise losses: loss and gradient made in forward, without autograd's chain.

Four fused ops live here, each with its compiled form in losskit._native's src/pointwise.cpp
(op for op, the same bits): the pointwise regression losses below (mse, l1, smooth_l1,
huber); the element-wise likelihood losses (poisson_nll, gaussian_nll, kl_div,
sigmoid_focal: :func:`elementwise_forward`); the target-probability losses on logits
(softmax_focal, poly-1: :func:`target_prob_forward`); and the row divergences
(js_divergence, info.kl_divergence: :func:`row_divergence_forward`). The last three form
the loss by the composed form's own ops (the same bits) and write the gradient out beside it;
each section opens with its math.

The pointwise regression losses: loss and gradient in one sweep over chunks.

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
src/pointwise.cpp) is this file's Python op for op, with the same bits. A small loss costs
what its Python costs, so :func:`fused_pointwise_call` takes that compiled form and
FusedOp's C++ autograd node directly, without FusedOp's general call (tens of
microseconds of Python at a batch of 64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._core import switches
from .._core.dtypes import result_dtypes
from .._core.reduction import reduce_loss
from .fused_op import FusedOp, Replay, native_module, compiling, fused_may_serve


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


# ---- the element-wise likelihood losses: poisson_nll, gaussian_nll, kl_div, sigmoid_focal ----
#
# One more fused op on the same plan: the loss terms are formed by the composed form's own
# ops, in the same order (so the loss has the same bits as the composed form), and beside
# them the gradient, written out, times k (1 / the 'mean' divisor, 1 / the batch for
# kl_div's 'batchmean', else 1):
#
#   poisson (log-rate x)  terms e^x - y x                     dx = e^x - y        dy = -x
#   poisson (rate x)      terms x - y log(x + eps)            dx = 1 - y / (x + eps)
#   gaussian              terms (log v + d^2 / v) / 2, d = x - y, v = max(var, eps)
#                         dx = d / v   dy = -dx   dvar = (1 - d^2 / v) / (2 v)  (as if unclamped)
#   kl_div (log target)   terms e^y (y - x)                   dx = -e^y           dy = e^y (y - x) + e^y
#   kl_div                terms xlogy(y, y) - y x             dx = -y
#   sigmoid_focal         terms a_t (1 - p_t)^g bce, p = sigmoid(x), bce = (1 - y) x - log sigmoid(x)
#                         dx = a_t [(p - y) (1 - p_t)^g - g (1 - p_t)^(g - 1) p (1 - p) (2 y - 1) bce]
#
# (the Stirling term of poisson's full=True and gaussian's constant depend on no input that
# the fused path differentiates). The half types are computed in float32 and rounded once,
# as the composed form does. Calls the kernel does not serve (a gradient it does not write
# out, broadcast shapes, 0 < gamma < 1) take the composed form, which autograd
# differentiates. The compiled form (losskit._native's elementwise_loss, src/pointwise.cpp)
# is :func:`elementwise_forward` op for op.


@dataclass(frozen=True)
class ElementwiseOptions:
    """kind: 'poisson', 'gaussian', 'kl_div' or 'sigmoid_focal'; reduction: 'mean', 'sum',
    'none' or 'batchmean' (kl_div: the sum over the first dimension's size); a, b: poisson's
    eps, gaussian's eps, sigmoid_focal's alpha and gamma; flag: poisson's log_input,
    gaussian's full, kl_div's log_target; extra: poisson's full."""

    kind: str
    reduction: str
    a: float
    b: float
    flag: bool
    extra: bool


_ELEMENTWISE_OPTIONS: dict[tuple, ElementwiseOptions] = {}


def elementwise_options(kind: str, reduction: str, a: float, b: float, flag: bool, extra: bool) -> ElementwiseOptions:
    """The options object of these values, made once (see :func:`pointwise_options`)."""
    key = (kind, reduction, a, b, flag, extra)
    options = _ELEMENTWISE_OPTIONS.get(key)
    if options is None:
        if len(_ELEMENTWISE_OPTIONS) > 256:
            _ELEMENTWISE_OPTIONS.clear()
        options = _ELEMENTWISE_OPTIONS[key] = ElementwiseOptions(kind, reduction, a, b, flag, extra)
    return options


def fused_elementwise_applies(input: Tensor, target: Tensor, extra: Tensor | None = None) -> bool:
    """Eager calls that want a first-order gradient, on tensors of one shape (what
    :func:`elementwise_forward` computes)."""
    return (
        torch.is_grad_enabled()
        and (input.requires_grad or target.requires_grad or (extra is not None and extra.requires_grad))
        and input.shape == target.shape
        and (extra is None or extra.shape == input.shape)
        and not compiling()
        and (fused_may_serve(input, target) if extra is None else fused_may_serve(input, target, extra))
    )


def fused_elementwise_call(
    input: Tensor, target: Tensor, extra: Tensor | None, options: ElementwiseOptions, replay: Replay
) -> Tensor:
    """The fused loss of a call :func:`fused_elementwise_applies` accepts, by the compiled
    forward and FusedOp's C++ node where they serve it (see :func:`fused_pointwise_call`)."""
    native = native_module() if switches.native_enabled() else None
    if native is not None:
        needs = [input.requires_grad, target.requires_grad, extra is not None and extra.requires_grad]
        made = native.elementwise_loss(input, target, extra, options.kind, options.reduction, options.a, options.b,
                                       options.flag, options.extra, needs)
        if made is not None:
            loss, *grads = made
            return fused_elementwise.attach(native, loss, [input, target, extra], grads, options.reduction == "none",
                                            replay)
    return fused_elementwise(input, target, extra, options=options, replay=replay)


def elementwise_forward(
    input: Tensor, target: Tensor, extra: Tensor | None, *, options: ElementwiseOptions, needs: tuple[bool, ...]
) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """(the loss reduced, (d/d input, d/d target, d/d extra)), in the inputs' dtypes (see the
    comment above ElementwiseOptions). The compiled form is this function op for op."""
    kind, reduction = options.kind, options.reduction
    compute, out = result_dtypes(input, target, extra) if kind == "gaussian" else result_dtypes(input, target)
    # Poisson's counts (log-rate, no Stirling term), gaussian's target and kl_div's input
    # (log target) enter binary ops only, which read a half-type tensor as float32 on the
    # fly (exactly, as the cast would): no float32 copy of them is made.
    x = input if kind == "kl_div" and options.flag else _as(input, compute)
    lazy = (kind == "poisson" and options.flag and not options.extra) or kind == "gaussian"
    y = target if lazy else _as(target, compute)
    n = x.numel()
    # k: 1 / the 'mean' divisor (an empty 'mean' is nan whatever k; its gradient is empty).
    k = 1.0 / max(n, 1) if reduction == "mean" else (1.0 / max(x.shape[0], 1) if reduction == "batchmean" and x.dim() else 1.0)
    gx = gy = ge = None
    if kind == "poisson":
        if options.flag and not options.extra:  # log-rate
            e = torch.exp(x)
            product = y * x
            terms = torch.sub(e, product, out=product)
            if needs[1]:
                gy = x * -k
            if needs[0]:
                gx = _scaled(torch.sub(e, y, out=e), k, input.dtype)
        elif options.flag:
            e = torch.exp(x)
            terms = e - y * x
            if needs[1]:
                gy = x * -k
            if needs[0]:
                gx = torch.sub(e, y, out=e)
                gx = gx if k == 1.0 else gx.mul_(k)
        else:
            shifted = x + options.a
            log_rate = torch.log(shifted)
            terms = x - y * log_rate
            if needs[1]:
                gy = log_rate * -k
            if needs[0]:
                gx = torch.rsub(y / shifted, 1)
                gx = gx if k == 1.0 else gx.mul_(k)
        if options.extra:  # Stirling's term, as the composed form (no gradient for x)
            stirling = y * torch.log(y) - y + 0.5 * torch.log(2 * math.pi * y)
            terms = terms + stirling.masked_fill(y <= 1, 0)
    elif kind == "gaussian":
        v = _as(extra, compute)
        d = x - y  # the target read as float32 on the fly, as the cast would
        v = v + (v.clamp(min=options.a) - v)  # the composed form's clamped value
        q = d.square() / v
        terms = 0.5 * (torch.log(v) + q)
        if options.flag:
            terms = terms + 0.5 * math.log(2 * math.pi)
        if needs[1]:
            g = d.div_(v)
            g = g if k == 1.0 else g.mul_(k)
            gx = g if needs[0] else None
            gy = g.neg()
        elif needs[0]:
            gx = _scaled(d.div_(v), k, input.dtype)
        if needs[2]:
            ge = _scaled(torch.rsub(q, 1).div_(v), 0.5 * k, extra.dtype)
    elif kind == "kl_div":
        if options.flag:  # log target
            ey = torch.exp(y)
            gap = y - x  # the input read as float32 on the fly, as the cast would
            terms = torch.mul(ey, gap, out=gap)
            if needs[1]:
                gy = terms + ey
                gy = gy if k == 1.0 else gy.mul_(k)
            if needs[0]:
                gx = _scaled(ey, -k, input.dtype)
        else:
            terms = torch.xlogy(y, y) - y * x
            if needs[0]:
                gx = y * -k
    else:  # sigmoid_focal: a = alpha, b = gamma (0 or >= 1)
        alpha, gamma = options.a, options.b
        p = torch.sigmoid(x)
        bce = (1 - y) * x - F.logsigmoid(x)
        p_t = p * y + (1 - p) * (1 - y)
        q = 1 - p_t
        focus = None if gamma == 0 else q**gamma
        terms = bce if focus is None else bce * focus
        a_t = None
        if alpha >= 0:
            a_t = alpha * y + (1 - alpha) * (1 - y)
            terms = a_t * terms
        if needs[0]:
            # (p - y) f + bce f' dq, dq = -p (1 - p) (2y - 1), f' = gamma q^(gamma - 1)
            g = p - y
            if gamma != 0:
                g.mul_(focus)
                slope = torch.rsub(p, 1).mul_(p).mul_(y - (1 - y))
                if gamma != 1:
                    slope.mul_(q.pow_(gamma - 1))
                g.sub_(slope.mul_(bce), alpha=gamma)
            if a_t is not None:
                g.mul_(a_t)
            gx = g if k == 1.0 else g.mul_(k)
    if reduction == "none":
        loss = terms
    elif reduction == "mean":
        loss = terms.mean()
    else:
        loss = terms.sum()
        if reduction == "batchmean" and x.dim():
            loss = loss / x.shape[0]
    grads = (gx, gy, ge)
    return _as(loss, out), tuple(None if g is None else _as(g, t.dtype) for g, t in zip(grads, (input, target, extra)))


def _scaled(g: Tensor, k: float, dtype: torch.dtype) -> Tensor:
    """``g`` times ``k`` (in place), in ``dtype``. (Writing the product straight into a tensor
    of ``dtype`` gives the same bits, but ATen's mixed-dtype loop is not vectorised: it is
    slower than the in-place product and the cast together, at any size.)"""
    g = g if k == 1.0 else g.mul_(k)
    return g if g.dtype == dtype else g.to(dtype)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


fused_elementwise = FusedOp(
    "elementwise_loss",
    tensors=("input", "target", "extra?"),
    differentiable=3,
    options=ElementwiseOptions,
    forward=elementwise_forward,
    unreduced="elements",
    native_forward="elementwise_loss",
)


# ---- the target-probability losses on logits: softmax_focal_loss and poly1_cross_entropy ----
#
# Rows of logits x [N, C] and class-index targets y. With m the row's max, e = exp(x - m),
# s = sum_c e_c and log p_y = (x_y - m) - log s (the composed form's log-softmax, read at the
# target only: the same bits), each loss is a function L(log p_y) of the row:
#
#   focal  L = -alpha_y (1 - p_y)^g log p_y    dL/dlog p_y = alpha_y (g (1 - p_y)^(g - 1) p_y log p_y - (1 - p_y)^g)
#   poly1  L = -log p_y - eps (p_y - 1)         dL/dlog p_y = -1 - eps p_y
#
# (1 - p_y = -expm1(log p_y), p_y = exp(log p_y)), and the gradient of the logits is
# c (onehot(y) - e / s), c = dL/dlog p_y times k (1 / the rows that count, for 'mean'), 0 on
# an ignored row: one pass over the logits (e, scaled in place) beside the softmax's own.
# Focal's 0 < g < 1 (whose focusing term needs the composed form's guard at p_y = 1) and
# inputs other than [N, C] take the composed form.


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
    x = _as(input, compute)
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
        grad = _as(grad, input.dtype)
    return _as(loss, input.dtype), (grad,)


fused_target_prob = FusedOp(
    "target_prob_loss",
    tensors=("input", "target", "valid?", "alpha?"),
    differentiable=1,
    options=TargetProbOptions,
    forward=target_prob_forward,
    unreduced="rows",
    native_forward="target_prob_loss",
)


# ---- the row divergences: functional.js_divergence and info.kl_divergence ---------------------
#
# js_divergence of the student log q against a fixed teacher log p, rows along the last
# dimension, M = beta P + (1 - beta) Q (see functional/divergence.py). Each row's terms are
# formed by the composed form's ops (the same bits) and kept: the student's gradient is
# one of them, times the row's factor k (1 / the rows that count for 'batchmean', 0 on a
# row whose label is ignored):
#
#   0 < beta < 1   d row / d log q = (1 - beta) q where(q > 0, log q - log m, 0)
#   beta = 0       row = KL(P || Q)         d / d log q = -p
#   beta = 1       row = KL(Q || P)         d / d log q = q (where(q > 0, log q - log p, 0) + 1)
#
# and with from_logits, through the log-softmax: g - softmax(x) sum_c g_c.
#
# info.kl_divergence of probabilities p (fixed) and q: sum_c p_c where(p_c > 0, log p_c -
# log q_c, 0), whose gradient for q is -where(p > 0, p, 0) / q (autograd's own chain through
# the masked log, 0 / 0 = nan where both are 0 as there).


@dataclass(frozen=True)
class RowDivergenceOptions:
    """kind: 'js' (js_divergence: param beta, flag from_logits, ignore_index, reduction
    'batchmean', 'sum' or 'none') or 'info_kl' (info.kl_divergence: one value per row)."""

    kind: str
    reduction: str
    param: float
    flag: bool
    ignore_index: int


_ROW_OPTIONS: dict[tuple, RowDivergenceOptions] = {}


def row_divergence_options(kind: str, reduction: str, param: float, flag: bool, ignore_index: int) -> RowDivergenceOptions:
    key = (kind, reduction, param, flag, ignore_index)
    options = _ROW_OPTIONS.get(key)
    if options is None:
        if len(_ROW_OPTIONS) > 256:
            _ROW_OPTIONS.clear()
        options = _ROW_OPTIONS[key] = RowDivergenceOptions(kind, reduction, param, flag, ignore_index)
    return options


def fused_row_divergence_applies(input: Tensor, target: Tensor) -> bool:
    """Eager calls that want the gradient of ``input`` only, rows along the last dimension
    of two tensors of one shape."""
    return (
        input.requires_grad and not target.requires_grad and torch.is_grad_enabled() and input.dim() >= 1
        and input.shape == target.shape and not compiling() and fused_may_serve(input, target)
    )


def fused_row_divergence_call(input: Tensor, target: Tensor, labels: Tensor | None, options: RowDivergenceOptions,
                              replay: Replay) -> Tensor:
    native = native_module() if switches.native_enabled() else None
    if native is not None:
        made = native.row_divergence(input, target, labels, options.kind, options.reduction, options.param,
                                     options.flag, options.ignore_index, [True, False, False])
        if made is not None:
            loss, grad = made
            return fused_row_divergence.attach(native, loss, [input], [grad], options.reduction == "none", replay)
    return fused_row_divergence(input, target, labels, options=options, replay=replay)


def row_divergence_forward(
    input: Tensor, target: Tensor, labels: Tensor | None, *, options: RowDivergenceOptions, needs: tuple[bool, ...]
) -> tuple[Tensor, tuple[Tensor | None]]:
    """(the loss, (d/d input,)): see the comment above RowDivergenceOptions. The compiled
    form (losskit._native's row_divergence) is this function op for op."""
    compute, out = result_dtypes(input, target)
    if options.kind == "info_kl":  # input q, target p (probabilities, checked by the caller)
        q, p = input, target
        log_p, log_q = torch.log(p), torch.log(q)
        positive = p > 0
        rows = (p * torch.where(positive, log_p - log_q, 0.0)).sum(-1)
        grad = torch.where(positive, p, 0.0).neg_().div_(q) if needs[0] else None
        return rows, (grad,)
    beta = options.param
    log_q, log_p = _as(input, compute), _as(target, compute)
    if options.flag:
        log_q, log_p = _log_softmax(log_q), _log_softmax(log_p)
    q = torch.exp(log_q) if beta != 0.0 or options.flag else None
    if beta == 0.0:
        p = log_p.exp()
        rows = (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)
        grad = p.neg_()
    elif beta == 1.0:
        terms = q * torch.where(q > 0, log_q - log_p, 0.0)
        rows = terms.sum(-1)
        grad = terms.add_(q)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        p = log_p.exp()
        kl_p = (p * torch.where(p > 0, log_p - log_m, 0.0)).sum(-1)
        terms = q * torch.where(q > 0, log_q - log_m, 0.0)
        rows = beta * kl_p + (1.0 - beta) * terms.sum(-1)
        grad = terms.mul_(1.0 - beta)
    if labels is not None:
        counted = labels != options.ignore_index
        rows = torch.where(counted, rows, 0.0)
        count = counted.sum()
    else:
        count = rows.numel()
    if options.reduction == "batchmean":
        loss = rows.sum() / count
        factor = torch.where(counted, count.reciprocal(), 0.0) if labels is not None else 1.0 / max(count, 1)
    else:
        loss = rows.sum() if options.reduction == "sum" else rows
        factor = torch.where(counted, 1.0, 0.0) if labels is not None else 1.0
    if isinstance(factor, Tensor):
        grad = grad.mul_(factor.unsqueeze(-1))
    elif factor != 1.0:
        grad = grad.mul_(factor)
    if options.flag:  # through the log-softmax: g - softmax sum(g)
        grad = grad.sub_(q * grad.sum(-1, keepdim=True))
    return _as(loss, out), (_as(grad, input.dtype) if needs[0] else None,)


def _log_softmax(x: Tensor) -> Tensor:
    """losskit._core.ops.log_softmax along the last dimension, its ops spelt out."""
    shifted = x - x.amax(dim=-1, keepdim=True)
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


fused_row_divergence = FusedOp(
    "row_divergence",
    tensors=("input", "target", "labels?"),
    differentiable=1,
    options=RowDivergenceOptions,
    forward=row_divergence_forward,
    unreduced="rows",
    native_forward="row_divergence",
)
