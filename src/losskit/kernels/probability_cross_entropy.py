"""Fused cross-entropy with class-probability targets: loss and gradient in one pass over
row chunks, on any device.

For a row of logits z (divided by the temperature T), target probabilities q, label
smoothing eps (q' = (1 - eps) q + eps / C), class weights w and p = softmax(z),
lse = log sum_c exp z_c, s = sum_c w_c q'_c:

    loss  = -sum_c w_c q'_c log p_c
    dx_c  = (p_c s - w_c q'_c) / T

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
    compute, out = result_dtypes(input, target)
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
        # log p from aten's log-softmax (z - max - log sum exp): exact where s lse and
        # sum w q z, each large, would cancel.
        log_probs = torch.ops.aten._log_softmax(z, 1, False)
        losses[rows] = -torch.linalg.vecdot(wq, log_probs)
        if grad is not None:
            view = grad[rows]
            probs = torch.exp(log_probs, out=log_probs)
            probs.mul_(wq.sum(1, keepdim=True)).sub_(wq)
            if scale != 1.0:
                probs.mul_(scale)
            view.copy_(probs)
    return reduce_loss(losses, options.reduction).to(out), (grad,)


fused_probability_cross_entropy = FusedOp(
    "probability_cross_entropy",
    tensors=("input", "target", "weight?"),
    differentiable=1,
    options=CrossEntropyOptions,
    forward=probability_cross_entropy_forward,
)
