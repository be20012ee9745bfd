"""The fused paths of keras.hinge / squared_hinge (kernels/hinge.py, src/hinge.cpp) and of
info.cross_entropy / entropy / kl_divergence of probabilities (kernels/row_divergence.py's
info kinds, src/pointwise.cpp's info_rows):

- the compiled forms give the Python forms' bits, loss and gradient, over dtypes, label
  kinds (-1/+1, 0/1, any reals), ties (1 - t x = 0), zeros in p and q and a NaN score;
- the loss has the composed form's bits where the fused form forms it by the same ops
  (info), and the written-out gradient agrees with autograd's through the composed form
  (the oracle, under reference_only, on the same inputs) to the dtype's rounding;
- bad input raises the Python checks' messages with and without the compiled part;
- calls the fused forms do not serve take the composed form.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import losskit.keras as K
from losskit import _native, info
from losskit._core import switches

native = _native.load() if os.environ.get("LOSSKIT_NATIVE", "1") != "0" else None
needs_native = pytest.mark.skipif(
    native is None, reason="losskit._native is not built here (make test builds it and sets LOSSKIT_NATIVE=require)"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _scores(dtype, shape=(9, 7)):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=g) * 2
    x.view(-1)[:3] = torch.tensor([1.0, -1.0, 0.5])  # ties: 1 - t x = 0 with labels +1, -1 (and 0/1 labels)
    return x.to(dtype).requires_grad_()


def _labels(kind, dtype, shape=(9, 7)):
    g = torch.Generator().manual_seed(12)
    if kind == "signs":
        t = torch.randint(0, 2, shape, generator=g) * 2 - 1
    elif kind == "binary":
        t = torch.randint(0, 2, shape, generator=g)
    else:
        t = torch.randn(shape, generator=g)
    t = t.to(dtype)
    t.view(-1)[:3] = torch.tensor([1.0, -1.0, 2.0] if kind != "binary" else [1.0, 0.0, 1.0])
    return t


def _distributions(dtype, shape=(9, 7), zeros=True):
    g = torch.Generator().manual_seed(13)
    p = torch.randn(shape, generator=g, dtype=torch.float64).softmax(-1)
    q = torch.randn(shape, generator=g, dtype=torch.float64).softmax(-1)
    if zeros:
        p[0, :2] = torch.tensor([0.0, p[0, 0] + p[0, 1]])  # p = 0 where q > 0
        q[1, :2] = torch.tensor([0.0, q[1, 0] + q[1, 1]])  # q = 0 where p > 0
        p[2, 3], q[2, 3] = 0.0, 0.0  # both 0
        p[2], q[2] = p[2] / p[2].sum(), q[2] / q[2].sum()
    return p.to(dtype), q.to(dtype)


def _grad(fn, args, leaf, seed=5):
    loss = fn(*args)
    grad_output = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed)) + 0.5).to(loss.dtype)
    (grad,) = torch.autograd.grad(loss, leaf, grad_output)
    return loss.detach(), grad, loss.grad_fn.name()


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


HINGES = [("hinge", K.hinge), ("squared_hinge", K.squared_hinge)]
INFOS = ["cross_entropy", "entropy", "kl_divergence"]


def _info_call(name, dtype, shape=(9, 7), zeros=True):
    p, q = _distributions(dtype, shape, zeros)
    if name == "entropy":
        p.requires_grad_()
        return info.entropy, (p,), p
    q.requires_grad_()
    return getattr(info, name), (p, q), q


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("labels", ["signs", "binary", "reals"])
@pytest.mark.parametrize("name, fn", HINGES, ids=[h[0] for h in HINGES])
@pytest.mark.parametrize("shape", [(9, 7), (2, 3, 5), (6,)], ids=str)
def test_the_compiled_hinge_gives_the_python_forms_bits(name, fn, labels, dtype, shape):
    x, t = _scores(dtype, shape), _labels(labels, dtype, shape)
    with torch.no_grad():
        x.view(-1)[4] = float("nan")
    loss, grad, node = _grad(fn, (t, x), x)
    assert node == "FusedKerasHingeBackward"
    with switches.without_native():
        ref_loss, ref_grad, ref_node = _grad(fn, (t, x), x)
    assert ref_node == node
    _same(loss, ref_loss)
    _same(grad, ref_grad)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("name", INFOS)
@pytest.mark.parametrize("shape", [(9, 7), (2, 3, 5), (6,), (300, 500)], ids=str)
def test_the_compiled_info_measures_give_the_python_forms_bits(name, zeros, dtype, shape):
    fn, args, leaf = _info_call(name, dtype, shape, zeros and len(shape) == 2)
    loss, grad, node = _grad(fn, args, leaf)
    assert node == "FusedRowDivergenceBackward"
    with switches.without_native():
        ref_loss, ref_grad, ref_node = _grad(fn, args, leaf)
    assert ref_node == node
    _same(loss, ref_loss)
    _same(grad, ref_grad)
    with torch.no_grad():  # no gradient wanted: the same rows
        _same(fn(*args), ref_loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", INFOS)
def test_the_fused_info_measures_have_the_composed_loss_and_its_gradient(name, dtype):
    fn, args, leaf = _info_call(name, dtype)
    loss, grad, node = _grad(fn, args, leaf)
    assert node == "FusedRowDivergenceBackward"
    with switches.reference_only():
        ref_loss, ref_grad, ref_node = _grad(fn, args, leaf)
    assert ref_node != node
    _same(loss, ref_loss)
    # The written-out gradient rounds differently from autograd's chain; in bfloat16 the
    # entropy's -(log p + 1) cancels near p = 1/e, where the two differ by a bfloat16 step
    # of the terms (about 1): an absolute tolerance of that size.
    tol = {"rtol": 2e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 4e-3}
    torch.testing.assert_close(grad, ref_grad, equal_nan=True, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("labels", ["signs", "binary", "reals"])
@pytest.mark.parametrize("name, fn", HINGES, ids=[h[0] for h in HINGES])
def test_the_fused_hinge_agrees_with_the_composed_form(name, fn, labels, dtype):
    x, t = _scores(dtype), _labels(labels, dtype)
    loss, grad, node = _grad(fn, (t, x), x)
    assert node == "FusedKerasHingeBackward"
    with switches.reference_only():
        ref_loss, ref_grad, ref_node = _grad(fn, (t, x), x)
    assert ref_node != node
    _same(loss, ref_loss)  # the same ops, in the same order
    tol = {"rtol": 2e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-3}
    torch.testing.assert_close(grad, ref_grad, **tol)


def test_a_double_backward_replays_the_composed_forms():
    x, t = _scores(torch.float32), _labels("binary", torch.float32)
    for fn in (K.hinge, K.squared_hinge):
        (first,) = torch.autograd.grad(fn(t, x).sum(), x, create_graph=True)
        with switches.reference_only():
            (ref,) = torch.autograd.grad(fn(t, x).sum(), x, create_graph=True)
        torch.testing.assert_close(first, ref)
    p, q = _distributions(torch.float32)
    q = q.requires_grad_()
    with switches.fused_only():
        (first,) = torch.autograd.grad(info.cross_entropy(p, q).sum(), q, create_graph=True)
    (ref,) = torch.autograd.grad(info.cross_entropy(p, q).sum(), q, create_graph=True)
    torch.testing.assert_close(first, ref, equal_nan=True)


@pytest.mark.parametrize("use_native", [True, False])
def test_bad_distributions_raise_the_python_messages(use_native):
    context = switches.without_native if not use_native else switches.chunk_sizes
    with context():
        p = torch.tensor([[0.5, 0.5], [0.6, 0.3]])
        q = torch.tensor([[0.5, 0.5], [0.5, 0.5]], requires_grad=True)
        with pytest.raises(ValueError, match=r"cross_entropy: p is not a distribution along dim -1: the one at index "
                                             r"\(1,\) sums to 0.9, not 1"):
            info.cross_entropy(p, q)
        with pytest.raises(ValueError, match=r"kl_divergence: q must hold probabilities in \[0, 1\]; found 1.2"):
            info.kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([1.2, -0.2], requires_grad=True))
        with pytest.raises(ValueError, match=r"entropy: p must hold probabilities in \[0, 1\]; found nan at index "
                                             r"\(1,\)"):
            info.entropy(torch.tensor([0.5, float("nan")], requires_grad=True))


def test_calls_the_fused_forms_do_not_serve_take_the_composed_form():
    p, q = _distributions(torch.float32)
    both = q.clone().requires_grad_(), p.clone().requires_grad_()
    assert info.cross_entropy(both[1], both[0]).grad_fn.name() == "NegBackward0"  # p's gradient too
    assert info.kl_divergence(p.T, q.T.requires_grad_(), dim=0).grad_fn.name() != "FusedRowDivergenceBackward"
    x = _scores(torch.float32)
    assert K.hinge(_labels("signs", torch.float32)[:1], x).grad_fn.name() == "MeanBackward1"  # broadcast labels
    assert K.hinge(_labels("signs", torch.float64), x.double()).grad_fn.name() == "MeanBackward1"  # float64


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("measure", ["cross_entropy", "kl_divergence"])
def test_one_tensor_as_both_distributions_gets_both_gradients(measure, native_on):
    # cross_entropy(x, x) is the entropy, kl_divergence(x, x) is 0: the gradient flows
    # through both arguments, which the fused form (p fixed) must leave to the composed one.
    x = torch.softmax(torch.randn(5, 7, generator=torch.Generator().manual_seed(3)), -1).requires_grad_()
    context = contextlib.nullcontext() if native_on else switches.without_native()
    with context:
        (ours,) = torch.autograd.grad(getattr(info, measure)(x, x).sum(), x)
    x64 = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(-(x64 * x64.log()).sum() if measure == "cross_entropy" else x64.sum() * 0, x64)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-5, atol=1e-6)
