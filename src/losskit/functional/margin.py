"""Margin and embedding losses, with torch 2.13's signatures and semantics."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .._core.docs import LEGACY_ARGS, fill_doc
from .._core.dtypes import result_dtypes
from .._core.reduction import reduce_loss, resolve_reduction
from .._core.validation import broadcast_shape, check_class_weight, check_floating, check_target_range, extremes
from ..kernels.embedding import (
    cosine_options,
    element_options,
    fused_cosine_call,
    fused_elements_apply,
    fused_embedding_applies,
    fused_hinge_embedding_call,
    fused_ranking_call,
    fused_triplet_call,
    triplet_options,
    triplet_p_served,
)
from ..kernels.fused_op import Replay, attach_precomputed, eager_native, fused_may_serve
from ..kernels.soft_margin import fused_multilabel_soft_margin, fused_soft_margin, soft_margin_options

__all__ = [
    "cosine_embedding_loss",
    "hinge_embedding_loss",
    "margin_ranking_loss",
    "multi_margin_loss",
    "multilabel_margin_loss",
    "multilabel_soft_margin_loss",
    "pairwise_distance",
    "soft_margin_loss",
    "triplet_margin_loss",
    "triplet_margin_with_distance_loss",
]


def _same_ndim(fn: str, **tensors: Tensor) -> None:
    dims = {name: t.dim() for name, t in tensors.items()}
    if len(set(dims.values())) > 1:
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())
        raise ValueError(f"{fn}: all inputs must have the same number of dimensions; got {shapes}")


def _hinge(z: Tensor) -> Tensor:
    """max(0, z) whose gradient at a tie (z exactly 0) is 0, as torch's margin kernels
    count a term only where it is positive (clamp_min would pass 1 there)."""
    return torch.where(z > 0, z, 0.0)


def _check_classes(target: Tensor, counted: Callable[[], Tensor | bool], num_classes: int, fn: str, lowest: int,
                   native=None) -> bool:
    """check_target_range, after a one-op look at the extremes where checks read values on
    the host (a loop in C++ where ``native`` is given): targets within [lowest, num_classes)
    need no element-wise mask. Returns whether they all lie there, as far as it was looked
    (the compiled kernels read only targets known to be in range)."""
    if native is not None:
        if native.classes_in_range(target, lowest, num_classes):
            return True
    else:
        seen = extremes(target)
        if seen is not None and seen[0] >= lowest and seen[1] < num_classes:
            return True
    check_target_range(target, target.new_ones((), dtype=torch.bool) & counted(), num_classes, fn)
    return False


def _native_for(input: Tensor, target: Tensor, weight: Tensor | None = None):
    """The compiled module (losskit._native) where it serves this call, else None: eager
    calls on the CPU in float32 or a half type (float64 keeps the Python path, as for every
    fused kernel: gradcheck's dtype), outside torch.func transforms and forward-mode AD
    (:func:`~losskit.kernels.fused_op.eager_native`), where nothing but the input may want
    a gradient."""
    if not input.is_cpu or input.dtype == torch.float64:
        return None
    if weight is not None and (weight.requires_grad or not weight.is_cpu):
        return None
    return eager_native(input, target, weight)


def _composed_native(*tensors: Tensor | None):
    """The compiled module where it serves an eager call of a composed loss (soft margin,
    multilabel soft margin, margin ranking, hinge and cosine embedding, triplet): CPU tensors
    of real types, outside torch.compile, torch.func transforms and forward-mode AD
    (:func:`~losskit.kernels.fused_op.eager_native`), else None. Its forms run this file's
    ops from C++ (losskit._native embedding.cpp), every dtype included: the same ops build
    the same autograd graph, so values and gradients are the same bits."""
    for t in tensors:
        if t is not None and (not t.is_cpu or t.is_complex()):
            return None
    return eager_native(*tensors)


def _plain_numbers(*values) -> bool:
    """Python floats, or ints a float64 holds exactly, which the compiled forms take as
    doubles to the same effect (anything else, a tensor margin say, keeps the Python form)."""
    return all(type(v) is float or (type(v) is int and abs(v) <= 2**53) for v in values)


def _attach(native, fn: str, node: str, made: tuple, input: Tensor, per_row: bool,
            reference: Callable[[Tensor], Tensor]):
    """The loss made by a compiled kernel, with the C++ autograd node that hands out its
    gradient (see kernels/fused_op.py); create_graph and a second backward replay the call
    on the Python path."""
    loss, grad = made
    if grad is None:
        return loss
    return attach_precomputed(native, node, fn, loss, [input], [grad], per_row, Replay(fn, reference, [input]))


def _class_rows(input: Tensor, target: Tensor, fn: str, target_like_input: bool) -> None:
    """(C,) or (N, C) input; target (N,) / () or, for multilabel, input's own shape."""
    if input.dim() not in (1, 2):
        raise ValueError(f"{fn}: input must be (C,) or (N, C); got shape {tuple(input.shape)}")
    expected = input.shape if target_like_input else input.shape[:-1]
    if target.shape != expected:
        raise ValueError(
            f"{fn}: target shape {tuple(target.shape)} must be {tuple(expected)} for input shape {tuple(input.shape)}"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"{fn}: target must hold integer class indices; got {target.dtype}")


@fill_doc(legacy_args=LEGACY_ARGS)
def soft_margin_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Two-class logistic loss :math:`\log(1 + e^{-y x})` for targets :math:`y \in \{1, -1\}`.

    Computed as softplus(-y x), finite where torch's log1p(exp(-y x)) overflows to inf.

    Args:
        input: scores, any shape ``[...]``.
        target: +1 / -1 labels, broadcastable to ``input``.
        {legacy_args}
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the element-wise loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import soft_margin_loss
        >>> soft_margin_loss(torch.tensor([0.0]), torch.tensor([1.0]))  # ln 2
        tensor(0.6931)

    References:
        torch.nn.SoftMarginLoss (torch 2.13).
    """
    fn = "soft_margin_loss"
    reduction = resolve_reduction(size_average, reduce, reduction)
    check_floating(input, "input", fn)
    broadcast_shape(input, target, ("input", "target"), fn)
    if input.shape == target.shape and input.numel() and target.is_floating_point():
        # The loss and its gradients in one forward (kernels/soft_margin.py).
        native = eager_native(input, target)
        if native is not None:
            want = torch.is_grad_enabled() and input.requires_grad
            if not target.requires_grad or not torch.is_grad_enabled():
                made = native.soft_margin_eager(
                    input, target, reduction, want,
                    (fused_soft_margin.node_name, fn, lambda x: _soft_margin(x, target, reduction)),
                )
                if made is not None:
                    return made
        if fused_may_serve(input, target):
            return fused_soft_margin(input, target, options=soft_margin_options(reduction),
                                     replay=Replay(fn, lambda x, y: _soft_margin(x, y, reduction), [input, target]))
    return _soft_margin(input, target, reduction)


def _soft_margin(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """The composed form of soft_margin_loss (validated inputs): the reference of the fused one."""
    # torch's kernel writes into a tensor like the input: the input's dtype, whatever the target's.
    compute, out = result_dtypes(input, target, result=(input,))
    return reduce_loss(F.softplus(-target.to(compute) * input.to(compute)), reduction).to(out)


@fill_doc(legacy_args=LEGACY_ARGS)
def multilabel_soft_margin_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Multi-label one-versus-all logistic loss, averaged over the C classes of each sample.

    .. math::
        \ell_n = -\frac{1}{C} \sum_c w_c \left[y_{nc} \log \sigma(x_{nc}) + (1 - y_{nc}) \log \sigma(-x_{nc})\right]

    Args:
        input: scores, ``[N, C]`` (or ``[C]``).
        target: 0/1 labels (or soft labels), same shape.
        weight: per-class rescaling, broadcastable to ``input``.
        {legacy_args}
        reduction: ``'mean'``, ``'sum'`` or ``'none'`` (one value per sample).

    Returns:
        A scalar, or ``[N]`` for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import multilabel_soft_margin_loss
        >>> multilabel_soft_margin_loss(torch.zeros(1, 3), torch.tensor([[1.0, 0.0, 1.0]]))  # ln 2
        tensor(0.6931)

    References:
        torch.nn.MultiLabelSoftMarginLoss (torch 2.13).
    """
    fn = "multilabel_soft_margin_loss"
    reduction = resolve_reduction(size_average, reduce, reduction)
    check_floating(input, "input", fn)
    shape = broadcast_shape(input, target, ("input", "target"), fn)
    if (input.dim() == 2 and input.shape == target.shape and input.numel() and target.is_floating_point()
            and (weight is None or not weight.requires_grad and _trailing_broadcast(weight.shape, shape))):
        # The loss and its gradients in one forward (kernels/soft_margin.py).
        native = eager_native(input, target, weight)
        if native is not None:
            want = torch.is_grad_enabled() and input.requires_grad
            if not target.requires_grad or not torch.is_grad_enabled():
                made = native.multilabel_soft_margin_eager(
                    input, target, weight, reduction, want,
                    (fused_multilabel_soft_margin.node_name, fn,
                     lambda x: _multilabel_soft_margin(x, target, weight, reduction, fn)),
                )
                if made is not None:
                    return made
        if fused_may_serve(input, target) and (weight is None or fused_may_serve(weight)):
            return fused_multilabel_soft_margin(
                input, target, weight, options=soft_margin_options(reduction),
                replay=Replay(fn, lambda x, y: _multilabel_soft_margin(x, y, weight, reduction, fn), [input, target]),
            )
    return _multilabel_soft_margin(input, target, weight, reduction, fn)


def _multilabel_soft_margin(input: Tensor, target: Tensor, weight: Tensor | None, reduction: str, fn: str) -> Tensor:
    """The composed form of multilabel_soft_margin_loss (validated input and target): the
    reference of the fused one."""
    compute, out = result_dtypes(input, target, weight)
    x, y = input.to(compute), target.to(compute)
    loss = -(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x))
    if weight is not None:
        broadcast_shape(loss, weight, ("input", "weight"), fn)
        loss = loss * weight.to(compute)
    loss = loss.sum(dim=-1) / input.shape[-1]
    return reduce_loss(loss, reduction).to(out)


