"""Bad input gets an exception that names what is wrong and where, never a silent wrong number."""

from __future__ import annotations

import warnings

import pytest
import torch

import losskit.functional as LF
from compare import check_raises

X = torch.randn(5, 10)
T = torch.tensor([1, 2, 3, 4, 5])


def test_class_target_out_of_range_names_value_and_index():
    bad = torch.tensor([1, 2, 3, 12, 5])
    check_raises(LF.cross_entropy, X, bad, error=IndexError,
                 match="cross_entropy: target 12 at index (3,) is out of range for 10 classes")
    check_raises(LF.nll_loss, X, torch.tensor([1, -1, 3, 4, 5]), error=IndexError,
                 match="nll_loss: target -1 at index (1,) is out of range for 10 classes")
    k_dim = torch.zeros(2, 3, 4, dtype=torch.long)
    k_dim[1, 2] = 3
    check_raises(LF.cross_entropy, torch.randn(2, 3, 3, 4), k_dim, error=IndexError,
                 match="target 3 at index (1, 2, 0) is out of range for 3 classes")
    check_raises(LF.cross_entropy, torch.randn(4), torch.tensor(4), error=IndexError,
                 match="cross_entropy: target 4 is out of range for 4 classes")


def test_ignored_targets_may_hold_any_value():
    # ignore_index itself may lie outside [0, C): it is never looked up.
    LF.cross_entropy(X, torch.tensor([1, 2, 99, 4, 5]), ignore_index=99)


def test_class_target_shape_and_dtype():
    check_raises(LF.cross_entropy, X, torch.tensor([1, 2]),
                 match="cross_entropy: target shape (2,) does not fit input shape (5, 10); "
                       "class-index targets must have shape (5,)")
    check_raises(LF.cross_entropy, X, torch.rand(5), error=TypeError,
                 match="cross_entropy: class-index target must be an integer tensor; got torch.float32 of shape (5,)")
    check_raises(LF.cross_entropy, X, torch.ones(5, 10, dtype=torch.long), error=TypeError,
                 match="target (class probabilities, shaped like input) must be a floating-point tensor; got torch.int64")
    check_raises(LF.cross_entropy, X, T.bool(), error=TypeError, match="got torch.bool")
    check_raises(LF.cross_entropy, torch.tensor(1.0), torch.tensor(0),
                 match="cross_entropy: input must have a class dimension")
    check_raises(LF.cross_entropy, X.long(), T, error=TypeError,
                 match="cross_entropy: input must be a floating-point tensor; got torch.int64")


def test_class_options():
    check_raises(LF.cross_entropy, X, T, weight=torch.ones(9),
                 match="cross_entropy: weight must be a 1-D tensor with one entry per class (10); got shape (9,)")
    check_raises(LF.nll_loss, X, T, weight=torch.ones(1, 10), match="got shape (1, 10)")
    check_raises(LF.cross_entropy, X, T, label_smoothing=1.5,
                 match="cross_entropy: label_smoothing must be between 0.0 and 1.0; got 1.5")
    check_raises(LF.cross_entropy, X, torch.rand(5, 10), ignore_index=3,
                 match="cross_entropy: ignore_index (3) is not supported with class-probability targets")


@pytest.mark.parametrize("fn", [LF.cross_entropy, LF.nll_loss, LF.binary_cross_entropy_with_logits, LF.mse_loss])
def test_bad_reduction(fn):
    args = (X, T) if fn in (LF.cross_entropy, LF.nll_loss) else (X, X)
    check_raises(fn, *args, reduction="avg", match="reduction must be one of 'mean', 'sum', 'none'; got 'avg'")


def test_kl_div_reduction_and_shapes():
    check_raises(LF.kl_div, X, X, reduction="batch",
                 match="reduction must be one of 'mean', 'batchmean', 'sum', 'none'; got 'batch'")
    check_raises(LF.kl_div, X, torch.rand(4), reduction="sum",
                 match="kl_div: input shape (5, 10) and target shape (4,) cannot be broadcast together")


def test_binary_cross_entropy_input_outside_unit_interval():
    check_raises(LF.binary_cross_entropy, torch.tensor([[0.2, 1.5]]), torch.ones(1, 2),
                 match="binary_cross_entropy: input must hold probabilities in [0, 1]; found 1.5 at index (0, 1). "
                       "For raw scores (logits) use binary_cross_entropy_with_logits")
    check_raises(LF.binary_cross_entropy, torch.tensor([0.2, float("nan")]), torch.ones(2),
                 match="found nan at index (1,)")


def test_binary_shapes():
    check_raises(LF.binary_cross_entropy, torch.rand(3), torch.rand(3, 1),
                 match="binary_cross_entropy: target shape (3, 1) must match input shape (3,)")
    check_raises(LF.binary_cross_entropy_with_logits, torch.rand(3), torch.rand(3, 1),
                 match="binary_cross_entropy_with_logits: target shape (3, 1) must match input shape (3,)")
    check_raises(LF.binary_cross_entropy, torch.rand(3, 2), torch.rand(3, 2), weight=torch.rand(3),
                 match="binary_cross_entropy: weight of shape (3,) does not broadcast to the input shape (3, 2)")
    check_raises(LF.binary_cross_entropy_with_logits, torch.rand(3, 2), torch.rand(3, 2), pos_weight=torch.rand(4, 3, 2),
                 match="pos_weight of shape (4, 3, 2) does not broadcast to the input shape (3, 2)")


def test_regression_shapes_and_dtypes():
    check_raises(LF.mse_loss, torch.rand(3), torch.rand(4),
                 match="mse_loss: input shape (3,) and target shape (4,) cannot be broadcast together")
    check_raises(LF.l1_loss, torch.rand(3, 2), torch.rand(3, 2), weight=torch.rand(2),
                 match="l1_loss: weight shape (2,) must equal input shape (3, 2)")
    check_raises(LF.mse_loss, torch.ones(3, dtype=torch.long), torch.ones(3), error=TypeError,
                 match="mse_loss: input must be a floating-point tensor; got torch.int64")


def test_softmax_before_cross_entropy_warns():
    probs = torch.softmax(torch.randn(4, 6), 1)
    with pytest.warns(UserWarning, match="input looks like probabilities"):
        LF.cross_entropy(probs, torch.tensor([0, 1, 2, 3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LF.cross_entropy(torch.randn(4, 6), torch.tensor([0, 1, 2, 3]))


def test_legacy_flags_warn_and_resolve_like_torch():
    x, y = torch.randn(3), torch.randn(3)
    with pytest.warns(UserWarning, match="reduction='sum'"):
        assert torch.equal(LF.mse_loss(x, y, size_average=False), LF.mse_loss(x, y, reduction="sum"))
    with pytest.warns(UserWarning, match="reduction='none'"):
        assert LF.mse_loss(x, y, reduce=False).shape == (3,)
