"""soft_margin and multilabel_soft_margin, fused: the loss and its gradients in one forward.

Both are logistic losses. With e = exp(-|z|) (in (0, 1], never overflows) and
L = log1p(e), the softplus of z and the sigmoid of z are

    softplus(z) = log(1 + exp(z)) = max(z, 0) + L
    sigma(z)    = 1 / (1 + e) where z >= 0, else e / (1 + e)

soft_margin (any shape; y the +1 / -1 labels, k = 1 / the number of elements for 'mean',
else 1; backward multiplies by grad_output, element-wise for 'none'):

    z = -y x            loss = softplus(z)
    dx = -y sigma(z) k  dy = -x sigma(z) k

multilabel_soft_margin (``[N, C]``; y the 0/1 or soft labels, w the class weight
broadcast to ``[N, C]`` (1 without one), k = 1 / C, times 1 / N for 'mean'):

    term = -(y log sigma(x) + (1 - y) log sigma(-x)) = y softplus(-x) + (1 - y) softplus(x)
         = (1 - y) x + L where x >= 0, else -y x + L
    loss_n = sum_c w term / C
    dx = (sigma(x) - y) w k = ((1 - y) a - y b) / (1 + e) w k,  (a, b) = (1, e) where x >= 0, else (e, 1)
    dy = -x w k          (log sigma(x) - log sigma(-x) = x: torch's composed form gets -x
                         as the difference of its two logs; here it is exact)

Numerical choices. One exp and one log1p per element, shared by the loss and the
gradient. Every addend above is non-negative for labels in [0, 1] (and for y = +-1 in
soft_margin), so the loss is within a few float32 ulps of its value, also where it is tiny:
x = 100, y = 1 gives exp(-100) (a subnormal in float32), where torch's log1p(exp(-y x))
rounds to 3.9e-44 for 3.8e-44 and overflows to inf (its gradient to nan) past
-y x = 88.7; ``(1 - y) x + L`` rather than ``softplus(-x) + (1 - y) x`` keeps -log sigma(-x)
accurate where it is about e (y = 0, x very negative), which the shorter form would lose
to cancellation. torch's softplus returns z itself past z = 20 (threshold=20); max(z, 0) + L
rounds to that same z in float32 and float16 / bfloat16 (L < 2.1e-9 < half an ulp of 20),
and is exact beyond it in float64. The gradient's numerator ``(1 - y) a - y b`` holds
the sigmoid's tail e (no 1 - sigma(x) cancellation): y = 1, x = 30 gives -e / (1 + e)
= -9.4e-14, as float64 does. The accuracy against float64 (tests/test_fused_soft_margin.py):
float32 losses and gradients within a few ulps; the half types are computed in float32
and rounded once (the loss and each gradient), so they are within half an ulp of the
float32 result, where torch rounds every op to the half type. That holds for the gradient
backward hands out at grad_output 1; another grad_output scales the rounded gradient in the
half type (FusedOp's node), one more rounding, which in float16's subnormal range (a 'mean'
gradient below 6.1e-5, e.g. 1 / (N C) with N C > 16384) can lose bits that torch, scaling
before it rounds, keeps.

The compiled form (``losskit._native``'s soft_margin_forward and
multilabel_soft_margin_forward, src/soft_margin.cpp) serves eager CPU calls on contiguous
tensors of one dtype. Block by block (8192 elements, or whole rows of the multilabel
input), it forms -|z| in a loop, calls ATen's exp and log1p on that float32 block (ATen's
vectorised exp and log1p differ in bits from std::exp and std::log1p, so they are called,
not rewritten; their vectorised loops give an element the same bits wherever it lies in a
tensor, so a block gives this file's bits on the whole tensor), and forms the terms and
gradients in a second loop with the roundings of this file's ops, in their order; the sums
are ATen's, on the same whole float32 terms. Memory sees the inputs read twice and the terms
and gradients written once (the block's temporaries stay in cache), where torch's composed
multilabel form makes about ten ``[N, C]`` passes forward and ten backward.

Memory for backward: one gradient per input that wants one (torch's soft_margin keeps
the input and the target; its composed multilabel form several ``[N, C]`` buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._core.dtypes import cast, result_dtypes
from .._core.reduction import reduce_loss
from .fused_op import FusedOp, remembered_options


@dataclass(frozen=True)
class SoftMarginOptions:
    """reduction: 'mean', 'sum' or 'none'."""

    reduction: str


def soft_margin_options(reduction: str) -> SoftMarginOptions:
    return remembered_options(SoftMarginOptions, reduction)


def _tail(z: Tensor) -> tuple[Tensor, Tensor]:
    """(e, L) = (exp(-|z|), log1p(e)): the compiled form calls the same ATen exp and log1p
    on a float32 tensor of the same size, holding the same -|z|."""
    e = z.abs().neg_().exp_()
    return e, torch.log1p(e)


def soft_margin_forward(input: Tensor, target: Tensor, *, options: SoftMarginOptions,
                        needs: tuple[bool, ...]) -> tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
    """(the loss reduced, (d/d input, d/d target)) of an input and a target of one shape
    (see the module docstring): the loss in the input's dtype, as torch's."""
    compute, out = result_dtypes(input, target, result=(input,))
    x, y = cast(input, compute), cast(target, compute)
    z = torch.mul(y, x).neg_()  # -y x: the negation is exact
    e, tail = _tail(z)
    loss = cast(reduce_loss(z.clamp_min(0).add_(tail), options.reduction), out)
    if not (needs[0] or needs[1]):
        return loss, (None, None)
    k = 1.0 / input.numel() if options.reduction == "mean" else 1.0
    s = torch.where(z >= 0, 1.0, e).div_(e.add_(1.0))  # sigma(z)
    gx = cast(torch.mul(y, s).mul_(-k), input.dtype) if needs[0] else None
    gy = cast(torch.mul(x, s).mul_(-k), target.dtype) if needs[1] else None
    return loss, (gx, gy)


def multilabel_soft_margin_forward(
    input: Tensor, target: Tensor, weight: Tensor | None, *, options: SoftMarginOptions, needs: tuple[bool, ...]
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
    """(the loss reduced, (d/d input, d/d target)) of ``[N, C]`` input and target and a
    weight that broadcasts to ``[N, C]`` (see the module docstring); the loss in the
    promoted dtype of the three, as torch's."""
    compute, out = result_dtypes(input, target, weight)
    x, y = cast(input, compute), cast(target, compute)
    w = None if weight is None else cast(weight, compute)
    rows, classes = input.shape
    e, tail = _tail(x)
    positive = x >= 0
    not_y = torch.rsub(y, 1.0)
    terms = torch.where(positive, torch.mul(not_y, x), torch.mul(y, x).neg_()).add_(tail)
    if w is not None:
        terms.mul_(w)
    # torch's composed form divides the row sums by C; so does this.
    loss = cast(reduce_loss(terms.sum(-1) / classes, options.reduction), out)
    if not (needs[0] or needs[1]):
        return loss, (None, None)
    k = 1.0 / (classes * rows) if options.reduction == "mean" else 1.0 / classes
    gx = gy = None
    if needs[0]:
        a, b = torch.where(positive, 1.0, e), torch.where(positive, e, 1.0)
        grad = not_y.mul_(a).sub_(b.mul_(y)).div_(e.add_(1.0))
        if w is not None:
            grad.mul_(w)
        gx = cast(grad.mul_(k), input.dtype)
    if needs[1]:
        grad = torch.mul(x, w) if w is not None else x.clone()
        gy = cast(grad.mul_(-k), target.dtype)
    return loss, (gx, gy)


fused_soft_margin = FusedOp(
    "soft_margin",
    tensors=("input", "target"),
    differentiable=2,
    options=SoftMarginOptions,
    forward=soft_margin_forward,
    unreduced="elements",
    native_forward="soft_margin_forward",
)

fused_multilabel_soft_margin = FusedOp(
    "multilabel_soft_margin",
    tensors=("input", "target", "weight?"),
    differentiable=2,
    options=SoftMarginOptions,
    forward=multilabel_soft_margin_forward,
    unreduced="rows",
    native_forward="multilabel_soft_margin_forward",
)
