"""Keras 3 loss functions on torch tensors: ``(y_true, y_pred)`` order, Keras semantics.

Each returns Keras's per-sample losses (the last axis averaged or summed away); the
classes in :mod:`losskit.keras.classes` reduce them. Probabilities are clipped to
[1e-7, 1 - 1e-7] (Keras's epsilon) where Keras clips them; the cross-entropies run on
losskit's own functional implementations, as Keras's torch backend runs on torch's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import functional as F
from .._core.ops import log_softmax
from ..kernels.fused_op import eager_native, Replay
from ..kernels.hinge import fused_hinge, fused_hinge_applies, hinge_labels, HINGE, SQUARED_HINGE

EPSILON = 1e-7  # keras.config.epsilon()

__all__ = [
    "EPSILON",
    "binary_crossentropy",
    "binary_focal_crossentropy",
    "categorical_crossentropy",
    "categorical_focal_crossentropy",
    "categorical_generalized_cross_entropy",
    "categorical_hinge",
    "cosine_similarity",
    "dice",
    "hinge",
    "huber",
    "kl_divergence",
    "log_cosh",
    "mean_absolute_error",
    "mean_absolute_percentage_error",
    "mean_squared_error",
    "mean_squared_logarithmic_error",
    "poisson",
    "sparse_categorical_crossentropy",
    "squared_hinge",
    "tversky",
]


def same_rank(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Keras's squeeze_or_expand_to_same_rank: align ranks differing by a trailing 1."""
    if a.dim() == b.dim() + 1 and a.shape[-1] == 1:
        return (a, b.unsqueeze(-1)) if b.dim() == 1 else (a.squeeze(-1), b)
    if b.dim() == a.dim() + 1 and b.shape[-1] == 1:
        return (a.unsqueeze(-1), b) if a.dim() == 1 else (a, b.squeeze(-1))
    return a, b


def _cast(y_true: Tensor, y_pred: Tensor) -> tuple[Tensor, Tensor]:
    """Both as tensors, y_true in y_pred's dtype (Keras casts labels to the predictions')."""
    if (isinstance(y_true, Tensor) and isinstance(y_pred, Tensor) and y_true.dtype == y_pred.dtype
            and y_true.device == y_pred.device):
        return y_true, y_pred  # what the conversions below give, without their microseconds
    y_pred = torch.as_tensor(y_pred)
    return torch.as_tensor(y_true, device=y_pred.device).to(y_pred.dtype), y_pred


def _pair(y_true: Tensor, y_pred: Tensor) -> tuple[Tensor, Tensor]:
    """y_true in y_pred's dtype, ranks aligned as Keras does for the regression losses."""
    return same_rank(*_cast(y_true, y_pred))


def _check_same_shape(y_true: Tensor, y_pred: Tensor, fn: str) -> None:
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{fn}: y_true shape {tuple(y_true.shape)} must match y_pred shape {tuple(y_pred.shape)}")


def binary_crossentropy(
    y_true: Tensor, y_pred: Tensor, from_logits: bool = False, label_smoothing: float = 0.0, axis: int = -1
) -> Tensor:
    """Binary cross-entropy averaged over ``axis``; labels smoothed towards 1/2."""
    y_true, y_pred = _cast(y_true, y_pred)
    _check_same_shape(y_true, y_pred, "binary_crossentropy")
    if label_smoothing:
        y_true = y_true * (1.0 - label_smoothing) + 0.5 * label_smoothing
    if from_logits:
        loss = F.binary_cross_entropy_with_logits(y_pred, y_true, reduction="none")
    else:
        loss = F.binary_cross_entropy(y_pred.clamp(EPSILON, 1.0 - EPSILON), y_true, reduction="none")
    return loss.mean(dim=axis)


