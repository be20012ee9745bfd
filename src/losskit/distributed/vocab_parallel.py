"""Cross-entropy over a vocabulary sharded across the ranks of a torch.distributed group.

Rank r holds the logits (or the output-layer rows) of classes [start_r, start_r + C_r),
the slices in rank order, of any sizes. For a row with target y (global index), class
weights w, label smoothing eps, z-loss scale s and C = sum_r C_r classes:

    lse     = log sum_c exp z_c                   (over every rank's classes)
    loss    = (1 - eps) w_y (lse - z_y) + eps / C (W lse - sum_c w_c z_c) + s lse^2
    dz_c    = p_c [(1 - eps) w_y + eps W / C + 2 s lse] - (1 - eps) w_y [c = y] - eps / C w_c

with p = exp(z - lse) and W = sum_c w_c: exactly losskit.functional.cross_entropy, whose
label smoothing uses the global C and W (Megatron's uses each rank's own). Forward needs
two all-reduces: the row maxima (MAX), then one packed SUM of each row's sum of
exp(z - max), target logit (from the one rank that holds it), smoothing dot product and
target weight. Backward needs none for the logits: each rank's gradient is its own slice.

The linear form never forms more than one chunk of logits: a first pass over chunks finds
each row's local logsumexp, two all-reduces combine them (MAX, then the packed SUM), and a
second pass makes the gradients; the input's gradient, a sum over every rank's classes, is
one more all-reduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .._core.dtypes import result_dtypes
from .._core.reduction import resolve_reduction
from .._core.validation import check_floating, check_logit_options, check_target_range

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]


def all_reduce(tensor: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> Tensor:
    """The one door to the collectives (tests count the calls through it)."""
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


@dataclass(frozen=True)
class Shard:
    """This rank's slice of the classes: [start, start + size) of ``num_classes``."""

    start: int
    size: int
    num_classes: int

    @staticmethod
    def find(size: int, vocab_start: int | None, num_classes: int | None, group, device, fn: str) -> "Shard":
        """From what each rank holds (one all-gather of the sizes), unless both are given."""
        if vocab_start is not None and num_classes is not None:
            shard = Shard(vocab_start, size, num_classes)
        else:
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            sizes = torch.zeros(world, dtype=torch.long, device=device)
            sizes[rank] = size
            sizes = all_reduce(sizes, dist.ReduceOp.SUM, group).tolist()
            start = sum(sizes[:rank]) if vocab_start is None else vocab_start
            shard = Shard(start, size, sum(sizes) if num_classes is None else num_classes)
        if not (0 <= shard.start and shard.start + shard.size <= shard.num_classes):
            raise ValueError(
                f"{fn}: this rank's classes [{shard.start}, {shard.start + shard.size}) do not lie in the "
                f"{shard.num_classes} classes of the vocabulary"
            )
        return shard


class Options:
    """The cross-entropy options, checked once."""

    def __init__(self, ignore_index, label_smoothing, lse_square_scale, softcap, reduction, fn) -> None:
        check_logit_options(lse_square_scale, softcap, fn)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"{fn}: label_smoothing must lie in [0, 1]; got {label_smoothing}")
        self.ignore_index, self.eps = ignore_index, float(label_smoothing)
        self.z_scale, self.softcap = float(lse_square_scale), softcap
        self.reduction = resolve_reduction(None, None, reduction)


