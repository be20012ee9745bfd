"""losskit's compiled CTC kernel (losskit/_native/src/ctc.cpp) against the Python kernel it
replaces (losskit/kernels/ctc.py): the same bits for the loss and the gradient, on one
thread and on two (where the forward and the reversed problem run on a thread each), at
sizes on both sides of the size above which they run as the Python kernel does, for every
reduction, zero_infinity, float64, and calls without a gradient."""

from __future__ import annotations

import os

import pytest
import torch

import losskit.functional as LF
from losskit import _native
from losskit._core import switches

native = _native.load() if os.environ.get("LOSSKIT_NATIVE", "1") != "0" else None
pytestmark = pytest.mark.skipif(
    native is None, reason="losskit._native is not built here (make test builds it and sets LOSSKIT_NATIVE=require)"
)


def _inputs(steps, batch, classes, longest, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_probs = (torch.randn(steps, batch, classes, generator=g, dtype=torch.float64) * 3).log_softmax(2).to(dtype)
    targets = torch.randint(1, classes, (batch, longest), generator=g)
    targets[:, 1::3] = targets[:, 0::3][:, : targets[:, 1::3].shape[1]]  # repeated labels: steps of two refused
    input_lengths = torch.randint(max(steps // 2, 1), steps + 1, (batch,), generator=g)
    target_lengths = torch.randint(0, longest + 1, (batch,), generator=g)
    input_lengths[0], target_lengths[0] = steps, longest
    if batch > 2:
        input_lengths[1], target_lengths[1] = 1, longest  # impossible: inf, or 0 with zero_infinity
    return log_probs, targets, input_lengths, target_lengths


def _run(args, reduction, zero_infinity, want_grad):
    log_probs = args[0].detach().requires_grad_(want_grad)
    loss = LF.ctc_loss(log_probs, *args[1:], reduction=reduction, zero_infinity=zero_infinity)
    if not want_grad:
        return loss, None
    grad_output = torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return loss.detach(), torch.autograd.grad(loss, log_probs, grad_output)[0]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("size", [(7, 3, 5, 2), (50, 16, 20, 12), (40, 24, 30, 350)])  # the last: 2 L N > 32768
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_same_bits_as_the_python_kernel(threads, size, dtype):
    args = _inputs(*size, dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for reduction in ("mean", "sum", "none"):
            for zero_infinity in (False, True):
                for want_grad in (True, False):
                    got = _run(args, reduction, zero_infinity, want_grad)
                    with switches.without_native():
                        want = _run(args, reduction, zero_infinity, want_grad)
                    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
                    if want_grad:
                        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, equal_nan=True)
    finally:
        torch.set_num_threads(before)


def test_the_compiled_kernel_serves_eager_cpu_calls(monkeypatch):
    calls = []
    real = native.ctc_loss_and_grad

    def spy(*args):
        calls.append(args[5])
        return real(*args)

    monkeypatch.setattr(native, "ctc_loss_and_grad", spy)
    log_probs, targets, il, tl = _inputs(9, 4, 6, 3, torch.float32)
    LF.ctc_loss(log_probs.requires_grad_(), targets, il, tl).backward()
    with torch.no_grad():
        LF.ctc_loss(log_probs, targets, il, tl)
    assert calls == [True, False]
