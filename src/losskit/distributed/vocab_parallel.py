"""Cross-entropy over a vocabulary sharded across the ranks of a torch.distributed group.

Rank r holds the logits (or the output-layer rows) of classes [start_r, start_r + C_r),
the slices in rank order, of any sizes. The loss and gradient of a row are those of
losskit.functional.cross_entropy over all C = sum_r C_r classes, for every option (weights,
ignore_index, label smoothing over the global C and W, z-loss, soft-capping,
temperature), with the per-row coefficients derived once in :mod:`losskit.kernels.rows`:

    lse     = log sum_c exp z_c                   (over every rank's classes)
    dx_c    = [p_c (coef + lse_coef lse) + target_step [c = y] + smooth_step w_c] (1 - tanh^2)

The packed sum carries the other classes' sum of exp(z - max), the target left out (on the
rank that holds it), so that 1 - p_y and -log p_y keep their precision on a confident row
(:func:`losskit.kernels.rows.target_gap`); the target's gradient is -coef (1 - p_y) plus
the rest of its coefficients.

(Megatron's label smoothing uses each rank's own C and W; ours equals the single-process
loss.) Forward needs two all-reduces: the row maxima (MAX), then one packed SUM of each
row's sum of exp(z - max) over the other classes, target logit (from the one rank that holds it), smoothing dot
product and target weight; the slice bounds, when not given, take one more. The gradient
is made in forward, into one logits-sized buffer, and backward only scales it: no
collective in backward.

The linear form never forms more than one chunk of logits: a first pass over chunks finds
each row's local logsumexp, two all-reduces combine them, and a second pass makes the
gradients (each chunk's logits are formed twice, since the gradient needs the global lse);
the input's gradient, a sum over every rank's classes, is one more all-reduce. For a
scalar loss all of that runs in forward; for reduction='none' the per-row grad_output is
known only in backward, which then repeats the first pass and its all-reduces.

Both are fused ops of :class:`~losskit.kernels.fused_op.FusedOp`: under torch.compile each
is one custom op (``losskit::vocab_parallel_cross_entropy``, ...) whose collectives run
inside it, so a compiled graph holds it whole (``fullgraph=True``), with or without the
slice bounds given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .._core.dtypes import result_dtypes
from .._core.options import CrossEntropyOptions
from .._core.validation import check_floating, check_target_range
from ..kernels.fused_op import FusedOp
from ..kernels.rows import RowTerms, apply_gradient, target_gap, transform_logits

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]


def all_reduce(tensor: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> Tensor:
    """The one door to the collectives (tests count the calls through it)."""
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _group_name(group: dist.ProcessGroup | None) -> str:
    return (group if group is not None else dist.group.WORLD).group_name


def _group(name: str) -> dist.ProcessGroup:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


UNKNOWN = -1  # vocab_start / num_classes not given: found from what each rank holds


@dataclass(frozen=True)
class Shard:
    """This rank's slice of the classes: [start, start + size) of ``num_classes``."""

    start: int
    size: int
    num_classes: int

    @staticmethod
    def find(size: int, vocab_start: int, num_classes: int, group, device, fn: str) -> Shard:
        """From what each rank holds (one all-reduce of the sizes), unless both are given."""
        if vocab_start != UNKNOWN and num_classes != UNKNOWN:
            shard = Shard(vocab_start, size, num_classes)
        else:
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            sizes = torch.zeros(world, dtype=torch.long, device=device)
            sizes[rank] = size
            sizes = all_reduce(sizes, dist.ReduceOp.SUM, group).tolist()
            start = sum(sizes[:rank]) if vocab_start == UNKNOWN else vocab_start
            shard = Shard(start, size, sum(sizes) if num_classes == UNKNOWN else num_classes)
        if not (0 <= shard.start and shard.start + shard.size <= shard.num_classes):
            raise ValueError(
                f"{fn}: this rank's classes [{shard.start}, {shard.start + shard.size}) do not lie in the "
                f"{shard.num_classes} classes of the vocabulary"
            )
        return shard


