"""The linear losses' matrix products on an accelerator: half-precision operands on the
tensor cores, float32 results.

On a GPU a bfloat16 or float16 product runs on the tensor cores about ten times faster
than a float32 one (an H200: ~790 against ~60 TFLOP/s), and cuBLAS accumulates it in
float32 anyway. So the linear losses keep the input and the weight in their own dtype there
(no float32 copy of a (vocabulary x hidden) weight) and ask for float32 results where
precision matters: the logits of a chunk (the softmax of rounded logits would cost torch's
accuracy) and the weight's gradient, accumulated over the chunks in float32 and rounded
once. The gradient of the logits is rounded once to the operands' dtype before the two
backward products, as every half-precision training step does.

``torch.mm(a, b, out_dtype=torch.float32)`` (CUDA, torch >= 2.8) gives the float32 result
of half operands; where a build lacks it, the operands are cast to float32 first (slower,
the same numbers).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._core import switches

HALF = (torch.bfloat16, torch.float16)


def serves(input: Tensor, weight: Tensor) -> bool:
    """Whether a linear loss takes the tensor-core path: half-precision input and weight of
    one dtype on an accelerator (or on the CPU inside :func:`switches.tensor_cores_on_cpu`,
    where the tests run the same code with float32 products)."""
    if input.dtype not in HALF or weight.dtype != input.dtype:
        return False
    return input.device.type not in ("cpu", "meta") or (input.is_cpu and switches.tensor_cores_serve_cpu())


@functools.cache
def _has_out_dtype(device_type: str, dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        c = torch.zeros(2, 2, dtype=torch.float32, device=device_type)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        d = torch.empty(2, 2, dtype=torch.float32, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32, out=d)
        return bool((c == 2).all()) and bool((d == 2).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def mm_float32(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b of half-precision operands, as float32 (into ``out`` when given)."""
    if _has_out_dtype(a.device.type, a.dtype):
        if out is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    if out is None:
        return torch.mm(a.float(), b.float())
    return torch.mm(a.float(), b.float(), out=out)


def addmm_float32_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """acc += a @ b in place, acc float32 and a, b half-precision: one product whose float32
    accumulator starts from acc (beta = 1), no temporary of acc's size."""
    if _has_out_dtype(a.device.type, a.dtype):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a.float(), b.float())
