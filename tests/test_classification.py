"""cross_entropy, nll_loss, binary_cross_entropy(_with_logits) against torch 2.13 on the same inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from compare import DTYPES, REDUCTIONS, TOLERANCES, check_against_torch

# (C,) unbatched, (N, C), K-dimensional (N, C, d1) and (N, C, d1, d2), and an odd size.
SHAPES = [(5,), (4, 5), (3, 7, 5), (2, 4, 3, 2), (13, 31)]


def class_targets(shape: tuple[int, ...], ignore_index: int) -> torch.Tensor:
    """Random class indices for an input of ``shape``, a third of them set to ignore_index."""
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    target_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    target = torch.randint(0, num_classes, target_shape)
    if target.dim():
        ignored = torch.rand(target_shape) < 1 / 3
        ignored.view(-1)[0] = False  # keep one target that counts
        target[ignored] = ignore_index
    return target


def logits(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("ignore_index", [-100, 1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_class_indices(shape, weighted, ignore_index, label_smoothing, reduction, dtype, atol, rtol):
    num_classes = shape[0] if len(shape) == 1 else shape[1]
    weight = (torch.rand(num_classes, dtype=torch.float64) + 0.1).to(dtype) if weighted else None
    check_against_torch(
        LF.cross_entropy,
        TF.cross_entropy,
        logits(shape, dtype),
        class_targets(shape, ignore_index),
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        atol=atol,
        rtol=rtol,
    )


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_class_probabilities(shape, weighted, label_smoothing, reduction, dtype, atol, rtol):
    class_dim = 0 if len(shape) == 1 else 1
    weight = (torch.rand(shape[class_dim], dtype=torch.float64) + 0.1).to(dtype) if weighted else None
    target = torch.softmax(torch.randn(shape, dtype=torch.float64), dim=class_dim).to(dtype).requires_grad_()
    check_against_torch(
        LF.cross_entropy,
        TF.cross_entropy,
        logits(shape, dtype),
        target,
        weight=weight,
        reduction=reduction,
        label_smoothing=label_smoothing,
        atol=atol,
        rtol=rtol,
    )


def test_cross_entropy_odd_large_shape():
    # An odd size with many classes, in float32: (3, 423, 1271) as (N, C, d1) is too slow
    # for the full matrix, so one configuration of each option.
    x = logits((3, 1271, 17), torch.float32)
    target = class_targets((3, 1271, 17), -100)
    weight = torch.rand(1271) + 0.5
    for kwargs in [{}, {"weight": weight}, {"label_smoothing": 0.1, "weight": weight}, {"reduction": "none"}]:
        check_against_torch(LF.cross_entropy, TF.cross_entropy, x, target, atol=1e-5, rtol=1e-5, **kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_all_targets_ignored(weighted, label_smoothing, reduction):
    # torch: 'mean' is 0/0 = nan, 'sum' is 0, 'none' is all zeros; gradients are zero.
    weight = torch.rand(4) if weighted else None
    target = torch.full((3,), -100)
    out = check_against_torch(
        LF.cross_entropy, TF.cross_entropy, logits((3, 4), torch.float32), target,
        weight=weight, reduction=reduction, label_smoothing=label_smoothing,
    )
    if reduction == "mean":
        assert torch.isnan(out)
    else:
        assert torch.all(out == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_empty_batch(reduction):
    x = logits((0, 5), torch.float32)
    check_against_torch(LF.cross_entropy, TF.cross_entropy, x, torch.zeros(0, dtype=torch.long), reduction=reduction)
    check_against_torch(LF.cross_entropy, TF.cross_entropy, x, torch.zeros(0, 5), reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_cross_entropy_accepts_other_integer_targets(dtype):
    # Beyond torch, which takes int64 and uint8 only: any integer dtype gives the int64 answer.
    x = logits((6, 4), torch.float32)
    target = torch.randint(0, 4, (6,))
    check_against_torch(
        lambda inp, t: LF.cross_entropy(inp, t.to(dtype), label_smoothing=0.1),
        lambda inp, t: TF.cross_entropy(inp, t, label_smoothing=0.1),
        x,
        target,
    )


def test_cross_entropy_is_stable_for_huge_logits():
    x = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], requires_grad=True)
    check_against_torch(LF.cross_entropy, TF.cross_entropy, x, torch.tensor([1, 0]), reduction="none")
    assert torch.isfinite(LF.cross_entropy(x, torch.tensor([1, 0]))).all()


def test_cross_entropy_ignored_rows_equal_sliced_rows():
    # Invariance: ignoring rows == dropping them, for values and for the kept rows' gradients.
    x = logits((8, 6), torch.float64)
    target = torch.randint(0, 6, (8,))
    keep = torch.tensor([True, False, True, True, False, True, False, True])
    masked = target.masked_fill(~keep, -100)
    weight = torch.rand(6, dtype=torch.float64)
    for kwargs in [{}, {"weight": weight}, {"label_smoothing": 0.2, "weight": weight}]:
        a = LF.cross_entropy(x, masked, **kwargs)
        b = LF.cross_entropy(x[keep], target[keep], **kwargs)
        torch.testing.assert_close(a, b)
        (ga,) = torch.autograd.grad(a, x)
        (gb,) = torch.autograd.grad(b, x)
        torch.testing.assert_close(ga, gb)
        assert torch.all(ga[~keep] == 0)


def test_cross_entropy_indices_equal_one_hot():
    # Invariance: integer labels == their one-hot distributions (sparse vs categorical).
    x = logits((7, 5), torch.float64)
    target = torch.randint(0, 5, (7,))
    one_hot = torch.eye(5, dtype=torch.float64)[target]
    for kwargs in [{}, {"label_smoothing": 0.2}, {"reduction": "none"}]:
        torch.testing.assert_close(LF.cross_entropy(x, target, **kwargs), LF.cross_entropy(x, one_hot, **kwargs))


def test_cross_entropy_class_dim_moves_like_movedim():
    # Invariance: (N, C, d) input == the same values laid out as (N*d, C).
    x = logits((2, 5, 3), torch.float64)
    target = torch.randint(0, 5, (2, 3))
    flat = LF.cross_entropy(x.movedim(1, -1).reshape(-1, 5), target.reshape(-1), reduction="none")
    torch.testing.assert_close(LF.cross_entropy(x, target, reduction="none"), flat.reshape(2, 3))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_nll_loss(shape, weighted, ignore_index, reduction, dtype, atol, rtol):
    class_dim = 0 if len(shape) == 1 else 1
    weight = (torch.rand(shape[class_dim], dtype=torch.float64) + 0.1).to(dtype) if weighted else None
    log_probs = torch.log_softmax(torch.randn(shape, dtype=torch.float64), class_dim).to(dtype).requires_grad_()
    check_against_torch(
        LF.nll_loss,
        TF.nll_loss,
        log_probs,
        class_targets(shape, ignore_index),
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        atol=atol,
        rtol=rtol,
    )


def test_nll_loss_all_ignored_and_uint8_targets():
    x = torch.log_softmax(torch.randn(3, 4), 1).requires_grad_()
    out = check_against_torch(LF.nll_loss, TF.nll_loss, x, torch.full((3,), -100))
    assert torch.isnan(out)
    check_against_torch(LF.nll_loss, TF.nll_loss, x, torch.tensor([0, 3, 1], dtype=torch.uint8))


# -- binary cross-entropy ------------------------------------------------------------------

BINARY_SHAPES = [(), (7,), (4, 3), (2, 3, 5)]


def weight_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...] | None]:
    """No weight, a full one, and ones that broadcast from the right."""
    options: list[tuple[int, ...] | None] = [None, shape]
    if len(shape) >= 1:
        options.append(shape[-1:])
    if len(shape) >= 2:
        options.append(shape[:-1] + (1,))
    return options


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", BINARY_SHAPES)
def test_binary_cross_entropy(shape, reduction, dtype, atol, rtol):
    probs = torch.rand(shape, dtype=torch.float64).clamp(0.02, 0.98).to(dtype).requires_grad_()
    target = torch.rand(shape, dtype=torch.float64).to(dtype).requires_grad_()
    for weight_shape in weight_shapes(shape):
        weight = None if weight_shape is None else torch.rand(weight_shape, dtype=torch.float64).to(dtype)
        check_against_torch(
            LF.binary_cross_entropy, TF.binary_cross_entropy, probs, target,
            weight=weight, reduction=reduction, atol=atol, rtol=rtol,
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_binary_cross_entropy_clamps_at_the_edges(dtype):
    # p = 0 and p = 1: torch clamps each log at -100 and the gradient's denominator at 1e-12.
    probs = torch.tensor([0.0, 0.0, 1.0, 1.0, 1e-30, 0.5], dtype=dtype, requires_grad=True)
    target = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.3, 0.5], dtype=dtype, requires_grad=True)
    out = check_against_torch(
        LF.binary_cross_entropy, TF.binary_cross_entropy, probs, target, reduction="none", rtol=1e-6
    )
    assert out[1] == 100 and out[2] == 100
    check_against_torch(LF.binary_cross_entropy, TF.binary_cross_entropy, probs, target, rtol=1e-6)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", BINARY_SHAPES)
def test_binary_cross_entropy_with_logits(shape, reduction, dtype, atol, rtol):
    x = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype).requires_grad_()
    target = torch.rand(shape, dtype=torch.float64).to(dtype).requires_grad_()
    for weight_shape in weight_shapes(shape):
        for pos_weight_shape in weight_shapes(shape):
            weight = None if weight_shape is None else torch.rand(weight_shape, dtype=torch.float64).to(dtype)
            pos_weight = (
                None if pos_weight_shape is None else (torch.rand(pos_weight_shape, dtype=torch.float64) * 3).to(dtype)
            )
            check_against_torch(
                LF.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, x, target,
                weight=weight, pos_weight=pos_weight, reduction=reduction, atol=atol, rtol=rtol,
            )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_binary_cross_entropy_with_logits_is_stable_for_huge_logits(dtype):
    x = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0], dtype=dtype, requires_grad=True)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5], dtype=dtype)
    atol, rtol = TOLERANCES[dtype]
    out = check_against_torch(
        LF.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits, x, target,
        pos_weight=torch.tensor(2.0, dtype=dtype), reduction="none", atol=atol, rtol=rtol,
    )
    assert torch.isfinite(out).all()
    assert out[0] == 0 and out[1] == 0  # confidently right: exactly zero loss


def test_bce_on_sigmoid_equals_bce_with_logits():
    # The tutorial's point: BCELoss(sigmoid(x)) == BCEWithLogitsLoss(x), minus the instability.
    x = torch.randn(20, dtype=torch.float64)
    target = torch.randint(0, 2, (20,)).double()
    torch.testing.assert_close(
        LF.binary_cross_entropy(torch.sigmoid(x), target), LF.binary_cross_entropy_with_logits(x, target)
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(reduction):
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    target = class_targets((4, 5, 3), -100)
    soft = torch.softmax(torch.randn(4, 5, 3, dtype=torch.float64), 1).requires_grad_()
    weight = torch.rand(5, dtype=torch.float64) + 0.1
    assert torch.autograd.gradcheck(
        lambda a: LF.cross_entropy(a, target, weight=weight, label_smoothing=0.1, reduction=reduction), (x,)
    )
    assert torch.autograd.gradcheck(
        lambda a, t: LF.cross_entropy(a, t, weight=weight, label_smoothing=0.1, reduction=reduction), (x, soft)
    )
    assert torch.autograd.gradcheck(lambda a: LF.nll_loss(a, target, weight=weight, reduction=reduction), (x,))
    p = torch.rand(6, 2, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_()
    y = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: LF.binary_cross_entropy(a, b, reduction=reduction), (p, y))
    z = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    pos_weight = torch.rand(2, dtype=torch.float64) * 2
    assert torch.autograd.gradcheck(
        lambda a, b: LF.binary_cross_entropy_with_logits(a, b, pos_weight=pos_weight, reduction=reduction), (z, y)
    )
