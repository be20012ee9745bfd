"""Fused binary cross-entropy with logits on CPU: loss and gradient in one pass over chunks.

With lw = 1 + (pos_weight - 1) y = (1 - y) + pos_weight y, for each element:

    loss      = w [(1 - y) x - lw log sigmoid(x)]
    dloss/dx  = w [(1 - y) - lw sigmoid(-x)]

aten's log_sigmoid (min(x, 0) - log1p(exp(-|x|))) and sigmoid never overflow, so logits of
any size are exact; a chunk's handful of element-wise passes stay in cache. The gradient is written in forward into the buffer backward hands to autograd.

CPU eager calls take this kernel, and CUDA eager calls its Triton twin
(:mod:`losskit.kernels.triton_binary_cross_entropy`). Under torch.compile the composed
reference serves instead: the loss is element-wise, and inductor fuses it into one kernel
of its own. The autograd and replay machinery comes from
:class:`~losskit.kernels.fused_op.FusedOp`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._core import switches
from .._core.dtypes import result_dtypes
from .._core.reduction import reduce_loss
from . import triton_support
from .fused_op import FusedOp, compiling, fused_may_serve


@dataclass(frozen=True)
class ReductionOption:
    """The one option of the fused BCE-with-logits."""

    reduction: str


def bce_with_logits_forward(
    input: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None, *, options: ReductionOption,
    needs: tuple[bool],
) -> tuple[Tensor, tuple[Tensor | None]]:
    """(loss reduced by ``reduction``, (dloss/dinput scaled for 'mean' or None,)): the
    kernel, in Triton where it serves the input."""
    reduction, with_grad = options.reduction, needs[0]
    if triton_support.serves(input):
        from .triton_binary_cross_entropy import bce_with_logits

        loss, grad = bce_with_logits(input, target, weight, pos_weight, reduction, with_grad)
        return loss, (grad,)
    compute, _ = result_dtypes(input)
    shape = input.shape
    # Rows of the last dimension, so that a weight broadcast from the right (e.g. [C]
    # over [N, C]) is sliced per chunk as a view and never copied to the full size.
    cols = shape[-1] if input.dim() else 1
    x = input.reshape(-1, cols)
    y = target.reshape(-1, cols)
    w = None if weight is None else weight.to(compute).expand(shape).reshape(-1, cols)
    pw = None if pos_weight is None else pos_weight.to(compute).expand(shape).reshape(-1, cols)
    n = input.numel()
    loss = torch.empty(x.shape, dtype=compute, device=input.device)
    grad = torch.empty(x.shape, dtype=input.dtype, device=input.device) if with_grad else None
    scale = 1.0 / n if reduction == "mean" else 1.0  # 'mean' folded into the gradient
    step = max(1, switches.chunks().bce_elements // max(cols, 1))
    for start in range(0, x.shape[0], step):
        part = slice(start, start + step)
        xc = x[part].to(compute)
        yc = y[part].to(compute)
        not_y = 1.0 - yc
        # lw = 1 + (pos_weight - 1) y
        lw = None if pw is None else torch.addcmul(not_y, pw[part], yc)
        # aten's log_sigmoid and sigmoid are exact at any magnitude: min(x, 0) - log1p(e^-|x|).
        log_sigmoid = torch.nn.functional.logsigmoid(xc)
        chunk_loss = torch.mul(not_y, xc).sub_(log_sigmoid if lw is None else log_sigmoid.mul_(lw))
        if w is not None:
            chunk_loss.mul_(w[part])
        loss[part] = chunk_loss
        if grad is not None:
            sigmoid_neg = torch.sigmoid(xc.neg())
            chunk_grad = not_y.sub_(sigmoid_neg if lw is None else sigmoid_neg.mul_(lw))
            if w is not None:
                chunk_grad.mul_(w[part])
            if scale != 1.0:
                chunk_grad.mul_(scale)
            grad[part] = chunk_grad
    return reduce_loss(loss.view(shape), reduction).to(input.dtype), (None if grad is None else grad.view(shape),)


fused_bce_with_logits = FusedOp(
    "binary_cross_entropy_with_logits",
    tensors=("input", "target", "weight?", "pos_weight?"),
    differentiable=1,
    options=ReductionOption,
    forward=bce_with_logits_forward,
    unreduced="elements",
)


def fused_bce_applies(input: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None) -> bool:
    """CPU, or CUDA with Triton; eager mode (compiled, inductor fuses the reference); non-empty
    input, a target of the input's dtype (so the result dtype needs no promotion), and no
    gradient wanted for target, weight or pos_weight."""
    extras = [t for t in (target, weight, pos_weight) if t is not None]
    return (
        fused_may_serve(input)
        and not compiling()
        and (input.device.type == "cpu" or triton_support.serves(input))
        and input.numel() > 0
        and target.dtype == input.dtype
        and not any(t.requires_grad for t in extras)
    )
