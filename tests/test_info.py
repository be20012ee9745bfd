"""losskit.info against scipy's entropy and Jensen-Shannon distance, and the tutorial values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy as scipy_entropy

from losskit import info
from compare import check_raises


def dists(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, -1)


def test_tutorial_entropies():
    # From the tutorial: a fair coin holds ln 2 = 0.693 nats, a fair die ln 6 = 1.792.
    assert info.entropy(torch.tensor([0.5, 0.5])).item() == pytest.approx(0.693, abs=5e-4)
    assert info.entropy(torch.full((6,), 1 / 6)).item() == pytest.approx(1.792, abs=5e-4)
    assert info.entropy(torch.tensor([0.5, 0.5]), base=2).item() == pytest.approx(1.0)
    assert info.entropy(torch.tensor([1.0, 0.0])).item() == 0.0  # 0 log 0 = 0


@pytest.mark.parametrize("base", [math.e, 2.0, 10.0])
def test_against_scipy(base):
    p, q = dists((4, 7), 1), dists((4, 7), 2)
    p[0, 3] = 0.0
    p[0] /= p[0].sum()
    pn, qn = p.numpy(), q.numpy()
    np.testing.assert_allclose(info.entropy(p, base=base).numpy(), scipy_entropy(pn, base=base, axis=-1))
    np.testing.assert_allclose(info.kl_divergence(p, q, base=base).numpy(), scipy_entropy(pn, qn, base=base, axis=-1))
    np.testing.assert_allclose(
        info.cross_entropy(p, q, base=base).numpy(),
        scipy_entropy(pn, base=base, axis=-1) + scipy_entropy(pn, qn, base=base, axis=-1),
    )
    # scipy returns the JS distance, the square root of the divergence.
    np.testing.assert_allclose(
        info.js_divergence(p, q, base=base).numpy(), jensenshannon(pn, qn, base=base, axis=-1) ** 2, atol=1e-12
    )


def test_from_logits_equals_from_probabilities():
    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    pa, pb = torch.softmax(a, -1), torch.softmax(b, -1)
    for fn in (info.cross_entropy, info.kl_divergence, info.js_divergence):
        torch.testing.assert_close(fn(a, b, from_logits=True), fn(pa, pb))
    torch.testing.assert_close(info.entropy(a, from_logits=True), info.entropy(pa))


def test_dim_and_properties():
    p, q = dists((5, 3, 4)), dists((5, 3, 4), 3)
    torch.testing.assert_close(info.kl_divergence(p.movedim(-1, 1), q.movedim(-1, 1), dim=1), info.kl_divergence(p, q))
    assert torch.all(info.kl_divergence(p, q) >= 0)
    torch.testing.assert_close(info.js_divergence(p, q), info.js_divergence(q, p))
    assert torch.all(info.js_divergence(p, q) <= math.log(2))
    torch.testing.assert_close(info.cross_entropy(p, q), info.entropy(p) + info.kl_divergence(p, q))
    # The tutorial's cross-entropy: true class "lion" (index 2), q = [0.5, 0.1, 0.3] + 0.1 elsewhere.
    lion = torch.tensor([0.0, 0.0, 1.0])
    assert info.cross_entropy(lion, torch.tensor([0.6, 0.1, 0.3])).item() == pytest.approx(-math.log(0.3), rel=1e-6)


def test_disjoint_support():
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert info.kl_divergence(p, q).item() == math.inf
    assert info.js_divergence(p, q, base=2).item() == pytest.approx(1.0)


def test_gradients_are_finite_with_zero_probabilities():
    p = torch.tensor([0.7, 0.3, 0.0], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64, requires_grad=True)
    info.js_divergence(p, q).backward()
    assert torch.isfinite(q.grad).all()
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: info.kl_divergence(target, x, from_logits=True), (logits,))
    assert torch.autograd.gradcheck(lambda x: info.js_divergence(target, x, from_logits=True), (logits,))


def test_bad_input():
    check_raises(
        info.entropy, torch.tensor([[0.5, 0.5], [0.6, 0.3]]),
        match="entropy: p is not a distribution along dim -1: the one at index (1,) sums to 0.9, not 1",
    )
    check_raises(info.kl_divergence, torch.tensor([0.5, 0.5]), torch.tensor([1.2, -0.2]),
                 match="kl_divergence: q must hold probabilities in [0, 1]; found 1.2 at index (0,)")
    check_raises(info.entropy, torch.tensor([0.5, float("nan")]), match="found nan at index (1,)")
    check_raises(info.entropy, torch.tensor([1.0, float("nan")]), from_logits=True,
                 match="entropy: p logits must be finite or -inf; found nan at index (1,)")
    check_raises(info.js_divergence, torch.full((3,), 1 / 3), torch.full((4,), 0.25),
                 match="js_divergence: p shape (3,) and q shape (4,) cannot be broadcast together")
    check_raises(info.entropy, torch.tensor([0.5, 0.5]), base=1.0, match="base must be positive and not 1; got 1.0")
    check_raises(info.entropy, torch.tensor(1.0), match="must have a dimension holding the distribution")
    check_raises(info.entropy, torch.tensor([1, 0]), error=TypeError, match="p must be a floating-point tensor")
