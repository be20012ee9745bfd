"""Margin and embedding losses against torch 2.13 on the same inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
import losskit.nn as LN
from compare import DTYPES, REDUCTIONS, check_against_torch, check_raises

# torch's CPU multi(label) margin kernels exist for float32/float64 only; losskit also takes
# half types (computed in float32), checked against its own float32 result below.
FULL_DTYPES = DTYPES[:2]


def rand(shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def signs(shape, dtype=torch.float64):
    return (torch.randint(0, 2, shape) * 2 - 1).to(dtype)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(), (7,), (4, 3), (2, 3, 5)])
def test_soft_margin(shape, reduction, dtype, atol, rtol):
    check_against_torch(LF.soft_margin_loss, TF.soft_margin_loss, rand(shape, dtype, 3), signs(shape, dtype),
                        reduction=reduction, atol=atol, rtol=rtol)


def test_soft_margin_stays_finite_where_torch_overflows():
    # torch computes log1p(exp(-y x)), inf at -y x = 100 in float32; losskit's softplus is exact.
    x = torch.tensor([-100.0])
    assert torch.isinf(TF.soft_margin_loss(x, torch.tensor([1.0])))
    assert LF.soft_margin_loss(x, torch.tensor([1.0])).item() == pytest.approx(100.0)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(5,), (4, 5)])
def test_multilabel_soft_margin(shape, weighted, reduction, dtype, atol, rtol):
    target = torch.randint(0, 2, shape).to(dtype)
    weight = (torch.rand(shape[-1], dtype=torch.float64) + 0.1).to(dtype) if weighted else None
    check_against_torch(LF.multilabel_soft_margin_loss, TF.multilabel_soft_margin_loss, rand(shape, dtype, 2), target,
                        weight=weight, reduction=reduction, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", FULL_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_multilabel_margin(reduction, dtype, atol, rtol):
    # Rows end at their first -1; anything after it is ignored, as in torch.
    target = torch.tensor([[3, 0, -1, 1, 2], [1, -1, 4, 4, 0], [-1, 2, 3, 0, 1], [0, 1, 2, 3, 4]])
    check_against_torch(LF.multilabel_margin_loss, TF.multilabel_margin_loss, rand((4, 5), dtype), target,
                        reduction=reduction, atol=atol, rtol=rtol)
    check_against_torch(LF.multilabel_margin_loss, TF.multilabel_margin_loss, rand((5,), dtype), target[0],
                        reduction=reduction, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", FULL_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_multi_margin(weighted, p, reduction, dtype, atol, rtol):
    weight = (torch.rand(6, dtype=torch.float64) + 0.1).to(dtype) if weighted else None
    for shape, target in (((5, 6), torch.randint(0, 6, (5,))), ((6,), torch.tensor(2))):
        check_against_torch(LF.multi_margin_loss, TF.multi_margin_loss, rand(shape, dtype), target, p=p, margin=0.7,
                            weight=weight, reduction=reduction, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_multi_margin_losses_in_half_precision_follow_float32(dtype):
    x = torch.randn(5, 6)
    target = torch.randint(0, 6, (5,))
    labels = torch.tensor([[3, 0, -1, 1, 2, 5]] * 5)
    for fn, t in ((LF.multi_margin_loss, target), (LF.multilabel_margin_loss, labels)):
        half = fn(x.to(dtype), t)
        assert half.dtype == dtype
        torch.testing.assert_close(half.float(), fn(x.to(dtype).float(), t), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_margin_ranking(reduction, dtype, atol, rtol):
    check_against_torch(LF.margin_ranking_loss, TF.margin_ranking_loss, rand((9,), dtype), rand((9,), dtype),
                        signs((9,), dtype), margin=0.3, reduction=reduction, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hinge_embedding_including_targets_outside_plus_minus_one(reduction, dtype, atol, rtol):
    target = torch.tensor([1.0, -1.0, 0.0, 2.0, 1.0, -1.0]).to(dtype)  # 0 and 2 get both terms, as in torch
    check_against_torch(LF.hinge_embedding_loss, TF.hinge_embedding_loss, rand((6,), dtype).abs().detach().requires_grad_(),
                        target, margin=0.8, reduction=reduction, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cosine_embedding(reduction, dtype, atol, rtol):
    target = torch.tensor([1, -1, 1, -1, 0]).to(dtype)
    a, b = rand((5, 4), dtype), rand((5, 4), dtype)
    check_against_torch(LF.cosine_embedding_loss, TF.cosine_embedding_loss, a, b, target, margin=0.2,
                        reduction=reduction, atol=atol, rtol=rtol)
    check_against_torch(LF.cosine_embedding_loss, TF.cosine_embedding_loss, rand((4,), dtype), rand((4,), dtype),
                        torch.tensor(-1.0, dtype=dtype), reduction=reduction, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("p, swap", [(2.0, False), (1.0, True), (3.0, False)])
def test_triplet_margin(p, swap, reduction, dtype, atol, rtol):
    a, pos, neg = rand((6, 4), dtype), rand((6, 4), dtype), rand((6, 4), dtype)
    # Without swap the anchor's gradient is -(dp + dn), summed from the two half-type
    # gradients as torch's own half-type autograd sums its two (the node keeps two
    # gradients, as torch keeps two differences): its error is the two gradients' errors
    # at their size, not its own, so it gets their two tolerances. Ours against torch's own
    # half-type error on the same inputs: tests/test_native_embedding_half.py.
    grad_atol = 2 * atol if dtype in (torch.bfloat16, torch.float16) and not swap else None
    check_against_torch(LF.triplet_margin_loss, TF.triplet_margin_loss, a, pos, neg, margin=0.5, p=p, swap=swap,
                        reduction=reduction, atol=atol, rtol=rtol, grad_atol=grad_atol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triplet_margin_with_distance(reduction):
    a, pos, neg = rand((6, 4)), rand((6, 4)), rand((6, 4))
    check_against_torch(LF.triplet_margin_with_distance_loss, TF.triplet_margin_with_distance_loss, a, pos, neg,
                        reduction=reduction, swap=True)

    def cosine_distance(x, y):
        return 1 - TF.cosine_similarity(x, y)

    check_against_torch(LF.triplet_margin_with_distance_loss, TF.triplet_margin_with_distance_loss, a, pos, neg,
                        distance_function=cosine_distance, margin=0.4, reduction=reduction)


def test_pairwise_distance_matches_torch():
    for p in (1.0, 2.0, 3.5):
        check_against_torch(LF.pairwise_distance, TF.pairwise_distance, rand((5, 3)), rand((5, 3)), p=p)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(reduction):
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[3, 0, -1, 1, 2], [1, -1, 4, 4, 0], [0, 1, 2, 3, 4], [2, -1, 0, 0, 0]])
    assert torch.autograd.gradcheck(lambda a: LF.multilabel_margin_loss(a, target, reduction=reduction), (x,))
    assert torch.autograd.gradcheck(
        lambda a: LF.multi_margin_loss(a, torch.tensor([0, 2, 4, 1]), p=2, reduction=reduction), (x,)
    )
    b, c = torch.randn(4, 5, dtype=torch.float64, requires_grad=True), torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda u, v: LF.triplet_margin_loss(u, v, c, reduction=reduction), (x, b))
    assert torch.autograd.gradcheck(
        lambda u, v: LF.cosine_embedding_loss(u, v, torch.tensor([1.0, -1.0, 1.0, -1.0]), reduction=reduction), (x, b)
    )


MODULES = [
    ("SoftMarginLoss", {}, 2), ("MultiLabelSoftMarginLoss", {"weight": torch.rand(5, dtype=torch.float64)}, 2),
    ("MultiLabelMarginLoss", {}, 2), ("MultiMarginLoss", {"p": 2, "margin": 0.5}, 2),
    ("MarginRankingLoss", {"margin": 0.1}, 3), ("HingeEmbeddingLoss", {"margin": 2.0}, 2),
    ("CosineEmbeddingLoss", {"margin": 0.1}, 3), ("TripletMarginLoss", {"swap": True, "reduction": "sum"}, 3),
    ("TripletMarginWithDistanceLoss", {"margin": 0.3}, 3),
]


@pytest.mark.parametrize("name, kwargs, arity", MODULES, ids=[m[0] for m in MODULES])
def test_modules_match_torch_modules(name, kwargs, arity):
    x = rand((4, 5))
    second = {
        "SoftMarginLoss": signs((4, 5)), "MultiLabelSoftMarginLoss": torch.randint(0, 2, (4, 5)).double(),
        "MultiLabelMarginLoss": torch.tensor([[3, 0, -1, 1, 2]] * 4), "MultiMarginLoss": torch.tensor([0, 1, 2, 4]),
        "HingeEmbeddingLoss": signs((4, 5)),
    }
    args = (x, second[name]) if arity == 2 else (x, rand((4, 5)), signs((4,)) if "Embedding" in name or "Ranking" in name
                                                  else rand((4, 5)))
    if name == "MarginRankingLoss":
        args = (rand((4,)), rand((4,)), signs((4,)))
    check_against_torch(getattr(LN, name)(**kwargs), getattr(torch.nn, name)(**kwargs), *args)


def test_margin_bad_input():
    x = torch.randn(3, 4)
    check_raises(LF.multi_margin_loss, x, torch.tensor([0, 4, 1]), error=IndexError,
                 match="multi_margin_loss: target 4 at index (1,) is out of range for 4 classes")
    check_raises(LF.multi_margin_loss, x, torch.tensor([0, 1, 1]), p=3, match="p must be 1 or 2; got 3")
    check_raises(LF.multilabel_margin_loss, x, torch.tensor([[0, 9, -1, 0]] * 3), error=IndexError,
                 match="multilabel_margin_loss: target 9 at index (0, 1) is out of range for 4 classes")
    check_raises(LF.multilabel_margin_loss, x, torch.tensor([0, 1, 2]),
                 match="target shape (3,) must be (3, 4) for input shape (3, 4)")
    check_raises(LF.margin_ranking_loss, x, x, torch.ones(3),
                 match="margin_ranking_loss: all inputs must have the same number of dimensions")
    check_raises(LF.cosine_embedding_loss, x, x, torch.ones(4), match="cosine_embedding_loss: expected input1 and input2")
    check_raises(LF.triplet_margin_with_distance_loss, x, x, x, margin=0.0, match="margin must be > 0; got 0.0")
    check_raises(LF.triplet_margin_loss, x, x, x[0], match="triplet_margin_loss: all inputs must have the same number")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64_remaining_margin_losses(reduction):
    x, z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True), torch.randn(4, 5, dtype=torch.float64)
    s = signs((4, 5))
    weight = torch.rand(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: LF.soft_margin_loss(a, s, reduction=reduction), (x,))
    assert torch.autograd.gradcheck(
        lambda a: LF.multilabel_soft_margin_loss(a, (s > 0).double(), weight=weight, reduction=reduction), (x,))
    assert torch.autograd.gradcheck(lambda a, b: LF.margin_ranking_loss(a, b, s, margin=0.1, reduction=reduction), (x, z.requires_grad_()))
    assert torch.autograd.gradcheck(lambda a: LF.hinge_embedding_loss(a, s, margin=0.5, reduction=reduction), (x,))
    assert torch.autograd.gradcheck(
        lambda a: LF.triplet_margin_with_distance_loss(a, z, z.flip(0), swap=True, reduction=reduction), (x,))


@pytest.mark.parametrize("classes", [3, 32, 33, 70])  # the pairwise form up to 32 classes, the sorted beyond
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_multilabel_margin_pairwise_and_sorted_forms_match_torch(classes, reduction):
    g = torch.Generator().manual_seed(classes)
    x = torch.randn(6, classes, generator=g, dtype=torch.float64)
    x[1, 0] = x[1, 1] - 1  # a tie (z exactly 0): no term, as in torch
    target = torch.randint(0, classes, (6, classes), generator=g)
    target[:, 0] = target[:, 1]  # a listed target twice counts twice, as in torch
    target[:, min(4, classes - 1)] = -1
    target[2, 0] = -1  # no listed target
    for dtype, atol, rtol in FULL_DTYPES:
        check_against_torch(LF.multilabel_margin_loss, TF.multilabel_margin_loss,
                            x.to(dtype).requires_grad_(), target, reduction=reduction, atol=atol, rtol=rtol)


def test_multilabel_margin_inf_and_nan_scores_follow_torch():
    # An inf non-target score makes the loss inf; a nan score's terms are skipped (nan > 0
    # is false), in both forms.
    for classes in (4, 40):
        x = torch.randn(3, classes, dtype=torch.float64)
        x[0, 3], x[1, 2] = float("inf"), float("nan")
        target = torch.full((3, classes), -1)
        target[:, :2] = torch.tensor([[0, 1], [0, 1], [1, 1]])
        check_against_torch(LF.multilabel_margin_loss, TF.multilabel_margin_loss, x.requires_grad_(), target,
                            reduction="none")