class ShardRows:
    """What this rank knows of a batch of rows before the all-reduces: where each row's
    target lies among its classes, and its slice of the class weights."""

    def __init__(self, target: Tensor, valid: Tensor, shard: Shard, weight: Tensor | None, compute: torch.dtype,
                 options: CrossEntropyOptions, fn: str) -> None:
        self.shard, self.options, self.valid = shard, options, valid
        check_target_range(target, valid, shard.num_classes, fn)  # as cross_entropy, under losskit.checks
        self.safe_target = torch.where(valid, target, 0)  # global class index, 0 where ignored
        self.here = valid & (target >= shard.start) & (target < shard.start + shard.size)
        self.index = torch.where(self.here, target - shard.start, 0).unsqueeze(1)  # (N, 1), local
        self.weight_slice = self.global_weight = None
        if weight is not None:
            check_floating(weight, "weight", fn)
            if weight.dim() != 1 or weight.shape[0] not in (shard.num_classes, shard.size):
                raise ValueError(
                    f"{fn}: weight must have one entry per class, either all {shard.num_classes} or this rank's "
                    f"{shard.size}; got shape {tuple(weight.shape)}"
                )
            if weight.shape[0] == shard.num_classes and shard.size != shard.num_classes:
                self.global_weight = weight.to(compute)
                self.weight_slice = self.global_weight[shard.start: shard.start + shard.size]
            else:
                self.weight_slice = weight.to(compute)
        # The target weight and the total weight need the other ranks' slices too.
        self.weight_from_ranks = self.weight_slice is not None and self.global_weight is None

    def packed(self, sum_exp: Tensor, z_target: Tensor, smooth_dot: Tensor | None) -> Tensor:
        """The local columns the SUM all-reduce combines, (N * k + extra,) flattened."""
        cols = [sum_exp, torch.where(self.here, z_target, 0.0)]
        if smooth_dot is not None:
            cols.append(smooth_dot)
        extra = []
        if self.weight_from_ranks:
            cols.append(_picked(self.weight_slice.expand(self.index.shape[0], -1), self.index) * self.here)
            if self.options.label_smoothing > 0.0:
                extra.append(self.weight_slice.sum().reshape(1))
        return torch.cat([torch.stack(cols, 1).reshape(-1), *extra])

    def unpack(self, packed: Tensor, row_max: Tensor, smoothing: bool) -> Combined:
        """The rows' terms and statistics from the all-reduced columns."""
        n = row_max.shape[0]
        k = 2 + smoothing + self.weight_from_ranks
        cols = packed[: n * k].reshape(n, k).unbind(1)
        z_target = cols[1]
        shift = z_target - row_max
        gap, _, nll = target_gap(cols[0], shift.exp(), shift=shift)
        lse = z_target + nll
        smooth_dot = cols[2] if smoothing else None
        num_classes = self.shard.num_classes
        if self.weight_slice is None:
            terms = RowTerms(self.options, num_classes, self.valid, self.valid.to(lse.dtype), float(num_classes),
                             None, False)
        elif self.global_weight is not None:
            target_weight = torch.where(self.valid, self.global_weight[self.safe_target], 0.0)
            terms = RowTerms(self.options, num_classes, self.valid, target_weight, self.global_weight.sum(),
                             self.weight_slice, True)
        else:
            total = packed[n * k] if smoothing else packed.new_zeros(())
            terms = RowTerms(self.options, num_classes, self.valid, torch.where(self.valid, cols[k - 1], 0.0), total,
                             self.weight_slice, True)
        return Combined(terms, lse, z_target, smooth_dot, nll, gap)

    def gradient(self, z: Tensor, terms: RowTerms, coefficients, rows: slice, lse: Tensor, gap: Tensor,
                 tanh: Tensor | None) -> Tensor:
        """dloss/dx for this rank's classes of the given rows, written over ``z`` (their
        transformed logits, a buffer the caller owns): no temporary the size of the chunk.
        ``lse`` and ``gap`` (1 - p_y) are the rows' own."""
        if z.shape[1] == 0:
            return z
        probs = z.sub_(lse.unsqueeze(1)).exp_()
        return apply_gradient(probs, terms, coefficients, rows, lse, self.index[rows], tanh, self.here[rows], gap=gap)

    def others(self, z: Tensor, rows: slice = slice(None)) -> Tensor:
        """``z`` with -inf at the target column of the rows whose target this rank holds:
        what the sum of the other classes runs over."""
        if z.shape[1] == 0:
            return z
        index, here = self.index[rows], self.here[rows]
        return z.scatter(1, index, torch.where(here, -math.inf, z.gather(1, index).squeeze(1)).unsqueeze(1))