@fill_doc(legacy_args=LEGACY_ARGS)
def multilabel_margin_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Multi-class multi-label hinge loss.

    .. math::
        \ell_n = \frac{1}{C} \sum_{j \in J_n} \sum_{i \notin J_n} \max(0, 1 - (x_{n, j} - x_{n, i}))

    where :math:`J_n` are the target classes of sample n: the entries of ``target[n]`` up to
    its first -1 (everything after it is ignored, as in torch).

    Args:
        input: scores, ``[C]`` or ``[N, C]``.
        target: class indices padded with -1, same shape as ``input``.
        {legacy_args}
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the per-sample loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import multilabel_margin_loss
        >>> x = torch.tensor([[0.1, 0.2, 0.4, 0.8]])
        >>> multilabel_margin_loss(x, torch.tensor([[3, 0, -1, 1]]))  # torch's documented example
        tensor(0.8500)

    References:
        torch.nn.MultiLabelMarginLoss (torch 2.13).
    """
    fn = "multilabel_margin_loss"
    reduction = resolve_reduction(size_average, reduce, reduction)
    check_floating(input, "input", fn)
    scalar = input.dim() == 0 and target.numel() == 1  # as torch: one class, a loss of shape ()
    if scalar:
        input, target = input.reshape(1), target.reshape(1)
    _class_rows(input, target, fn, target_like_input=True)
    num_classes = input.shape[-1]
    native = None if scalar else _native_for(input, target)
    # Targets count up to the first -1 of each row.
    in_range = _check_classes(target, lambda: (target == -1).cumsum(dim=-1) == 0, num_classes, fn, lowest=-1,
                              native=native)
    if native is not None and in_range:
        caller = target
        made = native.multilabel_margin(input, target, reduction, torch.is_grad_enabled() and input.requires_grad)
        if made is not None:
            return _attach(native, fn, "FusedMultilabelMarginLossBackward", made, input, reduction == "none",
                           lambda x: multilabel_margin_loss(x, caller, reduction=reduction))
    counted = (target == -1).cumsum(dim=-1) == 0
    compute, out = result_dtypes(input)
    unbatched = input.dim() == 1
    x, target, counted = (t.unsqueeze(0) for t in (input.to(compute), target, counted)) if unbatched else (
        input.to(compute), target, counted)
    loss = _MultilabelMargin.apply(x, target.masked_fill(~counted, 0).long(), counted, reduction)
    return (loss.squeeze(0) if unbatched and reduction == "none" else loss).to(out)


# Up to this many classes every (target, class) pair is formed, [N, C, C]: a few ops in all,
# where sorting each row takes some forty (each a fixed cost that dominates at small C).
# Beyond it, the sorted form keeps memory O(N C).
PAIRWISE_CLASSES = 32


def _trailing_broadcast(small: torch.Size, shape: tuple[int, ...]) -> bool:
    """Whether a tensor of shape ``small`` broadcasts to ``shape`` without enlarging it."""
    return len(small) <= len(shape) and all(s in (1, n) for s, n in zip(reversed(small), reversed(shape)))


def _multilabel_margin_pairs(
    x: Tensor, safe: Tensor, counted: Tensor, scale: float, per_row: bool
) -> tuple[Tensor, Tensor]:
    """(per-row loss, or with ``per_row`` False their sum, d(loss)/dx), both times ``scale``,
    of multilabel_margin_loss from every pair, for small C.

    z[n, j, i] = (1 - x_j) + x_i, torch's arithmetic, counts where z > 0, j is listed (as
    often as it is listed) and i is not a target; ties, nan and unlisted pairs count for
    nothing, as in torch (see _multilabel_margin_rows). Selected with where, never by
    multiplying with 0, so that an inf or nan outside the counted pairs stays outside.
    """
    listed = torch.zeros_like(x).scatter_add_(1, safe, counted.to(x.dtype))  # how often each class is listed
    z = (1 - x).unsqueeze(2) + x.unsqueeze(1)
    count = (z > 0) & (listed > 0).unsqueeze(2) & (listed == 0).unsqueeze(1)
    times = torch.where(count, listed.unsqueeze(2), 0.0)  # how often pair (j, i) counts
    # The gradient from integer counts (exact in any order of summation), scaled once: the
    # same numbers as the rows form and the compiled loop (losskit._native margin.cpp).
    grad = (times.sum(1) - times.sum(2)).mul_(scale)
    terms = torch.where(count, z * times.mul_(scale), 0.0)
    return terms.sum((1, 2)) if per_row else terms.sum(), grad


def _multilabel_margin_rows(
    x: Tensor, safe: Tensor, counted: Tensor, scale: float, per_row: bool = True
) -> tuple[Tensor, Tensor]:
    """(per-row loss, d(loss)/dx), both times ``scale``, of multilabel_margin_loss, in O(N C)
    memory.

    For a listed target value a and the non-target values v of its row, torch counts the
    term z = (1 - a) + v where z > 0, i.e. where v > fl(a - 1) exactly (a rounded sum is 0
    only where the exact one is). With the row sorted in descending order, those v are a
    prefix: one searchsorted finds it, and prefix sums give the term count k(a) and the sum
    of those v, so the listed target's share is k(a) (1 - a) + sum v, and its gradient -k(a).
    A non-target v gets +1 for every listed target whose fl(a - 1) < v, counted from the
    same sorted row. Ties (z exactly 0) count for neither, as in torch; a listed target
    that appears twice counts twice, as in torch; a nan makes its terms nan, which torch
    skips (nan > 0 is false), so they are skipped here too. The prefix sums run in float64
    (where the device has it), so the per-term rounding torch does is the only one left.
    """
    rows, classes = x.shape
    acc = torch.float64 if x.dtype in (torch.float32, torch.float64) and x.device.type != "mps" else x.dtype
    is_target = torch.zeros_like(safe).scatter_add_(1, safe, counted.long()) > 0
    nan = torch.isnan(x)
    valid = ~(is_target | nan)  # the non-target values that form terms
    # Descending order as the ascending order of -x; nan at the end of the descending row.
    neg_key = torch.where(nan, -float("inf"), -x)
    neg_sorted, order = neg_key.sort(dim=1)
    valid_sorted = valid.gather(1, order)
    zero = counted.new_zeros(rows, 1, dtype=torch.long)
    count_prefix = torch.cat([zero, valid_sorted.long().cumsum(1)], 1)
    value_prefix = torch.cat([zero.to(acc), torch.where(valid_sorted, -neg_sorted, 0.0).to(acc).cumsum(1)], 1)

    picked = x.gather(1, safe)  # a, per listed position
    live = counted & ~torch.isnan(picked)
    # v > fl(a - 1)  <=>  -v < -fl(a - 1): the first `reach` entries of the descending row.
    query = torch.where(live, -(picked - 1), -float("inf"))
    reach = torch.searchsorted(neg_sorted, query, side="left")
    terms = count_prefix.gather(1, reach)
    share = terms.to(acc) * (1 - picked).to(acc) + value_prefix.gather(1, reach)
    loss = torch.where(live & (terms > 0), share, 0.0).sum(1).to(x.dtype) * scale

    # Gradient: -k(a) at each listed target; at a non-target v the number of listed targets
    # with fl(a - 1) < v, i.e. all of them but those with fl(1 - a) <= -v (fl(1 - a) runs
    # up the sorted row as -fl(a - 1)).
    grad = torch.zeros_like(x).scatter_add_(1, safe, torch.where(live, -terms, 0).to(x.dtype))
    multiplicity = torch.zeros_like(safe).scatter_add_(1, safe, live.long())
    listed_prefix = torch.cat([zero, multiplicity.gather(1, order).cumsum(1)], 1)
    below = torch.searchsorted(1 + neg_sorted, neg_key, side="right")
    above = listed_prefix[:, -1:] - listed_prefix.gather(1, below)
    grad = grad + torch.where(valid, above, 0).to(x.dtype)
    return loss, grad * scale


def _row_scale(rows: int, classes: int, reduction: str) -> float:
    """1 / C, and for 'mean' also 1 / N (folded into the loss terms and the gradient, so
    that the mean costs no op); nan for no classes (0 / 0, as the division would give)."""
    if not classes:
        return float("nan")
    return 1.0 / (classes * rows) if reduction == "mean" and rows else 1.0 / classes


def _reduced(loss: Tensor, reduction: str) -> Tensor:
    """Per-row losses already scaled by _row_scale, reduced: an empty 'mean' stays 0 / 0."""
    if reduction == "none":
        return loss
    return reduce_loss(loss, "sum") if reduction == "sum" or loss.numel() else reduce_loss(loss, "mean")


class _MultilabelMargin(torch.autograd.Function):
    """Multilabel margin loss, reduced; its gradient, formed in forward, is scaled by
    grad_output in backward. Differentiable once, as torch's."""

    @staticmethod
    def forward(ctx, x, safe, counted, reduction):  # type: ignore[override]
        rows = _multilabel_margin_pairs if x.shape[1] <= PAIRWISE_CLASSES else _multilabel_margin_rows
        # An empty batch keeps its per-row losses: their 'mean' is 0 / 0, as torch's.
        loss, grad = rows(x, safe, counted, _row_scale(*x.shape, reduction), reduction == "none" or not x.shape[0])
        ctx.save_for_backward(grad)
        ctx.per_row = reduction == "none"
        return _reduced(loss, reduction) if loss.dim() else loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * (grad_output.unsqueeze(1) if ctx.per_row else grad_output), None, None, None