def categorical_crossentropy(
    y_true: Tensor, y_pred: Tensor, from_logits: bool = False, label_smoothing: float = 0.0, axis: int = -1
) -> Tensor:
    """Cross-entropy of one-hot (or soft) labels; probabilities renormalised, then clipped."""
    y_true, y_pred = _cast(y_true, y_pred)
    _check_same_shape(y_true, y_pred, "categorical_crossentropy")
    if label_smoothing:
        y_true = y_true * (1.0 - label_smoothing) + label_smoothing / y_true.shape[axis]
    if from_logits:
        log_prob = log_softmax(y_pred, axis)
    else:
        y_pred = y_pred / y_pred.sum(dim=axis, keepdim=True)
        log_prob = y_pred.clamp(EPSILON, 1.0 - EPSILON).log()
    return -(y_true * log_prob).sum(dim=axis)


def sparse_categorical_crossentropy(
    y_true: Tensor, y_pred: Tensor, from_logits: bool = False, ignore_class: int | None = None, axis: int = -1
) -> Tensor:
    """Cross-entropy of integer labels; positions labelled ``ignore_class`` get loss 0."""
    return sparse_categorical_crossentropy_and_mask(y_true, y_pred, from_logits, ignore_class, axis)[0]


def sparse_categorical_crossentropy_and_mask(
    y_true: Tensor, y_pred: Tensor, from_logits: bool = False, ignore_class: int | None = None, axis: int = -1
) -> tuple[Tensor, Tensor | None]:
    """The losses and the mask of counted positions (None without ``ignore_class``).

    Keras attaches that mask to the losses, and its reduction then divides by the number
    of counted positions (all ignored gives 0); the class form needs it for the same.
    """
    fn = "sparse_categorical_crossentropy"
    # Tensors already (the everyday call) pass as they are: each as_tensor, movedim and
    # long() below is a dispatch of several microseconds at a batch of 64.
    if not isinstance(y_pred, Tensor):
        y_pred = torch.as_tensor(y_pred)
    if not isinstance(y_true, Tensor) or y_true.device != y_pred.device:
        y_true = torch.as_tensor(y_true, device=y_pred.device)
    if y_true.dim() == y_pred.dim() and y_true.shape[axis] == 1:
        y_true = y_true.squeeze(axis)
    class_axis = axis % y_pred.dim()
    expected = y_pred.shape[:class_axis] + y_pred.shape[class_axis + 1 :]
    if y_true.shape != expected:
        raise ValueError(f"{fn}: y_true shape {tuple(y_true.shape)} must be y_pred's without its class axis, {tuple(expected)}")
    valid = None
    if ignore_class is not None:
        valid = y_true != ignore_class
        y_true = torch.where(valid, y_true, 0)
        y_pred = torch.where(valid.unsqueeze(class_axis), y_pred, 0.0)
    target = y_true if y_true.dtype == torch.int64 else y_true.long()
    logits_like = y_pred.movedim(class_axis, 1) if y_pred.dim() > 1 and class_axis != 1 else y_pred
    if from_logits:
        loss = F.cross_entropy(logits_like, target, reduction="none")
    else:
        probs = logits_like / logits_like.sum(dim=1 if logits_like.dim() > 1 else 0, keepdim=True)
        loss = F.nll_loss(probs.clamp(EPSILON, 1.0 - EPSILON).log(), target, reduction="none")
    if valid is not None:
        loss = torch.where(valid, loss, 0.0)
    return loss, valid


def kl_divergence(y_true: Tensor, y_pred: Tensor) -> Tensor:
    """sum y log(y / p) over the last axis, both clipped to [1e-7, 1]."""
    y_true, y_pred = _cast(y_true, y_pred)
    y_true, y_pred = y_true.clamp(EPSILON, 1.0), y_pred.clamp(EPSILON, 1.0)
    return (y_true * (y_true / y_pred).log()).sum(dim=-1)


def poisson(y_true: Tensor, y_pred: Tensor) -> Tensor:
    """mean of y_pred - y_true log(y_pred + 1e-7) over the last axis."""
    y_true, y_pred = _cast(y_true, y_pred)
    return (y_pred - y_true * (y_pred + EPSILON).log()).mean(dim=-1)


