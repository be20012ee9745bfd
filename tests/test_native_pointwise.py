"""The compiled forms of the pointwise regression losses (losskit._native's pointwise_regression)
and of losskit.info's value checks: the same bits and the same decisions as the Python forms,
over the calls the catalog cases do not reach (tests/test_native.py runs those).
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

import losskit.functional as LF
from losskit import _native, info, keras
from losskit._core import switches

native = _native.load() if os.environ.get("LOSSKIT_NATIVE", "1") != "0" else None
needs_native = pytest.mark.skipif(
    native is None, reason="losskit._native is not built here (make test builds it and sets LOSSKIT_NATIVE=require)"
)

LOSSES = {
    "mse_loss": lambda x, y, **kw: LF.mse_loss(x, y, **kw),
    "l1_loss": lambda x, y, **kw: LF.l1_loss(x, y, **kw),
    "smooth_l1_loss": lambda x, y, weight=None, **kw: LF.smooth_l1_loss(x, y, beta=0.5, **kw),
    "smooth_l1_loss-beta0": lambda x, y, weight=None, **kw: LF.smooth_l1_loss(x, y, beta=0.0, **kw),
    "huber_loss": lambda x, y, **kw: LF.huber_loss(x, y, delta=0.7, **kw),
}


def _special(shape, dtype, gen):
    """Random values with infinities, zeros of both signs and errors right at the kink."""
    x = torch.randn(shape, generator=gen) * 2
    flat = x.view(-1)
    flat[:6] = torch.tensor([math.inf, -math.inf, 0.0, -0.0, 0.5, -0.7])
    return x.to(dtype)


def _call(name, x, y, w, reduction, grad_output, target_grad):
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_(target_grad)
    kwargs = {"reduction": reduction}
    if w is not None:
        kwargs["weight"] = w
    loss = LOSSES[name](x, y, **kwargs)
    leaves = [x, y] if target_grad else [x]
    grads = torch.autograd.grad(loss, leaves, grad_output(loss))
    return loss.detach(), grads, (loss.grad_fn.name(), type(loss.grad_fn).__name__)


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


CALLS = list(itertools.product(
    LOSSES, ["mean", "sum", "none"], [False, True], [torch.float32, torch.bfloat16, torch.float16], [False, True]
))


@needs_native
@pytest.mark.parametrize("name, reduction, weighted, dtype, target_grad", CALLS,
                         ids=[f"{n}-{r}-{'w' if w else 'nw'}-{str(d)[6:]}-{'tg' if t else 'x'}" for n, r, w, d, t in CALLS])
def test_the_compiled_forward_gives_the_python_bits(name, reduction, weighted, dtype, target_grad):
    gen = torch.Generator().manual_seed(3)
    x, y = _special((7, 9), dtype, gen), torch.randn(7, 9, generator=gen).to(dtype)
    w = torch.rand(7, 9, generator=gen).to(dtype) if weighted else None
    if reduction == "none":
        grad_output = lambda loss: torch.randn(loss.shape, generator=torch.Generator().manual_seed(4)).to(loss.dtype)  # noqa: E731
    else:
        grad_output = lambda loss: torch.full_like(loss, 0.75)  # noqa: E731
    loss, grads, node = _call(name, x, y, w, reduction, grad_output, target_grad)
    with switches.without_native():
        ref_loss, ref_grads, ref_node = _call(name, x, y, w, reduction, grad_output, target_grad)
    assert node[0] == ref_node[0] == "FusedPointwiseRegressionBackward"
    assert node[1] == "CppFunction" and ref_node[1] != "CppFunction"  # the compiled path served the first
    _same(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        _same(g, r)


MIXED = [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.bfloat16, torch.float32),
         (torch.float32, torch.float16), (torch.float16, torch.bfloat16), (torch.float32, torch.int64)]


@needs_native
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtypes", MIXED, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
def test_mixed_dtypes_give_the_python_bits(name, dtypes):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=gen).to(dtypes[0])
    y = (torch.randn(6, 5, generator=gen) * 3).to(dtypes[1])
    for reduction in ("mean", "none"):
        grad_output = lambda loss: torch.full_like(loss, 0.5)  # noqa: E731
        with switches.fused_only():  # float64 too
            got = _call(name, x, y, None, reduction, grad_output, False)
            with switches.without_native():
                ref = _call(name, x, y, None, reduction, grad_output, False)
        _same(got[0], ref[0])
        _same(got[1][0], ref[1][0])


@needs_native
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunks_give_the_python_bits(reduction):
    gen = torch.Generator().manual_seed(6)
    x, y, w = torch.randn(37, 11, generator=gen), torch.randn(37, 11, generator=gen), torch.rand(37, 11, generator=gen)
    grad_output = lambda loss: torch.full_like(loss, 1.5)  # noqa: E731
    with switches.chunk_sizes(pointwise_elements=64):
        for name in ("mse_loss", "huber_loss"):
            loss, grads, _ = _call(name, x, y, w, reduction, grad_output, True)
            with switches.without_native():
                ref_loss, ref_grads, _ = _call(name, x, y, w, reduction, grad_output, True)
            _same(loss, ref_loss)
            for g, r in zip(grads, ref_grads):
                _same(g, r)


@needs_native
def test_the_compiled_forward_declines_what_it_does_not_serve():
    x = torch.randn(0, 3)
    assert native.pointwise_regression(x, x, None, "mse", 0.0, "mean", True, 1 << 18, [True, False]) is None
    m = torch.randn(2, 3, device="meta")
    assert native.pointwise_regression(m, m, None, "mse", 0.0, "mean", True, 1 << 18, [True, False]) is None


def test_create_graph_and_a_second_backward_replay_the_reference():
    x = torch.randn(4, 3, dtype=torch.float32, requires_grad=True)
    y = torch.randn(4, 3)
    (g,) = torch.autograd.grad(LF.mse_loss(x, y), x, create_graph=True)
    torch.testing.assert_close(g, 2 * (x - y).detach() / x.numel())
    (gg,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(gg, torch.full_like(x, 2 / x.numel()))
    loss = LF.huber_loss(x, y)
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    second = torch.autograd.grad(loss, x)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["mean_squared_error", "mean_absolute_error"])
def test_keras_large_float32_fused_form_gives_the_composed_bits(name, dtype):
    """keras mse / mae take the fused element-wise loss for large float32 tensors: the same
    numbers as the composed form, bit for bit, values and gradients."""
    gen = torch.Generator().manual_seed(7)
    t = torch.randn(64, 1024, generator=gen).to(dtype)
    t[0, :3] = torch.tensor([math.inf, 0.0, -1.0])
    x = torch.randn(64, 1024, generator=gen).to(dtype).requires_grad_()
    x.data[0, 2] = -1.0
    got = getattr(keras, name)(t, x)
    composed = (t - x).square() if name == "mean_squared_error" else (t - x).abs()
    composed = composed.mean(-1)
    go = torch.randn(64, generator=gen).to(dtype)
    _same(got.detach(), composed.detach())
    _same(torch.autograd.grad(got, x, go)[0], torch.autograd.grad(composed, x, go)[0])


DISTRIBUTIONS = [
    torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]),
    torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.1, 0.7]]),  # a row sums to 0.9
    torch.tensor([[0.2, 0.3, 0.5 + 2e-5]]),  # just past float32's tolerance
    torch.tensor([[0.2, 0.3, 0.5 + 1e-6]]),  # within it
    torch.tensor([[0.2, 0.3, 0.5], [-0.0, 0.0, 1.0]]),
    torch.tensor([[0.2, 1.3, -0.5]]),
    torch.tensor([[0.2, float("nan"), 0.8]]),
    torch.tensor([[0.2, float("inf"), 0.8]]),
]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index", range(len(DISTRIBUTIONS)))
def test_distribution_checks_decide_as_the_python_checks(index, dtype):
    x = DISTRIBUTIONS[index].to(dtype)
    for dim, t in ((-1, x), (0, x.T.contiguous()), (-1, x.T.contiguous().T)):
        with switches.without_native():
            try:
                info.entropy(t, dim=dim)
                python_ok = True
            except ValueError:
                python_ok = False
        tol = {torch.float64: 1e-9, torch.float32: 1e-5}.get(dtype, 1e-2) * max(1, t.shape[dim]) ** 0.5
        if native.distribution_ok(t, dim, tol):
            assert python_ok  # true means the Python checks pass; false only sends the call to them
        elif index in (0, 3, 4) and dtype != torch.float64:
            pytest.fail("a distribution the Python checks pass is sent to them")  # not with float64's 1e-9


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distribution_sums_near_the_tolerance(dtype):
    """Rows whose sums straddle the tolerance: the compiled check never passes a row the
    Python check refuses."""
    n = 100
    tol = {torch.float32: 1e-5}.get(dtype, 1e-2) * n ** 0.5
    for offset in torch.linspace(-2 * tol, 2 * tol, 41).tolist():
        row = torch.full((1, n), 1.0 / n, dtype=torch.float64)
        row[0, 0] += offset
        x = row.clamp(0, 1).to(dtype)
        with switches.without_native():
            try:
                info.entropy(x)
                python_ok = True
            except ValueError:
                python_ok = False
        if native.distribution_ok(x, -1, tol):
            assert python_ok, offset


@pytest.mark.parametrize("fn", ["entropy", "cross_entropy", "kl_divergence", "js_divergence"])
def test_info_checks_raise_the_same_messages_with_and_without_the_compiled_part(fn):
    bad = [torch.tensor([[0.5, 0.5], [0.6, 0.3]]), torch.tensor([0.5, float("nan")]), torch.tensor([1.2, -0.2])]
    good = torch.tensor([0.5, 0.5])
    for x in bad:
        args = (x,) if fn == "entropy" else (good, x)
        messages = []
        for off in (False, True):
            with switches.without_native() if off else switches.chunk_sizes():
                with pytest.raises(ValueError) as error:
                    getattr(info, fn)(*args)
            messages.append(str(error.value))
        assert messages[0] == messages[1]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flaw", ["none", "sum", "negative", "nan"])
def test_distribution_checks_of_a_large_tensor(flaw, dtype):
    """Past 65536 elements the check takes ATen's reductions: the same decisions."""
    x = torch.randn(300, 300, generator=torch.Generator().manual_seed(8)).softmax(-1)
    if flaw == "sum":
        x[7, 3] += 0.5  # past bfloat16's tolerance (0.17 at 300 classes) too
    elif flaw == "negative":
        x[7, 3], x[7, 4] = -x[7, 3], x[7, 4] + 2 * x[7, 3]
    elif flaw == "nan":
        x[7, 3] = math.nan
    x = x.to(dtype)
    tol = {torch.float32: 1e-5}.get(dtype, 1e-2) * 300 ** 0.5
    assert native.distribution_ok(x, -1, tol) == (flaw == "none")
    if flaw != "none":
        with pytest.raises(ValueError) as error:
            info.entropy(x)
        with switches.without_native(), pytest.raises(ValueError) as ref:
            info.entropy(x)
        assert str(error.value) == str(ref.value)
