"""The ``temperature`` option on every cross-entropy path, against torch's
``cross_entropy(logits / T)`` (after soft-capping, when that is set), values and gradients.

Paths: the fused CPU kernel (float32, and float64 held to its tolerances by
``fused_only``), the composed reference, the Triton kernel (through the interpreter on
CPU), linear cross-entropy (fused, reduction='none' recomputing in backward, and the
composed K-dimensional form), the nn Modules, and torch.compile. The vocabulary-parallel
losses are tested over gloo in test_distributed.py.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
import losskit.nn as lnn
from losskit.kernels import fused_only, reference_only, triton_support

N, C, H = 10, 7, 5


def tempered(x, T, softcap=None):
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    return z / T


def _inputs(dtype):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(N, C, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, C, (N,), generator=gen)
    target[[1, 6]] = -100
    weight = torch.rand(C, generator=gen, dtype=torch.float64).to(dtype) + 0.5
    return x, target, weight


def _compare(ours, theirs, leaves, dtype, grad_output=None):
    got, want = ours(*leaves), theirs(*leaves)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, want, **tol)
    g = torch.rand(want.shape, dtype=want.dtype, generator=torch.Generator().manual_seed(2)) + 0.5
    got_grads = torch.autograd.grad(got, leaves, g)
    want_grads = torch.autograd.grad(want, leaves, g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **tol)


def _path(name):
    if name == "reference":
        return reference_only()
    if name == "fused float64":
        return fused_only()
    if name == "triton":
        if not (triton_support.available() and triton_support.interpreting()):
            pytest.skip("Triton's interpreter is not available")
        stack = contextlib.ExitStack()
        stack.enter_context(triton_support.on_cpu())
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy on masked lanes
        return stack
    return contextlib.nullcontext()


PATHS = ["fused", "fused float64", "reference", "triton"]
OPTIONS = [
    {},
    {"label_smoothing": 0.1, "weight": True},
    {"softcap": 4.0, "lse_square_scale": 1e-2},
    {"label_smoothing": 0.2, "softcap": 3.0, "weight": True, "lse_square_scale": 1e-3},
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("T", [0.5, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_cross_entropy_equals_torch_on_tempered_logits(path, T, reduction, options):
    dtype = torch.float64 if path in ("fused float64", "reference") else torch.float32
    x, target, weight = _inputs(dtype)
    kw = {k: v for k, v in options.items() if k != "weight"}
    w = weight if options.get("weight") else None
    zloss = kw.pop("lse_square_scale", 0.0)
    softcap = kw.get("softcap")

    def ours(x):
        return LF.cross_entropy(x, target, weight=w, reduction=reduction, temperature=T, lse_square_scale=zloss, **kw)

    def theirs(x):
        z = tempered(x, T, softcap)
        loss = TF.cross_entropy(z, target, weight=w, reduction=reduction, label_smoothing=kw.get("label_smoothing", 0.0))
        if zloss:  # the z-loss, averaged over the rows that count under 'mean' (cross_entropy's docstring)
            valid = target != -100
            z_loss = torch.where(valid, zloss * torch.logsumexp(z, 1).square(), 0.0)
            loss = loss + (z_loss if reduction == "none" else z_loss.sum() / (valid.sum() if reduction == "mean" else 1))
        return loss

    with _path(path):
        _compare(ours, theirs, [x.clone().requires_grad_()], dtype)


def test_k_dimensional_and_probability_targets_take_the_temperature_too():
    x = torch.randn(3, C, 4, requires_grad=True)
    target = torch.randint(0, C, (3, 4))
    _compare(lambda x: LF.cross_entropy(x, target, temperature=0.3),
             lambda x: TF.cross_entropy(x / 0.3, target), [x], torch.float32)
    probs = torch.softmax(torch.randn(3, C, 4), 1)
    _compare(lambda x: LF.cross_entropy(x, probs, temperature=1.7, label_smoothing=0.1),
             lambda x: TF.cross_entropy(x / 1.7, probs, label_smoothing=0.1), [x], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_linear_cross_entropy_equals_torch_on_tempered_logits(dtype, reduction, softcap):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, N, H, generator=gen, dtype=dtype)
    w = torch.randn(C, H, generator=gen, dtype=dtype)
    b = torch.randn(C, generator=gen, dtype=dtype)
    target = torch.randint(0, C, (2, N), generator=gen)
    target[0, 3] = -100

    def ours(x, w, b):
        return LF.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, temperature=0.6,
                                       softcap=softcap, label_smoothing=0.1, chunk_size=3)

    def theirs(x, w, b):
        logits = tempered(x @ w.T + b, 0.6, softcap)
        return TF.cross_entropy(logits.reshape(-1, C), target.reshape(-1), reduction=reduction,
                                label_smoothing=0.1).reshape(target.shape if reduction == "none" else ())

    with fused_only():
        _compare(ours, theirs, [t.clone().requires_grad_() for t in (x, w, b)], dtype)


def test_linear_cross_entropy_with_k_dimensional_weight_takes_the_temperature():
    x = torch.randn(4, H, requires_grad=True)
    w = torch.randn(C, 2, H, requires_grad=True)
    target = torch.randint(0, C, (4, 2))
    _compare(lambda x, w: LF.linear_cross_entropy(x, w, target, temperature=2.5),
             lambda x, w: TF.cross_entropy(torch.einsum("nh,cdh->ncd", x, w) / 2.5, target), [x, w], torch.float32)


def test_modules_take_the_temperature():
    x, target, _ = _inputs(torch.float32)
    module = lnn.CrossEntropyLoss(temperature=1.3, label_smoothing=0.05)
    leaf = x.clone().requires_grad_()
    _compare(lambda x: module(x, target), lambda x: TF.cross_entropy(x / 1.3, target, label_smoothing=0.05),
             [leaf], torch.float32)
    head = lnn.LinearCrossEntropyLoss(H, C, bias=True, temperature=0.8)
    hidden = torch.randn(N, H, requires_grad=True)
    _compare(lambda h: head(h, target), lambda h: TF.cross_entropy(head.linear(h) / 0.8, target), [hidden],
             torch.float32)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_a_temperature_that_is_not_positive_and_finite_is_an_error(bad):
    x, target, _ = _inputs(torch.float32)
    message = f"temperature must be a positive, finite number; got {bad}"
    with pytest.raises(ValueError, match=f"cross_entropy: {message}"):
        LF.cross_entropy(x, target, temperature=bad)
    with pytest.raises(ValueError, match=f"linear_cross_entropy: {message}"):
        LF.linear_cross_entropy(torch.randn(N, H), torch.randn(C, H), target, temperature=bad)
    with pytest.raises(ValueError, match=f"CrossEntropyLoss: {message}"):
        lnn.CrossEntropyLoss(temperature=bad)
    with pytest.raises(ValueError, match=f"LinearCrossEntropyLoss: {message}"):
        lnn.LinearCrossEntropyLoss(H, C, temperature=bad)


def test_compiled_fused_paths_take_the_temperature():
    x, target, _ = _inputs(torch.float32)
    hidden, head = torch.randn(N, H), torch.randn(C, H)

    def both(x, h, w):
        return (LF.cross_entropy(x, target, temperature=0.7, label_smoothing=0.1)
                + LF.linear_cross_entropy(h, w, target, temperature=1.9, chunk_size=4))

    def theirs(x, h, w):
        return (TF.cross_entropy(x / 0.7, target, label_smoothing=0.1)
                + TF.cross_entropy(h @ w.T / 1.9, target))

    leaves = [t.clone().requires_grad_() for t in (x, hidden, head)]
    _compare(torch.compile(both, fullgraph=True, backend="aot_eager"), theirs, leaves, torch.float32)
