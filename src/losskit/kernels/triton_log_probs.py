"""Triton row math of :mod:`losskit.kernels.linear_log_probs`: one program per row of a
chunk of logits, so a row's numbers never depend on the rows beside it.

For a row z (the transformed logits of one rank's classes, or all of them), target column
``index`` (when ``held``), with m = max_c z_c at column a (the first maximum):

    pass 1, over blocks:  m, a                   (the first column where z = m)
    pass 2, over blocks:  e_c = exp(z_c - m)
                          rest   = sum_{c != a} e_c
                          spread = sum_c e_c (m - z_c)
                          z_y,  [y = a]

and, for the gradient, with the row's saved m, L = log1p(rest), H, 1 - p_y, log p_y and
its upstream factors g (of log p_y) and h (of H), already times 1/T:

    log p_c = (z_c - m) - L,   p_c = exp(log p_c)
    dz_c    = -p_c (g + h (log p_c + H))             for c != y
    dz_y    = g (1 - p_y) - h p_y (log p_y + H)

written over the logits (the caller's chunk buffer). Every sum is accumulated in float32
(float64 for float64 logits); the chunk is already in the compute dtype. This module
imports Triton: losskit imports it only when a kernel is to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # vocabulary columns per block


@triton.jit
def _stats_rows(
    z_ptr, n_cols, index_ptr, held_ptr, max_ptr, rest_ptr, spread_ptr, z_target_ptr, is_max_ptr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * n_cols
    index = tl.load(index_ptr + row)
    held = tl.load(held_ptr + row) != 0
    # Pass 1: the maximum and its first column.
    m = tl.full((), float("-inf"), z_ptr.dtype.element_ty)
    arg = tl.full((), 0, tl.int64)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        z = tl.load(base + cols, mask=cols < n_cols, other=float("-inf"))
        block_max = tl.max(z, 0)
        block_arg = tl.min(tl.where(z == block_max, cols, n_cols), 0)
        better = block_max > m
        arg = tl.where(better, block_arg, arg)
        m = tl.where(better, block_max, m)
    # Pass 2: the sums relative to m, the argmax's exact 1 left out of rest.
    rest = tl.zeros((), z_ptr.dtype.element_ty)
    spread = tl.zeros((), z_ptr.dtype.element_ty)
    z_target = tl.zeros((), z_ptr.dtype.element_ty)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        inside = cols < n_cols
        z = tl.load(base + cols, mask=inside, other=0.0)
        d = z - m
        e = tl.where(inside & (cols != arg), tl.exp(d), 0.0)
        rest += tl.sum(e, 0)
        spread += tl.sum(-(e * d), 0)
        z_target += tl.sum(tl.where(inside & (cols == index), z, 0.0), 0)
    tl.store(max_ptr + row, m)
    tl.store(rest_ptr + row, rest)
    tl.store(spread_ptr + row, spread)
    tl.store(z_target_ptr + row, tl.where(held, z_target, 0.0))
    tl.store(is_max_ptr + row, tl.where(held & (arg == index), 1.0, 0.0))


@triton.jit
def _gradient_rows(
    z_ptr, n_cols, index_ptr, held_ptr, max_ptr, log_total_ptr, entropy_ptr, one_minus_ptr, log_p_ptr, g_ptr, h_ptr,
    HAS_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * n_cols
    index = tl.load(index_ptr + row)
    held = tl.load(held_ptr + row) != 0
    m = tl.load(max_ptr + row)
    log_total = tl.load(log_total_ptr + row)
    g = tl.load(g_ptr + row)
    target = g * tl.load(one_minus_ptr + row)
    if HAS_ENTROPY:
        h = tl.load(h_ptr + row)
        entropy = tl.load(entropy_ptr + row)
        log_p_y = tl.load(log_p_ptr + row)
        target -= h * tl.exp(log_p_y) * (log_p_y + entropy)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        inside = cols < n_cols
        z = tl.load(base + cols, mask=inside, other=0.0)
        log_p = (z - m) - log_total
        if HAS_ENTROPY:
            dz = -(tl.exp(log_p) * (g + h * (log_p + entropy)))
        else:
            dz = -(tl.exp(log_p) * g)
        dz = tl.where(held & (cols == index), target, dz)
        tl.store(base + cols, dz, mask=inside)


def _block(n_cols: int) -> int:
    return min(BLOCK, 1 << max(4, (max(n_cols, 1) - 1).bit_length()))


def local_stats_rows(z: Tensor, index: Tensor, held: Tensor):
    """:func:`losskit.kernels.linear_log_probs.local_stats` by the kernel (``z`` contiguous)."""
    from .linear_log_probs import LocalStats

    n, n_cols = z.shape
    out = [z.new_empty(n) for _ in LocalStats._fields]
    if n and n_cols:
        _stats_rows[(n,)](
            z_ptr=z, n_cols=n_cols, index_ptr=index.contiguous(), held_ptr=held.to(torch.int8).contiguous(),
            max_ptr=out[0], rest_ptr=out[1], spread_ptr=out[2], z_target_ptr=out[3], is_max_ptr=out[4],
            BLOCK=_block(n_cols),
        )
    elif n:
        out[0].fill_(float("-inf"))
        for t in out[1:]:
            t.zero_()
    return LocalStats(*out)


def gradient_rows(z: Tensor, stats, g: Tensor, h: Tensor | None, index: Tensor, held: Tensor) -> Tensor:
    """:func:`losskit.kernels.linear_log_probs.chunk_gradient` by the kernel, over ``z``."""
    n, n_cols = z.shape
    if n and n_cols:
        rows = [s.contiguous() for s in stats]
        _gradient_rows[(n,)](
            z_ptr=z, n_cols=n_cols, index_ptr=index.contiguous(), held_ptr=held.to(torch.int8).contiguous(),
            max_ptr=rows[0], log_total_ptr=rows[1], entropy_ptr=rows[2], one_minus_ptr=rows[3], log_p_ptr=rows[4],
            g_ptr=g.contiguous(), h_ptr=(g if h is None else h).contiguous(), HAS_ENTROPY=h is not None,
            BLOCK=_block(n_cols),
        )
    return z
