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
    elif isinstance(given, (list, tuple)):
        longest = max(int(length) for length in given)
    else:
        longest = int(given)
    starts = torch.cumsum(target_lengths, 0) - target_lengths
    offsets = torch.arange(longest, device=targets.device)
    index = (starts.unsqueeze(1) + offsets).clamp(max=max(total - 1, 0))
    padded = targets.long()[index] if total else targets.new_zeros(batch, longest, dtype=torch.long)
    return padded.masked_fill(offsets >= target_lengths.unsqueeze(1), 0)


def _logsumexp(stacked: Tensor, dim: int) -> Tensor:
    """logsumexp that is -inf, with no nan, where every term is -inf (unreachable states)."""
    dead = (stacked == -float("inf")).all(dim=dim, keepdim=True)
    total = torch.logsumexp(torch.where(dead, 0.0, stacked), dim=dim, keepdim=True)
    return torch.where(dead, -float("inf"), total).squeeze(dim)


def _shifted(states: Tensor, by: int, value: float = -float("inf")) -> Tensor:
    """states moved ``by`` places along dim 1 (right for by > 0), filled with ``value``."""
    width = states.shape[1]
    fill = states.new_full((states.shape[0], min(abs(by), width)), value)
    if by > 0:
        return torch.cat([fill, states[:, : width - fill.shape[1]]], dim=1)
    return torch.cat([states[:, fill.shape[1]:], fill], dim=1)


def _ctc_forward(
    log_probs: Tensor, labels: Tensor, input_lengths: Tensor, target_lengths: Tensor, zero_infinity: bool
) -> tuple[Tensor, Tensor]:
    """(-log p(target | input) per sequence, torch's gradient with respect to log_probs).

    log_probs: (T, N, C); labels: (N, L) extended labels (blank, y1, blank, y2, ..., blank),
    L = 2 S + 1. In log space, with e_t(s) = lp_t(l_s):

        alpha_t(s) = e_t(s) + logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1), alpha_{t-1}(s-2))
        beta_t(s)  = e_t(s) + logsumexp(beta_{t+1}(s), beta_{t+1}(s+1), beta_{t+1}(s+2))

    where a step of two counts only between different labels (l_s != l_{s-2}, torch's
    rule). Sequence n starts at its first two states and ends, at frame T_n - 1, in its last
    two (L_n = 2 S_n + 1). The occupancy of state s at frame t is
    exp(alpha_t(s) + beta_t(s) - e_t(s) - log p); the gradient torch returns is
    exp(lp) minus the occupancy summed per class, inside each input length, 0 beyond it.
    Only alpha is kept per frame; beta is swept backwards once, adding the occupancy as it
    goes. Every frame's step is the same branch-free tensor code, so the loop traces.
    """
    steps, batch, _ = log_probs.shape
    width = labels.shape[1]
    minus_inf = float("-inf")
    emit = log_probs.gather(2, labels.unsqueeze(0).expand(steps, batch, width))  # (T, N, L)
    jump_in = _shifted(labels, 2, -1) != labels  # alpha may come from s - 2
    jump_in[:, :2] = False
    jump_out = torch.cat([jump_in[:, 2:], jump_in.new_zeros(batch, min(2, width))], dim=1)  # beta from s + 2
    positions = torch.arange(width, device=labels.device)
    last = (2 * target_lengths).unsqueeze(1)  # L_n - 1
    ends = (positions == last) | (positions == last - 1)

    alphas = []
    alpha = torch.where(positions < 2, emit[0], minus_inf) if steps else emit.new_empty(batch, width)
    for t in range(steps):
        if t:
            terms = torch.stack([alpha, _shifted(alpha, 1), torch.where(jump_in, _shifted(alpha, 2), minus_inf)])
            alpha = emit[t] + _logsumexp(terms, 0)
        alphas.append(alpha)
    alphas_t = torch.stack(alphas) if steps else emit.new_empty(0, batch, width)
    final_frame = (input_lengths - 1).clamp_min(0)
    final = alphas_t.gather(0, final_frame.view(1, batch, 1).expand(1, batch, width))[0] if steps else emit.new_full(
        (batch, width), minus_inf)
    log_likelihood = _logsumexp(torch.where(ends, final, minus_inf), 1)
    # No frames: the empty alignment has probability 1 for an empty target, 0 otherwise.
    empty = log_likelihood.new_zeros(()).where(target_lengths == 0, minus_inf)
    log_likelihood = torch.where(input_lengths == 0, empty, log_likelihood)
    losses = -log_likelihood
    finite = torch.isfinite(losses)
    safe_loss = torch.where(finite, losses, 0.0)

    grad = log_probs.exp()
    beta = emit.new_full((batch, width), minus_inf)
    for t in reversed(range(steps)):
        terms = torch.stack([beta, _shifted(beta, -1), torch.where(jump_out, _shifted(beta, -2), minus_inf)])
        continued = emit[t] + _logsumexp(terms, 0)
        starting = torch.where(ends, emit[t], minus_inf)
        frame = t == input_lengths - 1
        beta = torch.where(frame.unsqueeze(1), starting, torch.where((t < input_lengths - 1).unsqueeze(1), continued,
                                                                       minus_inf))
        both = alphas_t[t] + beta
        occupancy = torch.where(both == minus_inf, 0.0, (both - emit[t] + safe_loss.unsqueeze(1)).exp())
        grad[t] = grad[t].scatter_add(1, labels, -occupancy)
    inside = (torch.arange(steps, device=log_probs.device).unsqueeze(1) < input_lengths).unsqueeze(2)
    # An impossible alignment: loss inf and, as in torch, a nan gradient inside the input
    # length; zero_infinity makes both 0.
    failed = torch.where(finite.view(1, -1, 1), grad, 0.0 if zero_infinity else float("nan"))
    grad = torch.where(inside, failed, 0.0)
    if zero_infinity:
        losses = safe_loss
    return losses, grad


