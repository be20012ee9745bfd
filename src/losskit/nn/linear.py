"""LinearCrossEntropyLoss: a linear layer and its cross-entropy, mirroring torch.nn."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from .._core.options import CrossEntropyOptions
from .._core.validation import check_class_weight
from ._base import WeightedLoss

__all__ = ["LinearCrossEntropyLoss"]


class LinearCrossEntropyLoss(WeightedLoss):
    """Module form of :func:`losskit.functional.linear_cross_entropy`, as
    ``torch.nn.LinearCrossEntropyLoss``: it owns the ``linear`` layer (weight stored flat,
    ``[C * prod(out_features), H]``) and never forms its logits, on any device.

    Example:
        >>> import torch
        >>> from losskit.nn import LinearCrossEntropyLoss
        >>> head = LinearCrossEntropyLoss(in_features=8, num_classes=50, bias=True)
        >>> loss = head(torch.randn(4, 8), torch.tensor([1, 7, 49, 0]))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options: Any = None,
        lse_square_scale: float = 0.0,
        softcap: float | None = None,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        batch_invariant: bool = False,
    ) -> None:
        fn = "LinearCrossEntropyLoss"
        if weight is not None:
            check_class_weight(weight, num_classes, fn)
        CrossEntropyOptions.checked(
            fn, ignore_index=-100 if ignore_index is None else ignore_index, label_smoothing=label_smoothing,
            lse_square_scale=lse_square_scale, softcap=softcap, temperature=temperature, reduction=reduction,
        )
        super().__init__(weight, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.batch_invariant = batch_invariant
        self.linear = nn.Linear(
            in_features, math.prod(self.out_features, start=num_classes), bias=bias, device=device, dtype=dtype
        )

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        shape = (self.num_classes, *self.out_features)
        bias = None if self.linear.bias is None else self.linear.bias.reshape(shape)
        return F.linear_cross_entropy(
            input,
            self.linear.weight.reshape(*shape, self.linear.in_features),
            target,
            linear_bias=bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            lse_square_scale=self.lse_square_scale,
            softcap=self.softcap,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            batch_invariant=self.batch_invariant,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"out_features={self.out_features}, bias={self.linear.bias is not None}, reduction={self.reduction!r}"
        )
