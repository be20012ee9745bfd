"""Fused cross-entropy: loss and gradient in one pass over row chunks, on any device.

torch's eager cross-entropy writes the (N, C) log-softmax in forward and keeps it for
backward, which then allocates a (N, C) one-hot gradient and a (N, C) input gradient:
three logits-sized buffers. Here each chunk of rows is read once, while it is in cache,
and the gradient with respect to the logits is written straight into the one (N, C)
buffer that autograd hands back; backward only scales it by grad_output.

The loss and gradient of a row, for every option (weights, ignore_index, label smoothing,
z-loss, soft-capping, temperature), are derived once in :mod:`losskit.kernels.rows`:

    dx_c = [p_c (coef + lse_coef lse) + target_step [c = y] + smooth_step w_c] (1 - tanh^2)

with p = softmax(z) of the transformed logits z = cap tanh(x / cap) / T. This module only
computes p and lse chunk by chunk and applies those coefficients.

The same torch ops run on every device. On the CPU a few decisions read the data (is any
row ignored? did p_y underflow?), which is free there and saves passes; elsewhere the
code takes the branch-free form, so that no chunk waits for the device: e = exp(z - max)
is written into the gradient buffer and scaled by the row's 1 / total. Either way the
target's share is taken out of the row total (1 - p_y and -log p_y without cancellation,
see :mod:`losskit.kernels.rows`), and each row's numbers are the same whatever the batch
or chunk it is computed in (batch invariance: every op is row-wise, and row sums go
through :func:`~losskit.kernels.rows.row_sums`). Where Triton
serves the logits (CUDA), one Triton kernel does all rows
(:mod:`losskit.kernels.triton_cross_entropy`). The autograd, custom-op and replay
machinery comes from :class:`~losskit.kernels.fused_op.FusedOp`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .._core import switches
from .._core.dtypes import cast, result_dtypes
from .._core.options import CrossEntropyOptions
from .._core.validation import ClassTargets
from . import triton_support
from .fused_op import FusedOp, Replay, eager_native, fused_may_serve
from .rows import Coefficients, RowTerms, apply_gradient, row_sums, target_gap, transform_logits


def rows_per_chunk(num_classes: int, device_type: str = "cpu") -> int:
    """Rows per chunk, so that a chunk of float32 logits is about the switches' budget."""
    sizes = switches.chunks()
    budget = sizes.cross_entropy_bytes if device_type == "cpu" else sizes.device_bytes
    return max(1, budget // (4 * max(num_classes, 1)))


class ChunkStats(NamedTuple):
    """What the loss needs of each row of a chunk: -log p_y where a path has it at hand
    (exact at any logit scale), else lse and z_y; sum_c w_c z_c under label smoothing.
    lse is None where neither smoothing nor the z-loss needs it."""

    lse: Tensor | None
    z_target: Tensor | None
    smooth_dot: Tensor | None
    nll: Tensor | None


def logits_chunk(
    logits: Tensor,
    terms: RowTerms,
    coefficients: Coefficients | None,
    rows: slice,
    safe_target: Tensor,
    grad: Tensor | None,
    owned: bool,
) -> ChunkStats:
    """The statistics of a chunk of rows of raw logits; their gradient into ``grad`` (a
    contiguous buffer of the chunk's shape) when given.

    ``owned``: the logits are a buffer the caller owns, which may be overwritten (linear
    cross-entropy passes its chunk of logits as both ``logits`` and ``grad``).
    ``safe_target`` (B, 1) holds the rows' targets, 0 where ignored.
    """
    if triton_support.serves(logits):
        from .triton_cross_entropy import cross_entropy_rows

        return ChunkStats(*cross_entropy_rows(terms, coefficients, logits, rows, safe_target, grad))
    options = terms.options
    z, tanh = transform_logits(logits, options, owned)
    smooth_dot = None
    if options.label_smoothing > 0.0:
        # Row sums that do not depend on the batch (rows.row_sums; a matrix-vector
        # product would depend on the BLAS kernel the batch size picks).
        smooth_dot = row_sums(z * terms.class_weight if terms.class_weight is not None else z)
    needs_lse = options.label_smoothing > 0.0 or bool(options.lse_square_scale)
    z_target = z.gather(1, safe_target).squeeze(1)
    # The loss alone still needs the softmax's mass (the other classes' sum, the target
    # left out, kernels.rows), in a buffer of its own: written over the logits, the CPU
    # path would need one more pass first (the underflow check of _cpu_softmax).
    buffer = grad if grad is not None else torch.empty_like(z)
    if z.is_cpu:
        valid = None if terms.valid is None else terms.valid[rows]
        lse, nll, probs, gap, scale = _cpu_softmax(z, z_target, safe_target, valid, buffer, in_place=buffer is z)
    else:
        # Branch-free: e = exp(z - m) written into the buffer, the target's share taken out
        # and the others summed (kernels.rows: 1 - p_y without cancellation).
        row_max = z.amax(dim=1)
        probs = torch.sub(z, row_max.unsqueeze(1), out=buffer).exp_()
        share = probs.gather(1, safe_target).squeeze(1)
        probs.scatter_(1, safe_target, 0.0)
        gap, scale, nll = target_gap(row_sums(probs), share, shift=z_target - row_max)
        lse = z_target + nll
    if grad is None:
        return ChunkStats(lse if needs_lse else None, z_target, smooth_dot, nll)
    apply_gradient(probs, terms, coefficients, rows, lse, safe_target, tanh, gap=gap, scale=scale)
    return ChunkStats(lse, z_target, smooth_dot, nll)


def _cpu_softmax(
    z: Tensor, z_target: Tensor, target: Tensor, valid: Tensor | None, grad: Tensor, in_place: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(lse, -log p_y, p written into ``grad``, 1 - p_y, 1 / total) with aten's vectorised
    softmax, a third of the passes of max, exp, sum and scale one by one.

    aten's row total carries the cancellation error of kernels.rows (up to ~(1 - p_y) / 8
    of it), but that error is one factor common to the whole row: p_c / p_y is exact to
    an ulp or two. So the target's p is taken out, the others summed again (one read of
    the chunk), and the row renormalised by the gradient's own per-row multiplication.

    -log p_y = log1p(others / p_y), unless p_y underflows (z_y far below the row max):
    those rare rows get a direct logsumexp, taken before an in-place softmax destroys z.
    p_y >= exp(z_y - max - log C) keeps p_y a normal float when z_y - max > -60.
    """
    risky = fallback = None
    if in_place:
        risky = (z_target - z.amax(dim=1)) < -60.0
        if valid is not None:
            risky &= valid
        if bool(risky.any()):
            fallback = _logsumexp(z[risky])
    probs = torch.ops.aten._softmax.out(z, 1, False, out=grad)
    gap, scale, nll, p_target = _renormalise(probs, target)
    lse = z_target + nll
    if not in_place:
        risky = p_target < 1e-30
        if valid is not None:
            risky &= valid
        if bool(risky.any()):
            fallback = _logsumexp(z[risky])
    if fallback is not None:
        lse[risky] = fallback
        nll[risky] = fallback - z_target[risky]
    return lse, nll, probs, gap, scale


def _logsumexp(z: Tensor) -> Tensor:
    """Each row's log sum exp, the same bits whatever the number of rows (rows.row_sums)."""
    row_max = z.amax(dim=1)
    safe = torch.where(torch.isfinite(row_max), row_max, 0.0)
    return safe + row_sums(torch.exp(z - safe.unsqueeze(1))).log()


