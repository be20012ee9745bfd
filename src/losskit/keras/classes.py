"""Keras 3 loss classes on torch tensors: Keras's reductions and ``sample_weight``.

``reduction`` is one of 'sum_over_batch_size' (the default: the weighted sum over the
number of per-sample losses), 'sum', 'mean' (the same divisor), 'mean_with_sample_weight'
(divided by the summed sample weights), or 'none' / None. A mask from ``ignore_class``
re-weights the counted positions so that the mean is over them only, as in Keras.
Instances are plain callables, so they also serve as ``loss=`` of a Keras model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._core.reduction import reduce_loss
from . import functions as K

KERAS_REDUCTIONS = ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None)

__all__ = [
    "BinaryCrossentropy",
    "BinaryFocalCrossentropy",
    "CategoricalCrossentropy",
    "CategoricalFocalCrossentropy",
    "CategoricalGeneralizedCrossEntropy",
    "CategoricalHinge",
    "CosineSimilarity",
    "Dice",
    "Hinge",
    "Huber",
    "KLDivergence",
    "LogCosh",
    "Loss",
    "MeanAbsoluteError",
    "MeanAbsolutePercentageError",
    "MeanSquaredError",
    "MeanSquaredLogarithmicError",
    "Poisson",
    "SparseCategoricalCrossentropy",
    "SquaredHinge",
    "Tversky",
    "reduce_weighted",
]


def reduce_weighted(
    values: Tensor, sample_weight: Tensor | None = None, mask: Tensor | None = None, reduction: str | None = "sum_over_batch_size"
) -> Tensor:
    """Keras's reduce_weighted_values on torch tensors (the sum is losskit's one reduction path)."""
    if reduction not in KERAS_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KERAS_REDUCTIONS}; got {reduction!r}")
    if mask is not None:
        mask = mask.to(values.dtype)
        if reduction in ("mean", "sum_over_batch_size"):
            # Counted entries weigh total / counted, so that dividing by the total gives
            # the mean over the counted ones (0 when none is counted).
            counted = mask.sum()
            scale = torch.where(counted > 0, mask.numel() / counted, torch.zeros_like(counted))
            mask = mask * scale
        if sample_weight is not None:
            mask, sample_weight = K.same_rank(mask, torch.as_tensor(sample_weight, dtype=values.dtype, device=values.device))
            sample_weight = sample_weight * mask
        else:
            sample_weight = mask
    if sample_weight is not None:
        values, sample_weight = K.same_rank(values, torch.as_tensor(sample_weight, dtype=values.dtype, device=values.device))
        values = values * sample_weight
    if reduction in (None, "none") or values.dim() == 0 or tuple(values.shape) == (0,):
        return values
    total = reduce_loss(values, "sum")
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and sample_weight is not None:
        divisor = sample_weight.sum().to(total.dtype)
    else:
        divisor = total.new_tensor(float(values.numel()))
    return torch.where(divisor != 0, total / divisor, torch.zeros_like(total))  # Keras's divide_no_nan


class Loss:
    """Base of the Keras-convention loss classes: ``loss(y_true, y_pred, sample_weight=None)``."""

    def __init__(self, reduction: str | None = "sum_over_batch_size", name: str | None = None, dtype: Any = None) -> None:
        if reduction not in KERAS_REDUCTIONS:
            raise ValueError(f"reduction must be one of {KERAS_REDUCTIONS}; got {reduction!r}")
        self.reduction = reduction
        self.name = name or type(self).__name__
        self.dtype = dtype

    def call(self, y_true: Tensor, y_pred: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-sample losses and an optional mask of the positions that count."""
        raise NotImplementedError

    def __call__(self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        y_pred = torch.as_tensor(y_pred)
        if self.dtype is not None:
            y_pred = y_pred.to(self.dtype)
        losses, mask = self.call(torch.as_tensor(y_true, device=y_pred.device), y_pred)
        return reduce_weighted(losses, sample_weight, mask, self.reduction)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "reduction": self.reduction}


class _FunctionLoss(Loss):
    """A class whose call is one of :mod:`losskit.keras.functions` with fixed options."""

    function: Any = None

    def __init__(self, reduction: str | None = "sum_over_batch_size", name: str | None = None, dtype: Any = None,
                 **options: Any) -> None:
        super().__init__(reduction, name, dtype)
        self.options = options

    def call(self, y_true: Tensor, y_pred: Tensor) -> tuple[Tensor, Tensor | None]:
        return type(self).function(y_true, y_pred, **self.options), None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), **self.options}


