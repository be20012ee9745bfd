"""The fused soft_margin and multilabel_soft_margin losses (kernels/soft_margin.py): against
torch.nn.functional on the same inputs, against float64 where torch overflows or rounds
every op to a half type, the compiled form (losskit._native soft_margin.cpp) against the
Python form to the bit, and what they keep for backward against what torch keeps.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from compare import DTYPES, REDUCTIONS, check_against_torch
from losskit import _native
from losskit._core import switches
from losskit.kernels.soft_margin import fused_multilabel_soft_margin, fused_soft_margin
from test_memory import saved_bytes

native = _native.load() if os.environ.get("LOSSKIT_NATIVE", "1") != "0" else None
needs_native = pytest.mark.skipif(native is None, reason="losskit._native is not built here (make test builds it)")

SERVED = DTYPES[1:]  # float32, bfloat16, float16 (float64 keeps the composed form)
FUSED_NODES = {fused_soft_margin.node_name, fused_multilabel_soft_margin.node_name}


def _x(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _signs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(dtype)


def _labels(shape, dtype, seed, soft=False):
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(shape, generator=g, dtype=torch.float64)
    return (labels if soft else labels.round()).to(dtype)


def _weight(kind, shape, dtype):
    g = torch.Generator().manual_seed(5)
    n, c = shape
    sizes = {"none": None, "[C]": (c,), "[1, C]": (1, c), "[N, C]": (n, c), "[N, 1]": (n, 1), "scalar": ()}[kind]
    return None if sizes is None else (torch.rand(sizes, generator=g, dtype=torch.float64) + 0.1).to(dtype)


def _fused(loss):
    return loss.grad_fn is not None and loss.grad_fn.name() in FUSED_NODES


# ---- against torch on the same inputs ---------------------------------------------------------

@pytest.mark.parametrize("dtype, atol, rtol", SERVED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(7,), (4, 3), (2, 3, 5), (5, 1), (1,)])
def test_soft_margin_against_torch(shape, reduction, dtype, atol, rtol):
    x = _x(shape, dtype, 1).requires_grad_()
    got = check_against_torch(LF.soft_margin_loss, TF.soft_margin_loss, x, _signs(shape, dtype, 2),
                              reduction=reduction, atol=atol, rtol=rtol)
    assert _fused(got)


@pytest.mark.parametrize("dtype, atol, rtol", SERVED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight", ["none", "[C]", "[1, C]", "[N, C]", "[N, 1]", "scalar"])
@pytest.mark.parametrize("shape", [(4, 5), (6, 1), (1, 9)])
@pytest.mark.parametrize("soft", [False, True])
def test_multilabel_soft_margin_against_torch(soft, shape, weight, reduction, dtype, atol, rtol):
    x = _x(shape, dtype, 3).requires_grad_()
    got = check_against_torch(LF.multilabel_soft_margin_loss, TF.multilabel_soft_margin_loss, x,
                              _labels(shape, dtype, 4, soft), weight=_weight(weight, shape, dtype),
                              reduction=reduction, atol=atol, rtol=rtol)
    assert _fused(got)


@pytest.mark.parametrize("dtype, atol, rtol", SERVED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_multilabel_target_gradient_against_torch(reduction, dtype, atol, rtol):
    # torch's composed form differentiates its target: -(log sigma(x) - log sigma(-x)) w / C = -x w / C
    x, y = _x((5, 4), dtype, 6).requires_grad_(), _labels((5, 4), dtype, 7, soft=True).requires_grad_()
    got = check_against_torch(LF.multilabel_soft_margin_loss, TF.multilabel_soft_margin_loss, x, y,
                              weight=_weight("[C]", (5, 4), dtype), reduction=reduction, atol=atol, rtol=rtol)
    assert _fused(got)
    y_only = check_against_torch(LF.multilabel_soft_margin_loss, TF.multilabel_soft_margin_loss, x.detach(), y,
                                 reduction=reduction, atol=atol, rtol=rtol)
    assert _fused(y_only)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_odd_shapes_against_torch(reduction):
    # served or not (1-D multilabel input, an empty batch, a 0-d soft margin), as torch
    for shape in [(0, 3), (), (0,)]:
        check_against_torch(LF.soft_margin_loss, TF.soft_margin_loss, _x(shape, torch.float32, 8).requires_grad_(),
                            _signs(shape, torch.float32, 9), reduction=reduction, atol=1e-5, rtol=1e-5)
    for shape in [(5,), (0, 4), (3, 1)]:
        check_against_torch(LF.multilabel_soft_margin_loss, TF.multilabel_soft_margin_loss,
                            _x(shape, torch.float32, 10).requires_grad_(), _labels(shape, torch.float32, 11),
                            reduction=reduction, atol=1e-5, rtol=1e-5)


def test_broadcast_targets_and_mixed_dtypes_against_torch():
    x = _x((4, 3), torch.bfloat16, 12).requires_grad_()
    check_against_torch(LF.soft_margin_loss, TF.soft_margin_loss, x, _signs((4, 3), torch.float32, 13),
                        atol=1e-2, rtol=1e-2)
    check_against_torch(LF.multilabel_soft_margin_loss, TF.multilabel_soft_margin_loss, x,
                        _labels((4, 3), torch.float32, 14), weight=_weight("[C]", (4, 3), torch.float32),
                        atol=1e-5, rtol=1e-5, grad_atol=1e-2, grad_rtol=1e-2)  # a float32 loss, a bfloat16 gradient
    check_against_torch(LF.soft_margin_loss, TF.soft_margin_loss, x, _signs((3,), torch.bfloat16, 15),
                        atol=1e-2, rtol=1e-2)


# ---- float64: gradcheck and gradgradcheck of the fused forward (the second order replays) -----

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_gradcheck_and_gradgradcheck(reduction):
    x = _x((4, 3), torch.float64, 16).requires_grad_()
    signs = _signs((4, 3), torch.float64, 17)
    labels = _labels((4, 3), torch.float64, 18, soft=True).requires_grad_()
    weight = _weight("[C]", (4, 3), torch.float64)
    calls = [
        (lambda a, y: LF.soft_margin_loss(a, y, reduction=reduction), (x, signs.clone().requires_grad_())),
        (lambda a, y: LF.multilabel_soft_margin_loss(a, y, weight=weight, reduction=reduction), (x, labels)),
    ]
    with switches.fused_only():
        for fn, args in calls:
            assert _fused(fn(*args))
            # gradcheck's repeated backward through one graph replays the composed form,
            # which differs from the fused gradient by float64 rounding only
            # (and, as for every precomputed gradient, backward takes a defined grad_output)
            assert torch.autograd.gradcheck(fn, args, nondet_tol=1e-12, check_undefined_grad=False)
            assert torch.autograd.gradgradcheck(fn, args, nondet_tol=1e-12, check_undefined_grad=False)


# ---- extreme logits and the half types against float64 ----------------------------------------

def _soft_margin64(x, y, reduction):
    """softplus(-y x) in float64 by logaddexp (finite where log1p(exp(.)) overflows)."""
    loss = torch.logaddexp(torch.zeros_like(x), -y * x)
    return loss if reduction == "none" else (loss.mean() if reduction == "mean" else loss.sum())


def _against_float64(ours, exact, x, target, reduction):
    """Loss and gradients (of the input and the target) of ours, and of ``exact`` on float64
    copies of the same inputs."""
    x, target = x.detach().clone().requires_grad_(), target.detach().clone().requires_grad_()
    got = ours(x, target, reduction=reduction)
    x64, t64 = x.detach().double().requires_grad_(), target.detach().double().requires_grad_()
    want = exact(x64, t64, reduction=reduction)
    go = torch.rand(want.shape, generator=torch.Generator().manual_seed(19), dtype=torch.float64) + 0.5
    return (got, *torch.autograd.grad(got, [x, target], go.to(got.dtype))), (want, *torch.autograd.grad(want, [x64, t64], go))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn", ["soft_margin_loss", "multilabel_soft_margin_loss"])
def test_extreme_logits_against_float64(fn, dtype, reduction):
    # torch's soft_margin gives inf and a nan gradient past -y x = 88.7 (log1p(exp(.)) in
    # float32); losskit stays finite and within a few ulps of float64, subnormals aside
    values = [100.0, -100.0, 1e4, -1e4, 30.0, -30.0, 20.5, -20.5, 0.0, 1e-3]
    if dtype == torch.float16:
        values = [v for v in values if abs(v) < 6e4]
    x = torch.tensor(values, dtype=torch.float64).repeat(2).reshape(4, -1).to(dtype)
    signs = torch.tensor([1.0, -1.0]).repeat_interleave(x.numel() // 2).reshape(x.shape).to(dtype)
    if fn == "soft_margin_loss":
        got, want = _against_float64(LF.soft_margin_loss, _soft_margin64, x, signs, reduction)
        summed = 1 if reduction == "none" else x.numel()
    else:
        got, want = _against_float64(LF.multilabel_soft_margin_loss, TF.multilabel_soft_margin_loss, x,
                                     (signs > 0).to(dtype), reduction)
        summed = x.shape[1] * (1 if reduction == "none" else x.shape[0])
    assert _fused(got[0])
    info = torch.finfo(dtype)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all()
        # a sum of n positive terms is within n ulps; each gradient element within 2 ulps
        rtol = 2 * info.eps * (summed if i == 0 else 1)
        # the target's gradient -x sigma(z) k multiplies a subnormal sigma(z) by |x| <= 1e4
        atol = info.smallest_normal * info.eps * 4 * (1e4 if i == 2 else 1)
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol,
                                   msg=lambda m, i=i: f"output {i}: {m}")


def test_tiny_losses_and_gradients_keep_their_relative_accuracy():
    # y = 1, x = 30: the loss and gradient are about exp(-30) = 9.4e-14; computing sigma(x) - y
    # as a difference would give 0, softplus(-x) + (1 - y) x for y = 0, x = -30 would give 0.
    x = torch.tensor([[30.0, -30.0, 60.0, -60.0]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    s = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    for ours, target, exact in [(LF.multilabel_soft_margin_loss, y, TF.multilabel_soft_margin_loss),
                                (LF.soft_margin_loss, s, _soft_margin64)]:
        loss = ours(x, target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
        x64 = x.detach().double().requires_grad_()
        want = exact(x64, target.double(), reduction="sum")
        (want_grad,) = torch.autograd.grad(want, x64)
        torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-6, atol=0)


def _errors(fn, x, target, kwargs):
    """Element-wise errors of the loss and the input's gradient against float64 on the same
    inputs, losskit's and torch's in the half type, and the errors of float64's values
    correctly rounded to the half type."""
    x64 = x.detach().double().requires_grad_()
    want = getattr(TF, fn)(x64, target.double(), **{k: v.double() if isinstance(v, torch.Tensor) else v
                                                    for k, v in kwargs.items()})
    # grad_output 1 (loss.backward()): backward scales the gradient, rounded once to the half
    # type in forward, by grad_output in the half type, which rounds again where it is not a
    # power of two, and in float16's subnormals (a 'mean' over many elements) even where it
    # is one larger than 1 (see kernels/soft_margin.py)
    go = torch.ones_like(want)
    (want_grad,) = torch.autograd.grad(want, x64, go)
    out = []
    for impl in (getattr(LF, fn), getattr(TF, fn)):
        leaf = x.detach().clone().requires_grad_()
        got = impl(leaf, target, **kwargs)
        (grad,) = torch.autograd.grad(got, leaf, go.to(got.dtype))
        # torch's float16 soft margin overflows (exp(-y x) past 65504): an inf or nan error
        out.append([(got.double() - want).abs().nan_to_num(torch.inf), (grad.double() - want_grad).abs().nan_to_num(torch.inf)])
    out.append([(v.to(x.dtype).double() - v).abs() for v in (want.detach(), want_grad)])
    out.append([want.detach().abs(), want_grad.abs()])
    return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn", ["soft_margin_loss", "multilabel_soft_margin_loss"])
def test_half_types_at_least_as_accurate_as_torch_against_float64(fn, dtype, reduction):
    shape = (64, 200)
    x = _x(shape, dtype, 21)
    kwargs = {"reduction": reduction}
    if fn == "soft_margin_loss":
        target = _signs(shape, dtype, 22)
    else:
        target, kwargs["weight"] = _labels(shape, dtype, 23), _weight("[C]", shape, dtype)
    ours, theirs, rounded, size = _errors(fn, x, target, kwargs)
    for a, b, r, v in zip(ours, theirs, rounded, size):
        # float32 rounded once: the float64 value rounded to the half type, but for the few
        # that float32's error moves across a rounding boundary (then the other neighbour)
        assert (a <= r + 2**-20 * v + 2 * r.new_tensor(torch.finfo(dtype).smallest_normal) * 2**-10).all()
        assert a.mean() <= b.mean() and a.max() <= b.max() + r.max(), (a.mean(), b.mean(), a.max(), b.max())


# ---- the compiled form: the Python form's bits --------------------------------------------------

def _run(fn, x, target, kwargs, wanted, seed):
    x = x.detach().clone().requires_grad_(wanted[0])
    target = target.detach().clone().requires_grad_(wanted[1])
    loss = fn(x, target, **kwargs)
    leaves = [t for t in (x, target) if t.requires_grad]
    if not leaves:
        return loss, (), None
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed)).to(loss.dtype)
    held = native.held(loss.grad_fn) if native is not None else []
    return loss.detach(), torch.autograd.grad(loss, leaves, go), (loss.grad_fn.name(), len(held))


def _same(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


def _special(x):
    flat = x.view(-1)
    if flat.numel() >= 8:
        flat[:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e4, -1e4, 20.0])
    return x


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("wanted", [(True, False), (True, True), (False, True), (False, False)])
@pytest.mark.parametrize("shape", [(6, 5), (1, 1), (300, 257), (3, 40000)])
@pytest.mark.parametrize("fn", ["soft_margin", "multilabel_soft_margin", "multilabel_soft_margin weighted",
                                "multilabel_soft_margin row weight"])
def test_compiled_form_same_bits_as_python(fn, shape, wanted, reduction, dtype):
    x = _special(_x(shape, dtype, 24))
    if fn == "soft_margin":
        call, target, kwargs = LF.soft_margin_loss, _signs(shape, dtype, 25), {}
    else:
        call, target = LF.multilabel_soft_margin_loss, _labels(shape, dtype, 26, soft=True)
        kind = {"multilabel_soft_margin": "none", "multilabel_soft_margin weighted": "[C]"}.get(fn, "[N, 1]")
        kwargs = {"weight": _weight(kind, shape, dtype)}
    kwargs["reduction"] = reduction
    got = _run(call, x, target, kwargs, wanted, 27)
    with switches.without_native():
        ref = _run(call, x, target, kwargs, wanted, 27)
    _same(got[0], ref[0])
    for a, b in zip(got[1], ref[1]):
        _same(a, b)
    if any(wanted):
        assert got[2][0] == ref[2][0] and got[2][0] in FUSED_NODES
        assert got[2][1] == sum(wanted)  # the C++ node, holding one gradient per input that wants one


@needs_native
def test_compiled_form_declines_what_it_does_not_serve():
    x, y = torch.randn(4, 3), torch.randn(4, 3).sign()
    assert native.soft_margin_forward(x.t(), y.t(), "mean", [True, False]) is None  # strided
    assert native.soft_margin_forward(x, y.double(), "mean", [True, False]) is None  # mixed dtypes
    assert native.soft_margin_forward(x.double(), y.double(), "mean", [True, False]) is None
    assert native.soft_margin_forward(x.to("meta"), y.to("meta"), "mean", [True, False]) is None
    assert native.multilabel_soft_margin_forward(x[0], y[0], None, "mean", [True, False]) is None  # 1-D
    assert native.multilabel_soft_margin_forward(x, y, torch.ones(2, 4, 3), "mean", [True, False]) is None
    assert native.multilabel_soft_margin_forward(x, y, torch.ones(3).double(), "mean", [True, False]) is None
    assert native.multilabel_soft_margin_forward(x, y, torch.ones(3), "mean", [True, False]) is not None


# ---- the replay: double backward and a second backward -----------------------------------------

@pytest.mark.parametrize("fn", ["soft_margin_loss", "multilabel_soft_margin_loss"])
def test_create_graph_and_second_backward_replay_the_composed_form(fn):
    x = _x((5, 4), torch.float32, 28).requires_grad_()
    target = _signs((5, 4), torch.float32, 29) if fn == "soft_margin_loss" else _labels((5, 4), torch.float32, 30)
    loss = getattr(LF, fn)(x, target)
    assert _fused(loss)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), x)
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(getattr(TF, fn)(x64, target.double()), x64, create_graph=True)
    (want_second,) = torch.autograd.grad(want.pow(2).sum(), x64)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(second.double(), want_second, rtol=1e-4, atol=1e-8)
    loss = getattr(LF, fn)(x, target)
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    again = torch.autograd.grad(loss, x)[0]
    torch.testing.assert_close(again, first, rtol=1e-6, atol=0)


def test_meta_device_and_no_grad():
    x, y = torch.randn(4, 3, device="meta"), torch.ones(4, 3, device="meta")
    assert LF.soft_margin_loss(x, y, reduction="none").shape == (4, 3)
    assert LF.multilabel_soft_margin_loss(x, y, reduction="none").shape == (4,)
    x, y = torch.randn(4, 3), torch.ones(4, 3)
    with torch.no_grad():
        want = TF.multilabel_soft_margin_loss(x, y)
        torch.testing.assert_close(LF.multilabel_soft_margin_loss(x.requires_grad_(), y), want)


# ---- memory: one gradient per input that wants one, no more than torch keeps ------------------

@pytest.mark.parametrize("target_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("fn", ["soft_margin_loss", "multilabel_soft_margin_loss"])
def test_saves_no_more_than_torch(fn, reduction, dtype, target_grad):
    shape = (256, 512)

    def args():
        x = _x(shape, dtype, 31).requires_grad_()
        target = _signs(shape, dtype, 32) if fn == "soft_margin_loss" else _labels(shape, dtype, 33)
        return x, target.requires_grad_(target_grad)

    ours = saved_bytes(getattr(LF, fn), args(), {"reduction": reduction})
    expected = shape[0] * shape[1] * dtype.itemsize * (2 if target_grad else 1)
    assert ours == expected
    if not (fn == "soft_margin_loss" and target_grad):  # torch's soft_margin refuses a target that wants one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = saved_bytes(getattr(TF, fn), args(), {"reduction": reduction})
        assert ours <= theirs
