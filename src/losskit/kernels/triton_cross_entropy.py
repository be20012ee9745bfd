"""Triton cross-entropy: one program per row, two passes over its vocabulary blocks.

For a row with logits z (soft-capped first when softcap is set: z = cap tanh(x / cap)),
target y, and the per-row coefficients of :class:`~losskit.kernels.cross_entropy.RowLoss`
(coef = ((1 - eps) w_y + eps W / C) * scale, step = -(1 - eps) w_y * scale, the per-class
smoothing step -eps / C * w_c * scale, and the z-loss coefficient 2 s lse * z_scale):

    pass 1, online over blocks:  m' = max(m, max_b z),  s' = s e^{m - m'} + sum_b e^{z - m'}
                                 z_y, and sum_c w_c z_c for label smoothing
                                 lse = m + log s
    pass 2 (with a gradient):    dz_c = e^{z_c - lse} (coef + 2 s lse z_scale) + step [c = y]
                                        + smooth_step_c,     times (1 - tanh^2) under softcap

Rows that count for nothing get a gradient of 0 (their logits may even be inf). Logits are
read in their own dtype and strides and accumulated in float32; the gradient is written in
the logits' dtype into a contiguous buffer (or over the logits, when the caller passes
them as the buffer). Offsets are 64-bit: row * stride never overflows past 2^31 elements.
The loss itself is reduced from (lse, z_y, smoothing dot) by RowLoss.reduced, in torch.
This module imports Triton: losskit imports it only when a kernel is to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # vocabulary columns per block: several blocks span a large vocabulary


@triton.jit
def _nearest_bfloat16(x):
    """x rounded to the nearest bfloat16 (ties to even), still as float32, so that the cast
    that follows is exact wherever it runs (Triton's interpreter truncates instead)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

@triton.jit
def _cross_entropy_rows(
    logits_ptr, stride_row, stride_col, grad_ptr, target_ptr, coef_ptr, step_ptr, counts_ptr,
    weight_ptr, smooth_step_ptr, z_coef_ptr, lse_ptr, z_target_ptr, smooth_dot_ptr, n_cols, cap,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_CAP: tl.constexpr, HAS_Z: tl.constexpr,
    WITH_GRAD: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(target_ptr + row)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    z_target = tl.zeros((), tl.float32)
    smooth_dot = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        inside = cols < n_cols
        z = tl.load(base + cols * stride_col, mask=inside, other=float("-inf")).to(tl.float32)
        if HAS_CAP:
            z = tl.where(inside, cap * _tanh(z / cap), float("-inf"))
        new_m = tl.maximum(m, tl.max(z, 0))
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
        s = s * tl.exp(m - safe_m) + tl.sum(tl.exp(z - safe_m), 0)
        m = new_m
        z_target += tl.sum(tl.where(cols == target, z, 0.0), 0)
        if HAS_SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
                smooth_dot += tl.sum(tl.where(inside, z * w, 0.0), 0)
            else:
                smooth_dot += tl.sum(tl.where(inside, z, 0.0), 0)
    lse = m + tl.log(s)
    tl.store(lse_ptr + row, lse)
    tl.store(z_target_ptr + row, z_target)
    if HAS_SMOOTH:
        tl.store(smooth_dot_ptr + row, smooth_dot)
    if WITH_GRAD:
        count = tl.load(counts_ptr + row)
        coef = tl.load(coef_ptr + row)
        if HAS_Z:
            coef += count * tl.load(z_coef_ptr) * lse
        step = tl.load(step_ptr + row)
        grad_base = grad_ptr + row * n_cols
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            inside = cols < n_cols
            x = tl.load(base + cols * stride_col, mask=inside, other=0.0).to(tl.float32)
            z = x
            if HAS_CAP:
                t = _tanh(x / cap)
                z = cap * t
            dz = tl.exp(z - lse) * coef + tl.where(cols == target, step, 0.0)
            if HAS_SMOOTH:
                dz += count * tl.load(smooth_step_ptr + cols, mask=inside, other=0.0)
            if HAS_CAP:
                dz = dz * (1.0 - t * t)
            dz = tl.where(count > 0, dz, 0.0)
            if ROUND_BF16:
                dz = _nearest_bfloat16(dz)
            tl.store(grad_base + cols, dz.to(grad_ptr.dtype.element_ty), mask=inside)


def cross_entropy_rows(row_loss, logits: Tensor, rows: slice, grad: Tensor | None):
    """RowLoss.chunk's contract, by the Triton kernel: (lse, z_y, smoothing dot) of the rows
    of ``logits`` (any dtype, any strides), dloss/dlogits into ``grad`` (contiguous) if given."""
    n, num_classes = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    lse, z_target = torch.empty(n, **f32), torch.empty(n, **f32)
    smooth = torch.empty(n, **f32) if row_loss.eps > 0.0 else lse
    target = row_loss.target[rows].reshape(-1).contiguous()
    coef = row_loss.coef[rows].to(torch.float32).contiguous()
    step = row_loss.target_step[rows].reshape(-1).to(torch.float32).contiguous()
    counts = row_loss.counts[rows].to(torch.float32).contiguous()
    weight = row_loss.weight.to(torch.float32).contiguous() if row_loss.weight is not None else lse
    smooth_step = row_loss.smooth_step.to(torch.float32).expand(num_classes).contiguous() if row_loss.eps > 0.0 else lse
    z_coef = torch.as_tensor(row_loss.lse_coef, **f32).reshape(1)
    if n:
        _cross_entropy_rows[(n,)](
            logits, logits.stride(0), logits.stride(1), grad if grad is not None else lse, target, coef, step, counts,
            weight, smooth_step, z_coef, lse, z_target, smooth, num_classes,
            float(row_loss.softcap or 1.0),
            HAS_WEIGHT=row_loss.weight is not None, HAS_SMOOTH=row_loss.eps > 0.0, HAS_CAP=row_loss.softcap is not None,
            HAS_Z=bool(row_loss.lse_square_scale), WITH_GRAD=grad is not None,
            ROUND_BF16=grad is not None and grad.dtype == torch.bfloat16, BLOCK=min(BLOCK, _pow2(num_classes)),
        )
    dtype = row_loss.coef.dtype
    return lse.to(dtype), z_target.to(dtype), smooth.to(dtype) if row_loss.eps > 0.0 else None


def _pow2(n: int) -> int:
    return 1 << max(4, (max(n, 1) - 1).bit_length())
