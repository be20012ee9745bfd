"""Fused cross-entropy: loss and gradient in one pass over row chunks, on any device.

torch's eager cross-entropy writes the (N, C) log-softmax in forward and keeps it for
backward, which then allocates a (N, C) one-hot gradient and a (N, C) input gradient:
three logits-sized buffers. Here each chunk of rows is read once, while it is in cache,
and the gradient with respect to the logits is written straight into the one (N, C)
buffer that autograd hands back; backward only scales it by grad_output.

For a row with logits z, target y (not ignored), class weights w (1 without weight),
W = sum_c w_c, label smoothing eps, z-loss scale s and p = softmax(z), lse = log sum exp z:

    loss  = (1 - eps) w_y (lse - z_y) + eps / C * (W lse - sum_c w_c z_c) + s lse^2
    dz_c  = p_c [(1 - eps) w_y + eps W / C + 2 s lse] - (1 - eps) w_y [c = y] - eps / C * w_c

and an ignored row has loss 0 and gradient 0. With logit soft-capping at cap, z is
cap * tanh(x / cap) of the raw logits x, and dx = dz * (1 - tanh^2(x / cap)).

The same torch ops run on every device. On the CPU a few decisions read the data (is any
row ignored? did p_y underflow?), which is free there and saves passes; elsewhere the
code takes the branch-free form, so that no chunk waits for the device: lse comes from
a direct logsumexp and p = exp(z - lse) is written into the gradient buffer. Under
torch.compile the kernel is the custom op ``losskit::cross_entropy``, one node in the
graph with a fake implementation for tracing; in eager mode it is an autograd.Function
whose gradient buffer is handed to autograd once and scaled in place.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._core.dtypes import result_dtypes
from .._core.reduction import reduce_loss
from . import triton_support
from .common import Replay, compiling, fused_may_serve, scale_by_grad_output, take_precomputed, wants_grad

# Rows per chunk are chosen so that a chunk of float32 logits is about this many bytes. On
# the CPU a chunk stays in cache across the few passes over it, while the handful of torch
# calls per chunk stay a small part of the time; on an accelerator the chunk only bounds
# the temporaries, and larger chunks mean fewer kernel launches.
CHUNK_BYTES = 4 << 20
DEVICE_CHUNK_BYTES = 256 << 20


def rows_per_chunk(num_classes: int, device_type: str = "cpu") -> int:
    budget = CHUNK_BYTES if device_type == "cpu" else DEVICE_CHUNK_BYTES
    return max(1, budget // (4 * max(num_classes, 1)))


class RowLoss:
    """Cross-entropy of rows of logits, computed chunk by chunk, gradient in place.

    Everything that depends only on the targets (per-row weights and gradient
    coefficients) is computed once for the whole batch here, so that the per-chunk work
    is the handful of large operations over the chunk itself.
    """

    def __init__(
        self,
        target: Tensor,
        ignore_index: int,
        weight: Tensor | None,
        num_classes: int,
        dtype: torch.dtype,
        label_smoothing: float = 0.0,
        lse_square_scale: float = 0.0,
        softcap: float | None = None,
        reduction: str = "sum",
    ) -> None:
        self.on_cpu = target.device.type == "cpu"
        valid = target != ignore_index
        self.valid = valid
        # Read on the host only where that is free; elsewhere assume some row may be ignored.
        self.all_valid = bool(valid.all()) if self.on_cpu else False
        self.target = target.masked_fill(~valid, 0).long().unsqueeze(1)  # (N, 1)
        self.counts = valid.to(dtype)
        self.weight = None if weight is None else weight.to(dtype)
        per_class = torch.ones(num_classes, dtype=dtype, device=target.device) if weight is None else self.weight
        self.num_classes = num_classes
        self.eps = label_smoothing
        self.total_weight = per_class.sum()
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        # w_y of each row, 0 where ignored.
        self.target_weight = self.counts if weight is None else per_class[self.target.squeeze(1)] * self.counts
        self.denominator = self.target_weight.sum()  # what 'mean' divides the cross-entropy by
        self.count = self.counts.sum()  # and the z-loss: a per-token regulariser, unweighted
        # dz = scale * (p * coef - (1 - eps) w_y [c = y] - eps / C * w_c); z-loss adds 2 s lse to coef.
        # 'mean' divides the gradient too: folded in here, it costs nothing per element. All
        # targets ignored makes the mean 0/0 = nan, but its gradient 0, as in torch.
        coef = (1.0 - self.eps) * self.target_weight + self.counts * (self.eps * self.total_weight / num_classes)
        target_step = -(1.0 - self.eps) * self.target_weight
        smooth_step = (-self.eps / num_classes) * per_class
        lse_coef: Tensor | float = 2.0 * lse_square_scale
        if reduction == "mean":
            scale = torch.where(self.denominator != 0, 1.0 / self.denominator, 0.0)
            per_token = torch.where(self.count != 0, 1.0 / self.count, 0.0)
            coef, target_step, smooth_step = coef * scale, target_step * scale, smooth_step * scale
            lse_coef = lse_coef * per_token
        self.coef, self.target_step, self.smooth_step, self.lse_coef = coef, target_step.unsqueeze(1), smooth_step, lse_coef
        # The common case (no weight, smoothing or z-loss, nothing ignored, 'sum'/'none'): coef is 1.
        self.unit_coef = (
            weight is None and self.eps == 0.0 and lse_square_scale == 0.0 and self.all_valid and reduction != "mean"
        )

    def chunk(
        self, logits: Tensor, rows: slice, grad: Tensor | None, in_place: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(lse, z_y, sum_c w_c z_c) of the chunk's rows; dloss/dlogits into ``grad`` if given.

        ``grad`` is a contiguous buffer of the chunk's shape, or, with ``in_place``, the
        logits themselves (a buffer the caller owns), which the gradient then overwrites.
        Where Triton serves the logits (CUDA), one kernel does it all
        (:mod:`losskit.kernels.triton_cross_entropy`).
        """
        if triton_support.serves(logits):
            from .triton_cross_entropy import cross_entropy_rows

            return cross_entropy_rows(self, logits, rows, grad)
        capped = None
        z = logits
        if self.softcap is not None:
            capped = torch.tanh(logits / self.softcap)
            z = capped * self.softcap
            in_place = False  # z is a new tensor; the caller's buffer is not overwritten
        target = self.target[rows]
        valid = self.valid[rows]
        z_target = z.gather(1, target).squeeze(1)
        smooth_dot = None
        if self.eps > 0.0:
            smooth_dot = z @ self.weight if self.weight is not None else z.sum(dim=1)
        if grad is None:  # the loss only: no probabilities needed
            return torch.logsumexp(z, dim=1), z_target, smooth_dot
        if self.on_cpu:
            lse, probs = self._cpu_softmax(z, z_target, target, valid, grad, in_place)
        else:
            # Branch-free: one logsumexp, then p = exp(z - lse) written into the buffer.
            lse = torch.logsumexp(z, dim=1)
            probs = torch.sub(z, lse.unsqueeze(1), out=grad).exp_()
        if not self.unit_coef:
            coef = self.coef[rows]
            if self.lse_square_scale:
                coef = coef + self.counts[rows] * self.lse_coef * lse
            probs.mul_(coef.unsqueeze(1))
        if not self.all_valid:
            probs.masked_fill_(~valid.unsqueeze(1), 0.0)  # rows of all -inf hold nan
        probs.scatter_add_(1, target, self.target_step[rows])
        if self.eps > 0.0:
            if self.all_valid:
                probs.add_(self.smooth_step)
            else:
                probs.addcmul_(self.counts[rows].unsqueeze(1), self.smooth_step)
        if capped is not None:
            probs.mul_(1.0 - capped.square())
        return lse, z_target, smooth_dot

    @staticmethod
    def _cpu_softmax(
        z: Tensor, z_target: Tensor, target: Tensor, valid: Tensor, grad: Tensor, in_place: bool
    ) -> tuple[Tensor, Tensor]:
        """(lse, p written into ``grad``) with aten's vectorised softmax, a third of the
        passes of max, exp, sum and scale one by one.

        lse = z_y - log p_y exactly, unless p_y underflows (z_y far below the row max):
        those rare rows get a direct logsumexp, taken before an in-place softmax destroys
        z. p_y >= exp(z_y - max - log C) keeps p_y a normal float when z_y - max > -60.
        """
        risky = fallback = None
        if in_place:
            risky = ((z_target - z.amax(dim=1)) < -60.0) & valid
            if bool(risky.any()):
                fallback = torch.logsumexp(z[risky], dim=1)
        probs = torch.ops.aten._softmax.out(z, 1, False, out=grad)
        p_target = probs.gather(1, target).squeeze(1)
        lse = z_target - p_target.log()
        if in_place:
            if fallback is not None:
                lse[risky] = fallback
        else:
            underflow = (p_target < 1e-30) & valid
            if bool(underflow.any()):
                lse[underflow] = torch.logsumexp(z[underflow], dim=1)
        return lse, probs

    def reduced(self, lse: Tensor, z_target: Tensor, smooth_dot: Tensor | None, reduction: str) -> Tensor:
        """The loss from the per-row statistics of :meth:`chunk`, reduced; rows ignored are 0.

        'mean' divides the cross-entropy by the summed target weights (as torch) and the
        z-loss by the number of rows that count (a per-token regulariser, as in PaLM).
        """
        loss = (1.0 - self.eps) * self.target_weight * (lse - z_target)
        if self.eps > 0.0:
            loss = loss + (self.eps / self.num_classes) * (self.total_weight * lse - smooth_dot)
        loss = torch.where(self.valid, loss, 0.0)
        if not self.lse_square_scale:
            return reduce_loss(loss, reduction, self.denominator)
        z_loss = torch.where(self.valid, self.lse_square_scale * lse.square(), 0.0)
        if reduction == "mean":
            return reduce_loss(loss, reduction, self.denominator) + z_loss.sum() / self.count
        return reduce_loss(loss + z_loss, reduction)