class Combined(NamedTuple):
    """Every row's terms and statistics after the all-reduces: lse, z_y, the smoothing dot
    product, -log p_y and 1 - p_y (both without cancellation)."""

    terms: RowTerms
    lse: Tensor
    z_target: Tensor
    smooth_dot: Tensor | None
    nll: Tensor
    gap: Tensor


def _picked(z: Tensor, index: Tensor) -> Tensor:
    """z at each row's local target column (0 where the rank holds no classes)."""
    if z.shape[1] == 0:
        return z.new_zeros(z.shape[0])
    return z.gather(1, index).squeeze(1)


def _row_max(z: Tensor) -> Tensor:
    if z.shape[1] == 0:
        return z.new_full((z.shape[0],), -math.inf)
    return z.amax(dim=1)


def _combine(rows: ShardRows, local_max: Tensor, sum_exp_at, z_target: Tensor, smooth: Tensor | None,
             group) -> Combined:
    """The two all-reduces of forward: every row's terms and statistics. ``local_max``
    bounds every local logit, the target's included; ``sum_exp_at(row_max)`` gives the
    local sum of exp(z - row_max) over the classes other than the target."""
    row_max = all_reduce(local_max, dist.ReduceOp.MAX, group)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    packed = all_reduce(rows.packed(sum_exp_at(row_max), z_target, smooth), dist.ReduceOp.SUM, group)
    return rows.unpack(packed, row_max, smooth is not None)


def _smoothing_dot(z: Tensor, rows: ShardRows) -> Tensor:
    return z @ rows.weight_slice if rows.weight_slice is not None else z.sum(1)


def _vocab_parallel_forward(
    logits: Tensor, target: Tensor, valid: Tensor, weight: Tensor | None, *, options: CrossEntropyOptions,
    needs: tuple[bool], group_name: str, vocab_start: int, num_classes: int,
) -> tuple[Tensor, tuple[Tensor | None]]:
    """(loss, (dloss/dlogits or None,)) of (N, C_r) logit rows: the kernel of
    ``losskit::vocab_parallel_cross_entropy``."""
    fn = "vocab_parallel_cross_entropy"
    group = _group(group_name)
    compute, _ = result_dtypes(logits)
    shard = Shard.find(logits.shape[1], vocab_start, num_classes, group, logits.device, fn)
    rows = ShardRows(target, valid, shard, weight, compute, options, fn)
    x = logits.to(compute)
    z, tanh = transform_logits(x, options, owned=False)
    smooth = _smoothing_dot(z, rows) if options.label_smoothing > 0.0 else None
    both = _combine(
        rows, _row_max(z), lambda row_max: torch.exp(rows.others(z) - row_max.unsqueeze(1)).sum(1),
        _picked(z, rows.index), smooth, group,
    )
    terms = both.terms
    loss = terms.loss(both.lse, both.z_target, both.smooth_dot, nll=both.nll)
    grad = None
    if needs[0]:
        buffer = z.clone() if z is logits else z  # never over the caller's logits
        grad = rows.gradient(buffer, terms, terms.coefficients(), slice(None), both.lse, both.gap, tanh)
        grad = grad.to(logits.dtype)
    return loss, (grad,)


_BOUNDS = (("str", "group_name"), ("int", "vocab_start"), ("int", "num_classes"))

_fused_vocab_parallel = FusedOp(
    "vocab_parallel_cross_entropy",
    tensors=("logits", "target", "valid", "weight?"),
    differentiable=1,
    options=CrossEntropyOptions,
    extras=_BOUNDS,
    forward=_vocab_parallel_forward,
)


