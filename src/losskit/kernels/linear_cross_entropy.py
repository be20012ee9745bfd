"""Linear layer + cross-entropy without the (tokens x classes) logits, on CPU.

For each chunk of B token rows x_b (B, H) of the input:

    logits_b = x_b W^T + bias                     (B, C), in a reused chunk buffer
    dlogits_b = (RowLoss.chunk: softmax, target and smoothing terms, 'mean' scale)
    grad_x[b] = dlogits_b W                        (B, H)
    grad_W  += dlogits_b^T x_b                     (C, H), accumulated in place
    grad_bias += sum over rows of dlogits_b        (C,)

so the extra memory is one (B, C) buffer (the gradient overwrites the logits in place)
and the (C, H) weight gradient, instead of several (N, C) tensors. For a scalar loss ('mean', 'sum') the gradients are made in forward
and backward only scales them by grad_output (no pass at all when it is 1). For
reduction='none' the per-token grad_output is unknown in forward, so forward keeps only
the inputs and backward recomputes each chunk's logits (one extra matmul per chunk).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.dtypes import result_dtypes
from .._core.reduction import reduce_loss
from .cross_entropy import RowLoss, scale_by_grad_output, take_precomputed

# Auto chunk. Every chunk reads and writes the whole (C, H) weight gradient once, so few
# large chunks are faster (measured at N=2048, H=512, C=65536 on 2 cores: the three
# matmuls take 3.17 s in chunks of 128 rows, 2.89 s of 256, 2.54 s of 512). The chunk
# buffer may therefore be as large as the weight gradient itself (B = H rows), or 64 MiB
# where that is more, within 16 to 1024 rows: peak extra memory stays about twice the
# weight gradient, whatever the number of tokens.
LINEAR_CHUNK_BYTES = 64 << 20


def auto_chunk_rows(num_classes: int, in_features: int) -> int:
    return int(min(1024, max(16, in_features, LINEAR_CHUNK_BYTES // (4 * max(num_classes, 1)))))


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        input: Tensor,
        linear_weight: Tensor,
        linear_bias: Tensor | None,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        label_smoothing: float,
        lse_square_scale: float,
        softcap: float | None,
        reduction: str,
        chunk_rows: int,
    ) -> Tensor:
        compute, _ = result_dtypes(input, linear_weight)
        n = input.shape[0]
        num_classes = linear_weight.shape[0]
        x = input.to(compute)
        w = linear_weight.to(compute)
        b = None if linear_bias is None else linear_bias.to(compute)
        rows_loss = RowLoss(
            target, ignore_index, weight, num_classes, compute, label_smoothing, lse_square_scale, softcap, reduction
        )
        needs = ctx.needs_input_grad[:3]
        precompute = reduction != "none" and any(needs)
        grads = _zero_grads(x, w, b, needs) if precompute else (None, None, None)
        lse = torch.empty(n, dtype=compute)
        z_target = torch.empty(n, dtype=compute)
        smooth_dot = torch.empty(n, dtype=compute) if label_smoothing > 0 else None
        for rows, logits, grad_logits in _chunks(x, w, b, chunk_rows, with_grad=precompute):
            lse[rows], z_target[rows], smooth = rows_loss.chunk(logits, rows, grad_logits)
            if smooth_dot is not None:
                smooth_dot[rows] = smooth
            if precompute:
                _accumulate(grads, grad_logits, x[rows], w, rows)
        ctx.reduction = reduction
        ctx.dtypes = (input.dtype, linear_weight.dtype, None if linear_bias is None else linear_bias.dtype)
        if precompute:
            ctx.precomputed = grads
        elif reduction == "none" and any(needs):
            ctx.save_for_backward(x, w, b)
            ctx.rows_loss, ctx.chunk_rows = rows_loss, chunk_rows
        out = reduce_loss(rows_loss.losses(lse, z_target, smooth_dot), reduction, rows_loss.denominator)
        return out.to(input.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        if ctx.reduction == "none":
            grads = _recompute_grads(ctx, grad_output)
        else:
            grads = take_precomputed(ctx, "linear_cross_entropy")
            scale_by_grad_output([g for g in grads if g is not None], grad_output, ctx.reduction)
        out = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return out[0], out[1], out[2], None, None, None, None, None, None, None, None


def _zero_grads(x: Tensor, w: Tensor, b: Tensor | None, needs) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    return (
        torch.empty_like(x) if needs[0] else None,
        torch.zeros_like(w) if needs[1] else None,
        torch.zeros_like(b) if needs[2] and b is not None else None,
    )


def _chunks(x: Tensor, w: Tensor, b: Tensor | None, chunk_rows: int, with_grad: bool):
    """Yield (rows, logits, grad buffer) per chunk: one reused (B, C) buffer, into which
    the gradient is written over the logits when ``with_grad``."""
    n = x.shape[0]
    size = min(chunk_rows, n)
    logits_buf = torch.empty(size, w.shape[0], dtype=x.dtype)
    w_t = w.t()
    for start in range(0, n, size):
        rows = slice(start, min(start + size, n))
        count = rows.stop - rows.start
        logits = logits_buf[:count]
        if b is None:
            torch.mm(x[rows], w_t, out=logits)
        else:
            torch.addmm(b, x[rows], w_t, out=logits)
        yield rows, logits, logits if with_grad else None


def _accumulate(grads, grad_logits: Tensor, x_rows: Tensor, w: Tensor, rows: slice) -> None:
    grad_x, grad_w, grad_b = grads
    if grad_x is not None:
        torch.mm(grad_logits, w, out=grad_x[rows])
    if grad_w is not None:
        grad_w.addmm_(grad_logits.t(), x_rows)
    if grad_b is not None:
        grad_b.add_(grad_logits.sum(dim=0))


def _recompute_grads(ctx, grad_output: Tensor):
    """reduction='none': each chunk's logits again, rows scaled by their grad_output."""
    x, w, b = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grads = _zero_grads(x, w, b, needs)
    per_row = grad_output.to(x.dtype).unsqueeze(1)
    for rows, logits, grad_logits in _chunks(x, w, b, ctx.chunk_rows, with_grad=True):
        ctx.rows_loss.chunk(logits, rows, grad_logits)
        grad_logits.mul_(per_row[rows])
        _accumulate(grads, grad_logits, x[rows], w, rows)
    return grads


def fused_linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    reduction: str,
    chunk_rows: int | None,
) -> Tensor:
    """Launcher: (N, H) input, (C, H) weight, (N,) class indices; the caller has validated."""
    rows = chunk_rows if chunk_rows is not None else auto_chunk_rows(*linear_weight.shape)
    return LinearCrossEntropy.apply(
        input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing,
        lse_square_scale, softcap, reduction, rows,
    )
