"""Sequence losses: ctc_loss, with torch 2.13's signature, semantics and gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.dtypes import result_dtypes
from .._core.reduction import reduce_loss, resolve_reduction
from .._core.checks import check_values
from .._core.validation import at_index, check_floating, extremes, first_index
from ..kernels.ctc import ctc_loss_only, ctc_loss_with_grad

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

    seen = extremes(lengths)  # one look at the extremes passes a good batch
    if seen is not None and seen[0] >= 0 and seen[1] <= limit:
        return

    def report(bad: Tensor) -> Exception:
        return ValueError(f"{fn}: {name} must lie in [0, {limit}]; got {lengths.tolist()} ({what} is {limit})")

    check_values(lengths, lambda: (lengths < 0) | (lengths > limit), report, f"{fn}: {name} must lie in [0, {limit}]")


def _checked_targets(padded: Tensor, target_lengths: Tensor, num_classes: int, blank: int, fn: str) -> Tensor:
    """The padded targets, each counted one (within its target length) checked to be a
    class other than ``blank``; those beyond the lengths, never read, made a class (blank)
    where they are not.

    A label equal to the blank is refused: CTC removes blanks from every alignment, so no
    alignment yields it, and the number computed for it is no likelihood (torch documents
    it as invalid, computes it anyway, and at the last frame of a sequence ending in it
    returns a gradient that is not even that number's). With checks off it is computed as
    written, with its true gradient.

    Where checks read values, one look at the extremes passes a batch whose every entry,
    padding included, is a class and none the blank, with no mask made.
    """
    seen = extremes(padded)
    if seen is not None and seen[0] >= 0 and seen[1] < num_classes and not seen[0] <= blank <= seen[1]:
        return padded
    counted = torch.arange(padded.shape[1], device=padded.device) < target_lengths.unsqueeze(1)

    def bad_label(bad: Tensor) -> Exception:
        where = first_index(bad)
        label = int(padded[where])
        if label == blank:
            return ValueError(
                f"{fn}: target {label}{at_index(where)} is the blank ({blank}); a label must be another class "
                "(CTC removes every blank, so no alignment gives this target)"
            )
        return ValueError(f"{fn}: target {label}{at_index(where)} must be a class in [0, {num_classes})")

    check_values(
        padded,
        lambda: counted & ((padded < 0) | (padded >= num_classes) | (padded == blank)),
        bad_label,
        f"{fn}: a target must be a class in [0, {num_classes}) other than the blank ({blank})",
    )
    return padded.masked_fill(~counted, blank)


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
            values in [0, C) other than ``blank`` (torch documents a target equal to the
            blank as invalid; losskit refuses it, except with checks off).
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
    padded = _checked_targets(padded, target_lengths, num_classes, blank, fn)
    # Extended labels, state-major as the kernel runs: blank, y1, blank, y2, ..., blank.
    labels = padded.new_full((2 * padded.shape[1] + 1, batch), blank, dtype=torch.long)
    labels[1::2] = padded.T
    compute, out = result_dtypes(log_probs)
    log_probs = log_probs.to(compute)
    if torch.is_grad_enabled() and log_probs.requires_grad:  # reduced with its gradient (kernels.ctc._reduce)
        loss = ctc_loss_with_grad(log_probs, labels, input_lengths, target_lengths, zero_infinity, reduction)
    else:  # no gradient wanted: the forward recursion alone
        losses = ctc_loss_only(log_probs, labels, input_lengths, target_lengths, zero_infinity)
        if reduction == "mean":
            losses = losses / target_lengths.clamp_min(1)  # int64 divisor: the quotient keeps losses' dtype
        loss = reduce_loss(losses, reduction)
    return (loss.squeeze(0) if unbatched and reduction == "none" else loss).to(out)
