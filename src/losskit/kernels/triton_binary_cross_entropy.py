"""Triton binary cross-entropy with logits: one pass over blocks of elements.

For logit x, target y, weight w and positive weight p_w (1 when not given):

    l_w   = 1 + (p_w - 1) y
    loss  = w [(1 - y) x - l_w log sigma(x)],      log sigma(x) = min(x, 0) - log(1 + e^{-|x|})
    dloss = w [(1 - y) - l_w sigma(-x)] * scale    (scale = 1 / n for 'mean', else 1)

exact at any magnitude (no sigma(x) is formed where it would round to 0 or 1). Weights
that broadcast over the input's trailing dimensions (the usual [C] over [N, C]) are read
periodically, never expanded; other broadcasts are expanded once. Inputs are read in their
own dtype, accumulated in float32; the gradient is written in the input's dtype. 'sum' and
'mean' reduce per block in the kernel, then over the blocks in torch; 'none' writes one
loss per element. Offsets are 64-bit. This module imports Triton: losskit imports it only
when the kernel is to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_cross_entropy import _nearest_bfloat16

BLOCK = 1024


@triton.jit
def _bce_with_logits(
    x_ptr, y_ptr, w_ptr, w_period, pw_ptr, pw_period, loss_ptr, grad_ptr, n, scale,
    HAS_W: tl.constexpr, HAS_PW: tl.constexpr, PER_ELEMENT: tl.constexpr, WITH_GRAD: tl.constexpr,
    ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    offs = block * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    e = tl.exp(-tl.abs(x))
    log_sigmoid = tl.minimum(x, 0.0) - tl.log(1.0 + e)
    lw = tl.full((BLOCK,), 1.0, tl.float32)
    if HAS_PW:
        pw = tl.load(pw_ptr + offs % pw_period, mask=inside, other=1.0).to(tl.float32)
        lw = 1.0 + (pw - 1.0) * y
    loss = (1.0 - y) * x - lw * log_sigmoid
    w = tl.full((BLOCK,), 1.0, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + offs % w_period, mask=inside, other=0.0).to(tl.float32)
        loss = loss * w
    loss = tl.where(inside, loss, 0.0)
    if PER_ELEMENT:
        tl.store(loss_ptr + offs, loss, mask=inside)
    else:
        tl.store(loss_ptr + block, tl.sum(loss, 0))
    if WITH_GRAD:
        sigmoid_neg = tl.where(x >= 0, e, 1.0) / (1.0 + e)
        grad = w * ((1.0 - y) - lw * sigmoid_neg) * scale
        if ROUND_BF16:
            grad = _nearest_bfloat16(grad)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=inside)


def _periodic(t: Tensor, shape: torch.Size) -> tuple[Tensor, int]:
    """(flat values, period): ``t`` broadcast to ``shape`` equals its values repeated with
    this period when its shape is a suffix of ``shape``; otherwise expanded once."""
    while t.dim() > 0 and t.shape[0] == 1 and t.dim() > 1:
        t = t.squeeze(0)
    if t.dim() <= len(shape) and tuple(t.shape) == tuple(shape[len(shape) - t.dim():]):
        flat = t.contiguous().reshape(-1)
    else:
        flat = t.expand(shape).contiguous().reshape(-1)
    return flat, max(flat.numel(), 1)


def bce_with_logits(
    input: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None, reduction: str, with_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """(loss reduced by ``reduction`` in the input's dtype, dloss/dinput or None)."""
    shape = input.shape
    x = input.contiguous().reshape(-1)
    y = target.contiguous().reshape(-1)
    n = x.numel()
    blocks = triton.cdiv(n, BLOCK)
    per_element = reduction == "none"
    loss = torch.empty(n if per_element else blocks, dtype=torch.float32, device=input.device)
    grad = torch.empty(n, dtype=input.dtype, device=input.device) if with_grad else None
    w, w_period = _periodic(weight, shape) if weight is not None else (loss, 1)
    pw, pw_period = _periodic(pos_weight, shape) if pos_weight is not None else (loss, 1)
    if n:
        _bce_with_logits[(blocks,)](
            x, y, w, w_period, pw, pw_period, loss, grad if grad is not None else loss, n,
            1.0 / n if reduction == "mean" else 1.0,
            HAS_W=weight is not None, HAS_PW=pos_weight is not None, PER_ELEMENT=per_element,
            WITH_GRAD=grad is not None, ROUND_BF16=input.dtype == torch.bfloat16, BLOCK=BLOCK,
        )
    if per_element:
        out = loss.reshape(shape)
    else:
        out = loss.sum() / n if reduction == "mean" else loss.sum()
    return out.to(input.dtype), None if grad is None else grad.reshape(shape)