def _loss_class(name: str, function: Any, doc: str, **defaults: Any) -> type[_FunctionLoss]:
    """A Keras class for ``function``, with Keras's constructor options and defaults."""

    def __init__(self, *args: Any, reduction: str | None = "sum_over_batch_size", name: str | None = None,
                 dtype: Any = None, **options: Any) -> None:
        merged = dict(defaults)
        for key, value in zip(defaults, args):
            merged[key] = value
        unknown = set(options) - set(defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected argument(s) {sorted(unknown)}")
        merged.update(options)
        _FunctionLoss.__init__(self, reduction, name, dtype, **merged)

    return type(name, (_FunctionLoss,), {"function": staticmethod(function), "__init__": __init__, "__doc__": doc})


BinaryCrossentropy = _loss_class(
    "BinaryCrossentropy", K.binary_crossentropy, "keras.losses.BinaryCrossentropy on torch tensors.",
    from_logits=False, label_smoothing=0.0, axis=-1,
)
CategoricalCrossentropy = _loss_class(
    "CategoricalCrossentropy", K.categorical_crossentropy, "keras.losses.CategoricalCrossentropy on torch tensors.",
    from_logits=False, label_smoothing=0.0, axis=-1,
)
KLDivergence = _loss_class("KLDivergence", K.kl_divergence, "keras.losses.KLDivergence on torch tensors.")
Poisson = _loss_class("Poisson", K.poisson, "keras.losses.Poisson on torch tensors.")
MeanSquaredError = _loss_class("MeanSquaredError", K.mean_squared_error, "keras.losses.MeanSquaredError on torch tensors.")
MeanAbsoluteError = _loss_class("MeanAbsoluteError", K.mean_absolute_error, "keras.losses.MeanAbsoluteError on torch tensors.")
MeanAbsolutePercentageError = _loss_class(
    "MeanAbsolutePercentageError", K.mean_absolute_percentage_error,
    "keras.losses.MeanAbsolutePercentageError on torch tensors.",
)
MeanSquaredLogarithmicError = _loss_class(
    "MeanSquaredLogarithmicError", K.mean_squared_logarithmic_error,
    "keras.losses.MeanSquaredLogarithmicError on torch tensors.",
)
Huber = _loss_class("Huber", K.huber, "keras.losses.Huber on torch tensors.", delta=1.0)
LogCosh = _loss_class("LogCosh", K.log_cosh, "keras.losses.LogCosh on torch tensors.")
Hinge = _loss_class("Hinge", K.hinge, "keras.losses.Hinge on torch tensors.")
SquaredHinge = _loss_class("SquaredHinge", K.squared_hinge, "keras.losses.SquaredHinge on torch tensors.")
CategoricalHinge = _loss_class("CategoricalHinge", K.categorical_hinge, "keras.losses.CategoricalHinge on torch tensors.")
CosineSimilarity = _loss_class("CosineSimilarity", K.cosine_similarity, "keras.losses.CosineSimilarity on torch tensors.",
                               axis=-1)


BinaryFocalCrossentropy = _loss_class(
    "BinaryFocalCrossentropy", K.binary_focal_crossentropy, "keras.losses.BinaryFocalCrossentropy on torch tensors.",
    apply_class_balancing=False, alpha=0.25, gamma=2.0, from_logits=False, label_smoothing=0.0, axis=-1,
)
CategoricalFocalCrossentropy = _loss_class(
    "CategoricalFocalCrossentropy", K.categorical_focal_crossentropy,
    "keras.losses.CategoricalFocalCrossentropy on torch tensors.",
    alpha=0.25, gamma=2.0, from_logits=False, label_smoothing=0.0, axis=-1,
)
CategoricalGeneralizedCrossEntropy = _loss_class(
    "CategoricalGeneralizedCrossEntropy", K.categorical_generalized_cross_entropy,
    "keras.losses.CategoricalGeneralizedCrossEntropy on torch tensors.", q=0.5,
)


class Dice(_FunctionLoss):
    """keras.losses.Dice on torch tensors (Keras's argument order: reduction, name, axis)."""

    function = staticmethod(K.dice)

    def __init__(self, reduction: str | None = "sum_over_batch_size", name: str | None = None,
                 axis: int | tuple[int, ...] | None = None, dtype: Any = None) -> None:
        super().__init__(reduction, name, dtype, axis=axis)


class Tversky(_FunctionLoss):
    """keras.losses.Tversky on torch tensors (Keras's argument order: alpha, beta, reduction, name, axis)."""

    function = staticmethod(K.tversky)

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, reduction: str | None = "sum_over_batch_size",
                 name: str | None = None, axis: int | tuple[int, ...] | None = None, dtype: Any = None) -> None:
        super().__init__(reduction, name, dtype, alpha=alpha, beta=beta, axis=axis)


class SparseCategoricalCrossentropy(Loss):
    """keras.losses.SparseCategoricalCrossentropy on torch tensors, ``ignore_class`` included."""

    def __init__(self, from_logits: bool = False, ignore_class: int | None = None,
                 reduction: str | None = "sum_over_batch_size", axis: int = -1, name: str | None = None,
                 dtype: Any = None) -> None:
        super().__init__(reduction, name, dtype)
        self.from_logits, self.ignore_class, self.axis = from_logits, ignore_class, axis

    def call(self, y_true: Tensor, y_pred: Tensor) -> tuple[Tensor, Tensor | None]:
        return K.sparse_categorical_crossentropy_and_mask(y_true, y_pred, self.from_logits, self.ignore_class, self.axis)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "from_logits": self.from_logits, "ignore_class": self.ignore_class,
                "axis": self.axis}