class Rows:
    """Per-row quantities of a batch of flattened rows and this rank's part of them."""

    def __init__(self, target: Tensor, shard: Shard, weight: Tensor | None, compute: torch.dtype, opts: Options,
                 fn: str) -> None:
        self.shard, self.opts, self.compute = shard, opts, compute
        self.valid = target != opts.ignore_index
        check_target_range(target, self.valid, shard.num_classes, fn)  # as cross_entropy, under losskit.checks
        self.safe_target = torch.where(self.valid, target, 0)  # global class index, 0 where ignored
        self.here = self.valid & (target >= shard.start) & (target < shard.start + shard.size)
        self.index = torch.where(self.here, target - shard.start, 0).unsqueeze(1)  # (N, 1), local
        self.counts = self.valid.to(compute)
        self.weight_slice = None
        self.global_weight = None
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

    def packed(self, sum_exp: Tensor, z_target: Tensor, smooth_dot: Tensor | None) -> Tensor:
        """The local columns the SUM all-reduce combines, (N * k + extra,) flattened."""
        cols = [sum_exp, torch.where(self.here, z_target, 0.0)]
        if smooth_dot is not None:
            cols.append(smooth_dot)
        extra = []
        if self.weight_slice is not None and self.global_weight is None:
            cols.append(_picked(self.weight_slice.expand(self.index.shape[0], -1), self.index) * self.here)
            if self.opts.eps > 0.0:
                extra.append(self.weight_slice.sum().reshape(1))
        return torch.cat([torch.stack(cols, 1).reshape(-1), *extra])

    def unpack(self, packed: Tensor, row_max: Tensor, has_smooth: bool) -> None:
        n = row_max.shape[0]
        k = 2 + has_smooth + (self.weight_slice is not None and self.global_weight is None)
        cols = packed[: n * k].reshape(n, k).unbind(1)
        self.lse = row_max + cols[0].log()
        self.z_target = cols[1]
        self.smooth_dot = cols[2] if has_smooth else None
        if self.weight_slice is None:
            self.target_weight = self.counts
            self.total_weight = torch.tensor(float(self.shard.num_classes), dtype=row_max.dtype, device=row_max.device)
        elif self.global_weight is not None:
            self.target_weight = self.global_weight[self.safe_target] * self.counts
            self.total_weight = self.global_weight.sum()
        else:
            self.target_weight = cols[k - 1] * self.counts
            self.total_weight = packed[n * k] if self.opts.eps > 0.0 else packed.new_zeros(())
        self.denominator = self.target_weight.sum()
        self.count = self.counts.sum()

    def loss(self) -> Tensor:
        """Reduced as losskit.functional.cross_entropy: the cross-entropy over the summed
        target weights, the z-loss over the rows that count."""
        eps, c = self.opts.eps, self.shard.num_classes
        ce = (1.0 - eps) * self.target_weight * (self.lse - self.z_target)
        if eps > 0.0:
            ce = ce + (eps / c) * (self.total_weight * self.lse - self.smooth_dot)
        ce = torch.where(self.valid, ce, 0.0)
        z = torch.where(self.valid, self.opts.z_scale * self.lse.square(), 0.0) if self.opts.z_scale else None
        reduction = self.opts.reduction
        if reduction == "none":
            return ce if z is None else ce + z
        if reduction == "sum":
            return (ce if z is None else ce + z).sum()
        out = ce.sum() / self.denominator
        return out if z is None else out + z.sum() / self.count

    def grad(self, z: Tensor, rows: slice, grad_output: Tensor) -> Tensor:
        """dloss/dz for this rank's classes of the given rows, written over ``z`` (their
        capped logits, a buffer the caller owns): no temporary the size of the chunk."""
        eps, c, reduction = self.opts.eps, self.shard.num_classes, self.opts.reduction
        if z.shape[1] == 0:
            return torch.zeros_like(z)
        lse, valid = self.lse[rows], self.valid[rows]
        tw, counts = self.target_weight[rows], self.counts[rows]
        ce_scale: Tensor | float = 1.0
        z_scale: Tensor | float = 1.0
        if reduction == "mean":
            ce_scale = torch.where(self.denominator != 0, 1.0 / self.denominator, 0.0)
            z_scale = torch.where(self.count != 0, 1.0 / self.count, 0.0)
        g = grad_output[rows] if reduction == "none" else grad_output
        coef = ((1.0 - eps) * tw + counts * (eps * self.total_weight / c)) * ce_scale
        if self.opts.z_scale:
            coef = coef + counts * (2.0 * self.opts.z_scale) * lse * z_scale
        probs = z.sub_(lse.unsqueeze(1)).exp_().mul_((coef * g).unsqueeze(1))
        probs.masked_fill_(~valid.unsqueeze(1), 0.0)  # ignored rows may hold inf - inf = nan
        target_step = torch.where(self.here[rows], -(1.0 - eps) * tw * ce_scale * g, 0.0)
        probs.scatter_add_(1, self.index[rows], target_step.unsqueeze(1))
        if eps > 0.0:
            row_scale = (counts * ce_scale * g).unsqueeze(1)
            if self.weight_slice is None:
                probs.sub_(row_scale, alpha=eps / c)
            else:
                probs.addcmul_(row_scale, self.weight_slice, value=-eps / c)
        return probs


