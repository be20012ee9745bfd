"""Fused cross-entropy on CPU: loss and gradient in one pass over row chunks.

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
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

from .._core.dtypes import result_dtypes
from .._core.reduction import reduce_loss

_state = threading.local()


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Within this block losskit uses its composed reference code, never a fused kernel.

    Use it for higher-order gradients, forward-mode AD or torch.func transforms, which the
    fused kernels (first-order, precomputed gradients) do not support.
    """
    previous = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = previous


def fused_enabled() -> bool:
    return not getattr(_state, "disabled", False)


# Rows per chunk are chosen so that a chunk of float32 logits is about this many bytes:
# it stays in cache across the few passes over it, while the handful of torch calls per
# chunk stay a small part of the time.
CHUNK_BYTES = 4 << 20


def rows_per_chunk(num_classes: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(num_classes, 1)))


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
        valid = target != ignore_index
        self.valid = valid
        self.all_valid = bool(valid.all())
        self.target = target.masked_fill(~valid, 0).long().unsqueeze(1)  # (N, 1)
        self.counts = valid.to(dtype)
        self.weight = None if weight is None else weight.to(dtype)
        per_class = torch.ones(num_classes, dtype=dtype) if weight is None else self.weight
        self.num_classes = num_classes
        self.eps = label_smoothing
        self.total_weight = float(per_class.sum())
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        # w_y of each row, 0 where ignored.
        self.target_weight = self.counts if weight is None else per_class[self.target.squeeze(1)] * self.counts
        self.denominator = self.target_weight.sum()  # what 'mean' divides by
        # 'mean' divides the gradient too: folded in here, it costs nothing per element. All
        # targets ignored makes the mean 0/0 = nan, but its gradient 0, as in torch.
        scale = 1.0
        if reduction == "mean":
            total = float(self.denominator)
            scale = 1.0 / total if total != 0 else 0.0
        self.grad_scale = scale
        # dz = scale * (p * coef - (1 - eps) w_y [c = y] - eps / C * w_c); z-loss adds 2 s lse to coef
        self.coef = scale * ((1.0 - self.eps) * self.target_weight + self.counts * (self.eps * self.total_weight / num_classes))
        self.target_step = (-scale * (1.0 - self.eps) * self.target_weight).unsqueeze(1)
        self.smooth_step = (-scale * self.eps / num_classes) * per_class
        # The common case (no weight, smoothing or z-loss, nothing ignored, 'sum'): coef is 1.
        self.unit_coef = (
            weight is None and self.eps == 0.0 and lse_square_scale == 0.0 and self.all_valid and scale == 1.0
        )

    def chunk(self, logits: Tensor, rows: slice, grad: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(lse, z_y, sum_c w_c z_c) of the chunk's rows; dloss/dlogits into ``grad`` if given.

        ``grad`` may be ``logits`` itself, when the caller owns that buffer: the gradient
        then overwrites the logits in place.
        """
        capped = None
        z = logits
        if self.softcap is not None:
            capped = torch.tanh(logits / self.softcap)
            z = capped * self.softcap
        target = self.target[rows]
        valid = self.valid[rows]
        z_target = z.gather(1, target).squeeze(1)
        smooth_dot = None
        if self.eps > 0.0:
            smooth_dot = z @ self.weight if self.weight is not None else z.sum(dim=1)
        # lse = z_y - log p_y exactly, unless p_y underflows (z_y far below the row max):
        # those rare rows get a direct logsumexp, taken before an in-place softmax destroys z.
        # p_y >= exp(z_y - max - log C) keeps p_y a normal float when z_y - max > -60.
        in_place = grad is not None and grad.data_ptr() == z.data_ptr()
        risky = fallback = None
        if in_place:
            risky = ((z_target - z.amax(dim=1)) < -60.0) & valid
            if bool(risky.any()):
                fallback = torch.logsumexp(z[risky], dim=1)
        # One vectorised kernel does max, exp, sum and scale per row (aten's softmax), writing
        # p straight into the gradient buffer: a third of the passes of doing them one by one.
        probs = torch.softmax(z, 1) if grad is None else torch.ops.aten._softmax.out(z, 1, False, out=grad)
        p_target = probs.gather(1, target).squeeze(1)
        lse = z_target - p_target.log()
        if in_place:
            if fallback is not None:
                lse[risky] = fallback
        else:
            underflow = (p_target < 1e-30) & valid
            if bool(underflow.any()):
                lse[underflow] = torch.logsumexp(z[underflow], dim=1)
        if grad is not None:
            if not self.unit_coef:
                coef = self.coef[rows]
                if self.lse_square_scale:
                    coef = coef + self.counts[rows] * (2.0 * self.lse_square_scale * self.grad_scale) * lse
                probs.mul_(coef.unsqueeze(1))
            if not self.all_valid:
                probs.masked_fill_(~self.valid[rows].unsqueeze(1), 0.0)  # rows of all -inf hold nan
            probs.scatter_add_(1, target, self.target_step[rows])
            if self.eps > 0.0:
                if self.all_valid:
                    probs.add_(self.smooth_step)
                else:
                    probs.addcmul_(self.counts[rows].unsqueeze(1), self.smooth_step)
            if capped is not None:
                probs.mul_(1.0 - capped.square())
        return lse, z_target, smooth_dot

    def losses(self, lse: Tensor, z_target: Tensor, smooth_dot: Tensor | None) -> Tensor:
        """Per-row loss from the per-row statistics of :meth:`chunk`; 0 where ignored."""
        loss = (1.0 - self.eps) * self.target_weight * (lse - z_target)
        if self.eps > 0.0:
            loss = loss + (self.eps / self.num_classes) * (self.total_weight * lse - smooth_dot)
        if self.lse_square_scale:
            loss = loss + self.lse_square_scale * lse.square()
        return torch.where(self.valid, loss, 0.0)



def take_precomputed(ctx, what: str):
    """The gradient(s) forward stored on ``ctx``, handed out once.

    Backward scales them in place and gives them to autograd, so a second backward through
    the same graph (retain_graph) would see them changed: refuse it with a clear error.
    """
    grads = getattr(ctx, "precomputed", None)
    if grads is None:
        raise RuntimeError(
            f"losskit {what}: backward ran twice through the same graph (retain_graph); its gradient, "
            "made in forward, is used up. Wrap the call in losskit.kernels.reference_only()."
        )
    ctx.precomputed = None
    return grads


def scale_by_grad_output(grads: list[Tensor], grad_output: Tensor, reduction: str) -> None:
    """Multiply precomputed gradients in place by grad_output: per element or row for
    'none' (grad_output broadcast over the trailing dimensions it lacks), else a scalar,
    skipping the pass (over a buffer as large as the logits) when it is exactly 1."""
    if reduction == "none":
        for grad in grads:
            extra = grad.dim() - grad_output.dim()
            grad.mul_(grad_output.reshape(tuple(grad_output.shape) + (1,) * extra).to(grad.dtype))
    elif bool(grad_output != 1):
        for grad in grads:
            grad.mul_(grad_output.to(grad.dtype))


class FusedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (N, C) logits and class-index targets, gradient made in forward.

    forward returns the per-row loss (reduced by the caller's choice) and keeps dloss/dx
    in one (N, C) buffer; backward scales that buffer in place by grad_output (divided by
    the 'mean' denominator) and hands it to autograd, so the buffer is used only once.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        input: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        label_smoothing: float,
        lse_square_scale: float,
        softcap: float | None,
        reduction: str,
    ) -> Tensor:
        compute, _ = result_dtypes(input)
        n, num_classes = input.shape
        rows_loss = RowLoss(
            target, ignore_index, weight, num_classes, compute, label_smoothing, lse_square_scale, softcap, reduction
        )
        grad = torch.empty_like(input, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        lse = torch.empty(n, dtype=compute)
        z_target = torch.empty(n, dtype=compute)
        smooth_dot = torch.empty(n, dtype=compute) if label_smoothing > 0 else None
        step = rows_per_chunk(num_classes)
        for start in range(0, n, step):
            rows = slice(start, start + step)
            chunk = input[rows].to(compute)
            grad_chunk = None
            if grad is not None:
                grad_chunk = grad[rows] if grad.dtype == compute else torch.empty_like(chunk)
            lse[rows], z_target[rows], smooth = rows_loss.chunk(chunk, rows, grad_chunk)
            if smooth_dot is not None:
                smooth_dot[rows] = smooth
            if grad_chunk is not None and grad.dtype != compute:
                grad[rows] = grad_chunk
        ctx.reduction, ctx.precomputed = reduction, grad
        return reduce_loss(rows_loss.losses(lse, z_target, smooth_dot), reduction, rows_loss.denominator).to(input.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad = take_precomputed(ctx, "fused cross_entropy")
        scale_by_grad_output([grad], grad_output, ctx.reduction)
        return grad, None, None, None, None, None, None, None


def fused_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    """Launcher: (N, C) logits on CPU with class-index targets. The caller has validated."""
    return FusedCrossEntropy.apply(
        input, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap, reduction
    )


def fused_applies(input: Tensor, target: Tensor) -> bool:
    """Whether the fused path serves this call: 2-D CPU logits and class-index targets."""
    return (
        fused_enabled()
        and input.device.type == "cpu"
        and input.dim() == 2
        and target.dim() == 1
        and not target.is_floating_point()
        and input.shape[0] > 0
    )
