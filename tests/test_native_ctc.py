"""losskit's compiled CTC kernel (losskit/_native/src/ctc.cpp) against the Python kernel it
replaces (losskit/kernels/ctc.py): the same bits for the loss and the gradient, on one
thread and on two (where the forward and the reversed problem run on a thread each), at
sizes on both sides of the size above which they run as the Python kernel does, for every
reduction, zero_infinity, float64, and calls without a gradient."""

from __future__ import annotations

import contextlib
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
    for name in ("ctc_loss_and_grad", "ctc_loss_attached"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    log_probs, targets, il, tl = _inputs(9, 4, 6, 3, torch.float32)
    log_probs.requires_grad_()
    loss = LF.ctc_loss(log_probs, targets, il, tl)
    assert loss.grad_fn.name() == "CTCLossBackward"
    loss.backward()
    LF.ctc_loss(log_probs, targets, il, tl, reduction="none").sum().backward()  # through CTCLoss
    with torch.no_grad():
        LF.ctc_loss(log_probs, targets, il, tl)
    assert calls == ["ctc_loss_attached", "ctc_loss_and_grad", "ctc_loss_and_grad"]


def _saved_bytes(loss):
    return sum(t.untyped_storage().nbytes() for t in native.ctc_held(loss.grad_fn))


def test_the_node_keeps_one_gradient_no_more_than_torch_saves():
    # tests/test_memory.py sees the gradients precomputed.cpp's node keeps (native.held),
    # not this node's: measured here the same way, against torch's saved tensors.
    log_probs, targets, il, tl = _inputs(60, 8, 20, 12, torch.float32)
    log_probs.requires_grad_()
    loss = LF.ctc_loss(log_probs, targets, il, tl)
    assert _saved_bytes(loss) == log_probs.numel() * 4
    found = {}

    def pack(t):
        found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.ctc_loss(log_probs, targets, il, tl)
    assert _saved_bytes(loss) <= sum(found.values())
    loss.backward()
    assert native.ctc_held(loss.grad_fn) == []  # handed out by the last backward


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_twice_create_graph_and_a_freed_graph_as_the_python_node(reduction):
    log_probs, targets, il, tl = _inputs(9, 4, 6, 3, torch.float64)
    results = []
    for context in (switches.without_native, contextlib.nullcontext):
        with context():
            x = log_probs.clone().requires_grad_()
            loss = LF.ctc_loss(x.log_softmax(2), targets, il, tl, reduction=reduction)  # the input freed
            first = torch.autograd.grad(loss, x, torch.tensor(0.75, dtype=loss.dtype), retain_graph=True)[0]
            second = torch.autograd.grad(loss, x)[0]
            with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                torch.autograd.grad(loss, x)
            go = torch.tensor(1.5, dtype=loss.dtype, requires_grad=True)
            loss = LF.ctc_loss(x, targets, il, tl, reduction=reduction)
            (third,) = torch.autograd.grad(loss, x, go, create_graph=True)
            with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once"):
                third.sum().backward()
            results.append((first, second, third.detach()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
