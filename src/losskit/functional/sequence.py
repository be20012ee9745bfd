"""Sequence losses: ctc_loss, with torch 2.13's signature, semantics and gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.dtypes import result_dtypes
from .._core.reduction import reduce_loss, resolve_reduction
from .._core.checks import check_values
from .._core.validation import at_index, check_floating, first_index

__all__ = ["ctc_loss"]


def _as_lengths(
    lengths: Tensor | list[int] | tuple[int, ...] | int, batch: int, name: str, fn: str, device: torch.device
) -> Tensor:
    values = torch.as_tensor(lengths, dtype=torch.long, device=device).reshape(-1)
    if values.numel() != batch:
        raise ValueError(f"{fn}: {name} must have one entry per sequence ({batch}); got {values.numel()}")
    return values


def _check_lengths(lengths: Tensor, limit: int, name: str, what: str, fn: str) -> None:
    """Each length in [0, limit]."""

    def report(bad: Tensor) -> Exception:
        return ValueError(f"{fn}: {name} must lie in [0, {limit}]; got {lengths.tolist()} ({what} is {limit})")

    check_values(lengths, lambda: (lengths < 0) | (lengths > limit), report, f"{fn}: {name} must lie in [0, {limit}]")


def _pad_concatenated(targets: Tensor, target_lengths: Tensor, given: object, fn: str) -> Tensor:
    """(N, S) padded targets from the concatenated 1-D form, S the longest target length.

    S is read from the lengths as given (``given``: free for a list or a CPU tensor, one
    host read for a device tensor, as torch's own ctc_loss reads its lengths): the only
    data-dependent shape in losskit. Meta tensors hold no lengths; there S is bounded by
    the number of targets.
    """
    total = targets.numel()

    def report(bad: Tensor) -> Exception:
        return ValueError(f"{fn}: 1-D targets hold {total} labels but target_lengths sum to {int(target_lengths.sum())}")

    check_values(target_lengths, lambda: target_lengths.sum() != total, report,
                 f"{fn}: target_lengths must sum to the number of 1-D targets ({total})")
    batch = target_lengths.shape[0]
    if not batch:
        longest = 0
    elif isinstance(given, Tensor):
        longest = total if given.device.type == "meta" else int(given.max())
    else:
        longest = int(max(torch.as_tensor(given).reshape(-1).tolist()))
    starts = torch.cumsum(target_lengths, 0) - target_lengths
    offsets = torch.arange(longest, device=targets.device)
    index = (starts.unsqueeze(1) + offsets).clamp(max=max(total - 1, 0))
    padded = targets.long()[index] if total else targets.new_zeros(batch, longest, dtype=torch.long)
    return padded.masked_fill(offsets >= target_lengths.unsqueeze(1), 0)


def _logsumexp(stacked: Tensor, dim: int) -> Tensor:
    """logsumexp whose gradient is 0, not nan, where every term is -inf (unreachable states)."""
    dead = (stacked == -float("inf")).all(dim=dim, keepdim=True)
    total = torch.logsumexp(torch.where(dead, 0.0, stacked), dim=dim, keepdim=True)
    return torch.where(dead, -float("inf"), total).squeeze(dim)


def _forward_recursion(log_probs: Tensor, labels: Tensor, input_lengths: Tensor, label_lengths: Tensor) -> Tensor:
    """-log p(target | input) per sequence, by the CTC forward (alpha) recursion in log space.

    log_probs: (T, N, C); labels: (N, L) extended labels (blank, y1, blank, y2, ..., blank),
    L = 2 S + 1; label_lengths: 2 * target_length + 1 per sequence.

        alpha_t(s) = lp_t(l_s) + logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1), alpha_{t-1}(s-2))

    where the s-2 term only counts when l_s is not blank and differs from l_{s-2}. A
    sequence's alpha stops changing after its own input length.
    """
    steps, batch, _ = log_probs.shape
    width = labels.shape[1]
    minus_inf = log_probs.new_full((), -float("inf"))
    emit = log_probs.gather(2, labels.unsqueeze(0).expand(steps, batch, width))  # (T, N, L)
    skip = torch.zeros(batch, width, dtype=torch.bool, device=labels.device)
    skip[:, 2:] = (labels[:, 2:] != labels[:, :-2]) & (labels[:, 2:] != 0)
    positions = torch.arange(width, device=labels.device)
    alpha = torch.where(positions < 2, emit[0], minus_inf)
    for t in range(1, steps):
        stay = alpha
        step = torch.cat([minus_inf.expand(batch, 1), alpha[:, :-1]], dim=1)
        jump = torch.where(skip, torch.cat([minus_inf.expand(batch, 2), alpha[:, :-2]], dim=1), minus_inf)
        new = emit[t] + _logsumexp(torch.stack([stay, step, jump]), dim=0)
        alpha = torch.where((t < input_lengths).unsqueeze(1), new, alpha)
    last = (label_lengths - 1).unsqueeze(1)
    ends = torch.cat([alpha.gather(1, last), torch.where(last > 0, alpha.gather(1, (last - 1).clamp_min(0)), minus_inf)], 1)
    return -_logsumexp(ends, dim=1)


class _CTCLoss(torch.autograd.Function):
    """Per-sequence CTC loss whose gradient is torch's: exp(log_probs) - occupancy.

    torch's ctc_loss returns, as the gradient with respect to log_probs, the gradient with
    respect to the logits that a log_softmax would have produced them from:
    exp(lp) + d(-log p)/d(lp), inside each input length, 0 beyond it. Through a log_softmax
    this equals the true gradient (the exp term sums to 1 per step and is removed), so
    training is unaffected; it is reproduced here so that gradients match torch exactly.
    """

    @staticmethod
    def forward(ctx, log_probs, labels, input_lengths, label_lengths, zero_infinity):  # type: ignore[override]
        with torch.enable_grad():
            leaf = log_probs.detach().requires_grad_()
            losses = _forward_recursion(leaf, labels, input_lengths, label_lengths)
            finite = torch.isfinite(losses)
            (true_grad,) = torch.autograd.grad(torch.where(finite, losses, 0.0).sum(), leaf)
        inside = (torch.arange(log_probs.shape[0], device=log_probs.device).unsqueeze(1) < input_lengths).unsqueeze(2)
        grad = torch.where(inside, log_probs.detach().exp() + true_grad, 0.0)
        if zero_infinity:
            grad = torch.where(finite.view(1, -1, 1), grad, 0.0)
            losses = torch.where(finite, losses, 0.0)
        else:  # torch's gradient of an impossible alignment is nan
            grad = torch.where(finite.view(1, -1, 1), grad, float("nan"))
        ctx.save_for_backward(grad)
        return losses.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_output.view(1, -1, 1), None, None, None, None


def ctc_loss(
    log_probs: Tensor,
    targets: Tensor,
    input_lengths: Tensor | list[int] | tuple[int, ...],
    target_lengths: Tensor | list[int] | tuple[int, ...],
    blank: int = 0,
    reduction: str = "mean",
    zero_infinity: bool = False,
) -> Tensor:
    r"""Connectionist Temporal Classification loss: -log of the summed probability of every
    alignment of ``targets`` to the input frames.

    .. math::
        \ell_n = -\log \sum_{\pi \in \mathcal{B}^{-1}(y_n)} \prod_t p_t(\pi_t)

    where :math:`\mathcal{B}` collapses repeats and removes blanks. Computed by the forward
    recursion in log space; the gradient is torch's (see below).

    Args:
        log_probs: log-probabilities ``[T, N, C]`` (or ``[T, C]`` unbatched), e.g. from
            log_softmax over C.
        targets: ``[N, S]`` padded, or the targets of all sequences concatenated, 1-D;
            values in [0, C) other than ``blank``.
        input_lengths: ``[N]``, each <= T.
        target_lengths: ``[N]``, each <= S.
        blank: the blank class.
        reduction: ``'mean'`` (each loss divided by its target length, then averaged over
            the batch, as torch), ``'sum'`` or ``'none'``.
        zero_infinity: give impossible alignments (input too short) loss 0 and gradient 0
            instead of inf.

    Returns:
        A scalar, or ``[N]`` (``[]`` unbatched) for ``reduction='none'``.

    Devices and compile: runs on any device. Concatenated 1-D targets have a
    data-dependent shape, as in torch's own ctc_loss: the padded width is the longest
    target length, read on the host (free for lengths given as a list or a CPU tensor, one
    synchronisation for device lengths). Under torch.compile the loss gives eager's values
    and gradients but is not one graph: its forward differentiates the recursion with
    autograd, which dynamo leaves to eager mode (graph breaks, no error).

    As in torch, the gradient returned for ``log_probs`` is :math:`e^{\text{log\_probs}}`
    plus the true gradient inside each input length: the gradient with respect to the logits
    of a log_softmax. Through a log_softmax, as CTC is used, it is exact.

    Example:
        >>> import torch
        >>> from losskit.functional import ctc_loss
        >>> log_probs = torch.full((2, 1, 2), 0.5).log()  # two frames, {blank, a}, uniform
        >>> ctc_loss(log_probs, torch.tensor([[1]]), [2], [1], reduction="sum")  # -ln(3/4)
        tensor(0.2877)

    References:
        torch.nn.CTCLoss (torch 2.13); Graves et al., "Connectionist Temporal
        Classification: Labelling Unsegmented Sequence Data with Recurrent Neural
        Networks", 2006.
    """
    fn = "ctc_loss"
    reduction = resolve_reduction(None, None, reduction)
    check_floating(log_probs, "log_probs", fn)
    unbatched = log_probs.dim() == 2
    if unbatched:
        log_probs = log_probs.unsqueeze(1)
        targets = targets.unsqueeze(0) if targets.dim() == 1 else targets
    if log_probs.dim() != 3:
        raise ValueError(f"{fn}: log_probs must be (T, N, C) or (T, C); got shape {tuple(log_probs.shape)}")
    steps, batch, num_classes = log_probs.shape
    device = log_probs.device
    input_lengths = _as_lengths(input_lengths, batch, "input_lengths", fn, device)
    given_target_lengths = target_lengths
    target_lengths = _as_lengths(target_lengths, batch, "target_lengths", fn, device)
    _check_lengths(input_lengths, steps, "input_lengths", "the number of frames", fn)
    if not 0 <= blank < num_classes:
        raise ValueError(f"{fn}: blank must be a class in [0, {num_classes}); got {blank}")
    if targets.dim() == 2:
        _check_lengths(target_lengths, targets.shape[1], "target_lengths", "the padded width", fn)
        padded = targets
    else:  # concatenated
        padded = _pad_concatenated(targets, target_lengths, given_target_lengths, fn)
    counted = torch.arange(padded.shape[1], device=device).unsqueeze(0) < target_lengths.unsqueeze(1)

    def bad_label(bad: Tensor) -> Exception:
        where = first_index(bad)
        return ValueError(
            f"{fn}: target {int(padded[where])}{at_index(where)} must be a class in [0, {num_classes}) other than "
            f"the blank ({blank})"
        )

    check_values(
        padded,
        lambda: counted & ((padded < 0) | (padded >= num_classes) | (padded == blank)),
        bad_label,
        f"{fn}: a target must be a class in [0, {num_classes}) other than the blank ({blank})",
    )
    # Extended labels with the blank mapped to class 0's slot ordering kept: blank, y1, blank, ...
    width = 2 * padded.shape[1] + 1
    labels = torch.full((batch, width), blank, dtype=torch.long, device=device)
    labels[:, 1::2] = padded.masked_fill(~counted, blank).long()
    compute, out = result_dtypes(log_probs)
    # The recursion treats class 0 as the blank: swap the blank class into slot 0.
    order = torch.arange(num_classes, device=device)
    order[0], order[blank] = blank, 0
    lp = log_probs.to(compute)
    swapped = lp.index_select(2, order) if blank != 0 else lp
    labels = order[labels] if blank != 0 else labels
    losses = _CTCLoss.apply(swapped, labels, input_lengths, 2 * target_lengths + 1, zero_infinity)
    if reduction == "mean":
        losses = losses / target_lengths.clamp_min(1).to(losses.dtype)
    loss = reduce_loss(losses, reduction)
    return (loss.squeeze(0) if unbatched and reduction == "none" else loss).to(out)
