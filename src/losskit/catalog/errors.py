"""Catalog: bad input and what losskit says about it (the documentation's error table).

Each function makes one bad call and raises; the exception's message is what is shown,
beside the call (its :func:`~losskit.catalog.records.snippet`). Nothing runs at import.
"""

from __future__ import annotations

import torch

import losskit.functional as F
import losskit.info as info


def class_index_out_of_range():
    return F.cross_entropy(torch.randn(3, 5), torch.tensor([0, 7, 2]))


def logits_for_probabilities():
    return F.binary_cross_entropy(torch.tensor([0.2, 1.7]), torch.tensor([0.0, 1.0]))


def shapes_that_do_not_fit():
    return F.nll_loss(torch.randn(4, 3).log_softmax(1), torch.tensor([0, 1, 2]))


def integer_target_for_probabilities():
    return F.cross_entropy(torch.randn(2, 3), torch.tensor([[0, 1, 0], [1, 0, 0]]))


def negative_variance():
    return F.gaussian_nll_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -0.5]))


def ctc_label_outside_the_classes():
    return F.ctc_loss(torch.randn(5, 1, 3).log_softmax(2), torch.tensor([[1, 3]]), [5], [2])


def distribution_not_summing_to_one():
    return info.entropy(torch.tensor([0.5, 0.2]))


ERRORS = [
    ("A class index out of range", class_index_out_of_range),
    ("Probabilities expected, logits given", logits_for_probabilities),
    ("Shapes that do not fit", shapes_that_do_not_fit),
    ("An integer target for probabilities", integer_target_for_probabilities),
    ("A negative variance", negative_variance),
    ("A CTC label outside the classes", ctc_label_outside_the_classes),
    ("A distribution that does not sum to 1", distribution_not_summing_to_one),
]
