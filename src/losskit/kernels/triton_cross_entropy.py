"""Triton cross-entropy: one program per row, two passes over its vocabulary blocks.

For a row with raw logits x, the logits the softmax sees are z = cap tanh(x / cap) / T
(soft-capped when softcap is set, divided by the temperature T), and with the per-row
coefficients derived once in :mod:`losskit.kernels.rows` (coef, the target step, the
smoothing step per row times the class weight w_c, and the z-loss coefficient, each
already divided by T for the chain rule):

    pass 1, online over blocks:  m' = max(m, max_b z),  o' = o e^{m - m'} + sum_{b, c != y} e^{z - m'}
                                 z_y, and sum_c w_c z_c for label smoothing
                                 total = o + e^{z_y - m},  lse = m + log total
                                 1 - p_y = o / total,  -log p_y = log1p(o / e^{z_y - m})
    pass 2 (with a gradient):    dx_c = e^{z_c - lse} (coef + lse_coef lse) + smooth_step w_c   (c != y)
                                 dx_y = -(1 - p_y) coef + (coef + step) + smooth_step w_y
                                 times (1 - tanh^2) under softcap

The sum o leaves the target's lane out, so a confident row's 1 - p_y and -log p_y keep
their relative precision (a total summed with the target in it loses the tiny terms that
fall below half its ulp: see :mod:`losskit.kernels.rows`).

Rows that count for nothing get a gradient of 0 (their logits may even be inf). Logits are
read in their own dtype and strides and accumulated in float32; the gradient is written in
the logits' dtype into a contiguous buffer (or over the logits, when the caller passes
them as the buffer). Offsets are 64-bit: row * stride never overflows past 2^31 elements.
The loss itself is reduced from (lse, z_y, smoothing dot) by RowTerms.loss, in torch.
This module imports Triton: losskit imports it only when a kernel is to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Vocabulary columns per block and warps per program (one row). Measured on an H200 at
# N=8192, C=131072, bfloat16, loss and gradient (benchmarks/results/tune-cuda.csv): 2048 and
# 4 warps 4.48 ms, 2048 and 8 4.72 ms, 1024 and 4 (before) 4.67 ms, 16 warps slower at every
# block. 4 warps spill a few bytes in some variants (sm_80 at 2048 columns, sm_100 with every
# option at 1024: pytest -k aot), 8 warps at 2048 columns spill none: within 1% of the before.
BLOCK = 2048
NUM_WARPS = 8


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
    logits_ptr, stride_row, stride_col, grad_ptr, target_ptr, coef_ptr, step_ptr, valid_ptr,
    weight_ptr, smooth_step_ptr, lse_coef_ptr, lse_ptr, z_target_ptr, smooth_dot_ptr, nll_ptr, n_cols, cap,
    inv_temperature,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_CAP: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr, WITH_GRAD: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
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
        if HAS_TEMPERATURE:
            z = z * inv_temperature
        new_m = tl.maximum(m, tl.max(z, 0))
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
        is_target = cols == target
        s = s * tl.exp(m - safe_m) + tl.sum(tl.where(is_target, 0.0, tl.exp(z - safe_m)), 0)
        m = new_m
        z_target += tl.sum(tl.where(is_target, z, 0.0), 0)
        if HAS_SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
                smooth_dot += tl.sum(tl.where(inside, z * w, 0.0), 0)
            else:
                smooth_dot += tl.sum(tl.where(inside, z, 0.0), 0)
    share = tl.exp(z_target - m)  # e_y on the scale of s
    total = s + share
    lse = m + tl.log(total)
    gap = s / total  # 1 - p_y
    # log1p(r) exactly as log(1 + r) r / ((1 + r) - 1) (Goldberg), for r = o / e_y < 1;
    # beyond, or where e_y underflows, log(total) - (z_y - m) has no cancellation.
    ratio = s / tl.where(share > 0.0, share, 1.0)
    one_plus = 1.0 + ratio
    small = tl.where(one_plus == 1.0, ratio, tl.log(one_plus) * (ratio / (one_plus - 1.0)))
    nll = tl.where((share > 0.0) & (ratio < 1.0), small, tl.log(total) - (z_target - m))
    tl.store(lse_ptr + row, lse)
    tl.store(z_target_ptr + row, z_target)
    tl.store(nll_ptr + row, nll)
    if HAS_SMOOTH:
        tl.store(smooth_dot_ptr + row, smooth_dot)
    if WITH_GRAD:
        count = tl.load(valid_ptr + row)
        coef = tl.load(coef_ptr + row)
        if HAS_Z:
            coef += tl.load(lse_coef_ptr + row) * lse
        step = tl.load(step_ptr + row)
        if HAS_SMOOTH:
            smooth_step = tl.load(smooth_step_ptr + row)
        grad_base = grad_ptr + row * n_cols
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            inside = cols < n_cols
            x = tl.load(base + cols * stride_col, mask=inside, other=0.0).to(tl.float32)
            z = x
            if HAS_CAP:
                t = _tanh(x / cap)
                z = cap * t
            if HAS_TEMPERATURE:
                z = z * inv_temperature
            dz = tl.where(cols == target, (coef + step) - gap * coef, tl.exp(z - lse) * coef)
            if HAS_SMOOTH:
                if HAS_WEIGHT:
                    dz += smooth_step * tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
                else:
                    dz += smooth_step
            if HAS_CAP:
                dz = dz * (1.0 - t * t)
            dz = tl.where(count > 0, dz, 0.0)
            if ROUND_BF16:
                dz = _nearest_bfloat16(dz)
            tl.store(grad_base + cols, dz.to(grad_ptr.dtype.element_ty), mask=inside)


def cross_entropy_rows(terms, coefficients, logits: Tensor, rows: slice, safe_target: Tensor, grad: Tensor | None):
    """The contract of :func:`losskit.kernels.cross_entropy.logits_chunk`, by the Triton
    kernel: (lse, z_y, smoothing dot, -log p_y) of the rows of ``logits`` (any dtype, any strides),
    dloss/dlogits into ``grad`` (contiguous) if given, with the rows' ``coefficients``."""
    n, num_classes = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    lse, z_target, nll = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
    options = terms.options
    smoothing = options.label_smoothing > 0.0
    smooth = torch.empty(n, **f32) if smoothing else lse

    def per_row(value) -> Tensor:  # a (n,) float32 tensor of the rows' coefficient
        if isinstance(value, Tensor) and value.dim():
            return value[rows].to(torch.float32).contiguous()
        return torch.as_tensor(value, **f32).expand(n).contiguous()

    target = safe_target.reshape(-1).contiguous()
    valid = (terms.valid[rows].to(torch.float32).contiguous() if terms.valid is not None
             else torch.ones(n, **f32))
    weight = terms.class_weight.to(torch.float32).contiguous() if terms.class_weight is not None else lse
    with_grad = grad is not None
    coef = per_row(coefficients.coef) if with_grad else lse
    step = per_row(coefficients.target_step) if with_grad else lse
    smooth_step = per_row(coefficients.smooth_step) if with_grad and smoothing else lse
    lse_coef = per_row(coefficients.lse_coef) if with_grad and options.lse_square_scale else lse
    if n:
        _cross_entropy_rows[(n,)](
            logits, logits.stride(0), logits.stride(1), grad if with_grad else lse, target, coef, step, valid,
            weight, smooth_step, lse_coef, lse, z_target, smooth, nll, num_classes,
            float(options.softcap or 1.0), 1.0 / options.temperature,
            HAS_WEIGHT=terms.class_weight is not None, HAS_SMOOTH=smoothing, HAS_CAP=options.softcap is not None,
            HAS_Z=bool(options.lse_square_scale), HAS_TEMPERATURE=options.temperature != 1.0, WITH_GRAD=with_grad,
            ROUND_BF16=with_grad and grad.dtype == torch.bfloat16, BLOCK=min(BLOCK, _pow2(num_classes)),
            num_warps=NUM_WARPS,
        )
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32  # the compute dtype
    return lse.to(dtype), z_target.to(dtype), smooth.to(dtype) if smoothing else None, nll.to(dtype)


def _pow2(n: int) -> int:
    return 1 << max(4, (max(n, 1) - 1).bit_length())