# From this many elements on, a float32 Keras mse / mae is faster as losskit.functional's
# fused element-wise loss (one sweep, the gradient made in it) than as the composed ops,
# which autograd walks back pass by pass; below it the composed ops cost fewer Python calls.
_FUSED_FROM = 1 << 16


def _fused_elementwise(y_true: Tensor, y_pred: Tensor) -> bool:
    """Whether losskit.functional's element-wise loss (reduction='none') computes a Keras
    mse / mae of these aligned tensors before the mean over the last axis: float32 tensors of
    one shape (Keras broadcasts others) and of at least ``_FUSED_FROM`` elements. The numbers
    are the composed form's, bit for bit: (p - y)^2 and |p - y| are (y - p)^2 and |y - p|
    exactly, and so are their gradients, 2 (p - y) g and sign(p - y) g (float16 / bfloat16
    would not be: the fused loss computes them in float32 and rounds once)."""
    return (y_pred.dtype == torch.float32 and y_true.dtype == torch.float32 and y_true.shape == y_pred.shape
            and y_pred.numel() >= _FUSED_FROM)


def mean_squared_error(y_true: Tensor, y_pred: Tensor) -> Tensor:
    y_true, y_pred = _pair(y_true, y_pred)
    if _fused_elementwise(y_true, y_pred):
        return F.mse_loss(y_pred, y_true, reduction="none").mean(dim=-1)
    return (y_true - y_pred).square().mean(dim=-1)


def mean_absolute_error(y_true: Tensor, y_pred: Tensor) -> Tensor:
    y_true, y_pred = _pair(y_true, y_pred)
    if _fused_elementwise(y_true, y_pred):
        return F.l1_loss(y_pred, y_true, reduction="none").mean(dim=-1)
    return (y_true - y_pred).abs().mean(dim=-1)


def mean_absolute_percentage_error(y_true: Tensor, y_pred: Tensor) -> Tensor:
    """100 * mean |(y - p) / max(|y|, 1e-7)| over the last axis."""
    y_true, y_pred = _pair(y_true, y_pred)
    return 100.0 * ((y_true - y_pred) / y_true.abs().clamp_min(EPSILON)).abs().mean(dim=-1)


def mean_squared_logarithmic_error(y_true: Tensor, y_pred: Tensor) -> Tensor:
    """mean (log(max(p, eps) + 1) - log(max(y, eps) + 1))^2 over the last axis."""
    y_true, y_pred = _pair(y_true, y_pred)
    return (torch.log1p(y_pred.clamp_min(EPSILON)) - torch.log1p(y_true.clamp_min(EPSILON))).square().mean(dim=-1)


def huber(y_true: Tensor, y_pred: Tensor, delta: float = 1.0) -> Tensor:
    """Keras's Huber: quadratic where |e| <= delta (torch's switches at < delta; at |e| = delta
    both branches give 0.5 delta^2 and the gradient delta, so the two agree everywhere).

    So it is losskit.functional.huber_loss per element (one fused sweep), then Keras's mean
    over the last axis; otherwise c (e - c / 2) with c = clamp(e, -delta, delta): e^2 / 2
    inside, delta (|e| - delta / 2) outside, whose autograd gradient is exactly c.
    """
    y_true, y_pred = _pair(y_true, y_pred)
    if delta > 0 and y_true.shape == y_pred.shape:  # torch's huber_loss, by losskit's fused sweep
        return F.huber_loss(y_pred, y_true, reduction="none", delta=delta).mean(dim=-1)
    error = y_pred - y_true
    capped = error.clamp(-delta, delta)
    return (capped * (error - 0.5 * capped)).mean(dim=-1)