def _flatten(input: Tensor, target: Tensor, fn: str) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """(rows of logits (M, C_r), their targets (M,), the 'none' output shape)."""
    if input.dim() == 1:
        return input.unsqueeze(0), target.reshape(1), ()
    if input.dim() < 1:
        raise ValueError(f"{fn}: logits must have a class dimension; got shape {tuple(input.shape)}")
    expected = (input.shape[0], *input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{fn}: target shape {tuple(target.shape)} does not fit logits shard shape {tuple(input.shape)}; "
            f"class-index targets must have shape {expected}"
        )
    rows = input.movedim(1, -1).reshape(math.prod(expected), input.shape[1])  # explicit: C_r may be 0
    return rows, target.reshape(-1), expected


def _bounds(vocab_start: int | None, num_classes: int | None) -> tuple[int, int]:
    return (UNKNOWN if vocab_start is None else int(vocab_start), UNKNOWN if num_classes is None else int(num_classes))


def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    num_classes: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    r"""Cross-entropy of logits sharded by class over the ranks of ``group``.

    Equal, in value and gradient, to :func:`losskit.functional.cross_entropy` on the logits
    gathered along the class dimension, without gathering them.

    Args:
        logits_shard: this rank's slice of the classes: ``[N, C_r]``, ``[N, C_r, d1, ...]``
            or ``[C_r]``; the slices lie in rank order and may differ in size.
        target: global class indices, ``[N]`` / ``[N, d1, ...]`` / ``[]``, the same on every
            rank.
        group: the process group sharing the vocabulary (default: the world).
        vocab_start: this rank's first class. Found from the ranks' shard sizes when it or
            ``num_classes`` is not given (one more all-reduce).
        num_classes: the size of the whole vocabulary.
        weight: class weights, all ``C`` of them or this rank's ``C_r``.
        ignore_index: target value that counts for nothing, as ``cross_entropy``.
        reduction: ``'mean'``, ``'sum'`` or ``'none'``, as ``cross_entropy``.
        label_smoothing: as ``cross_entropy``, over the whole vocabulary.
        lse_square_scale: the z-loss of ``cross_entropy``.
        softcap: the logit soft-capping of ``cross_entropy``.
        temperature: the logit temperature of ``cross_entropy``.

    Returns:
        The same on every rank: a scalar, or ``target``'s shape for ``reduction='none'``.

    Collectives: two all-reduces in forward (row maxima; one packed sum), none in backward.
    float16/bfloat16 logits are computed and reduced in float32. Compiles with
    ``fullgraph=True``: the loss is one custom op whose collectives run inside it.

    Example (each of two ranks)::

        shard = full_logits[:, rank * 500:(rank + 1) * 500]  # (N, 500) of 1000 classes
        loss = vocab_parallel_cross_entropy(shard, target, label_smoothing=0.1)
        loss.backward()  # shard.grad: this rank's columns of the full gradient
    """
    fn = "vocab_parallel_cross_entropy"
    check_floating(logits_shard, "logits_shard", fn)
    if target.is_floating_point():
        raise TypeError(f"{fn}: target must hold class indices (an integer tensor); got {target.dtype}")
    options = CrossEntropyOptions.checked(
        fn, ignore_index=ignore_index, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
        softcap=softcap, temperature=temperature, reduction=reduction,
    )
    return sharded_cross_entropy(logits_shard, target, group, vocab_start, num_classes, weight, options)


def sharded_cross_entropy(
    logits_shard: Tensor, target: Tensor, group: dist.ProcessGroup | None, vocab_start: int | None,
    num_classes: int | None, weight: Tensor | None, options: CrossEntropyOptions,
) -> Tensor:
    """:func:`vocab_parallel_cross_entropy` with its options checked (also the DTensor path)."""
    fn = "vocab_parallel_cross_entropy"
    rows, flat_target, out_shape = _flatten(logits_shard, target.long(), fn)
    _, out = result_dtypes(logits_shard)
    loss = _fused_vocab_parallel(
        rows, flat_target, flat_target != options.ignore_index, weight, options=options,
        group_name=_group_name(group), **dict(zip(("vocab_start", "num_classes"), _bounds(vocab_start, num_classes))),
    )
    if options.reduction == "none":
        loss = loss.reshape(out_shape)
    return loss.to(out)