def _renormalise(probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(1 - p_y, 1 / total, -log p_y, p_y as given) of a softmax whose total may be off:
    the target's entry is zeroed and the others summed (kernels.rows.target_gap)."""
    p_target = probs.gather(1, target).squeeze(1)
    probs.scatter_(1, target, 0.0)
    gap, scale, nll = target_gap(row_sums(probs), p_target)
    return gap, scale, nll, p_target


def _plain_cpu(x: Tensor, terms: RowTerms, coefficients: Coefficients, safe_target: Tensor, grad: Tensor) -> Tensor:
    """The bare cross-entropy of one chunk on the CPU, every row counting with weight 1
    (a classifier's everyday batch): the loss is -log p_y, read off the softmax that
    becomes the gradient (renormalised as in :func:`_cpu_softmax`), so neither lse nor z_y
    is formed. A row whose p_y underflows (z_y far below the row max) makes the loss
    infinite; only then are those rows redone by a direct logsumexp."""
    probs = torch.ops.aten._softmax.out(x, 1, False, out=grad)
    gap, scale, nll, _ = _renormalise(probs, safe_target)
    loss = terms.loss(None, None, None, nll=nll)
    if not math.isfinite(loss.item() if loss.dim() == 0 else float(nll.sum())):
        underflow = nll == math.inf
        if bool(underflow.any()):
            rows = x[underflow]
            nll[underflow] = _logsumexp(rows) - rows.gather(1, safe_target[underflow]).squeeze(1)
            loss = terms.loss(None, None, None, nll=nll)
    apply_gradient(probs, terms, coefficients, slice(None), None, safe_target, None, gap=gap, scale=scale)
    return loss


def _all_valid(valid: Tensor | None) -> bool:
    """Whether no row is ignored: None says so; otherwise read on the host only where that
    is free (the CPU, eager); elsewhere assume some row may be."""
    if valid is None:
        return True
    return valid.device.type == "cpu" and not torch.compiler.is_compiling() and bool(valid.all())


def cross_entropy_forward(
    input: Tensor, target: Tensor, valid: Tensor | None, weight: Tensor | None, *, options: CrossEntropyOptions,
    needs: tuple[bool, ...],
) -> tuple[Tensor, tuple[Tensor | None]]:
    """(loss, (dloss/dinput or None,)): the kernel of ``losskit::cross_entropy``, for (N, C)
    logits and their validated class-index targets (``valid`` None when all count)."""
    compute, _ = result_dtypes(input)
    n, num_classes = input.shape
    targets = ClassTargets(target, valid, ignore_index=options.ignore_index, all_valid=_all_valid(valid))
    terms = RowTerms.local(targets, weight, num_classes, compute, options)
    safe_target = targets.safe().unsqueeze(1)
    with_grad = needs[0]
    coefficients = terms.coefficients() if with_grad else None
    # The gradient buffer is contiguous whatever the input's strides: softmax into a
    # strided out= buffer gives wrong numbers, and autograd accepts any layout.
    grad = torch.empty(input.shape, dtype=input.dtype, device=input.device) if with_grad else None
    if triton_support.serves(input):  # one kernel over every row, in the logits' own dtype and strides
        stats = logits_chunk(input, terms, coefficients, slice(None), safe_target, grad, False)
        return cast(terms.loss(*stats), input.dtype), (grad,)
    on_cpu = input.is_cpu
    step = rows_per_chunk(num_classes, "cpu" if on_cpu else input.device.type)
    if grad is not None and step >= n and terms.uniform and options.is_plain and input.dtype == compute and on_cpu:
        return _plain_cpu(input.contiguous(), terms, coefficients, safe_target, grad), (grad,)
    if step >= n:  # one chunk: no per-row buffers to fill
        x = cast(input, compute).contiguous()
        grad_chunk = None if grad is None else (grad if grad.dtype == compute else torch.empty_like(x))
        stats = logits_chunk(x, terms, coefficients, slice(None), safe_target, grad_chunk, input.dtype != compute)
        if grad_chunk is not None and grad_chunk is not grad:
            grad.copy_(grad_chunk)
        return cast(terms.loss(*stats), input.dtype), (grad,)
    stats = RowBuffers(n, input.device, compute)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        chunk = cast(input[rows], compute).contiguous()
        grad_chunk = None
        if grad is not None:
            grad_chunk = grad[rows] if grad.dtype == compute else torch.empty_like(chunk)
        stats.put(rows, logits_chunk(chunk, terms, coefficients, rows, safe_target[rows], grad_chunk,
                                     input.dtype != compute))
        if grad_chunk is not None and grad.dtype != compute:
            grad[rows] = grad_chunk
    return cast(terms.loss(*stats.stats()), input.dtype), (grad,)


class RowBuffers:
    """The per-row statistics of a batch, filled chunk by chunk."""

    def __init__(self, n: int, device: torch.device, dtype: torch.dtype) -> None:
        self.n, self.device, self.dtype = n, device, dtype
        self.buffers: dict[str, Tensor] = {}

    def put(self, rows: slice, stats: ChunkStats) -> None:
        for name, value in stats._asdict().items():
            if value is not None:
                if name not in self.buffers:
                    self.buffers[name] = torch.empty(self.n, dtype=self.dtype, device=self.device)
                self.buffers[name][rows] = value

    def stats(self) -> ChunkStats:
        return ChunkStats(*(self.buffers.get(name) for name in ChunkStats._fields))


fused_cross_entropy = FusedOp(
    "cross_entropy",
    tensors=("input", "target", "valid?", "weight?"),
    differentiable=1,
    options=CrossEntropyOptions,
    forward=cross_entropy_forward,
    # Eager CPU calls of one chunk without soft-capping, temperature or z-loss: this
    # forward, op by op in C++ (losskit/_native/src/cross_entropy.cpp).
    native_forward="cross_entropy",
)


def nll_forward(
    input: Tensor, target: Tensor, valid: Tensor | None, weight: Tensor | None, *, options: CrossEntropyOptions,
    needs: tuple[bool, ...],
) -> tuple[Tensor, tuple[Tensor | None]]:
    """(loss, (dloss/dinput or None,)): the kernel of ``losskit::nll_loss``, for (N, C)
    log-probabilities and their validated class-index targets (``valid`` None when all
    count); only ``ignore_index`` and ``reduction`` of ``options`` apply.

    loss_i = -w_{y_i} x_{i, y_i} (0 where ignored); 'mean' divides the sum by sum_i w_{y_i}
    (the row count without weight). The gradient is that of one element per row,
    -w_{y_i} / denominator under 'mean' (0 where nothing counts, as torch), -w_{y_i}
    otherwise: a zero buffer with one scatter, where autograd through a gather would make
    the zeros, the scatter and a handful of per-row nodes.
    """
    compute, _ = result_dtypes(input)
    all_valid = _all_valid(valid)
    safe = target if all_valid else torch.where(valid, target, 0)
    index = safe.unsqueeze(1)
    # Only the gathered log-probabilities are cast (a cast of a half-precision input would
    # be a pass over all of it; the gather rounds nothing).
    loss = -cast(input.gather(1, index).squeeze(1), compute)
    row_weight = None  # w_y, 0 where ignored; None: every row counts with weight 1
    if weight is not None:
        row_weight = weight.to(compute)[safe]
        loss = loss * row_weight
        if not all_valid:
            row_weight = torch.where(valid, row_weight, 0.0)
    elif not all_valid:
        row_weight = valid.to(compute)
    if not all_valid:
        # where, never a multiplication: an ignored row's -inf must not become 0 * inf = nan
        loss = torch.where(valid, loss, 0.0)
    denominator = None
    if options.reduction == "mean":
        if row_weight is None:
            loss = loss.sum() / float(input.shape[0])
        else:
            denominator = row_weight.sum()
            loss = loss.sum() / denominator
    elif options.reduction == "sum":
        loss = loss.sum()
    grad = None
    if needs[0]:
        grad = torch.zeros(input.shape, dtype=input.dtype, device=input.device)
        if row_weight is None:
            grad.scatter_(1, index, -1.0 / input.shape[0] if options.reduction == "mean" else -1.0)
        else:
            value = row_weight
            if denominator is not None:
                value = value * torch.where(denominator != 0, denominator, torch.inf).reciprocal()
            grad.scatter_(1, index, (-value).to(input.dtype).unsqueeze(1))
    return cast(loss, input.dtype), (grad,)


fused_nll_loss = FusedOp(
    "nll_loss",
    tensors=("input", "target", "valid?", "weight?"),
    differentiable=1,
    options=CrossEntropyOptions,
    forward=nll_forward,
    native_forward="nll_loss",
)


def fused_applies(input: Tensor, target: Tensor) -> bool:
    """Whether the fused path serves this call: 2-D logits and class-index targets."""
    return (
        input.dim() == 2
        and target.dim() == 1
        and not target.is_floating_point()
        and input.shape[0] > 0
        and fused_may_serve(input)
    )


def eager_class_index(
    op: FusedOp, input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, label_smoothing: float,
    reduction: str, reference: Callable[[Tensor], Tensor], probe: bool,
) -> tuple[Tensor, bool] | None:
    """An everyday eager CPU call of ``op`` (:data:`fused_cross_entropy` or
    :data:`fused_nll_loss`) on (N, C) logits and (N,) class indices, whole in one call
    into losskit's compiled part: the checks of the options and of the targets' values
    (and, with ``probe``, the look at the first rows of ``warn_if_probabilities``), the
    forward, and the autograd node that FusedOp would attach. At a batch of 64 the Python
    checks and the fused op's Python machinery cost several times the loss itself.

    Returns (loss, whether the first rows may be probabilities: the caller asks
    ``warn_if_probabilities``, which decides), or None for anything else: no compiled
    part, another device, dtype or shape, an option it does not compute or that is out of
    range, a target out of range (the Python path then checks, raises and computes, with
    the same results). ``reference`` is the composed loss of the logits, for a double
    backward (the node makes its :class:`Replay` only if one is asked for).
    """
    if type(ignore_index) is not int or type(label_smoothing) not in (float, int) or type(reduction) is not str:
        return None  # the Python path checks (and converts) them
    native = eager_native(input, target, weight)
    if native is None:
        return None
    need = torch.is_grad_enabled() and input.requires_grad
    node = (op.node_name, op.name, reference) if need else None
    if op is fused_cross_entropy:
        # full_checks(input) of a plain CPU tensor outside torch.compile (checked above)
        probe = probe and switches.checks_mode() in ("auto", "full")
        made = native.cross_entropy_eager(input, target, weight, ignore_index, label_smoothing, reduction, probe, need,
                                          node)
    else:
        made = native.nll_loss_eager(input, target, weight, ignore_index, reduction, need, node)
    if made is None:
        return None
    return made[0], made[2]