def log_cosh(y_true: Tensor, y_pred: Tensor) -> Tensor:
    """mean log(cosh(p - y)), as x + softplus(-2x) - log 2, which never overflows."""
    y_true, y_pred = _pair(y_true, y_pred)
    x = y_pred - y_true
    return (x + torch.nn.functional.softplus(-2.0 * x) - math.log(2.0)).mean(dim=-1)


def _hinge(y_true: Tensor, y_pred: Tensor, squared: bool) -> Tensor:
    """Keras's hinge (squared: squared hinge) per sample; labels that are all 0/1 count as -1/+1.

    The everyday eager call (labels and scores of one shape and dtype, the scores' gradient
    wanted) is kernels/hinge.py's fused form: one compiled call on the CPU, which forms the
    loss rows and the gradient in one pass and the autograd node, else its Python ops;
    anything else takes the composed ops below."""
    if fused_hinge_applies(y_true, y_pred):
        options = SQUARED_HINGE if squared else HINGE
        native = eager_native(y_pred, y_true)
        if native is not None:
            made = native.hinge_eager(
                y_pred, y_true, squared, True,
                (fused_hinge.node_name, fused_hinge.name, lambda x: _hinge_composed(y_true, x, squared)),
            )
            if made is not None:
                return made
        return fused_hinge(y_pred, y_true, options=options,
                           replay=Replay(fused_hinge.name, lambda x, t: _hinge_composed(t, x, squared), [y_pred, y_true]))
    return _hinge_composed(y_true, y_pred, squared)


def _hinge_composed(y_true: Tensor, y_pred: Tensor, squared: bool) -> Tensor:
    margins = (1.0 - hinge_labels(y_true) * y_pred).clamp_min(0.0)
    return (margins.square() if squared else margins).mean(dim=-1)


def hinge(y_true: Tensor, y_pred: Tensor) -> Tensor:
    """mean max(0, 1 - y_true y_pred) over the last axis; labels all 0/1 count as -1/+1."""
    y_true, y_pred = _cast(y_true, y_pred)
    return _hinge(y_true, y_pred, False)


def squared_hinge(y_true: Tensor, y_pred: Tensor) -> Tensor:
    """mean max(0, 1 - y_true y_pred)^2 over the last axis; labels all 0/1 count as -1/+1."""
    y_true, y_pred = _cast(y_true, y_pred)
    return _hinge(y_true, y_pred, True)


def categorical_hinge(y_true: Tensor, y_pred: Tensor) -> Tensor:
    """max(0, max_{not y} p - p_y + 1) with one-hot y_true."""
    y_true, y_pred = _cast(y_true, y_pred)
    positive = (y_true * y_pred).sum(dim=-1)
    negative = ((1.0 - y_true) * y_pred).amax(dim=-1)
    return (negative - positive + 1.0).clamp_min(0.0)


def _l2_normalize(x: Tensor, axis: int) -> Tensor:
    # Keras: x * min(rsqrt(sum x^2), 1 / eps), so a zero vector stays zero.
    return x * torch.rsqrt(x.square().sum(dim=axis, keepdim=True)).clamp_max(1.0 / EPSILON)


def cosine_similarity(y_true: Tensor, y_pred: Tensor, axis: int = -1) -> Tensor:
    """Minus the cosine similarity (so that minimising it aligns the vectors)."""
    y_true, y_pred = _pair(y_true, y_pred)
    return -(_l2_normalize(y_true, axis) * _l2_normalize(y_pred, axis)).sum(dim=axis)


