"""The element-wise likelihood losses, fused: poisson_nll, gaussian_nll, kl_div, sigmoid_focal.

A fused op on the plan of kernels/pointwise.py: the loss terms are formed by the composed
form's own ops, in the same order (so the loss has the same bits as the composed form), and
beside them the gradient, written out, times k (1 / the 'mean' divisor, 1 / the batch for
kl_div's 'batchmean', else 1):

  poisson (log-rate x)  terms e^x - y x                     dx = e^x - y        dy = -x
  poisson (rate x)      terms x - y log(x + eps)            dx = 1 - y / (x + eps)
  gaussian              terms (log v + d^2 / v) / 2, d = x - y, v = max(var, eps)
                        dx = d / v   dy = -dx   dvar = (1 - d^2 / v) / (2 v)  (as if unclamped)
  kl_div (log target)   terms e^y (y - x)                   dx = -e^y           dy = e^y (y - x) + e^y
  kl_div                terms xlogy(y, y) - y x             dx = -y
  sigmoid_focal         terms a_t (1 - p_t)^g bce, p = sigmoid(x), bce = (1 - y) x - log sigmoid(x)
                        dx = a_t [(p - y) (1 - p_t)^g - g (1 - p_t)^(g - 1) p (1 - p) (2 y - 1) bce]

(the Stirling term of poisson's full=True and gaussian's constant depend on no input that
the fused path differentiates). The half types are computed in float32 and rounded once,
as the composed form does. Calls the kernel does not serve (a gradient it does not write
out, broadcast shapes, 0 < gamma < 1) take the composed form, which autograd
differentiates. The compiled form (losskit._native's elementwise_loss, src/pointwise.cpp)
is :func:`elementwise_forward` op for op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._core import switches
from .._core.dtypes import cast, result_dtypes
from .fused_op import compiling, fused_may_serve, FusedOp, native_module, Replay

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
    x = input if kind == "kl_div" and options.flag else cast(input, compute)
    lazy = (kind == "poisson" and options.flag and not options.extra) or kind == "gaussian"
    y = target if lazy else cast(target, compute)
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
        v = cast(extra, compute)
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
    return cast(loss, out), tuple(None if g is None else cast(g, t.dtype) for g, t in zip(grads, (input, target, extra)))


def _scaled(g: Tensor, k: float, dtype: torch.dtype) -> Tensor:
    """``g`` times ``k`` (in place), in ``dtype``. (Writing the product straight into a tensor
    of ``dtype`` gives the same bits, but ATen's mixed-dtype loop is not vectorised: it is
    slower than the in-place product and the cast together, at any size.)"""
    g = g if k == 1.0 else g.mul_(k)
    return g if g.dtype == dtype else g.to(dtype)


fused_elementwise = FusedOp(
    "elementwise_loss",
    tensors=("input", "target", "extra?"),
    differentiable=3,
    options=ElementwiseOptions,
    forward=elementwise_forward,
    unreduced="elements",
    native_forward="elementwise_loss",
)
