"""Divergence losses: kl_div."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .._core.docs import LEGACY_ARGS, fill_doc
from .._core.ops import kl_terms, log_softmax
from .._core.dtypes import result_dtypes
from .._core.reduction import reduce_loss, resolve_reduction
from .._core.validation import broadcast_shape, check_floating
from ..kernels import Replay
from ..kernels.likelihood import elementwise_options, fused_elementwise_applies, fused_elementwise_call
from ..kernels.row_divergence import fused_row_divergence_applies, fused_row_divergence_call, row_divergence_options

__all__ = ["js_divergence", "kl_div"]


@fill_doc(legacy_args=LEGACY_ARGS)
def kl_div(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    log_target: bool = False,
) -> Tensor:
    r"""Kullback-Leibler divergence of ``target`` from the model, ``input`` in log space.

    .. math::
        \ell_i = y_i (\log y_i - x_i) \quad\text{or, with log\_target,}\quad
        \ell_i = e^{y_i} (y_i - x_i)

    with :math:`0 \log 0 = 0`. Summed over a distribution, this is :math:`KL(y \,\|\, e^x)`.

    Args:
        input: log-probabilities of the model, any shape ``[...]``.
        target: probabilities (log-probabilities when ``log_target``), broadcastable to
            ``input``.
        {legacy_args}
        reduction: ``'batchmean'`` (the sum divided by the first dimension: the true KL
            per sample), ``'mean'`` (divided by every element, with torch's warning),
            ``'sum'`` or ``'none'``.
        log_target: whether ``target`` is given as log-probabilities.

    Returns:
        A scalar, or the element-wise terms for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import kl_div
        >>> p = torch.tensor([[0.36, 0.48, 0.16]])
        >>> q = torch.tensor([[1 / 3, 1 / 3, 1 / 3]])
        >>> kl_div(q.log(), p, reduction="batchmean")  # KL(p || q)
        tensor(0.0853)

    References:
        torch.nn.KLDivLoss (torch 2.13); Kullback and Leibler, "On Information and
        Sufficiency", 1951.
    """
    fn = "kl_div"
    legacy = size_average is not None or reduce is not None
    reduction = resolve_reduction(
        size_average, reduce, reduction, allowed=("mean", "batchmean", "sum", "none")
    )
    if reduction == "mean" and not legacy:
        warnings.warn(
            "kl_div: reduction='mean' divides the total by the batch size and the support size; "
            "'batchmean' divides by the batch size only and is the KL divergence per sample",
            UserWarning,
            stacklevel=2,
        )
    check_floating(input, "input", fn)
    check_floating(target, "target", fn)
    broadcast_shape(input, target, ("input", "target"), fn)
    # Eager calls that want a gradient: the terms by the ops below and their gradient
    # written out beside them (kernels/likelihood.py); xlogy(y, y)'s gradient for a
    # probability target stays with autograd.
    if fused_elementwise_applies(input, target) and (log_target or not target.requires_grad):
        return fused_elementwise_call(
            input, target, None, elementwise_options("kl_div", reduction, 0.0, 0.0, bool(log_target), False),
            Replay(fn, lambda a, b: _kl_div(a, b, reduction, log_target), [input, target]),
        )
    return _kl_div(input, target, reduction, log_target)


def _kl_div(input: Tensor, target: Tensor, reduction: str, log_target: bool) -> Tensor:
    """kl_div's composed form, which autograd differentiates (the fused path's oracle)."""
    compute, out = result_dtypes(input, target)
    x, y = input.to(compute), target.to(compute)
    if log_target:
        loss = torch.exp(y) * (y - x)
    else:
        loss = torch.xlogy(y, y) - y * x
    if reduction == "batchmean":
        total = reduce_loss(loss, "sum")
        # As torch: divide by the input's first dimension; a 0-d input has none.
        return (total / input.shape[0] if input.dim() else total).to(out)
    return reduce_loss(loss, reduction).to(out)


def js_divergence(
    input: Tensor,
    target: Tensor,
    *,
    beta: float = 0.5,
    from_logits: bool = False,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> Tensor:
    r"""Generalised Jensen-Shannon divergence between a student ``input`` and a teacher ``target``.

    With :math:`Q = e^{\text{input}}` (student), :math:`P = e^{\text{target}}` (teacher) and
    :math:`M = \beta P + (1 - \beta) Q`, per row over the last dimension:

    .. math::
        \text{JSD}_\beta = \beta\, KL(P \,\|\, M) + (1 - \beta)\, KL(Q \,\|\, M)

    and, at the ends, :math:`\beta = 0` is the forward :math:`KL(P \,\|\, Q)` and
    :math:`\beta = 1` the reverse :math:`KL(Q \,\|\, P)` (the convention of Liger-Kernel's
    JSD, used for distillation). :math:`\beta = 1/2` is the symmetric JS divergence.

    Args:
        input: the student's log-probabilities (logits with ``from_logits``), ``[..., C]``.
        target: the teacher's, same shape.
        beta: in [0, 1].
        from_logits: apply log_softmax over the last dimension to both first.
        labels: optional ``[...]`` (the rows); rows whose label is ``ignore_index`` count
            neither in the sum nor in the 'batchmean' denominator.
        ignore_index: the label value to skip.
        reduction: ``'batchmean'`` (sum over rows that count, divided by their number),
            ``'sum'`` or ``'none'`` (per row).

    Returns:
        A scalar, or the per-row divergence for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import js_divergence
        >>> p, q = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> js_divergence(q.log(), p.log())  # disjoint supports: ln 2
        tensor(0.6931)

    References:
        Lin, "Divergence Measures Based on the Shannon Entropy", 1991; Agarwal et al.,
        "On-Policy Distillation of Language Models", 2024 (generalised JSD).
    """
    fn = "js_divergence"
    reduction = resolve_reduction(None, None, reduction, allowed=("batchmean", "sum", "none"))
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{fn}: beta must be in [0, 1]; got {beta}")
    check_floating(input, "input", fn)
    if input.shape != target.shape:
        raise ValueError(f"{fn}: target shape {tuple(target.shape)} must match input shape {tuple(input.shape)}")
    # Eager calls that want the student's gradient: the rows by the ops below and the
    # gradient kept from their terms (kernels/row_divergence.py).
    if fused_row_divergence_applies(input, target) and (labels is None or labels.shape == input.shape[:-1]):
        return fused_row_divergence_call(
            input, target, labels, row_divergence_options("js", reduction, float(beta), bool(from_logits), ignore_index),
            Replay(fn, lambda a, b: _js(a, b, beta, from_logits, labels, ignore_index, reduction), [input, target]),
        )
    return _js(input, target, beta, from_logits, labels, ignore_index, reduction)


def _js(input: Tensor, target: Tensor, beta: float, from_logits: bool, labels: Tensor | None, ignore_index: int,
        reduction: str) -> Tensor:
    """js_divergence's composed form, which autograd differentiates (the fused path's oracle)."""
    fn = "js_divergence"
    compute, out = result_dtypes(input, target)
    log_q, log_p = input.to(compute), target.to(compute)
    if from_logits:
        log_q, log_p = log_softmax(log_q, -1), log_softmax(log_p, -1)

    if beta == 0.0:
        rows = kl_terms(log_p, log_q, -1)
    elif beta == 1.0:
        rows = kl_terms(log_q, log_p, -1)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        rows = beta * kl_terms(log_p, log_m, -1) + (1.0 - beta) * kl_terms(log_q, log_m, -1)
    if labels is not None:
        if tuple(labels.shape) != tuple(rows.shape):
            raise ValueError(f"{fn}: labels shape {tuple(labels.shape)} must be the rows' shape {tuple(rows.shape)}")
        counted = labels != ignore_index
        rows = torch.where(counted, rows, 0.0)
        count = counted.sum()
    else:
        count = rows.numel()  # a number, not a tensor made on the CPU beside the input's device
    if reduction == "batchmean":
        return (rows.sum() / count).to(out)
    return reduce_loss(rows, reduction).to(out)
