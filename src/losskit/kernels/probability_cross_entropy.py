"""Fused cross-entropy with class-probability targets: loss and gradient in one pass over
row chunks, on any device.

For a row of logits z (divided by the temperature T), target probabilities q, label
smoothing eps (q' = (1 - eps) q + eps / C), class weights w and p = softmax(z),
lse = log sum_c exp z_c, s = sum_c w_c q'_c:

    loss  = -sum_c w_c q'_c log p_c = s (lse - m) - sum_c w_c q'_c (z_c - m)
    dx_c  = (p_c s - w_c q'_c) / T,    dx_k = -sum_{c != k} dx_c   at the row max k

(the gradient of a row sums to 0: the peak's entry is formed from the others, without the
cancellation of p_k s - w_k q'_k on a confident row; lse - m = log1p of the others' sum
of exp(z - m), likewise; see :mod:`losskit.kernels.rows`)

and 'mean' divides by the number of rows (not by the weights, as torch), folded into the
gradient here. torch's composed form keeps the (N, C) log-softmax and makes two more
(N, C) tensors in backward; here each chunk's temporaries stay in cache and one (N, C)
gradient buffer is written. Calls with soft-capping, the z-loss or a target that needs
a gradient take the composed reference. The autograd, custom-op and replay machinery
comes from :class:`~losskit.kernels.fused_op.FusedOp`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.dtypes import result_dtypes
from .._core.options import CrossEntropyOptions
from .._core.reduction import reduce_loss
from .cross_entropy import rows_per_chunk
from .fused_op import FusedOp, fused_may_serve


def probability_applies(input: Tensor, target: Tensor, options: CrossEntropyOptions) -> bool:
    """(N, C) logits with probability targets that need no gradient, without soft-capping
    or the z-loss."""
    return (
        input.dim() == 2
        and input.shape[0] > 0
        and not target.requires_grad
        and options.softcap is None
        and not options.lse_square_scale
        and fused_may_serve(input, target)
    )


def probability_cross_entropy_forward(
    input: Tensor, target: Tensor, weight: Tensor | None, *, options: CrossEntropyOptions, needs: tuple[bool]
) -> tuple[Tensor, tuple[Tensor | None]]:
    """(loss, (dloss/dinput or None,)) of (N, C) logits and (N, C) class probabilities."""
    compute, out = result_dtypes(input, target, weight)
    n, num_classes = input.shape
    eps, temperature = options.label_smoothing, options.temperature
    w = None if weight is None else weight.to(compute)
    scale = (1.0 / n if options.reduction == "mean" else 1.0) / temperature
    grad = torch.empty(input.shape, dtype=input.dtype, device=input.device) if needs[0] else None
    losses = input.new_empty(n, dtype=compute)
    step = rows_per_chunk(num_classes, input.device.type)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        z = input[rows].to(compute)
        z = z / temperature if temperature != 1.0 else z
        q = target[rows].to(compute)
        if eps > 0.0:
            q = q * (1.0 - eps) + eps / num_classes
        wq = q if w is None else q * w
        total_wq = wq.sum(1)
        # With the row max m at column k and e = exp(z - m) (e_k = 1), the others'
        # sum o = sum_{c != k} e_c is summed without the large e_k, so log sum exp z =
        # m + log1p(o) and 1 - p_k = o / (1 + o) keep their precision on a confident row
        # (kernels.rows; aten's log-softmax loses the tiny terms beside e_k). The loss
        # s log1p(o) - sum_c w_c q'_c (z_c - m) adds two non-negative terms.
        row_max, peak = z.max(dim=1, keepdim=True)
        shifted = z - row_max
        dot = torch.linalg.vecdot(wq, shifted)
        e = shifted.exp_()
        e.scatter_(1, peak, 0.0)
        others = e.sum(1)
        losses[rows] = total_wq * torch.log1p(others) - dot
        if grad is not None:
            # dx_c = p_c s - w_c q'_c; the row sums to 0, so the peak's entry is minus the
            # others' sum, summed without it: no p_k - q_k cancellation.
            dx = e.mul_((total_wq / (1.0 + others)).unsqueeze(1)).sub_(wq)
            dx.scatter_(1, peak, 0.0)
            dx.scatter_(1, peak, dx.sum(1, keepdim=True).neg_())
            if scale != 1.0:
                dx.mul_(scale)
            grad[rows].copy_(dx)
    return reduce_loss(losses, options.reduction).to(out), (grad,)


fused_probability_cross_entropy = FusedOp(
    "probability_cross_entropy",
    tensors=("input", "target", "weight?"),
    differentiable=1,
    options=CrossEntropyOptions,
    forward=probability_cross_entropy_forward,
)
