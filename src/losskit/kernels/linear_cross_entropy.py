"""Linear layer + cross-entropy without the (tokens x classes) logits, on any device.

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
Under no_grad / inference_mode only the loss is computed: one matmul per chunk, no
gradient buffers. Half-precision inputs are computed, and the weight gradient
accumulated, in float32. Under torch.compile the kernel is the custom ops
``losskit::linear_cross_entropy`` (and its ``_backward`` for reduction='none').
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._core.dtypes import result_dtypes
from .common import Replay, compiling, scale_by_grad_output, take_precomputed, wants_grad
from .cross_entropy import RowLoss

# Auto chunk. Every chunk reads and writes the whole (C, H) weight gradient once, so few
# large chunks are faster (measured at N=2048, H=512, C=65536 on 2 cores: the three
# matmuls take 3.17 s in chunks of 128 rows, 2.89 s of 256, 2.54 s of 512). The chunk
# buffer may therefore be as large as the weight gradient itself (B = H rows), or 64 MiB
# where that is more, within 16 to 1024 rows: peak extra memory stays about twice the
# weight gradient, whatever the number of tokens.
LINEAR_CHUNK_BYTES = 64 << 20


def auto_chunk_rows(num_classes: int, in_features: int) -> int:
    return int(min(1024, max(16, in_features, LINEAR_CHUNK_BYTES // (4 * max(num_classes, 1)))))


Options = tuple  # (ignore_index, label_smoothing, lse_square_scale, softcap, reduction, chunk_rows)


def _row_loss(target: Tensor, weight: Tensor | None, num_classes: int, dtype: torch.dtype, options: Options) -> RowLoss:
    ignore_index, label_smoothing, lse_square_scale, softcap, reduction, _ = options
    return RowLoss(target, ignore_index, weight, num_classes, dtype, label_smoothing, lse_square_scale, softcap, reduction)


def _compute_copies(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None):
    compute, _ = result_dtypes(input, linear_weight)
    return compute, input.to(compute), linear_weight.to(compute), None if linear_bias is None else linear_bias.to(compute)


def linear_cross_entropy_forward(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    options: Options,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(loss, grad_input, grad_weight, grad_bias): the gradients, in the compute dtype, made
    here for a scalar loss when ``needs`` asks for them; None otherwise."""
    reduction, chunk_rows = options[4], options[5]
    compute, x, w, b = _compute_copies(input, linear_weight, linear_bias)
    n, num_classes = x.shape[0], w.shape[0]
    rows_loss = _row_loss(target, weight, num_classes, compute, options)
    precompute = reduction != "none" and any(needs)
    grads = _zero_grads(x, w, b, needs) if precompute else (None, None, None)
    lse = x.new_empty(n)
    z_target = x.new_empty(n)
    smooth_dot = x.new_empty(n) if options[1] > 0 else None
    for rows, logits in _chunks(x, w, b, chunk_rows):
        grad_logits = logits if precompute else None
        lse[rows], z_target[rows], smooth = rows_loss.chunk(logits, rows, grad_logits, in_place=True)
        if smooth_dot is not None:
            smooth_dot[rows] = smooth
        if precompute:
            _accumulate(grads, grad_logits, x[rows], w, rows)
    loss = rows_loss.reduced(lse, z_target, smooth_dot, reduction)
    return (loss.to(input.dtype), *grads)


def linear_cross_entropy_backward(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    options: Options,
    needs: tuple[bool, bool, bool],
    grad_output: Tensor,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """reduction='none': each chunk's logits again, rows scaled by their grad_output."""
    compute, x, w, b = _compute_copies(input, linear_weight, linear_bias)
    rows_loss = _row_loss(target, weight, w.shape[0], compute, options)
    grads = _zero_grads(x, w, b, needs)
    per_row = grad_output.to(compute).unsqueeze(1)
    for rows, logits in _chunks(x, w, b, options[5]):
        rows_loss.chunk(logits, rows, logits, in_place=True)
        logits.mul_(per_row[rows])
        _accumulate(grads, logits, x[rows], w, rows)
    return grads


def _zero_grads(x: Tensor, w: Tensor, b: Tensor | None, needs) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if needs[0] else None,
        torch.zeros_like(w, memory_format=torch.contiguous_format) if needs[1] else None,
        torch.zeros_like(b) if needs[2] and b is not None else None,
    )


def _chunks(x: Tensor, w: Tensor, b: Tensor | None, chunk_rows: int):
    """Yield (rows, logits) per chunk, the logits in one reused (B, C) buffer."""
    n = x.shape[0]
    size = min(chunk_rows, n)
    logits_buf = x.new_empty(size, w.shape[0])
    w_t = w.t()
    for start in range(0, n, size):
        rows = slice(start, min(start + size, n))
        logits = logits_buf[: rows.stop - rows.start]
        if b is None:
            torch.mm(x[rows], w_t, out=logits)
        else:
            torch.addmm(b, x[rows], w_t, out=logits)
        yield rows, logits


def _accumulate(grads, grad_logits: Tensor, x_rows: Tensor, w: Tensor, rows: slice) -> None:
    grad_x, grad_w, grad_b = grads
    if grad_x is not None:
        torch.mm(grad_logits, w, out=grad_x[rows])
    if grad_w is not None:
        grad_w.addmm_(grad_logits.t(), x_rows)
    if grad_b is not None:
        grad_b.add_(grad_logits.sum(dim=0))


def _cast(grads, dtypes) -> list[Tensor | None]:
    return [None if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes)]


