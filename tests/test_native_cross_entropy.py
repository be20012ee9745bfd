"""The compiled forms of cross_entropy and nll_loss (losskit/_native/src/cross_entropy.cpp)
and their one-read target checks: the same bits as the Python kernels over the everyday
options, shapes and dtypes, the same errors and warnings, and torch's numbers.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from losskit import _native
from losskit._core import switches

native = _native.load() if os.environ.get("LOSSKIT_NATIVE", "1") != "0" else None
needs_native = pytest.mark.skipif(native is None, reason="losskit._native is not built here")


def _logits(n, c, dtype, seed=0, underflow=False, transposed=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) * 3
    target = torch.randint(0, c, (n,), generator=g)
    if underflow:  # p_y below float32's range in every other row: the logsumexp fallback
        x[::2].scatter_(1, target[::2, None], -200.0)
    if transposed:
        x = x.t().contiguous().t()
    return x.to(dtype).requires_grad_(), target


def _both(fn, x, *args, grad_output=None, **kwargs):
    """(loss, grad) with and without the compiled part, on the same inputs."""
    out = []
    for context in (switches.without_native, switches.chunk_sizes):
        with context():
            xi = x.detach().clone().requires_grad_()
            loss = fn(xi, *args, **kwargs)
            g = torch.full_like(loss, 0.75) if grad_output is None else grad_output(loss)
            (grad,) = torch.autograd.grad(loss, xi, g)
            out.append((loss.detach(), grad))
    return out


def _same_bits(fn, x, *args, **kwargs):
    (ref_loss, ref_grad), (loss, grad) = _both(fn, x, *args, **kwargs)
    assert loss.dtype == ref_loss.dtype and grad.dtype == ref_grad.dtype == x.dtype
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0, equal_nan=True)


def _per_row(loss):
    return torch.linspace(-2, 3, loss.numel()).reshape(loss.shape).to(loss.dtype)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"weight": "w"},
    {"weight": "w", "label_smoothing": 0.2},
    {"ignore": True},
    {"ignore": True, "label_smoothing": 0.1},
    {"ignore": True, "weight": "w", "label_smoothing": 0.3},
    {"ignore": "all"},
    {"ignore": "all", "weight": "w", "label_smoothing": 0.1},
]


def _options(opts, target, c):
    kwargs = {}
    if "weight" in opts:
        kwargs["weight"] = torch.rand(c, generator=torch.Generator().manual_seed(3)) + 0.5
    if "label_smoothing" in opts:
        kwargs["label_smoothing"] = opts["label_smoothing"]
    target = target.clone()
    if opts.get("ignore") is True:
        target[1::3] = -100
    elif opts.get("ignore") == "all":
        target[:] = -100
    return target, kwargs


@needs_native
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 10), (1, 7), (5, 1000)], ids=str)
def test_cross_entropy_same_bits_with_and_without_native(shape, dtype, reduction, opts):
    for underflow in (False, True):
        x, target = _logits(*shape, dtype, underflow=underflow)
        target, kwargs = _options(opts, target, shape[1])
        if shape[0] == 1 and opts.get("ignore") is True:
            target[:] = -100
        _same_bits(LF.cross_entropy, x, target, reduction=reduction, grad_output=_per_row, **kwargs)


@needs_native
@pytest.mark.parametrize("opts", [o for o in OPTIONS if "label_smoothing" not in o], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nll_loss_same_bits_with_and_without_native(dtype, reduction, opts):
    x, target = _logits(64, 10, torch.float32)
    log_probs = torch.log_softmax(x.detach(), 1).to(dtype)
    target, kwargs = _options(opts, target, 10)
    _same_bits(LF.nll_loss, log_probs, target, reduction=reduction, grad_output=_per_row, **kwargs)


@needs_native
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_strided_inputs_int32_targets_and_gradient_one(fn):
    x, target = _logits(16, 6, torch.float32, transposed=True)
    assert not x.is_contiguous()
    _same_bits(getattr(LF, fn), x, target.int(), grad_output=lambda loss: torch.ones_like(loss))
    _same_bits(getattr(LF, fn), x, target.to(torch.uint8))


@needs_native
def test_several_chunks_decline_to_the_python_kernel():
    x, target = _logits(64, 10, torch.float32)
    with switches.chunk_sizes(cross_entropy_bytes=4 * 10 * 8):  # 8 rows a chunk
        _same_bits(LF.cross_entropy, x, target, reduction="none", grad_output=_per_row)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_loss_alone_under_no_grad(fn, dtype):
    x, target = _logits(64, 10, dtype, underflow=True)
    target[::5] = -100
    for reduction in ("mean", "none"):
        with torch.no_grad():
            got = getattr(LF, fn)(x, target, reduction=reduction)
            with switches.without_native():
                ref = getattr(LF, fn)(x, target, reduction=reduction)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_against_torch_with_every_everyday_option(fn, reduction):
    x, target = _logits(32, 7, torch.float32)
    target[::4] = -100
    if fn == "nll_loss":
        x = torch.log_softmax(x.detach(), 1).requires_grad_()
    weight = torch.rand(7) + 0.5
    xt = x.detach().clone().requires_grad_()
    loss = getattr(LF, fn)(x, target, weight=weight, reduction=reduction)
    expected = getattr(TF, fn)(xt, target, weight=weight, reduction=reduction)
    torch.testing.assert_close(loss, expected)
    g = _per_row(loss)
    torch.testing.assert_close(torch.autograd.grad(loss, x, g)[0], torch.autograd.grad(expected, xt, g)[0])


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_the_nll_node_and_cross_entropy_node_are_fused(fn):
    x, target = _logits(8, 5, torch.float32)
    loss = getattr(LF, fn)(x, target)
    name = {"cross_entropy": "FusedCrossEntropyBackward", "nll_loss": "FusedNllLossBackward"}[fn]
    assert type(loss.grad_fn).__name__ == name or loss.grad_fn.name() == name


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("bad", [10, -1, 12345])
def test_out_of_range_targets_raise_the_same_error(fn, bad):
    x, target = _logits(8, 10, torch.float32)
    target[5] = bad
    target[6] = -100
    messages = []
    for context in (switches.without_native, switches.chunk_sizes):
        with context(), pytest.raises(IndexError) as info:
            getattr(LF, fn)(x, target)
        messages.append(str(info.value))
    assert messages[0] == messages[1] == f"{fn}: target {bad} at index (5,) is out of range for 10 classes"


def test_probabilities_warn_once_at_the_callers_line():
    probs = torch.softmax(torch.randn(8, 5), 1).requires_grad_()
    target = torch.randint(0, 5, (8,))
    for context in (switches.without_native, switches.chunk_sizes):
        with context(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            LF.cross_entropy(probs, target)
        assert len(caught) == 1 and "looks like probabilities" in str(caught[0].message)
        assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LF.cross_entropy(probs.detach().abs() + 1.0, target)  # non-negative, but rows do not sum to 1


@needs_native
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["fused_cross_entropy", "fused_nll_loss"])
def test_the_fused_ops_compiled_forward_gives_the_python_forwards_bits(op, dtype, opts):
    # The path of callers that validate their own targets (keras, focal, ...): the fused op
    # with its native_forward, against its Python forward.
    from losskit._core.options import CrossEntropyOptions
    from losskit.kernels import cross_entropy as kernels

    x, target = _logits(24, 9, dtype, underflow=True)
    target, kwargs = _options(opts, target, 9)
    eps = kwargs.get("label_smoothing", 0.0) if op == "fused_cross_entropy" else 0.0
    valid = target != -100
    for reduction in ("mean", "sum", "none"):
        options = CrossEntropyOptions(label_smoothing=eps, reduction=reduction)
        _same_bits(lambda xi: getattr(kernels, op)(xi, torch.where(valid, target, 0), valid, kwargs.get("weight"),
                                                   options=options),
                   x, grad_output=_per_row)