def cross_entropy_forward(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    reduction: str,
    with_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """(loss reduced by ``reduction``, dloss/dinput scaled for 'mean' or None): the kernel."""
    compute, _ = result_dtypes(input)
    n, num_classes = input.shape
    rows_loss = RowLoss(
        target, ignore_index, weight, num_classes, compute, label_smoothing, lse_square_scale, softcap, reduction
    )
    # The gradient buffer is contiguous whatever the input's strides: softmax into a
    # strided out= buffer gives wrong numbers, and autograd accepts any layout.
    grad = torch.empty(input.shape, dtype=input.dtype, device=input.device) if with_grad else None
    if triton_support.serves(input):  # one kernel over every row, in the logits' own dtype and strides
        lse, z_target, smooth_dot = rows_loss.chunk(input, slice(None), grad)
        return rows_loss.reduced(lse, z_target, smooth_dot, reduction).to(input.dtype), grad
    lse = input.new_empty(n, dtype=compute)
    z_target = input.new_empty(n, dtype=compute)
    smooth_dot = input.new_empty(n, dtype=compute) if label_smoothing > 0 else None
    step = rows_per_chunk(num_classes, input.device.type)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        chunk = input[rows].to(compute).contiguous()
        grad_chunk = None
        if grad is not None:
            grad_chunk = grad[rows] if grad.dtype == compute else torch.empty_like(chunk)
        lse[rows], z_target[rows], smooth = rows_loss.chunk(chunk, rows, grad_chunk)
        if smooth_dot is not None:
            smooth_dot[rows] = smooth
        if grad_chunk is not None and grad.dtype != compute:
            grad[rows] = grad_chunk
    loss = rows_loss.reduced(lse, z_target, smooth_dot, reduction)
    return loss.to(input.dtype), grad


class FusedCrossEntropy(torch.autograd.Function):
    """Eager form: forward keeps dloss/dx in one (N, C) buffer; backward scales it in place
    by grad_output and hands it to autograd, so the buffer is used only once. A backward it
    cannot serve (create_graph, or a second one) replays the call on the reference path."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, input, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap, reduction, replay
    ) -> Tensor:
        loss, grad = cross_entropy_forward(
            input, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap, reduction, True
        )
        ctx.reduction, ctx.precomputed = reduction, grad
        ctx.replay = replay
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad = take_precomputed(ctx)
        if grad is None:
            (grad,) = ctx.replay.gradients(grad_output, [True])
        else:
            (grad,) = scale_by_grad_output([grad], grad_output, ctx.reduction, in_place=True)
        return grad, None, None, None, None, None, None, None, None


@torch.library.custom_op("losskit::cross_entropy", mutates_args=())
def cross_entropy_op(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    reduction: str,
    with_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Compiled form: (loss, gradient buffer, empty without ``with_grad``)."""
    loss, grad = cross_entropy_forward(
        input, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap, reduction, with_grad
    )
    return loss, input.new_empty(0) if grad is None else grad


@cross_entropy_op.register_fake
def _(input, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap, reduction, with_grad):
    loss = input.new_empty((input.shape[0],) if reduction == "none" else ())
    grad = input.new_empty(input.shape) if with_grad else input.new_empty(0)
    return loss, grad


def _setup_context(ctx, inputs, output) -> None:
    ctx.reduction = inputs[7]
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss: Tensor, _unused: Tensor):
    (grad,) = ctx.saved_tensors
    (grad,) = scale_by_grad_output([grad], grad_loss, ctx.reduction, in_place=False)
    return grad, None, None, None, None, None, None, None, None


cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def fused_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    lse_square_scale: float,
    softcap: float | None,
    replay: Replay,
) -> Tensor:
    """Launcher: (N, C) logits with class-index targets; the caller has validated.

    The custom op while compiling; in eager mode the autograd.Function, or the loss alone
    when no gradient is wanted (no_grad, inference_mode, or an input that needs none).
    ``replay`` recomputes the loss from the logits by the composed reference path, for the
    backward passes the fused gradient cannot serve.
    """
    options = (ignore_index, label_smoothing, lse_square_scale, softcap, reduction)
    if compiling():
        return cross_entropy_op(input, target, weight, *options, wants_grad(input))[0]
    if not wants_grad(input):
        return cross_entropy_forward(input, target, weight, *options, False)[0]
    return FusedCrossEntropy.apply(input, target, weight, *options, replay)


def fused_applies(input: Tensor, target: Tensor) -> bool:
    """Whether the fused path serves this call: 2-D logits and class-index targets."""
    return (
        fused_may_serve(input)
        and input.dim() == 2
        and target.dim() == 1
        and not target.is_floating_point()
        and input.shape[0] > 0
    )
