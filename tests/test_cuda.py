"""Every loss on a CUDA device against the same call on the CPU: values and gradients.

The CPU results are the oracle here (they are tested against torch and float64 elsewhere);
on CUDA the calls go through the Triton kernels where losskit has them, cuBLAS and torch's
CUDA ops elsewhere. These tests run only where a GPU is (``make gpu-check``); CI has none,
and there tests/test_devices.py runs the same catalog on ``meta`` tensors to catch device
bugs, and tests/test_triton.py runs the kernels through Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_flatten

import losskit.functional as LF
from cases import CASES
from inputs import Inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: run `make gpu-check` there")


def _run(case, device: str, like: torch.nn.Module | None = None):
    """(loss, grads, the loss module if any); a module takes ``like``'s parameters, since
    a module built on CUDA draws its initial weights from the CUDA generator."""
    fn, args, kwargs = case.build(Inputs(device))
    if isinstance(fn, torch.nn.Module):
        fn = fn.to(device)
        if like is not None:
            fn.load_state_dict(like.state_dict())
    loss = fn(*args, **kwargs)
    flat = tree_flatten((list(args), kwargs))[0]
    leaves = [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]
    leaves += [p for p in getattr(fn, "parameters", lambda: [])()]
    grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True) if leaves and loss.requires_grad else ()
    return loss, grads, fn if isinstance(fn, torch.nn.Module) else None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cuda_matches_cpu(case):
    cpu_loss, cpu_grads, module = _run(case, "cpu")
    cuda_loss, cuda_grads, _ = _run(case, "cuda", like=module)
    assert cuda_loss.device.type == "cuda"
    torch.testing.assert_close(cuda_loss.cpu(), cpu_loss, rtol=2e-5, atol=2e-6, equal_nan=True)
    assert len(cuda_grads) == len(cpu_grads)
    for got, want in zip(cuda_grads, cpu_grads):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.device.type == "cuda"
            torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=2e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_losses_on_cuda_match_eager(dtype):
    """The fused custom ops under torch.compile(fullgraph=True) with inductor on CUDA."""
    torch.manual_seed(0)
    x = torch.randn(64, 1000, device="cuda", dtype=dtype, requires_grad=True)
    target = torch.randint(0, 1000, (64,), device="cuda")
    h = torch.randn(64, 32, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(1000, 32, device="cuda", dtype=dtype, requires_grad=True)

    def losses(x, h, w, target):
        return (LF.cross_entropy(x, target, label_smoothing=0.1)
                + LF.linear_cross_entropy(h, w, target)
                + LF.binary_cross_entropy_with_logits(x, x.detach().sigmoid()))

    eager = losses(x, h, w, target)
    eager_grads = torch.autograd.grad(eager, (x, h, w))
    compiled = torch.compile(losses, fullgraph=True)(x, h, w, target)
    compiled_grads = torch.autograd.grad(compiled, (x, h, w))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(compiled, eager, **tol)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, **tol)