@fill_doc(legacy_args=LEGACY_ARGS)
def multi_margin_loss(
    input: Tensor,
    target: Tensor,
    p: int = 1,
    margin: float = 1.0,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Multi-class hinge loss (one target class per sample).

    .. math::
        \ell_n = \frac{1}{C} \sum_{i \ne y_n} w_{y_n} \max(0, \text{margin} - x_{n, y_n} + x_{n, i})^p

    Args:
        input: scores, ``[C]`` or ``[N, C]``.
        target: class indices, ``[]`` or ``[N]``.
        p: 1 or 2.
        margin: the margin.
        weight: per-class rescaling ``[C]``, applied by the target class.
        {legacy_args}
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the per-sample loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import multi_margin_loss
        >>> x = torch.tensor([[0.1, 0.2, 0.4, 0.8]])
        >>> multi_margin_loss(x, torch.tensor([3]))  # torch's documented example
        tensor(0.3250)

    References:
        torch.nn.MultiMarginLoss (torch 2.13).
    """
    fn = "multi_margin_loss"
    if (size_average is None and reduce is None and type(p) is int and _plain_numbers(margin)
            and type(reduction) is str):
        # The everyday eager CPU call, checked and computed in one call into compiled code
        # (it declines anything unusual, which the checks below then see).
        native = eager_native(input, target, weight)
        if native is not None:
            made = native.multi_margin_eager(
                input, target, weight, p, margin, reduction, torch.is_grad_enabled() and input.requires_grad,
                ("FusedMultiMarginLossBackward", fn,
                 lambda x: multi_margin_loss(x, target, p, margin, weight, reduction=reduction)),
            )
            if made is not None:
                return made[0]
    reduction = resolve_reduction(size_average, reduce, reduction)
    if p not in (1, 2):
        raise ValueError(f"{fn}: p must be 1 or 2; got {p}")
    check_floating(input, "input", fn)
    caller = target
    native = _native_for(input, target, weight) if input.dim() else None
    if input.dim() == 0:  # as torch: one score, one class
        input = input.reshape(1)
    # As torch, a (C,) input takes a target of shape () or (1,), and 'none' keeps its shape.
    target_shape = tuple(target.shape)
    if input.dim() == 1 and target_shape == (1,):
        target = target.reshape(())
    _class_rows(input, target, fn, target_like_input=False)
    num_classes = input.shape[-1]
    in_range = _check_classes(target, lambda: True, num_classes, fn, lowest=0, native=native)
    if weight is not None:
        check_class_weight(weight, num_classes, fn)
    if native is not None and in_range:
        made = native.multi_margin(input, target, weight, p, margin, reduction, target_shape,
                                   torch.is_grad_enabled() and input.requires_grad)
        if made is not None:
            return _attach(native, fn, "FusedMultiMarginLossBackward", made, input, reduction == "none",
                           lambda x: multi_margin_loss(x, caller, p, margin, weight, reduction=reduction))
    compute, out = result_dtypes(input)
    x = input if input.dtype == compute else input.to(compute)
    rows = x.unsqueeze(0) if x.dim() == 1 else x
    index = target.long().reshape(-1, 1)
    row_weight = None if weight is None else weight.to(compute)[index]
    loss = _MultiMargin.apply(rows, index, row_weight, p, margin, reduction)
    loss = loss.reshape(target_shape) if reduction == "none" else loss
    return loss if loss.dtype == out else loss.to(out)


class _MultiMargin(torch.autograd.Function):
    """Multi-class hinge loss, reduced, and its gradient, formed together in forward (torch's
    arithmetic: z = (margin - x_y) + x_i, counted where z > 0, the target class skipped; 1 / C,
    the class weight and the 'mean' divisor folded into both); backward scales the stored
    gradient by grad_output. Differentiable once, as torch's."""

    @staticmethod
    def forward(ctx, x, index, row_weight, p, margin, reduction):  # type: ignore[override]
        scale = _row_scale(*x.shape, reduction)
        if row_weight is not None:
            scale = row_weight * scale
        hinge = torch.add(x, margin - x.gather(1, index)).clamp_min_(0).scatter_(1, index, 0.0)
        if p == 1:  # the target's gradient is minus the count of terms (exact), scaled once
            grad = (hinge > 0).to(x.dtype)
            grad.scatter_(1, index, grad.sum(1, keepdim=True).neg_()).mul_(scale)
        else:
            grad = hinge * (2 * scale)
            grad.scatter_(1, index, grad.sum(1, keepdim=True).neg_())
            hinge.square_()
        ctx.save_for_backward(grad)
        ctx.per_row = reduction == "none"
        if row_weight is None:  # the scale is one number: sum first
            loss = hinge.sum(1) * scale if reduction == "none" or not x.shape[0] else hinge.sum() * scale
        else:
            loss = (hinge.sum(1, keepdim=True) * scale).squeeze(1)
        return _reduced(loss, reduction) if loss.dim() else loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * (grad_output.unsqueeze(1) if ctx.per_row else grad_output), None, None, None, None, None


@fill_doc(legacy_args=LEGACY_ARGS)
def margin_ranking_loss(
    input1: Tensor,
    input2: Tensor,
    target: Tensor,
    margin: float = 0,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Ranking hinge: :math:`\max(0, -y (x_1 - x_2) + \text{margin})`, y = 1 when x1 should rank higher.

    Args:
        input1: scores, any shape ``[...]``.
        input2: scores, same number of dimensions (broadcastable).
        target: +1 / -1, same number of dimensions (broadcastable).
        margin: the margin.
        {legacy_args}
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the element-wise loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import margin_ranking_loss
        >>> margin_ranking_loss(torch.tensor([1.0, 0.2]), torch.tensor([0.5, 0.9]), torch.tensor([1.0, 1.0]))
        tensor(0.3500)

    References:
        torch.nn.MarginRankingLoss (torch 2.13).
    """
    fn = "margin_ranking_loss"
    reduction = resolve_reduction(size_average, reduce, reduction)
    _same_ndim(fn, input1=input1, input2=input2, target=target)
    check_floating(input1, "input1", fn)
    if input1.shape != input2.shape:  # equal shapes broadcast; torch.broadcast_shapes costs tens of us
        broadcast_shape(input1, input2, ("input1", "input2"), fn)
    elif input1.shape == target.shape and _plain_numbers(margin):
        if fused_elements_apply((input1, input2, target)):  # loss and gradients in one forward
            return fused_ranking_call(
                input1, input2, target, element_options(margin, reduction),
                Replay(fn, lambda a, b, y: _margin_ranking(a, b, y, margin, reduction), [input1, input2, target]),
            )
        native = _composed_native(input1, input2, target)
        if native is not None:
            return native.margin_ranking(input1, input2, target, margin, reduction)
    return _margin_ranking(input1, input2, target, margin, reduction)


def _margin_ranking(input1: Tensor, input2: Tensor, target: Tensor, margin, reduction: str) -> Tensor:
    """The composed form of margin_ranking_loss (validated inputs): the reference of the fused one."""
    compute, out = result_dtypes(input1, input2, target)
    # (x2 - x1) y is -y (x1 - x2) exactly (a difference changes sign exactly), one op fewer.
    loss = ((input2.to(compute) - input1.to(compute)) * target.to(compute) + margin).clamp_min(0)
    return reduce_loss(loss, reduction).to(out)


@fill_doc(legacy_args=LEGACY_ARGS)
def hinge_embedding_loss(
    input: Tensor,
    target: Tensor,
    margin: float = 1.0,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Hinge embedding loss on distances: :math:`x` where y = 1, :math:`\max(0, \text{margin} - x)`
    where y = -1.

    As in torch, a target that is neither 1 nor -1 gets both terms:
    :math:`x + \max(0, \text{margin} - x)`.

    Args:
        input: distances (or any scores), any shape ``[...]``.
        target: +1 / -1, broadcastable to ``input``.
        margin: the margin.
        {legacy_args}
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the element-wise loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import hinge_embedding_loss
        >>> hinge_embedding_loss(torch.tensor([0.3, 0.4]), torch.tensor([1.0, -1.0]))  # (0.3 + 0.6) / 2
        tensor(0.4500)

    References:
        torch.nn.HingeEmbeddingLoss (torch 2.13).
    """
    fn = "hinge_embedding_loss"
    reduction = resolve_reduction(size_average, reduce, reduction)
    check_floating(input, "input", fn)
    broadcast_shape(input, target, ("input", "target"), fn)
    if _plain_numbers(margin):
        if fused_elements_apply((input,), (target,)):  # loss and gradient in one forward
            return fused_hinge_embedding_call(input, target, element_options(margin, reduction),
                                    Replay(fn, lambda x: _hinge_embedding(x, target, margin, reduction), [input]))
        native = _composed_native(input, target)
        if native is not None:
            return native.hinge_embedding(input, target, margin, reduction)
    return _hinge_embedding(input, target, margin, reduction)


def _hinge_embedding(input: Tensor, target: Tensor, margin, reduction: str) -> Tensor:
    """The composed form of hinge_embedding_loss (validated inputs): the reference of the fused one."""
    compute, out = result_dtypes(input)
    x = input.to(compute)
    margin_term = torch.where(target != 1, (margin - x).clamp_min(0), 0.0)
    self_term = torch.where(target != -1, x, 0.0)
    return reduce_loss(margin_term + self_term, reduction).to(out)


@fill_doc(legacy_args=LEGACY_ARGS)
def cosine_embedding_loss(
    input1: Tensor,
    input2: Tensor,
    target: Tensor,
    margin: float = 0,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Cosine embedding loss: :math:`1 - \cos(x_1, x_2)` where y = 1,
    :math:`\max(0, \cos(x_1, x_2) - \text{margin})` where y = -1, 0 otherwise.

    The cosine is :math:`\frac{x_1 \cdot x_2}{\sqrt{(\|x_1\|^2 + \epsilon)(\|x_2\|^2 + \epsilon)}}`
    with torch's :math:`\epsilon = 10^{-12}`, so zero vectors give a cosine of 0, not nan.

    Args:
        input1: embeddings, ``[N, D]`` or ``[D]``.
        input2: embeddings, same shape.
        target: +1 / -1, ``[N]`` or ``[]``.
        margin: in [-1, 1]; 0 to 0.5 is typical.
        {legacy_args}
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the per-pair loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import cosine_embedding_loss
        >>> a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
        >>> cosine_embedding_loss(a, b, torch.tensor([1.0]))  # 1 - cos(45 degrees)
        tensor(0.2929)

    References:
        torch.nn.CosineEmbeddingLoss (torch 2.13).
    """
    fn = "cosine_embedding_loss"
    reduction = resolve_reduction(size_average, reduce, reduction)
    check_floating(input1, "input1", fn)
    if input1.shape != input2.shape or input1.dim() not in (1, 2) or tuple(target.shape) != tuple(input1.shape[:-1]):
        raise ValueError(
            f"{fn}: expected input1 and input2 of one shape, (N, D) or (D,), and target (N,) or (); got input1 "
            f"{tuple(input1.shape)}, input2 {tuple(input2.shape)}, target {tuple(target.shape)}"
        )
    if _plain_numbers(margin):
        if fused_embedding_applies(input1, input2):  # loss and gradients in one forward (kernels/embedding.py)
            return fused_cosine_call(
                input1, input2, target, cosine_options(margin, reduction),
                Replay(fn, lambda a, b: _cosine_embedding(a, b, target, margin, reduction), [input1, input2]),
            )
        native = _composed_native(input1, input2, target)
        if native is not None:
            return native.cosine_embedding(input1, input2, target, margin, reduction)
    return _cosine_embedding(input1, input2, target, margin, reduction)


def _cosine_embedding(input1: Tensor, input2: Tensor, target: Tensor, margin, reduction: str) -> Tensor:
    """The composed form of cosine_embedding_loss (validated inputs): the reference of the fused one."""
    compute, out = result_dtypes(input1, input2)
    a, b = input1.to(compute), input2.to(compute)
    epsilon = 1e-12
    cos = (a * b).sum(-1) / ((a * a).sum(-1) + epsilon).mul((b * b).sum(-1) + epsilon).sqrt()
    loss = torch.where(target == 1, 1 - cos, 0.0) + torch.where(target == -1, (cos - margin).clamp_min(0), 0.0)
    return reduce_loss(loss, reduction).to(out)


def pairwise_distance(x1: Tensor, x2: Tensor, p: float = 2.0, eps: float = 1e-6, keepdim: bool = False) -> Tensor:
    r""":math:`\|x_1 - x_2 + \epsilon\|_p` over the last dimension, as ``torch.pairwise_distance``.

    The :math:`\epsilon` keeps the norm's gradient finite when the two vectors coincide.

    Example:
        >>> import torch
        >>> from losskit.functional import pairwise_distance
        >>> pairwise_distance(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]), eps=0.0)
        tensor([5.])
    """
    return torch.linalg.vector_norm(x1 - x2 + eps, ord=p, dim=-1, keepdim=keepdim)


def _triplet_checks(fn: str, anchor: Tensor, positive: Tensor, negative: Tensor, margin: float) -> None:
    if not margin > 0:  # as torch: with margin <= 0 the loss can never ask for a gap
        raise ValueError(f"{fn}: margin must be > 0; got {margin}")
    _same_ndim(fn, anchor=anchor, positive=positive, negative=negative)


def _triplet(
    fn: str,
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    distance: Callable[[Tensor, Tensor], Tensor],
    margin: float,
    swap: bool,
    reduction: str,
) -> Tensor:
    """max(d(a, p) - d(a, n) + margin, 0); with swap, d(a, n) becomes min(d(a, n), d(p, n))."""
    _triplet_checks(fn, anchor, positive, negative, margin)
    dist_pos = distance(anchor, positive)
    dist_neg = distance(anchor, negative)
    if swap:
        dist_neg = torch.minimum(dist_neg, distance(positive, negative))
    return reduce_loss((margin + dist_pos - dist_neg).clamp_min(0), reduction)


@fill_doc(legacy_args=LEGACY_ARGS)
def triplet_margin_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    margin: float = 1.0,
    p: float = 2,
    eps: float = 1e-6,
    swap: bool = False,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Triplet loss :math:`\max(d(a, p) - d(a, n) + \text{margin}, 0)` with the p-norm distance.

    Args:
        anchor: embeddings, ``[N, D]`` or ``[D]``.
        positive: same shape.
        negative: same shape.
        margin: the margin.
        p: the norm's degree.
        eps: added to the difference, as in torch's pairwise_distance.
        swap: use the harder of d(a, n) and d(p, n) (Balntas et al., 2016).
        {legacy_args}
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the per-triplet loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import triplet_margin_loss
        >>> a, pos, neg = torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]])
        >>> triplet_margin_loss(a, pos, neg, eps=0.0)  # 5 - 1 + 1
        tensor(5.)

    References:
        torch.nn.TripletMarginLoss (torch 2.13); Balntas et al., "Learning local feature
        descriptors with triplets and shallow convolutional neural networks", 2016.
    """
    fn = "triplet_margin_loss"
    reduction = resolve_reduction(size_average, reduce, reduction)
    check_floating(anchor, "anchor", fn)
    if anchor.shape == positive.shape == negative.shape and _plain_numbers(margin, p, eps) and isinstance(swap, bool):
        if triplet_p_served(p) and fused_embedding_applies(anchor, positive, negative):
            return _fused_triplet(fn, anchor, positive, negative, margin, p, eps, swap, reduction)
        native = _composed_native(anchor, positive, negative)
        if native is not None:
            _triplet_checks(fn, anchor, positive, negative, margin)
            return native.triplet_margin(anchor, positive, negative, margin, p, eps, swap, reduction)
    return _triplet_promoted(fn, anchor, positive, negative, margin, p, eps, swap, reduction)


def _triplet_promoted(fn: str, anchor: Tensor, positive: Tensor, negative: Tensor, margin, p, eps, swap,
                      reduction: str) -> Tensor:
    """The composed form of triplet_margin_loss: computed in result_dtypes' type, rounded once."""
    compute, out = result_dtypes(anchor, positive, negative)
    a, pos, neg = (t.to(compute) for t in (anchor, positive, negative))
    return _triplet(fn, a, pos, neg, lambda u, v: pairwise_distance(u, v, p, eps), margin, swap, reduction).to(out)


def _fused_triplet(fn: str, anchor: Tensor, positive: Tensor, negative: Tensor, margin: float, p: float, eps: float,
                   swap: bool, reduction: str) -> Tensor:
    """The fused triplet loss (kernels/embedding.py), whose create_graph and second backward
    replay the composed form."""
    _triplet_checks(fn, anchor, positive, negative, margin)

    def reference(a, b, c):
        return _triplet_promoted(fn, a, b, c, margin, p, eps, swap, reduction)

    return fused_triplet_call(anchor, positive, negative, triplet_options(margin, p, eps, swap, reduction),
                              Replay(fn, reference, [anchor, positive, negative]))


def triplet_margin_with_distance_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    *,
    distance_function: Callable[[Tensor, Tensor], Tensor] | None = None,
    margin: float = 1.0,
    swap: bool = False,
    reduction: str = "mean",
) -> Tensor:
    r"""Triplet loss with any distance function (default :func:`pairwise_distance`).

    Args:
        anchor: inputs of the distance function, e.g. ``[N, D]``.
        positive: same.
        negative: same.
        distance_function: non-negative, real-valued function of two tensors. The default,
            :func:`pairwise_distance`, computes as :func:`triplet_margin_loss` does (half
            types in float32, the loss and gradients rounded once).
        margin: > 0.
        swap: use the harder of d(a, n) and d(p, n).
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the per-triplet loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import triplet_margin_with_distance_loss
        >>> l1 = lambda x, y: (x - y).abs().sum(-1)
        >>> a, pos, neg = torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]])
        >>> triplet_margin_with_distance_loss(a, pos, neg, distance_function=l1)  # 7 - 1 + 1
        tensor(7.)

    References:
        torch.nn.TripletMarginWithDistanceLoss (torch 2.13).
    """
    fn = "triplet_margin_with_distance_loss"
    reduction = resolve_reduction(None, None, reduction)
    if distance_function is None and all(isinstance(t, Tensor) for t in (anchor, positive, negative)):
        # The default distance, pairwise_distance(u, v) (p = 2, eps = 1e-6): triplet_margin_loss's
        # computation, a half type in float32 rounded once on every path (eager, no_grad, compiled).
        if anchor.shape == positive.shape == negative.shape and _plain_numbers(margin) and isinstance(swap, bool):
            if fused_embedding_applies(anchor, positive, negative):
                return _fused_triplet(fn, anchor, positive, negative, margin, 2.0, 1e-6, swap, reduction)
            native = _composed_native(anchor, positive, negative)
            if native is not None:
                _triplet_checks(fn, anchor, positive, negative, margin)
                return native.triplet_margin(anchor, positive, negative, margin, 2.0, 1e-6, swap, reduction)
        return _triplet_promoted(fn, anchor, positive, negative, margin, 2.0, 1e-6, swap, reduction)
    return _triplet(fn, anchor, positive, negative, distance_function or pairwise_distance, margin, swap, reduction)