def _linear_first_pass(x: Tensor, w: Tensor, b: Tensor | None, rows: ShardRows, options: CrossEntropyOptions,
                       chunk: int, group):
    """Every row's terms and statistics, one chunk of logits at a time."""
    n = x.shape[0]
    local_lse = x.new_empty(n)
    z_target = x.new_zeros(n)
    smooth = x.new_zeros(n) if options.label_smoothing > 0.0 else None
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        z, _ = transform_logits(torch.nn.functional.linear(x[part], w, b), options, owned=True)
        local_lse[part] = torch.logsumexp(rows.others(z, part), 1) if z.shape[1] else -math.inf
        z_target[part] = _picked(z, rows.index[part])
        if smooth is not None:
            smooth[part] = _smoothing_dot(z, rows)
    # The local logsumexp of the other classes bounds them; the target bounds itself.
    local_max = torch.maximum(local_lse, torch.where(rows.here, z_target, -math.inf))
    return _combine(rows, local_max, lambda row_max: torch.exp(local_lse - row_max), z_target, smooth, group)


def _linear_gradients(x, w, b, rows: ShardRows, terms: RowTerms, coefficients, lse: Tensor, gap: Tensor,
                      chunk: int, needs, group):
    """The second pass: (grad_x summed over the ranks, grad_w, grad_b), in the compute dtype."""
    grad_x = torch.zeros_like(x) if needs[0] else None
    grad_w = torch.zeros_like(w) if needs[1] else None
    grad_b = torch.zeros_like(b) if needs[2] and b is not None else None
    for start in range(0, x.shape[0], chunk):
        part = slice(start, start + chunk)
        z, tanh = transform_logits(torch.nn.functional.linear(x[part], w, b), rows.options, owned=True)
        dz = rows.gradient(z, terms, coefficients, part, lse[part], gap[part], tanh)
        if grad_x is not None:
            grad_x[part] = dz @ w
        if grad_w is not None:
            grad_w.addmm_(dz.T, x[part])
        if grad_b is not None:
            grad_b += dz.sum(0)
    # The input meets every rank's classes: its gradient is the sum over the ranks.
    if grad_x is not None:
        all_reduce(grad_x, dist.ReduceOp.SUM, group)
    return grad_x, grad_w, grad_b


def _linear_setup(x, w, b, target, valid, weight, options, group_name, vocab_start, num_classes):
    fn = "vocab_parallel_linear_cross_entropy"
    group = _group(group_name)
    compute, _ = result_dtypes(x, w)
    shard = Shard.find(w.shape[0], vocab_start, num_classes, group, x.device, fn)
    rows = ShardRows(target, valid, shard, weight, compute, options, fn)
    return group, rows, x.to(compute), w.to(compute), None if b is None else b.to(compute)


def _linear_forward(x, w, b, target, valid, weight, *, options, needs, group_name, vocab_start, num_classes, chunk_rows):
    group, rows, xc, wc, bc = _linear_setup(x, w, b, target, valid, weight, options, group_name, vocab_start,
                                            num_classes)
    both = _linear_first_pass(xc, wc, bc, rows, options, chunk_rows, group)
    terms = both.terms
    loss = terms.loss(both.lse, both.z_target, both.smooth_dot, nll=both.nll)
    grads = (None, None, None)
    if any(needs):
        grads = _linear_gradients(xc, wc, bc, rows, terms, terms.coefficients(), both.lse, both.gap, chunk_rows,
                                  needs, group)
    return loss, grads


def _linear_recompute(x, w, b, target, valid, weight, *, options, needs, grad_output, group_name, vocab_start,
                      num_classes, chunk_rows):
    """reduction='none': the first pass and its all-reduces again, then the gradients with
    each row's coefficients times its grad_output."""
    group, rows, xc, wc, bc = _linear_setup(x, w, b, target, valid, weight, options, group_name, vocab_start,
                                            num_classes)
    both = _linear_first_pass(xc, wc, bc, rows, options, chunk_rows, group)
    coefficients = both.terms.coefficients(row_factor=grad_output.reshape(-1).to(xc.dtype))
    return _linear_gradients(xc, wc, bc, rows, both.terms, coefficients, both.lse, both.gap, chunk_rows, needs, group)


