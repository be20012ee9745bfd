"""losskit's compiled part (losskit._native): built where the suite runs, and the same
numbers as the Python forms it replaces, for every loss of the catalog.

``make test`` sets LOSSKIT_NATIVE=require, so a missing build fails here (and at the first
fused call) instead of letting every test pass on the Python forms alone.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch.utils._pytree import tree_flatten

import losskit.functional as LF
from cases import CASES
from inputs import Inputs
from losskit import _native
from losskit._core import switches

native = _native.load() if os.environ.get("LOSSKIT_NATIVE", "1") != "0" else None
needs_native = pytest.mark.skipif(
    native is None, reason="losskit._native is not built here (make test builds it and sets LOSSKIT_NATIVE=require)"
)


def test_the_compiled_part_is_built_where_required():
    if os.environ.get("LOSSKIT_NATIVE") != "require":
        pytest.skip("LOSSKIT_NATIVE=require is not set (make test sets it)")
    assert _native.load() is not None


def test_a_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv("LOSSKIT_NATIVE", "yes")
    with pytest.raises(ValueError, match="LOSSKIT_NATIVE must be 0, 1 or require; got 'yes'"):
        _native._wanted()


def test_the_build_tag_follows_the_sources(tmp_path, monkeypatch):
    before = _native.tag()
    copy = tmp_path / "precomputed.cpp"
    copy.write_bytes(_native.SOURCES[0].read_bytes() + b"\n// changed\n")
    monkeypatch.setattr(_native, "SOURCES", [copy, *_native.SOURCES[1:]])
    assert _native.tag() != before


def _run(case, grad_output=None):
    torch.manual_seed(0)  # the parameters of the nn.Module cases
    fn, args, kwargs = case.build(Inputs("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = fn(*args, **kwargs)
    leaves = [t for t in tree_flatten((list(args), kwargs))[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    leaves += list(getattr(fn, "parameters", lambda: [])())
    if grad_output is None:
        grad_output = torch.full_like(loss, 0.75)
    grads = torch.autograd.grad(loss, leaves, grad_output, allow_unused=True)
    return loss.detach(), grads, type(loss.grad_fn).__name__ if loss.grad_fn is not None else None


@needs_native
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_case_gives_the_same_bits_with_and_without_the_compiled_part(case):
    loss, grads, _ = _run(case)
    with switches.without_native():
        ref_loss, ref_grads, _ = _run(case)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0, equal_nan=True)
    for grad, ref in zip(grads, ref_grads):
        assert (grad is None) == (ref is None)
        if grad is not None:
            assert grad.dtype == ref.dtype and grad.shape == ref.shape
            torch.testing.assert_close(grad, ref, rtol=0, atol=0, equal_nan=True)


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=g).to(dtype).requires_grad_()
    return x, torch.randint(0, 5, (8,), generator=g), torch.randn(8, 5, generator=g).to(dtype)


@needs_native
def test_the_node_is_named_after_the_loss_and_keeps_only_the_gradient():
    x, y, _ = _inputs()
    loss = LF.cross_entropy(x, y)
    assert loss.grad_fn.name() == "FusedCrossEntropyBackward"
    (held,) = native.held(loss.grad_fn)
    assert held.shape == x.shape
    loss.backward()
    assert native.held(loss.grad_fn) == []  # handed out once
    assert native.held(x.pow(2).sum().grad_fn) == []  # not ours


@needs_native
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_output_scales_per_row_and_per_element_and_casts(reduction, dtype):
    x, y, t = _inputs(dtype)
    for fn, args in ((LF.cross_entropy, (x, y)), (LF.huber_loss, (x, t))):
        results = []
        for context in (switches.without_native, lambda: switches.chunk_sizes()):
            with context():
                loss = fn(*args, reduction=reduction)
                grad_output = torch.linspace(-2, 3, loss.numel()).reshape(loss.shape).to(loss.dtype)
                results.append((loss.detach(), torch.autograd.grad(loss, x, grad_output)[0]))
        (ref_loss, ref_grad), (got_loss, got_grad) = results
        assert got_grad.dtype == dtype
        torch.testing.assert_close(got_loss, ref_loss, rtol=0, atol=0)
        torch.testing.assert_close(got_grad, ref_grad, rtol=0, atol=0)


@needs_native
def test_create_graph_and_a_second_backward_replay_on_the_reference_path():
    x, y, _ = _inputs(torch.float32)
    loss = LF.cross_entropy(x, y)
    assert loss.grad_fn.name() == "FusedCrossEntropyBackward"
    (first,) = torch.autograd.grad(loss, x, create_graph=True)
    (second,) = torch.autograd.grad(first.pow(2).sum(), x)
    xr = x.detach().requires_grad_()
    ref = torch.nn.functional.cross_entropy(xr, y)
    (ref_first,) = torch.autograd.grad(ref, xr, create_graph=True)
    (ref_second,) = torch.autograd.grad(ref_first.pow(2).sum(), xr)
    torch.testing.assert_close(first, ref_first)
    torch.testing.assert_close(second, ref_second)

    zeros = torch.zeros_like(x)  # kept: the replay reads the inputs again
    loss = LF.mse_loss(x, zeros)
    (once,) = torch.autograd.grad(loss, x, retain_graph=True)
    (twice,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(once, twice)
    torch.testing.assert_close(once, 2 * x.detach() / x.numel())


@needs_native
def test_a_replay_after_the_input_changed_raises():
    x, y, _ = _inputs()
    loss = LF.cross_entropy(x, y)
    torch.autograd.grad(loss, x, retain_graph=True)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="an input was freed or changed in place since forward"):
        torch.autograd.grad(loss, x)


def test_without_the_build_every_loss_runs_its_python_form(tmp_path):
    import subprocess
    import sys

    code = (
        "import torch, losskit._native as n, losskit.functional as F\n"
        "assert n.load() is None\n"
        "x = torch.randn(4, 3, requires_grad=True)\n"
        "loss = F.cross_entropy(x, torch.tensor([0, 1, 2, 0]))\n"
        "loss.backward()\n"
        "print(type(loss.grad_fn).__name__)\n"
    )
    env = {**os.environ, "LOSSKIT_NATIVE_DIR": str(tmp_path), "LOSSKIT_NATIVE": "1"}  # an empty build folder
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "FusedCrossEntropyBackward"
    env["LOSSKIT_NATIVE"] = "require"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "LOSSKIT_NATIVE=require" in done.stderr
