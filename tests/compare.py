"""The two helpers every loss test goes through: compare with torch (``check_against_torch``)
and check bad input (``check_raises``), with the dtypes, tolerances and reductions they run
over. For a loss torch lacks, the torch side is its written-out definition from
tests/oracles_beyond_torch.py."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

# (dtype, atol, rtol) for values and gradients. Half types are compared with torch run in
# float64 on the same (rounded) inputs: losskit computes them in float32 and rounds once,
# while torch's CPU half kernels round every intermediate (seen: 24% off in a float16
# BCE-with-logits gradient where losskit was 0.05% off), so torch-in-half is no oracle.
HALF_TYPES = (torch.float16, torch.bfloat16)
DTYPES = [
    (torch.float64, 1e-10, 1e-10),
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 1e-2, 1e-2),
    (torch.float16, 2e-3, 2e-3),
]
TOLERANCES = {dtype: (atol, rtol) for dtype, atol, rtol in DTYPES}
REDUCTIONS = ["mean", "sum", "none"]


def _copy(value: Any, upcast: bool = False) -> Any:
    if isinstance(value, torch.Tensor):
        copy = value.detach().clone()
        if upcast and copy.dtype in HALF_TYPES:
            copy = copy.double()
        return copy.requires_grad_(value.requires_grad)
    return value


def _has_half(values: list[Any]) -> bool:
    return any(isinstance(v, torch.Tensor) and v.dtype in HALF_TYPES for v in values)


def check_against_torch(
    ours: Callable[..., torch.Tensor],
    theirs: Callable[..., torch.Tensor],
    *args: Any,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    grad_atol: float | None = None,
    grad_rtol: float | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Call both functions on copies of the same inputs; compare shape, dtype, value and the
    gradient of every input that requires grad, under a random grad_output (never all ones).
    Where an input is float16/bfloat16, torch's values and gradients come from float64 copies.

    Returns losskit's output for further checks.
    """
    ours_args = [_copy(a) for a in args]
    ours_kwargs = {k: _copy(v) for k, v in kwargs.items()}
    upcast = _has_half([*args, *kwargs.values()])
    torch_args = [_copy(a, upcast) for a in args]
    torch_kwargs = {k: _copy(v, upcast) for k, v in kwargs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(*ours_args, **ours_kwargs)
        want = theirs(*torch_args, **torch_kwargs)
        want_dtype = theirs(*[_copy(a) for a in args], **{k: _copy(v) for k, v in kwargs.items()}).dtype
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != torch's {tuple(want.shape)}"
    assert got.dtype == want_dtype, f"dtype {got.dtype} != torch's {want_dtype}"
    torch.testing.assert_close(got.to(want.dtype), want, atol=atol, rtol=rtol, equal_nan=True)

    # Every tensor argument that requires grad, positional or keyword (e.g. linear_bias).
    ours_all = dict(enumerate(ours_args)) | ours_kwargs
    torch_all = dict(enumerate(torch_args)) | torch_kwargs
    leaves = [k for k, a in ours_all.items() if isinstance(a, torch.Tensor) and a.requires_grad]
    if leaves and want.requires_grad:
        grad_output = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(got.dtype) + 2
        ours_grads = torch.autograd.grad(got, [ours_all[k] for k in leaves], grad_output, allow_unused=True)
        torch_grads = torch.autograd.grad(
            want, [torch_all[k] for k in leaves], grad_output.to(want.dtype), allow_unused=True
        )
        for k, g_ours, g_torch in zip(leaves, ours_grads, torch_grads):
            assert (g_ours is None) == (g_torch is None), f"gradient of argument {k}: one side has none"
            if g_ours is not None:
                torch.testing.assert_close(
                    g_ours.to(g_torch.dtype),
                    g_torch,
                    atol=atol if grad_atol is None else grad_atol,
                    rtol=rtol if grad_rtol is None else grad_rtol,
                    equal_nan=True,
                    msg=lambda m, k=k: f"gradient of argument {k}: {m}",
                )
    return got


def check_raises(
    fn: Callable[..., Any], *args: Any, error: type[Exception] = ValueError, match: str, **kwargs: Any
) -> None:
    """``fn(*args, **kwargs)`` raises ``error`` whose message contains ``match`` (literal text)."""
    with pytest.raises(error, match=re.escape(match)):
        fn(*args, **kwargs)
