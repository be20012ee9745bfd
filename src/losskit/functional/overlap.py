"""Overlap losses for soft multi-class segmentation: dice and tversky."""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.dtypes import result_dtypes
from .._core.reduction import resolve_reduction
from .._core.validation import check_class_weight, check_floating, check_in_unit_interval
from .classification import check_index_targets

__all__ = ["dice_loss", "tversky_loss"]


def _overlap(
    input: Tensor,
    target: Tensor,
    from_logits: bool,
    ignore_index: int | None,
    fn: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Soft true positives, predicted and true totals per (sample, class), [N, C]:
    TP = sum p t, P = sum p and T = sum t over the positions of each sample (all dimensions
    after the class dimension), leaving out positions whose target is ``ignore_index``
    (FP = P - TP, FN = T - TP).

    Few ops, for the everyday small call: where no target is ignored (known for free on the
    CPU) nothing is masked, and [N, C] input (one position per sample) sums over nothing.
    """
    if input.dim() < 2:
        raise ValueError(f"{fn}: input must be [N, C, ...] (class dimension 1); got shape {tuple(input.shape)}")
    check_floating(input, "input", fn)
    compute, _ = result_dtypes(input)
    x = input if input.dtype == compute else input.to(compute)
    # softmax, not exp(log_softmax): one op forward and one backward, the same values to
    # a rounding.
    probs = torch.softmax(x, 1) if from_logits else x
    if not from_logits:
        check_in_unit_interval(input, "input", fn, hint="Pass from_logits=True for raw scores")
    if target.shape == input.shape and target.is_floating_point():
        if ignore_index is not None:
            raise ValueError(f"{fn}: ignore_index is not supported with class-probability targets")
        truth = target if target.dtype == compute else target.to(compute)
    else:
        ignore = -100 if ignore_index is None else ignore_index
        targets = check_index_targets(input, target, 1, ignore, fn)
        truth = torch.zeros_like(probs).scatter_(1, targets.safe().unsqueeze(1), 1.0)
        if not targets.all_valid:
            keep = targets.valid.unsqueeze(1).to(compute)
            probs, truth = probs * keep, truth * keep
    if input.dim() == 2:  # one position per sample: the sums are the values
        return probs * truth, probs, truth
    dims = tuple(range(2, input.dim()))
    return (probs * truth).sum(dims), probs.sum(dims), truth.sum(dims)


def _reduce_classes(loss: Tensor, weight: Tensor | None, reduction: str, fn: str, out: torch.dtype) -> Tensor:
    """[N, C] losses: 'none' as they are (weighted), 'sum', or 'mean' = weighted mean over classes, then samples."""
    if weight is None:
        if reduction == "none":
            return loss.to(out)
        return (loss.sum() if reduction == "sum" else loss.mean()).to(out)
    check_class_weight(weight, loss.shape[1], fn)
    w = weight.to(loss.dtype)
    weighted = loss * w
    if reduction == "none":
        return weighted.to(out)
    if reduction == "sum":
        return weighted.sum().to(out)
    return (weighted.sum(1) / w.sum()).mean().to(out)


def tversky_loss(
    input: Tensor,
    target: Tensor,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    from_logits: bool = True,
    smooth: float = 1.0,
    ignore_index: int | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Tversky loss: one minus the soft Tversky index of each sample and class.

    .. math::
        \ell_{n,c} = 1 - \frac{TP + s}{TP + \alpha FP + \beta FN + s}

    with soft counts over each sample's positions; :math:`\alpha = \beta = 1/2` is a dice
    loss, and :math:`\beta > \alpha` weighs missed pixels more (recall).

    Args:
        input: logits (``from_logits``, softmax over dim 1) or probabilities, ``[N, C, ...]``.
        target: class indices ``[N, ...]`` or class probabilities ``[N, C, ...]``.
        alpha: weight of false positives.
        beta: weight of false negatives.
        from_logits: whether ``input`` holds logits.
        smooth: added to numerator and denominator, so empty classes give 0 loss, not 0/0.
        ignore_index: class-index value whose positions are left out of every count.
        weight: per-class weights ``[C]`` for the reduction.
        reduction: ``'mean'`` (weighted mean over classes, then over samples), ``'sum'``
            or ``'none'`` (``[N, C]``, weighted).

    Returns:
        A scalar, or ``[N, C]``.

    Example:
        >>> import torch
        >>> from losskit.functional import tversky_loss
        >>> probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # N=1, C=2, two pixels: perfect
        >>> tversky_loss(probs, torch.tensor([[0, 1]]), from_logits=False)
        tensor(0.)

    References:
        Salehi et al., "Tversky loss function for image segmentation using 3D fully
        convolutional deep networks", 2017.
    """
    fn = "tversky_loss"
    reduction = resolve_reduction(None, None, reduction)
    tp, predicted, true = _overlap(input, target, from_logits, ignore_index, fn)
    loss = 1 - (tp + smooth) / (tp + alpha * (predicted - tp) + beta * (true - tp) + smooth)
    return _reduce_classes(loss, weight, reduction, fn, result_dtypes(input)[1])


def dice_loss(
    input: Tensor,
    target: Tensor,
    *,
    from_logits: bool = True,
    smooth: float = 1.0,
    ignore_index: int | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Soft dice loss: one minus the dice coefficient of each sample and class.

    .. math::
        \ell_{n,c} = 1 - \frac{2\,TP + s}{\sum p + \sum t + s} = 1 - \frac{2\,TP + s}{2\,TP + FP + FN + s}

    Args:
        input: logits (``from_logits``, softmax over dim 1) or probabilities, ``[N, C, ...]``.
        target: class indices ``[N, ...]`` or class probabilities ``[N, C, ...]``.
        from_logits: whether ``input`` holds logits.
        smooth: added to numerator and denominator (empty classes give 0 loss).
        ignore_index: class-index value whose positions are left out.
        weight: per-class weights ``[C]`` for the reduction.
        reduction: ``'mean'`` (weighted mean over classes, then samples), ``'sum'`` or
            ``'none'`` (``[N, C]``).

    Returns:
        A scalar, or ``[N, C]``.

    Example:
        >>> import torch
        >>> from losskit.functional import dice_loss
        >>> probs = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])  # undecided on two pixels
        >>> dice_loss(probs, torch.tensor([[0, 1]]), from_logits=False, smooth=0.0)  # 1 - 2*0.5/2
        tensor(0.5000)

    References:
        Milletari et al., "V-Net: Fully Convolutional Neural Networks for Volumetric
        Medical Image Segmentation", 2016.
    """
    fn = "dice_loss"
    reduction = resolve_reduction(None, None, reduction)
    tp, predicted, true = _overlap(input, target, from_logits, ignore_index, fn)
    loss = 1 - (2 * tp + smooth) / (predicted + true + smooth)  # 2 TP + FP + FN = P + T
    return _reduce_classes(loss, weight, reduction, fn, result_dtypes(input)[1])
