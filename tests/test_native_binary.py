"""The binary losses' compiled forms (losskit._native, binary.cpp) give the bits of their
Python kernels, and the fused binary_cross_entropy on probabilities matches torch.

Each comparison runs the same call with and without the compiled part (switches.without_native)
over weight / pos_weight broadcasting, every reduction under a grad_output that is not all
ones, half precision, chunk edges and extreme inputs; the checks that moved into C++ raise
the Python messages.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from compare import DTYPES, REDUCTIONS, check_against_torch, check_raises
from losskit import _native
from losskit._core import switches
from losskit.kernels import fused_only
from test_classification import BINARY_SHAPES, weight_shapes

native = _native.load() if os.environ.get("LOSSKIT_NATIVE", "1") != "0" else None
needs_native = pytest.mark.skipif(
    native is None, reason="losskit._native is not built here (make test builds it and sets LOSSKIT_NATIVE=require)"
)

HALF_AND_SINGLE = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(), (7,), (4, 3), (2, 3, 5), (64, 16)]


def _grads(fn, leaves, reduction):
    loss = fn()
    # A grad_output that is not all ones, per element for 'none'.
    grad_output = torch.linspace(-2, 3, loss.numel()).reshape(loss.shape).to(loss.dtype)
    grads = torch.autograd.grad(loss, leaves, grad_output)
    return loss.detach(), grads, loss.grad_fn.name()


def _same_bits(fn, leaves, reduction, fused_name):
    got = _grads(fn, leaves, reduction)
    with switches.without_native():
        want = _grads(fn, leaves, reduction)
    assert got[2] == want[2] == fused_name
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
    assert got[0].dtype == want[0].dtype
    for a, b in zip(got[1], want[1]):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _extra(shape, extra_shape, dtype, low, high):
    if extra_shape is None:
        return None
    return (torch.rand(extra_shape, dtype=torch.float64) * (high - low) + low).to(dtype)


@needs_native
@pytest.mark.parametrize("chunk", [None, 4, 5])  # one chunk; rows split at and off a row's end
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
@pytest.mark.parametrize("shape", SHAPES)
def test_bce_with_logits_native_gives_the_python_bits(shape, dtype, reduction, chunk):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype).requires_grad_()
    y = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    sizes = {} if chunk is None else {"bce_elements": chunk}
    with switches.chunk_sizes(**sizes):
        for weight_shape in weight_shapes(shape):
            for pos_weight_shape in weight_shapes(shape):
                weight = _extra(shape, weight_shape, dtype, 0.0, 1.0)
                pos_weight = _extra(shape, pos_weight_shape, dtype, 0.0, 3.0)
                _same_bits(
                    lambda: LF.binary_cross_entropy_with_logits(x, y, weight, reduction=reduction, pos_weight=pos_weight),
                    [x], reduction, "FusedBinaryCrossEntropyWithLogitsBackward",
                )


@needs_native
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
@pytest.mark.parametrize("shape", SHAPES)
def test_bce_native_gives_the_python_bits(shape, dtype, reduction):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    y = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    for weight_shape in weight_shapes(shape):
        weight = _extra(shape, weight_shape, dtype, 0.0, 2.0)
        _same_bits(lambda: LF.binary_cross_entropy(p, y, weight, reduction=reduction), [p], reduction,
                   "FusedBinaryCrossEntropyBackward")


@needs_native
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
def test_native_bits_at_extreme_inputs(dtype):
    big = torch.finfo(dtype).max
    x = torch.tensor([1e4, -1e4, 30.0, -30.0, 0.0, big, -big, float("inf"), -float("inf"), float("nan")],
                     dtype=dtype, requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 1.0, 0.0, 1.0, 0.0, 0.5], dtype=dtype)
    pos_weight = torch.tensor(2.0, dtype=dtype)
    for reduction in REDUCTIONS:
        _same_bits(lambda: LF.binary_cross_entropy_with_logits(x, y, reduction=reduction, pos_weight=pos_weight),
                   [x], reduction, "FusedBinaryCrossEntropyWithLogitsBackward")
    # Probabilities at the clamps: p = 0 and 1 (log clamped at -100, denominator at 1e-12).
    p = torch.tensor([0.0, 0.0, 1.0, 1.0, 1e-30, 0.5, 1 - 1e-7], dtype=dtype, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.3, 0.5, 1.0], dtype=dtype)
    for reduction in REDUCTIONS:
        _same_bits(lambda: LF.binary_cross_entropy(p, t, reduction=reduction), [p], reduction,
                   "FusedBinaryCrossEntropyBackward")


@needs_native
@pytest.mark.parametrize("fn", [LF.binary_cross_entropy, LF.binary_cross_entropy_with_logits])
def test_a_target_or_weight_needing_grad_takes_the_reference_with_or_without_native(fn):
    p = torch.rand(4, 3, dtype=torch.float32).clamp(0.05, 0.95).requires_grad_()
    y = torch.rand(4, 3).requires_grad_()
    w = torch.rand(3).requires_grad_()
    for args, kwargs in (((p, y), {}), ((p, y.detach()), {"weight": w})):
        results = []
        for context in (switches.chunk_sizes, switches.without_native):
            with context():
                loss = fn(*args, **kwargs)
                assert "Fused" not in loss.grad_fn.name()
                leaves = [t for t in (*args, *kwargs.values()) if t.requires_grad]
                results.append((loss.detach(), torch.autograd.grad(loss * 0.75, leaves)))
        (a, ga), (b, gb) = results
        assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(ga, gb))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", BINARY_SHAPES + [(64, 16)])
def test_fused_bce_matches_torch(shape, reduction, dtype, atol, rtol):
    # The fused path (target needing no gradient; float64 let through by fused_only), with
    # and without the compiled part.
    p = torch.rand(shape, dtype=torch.float64).clamp(0.02, 0.98).to(dtype).requires_grad_()
    target = torch.rand(shape, dtype=torch.float64).to(dtype)
    for context in (switches.chunk_sizes, switches.without_native):
        with fused_only(), context():
            assert "Fused" in LF.binary_cross_entropy(p, target).grad_fn.name()
            for weight_shape in weight_shapes(shape):
                weight = None if weight_shape is None else torch.rand(weight_shape, dtype=torch.float64).to(dtype)
                check_against_torch(LF.binary_cross_entropy, TF.binary_cross_entropy, p, target,
                                    weight=weight, reduction=reduction, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_bce_clamps_at_the_edges_as_torch(dtype):
    p = torch.tensor([0.0, 0.0, 1.0, 1.0, 1e-30, 0.5], dtype=dtype, requires_grad=True)
    target = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.3, 0.5], dtype=dtype)
    with fused_only():
        assert "Fused" in LF.binary_cross_entropy(p, target).grad_fn.name()
        out = check_against_torch(LF.binary_cross_entropy, TF.binary_cross_entropy, p, target, reduction="none",
                                  rtol=1e-6)
        check_against_torch(LF.binary_cross_entropy, TF.binary_cross_entropy, p, target, rtol=1e-6)
    assert out[1] == 100 and out[2] == 100


def test_fused_bce_double_backward_replays_the_reference():
    p = torch.rand(5, 3, dtype=torch.float32).clamp(0.05, 0.95).requires_grad_()
    y = torch.rand(5, 3)
    loss = LF.binary_cross_entropy(p, y)
    assert "Fused" in loss.grad_fn.name()
    (first,) = torch.autograd.grad(loss, p, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), p)
    pr = p.detach().double().requires_grad_()
    (want_first,) = torch.autograd.grad(TF.binary_cross_entropy(pr, y.double()), pr, create_graph=True)
    (want_second,) = torch.autograd.grad(want_first.sum(), pr)
    torch.testing.assert_close(first.double(), want_first, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(second.double(), want_second, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_probability_checks_name_the_value_with_or_without_native(native_on, dtype):
    context = switches.chunk_sizes if native_on else switches.without_native
    ok = torch.tensor([0.2, 0.9], dtype=dtype)
    with context():
        check_raises(LF.binary_cross_entropy, torch.tensor([0.5, 1.5], dtype=dtype), ok,
                     match="binary_cross_entropy: input must hold probabilities in [0, 1]; found 1.5 at index (1,). "
                           "For raw scores (logits) use binary_cross_entropy_with_logits")
        check_raises(LF.binary_cross_entropy, ok, torch.tensor([float("nan"), 0.0], dtype=dtype),
                     match="binary_cross_entropy: target must hold probabilities in [0, 1]; found nan at index (0,)")
        # Strided: the index is the caller's, not that of a contiguous copy.
        bad = torch.full((3, 4), 0.5, dtype=dtype).t()
        bad[2, 1] = -0.25
        check_raises(LF.binary_cross_entropy, bad, torch.full((4, 3), 0.5, dtype=dtype),
                     match="found -0.25 at index (2, 1)")
        # Checks off: nothing read, and torch's arithmetic gives what it gives.
        with switches.checks("off"):
            LF.binary_cross_entropy(torch.tensor([0.5, 1.5], dtype=dtype), ok)


@needs_native
def test_the_host_check_in_cpp_reads_every_element():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        t = torch.rand(1000, dtype=torch.float64).to(dtype)
        assert native.in_unit_interval(t)
        assert native.in_unit_interval(torch.tensor([0.0, 1.0], dtype=dtype))
        assert native.in_unit_interval(t[::3])  # strided
        for bad in (-1e-3, 1.25, float("nan"), float("inf"), -float("inf")):
            u = t.clone()
            u[999] = bad
            assert not native.in_unit_interval(u)
    assert not native.in_unit_interval(torch.tensor([0, 1]))  # not read in C++: the Python check decides


def test_weight_shape_checks_keep_their_message():
    x = torch.randn(4, 3)
    y = torch.rand(4, 3)
    for fn, name in ((LF.binary_cross_entropy_with_logits, "weight"), (LF.binary_cross_entropy_with_logits, "pos_weight"),
                     (LF.binary_cross_entropy, "weight")):
        for shape in ((4,), (2, 4, 3), (5, 1)):
            inputs = (torch.sigmoid(x), y) if fn is LF.binary_cross_entropy else (x, y)
            check_raises(fn, *inputs, **{name: torch.ones(shape)},
                         match=f"{fn.__name__}: {name} of shape {shape} does not broadcast to the input shape (4, 3)")
        for shape in ((), (1,), (3,), (1, 3), (4, 1), (4, 3)):
            fn(*((torch.sigmoid(x), y) if fn is LF.binary_cross_entropy else (x, y)), **{name: torch.ones(shape)})
