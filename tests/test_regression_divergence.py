"""mse_loss, l1_loss and kl_div against torch 2.13 on the same inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from oracle import DTYPES, REDUCTIONS, check_against_torch

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
