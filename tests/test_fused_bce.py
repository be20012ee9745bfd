"""The fused CPU binary_cross_entropy_with_logits against torch, across chunk edges."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from losskit._core.switches import chunk_sizes
from losskit.kernels import fused_only
from compare import DTYPES, REDUCTIONS, check_against_torch
from test_classification import BINARY_SHAPES, weight_shapes

@pytest.fixture(autouse=True)
def fused_float64():
    """float64 normally takes the reference path; here it runs the kernel, so that the
    kernel is held to float64's tight tolerances."""
    with fused_only():
        yield



@pytest.fixture(autouse=True)
def tiny_chunks():
    with chunk_sizes(bce_elements=4):
        yield


def test_fused_path_is_taken_only_when_target_needs_no_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.rand(3, 4)
    assert "Fused" in LF.binary_cross_entropy_with_logits(x, y).grad_fn.name()
    assert "Fused" not in LF.binary_cross_entropy_with_logits(x, y.requires_grad_()).grad_fn.name()


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", BINARY_SHAPES + [(5, 7, 3)])
def test_fused_matches_torch(shape, reduction, dtype, atol, rtol):
    x = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype).requires_grad_()
    target = torch.rand(shape, dtype=torch.float64).to(dtype)
    for weight_shape in weight_shapes(shape):
        for pos_weight_shape in weight_shapes(shape):
            weight = None if weight_shape is None else torch.rand(weight_shape, dtype=torch.float64).to(dtype)
            pos_weight = None if pos_weight_shape is None else (torch.rand(pos_weight_shape, dtype=torch.float64) * 3).to(dtype)
            check_against_torch(
                LF.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, x, target,
                weight=weight, pos_weight=pos_weight, reduction=reduction, atol=atol, rtol=rtol,
            )


def test_fused_is_exact_for_huge_logits():
    x = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0, 30.0, -30.0], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 1.0, 0.0], dtype=torch.float64)
    out = check_against_torch(
        LF.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, x, target,
        pos_weight=torch.tensor(2.0, dtype=torch.float64), reduction="none", atol=0, rtol=1e-14,
        # torch's gradient at x = 30 is 2 * sigmoid(30) - 2: cancellation leaves it 1e-16
        # (0.1%) off; losskit forms sigmoid(-30) directly.
        grad_atol=1e-15,
    )
    assert out[0] == 0 and out[1] == 0 and out[2] == 1e4


def test_fused_does_not_write_into_its_inputs():
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.rand(4, 3)
    before = (x.detach().clone(), y.clone())
    LF.binary_cross_entropy_with_logits(x, y, pos_weight=torch.ones(3) * 2).backward()
    assert torch.equal(x.detach(), before[0]) and torch.equal(y, before[1])
