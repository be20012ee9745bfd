"""The checks modes (``losskit.checks``: auto / full / async / off): how bad values are
reported in each, in eager and compiled code, and when the softmax-before-logits warning
may read the data."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as TF

import losskit
import losskit.functional as LF


def test_checks_modes_set_globally_and_per_block():
    assert losskit.checks_mode() == "auto"
    with losskit.checks("off"):
        assert losskit.checks_mode() == "off"
        with losskit.checks("async"):
            assert losskit.checks_mode() == "async"
        assert losskit.checks_mode() == "off"
    assert losskit.checks_mode() == "auto"
    losskit.checks("full")
    try:
        assert losskit.checks_mode() == "full"
    finally:
        losskit.checks("auto")
    with pytest.raises(ValueError, match="mode must be one of 'auto', 'full', 'async', 'off'; got 'fast'"):
        losskit.checks("fast")


BAD_CALLS = [
    ("class index", lambda: LF.cross_entropy(torch.randn(3, 4), torch.tensor([0, 7, 1])), IndexError,
     "target 7 at index (1,) is out of range for 4 classes", "a target class index is out of range for 4 classes"),
    ("probability", lambda: LF.binary_cross_entropy(torch.tensor([0.5, 1.5]), torch.tensor([1.0, 0.0])), ValueError,
     "found 1.5 at index (1,)", "input must hold probabilities in [0, 1]"),
    ("variance", lambda: LF.gaussian_nll_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -1.0])), ValueError,
     "var must be >= 0; found -1 at index (1,)", "var must be >= 0"),
    ("distribution", lambda: losskit.info.entropy(torch.tensor([0.5, 0.6])), ValueError,
     "sums to 1.1, not 1", "is not a distribution along dim -1"),
]


@pytest.mark.parametrize("what, call, error, full_message, async_message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_values_stop_the_program_in_full_and_async_mode(what, call, error, full_message, async_message):
    with pytest.raises(error, match=re.escape(full_message)):
        call()
    with losskit.checks("async"), pytest.raises(RuntimeError, match=re.escape(async_message)):
        call()


def test_off_mode_checks_nothing():
    with losskit.checks("off"):
        LF.binary_cross_entropy(torch.tensor([0.5, 1.5]), torch.tensor([1.0, 0.0]))  # no check: a number
        with pytest.raises((IndexError, RuntimeError)):  # the gather still refuses the index
            LF.cross_entropy(torch.randn(3, 4), torch.tensor([0, 7, 1]))


def test_compiled_loss_asserts_on_bad_targets_without_a_graph_break():
    compiled = torch.compile(LF.cross_entropy, fullgraph=True)
    x = torch.randn(3, 4)
    torch.testing.assert_close(compiled(x, torch.tensor([0, 3, 1])), TF.cross_entropy(x, torch.tensor([0, 3, 1])))
    with pytest.raises(RuntimeError, match="out of range for 4 classes"):
        compiled(x, torch.tensor([0, 7, 1]))


def test_softmax_warning_only_where_data_may_be_read():
    probs = torch.softmax(torch.randn(4, 5), dim=1)
    with pytest.warns(UserWarning, match="looks like probabilities"):
        LF.cross_entropy(probs, torch.tensor([0, 1, 2, 3]))
    with losskit.checks("async"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            LF.cross_entropy(probs, torch.tensor([0, 1, 2, 3]))
