"""Divergence losses: kl_div."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ._docs import LEGACY_ARGS, fill_doc
from ._reduction import reduce_loss, resolve_reduction, result_dtypes
from ._validation import broadcast_shape, check_floating

__all__ = ["kl_div"]


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
        \ell_i = y_i (\log y_i - x_i) \quad\text{or, with log_target,}\quad
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