class LinearCrossEntropy(torch.autograd.Function):
    """Eager form: scalar losses hand out gradients made in forward (once, scaled in place);
    reduction='none' recomputes in backward. A backward with create_graph=True, or a second
    backward of a scalar loss, replays the call on the reference path."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, options, replay):  # type: ignore[override]
        needs = tuple(ctx.needs_input_grad[:3])
        loss, *grads = linear_cross_entropy_forward(input, linear_weight, linear_bias, target, weight, options, needs)
        ctx.options, ctx.needs = options, needs
        ctx.dtypes = (input.dtype, linear_weight.dtype, None if linear_bias is None else linear_bias.dtype)
        ctx.replay, ctx.input_shape = replay, input.shape
        if options[4] == "none":
            ctx.save_for_backward(input, linear_weight, linear_bias, target, weight)
        else:
            ctx.precomputed = grads
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        if ctx.options[4] == "none":
            saved = ctx.saved_tensors
            if torch.is_grad_enabled():
                return (*ctx.replay.gradients(grad_output, ctx.needs, saved[:3]), None, None, None, None)
            else:
                grads = linear_cross_entropy_backward(*saved, ctx.options, ctx.needs, grad_output)
        else:
            precomputed = take_precomputed(ctx)
            if precomputed is None:
                grad_input, *rest = ctx.replay.gradients(grad_output, ctx.needs)
                grad_input = None if grad_input is None else grad_input.reshape(ctx.input_shape)
                return (grad_input, *rest, None, None, None, None)
            grads = list(precomputed)
            present = [g for g in grads if g is not None]
            scaled = iter(scale_by_grad_output(present, grad_output, ctx.options[4], in_place=True))
            grads = [None if g is None else next(scaled) for g in grads]
        return (*_cast(grads, ctx.dtypes), None, None, None, None)


def _empty_for_none(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("losskit::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    reduction: str,
    chunk_rows: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Compiled form: (loss, grad_input, grad_weight, grad_bias), each gradient empty where
    not made here (not needed, or reduction='none')."""
    options = (ignore_index, label_smoothing, lse_square_scale, softcap, reduction, chunk_rows)
    loss, *grads = linear_cross_entropy_forward(input, linear_weight, linear_bias, target, weight, options, tuple(needs))
    originals = (input, linear_weight, input if linear_bias is None else linear_bias)
    return (loss, *(_empty_for_none(None if g is None else g.to(o.dtype), o) for g, o in zip(grads, originals)))


@linear_cross_entropy_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap,
      reduction, chunk_rows, needs):
    loss = input.new_empty((input.shape[0],) if reduction == "none" else ())
    made = reduction != "none"
    shapes = (input, linear_weight, linear_bias)
    grads = [t.new_empty(t.shape) if made and need and t is not None else input.new_empty(0) for t, need in zip(shapes, needs)]
    return (loss, *grads)


@torch.library.custom_op("losskit::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    chunk_rows: int,
    needs: list[bool],
    grad_output: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    options = (ignore_index, label_smoothing, lse_square_scale, softcap, "none", chunk_rows)
    grads = linear_cross_entropy_backward(input, linear_weight, linear_bias, target, weight, options, tuple(needs), grad_output)
    originals = (input, linear_weight, input if linear_bias is None else linear_bias)
    return tuple(_empty_for_none(None if g is None else g.to(o.dtype), o) for g, o in zip(grads, originals))


@linear_cross_entropy_backward_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap,
      chunk_rows, needs, grad_output):
    shapes = (input, linear_weight, linear_bias)
    return tuple(t.new_empty(t.shape) if need and t is not None else input.new_empty(0) for t, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output) -> None:
    ctx.args = inputs[5:]  # the options, chunk_rows and needs
    ctx.save_for_backward(*inputs[:5], *output[1:])


def _backward(ctx, grad_loss: Tensor, *_unused: Tensor):
    input, linear_weight, linear_bias, target, weight, *made = ctx.saved_tensors
    ignore_index, label_smoothing, lse_square_scale, softcap, reduction, chunk_rows, needs = ctx.args
    if reduction == "none":
        grads = linear_cross_entropy_backward_op(
            input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, lse_square_scale,
            softcap, chunk_rows, needs, grad_loss,
        )
    else:
        grads = scale_by_grad_output(list(made), grad_loss, reduction, in_place=False)
    grads = [g if need else None for g, need in zip(grads, needs)]
    if linear_bias is None:
        grads[2] = None
    return (*grads, None, None, None, None, None, None, None, None, None)


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


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
    replay: Replay,
) -> Tensor:
    """Launcher: (N, H) input, (C, H) weight, (N,) class indices; the caller has validated.

    The custom op while compiling; in eager mode the autograd.Function, or the loss alone
    (one matmul per chunk, no gradient buffers) when no gradient is wanted. ``replay``
    recomputes the loss from (input, weight, bias) by the composed path, for the backward
    passes the fused gradients cannot serve.
    """
    rows = chunk_rows if chunk_rows is not None else auto_chunk_rows(*linear_weight.shape)
    options = (ignore_index, label_smoothing, lse_square_scale, softcap, reduction, rows)
    needs = [wants_grad(input), wants_grad(linear_weight), wants_grad(linear_bias)]
    if compiling():
        return linear_cross_entropy_op(input, linear_weight, linear_bias, target, weight, *options, needs)[0]
    if not any(needs):
        return linear_cross_entropy_forward(input, linear_weight, linear_bias, target, weight, options, (False,) * 3)[0]
    return LinearCrossEntropy.apply(input, linear_weight, linear_bias, target, weight, options, replay)
