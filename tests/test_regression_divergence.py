"""mse_loss, l1_loss and kl_div against torch 2.13 on the same inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from compare import DTYPES, REDUCTIONS, check_against_torch, check_raises

SHAPES = [(), (7,), (4, 3), (2, 3, 5), (0, 3)]


def rand(shape, dtype, grad=True):
    return torch.randn(shape, dtype=torch.float64).to(dtype).requires_grad_(grad)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["mse_loss", "l1_loss"])
def test_regression(name, shape, reduction, dtype, atol, rtol):
    ours, theirs = getattr(LF, name), getattr(TF, name)
    x, y = rand(shape, dtype), rand(shape, dtype)
    check_against_torch(ours, theirs, x, y, reduction=reduction, atol=atol, rtol=rtol)
    # torch 2.13's element weights: 'mean' is sum(w * e) / sum(w).
    weight = torch.rand(shape, dtype=torch.float64).to(dtype)
    check_against_torch(ours, theirs, x, y, reduction=reduction, weight=weight, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss"])
def test_regression_broadcasts_with_a_warning_like_torch(name):
    x, y = rand((3, 1), torch.float32), rand((4,), torch.float32)
    check_against_torch(getattr(LF, name), getattr(TF, name), x, y)
    with pytest.warns(UserWarning, match=r"target shape \(4,\) differs from input shape \(3, 1\)"):
        getattr(LF, name)(x, y)


def test_l1_gradient_is_zero_at_equality():
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    check_against_torch(LF.l1_loss, TF.l1_loss, x, torch.tensor([1.0, 0.0, 3.0]), reduction="sum")


def test_regression_mixed_dtypes_promote_like_torch():
    check_against_torch(LF.mse_loss, TF.mse_loss, rand((5,), torch.float32), rand((5,), torch.float64))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("shape", [(5,), (4, 6), (2, 3, 4)])
def test_kl_div(shape, log_target, reduction, dtype, atol, rtol):
    log_q = torch.log_softmax(torch.randn(shape, dtype=torch.float64), -1).to(dtype).requires_grad_()
    p = torch.softmax(torch.randn(shape, dtype=torch.float64) * 2, -1)
    p[..., 0] = 0.0  # an outcome the target never has: 0 log 0 = 0
    target = (p.log() if log_target else p).to(dtype).requires_grad_()
    check_against_torch(
        LF.kl_div, TF.kl_div, log_q, target, reduction=reduction, log_target=log_target, atol=atol, rtol=rtol,
        grad_atol=atol if log_target else None,
    )


def test_kl_div_zero_dim_batchmean_and_mean_warning():
    check_against_torch(LF.kl_div, TF.kl_div, torch.tensor(-1.0), torch.tensor(0.5), reduction="batchmean")
    with pytest.warns(UserWarning, match="batchmean"):
        LF.kl_div(torch.zeros(2, 2), torch.full((2, 2), 0.5))


def test_kl_div_batchmean_is_the_kl_per_sample():
    # KL(p || q) of the tutorial's pair, by definition: sum p log(p / q).
    p = torch.tensor([[0.36, 0.48, 0.16]], dtype=torch.float64)
    q = torch.full((1, 3), 1 / 3, dtype=torch.float64)
    expected = float((p * (p / q).log()).sum())
    assert LF.kl_div(q.log(), p, reduction="batchmean").item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.filterwarnings("ignore:kl_div. reduction='mean'")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(reduction):
    x, y = rand((3, 4), torch.float64), rand((3, 4), torch.float64)
    w = torch.rand(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: LF.mse_loss(a, b, reduction=reduction, weight=w), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: LF.l1_loss(a, b, reduction=reduction), (x, y))
    log_q = torch.log_softmax(rand((3, 4), torch.float64, grad=False), -1).requires_grad_()
    p = torch.softmax(rand((3, 4), torch.float64, grad=False), -1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: LF.kl_div(a, b, reduction=reduction), (log_q, p))
    assert torch.autograd.gradcheck(lambda a, b: LF.kl_div(a, b.log(), reduction=reduction, log_target=True), (log_q, p))


# -- smooth L1, Huber, Poisson and Gaussian NLL (issue 3's regression family) --------------


def errors_across_the_kink(shape, dtype, scale=1.0):
    """Errors on both sides of the quadratic/linear switch, plus exact zeros."""
    x = (torch.randn(shape, dtype=torch.float64) * 2 * scale)
    if x.numel():
        x.view(-1)[0] = 0.0
    return x.to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 3.0])
def test_smooth_l1(beta, shape, reduction, dtype, atol, rtol):
    x, y = errors_across_the_kink(shape, dtype), torch.zeros(shape, dtype=dtype)
    check_against_torch(LF.smooth_l1_loss, TF.smooth_l1_loss, x, y, reduction=reduction, beta=beta, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("delta", [0.5, 1.0, 2.5])
def test_huber(delta, shape, reduction, dtype, atol, rtol):
    x, y = errors_across_the_kink(shape, dtype), rand(shape, dtype)
    check_against_torch(LF.huber_loss, TF.huber_loss, x, y, reduction=reduction, delta=delta, atol=atol, rtol=rtol)
    # torch's weighted Huber 'mean' is the plain mean of w * loss, not divided by sum(w).
    weight = torch.rand(shape, dtype=torch.float64).to(dtype)
    check_against_torch(LF.huber_loss, TF.huber_loss, x, y, reduction=reduction, delta=delta, weight=weight,
                        atol=atol, rtol=rtol)


def test_huber_is_delta_times_smooth_l1():
    x, y = torch.randn(50, dtype=torch.float64) * 3, torch.randn(50, dtype=torch.float64)
    for delta in (0.3, 1.0, 2.0):
        torch.testing.assert_close(LF.huber_loss(x, y, delta=delta), delta * LF.smooth_l1_loss(x, y, beta=delta))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("log_input", [True, False])
def test_poisson_nll(log_input, full, reduction, dtype, atol, rtol):
    rate = torch.rand(4, 5, dtype=torch.float64) * 3 + 0.1
    x = (rate.log() if log_input else rate).to(dtype).requires_grad_()
    counts = torch.poisson(torch.full((4, 5), 2.0, dtype=torch.float64))
    counts[0, :3] = torch.tensor([0.0, 1.0, 7.0])  # both sides of the Stirling cut at 1
    target = (counts + 0.5).to(dtype).requires_grad_()  # > 0, so torch's target gradient is finite
    check_against_torch(LF.poisson_nll_loss, TF.poisson_nll_loss, x, target, log_input=log_input, full=full,
                        reduction=reduction, atol=atol, rtol=rtol)
    check_against_torch(LF.poisson_nll_loss, TF.poisson_nll_loss, x, counts.to(dtype), log_input=log_input, full=full,
                        reduction=reduction, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("var_shape", [(4, 3), (4,), (4, 1), "float"])
def test_gaussian_nll(var_shape, full, reduction, dtype, atol, rtol):
    x, y = rand((4, 3), dtype), rand((4, 3), dtype)
    if var_shape == "float":
        var = 0.7
    else:
        var = torch.rand(var_shape, dtype=torch.float64) + 0.05
        if dtype in (torch.float32, torch.float64):  # half types cannot hold the huge loss
            var.view(-1)[0] = 1e-9  # below eps: clamped in value, not in gradient (as torch)
        var = var.to(dtype).requires_grad_()
    check_against_torch(LF.gaussian_nll_loss, TF.gaussian_nll_loss, x, y, var, full=full, reduction=reduction,
                        atol=atol, rtol=rtol)


def test_likelihood_and_robust_loss_errors():
    x = torch.randn(4, 3)
    check_raises(LF.gaussian_nll_loss, x, x, torch.tensor([[1.0, -2.0, 1.0]] * 4),
                 match="gaussian_nll_loss: var must be >= 0; found -2 at index (0, 1)")
    check_raises(LF.gaussian_nll_loss, x, x, -1.0, match="gaussian_nll_loss: var must be >= 0; got -1.0")
    check_raises(LF.gaussian_nll_loss, x, x, torch.ones(2, 3), match="var of shape (2, 3) does not fit input shape (4, 3)")
    check_raises(LF.huber_loss, x, x, delta=0.0, match="huber_loss: delta must be > 0; got 0.0")
    check_raises(LF.smooth_l1_loss, x, x, beta=-1.0, match="smooth_l1_loss: beta must be >= 0; got -1.0")
    check_raises(LF.poisson_nll_loss, x, torch.ones(5), match="input shape (4, 3) and target shape (5,) cannot be broadcast")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64_likelihood_and_robust(reduction):
    x, y = rand((3, 4), torch.float64), rand((3, 4), torch.float64)
    var = (torch.rand(3, 4, dtype=torch.float64) + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: LF.smooth_l1_loss(a, b, reduction=reduction, beta=0.5), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: LF.huber_loss(a, b, reduction=reduction, delta=0.8), (x, y))
    assert torch.autograd.gradcheck(lambda a, v: LF.gaussian_nll_loss(a, y, v, reduction=reduction, full=True), (x, var))
    counts = torch.poisson(torch.full((3, 4), 3.0, dtype=torch.float64)) + 0.5
    assert torch.autograd.gradcheck(lambda a: LF.poisson_nll_loss(a, counts, full=True, reduction=reduction), (x,))
