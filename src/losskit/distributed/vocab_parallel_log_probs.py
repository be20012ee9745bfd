"""linear_log_probs with the output layer sharded by vocabulary over a torch.distributed group.

Rank r holds the weight rows (and bias) of classes [start_r, start_r + C_r), the slices in
rank order, of any sizes (one may be empty). Each rank forms only its own chunk of logits
and reduces it to the statistics of :mod:`losskit.kernels.linear_log_probs`, relative to
its own maximum m_r: rest_r (the sum of exp(z - m_r) without its argmax's 1), s_r (the sum
of exp(z - m_r)(m_r - z)), the raw target logit where it holds the target, and whether
the target is its argmax. One all-gather brings every rank's to every rank, which combine
them in rank order, identically, with M = max_r m_r and r* the first rank holding it:

    rest = rest_{r*} + sum_{r != r*} e^{m_r - M} (1 + rest_r)
    s    = sum_r e^{m_r - M} (s_r + (M - m_r)(1 + rest_r))

sums of non-negative terms only, so the accuracy of the single-process form is kept (no
1 + tiny - 1). log p_y, the entropy and 1 - p_y follow as there. Backward recomputes
each rank's chunks of logits, writes its columns of dz, and sums the input's gradient
over the ranks (one all-reduce); the weight's and bias's gradients are each rank's own.

Collectives: forward one all-gather (plus one all-reduce of the slice sizes when
``vocab_start`` or ``num_classes`` is not given), backward one all-reduce (plus the same
one for the slice sizes). Under torch.compile the loss is one custom op
(``losskit::vocab_parallel_linear_log_probs``) whose collectives run inside it, so the
graph holds it whole (``fullgraph=True``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .._core.dtypes import result_dtypes
from .._core.validation import check_floating, check_target_range
from ..kernels.linear_log_probs import (
    STATS,
    LocalStats,
    RowStats,
    backward_grads,
    chunk_rows,
    compute_copies,
    compute_dtype,
    forward_stats,
    upstream,
)
from .vocab_parallel import Shard, _bounds, _group, _group_name, all_reduce

__all__ = ["vocab_parallel_linear_log_probs", "vocab_parallel_linear_log_probs_and_entropy"]


def all_gather(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The one door to the all-gather (tests count the calls through it): (world, *shape)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def combine(local: LocalStats, group: dist.ProcessGroup) -> LocalStats:
    """Every rank's statistics of each row, merged as in the module docstring."""
    m, rest, spread, z_target, is_max = all_gather(torch.stack(list(local)), group).unbind(1)  # each (world, N)
    top, winner = m.max(dim=0)  # the first rank with the maximum
    safe_top = torch.where(torch.isfinite(top), top, 0.0)
    scale = torch.exp(m - safe_top)  # 0 for a rank holding no classes (m = -inf)
    gap = torch.where(scale > 0, safe_top - m, 0.0)
    is_winner = torch.arange(m.shape[0], device=m.device).unsqueeze(1) == winner
    ones = 1.0 + rest
    merged_rest = torch.where(is_winner, rest, scale * ones).sum(0)
    merged_spread = (scale * (spread + gap * ones)).sum(0)
    winner_index = winner.unsqueeze(0)
    return LocalStats(top, merged_rest, merged_spread, z_target.sum(0), is_max.gather(0, winner_index).squeeze(0))


def _setup(input, weight_shard, bias_shard, target, valid, group_name, vocab_start, num_classes):
    fn = "vocab_parallel_linear_log_probs"
    group = _group(group_name)
    shard = Shard.find(weight_shard.shape[0], vocab_start, num_classes, group, input.device, fn)
    check_target_range(target, valid, shard.num_classes, fn)
    held = valid & (target >= shard.start) & (target < shard.start + shard.size)
    index = torch.where(held, target - shard.start, 0)
    _, x, w, b = compute_copies(input, weight_shard, bias_shard)
    return group, x, w, b, index, held


