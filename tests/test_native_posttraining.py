"""The compiled forms of the post-training losses (losskit/_native/src/posttraining.cpp):
the same bits as their Python forms over the options the catalog's cases leave out, and
ORPO's value check read in C++ raising the Python check's message."""

from __future__ import annotations

import os

import pytest
import torch

import losskit.functional as LF
from losskit import _native
from losskit._core import switches
from losskit._core.checks import checks

native = _native.load() if os.environ.get("LOSSKIT_NATIVE", "1") != "0" else None
pytestmark = pytest.mark.skipif(
    native is None, reason="losskit._native is not built here (make test builds it and sets LOSSKIT_NATIVE=require)"
)


def _same_bits(fn, tensors, grad_output=0.75):
    """fn(*tensors) with and without the compiled part: loss and gradients bit for bit."""
    def run():
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        loss = fn(*leaves)
        wanted = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(loss, wanted, torch.full_like(loss, grad_output)) if wanted else ()
        return loss.detach(), grads, loss.grad_fn.name()

    loss, grads, node = run()
    with switches.without_native():
        ref_loss, ref_grads, _ = run()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0, equal_nan=True)
    assert len(grads) == len(ref_grads)
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == ref.dtype and grad.shape == ref.shape
        torch.testing.assert_close(grad, ref, rtol=0, atol=0, equal_nan=True)
    return node


def _logps(shape, dtype, seed, scale=5.0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return (-(torch.rand(shape, generator=g) * scale) - 1e-3).to(dtype).requires_grad_(grad)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_sigmoid_simpo_cpo(dtype, reduction, label_smoothing):
    c, r = _logps((7,), dtype, 1), _logps((7,), dtype, 2)
    rc, rr = _logps((7,), torch.float32, 3, grad=False), _logps((7,), dtype, 4, grad=False)
    node = _same_bits(lambda a, b: LF.dpo_loss(a, b, rc, rr, beta=0.3, label_smoothing=label_smoothing,
                                               reduction=reduction), [c, r])
    assert node == "FusedPreferencePairBackward"
    _same_bits(lambda a, b: LF.dpo_loss(a, b, beta=0.3, reduction=reduction), [c, r])
    _same_bits(lambda a, b: LF.simpo_loss(a, b, beta=2.0, gamma=0.7, label_smoothing=label_smoothing,
                                          reduction=reduction), [c, r])
    _same_bits(lambda a, b: LF.cpo_loss(a, b, beta=0.1, label_smoothing=label_smoothing, reduction=reduction),
               [c, r.detach()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_orpo(dtype, reduction):
    # both of log(1 - e^x)'s branches: values on either side of -ln 2
    c, r = _logps((3, 4), dtype, 5, scale=2.0), _logps((3, 4), dtype, 6, scale=2.0)
    assert _same_bits(lambda a, b: LF.orpo_loss(a, b, beta=0.2, reduction=reduction), [c, r]) == \
        "FusedPreferencePairBackward"
    _same_bits(lambda a, b: LF.orpo_loss(a, b, reduction=reduction), [c.detach(), r])


@pytest.mark.parametrize("dtype", DTYPES)
def test_orpo_check_is_read_in_cpp_with_the_python_message(dtype):
    c = torch.tensor([-0.5, 0.25, -1.0], dtype=dtype, requires_grad=True)
    r = torch.tensor([-1.0, -2.0, -3.0], dtype=dtype)
    for args, name in (((c, r), "chosen_logps"), ((r, c), "rejected_logps")):
        with pytest.raises(ValueError, match=rf"orpo_loss: {name} must hold log-probabilities \(<= 0\); found 0.25 "
                                             r"at index \(1,\)"):
            LF.orpo_loss(*args)
    with checks("off"):  # no check asked for: the compiled form serves the call as it is
        _same_bits(lambda a: LF.orpo_loss(a, r), [c])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kl, dw, uw", [(None, 1.0, 1.0), (0.4, 1.3, 0.7), (-0.2, 1.0, 2.0)])
def test_kto(dtype, reduction, kl, dw, uw):
    logps, ref = _logps((9,), dtype, 7, scale=30.0), _logps((9,), torch.float32, 8, scale=30.0, grad=False)
    desirable = torch.tensor([True, False, True, True, False, False, True, False, True])
    kw = dict(beta=0.2, kl=kl, desirable_weight=dw, undesirable_weight=uw, reduction=reduction)
    assert _same_bits(lambda x: LF.kto_loss(x, ref, desirable, **kw), [logps]) == "FusedKtoBackward"
    _same_bits(lambda x: LF.kto_loss(x, None, desirable, **kw), [logps])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_target", [False, True])
def test_distillation(dtype, beta, reduction, with_target):
    g = torch.Generator().manual_seed(9)
    s = (torch.randn(2, 5, 11, generator=g) * 3).to(dtype).requires_grad_()
    t = (torch.randn(2, 5, 11, generator=g) * 3).to(dtype)
    target = torch.randint(0, 11, (2, 5), generator=g) if with_target else None
    if target is not None:
        target[0, 1] = target[1, 4] = -100
    for kw in (dict(), dict(temperature=2.0), dict(weight_hard_loss=0.4, weight_soft_loss=0.6)):
        if "weight_hard_loss" in kw and target is None:
            continue
        node = _same_bits(lambda x: LF.distillation_loss(x, t, target, beta=beta, reduction=reduction, **kw), [s])
        assert node == "FusedDistillationBackward"


def test_distillation_in_chunks_and_without_gradient():
    g = torch.Generator().manual_seed(10)
    s, t = torch.randn(300, 1000, generator=g).requires_grad_(), torch.randn(300, 1000, generator=g)
    _same_bits(lambda x: LF.distillation_loss(x, t, beta=0.4), [s])  # 262 rows a chunk: two chunks
    with torch.no_grad():
        loss = LF.distillation_loss(s, t, reduction="none")
        with switches.without_native():
            assert torch.equal(loss, LF.distillation_loss(s, t, reduction="none"))
