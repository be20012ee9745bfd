"""losskit.nn Modules: same constructor arguments as torch.nn, same results as functional."""

from __future__ import annotations

import pytest
import torch

import losskit.functional as LF
import losskit.nn as LN
from compare import check_against_torch, check_raises

C = 5


def inputs(name):
    """(input, target) fitting the loss of that Module."""
    x = torch.randn(4, C, dtype=torch.float64, requires_grad=True)
    if name in ("CrossEntropyLoss", "NLLLoss"):
        target = torch.tensor([0, 4, 2, 2])
        return (x if name == "CrossEntropyLoss" else torch.log_softmax(x, 1)), target
    if name == "BCELoss":
        return torch.sigmoid(x), torch.rand(4, C, dtype=torch.float64)
    if name == "KLDivLoss":
        return torch.log_softmax(x, 1), torch.softmax(torch.randn(4, C, dtype=torch.float64), 1)
    return x, torch.randn(4, C, dtype=torch.float64)


CASES = [
    ("CrossEntropyLoss", {"weight": torch.rand(C, dtype=torch.float64), "label_smoothing": 0.1, "reduction": "sum"}),
    ("CrossEntropyLoss", {"ignore_index": 2, "reduction": "none"}),
    ("NLLLoss", {"weight": torch.rand(C, dtype=torch.float64), "reduction": "mean"}),
    ("BCELoss", {"weight": torch.rand(C, dtype=torch.float64)}),
    ("BCEWithLogitsLoss", {"weight": torch.rand(C, dtype=torch.float64), "pos_weight": torch.rand(C, dtype=torch.float64)}),
    ("MSELoss", {"reduction": "sum"}),
    ("L1Loss", {}),
    ("KLDivLoss", {"reduction": "batchmean", "log_target": False}),
    ("MSELoss", {"size_average": False}),  # torch's deprecated flags: size_average=False is 'sum'
    ("SmoothL1Loss", {"beta": 0.5, "reduction": "sum"}),
    ("HuberLoss", {"delta": 0.7, "reduction": "none"}),
    ("PoissonNLLLoss", {"full": True}),
    ("L1Loss", {"reduce": False}),
]


@pytest.mark.parametrize("name, kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_module_matches_torch_module(name, kwargs):
    if name == "BCEWithLogitsLoss":
        x = torch.randn(4, C, dtype=torch.float64, requires_grad=True)
        target = torch.rand(4, C, dtype=torch.float64)
    else:
        x, target = inputs(name)
    legacy = bool({"size_average", "reduce"} & kwargs.keys())
    with pytest.warns(UserWarning, match="deprecated") if legacy else _nothing():
        ours = getattr(LN, name)(**kwargs)
    with pytest.warns(UserWarning, match="deprecated") if legacy else _nothing():
        theirs = getattr(torch.nn, name)(**kwargs)
    assert ours.reduction == theirs.reduction
    check_against_torch(ours, theirs, x, target)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_weight_is_a_buffer_that_follows_the_module():
    loss = LN.CrossEntropyLoss(weight=torch.rand(C))
    assert "weight" in dict(loss.named_buffers())
    loss = loss.double()
    assert loss.weight.dtype == torch.float64
    assert set(LN.BCEWithLogitsLoss(pos_weight=torch.ones(3)).state_dict()) == {"pos_weight"}


def test_module_and_functional_agree():
    x = torch.randn(6, C)
    target = torch.randint(0, C, (6,))
    weight = torch.rand(C)
    module = LN.CrossEntropyLoss(weight=weight, label_smoothing=0.2, ignore_index=1)
    functional = LF.cross_entropy(x, target, weight=weight, label_smoothing=0.2, ignore_index=1)
    assert torch.equal(module(x, target), functional)


def test_module_rejects_a_bad_reduction_at_construction():
    check_raises(LN.MSELoss, reduction="avg", match="reduction must be one of 'mean', 'sum', 'none'; got 'avg'")
    check_raises(LN.CrossEntropyLoss, reduction="batchmean", match="got 'batchmean'")
    assert LN.KLDivLoss(reduction="batchmean").reduction == "batchmean"


def test_linear_cross_entropy_module_matches_torch_module():
    torch.manual_seed(3)
    theirs = torch.nn.LinearCrossEntropyLoss(6, 9, bias=True, label_smoothing=0.1, dtype=torch.float64)
    ours = LN.LinearCrossEntropyLoss(6, 9, bias=True, label_smoothing=0.1, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 8, -100, 3, 3])
    check_against_torch(ours, theirs, x, target)
    ours(x, target).backward()
    theirs(x, target).backward()
    torch.testing.assert_close(ours.linear.weight.grad, theirs.linear.weight.grad)
    torch.testing.assert_close(ours.linear.bias.grad, theirs.linear.bias.grad)
    check_raises(LN.LinearCrossEntropyLoss, 6, 9, weight=torch.ones(4), match="one entry per class (9)")


def test_gaussian_nll_module_matches_torch_module():
    x, y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(4, 3, dtype=torch.float64)
    var = (torch.rand(4, 1, dtype=torch.float64) + 0.1).requires_grad_()
    check_against_torch(LN.GaussianNLLLoss(full=True, reduction="sum"), torch.nn.GaussianNLLLoss(full=True, reduction="sum"),
                        x, y, var)