def binary_focal_crossentropy(
    y_true: Tensor,
    y_pred: Tensor,
    apply_class_balancing: bool = False,
    alpha: float = 0.25,
    gamma: float = 2.0,
    from_logits: bool = False,
    label_smoothing: float = 0.0,
    axis: int = -1,
) -> Tensor:
    """(1 - p_t)^gamma * BCE, alpha-balanced if asked, averaged over ``axis`` (Keras's form:
    probabilities clipped to [1e-7, 1 - 1e-7] even from logits)."""
    y_true, y_pred = _cast(y_true, y_pred)
    _check_same_shape(y_true, y_pred, "binary_focal_crossentropy")
    if label_smoothing:
        y_true = y_true * (1.0 - label_smoothing) + 0.5 * label_smoothing
    if from_logits:
        y_pred = torch.sigmoid(y_pred)
    bce = F.binary_cross_entropy(y_pred.clamp(EPSILON, 1.0 - EPSILON), y_true, reduction="none")
    p_t = y_true * y_pred + (1 - y_true) * (1 - y_pred)
    focal = (1.0 - p_t) ** gamma * bce
    if apply_class_balancing:
        focal = (y_true * alpha + (1 - y_true) * (1 - alpha)) * focal
    return focal.mean(dim=axis)


def categorical_focal_crossentropy(
    y_true: Tensor,
    y_pred: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    from_logits: bool = False,
    label_smoothing: float = 0.0,
    axis: int = -1,
) -> Tensor:
    """sum over ``axis`` of alpha (1 - p)^gamma (-y log p), p renormalised and clipped."""
    y_true, y_pred = _cast(y_true, y_pred)
    _check_same_shape(y_true, y_pred, "categorical_focal_crossentropy")
    if label_smoothing:
        y_true = y_true * (1.0 - label_smoothing) + label_smoothing / y_true.shape[axis]
    if from_logits:
        y_pred = torch.softmax(y_pred, dim=axis)
    p = (y_pred / y_pred.sum(dim=axis, keepdim=True)).clamp(EPSILON, 1.0 - EPSILON)
    return (alpha * (1.0 - p) ** gamma * (-y_true * p.log())).sum(dim=axis)


def categorical_generalized_cross_entropy(y_true: Tensor, y_pred: Tensor, q: float) -> Tensor:
    """(1 - p_y^q) / q for integer labels y_true and probabilities y_pred (Zhang and Sabuncu,
    2018): cross-entropy as q -> 0, MAE at q = 1, robust to noisy labels in between."""
    y_pred = torch.as_tensor(y_pred)
    if not 0 < q <= 1:
        raise ValueError(f"categorical_generalized_cross_entropy: q must be in (0, 1]; got {q}")
    p = y_pred.gather(-1, torch.as_tensor(y_true, device=y_pred.device).long().unsqueeze(-1)).squeeze(-1)
    return (1 - p**q) / q


def _axes(axis: int | tuple[int, ...] | None) -> tuple[int, ...] | None:
    return (axis,) if isinstance(axis, int) else axis


def dice(y_true: Tensor, y_pred: Tensor, axis: int | tuple[int, ...] | None = None) -> Tensor:
    """1 - 2 sum(y p) / (sum y + sum p + 1e-7), summed over ``axis`` (all axes when None)."""
    y_true, y_pred = _cast(y_true, y_pred)
    dims = _axes(axis)
    total = (lambda t: t.sum()) if dims is None else (lambda t: t.sum(dim=dims))
    return 1 - 2.0 * total(y_true * y_pred) / (total(y_true) + total(y_pred) + EPSILON)


def tversky(
    y_true: Tensor, y_pred: Tensor, alpha: float = 0.5, beta: float = 0.5, axis: int | tuple[int, ...] | None = None
) -> Tensor:
    """1 - TP / (TP + alpha sum((1 - p) y) + beta sum(p (1 - y)) + 1e-7), as Keras writes it:
    its ``alpha`` weighs missed positives and ``beta`` false alarms."""
    y_true, y_pred = _cast(y_true, y_pred)
    dims = _axes(axis)
    total = (lambda t: t.sum()) if dims is None else (lambda t: t.sum(dim=dims))
    tp = total(y_true * y_pred)
    missed = total((1 - y_pred) * y_true)
    false_alarms = total(y_pred * (1 - y_true))
    return 1 - tp / (tp + alpha * missed + beta * false_alarms + EPSILON)
