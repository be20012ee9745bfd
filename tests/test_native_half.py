"""The compiled part's one-pass bfloat16 loops (src/half_blocks.h, used by src/hinge.cpp and
src/pointwise.cpp's regression losses):

- the block conversions give c10's bits: every bfloat16 value read as float, and float
  patterns (ties, the largest finite values and overflow, denormals, NaN payloads, -0)
  rounded to bfloat16, beside c10::BFloat16(float) and torch's own .to(torch.bfloat16);
- keras.hinge / squared_hinge and mse / l1 / smooth_l1 / huber give the Python forms' bits
  (loss and gradients) in bfloat16 and float16, below and above 2^16 elements, at sizes
  that are no multiple of the block, over chunks, with NaN, infinities, -0 and ties in the
  inputs, every reduction and the weights;
- smooth_l1 / huber's e - c / 2 among denormal errors and clamp bounds, where ATen's CPU
  kernels round once (a fused multiply-add) and the loops copy them.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

import losskit.functional as LF
import losskit.keras as K
from losskit import _native
from losskit._core import switches

native = _native.load() if os.environ.get("LOSSKIT_NATIVE", "1") != "0" else None
needs_native = pytest.mark.skipif(
    native is None, reason="losskit._native is not built here (make test builds it and sets LOSSKIT_NATIVE=require)"
)

HALF = [torch.bfloat16, torch.float16]


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _same_bits(mine, theirs):
    """Bit for bit, any NaN equal to any NaN (ATen's vectorised conversions and c10's scalar
    one write different NaN payloads)."""
    assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
    nan = theirs.isnan()
    assert torch.equal(mine.isnan(), nan)
    assert torch.equal(_bits(mine)[~nan], _bits(theirs)[~nan])


def _float_patterns():
    """Float32 bit patterns: each exponent with the mantissas around bfloat16's rounding
    point (ties, one below, one above, odd and even kept bits), the largest finite values
    (which round to infinity), denormals, infinities, NaNs with payloads, zeros of both
    signs, and random patterns."""
    low = [0, 1, 2, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x10000, 0x17FFF, 0x18000, 0x18001, 0x3FFFFF, 0x400000,
           0x7F7FFF, 0x7F8000, 0x7FFFFF]
    patterns = [(sign << 31) | (exp << 23) | m for sign in (0, 1) for exp in range(256) for m in low]
    patterns += [0x7F7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0xFF7FFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001,
                 0x7FBFFFFF, 0x7FC00001, 0x80000000, 0x00000000, 0x00000001, 0x80000001]
    fixed = torch.tensor(patterns, dtype=torch.int64)
    random = torch.randint(-(2**31), 2**31, (1 << 20,), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    every_kept = torch.arange(1 << 16, dtype=torch.int64) << 16  # each bfloat16 value, exactly representable
    return torch.cat([fixed, random, every_kept, every_kept | 0x8000]).to(torch.int32).view(torch.float32)


@needs_native
def test_the_block_conversions_give_c10s_and_torchs_bits():
    f = _float_patterns()
    for n in (f.numel(), f.numel() - 77, 300, 5):  # whole blocks and a short tail
        mine, c10, back, c10_back = native.bf16_blocks_check(f[:n].contiguous())
        _same_bits(mine, c10)
        assert torch.equal(_bits(mine), _bits(c10))  # c10's NaN too: 0x7FC0
        _same_bits(mine, f[:n].to(torch.bfloat16))
        _same_bits(back, c10_back)
        _same_bits(back, c10.float())


@needs_native
def test_every_bfloat16_value_reads_as_c10_reads_it_and_rounds_back_to_itself():
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    as_float = every.float()  # torch's conversion
    mine, c10, back, c10_back = native.bf16_blocks_check(as_float.contiguous())
    _same_bits(back, as_float)
    _same_bits(back, c10_back)
    nan = every.isnan()
    assert torch.equal(_bits(mine)[~nan], _bits(every)[~nan])  # each value rounds to itself
    assert (_bits(mine)[nan] == 0x7FC0).all()


# ---- the losses ------------------------------------------------------------------------

SIZES = [(9, 7), (256, 257), (300, 301)]  # 63, 65792 (just above 2^16: a short block), 90300


def _specials(shape, dtype, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    flat = x.view(-1)
    flat[:8] = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 0.5, -0.7, 1.0])
    flat[-3:] = torch.tensor([1e-40, -3e-39, 65504.0 * 8])  # denormals (bfloat16 keeps them) and past float16's range
    return x.to(dtype)


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _hinge_call(fn, t, x, grad_output_seed=5):
    x = x.detach().clone().requires_grad_()
    loss = fn(t, x)
    grad_output = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(grad_output_seed)) + 0.5).to(loss.dtype)
    (grad,) = torch.autograd.grad(loss, x, grad_output)
    return loss.detach(), grad, type(loss.grad_fn).__name__


HINGE_CALLS = list(itertools.product(["hinge", "squared_hinge"], ["signs", "binary", "reals"], HALF, SIZES))


@needs_native
@pytest.mark.parametrize("name, labels, dtype, shape", HINGE_CALLS,
                         ids=[f"{n}-{lab}-{str(d)[6:]}-{s[0]}x{s[1]}" for n, lab, d, s in HINGE_CALLS])
def test_the_compiled_hinge_gives_the_python_bits_at_every_size(name, labels, dtype, shape):
    fn = getattr(K, name)
    x = _specials(shape, dtype, 1)
    g = torch.Generator().manual_seed(2)
    if labels == "signs":
        t = (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(dtype)
    elif labels == "binary":
        t = torch.randint(0, 2, shape, generator=g).to(dtype)
    else:
        t = torch.randn(shape, generator=g).to(dtype)
        t.view(-1)[:3] = torch.tensor([1.0, -1.0, 0.5])  # ties 1 - t x = 0 at x = 1, (-0.7 rounds), 0.5
    loss, grad, node = _hinge_call(fn, t, x)
    with switches.without_native():
        ref_loss, ref_grad, ref_node = _hinge_call(fn, t, x)
    # bfloat16 is served at every size; float16 up to 2^16 elements (src/hinge.cpp).
    served = dtype == torch.bfloat16 or x.numel() <= 1 << 16
    assert (native.hinge_forward(x, t, name == "squared_hinge", [True]) is not None) == served
    assert node == "CppFunction" and ref_node != "CppFunction"
    _same(loss, ref_loss)
    _same(grad, ref_grad)


LOSSES = {
    "mse_loss": lambda x, y, **kw: LF.mse_loss(x, y, **kw),
    "l1_loss": lambda x, y, **kw: LF.l1_loss(x, y, **kw),
    "smooth_l1_loss": lambda x, y, **kw: LF.smooth_l1_loss(x, y, beta=0.5, **kw),
    "smooth_l1_loss-beta0": lambda x, y, **kw: LF.smooth_l1_loss(x, y, beta=0.0, **kw),
    "huber_loss": lambda x, y, **kw: LF.huber_loss(x, y, delta=0.7, **kw),
}


def _regression_call(name, x, y, w, reduction, target_grad):
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_(target_grad)
    kwargs = {"reduction": reduction}
    if w is not None:
        kwargs["weight"] = w
    loss = LOSSES[name](x, y, **kwargs)
    gen = torch.Generator().manual_seed(4)
    grad_output = (torch.randn(loss.shape, generator=gen) if reduction == "none" else torch.tensor(0.75)).to(loss.dtype)
    grads = torch.autograd.grad(loss, [x, y] if target_grad else [x], grad_output)
    return loss.detach(), grads, type(loss.grad_fn).__name__


# smooth_l1_loss has no weight (torch's has none): its weighted calls are left out.
REGRESSION_CALLS = [call for call in itertools.product(LOSSES, ["mean", "sum", "none"], [None, "same", "float32"],
                                                       HALF, [(9, 7), (300, 301)])
                    if call[2] is None or not call[0].startswith("smooth")]


@needs_native
@pytest.mark.parametrize("name, reduction, weight, dtype, shape", REGRESSION_CALLS,
                         ids=[f"{n}-{r}-{w}-{str(d)[6:]}-{s[0]}x{s[1]}" for n, r, w, d, s in REGRESSION_CALLS])
def test_the_compiled_regression_losses_give_the_python_bits(name, reduction, weight, dtype, shape):
    x, y = _specials(shape, dtype, 1), _specials(shape, dtype, 2, scale=1.0)
    g = torch.Generator().manual_seed(3)
    w = None
    if weight is not None:
        w = torch.rand(shape, generator=g).to(dtype if weight == "same" else torch.float32)
    target_grad = shape[0] == 9  # the target's gradient too at one size
    got = _regression_call(name, x, y, w, reduction, target_grad)
    with switches.without_native():
        ref = _regression_call(name, x, y, w, reduction, target_grad)
    assert got[2] == "CppFunction" and ref[2] != "CppFunction"
    _same(got[0], ref[0])
    for a, b in zip(got[1], ref[1]):
        _same(a, b)


@needs_native
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", LOSSES)
def test_chunks_and_short_blocks_give_the_python_bits(name, reduction):
    # 4099 elements in chunks of 1000 (not a multiple of the 256-element block) and of 512.
    x, y = _specials((4099,), torch.bfloat16, 5), _specials((4099,), torch.bfloat16, 6)
    w = None if name.startswith("smooth") else torch.rand(4099, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    for chunk in (1000, 512):
        with switches.chunk_sizes(pointwise_elements=chunk):
            got = _regression_call(name, x, y, w, reduction, True)
            with switches.without_native():
                ref = _regression_call(name, x, y, w, reduction, True)
        _same(got[0], ref[0])
        for a, b in zip(got[1], ref[1]):
            _same(a, b)


@needs_native
@pytest.mark.parametrize("param", [2.0**-122, 2.0**-125, 3 * 2.0**-149], ids=["2^-122", "2^-125", "odd-denormal"])
@pytest.mark.parametrize("name", ["smooth_l1_loss", "huber_loss"])
def test_denormal_errors_and_parameters_give_the_python_bits(name, param):
    # Errors e = x - y among float32's denormals, within and beyond the clamp, and a clamp
    # bound that is itself a denormal with its last bit set: there c / 2 is inexact, and
    # ATen's e - 0.5 c (one rounding where its CPU kernels fuse the multiply-add) decides the
    # term's last bits. (Within the clamp c = e, a multiple of 2^-133 for bfloat16 inputs, so
    # c / 2 is exact.) huber's weight and smooth_l1's factor 1 / beta lift the terms above
    # float32's underflow.
    step = 2.0**-133
    x = (torch.arange(1, 4001, dtype=torch.float64) * step * 3).to(torch.bfloat16)
    y = (torch.arange(1, 4001, dtype=torch.float64) * step * 2).to(torch.bfloat16)
    assert (x.float() - y.float() != 0).all()

    def fn(a, b, reduction):
        if name == "huber_loss":
            return LF.huber_loss(a, b, delta=param, reduction=reduction, weight=torch.full((4000,), 2.0**120))
        return LF.smooth_l1_loss(a, b, beta=param, reduction=reduction)

    def call(reduction):
        xx = x.clone().requires_grad_()
        loss = fn(xx, y, reduction)
        (grad,) = torch.autograd.grad(loss, xx, torch.ones_like(loss))
        return loss.detach(), grad, type(loss.grad_fn).__name__

    for reduction in ("none", "sum"):
        got = call(reduction)
        with switches.without_native():
            ref = call(reduction)
        assert got[2] == "CppFunction"
        assert reduction != "none" or (ref[0] != 0).any()  # the terms do not all underflow
        _same(got[0], ref[0])
        _same(got[1], ref[1])


@needs_native
def test_strided_and_mixed_half_inputs_take_the_former_path_with_the_python_bits():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, 30, generator=g).to(torch.bfloat16)
    y = torch.randn(30, 40, generator=g).to(torch.bfloat16).t()  # not contiguous
    for name in LOSSES:
        got = _regression_call(name, x, y, None, "sum", True)
        with switches.without_native():
            ref = _regression_call(name, x, y, None, "sum", True)
        _same(got[0], ref[0])
        for a, b in zip(got[1], ref[1]):
            _same(a, b)
