"""Classification losses beyond torch: focal losses and poly-1 cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._core.ops import log_softmax
from .._core.dtypes import cast, result_dtypes
from .._core.reduction import reduce_loss, resolve_reduction
from .._core.validation import ClassTargets, check_class_weight, check_floating, check_same_shape, class_dim_of
from ..kernels import Replay
from ..kernels.likelihood import elementwise_options, fused_elementwise_applies, fused_elementwise_call
from ..kernels.target_probability import fused_target_prob_applies, fused_target_prob_call, target_prob_options
from .classification import check_index_targets

__all__ = ["poly1_cross_entropy", "sigmoid_focal_loss", "softmax_focal_loss"]


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    r"""Binary focal loss on logits, with torchvision's semantics and defaults.

    .. math::
        \ell = \alpha_t (1 - p_t)^\gamma \operatorname{BCE}(x, y), \quad
        p_t = p y + (1 - p)(1 - y), \quad \alpha_t = \alpha y + (1 - \alpha)(1 - y)

    with :math:`p = \sigma(x)`; ``alpha=-1`` turns the class balancing off.

    Args:
        inputs: logits, any shape ``[...]``.
        targets: binary (or soft) labels, same shape.
        alpha: weight of the positive class in [0, 1], or -1 for none (as torchvision).
        gamma: focusing exponent >= 0; 0 gives (alpha-balanced) BCE.
        reduction: ``'none'`` (torchvision's default), ``'mean'`` or ``'sum'``.

    Returns:
        The element-wise loss, or its mean or sum.

    Example:
        >>> import torch
        >>> from losskit.functional import sigmoid_focal_loss
        >>> sigmoid_focal_loss(torch.tensor([0.0]), torch.tensor([1.0]))  # 0.25 * 0.5^2 * ln 2
        tensor([0.0433])

    References:
        Lin et al., "Focal Loss for Dense Object Detection", 2017;
        torchvision.ops.sigmoid_focal_loss.
    """
    fn = "sigmoid_focal_loss"
    reduction = resolve_reduction(None, None, reduction)
    check_floating(inputs, "inputs", fn)
    check_same_shape(inputs, targets, fn)
    if gamma < 0:
        raise ValueError(f"{fn}: gamma must be >= 0; got {gamma}")
    if not (0 <= alpha <= 1 or alpha == -1):
        raise ValueError(f"{fn}: alpha must lie in [0, 1], or be -1 for no class balancing; got {alpha}")
    # Eager calls that want the logits' gradient: the loss by the ops below and its gradient
    # written out beside it (kernels/likelihood.py). 0 < gamma < 1 (where the focusing term's
    # gradient needs _focusing's guard) and a gradient for the targets stay with autograd.
    if (gamma == 0 or gamma >= 1) and not targets.requires_grad and fused_elementwise_applies(inputs, targets):
        return fused_elementwise_call(
            inputs, targets, None, elementwise_options("sigmoid_focal", reduction, float(alpha), float(gamma), False, False),
            Replay(fn, lambda a, b: _sigmoid_focal(a, b, alpha, gamma, reduction), [inputs, targets]),
        )
    return _sigmoid_focal(inputs, targets, alpha, gamma, reduction)


def _sigmoid_focal(inputs: Tensor, targets: Tensor, alpha: float, gamma: float, reduction: str) -> Tensor:
    """sigmoid_focal_loss's composed form, which autograd differentiates (the fused path's oracle)."""
    compute, out = result_dtypes(inputs, targets)
    x, y = inputs.to(compute), targets.to(compute)
    p = torch.sigmoid(x)
    bce = (1 - y) * x - F.logsigmoid(x)  # binary_cross_entropy_with_logits, element-wise
    p_t = p * y + (1 - p) * (1 - y)
    loss = bce * _focusing(1 - p_t, gamma)
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return reduce_loss(loss, reduction).to(out)


def _focusing(q: Tensor, gamma: float) -> Tensor:
    """(1 - p)^gamma of q = 1 - p, with a gradient of 0, not nan, where q is 0.

    For 0 < gamma < 1 the power's derivative is infinite at q = 0 (a confident, right
    prediction), and times the loss's 0 there it would be nan; the loss itself vanishes
    faster than q, so its true gradient there is 0. q = 0 takes a constant instead.
    """
    if gamma >= 1:  # the derivative gamma q^(gamma - 1) is finite at q = 0: the plain power
        return q**gamma
    positive = q > 0
    return torch.where(positive, torch.where(positive, q, 1.0) ** gamma, float(gamma == 0))


def _index_targets(input: Tensor, target: Tensor, ignore_index: int, fn: str) -> tuple[ClassTargets, int]:
    """(the validated class-index targets, the class dim)."""
    class_dim = class_dim_of(input, fn)
    check_floating(input, "input", fn)
    return check_index_targets(input, target, class_dim, ignore_index, fn), class_dim


def _target_log_probs(input: Tensor, targets: ClassTargets, class_dim: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """(log p_y, valid mask or None where every target counts, safe target) for class-index
    targets."""
    compute, _ = result_dtypes(input)
    safe = targets.safe()
    log_p = log_softmax(cast(input, compute), class_dim).gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)
    return log_p, targets.valid_or_none, safe


def _mean_over_valid(loss: Tensor, valid: Tensor | None, reduction: str) -> Tensor:
    """'mean' over the targets that are not ignored (nan when none is), as cross_entropy;
    ``valid`` None: every target counts."""
    if valid is None:
        return reduce_loss(loss, reduction)
    return reduce_loss(torch.where(valid, loss, 0.0), reduction, valid.sum())


def softmax_focal_loss(
    input: Tensor,
    target: Tensor,
    alpha: Tensor | float | None = None,
    gamma: float = 2.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    r"""Multi-class focal loss on logits: cross-entropy down-weighted on easy examples.

    .. math::
        \ell_i = -\alpha_{y_i} (1 - p_{i, y_i})^\gamma \log p_{i, y_i}, \quad p = \operatorname{softmax}(x)

    Args:
        input: logits, ``[C]``, ``[N, C]`` or ``[N, C, d1, ...]``.
        target: class indices, ``input``'s shape without the class dimension.
        alpha: per-class weights ``[C]``, one weight for every class, or None.
        gamma: focusing exponent >= 0; 0 gives (weighted) cross-entropy.
        ignore_index: target value that contributes nothing.
        reduction: ``'mean'`` (over the targets not ignored), ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the per-position loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import softmax_focal_loss
        >>> logits = torch.tensor([[0.0, 0.0]])  # p_y = 1/2
        >>> softmax_focal_loss(logits, torch.tensor([0]))  # 0.5^2 * ln 2
        tensor(0.1733)

    References:
        Lin et al., "Focal Loss for Dense Object Detection", 2017.
    """
    fn = "softmax_focal_loss"
    reduction = resolve_reduction(None, None, reduction)
    if gamma < 0:
        raise ValueError(f"{fn}: gamma must be >= 0; got {gamma}")
    targets, class_dim = _index_targets(input, target, ignore_index, fn)
    if isinstance(alpha, Tensor):
        check_class_weight(alpha, input.shape[class_dim], fn)
    # Eager [N, C] logits that want a gradient: the loss by the ops below and its gradient
    # written out beside it, in one pass over the logits (kernels/target_probability.py).
    if (gamma == 0 or gamma >= 1) and fused_target_prob_applies(input) and not (
        isinstance(alpha, Tensor) and alpha.requires_grad
    ):
        weight = alpha if isinstance(alpha, Tensor) else None
        scalar = 1.0 if alpha is None or weight is not None else float(alpha)
        return fused_target_prob_call(
            input, targets.safe(), targets.valid_or_none, weight,
            target_prob_options("focal", reduction, float(gamma), scalar),
            Replay(fn, lambda a: _softmax_focal(a, targets, class_dim, alpha, gamma, reduction), [input]),
        )
    return _softmax_focal(input, targets, class_dim, alpha, gamma, reduction)


def _softmax_focal(input: Tensor, targets: ClassTargets, class_dim: int, alpha: Tensor | float | None, gamma: float,
                   reduction: str) -> Tensor:
    """softmax_focal_loss's composed form, which autograd differentiates (the fused path's oracle)."""
    log_p, valid, safe = _target_log_probs(input, targets, class_dim)
    # (1 - p)^gamma from log p: -expm1(log p) keeps 1 - p exact when p is tiny.
    loss = -_focusing(-torch.expm1(log_p), gamma) * log_p
    if isinstance(alpha, Tensor):
        loss = alpha.to(loss.dtype)[safe] * loss
    elif alpha is not None:
        loss = alpha * loss
    return cast(_mean_over_valid(loss, valid, reduction), input.dtype)


def poly1_cross_entropy(
    input: Tensor,
    target: Tensor,
    epsilon: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    r"""Poly-1 loss: cross-entropy plus :math:`\epsilon (1 - p_y)`, the first polynomial term.

    .. math::
        \ell_i = -\log p_{i, y_i} + \epsilon (1 - p_{i, y_i})

    Args:
        input: logits, ``[C]``, ``[N, C]`` or ``[N, C, d1, ...]``.
        target: class indices, ``input``'s shape without the class dimension.
        epsilon: weight of the poly-1 term (the paper's default 1; negative values allowed).
        ignore_index: target value that contributes nothing.
        reduction: ``'mean'`` (over the targets not ignored), ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the per-position loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import poly1_cross_entropy
        >>> poly1_cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))  # ln 2 + 0.5
        tensor(1.1931)

    References:
        Leng et al., "PolyLoss: A Polynomial Expansion Perspective of Classification Loss
        Functions", 2022.
    """
    fn = "poly1_cross_entropy"
    reduction = resolve_reduction(None, None, reduction)
    targets, class_dim = _index_targets(input, target, ignore_index, fn)
    if fused_target_prob_applies(input):  # as softmax_focal_loss
        return fused_target_prob_call(
            input, targets.safe(), targets.valid_or_none, None, target_prob_options("poly1", reduction, float(epsilon), 1.0),
            Replay(fn, lambda a: _poly1(a, targets, class_dim, epsilon, reduction), [input]),
        )
    return _poly1(input, targets, class_dim, epsilon, reduction)


def _poly1(input: Tensor, targets: ClassTargets, class_dim: int, epsilon: float, reduction: str) -> Tensor:
    """poly1_cross_entropy's composed form, which autograd differentiates (the fused path's oracle)."""
    log_p, valid, _ = _target_log_probs(input, targets, class_dim)
    loss = -log_p - epsilon * torch.expm1(log_p)
    return cast(_mean_over_valid(loss, valid, reduction), input.dtype)
