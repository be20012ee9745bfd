"""Fused binary cross-entropy on CPU, on logits and on probabilities: loss and gradient in
one pass.

On logits, with lw = 1 + (pos_weight - 1) y = (1 - y) + pos_weight y, for each element:

    loss      = w [(1 - y) x - lw log sigmoid(x)]
    dloss/dx  = w [(1 - y) - lw sigmoid(-x)]

aten's log_sigmoid (min(x, 0) - log1p(exp(-|x|))) and sigmoid never overflow, so logits of
any size are exact; the input goes in chunks, whose handful of element-wise passes stay in
cache.

On probabilities, with torch's clamps (p = 0 or 1 gives a finite loss and gradient):

    loss      = -w [y max(log p, -100) + (1 - y) max(log(1 - p), -100)]
    dloss/dp  = w (p - y) / max(p (1 - p), 1e-12)

The gradient is written in forward into the buffer backward hands to autograd. Each
kernel has a compiled form in :mod:`losskit._native` (``_native/src/binary.cpp``), the
same ATen op sequence without the cost of dispatching each op from Python, which serves
eager CPU calls with the same bits.

CPU eager calls take these kernels, and CUDA eager calls of the logits loss its Triton twin
(:mod:`losskit.kernels.triton_binary_cross_entropy`). Under torch.compile the composed
reference serves instead: the loss is element-wise, and inductor fuses it into one kernel
of its own. The autograd and replay machinery comes from
:class:`~losskit.kernels.fused_op.FusedOp`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _native
from .._core import switches
from .._core.checks import full_checks
from .._core.dtypes import cast, result_dtypes
from .._core.reduction import reduce_loss
from .._core.validation import check_broadcasts_to, check_in_unit_interval
from . import triton_support
from .fused_op import FusedOp, compiling, fused_may_serve


@dataclass(frozen=True)
class ReductionOption:
    """The one option of the fused binary cross-entropies."""

    reduction: str


# One per reduction, made once (a frozen dataclass costs a microsecond or two a call).
REDUCTION_OPTIONS = {r: ReductionOption(r) for r in ("mean", "sum", "none")}


def bce_with_logits_forward(
    input: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None, *, options: ReductionOption,
    needs: tuple[bool], chunk: int,
) -> tuple[Tensor, tuple[Tensor | None]]:
    """(loss reduced by ``reduction``, (dloss/dinput scaled for 'mean' or None,)): the
    kernel, in Triton where it serves the input, else over chunks of about ``chunk``
    elements (0 where Triton serves: the compiled form then declines the call)."""
    reduction, with_grad = options.reduction, needs[0]
    if triton_support.serves(input):
        from .triton_binary_cross_entropy import bce_with_logits

        loss, grad = bce_with_logits(input, target, weight, pos_weight, reduction, with_grad)
        return loss, (grad,)
    compute, _ = result_dtypes(input)
    shape = input.shape
    cols = shape[-1] if input.dim() else 1
    n = input.numel()
    scale = 1.0 / n if reduction == "mean" else 1.0  # 'mean' folded into the gradient
    step = max(1, chunk // max(cols, 1))
    if n <= step * cols:
        # One chunk (a small batch): the whole tensors, weights broadcast by the ops, and
        # the results are the buffers, without a copy into them.
        loss, grad = _bce_with_logits_chunk(
            cast(input, compute), cast(target, compute), None if weight is None else cast(weight, compute),
            None if pos_weight is None else cast(pos_weight, compute), with_grad, scale,
        )
        grad = None if grad is None else cast(grad, input.dtype)
        return cast(reduce_loss(loss, reduction), input.dtype), (grad,)
    # Rows of the last dimension, so that a weight broadcast from the right (e.g. [C]
    # over [N, C]) is sliced per chunk as a view and never copied to the full size.
    x = input.reshape(-1, cols)
    y = target.reshape(-1, cols)
    w = None if weight is None else weight.to(compute).expand(shape).reshape(-1, cols)
    pw = None if pos_weight is None else pos_weight.to(compute).expand(shape).reshape(-1, cols)
    loss = torch.empty(x.shape, dtype=compute, device=input.device)
    grad = torch.empty(x.shape, dtype=input.dtype, device=input.device) if with_grad else None
    for start in range(0, x.shape[0], step):
        part = slice(start, start + step)
        chunk_loss, chunk_grad = _bce_with_logits_chunk(
            cast(x[part], compute), cast(y[part], compute), None if w is None else w[part],
            None if pw is None else pw[part], with_grad, scale,
        )
        loss[part] = chunk_loss
        if grad is not None:
            grad[part] = chunk_grad
    return cast(reduce_loss(loss.view(shape), reduction), input.dtype), (None if grad is None else grad.view(shape),)


def _bce_with_logits_chunk(
    x: Tensor, y: Tensor, w: Tensor | None, pw: Tensor | None, with_grad: bool, scale: float
) -> tuple[Tensor, Tensor | None]:
    """(loss, gradient or None) of a chunk, in the compute dtype; the op sequence of the
    compiled form (_native/src/binary.cpp), which gives the same bits (its scalars are
    0-dimensional tensors there, the same numbers at a lower cost)."""
    not_y = 1.0 - y
    # lw = 1 + (pos_weight - 1) y
    lw = None if pw is None else torch.addcmul(not_y, pw, y)
    # aten's log_sigmoid is exact at any magnitude: min(x, 0) - log1p(z), z = e^-|x|, which
    # it keeps (buffer); its backward forms lw sigmoid(-x) from z in one pass.
    log_sigmoid, buffer = torch.ops.aten.log_sigmoid_forward(x)
    loss = torch.mul(not_y, x).sub_(log_sigmoid if lw is None else log_sigmoid.mul_(lw))
    if w is not None:
        loss.mul_(w)
    if not with_grad:
        return loss, None
    sigmoid_neg = torch.sigmoid(x.neg()) if lw is None else torch.ops.aten.log_sigmoid_backward(lw, x, buffer)
    grad = not_y.sub_(sigmoid_neg)
    if w is not None:
        grad.mul_(w)
    if scale != 1.0:
        grad.mul_(scale)
    return loss, grad


fused_bce_with_logits = FusedOp(
    "binary_cross_entropy_with_logits",
    tensors=("input", "target", "weight?", "pos_weight?"),
    differentiable=1,
    options=ReductionOption,
    forward=bce_with_logits_forward,
    unreduced="elements",
    extras=(("int", "chunk"),),
    native_forward="binary_cross_entropy_with_logits",
)


def bce_with_logits_chunk(input: Tensor) -> int:
    """The ``chunk`` argument of :data:`fused_bce_with_logits` for this input."""
    return 0 if triton_support.serves(input) else switches.chunks().bce_elements


def fused_bce_applies(input: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None) -> bool:
    """CPU, or CUDA with Triton; eager mode (compiled, inductor fuses the reference); non-empty
    input, a target of the input's dtype (so the result dtype needs no promotion), and no
    gradient wanted for target, weight or pos_weight. The cheap tests first: this runs on
    every call."""
    return (
        input.numel() > 0
        and target.dtype == input.dtype
        and not target.requires_grad
        and (weight is None or not weight.requires_grad)
        and (pos_weight is None or not pos_weight.requires_grad)
        and (input.is_cpu or triton_support.serves(input))
        and fused_may_serve(input)
        and not compiling()
    )


def bce_forward(
    input: Tensor, target: Tensor, weight: Tensor | None, *, options: ReductionOption, needs: tuple[bool],
) -> tuple[Tensor, tuple[Tensor | None]]:
    """(loss reduced by ``reduction``, (dloss/dinput, divided by the count for 'mean', or
    None,)) of binary cross-entropy on probabilities."""
    compute, _ = result_dtypes(input)
    x, y = cast(input, compute), cast(target, compute)
    log_p = torch.log(x).clamp_min_(-100.0)
    log_1mp = torch.log1p(x.neg()).clamp_min_(-100.0)
    # -(y log p + (1 - y) log(1 - p)): the bits of the composed reference, and of torch's
    # (y - 1) log(1 - p) - y log p.
    # (The compiled form's scalars are 0-dimensional tensors: the same numbers, cheaper.)
    loss = (1.0 - y).mul_(log_1mp).add_(torch.mul(y, log_p)).neg_()
    w = None if weight is None else cast(weight, compute)
    if w is not None:
        loss.mul_(w)
    grad = None
    if needs[0]:
        # torch's order: (p - y) / max((1 - p) p, 1e-12), times the weight, divided by the
        # count for 'mean'. The written-out form stays finite at p = 0 or 1, where autograd
        # through the clamped logs would give 0 * inf = nan.
        grad = torch.sub(x, y).div_((1.0 - x).mul_(x).clamp_min_(1e-12))
        if w is not None:
            grad.mul_(w)
        if options.reduction == "mean":
            grad.div_(input.numel())
        grad = cast(grad, input.dtype)
    return cast(reduce_loss(loss, options.reduction), input.dtype), (grad,)


fused_bce = FusedOp(
    "binary_cross_entropy",
    tensors=("input", "target", "weight?"),
    differentiable=1,
    options=ReductionOption,
    forward=bce_forward,
    unreduced="elements",
    native_forward="binary_cross_entropy",
)


def fused_bce_probabilities_applies(input: Tensor, target: Tensor, weight: Tensor | None) -> bool:
    """CPU eager mode (compiled, inductor fuses the reference); non-empty input, a target of
    the input's dtype, and no gradient wanted for target or weight."""
    return (
        input.numel() > 0
        and target.dtype == input.dtype
        and not target.requires_grad
        and (weight is None or not weight.requires_grad)
        and input.is_cpu
        and fused_may_serve(input)
        and not compiling()
    )


def check_probabilities(t: Tensor, name: str, fn: str, hint: str = "") -> None:
    """:func:`~losskit._core.validation.check_in_unit_interval`, its host read done in C++
    where the check reads the values on the host and the compiled part is built: a tensor
    that passes costs one call instead of half a dozen dispatched ops. One that fails takes
    the Python check, which names the value and its index."""
    if t.is_cpu and switches.native_enabled() and full_checks(t):
        native = _native.load()
        if native is not None and native.in_unit_interval(t):
            return
    check_in_unit_interval(t, name, fn, hint)


def check_extra_weight(t: Tensor, shape: tuple[int, ...], name: str, fn: str) -> None:
    """:func:`~losskit._core.validation.check_broadcasts_to` without torch.broadcast_shapes'
    Python cost where ``t`` plainly broadcasts (each of its dimensions, aligned from the
    right, 1 or equal to ``shape``'s)."""
    dims = tuple(t.shape)
    if len(dims) <= len(shape) and all(a == 1 or a == b for a, b in zip(reversed(dims), reversed(shape))):
        return
    check_broadcasts_to(t, shape, name, fn)