def _capped(x: Tensor, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    if softcap is None:
        return x, None
    t = torch.tanh(x / softcap)
    return softcap * t, t


def _picked(z: Tensor, index: Tensor) -> Tensor:
    """z at each row's local target column (0 where the rank holds no classes)."""
    if z.shape[1] == 0:
        return z.new_zeros(z.shape[0])
    return z.gather(1, index).squeeze(1)


def _row_max(z: Tensor) -> Tensor:
    if z.shape[1] == 0:
        return z.new_full((z.shape[0],), -math.inf)
    return z.amax(dim=1)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, rows_: Rows, group) -> Tensor:  # type: ignore[override]
        opts = rows_.opts
        z, tanh = _capped(logits.to(rows_.compute), opts.softcap)
        row_max = all_reduce(_row_max(z), dist.ReduceOp.MAX, group)
        row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
        sum_exp = torch.exp(z - row_max.unsqueeze(1)).sum(1)
        z_target = _picked(z, rows_.index)
        smooth = None
        if opts.eps > 0.0:
            smooth = z @ rows_.weight_slice if rows_.weight_slice is not None else z.sum(1)
        packed = all_reduce(rows_.packed(sum_exp, z_target, smooth), dist.ReduceOp.SUM, group)
        rows_.unpack(packed, row_max, smooth is not None)
        ctx.rows = rows_
        ctx.save_for_backward(logits)
        return rows_.loss()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        rows_: Rows = ctx.rows
        z, tanh = _capped(logits.to(rows_.compute), rows_.opts.softcap)
        if z is logits:  # grad() writes over z: never over the caller's logits
            z = z.clone()
        grad = rows_.grad(z, slice(None), grad_output.to(z.dtype))
        if tanh is not None:
            grad.mul_(tanh.square_().neg_().add_(1.0))  # d cap tanh(x / cap) / dx, in place
        return grad.to(logits.dtype), None, None, None


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

    Returns:
        The same on every rank: a scalar, or ``target``'s shape for ``reduction='none'``.

    Collectives: two all-reduces in forward (row maxima; one packed sum), none in backward.
    float16/bfloat16 logits are computed and reduced in float32.

    Example (each of two ranks)::

        shard = full_logits[:, rank * 500:(rank + 1) * 500]  # (N, 500) of 1000 classes
        loss = vocab_parallel_cross_entropy(shard, target, label_smoothing=0.1)
        loss.backward()  # shard.grad: this rank's columns of the full gradient
    """
    fn = "vocab_parallel_cross_entropy"
    check_floating(logits_shard, "logits_shard", fn)
    if target.is_floating_point():
        raise TypeError(f"{fn}: target must hold class indices (an integer tensor); got {target.dtype}")
    opts = Options(ignore_index, label_smoothing, lse_square_scale, softcap, reduction, fn)
    rows, flat_target, out_shape = _flatten(logits_shard, target.long(), fn)
    compute, out = result_dtypes(logits_shard)
    shard = Shard.find(rows.shape[1], vocab_start, num_classes, group, rows.device, fn)
    rows_ = Rows(flat_target, shard, weight, compute, opts, fn)
    loss = _VocabParallelCrossEntropy.apply(rows, flat_target, rows_, group)
    if opts.reduction == "none":
        loss = loss.reshape(out_shape)
    return loss.to(out)


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, rows_: Rows, group, chunk) -> Tensor:  # type: ignore[override]
        opts, compute = rows_.opts, rows_.compute
        n = x.shape[0]
        local_lse = x.new_empty(n, dtype=compute)
        z_target = x.new_zeros(n, dtype=compute)
        smooth = x.new_zeros(n, dtype=compute) if opts.eps > 0.0 else None
        xc, wc = x.to(compute), w.to(compute)
        bc = None if b is None else b.to(compute)
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            z, _ = _capped(torch.nn.functional.linear(xc[part], wc, bc), opts.softcap)
            local_lse[part] = torch.logsumexp(z, 1) if z.shape[1] else -math.inf
            z_target[part] = _picked(z, rows_.index[part])
            if smooth is not None:
                smooth[part] = z @ rows_.weight_slice if rows_.weight_slice is not None else z.sum(1)
        row_max = all_reduce(local_lse.clone(), dist.ReduceOp.MAX, group)
        row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
        packed = all_reduce(rows_.packed(torch.exp(local_lse - row_max), z_target, smooth), dist.ReduceOp.SUM, group)
        rows_.unpack(packed, row_max, smooth is not None)
        ctx.rows, ctx.group, ctx.chunk = rows_, group, chunk
        ctx.save_for_backward(x, w, b)
        return rows_.loss()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        x, w, b = ctx.saved_tensors
        rows_: Rows = ctx.rows
        compute = rows_.compute
        xc, wc = x.to(compute), w.to(compute)
        bc = None if b is None else b.to(compute)
        g = grad_output.to(compute)
        grad_x = torch.zeros_like(xc)
        grad_w = torch.zeros_like(wc)
        grad_b = None if b is None else torch.zeros_like(bc)
        for start in range(0, x.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            z, tanh = _capped(torch.nn.functional.linear(xc[part], wc, bc), rows_.opts.softcap)
            dz = rows_.grad(z, part, g)
            if tanh is not None:
                dz.mul_(tanh.square_().neg_().add_(1.0))  # d cap tanh(x / cap) / dx, in place
            grad_x[part] = dz @ wc
            grad_w.addmm_(dz.T, xc[part])
            if grad_b is not None:
                grad_b += dz.sum(0)
        # The input meets every rank's classes: its gradient is the sum over the ranks.
        if ctx.needs_input_grad[0]:
            all_reduce(grad_x, dist.ReduceOp.SUM, ctx.group)
        return (grad_x.to(x.dtype), grad_w.to(w.dtype), None if b is None else grad_b.to(b.dtype),
                None, None, None)


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
        chunk_size: rows of logits formed at a time (default: about 64 MiB of them).

    Returns:
        The same on every rank: a scalar, or ``target``'s shape for ``reduction='none'``.

    Collectives: two all-reduces in forward; in backward one, summing the input's
    gradient over the ranks (each rank's weight gradient is its own). Memory per rank: the
    weight slice and its gradient, the input's gradient and one chunk of logits.
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
    opts = Options(ignore_index, label_smoothing, lse_square_scale, softcap, reduction, fn)
    compute, out = result_dtypes(input, weight_shard)
    x = input.reshape(-1, input.shape[-1])
    shard = Shard.find(weight_shard.shape[0], vocab_start, num_classes, group, x.device, fn)
    rows_ = Rows(target.reshape(-1).long(), shard, weight, compute, opts, fn)
    chunk = chunk_size or max(16, min(4096, (64 << 20) // (4 * max(shard.size, 1))))
    loss = _VocabParallelLinearCrossEntropy.apply(x, weight_shard, bias_shard, rows_, group, chunk)
    if opts.reduction == "none":
        loss = loss.reshape(target.shape)
    return loss.to(out)
