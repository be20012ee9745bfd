"""Dtype rules shared by every loss and kernel."""

from __future__ import annotations

import torch
from torch import Tensor


def result_dtypes(*tensors: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype to compute in, dtype to return) for a loss of these tensors.

    The result has torch's promoted dtype. float16/bfloat16 losses are computed in float32
    and cast back at the end, so that a sum over many classes or elements keeps the
    precision an 8- or 11-bit mantissa cannot hold.
    """
    out = tensors[0].dtype
    for t in tensors[1:]:
        out = torch.promote_types(out, t.dtype)
    return (torch.float32 if out in (torch.float16, torch.bfloat16) else out), out


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``: itself when it already is (``Tensor.to`` costs microseconds even
    then, which add up on the small batches of an everyday training loop)."""
    return t if t.dtype == dtype else t.to(dtype)
