"""Keras's hinge and squared hinge, fused: the loss rows and the gradient in one forward.

With labels t (Keras maps labels that are all 0 or 1 to -1 / +1: t' = 2 t - 1, else t' = t),
scores x, m = 1 - t' x and h = max(m, 0), each row of n elements (the last dimension) gives

  hinge          L = mean_c h_c      dL/dx_c = -t'_c / n  where m_c >= 0, else 0
  squared_hinge  L = mean_c h_c^2    dL/dx_c = -2 h_c t'_c / n

(m_c >= 0: the composed form's clamp_min passes its gradient at a tie m = 0, and so does
this). The terms and the gradient are formed in the inputs' dtype, each op rounded as the
composed form rounds it; the rows are the terms' mean along the last dimension. The
gradient is the only full-size buffer kept for backward (the composed form keeps the
labels, the scores' product and the clamp's input).

The 0/1 test is a 0-d tensor here (no host sync, no graph break); the compiled form
(losskit._native's hinge_eager, src/hinge.cpp) reads the labels on the host, stopping at
the first one that is neither 0 nor 1 (with -1/+1 labels, the first -1), then computes
this file's ops element by element, with the same bits (tests/test_native_kinfo.py,
tests/test_native_half.py), in one pass over the scores instead of eight. It serves float32
and bfloat16 at every size (bfloat16 read and rounded in vectorised blocks, src/half_blocks.h)
and float16 up to 2^16 elements, past which this file's vectorised ATen ops are faster than
its per-element float16 conversions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .fused_op import compiling, fused_may_serve, FusedOp

# The dtypes the fused form serves: float64 stays with the composed form (fused_may_serve).
SERVED = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class HingeOptions:
    """squared: Keras's squared_hinge (else hinge). One loss per row, always."""

    squared: bool

    @property
    def reduction(self) -> str:  # what FusedOp's fake and per_row read: a loss per row
        return "none"


HINGE = HingeOptions(False)
SQUARED_HINGE = HingeOptions(True)


def fused_hinge_applies(y_true: Tensor, y_pred: Tensor) -> bool:
    """Eager calls that want the gradient of the scores only, labels and scores of one shape
    and one served dtype (what the fused form computes)."""
    return (
        y_pred.requires_grad and not y_true.requires_grad and torch.is_grad_enabled()
        and y_pred.dim() >= 1 and y_pred.numel() > 0 and y_true.shape == y_pred.shape
        and y_pred.dtype == y_true.dtype and y_pred.dtype in SERVED and not compiling()
        and fused_may_serve(y_pred, y_true)
    )


def binary_labels(y_true: Tensor) -> Tensor:
    """Whether every label is 0 or 1: a 0-d tensor (no host sync, no graph break)."""
    return ((y_true == 0) | (y_true == 1)).all()


def hinge_labels(y_true: Tensor) -> Tensor:
    """Keras's labels: all 0/1 mapped to -1/+1, any others left alone."""
    return torch.where(binary_labels(y_true), 2.0 * y_true - 1.0, y_true)


def hinge_forward(
    input: Tensor, target: Tensor, *, options: HingeOptions, needs: tuple[bool, ...]
) -> tuple[Tensor, tuple[Tensor | None]]:
    """(the loss per row, (d/d input,)) of scores ``input`` and labels ``target`` (see the
    module docstring). The compiled form (losskit._native's hinge_eager) is this function
    op for op, element by element."""
    t = hinge_labels(target)
    n = input.shape[-1]
    m = torch.mul(t, input).neg_().add_(1.0)  # 1 - t x: the negation is exact, so one rounding as there
    h = m.clamp_min(0.0)
    terms = torch.mul(h, h) if options.squared else h
    rows = terms.mean(-1)
    grad = None
    if needs[0]:
        if options.squared:
            grad = torch.mul(h, t).mul_(-2.0 / n)
        else:
            grad = torch.where(m >= 0, t, 0.0).mul_(-1.0 / n)
    return rows, (grad,)


fused_hinge = FusedOp(
    "keras_hinge",
    tensors=("input", "target"),
    differentiable=1,
    options=HingeOptions,
    forward=hinge_forward,
    unreduced="rows",
    per_row=lambda options: True,
    native_forward="hinge_forward",
)