_fused_vocab_parallel_linear = FusedOp(
    "vocab_parallel_linear_cross_entropy",
    tensors=("input", "weight_shard", "bias_shard?", "target", "valid", "weight?"),
    differentiable=3,
    options=CrossEntropyOptions,
    extras=(*_BOUNDS, ("int", "chunk_rows")),
    forward=_linear_forward,
    precomputes=lambda options: options.reduction != "none",
    recompute=_linear_recompute,
)


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    *,
    bias_shard: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    num_classes: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Linear layer + cross-entropy with the output layer sharded by class over ``group``.

    Equal to :func:`losskit.functional.linear_cross_entropy` with the weight rows (and bias)
    of every rank concatenated in rank order, and never forms more than ``chunk_size`` rows
    of logits on any rank.

    Args:
        input: ``[..., H]`` hidden states, the same on every rank.
        weight_shard: this rank's ``[C_r, H]`` rows of the output layer.
        target: ``[...]`` global class indices, the same on every rank.
        bias_shard: this rank's ``[C_r]`` slice of the bias.
        group: the process group sharing the vocabulary (default: the world).
        vocab_start: as :func:`vocab_parallel_cross_entropy`.
        num_classes: as :func:`vocab_parallel_cross_entropy`.
        weight: as :func:`vocab_parallel_cross_entropy`.
        ignore_index: as :func:`vocab_parallel_cross_entropy`.
        reduction: as :func:`vocab_parallel_cross_entropy`.
        label_smoothing: as :func:`vocab_parallel_cross_entropy`.
        lse_square_scale: as :func:`vocab_parallel_cross_entropy`.
        softcap: as :func:`vocab_parallel_cross_entropy`.
        temperature: as :func:`vocab_parallel_cross_entropy`.
        chunk_size: rows of logits formed at a time (default: about 64 MiB of them).

    Returns:
        The same on every rank: a scalar, or ``target``'s shape for ``reduction='none'``.

    Collectives: for a scalar loss, forward makes everything (two all-reduces for the
    logsumexp, one summing the input's gradient over the ranks; each rank's weight gradient
    is its own) and backward none; for reduction='none' forward needs two and backward
    three (it repeats the first pass). Memory per rank: the weight slice and its gradient,
    the input's gradient and one chunk of logits. Compiles with ``fullgraph=True``.
    """
    fn = "vocab_parallel_linear_cross_entropy"
    check_floating(input, "input", fn)
    check_floating(weight_shard, "weight_shard", fn)
    if weight_shard.dim() != 2 or weight_shard.shape[1] != input.shape[-1]:
        raise ValueError(
            f"{fn}: weight_shard must be (C_r, H) with H = input's last dimension ({input.shape[-1]}); "
            f"got shape {tuple(weight_shard.shape)}"
        )
    if bias_shard is not None and tuple(bias_shard.shape) != (weight_shard.shape[0],):
        raise ValueError(f"{fn}: bias_shard must have shape ({weight_shard.shape[0]},); got {tuple(bias_shard.shape)}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{fn}: target shape {tuple(target.shape)} must be input's without H, "
                         f"{tuple(input.shape[:-1])}")
    if target.is_floating_point():
        raise TypeError(f"{fn}: target must hold class indices (an integer tensor); got {target.dtype}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive number of rows; got {chunk_size}")
    options = CrossEntropyOptions.checked(
        fn, ignore_index=ignore_index, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
        softcap=softcap, temperature=temperature, reduction=reduction,
    )
    _, out = result_dtypes(input, weight_shard)
    x = input.reshape(-1, input.shape[-1])
    flat_target = target.reshape(-1).long()
    chunk = chunk_size or max(16, min(4096, (64 << 20) // (4 * max(weight_shard.shape[0], 1))))
    start, classes = _bounds(vocab_start, num_classes)
    loss = _fused_vocab_parallel_linear(
        x, weight_shard, bias_shard, flat_target, flat_target != ignore_index, weight, options=options,
        group_name=_group_name(group), vocab_start=start, num_classes=classes, chunk_rows=chunk,
    )
    if options.reduction == "none":
        loss = loss.reshape(target.shape)
    return loss.to(out)
