"""The mismatches a differential fuzz against torch found, each over its class of inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from losskit.kernels import reference_only
from compare import REDUCTIONS, check_against_torch, check_raises

HALF = [torch.float16, torch.bfloat16]


def _column_major(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(rows, cols).to(dtype).t().contiguous().t()
    assert not x.is_contiguous()
    return x.requires_grad_()


# ---- 1. strided inputs on every kernel, every dtype ----------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_of_column_major_logits(dtype, reduction):
    x = _column_major(4, 3, dtype)
    target = torch.tensor([0, 1, 2, 1])
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    check_against_torch(LF.cross_entropy, TF.cross_entropy, x, target, reduction=reduction, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_bce_with_logits_and_linear_cross_entropy_of_strided_inputs(dtype):
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    x = _column_major(5, 4, dtype)
    y = torch.rand(4, 5).to(dtype).t()  # strided target too
    check_against_torch(LF.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, x, y,
                        reduction="none", atol=tol, rtol=tol)
    hidden = _column_major(6, 3, dtype)
    head = torch.randn(3, 7).to(dtype).t().requires_grad_()  # (7, 3), transposed storage
    target = torch.randint(0, 7, (6,))

    def composed(h, w, t, reduction):
        return TF.cross_entropy(h @ w.T, t, reduction=reduction)

    check_against_torch(LF.linear_cross_entropy, composed, hidden, head, target, reduction="mean",
                        atol=tol * 4, rtol=tol * 4)


# ---- 2. uint8 targets: -100 must not wrap to class 156 -------------------------------------

@pytest.mark.parametrize("path", ["fused", "reference"])
def test_uint8_class_156_is_not_taken_for_ignored(path):
    dtype = torch.float32 if path == "fused" else torch.float64
    x = torch.randn(3, 256, dtype=dtype, requires_grad=True)
    target = torch.tensor([156, 3, 255], dtype=torch.uint8)
    for ours, theirs in ((LF.cross_entropy, TF.cross_entropy),
                         (LF.nll_loss, TF.nll_loss)):
        check_against_torch(ours, theirs, x, target)
    hidden, head = torch.randn(3, 4, dtype=dtype, requires_grad=True), torch.randn(256, 4, dtype=dtype)
    got = LF.linear_cross_entropy(hidden, head, target)
    torch.testing.assert_close(got, TF.cross_entropy(hidden @ head.T, target.long()))


# ---- 4. huber / smooth_l1 with infinite errors ---------------------------------------------

@pytest.mark.parametrize("fn", ["huber_loss", "smooth_l1_loss"])
def test_infinite_errors_have_unit_gradients(fn):
    x = torch.tensor([float("inf"), 0.3, -float("inf"), 2.0], requires_grad=True)
    target = torch.tensor([0.0, 0.0, 1.0, float("inf")])
    check_against_torch(getattr(LF, fn), getattr(TF, fn), x, target, reduction="sum")
    check_against_torch(getattr(LF, fn), getattr(TF, fn), x, target, reduction="none")


# ---- 5. hinge ties: a margin term of exactly 0 has no gradient -----------------------------

def test_margin_losses_at_an_exact_tie():
    x = torch.tensor([[1.5, 0.5, 0.25, 2.0]], requires_grad=True)
    for p in (1, 2):
        check_against_torch(LF.multi_margin_loss, TF.multi_margin_loss, x, torch.tensor([0]), p=p)
    tie = torch.tensor([[1.0, 0.0, 0.5, 3.0]], requires_grad=True)  # 1 - (x0 - x1) = 0 for pair (0, 1)
    check_against_torch(LF.multilabel_margin_loss, TF.multilabel_margin_loss, tie, torch.tensor([[0, 3, -1, 1]]))


# ---- 6. what torch accepts -----------------------------------------------------------------

@pytest.mark.parametrize("fn", ["mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "poisson_nll_loss"])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_targets_in_regression_losses(fn, target_dtype):
    x = torch.tensor([0.5, 1.5, 3.0], requires_grad=True)
    target = torch.tensor([1, 2, 0], dtype=target_dtype)
    theirs = getattr(TF, fn)
    if fn == "huber_loss":  # torch's forward accepts it, its backward fails: compare with the promoted target
        theirs = lambda a, t, **kw: TF.huber_loss(a, t.to(a.dtype), **kw)  # noqa: E731
    for reduction in REDUCTIONS:
        check_against_torch(getattr(LF, fn), theirs, x, target, reduction=reduction)


def test_scalar_and_length_one_inputs_to_margin_losses():
    for reduction in REDUCTIONS:
        scalar = torch.randn((), requires_grad=True)
        for target in (torch.tensor(0), torch.tensor([0])):
            check_against_torch(LF.multi_margin_loss, TF.multi_margin_loss, scalar, target, reduction=reduction)
            check_against_torch(LF.multilabel_margin_loss, TF.multilabel_margin_loss, scalar, target,
                                reduction=reduction)
        row = torch.randn(5, requires_grad=True)
        for target in (torch.tensor(2), torch.tensor([2])):
            check_against_torch(LF.multi_margin_loss, TF.multi_margin_loss, row, target, reduction=reduction)


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_unbatched_logits_with_a_target_of_shape_one(fn):
    # torch computes the forward, but its backward fails on the (1,) target: the gradient is
    # compared with torch's for the same target of shape ().
    x = torch.randn(5, requires_grad=True)
    weight = torch.rand(5) + 0.5
    for reduction in REDUCTIONS:
        for target in (torch.tensor([2]), torch.tensor([-100])):
            with torch.no_grad():
                torch.testing.assert_close(getattr(LF, fn)(x, target, weight=weight, reduction=reduction),
                                           getattr(TF, fn)(x, target, weight=weight, reduction=reduction),
                                           equal_nan=True)
            check_against_torch(lambda a, t, **kw: getattr(LF, fn)(a, t.reshape(1), **kw), getattr(TF, fn), x,
                                target.reshape(()), weight=weight, reduction=reduction)


# ---- 7. raise where torch's error protects the user ----------------------------------------

def test_binary_cross_entropy_target_outside_unit_interval_raises():
    x = torch.tensor([0.5, 0.5])
    check_raises(LF.binary_cross_entropy, x, torch.tensor([1.5, 0.0]),
                 match="binary_cross_entropy: target must hold probabilities in [0, 1]; found 1.5 at index (0,)")
    check_raises(LF.binary_cross_entropy, x, torch.tensor([0.0, float("nan")]), match="found nan at index (1,)")


@pytest.mark.parametrize("margin", [0.0, -1.0])
def test_triplet_margin_must_be_positive(margin):
    a, p, n = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    check_raises(LF.triplet_margin_loss, a, p, n, margin=margin, match=f"margin must be > 0; got {margin}")
    check_raises(LF.triplet_margin_with_distance_loss, a, p, n, margin=margin, match="margin must be > 0")


# ---- 8. focal losses for 0 < gamma < 1 -----------------------------------------------------

@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_focal_gradients_are_finite_where_a_prediction_is_certain(gamma):
    x = torch.tensor([[20.0, 0.0], [0.0, 1.0], [40.0, -40.0]], requires_grad=True)
    LF.softmax_focal_loss(x, torch.tensor([-100, 0, 0]), gamma=gamma).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[0] == 0).all()  # ignored
    if gamma > 0:
        assert (x.grad[2] == 0).all()  # certain and right: loss 0, gradient 0
    z = torch.tensor([40.0, -40.0, 0.3], requires_grad=True)
    LF.sigmoid_focal_loss(z, torch.tensor([1.0, 0.0, 1.0]), gamma=gamma, reduction="sum").backward()
    assert torch.isfinite(z.grad).all()
    with reference_only():  # and the values still match the definition elsewhere
        p = torch.sigmoid(torch.tensor(0.3, dtype=torch.float64))
        want = -0.25 * (1 - p) ** gamma * torch.log(p)
        got = LF.sigmoid_focal_loss(torch.tensor([0.3], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                                    gamma=gamma, reduction="sum")
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("alpha", [1.5, -0.5, 2.0])
def test_sigmoid_focal_alpha_outside_unit_interval_raises(alpha):
    check_raises(LF.sigmoid_focal_loss, torch.randn(3), torch.rand(3), alpha=alpha,
                 match=f"alpha must lie in [0, 1], or be -1 for no class balancing; got {alpha}")
    LF.sigmoid_focal_loss(torch.randn(3), torch.rand(3), alpha=-1)  # -1: no balancing, as torchvision


# ---- 9. the z-loss is a per-token regulariser ----------------------------------------------

@pytest.mark.parametrize("path", ["fused", "reference", "linear"])
def test_scaling_class_weights_leaves_the_z_loss_term_unchanged(path):
    torch.manual_seed(0)
    dtype = torch.float64 if path == "reference" else torch.float32
    hidden, head = torch.randn(6, 4, dtype=dtype), torch.randn(5, 4, dtype=dtype)
    logits = hidden @ head.T
    target = torch.tensor([0, 1, 2, -100, 4, 1])
    weight = torch.rand(5, dtype=dtype) + 0.5

    def loss(w, scale):
        if path == "linear":
            return LF.linear_cross_entropy(hidden, head, target, weight=w, lse_square_scale=scale)
        return LF.cross_entropy(logits, target, weight=w, lse_square_scale=scale)

    z_term = loss(weight, 1e-2) - loss(weight, 0.0)
    torch.testing.assert_close(loss(weight * 10, 1e-2) - loss(weight * 10, 0.0), z_term)
    counted = target != -100
    want = 1e-2 * torch.logsumexp(logits[counted], 1).square().mean()
    torch.testing.assert_close(z_term, want, atol=1e-6, rtol=1e-5)
    # and the gradient of the z-term too
    x = logits.clone().requires_grad_()
    (g,) = torch.autograd.grad(LF.cross_entropy(x, target, weight=weight * 10, lse_square_scale=1e-2)
                               - LF.cross_entropy(x, target, weight=weight * 10), x)
    y = logits.clone().requires_grad_()
    (h,) = torch.autograd.grad(1e-2 * torch.logsumexp(y[counted], 1).square().mean(), y)
    torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-4)