@torch.library.custom_op("losskit::vocab_parallel_linear_log_probs", mutates_args=())
def _op(input: Tensor, weight_shard: Tensor, bias_shard: Tensor | None, target: Tensor, valid: Tensor,
        temperature: float, chunk_rows: int, with_entropy: bool, batch_invariant: bool, group_name: str,
        vocab_start: int, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    _, out = result_dtypes(input, weight_shard)
    group, x, w, b, index, held = _setup(input, weight_shard, bias_shard, target, valid, group_name, vocab_start,
                                         num_classes)
    stats = forward_stats(x, w, b, index, held, temperature, chunk_rows, batch_invariant,
                          combine=lambda local: combine(local, group))
    log_p = torch.where(valid, stats.log_p, 0.0).to(out)
    entropy = torch.where(valid, stats.entropy, 0.0).to(out) if with_entropy else log_p.new_empty(0)
    return log_p, entropy, stats.stacked()


@_op.register_fake
def _(input, weight_shard, bias_shard, target, valid, temperature, chunk_rows, with_entropy, batch_invariant,
      group_name, vocab_start, num_classes):
    compute, out = result_dtypes(input, weight_shard)
    n = input.shape[0]
    return (input.new_empty(n, dtype=out), input.new_empty(n if with_entropy else 0, dtype=out),
            input.new_empty(len(STATS), n, dtype=compute))


@torch.library.custom_op("losskit::vocab_parallel_linear_log_probs_backward", mutates_args=())
def _backward_op(input: Tensor, weight_shard: Tensor, bias_shard: Tensor | None, target: Tensor, valid: Tensor,
                 stats: Tensor, grad_log_p: Tensor | None, grad_entropy: Tensor | None, temperature: float,
                 chunk_rows: int, with_entropy: bool, batch_invariant: bool, group_name: str, vocab_start: int,
                 num_classes: int, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    group, x, w, b, index, held = _setup(input, weight_shard, bias_shard, target, valid, group_name, vocab_start,
                                         num_classes)
    g, h = upstream(grad_log_p, grad_entropy, valid, x.shape[0], x.new_empty(0, dtype=compute_dtype(x)), temperature,
                    with_entropy)
    grad_x, grad_w, grad_b = backward_grads(x, w, b, index, held, RowStats(*stats.unbind(0)), g, h, temperature,
                                            chunk_rows, batch_invariant, tuple(needs))
    if grad_x is not None:
        # The input meets every rank's classes: its gradient is the sum over the ranks.
        all_reduce(grad_x, dist.ReduceOp.SUM, group)
    return tuple(input.new_empty(0) if grad is None else grad.to(t.dtype)
                 for grad, t in zip((grad_x, grad_w, grad_b), (input, weight_shard, bias_shard)))


@_backward_op.register_fake
def _(input, weight_shard, bias_shard, target, valid, stats, grad_log_p, grad_entropy, temperature, chunk_rows,
      with_entropy, batch_invariant, group_name, vocab_start, num_classes, needs):
    return tuple(t.new_empty(t.shape) if need and t is not None else input.new_empty(0)
                 for t, need in zip((input, weight_shard, bias_shard), needs))


def _setup_context(ctx, inputs, output) -> None:
    input, weight_shard, bias_shard, target, valid, *options = inputs
    ctx.save_for_backward(input, weight_shard, bias_shard, target, valid, output[2])
    ctx.options = options
    ctx.needs = [input.requires_grad, weight_shard.requires_grad,
                 bias_shard is not None and bias_shard.requires_grad]


def _backward(ctx, grad_log_p, grad_entropy, _grad_stats):
    input, weight_shard, bias_shard, target, valid, stats = ctx.saved_tensors
    with_entropy = ctx.options[2]
    grads = _backward_op(input, weight_shard, bias_shard, target, valid, stats, grad_log_p,
                         grad_entropy if with_entropy else None, *ctx.options, ctx.needs)
    return (*[g if need else None for g, need in zip(grads, ctx.needs)], *([None] * (2 + len(ctx.options))))


_op.register_autograd(_backward, setup_context=_setup_context)


def _compute(fn, input, weight_shard, target, bias_shard, group, vocab_start, num_classes, temperature, ignore_index,
             chunk_size, batch_invariant, with_entropy):
    check_floating(input, "input", fn)
    check_floating(weight_shard, "weight_shard", fn)
    if input.dim() < 1:
        raise ValueError(f"{fn}: input must have a feature dimension, shaped [..., H]; got a 0-d tensor")
    if weight_shard.dim() != 2 or weight_shard.shape[1] != input.shape[-1]:
        raise ValueError(
            f"{fn}: weight_shard must be [C_r, H] with H = input's last dimension ({input.shape[-1]}); "
            f"got shape {tuple(weight_shard.shape)}"
        )
    if bias_shard is not None and tuple(bias_shard.shape) != (weight_shard.shape[0],):
        raise ValueError(f"{fn}: bias_shard must have shape ({weight_shard.shape[0]},); got {tuple(bias_shard.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{fn}: target must hold class indices (an integer tensor); got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{fn}: target shape {tuple(target.shape)} must be input's without H, "
                         f"{tuple(input.shape[:-1])}")
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"{fn}: temperature must be a positive, finite number; got {temperature!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive number of tokens; got {chunk_size}")
    flat = target.reshape(-1).long()
    start, classes = _bounds(vocab_start, num_classes)
    log_p, entropy, _ = _op(
        input.reshape(-1, input.shape[-1]), weight_shard, bias_shard, flat, flat != ignore_index, float(temperature),
        chunk_rows(max(weight_shard.shape[0], 1), weight_shard.shape[1], chunk_size, bool(batch_invariant)),
        bool(with_entropy), bool(batch_invariant), _group_name(group), start, classes,
    )
    return log_p.reshape(target.shape), entropy.reshape(target.shape) if with_entropy else None


def vocab_parallel_linear_log_probs(
    input: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    bias_shard: Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    num_classes: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    batch_invariant: bool = False,
) -> Tensor:
    r""":func:`losskit.functional.linear_log_probs` with the output layer sharded by class.

    Equal to ``linear_log_probs(input, weight, target, bias)`` with ``weight`` (and ``bias``)
    the rank-ordered concatenation of every rank's shard, and never forms more than one
    chunk of this rank's logits.

    Args:
        input: ``[..., H]`` token features, the same on every rank.
        weight_shard: this rank's ``[C_r, H]`` rows of the output layer (``C_r`` may be 0).
        target: ``input``'s shape without ``H``: global class indices or ``ignore_index``,
            the same on every rank.
        bias_shard: this rank's ``[C_r]`` slice of the bias.
        group: the process group sharing the vocabulary (default: the world).
        vocab_start: this rank's first class; found from the ranks' shard sizes when it or
            ``num_classes`` is not given (one more all-reduce in forward and in backward).
        num_classes: the size of the whole vocabulary.
        temperature: as :func:`~losskit.functional.linear_log_probs`.
        ignore_index: as :func:`~losskit.functional.linear_log_probs`.
        chunk_size: as :func:`~losskit.functional.linear_log_probs`.
        batch_invariant: as :func:`~losskit.functional.linear_log_probs`.

    Returns:
        The log-probabilities, shaped like ``target``, the same on every rank.

    Example (each of two ranks)::

        shard = head.weight[rank * 16000:(rank + 1) * 16000]  # [16000, H] of 32000 classes
        log_p = vocab_parallel_linear_log_probs(hidden, shard, tokens)
        (-(log_p * advantages).sum()).backward()  # shard.grad: this rank's rows
    """
    log_p, _ = _compute("vocab_parallel_linear_log_probs", input, weight_shard, target, bias_shard, group,
                        vocab_start, num_classes, temperature, ignore_index, chunk_size, batch_invariant, False)
    return log_p


def vocab_parallel_linear_log_probs_and_entropy(
    input: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    bias_shard: Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    num_classes: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    batch_invariant: bool = False,
) -> tuple[Tensor, Tensor]:
    r""":func:`losskit.functional.linear_log_probs_and_entropy` with the output layer
    sharded by class (arguments as :func:`vocab_parallel_linear_log_probs`).

    Returns:
        ``(log_probs, entropy)``, both shaped like ``target``, the same on every rank; the
        entropy is that of the whole vocabulary's distribution.
    """
    return _compute("vocab_parallel_linear_log_probs_and_entropy", input, weight_shard, target, bias_shard, group,
                    vocab_start, num_classes, temperature, ignore_index, chunk_size, batch_invariant, True)
