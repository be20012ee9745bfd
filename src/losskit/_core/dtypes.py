"""Dtype rules shared by every loss and kernel."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def result_dtypes(
    *tensors: Tensor | None, result: Iterable[Tensor | None] | None = None
) -> tuple[torch.dtype, torch.dtype]:
    """(dtype to compute in, dtype to return) for a loss of these tensors (None: absent).

    The computation runs in the promoted dtype of all of them, so that a float64 target of a
    float32 input is not rounded before the subtraction. The result has the promoted dtype
    of ``result`` (default: all of them): torch's kernels that write into a tensor made
    like one argument return that argument's dtype whatever the others are (huber_loss and
    soft_margin_loss: the input's; binary_cross_entropy_with_logits: the target's), and
    losskit returns what torch returns, rounded once at the end. An integer ``result``
    (e.g. the target of binary_cross_entropy_with_logits, which torch refuses) gives way to
    the promoted dtype.

    float16/bfloat16 losses are computed in float32 and cast back at the end, so that a sum
    over many classes or elements keeps the precision an 8- or 11-bit mantissa cannot hold.
    """
    compute = _promoted([t for t in tensors if t is not None])
    out = compute if result is None else _promoted([t for t in result if t is not None])
    if not out.is_floating_point:  # an integer target never sets the result's dtype
        out = compute
    return (torch.float32 if compute in (torch.float16, torch.bfloat16) else compute), out


def _promoted(tensors: list[Tensor]) -> torch.dtype:
    out = tensors[0].dtype
    for t in tensors[1:]:
        out = torch.promote_types(out, t.dtype)
    return out


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``: itself when it already is (``Tensor.to`` costs microseconds even
    then, which add up on the small batches of an everyday training loop)."""
    return t if t.dtype == dtype else t.to(dtype)