class _CTCLoss(torch.autograd.Function):
    """Per-sequence CTC loss whose gradient is torch's: exp(log_probs) - occupancy.

    torch's ctc_loss returns, as the gradient with respect to log_probs, the gradient with
    respect to the logits that a log_softmax would have produced them from:
    exp(lp) + d(-log p)/d(lp), inside each input length, 0 beyond it. Through a log_softmax
    this equals the true gradient (the exp term sums to 1 per step and is removed), so
    training is unaffected; it is reproduced here so that gradients match torch exactly.
    As torch's, it is differentiable once.
    """

    @staticmethod
    def forward(ctx, log_probs, labels, input_lengths, target_lengths, zero_infinity):  # type: ignore[override]
        losses, grad = _ctc_forward(log_probs, labels, input_lengths, target_lengths, zero_infinity)
        ctx.save_for_backward(grad)
        return losses

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
            values in [0, C). A target equal to ``blank`` is, as in torch, a label like any
            other.
        input_lengths: ``[N]``, each <= T.
        target_lengths: ``[N]``, each <= S.
        blank: the blank class.
        reduction: ``'mean'`` (each loss divided by its target length, then averaged over
            the batch, as torch), ``'sum'`` or ``'none'``.
        zero_infinity: give impossible alignments (input too short) loss 0 and gradient 0
            instead of inf.

    Returns:
        A scalar, or ``[N]`` (``[]`` unbatched) for ``reduction='none'``.

    Devices and compile: runs on any device, and compiles with ``fullgraph=True`` for
    padded targets, or concatenated targets with lengths given as Python lists. Concatenated
    targets with tensor lengths have a data-dependent shape, as in torch's own ctc_loss: the
    padded width is the longest target length, read on the host (one synchronisation for
    device lengths; a graph break under torch.compile). The recursions run one step per
    frame, so compiling unrolls them over T.

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
        if targets.dim() != 1:
            raise ValueError(f"{fn}: unbatched (T, C) log_probs take 1-D targets; got shape {tuple(targets.shape)}")
        length = torch.as_tensor(target_lengths).reshape(-1)
        if length.numel() == 1 and length.device.type == "cpu" and int(length) != targets.shape[0]:
            raise ValueError(
                f"{fn}: unbatched targets must hold exactly target_lengths labels ({int(length)}); "
                f"got {targets.shape[0]}"
            )
        log_probs = log_probs.unsqueeze(1)
        targets = targets.unsqueeze(0)
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
        return ValueError(f"{fn}: target {int(padded[where])}{at_index(where)} must be a class in [0, {num_classes})")

    check_values(
        padded,
        lambda: counted & ((padded < 0) | (padded >= num_classes)),
        bad_label,
        f"{fn}: a target must be a class in [0, {num_classes})",
    )
    # Extended labels: blank, y1, blank, y2, ..., blank (padding beyond a length is blank).
    labels = torch.full((batch, 2 * padded.shape[1] + 1), blank, dtype=torch.long, device=device)
    labels[:, 1::2] = padded.masked_fill(~counted, blank).long()
    compute, out = result_dtypes(log_probs)
    losses = _CTCLoss.apply(log_probs.to(compute), labels, input_lengths, target_lengths, zero_infinity)
    if reduction == "mean":
        losses = losses / target_lengths.clamp_min(1).to(losses.dtype)
    loss = reduce_loss(losses, reduction)
    return (loss.squeeze(0) if unbatched and reduction == "none" else loss).to(out)
