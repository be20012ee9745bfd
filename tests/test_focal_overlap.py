"""Losses beyond torch and Keras, against written-out references (and torch where they reduce to it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from oracles_beyond_torch import poly1_definition as written_poly1
from oracles_beyond_torch import sigmoid_focal_definition as torchvision_sigmoid_focal
from oracles_beyond_torch import softmax_focal_definition as written_softmax_focal
from compare import DTYPES, REDUCTIONS, check_against_torch, check_raises


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 0.0), (0.7, 1.5)])
def test_sigmoid_focal(alpha, gamma, reduction, dtype, atol, rtol):
    x = (torch.randn(6, 5, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    y = torch.randint(0, 2, (6, 5)).to(dtype)
    check_against_torch(LF.sigmoid_focal_loss, torchvision_sigmoid_focal, x, y, alpha=alpha, gamma=gamma,
                        reduction=reduction, atol=atol, rtol=rtol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", [0.0, 2.0, 0.5])
@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_focal(weighted, gamma, reduction):
    x = (torch.randn(7, 5, 3, dtype=torch.float64) * 2).requires_grad_()
    target = torch.randint(0, 5, (7, 3))
    target[0, 0] = -100
    alpha = torch.rand(5, dtype=torch.float64) + 0.2 if weighted else None
    check_against_torch(LF.softmax_focal_loss, written_softmax_focal, x, target, alpha=alpha, gamma=gamma,
                        reduction=reduction, atol=1e-10, rtol=1e-10)


def test_softmax_focal_with_gamma_zero_is_cross_entropy():
    x, target = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 4, (8,))
    torch.testing.assert_close(LF.softmax_focal_loss(x, target, gamma=0.0), TF.cross_entropy(x, target))
    alpha = torch.rand(4, dtype=torch.float64)
    torch.testing.assert_close(LF.softmax_focal_loss(x, target, alpha=alpha, gamma=0.0, reduction="sum"),
                               TF.cross_entropy(x, target, weight=alpha, reduction="sum"))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("epsilon", [0.0, 1.0, -0.5])
def test_poly1(epsilon, reduction):
    x = (torch.randn(9, 6, dtype=torch.float64) * 2).requires_grad_()
    target = torch.randint(0, 6, (9,))
    target[3] = -100
    check_against_torch(LF.poly1_cross_entropy, written_poly1, x, target, epsilon=epsilon, reduction=reduction,
                        atol=1e-10, rtol=1e-10)


def written_overlap(probs, onehot, keep, alpha, beta, smooth, dice):
    """Per (sample, class) loss, by explicit loops over samples and classes."""
    n, c = probs.shape[:2]
    out = torch.empty(n, c, dtype=probs.dtype)
    for i in range(n):
        for k in range(c):
            p, t, m = probs[i, k].flatten(), onehot[i, k].flatten(), keep[i].flatten()
            tp, sp, st = (p * t * m).sum(), (p * m).sum(), (t * m).sum()
            if dice:
                out[i, k] = 1 - (2 * tp + smooth) / (sp + st + smooth)
            else:
                out[i, k] = 1 - (tp + smooth) / (tp + alpha * (sp - tp) + beta * (st - tp) + smooth)
    return out


@pytest.mark.parametrize("dice", [True, False])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("ignore_index", [None, 2])
@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_dice_and_tversky_against_loops(dice, from_logits, ignore_index, smooth):
    logits = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (3, 5, 6))
    if ignore_index is None:
        target[0, 0, 0] = 1
    keep = target != (ignore_index if ignore_index is not None else -100)
    probs = torch.softmax(logits, 1)
    onehot = TF.one_hot(target.clamp(0, 3), 4).movedim(-1, 1).double()
    alpha, beta = (0.5, 0.5) if dice else (0.3, 0.7)
    expected = written_overlap(probs, onehot, keep, alpha, beta, smooth, dice)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    inputs = logits if from_logits else probs
    kwargs = {"from_logits": from_logits, "smooth": smooth, "ignore_index": ignore_index}
    if dice:
        got_none = LF.dice_loss(inputs, target, reduction="none", **kwargs)
        got_mean = LF.dice_loss(inputs, target, weight=weight, **kwargs)
    else:
        got_none = LF.tversky_loss(inputs, target, alpha=alpha, beta=beta, reduction="none", **kwargs)
        got_mean = LF.tversky_loss(inputs, target, alpha=alpha, beta=beta, weight=weight, **kwargs)
    torch.testing.assert_close(got_none, expected)
    torch.testing.assert_close(got_mean, ((expected * weight).sum(1) / weight.sum()).mean())
    (g_ours,) = torch.autograd.grad(got_mean, logits, retain_graph=True)
    (g_ref,) = torch.autograd.grad(((expected * weight).sum(1) / weight.sum()).mean(), logits)
    torch.testing.assert_close(g_ours, g_ref)


def test_overlap_properties():
    logits = torch.randn(2, 3, 8, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 8))
    onehot = TF.one_hot(target, 3).movedim(-1, 1).double()
    # Index targets == their one-hot probabilities; tversky(1/2, 1/2) == dice without smoothing.
    torch.testing.assert_close(LF.dice_loss(logits, target), LF.dice_loss(logits, onehot))
    torch.testing.assert_close(LF.tversky_loss(logits, target, smooth=0.0), LF.dice_loss(logits, target, smooth=0.0))
    assert LF.dice_loss(onehot, target, from_logits=False).item() == 0.0  # a perfect prediction
    assert LF.dice_loss(torch.randn(4, 3), torch.randint(0, 3, (4,)), reduction="none").shape == (4, 3)


def test_beyond_bad_input():
    x = torch.randn(3, 4)
    check_raises(LF.softmax_focal_loss, x, torch.tensor([0, 5, 1]), error=IndexError,
                 match="softmax_focal_loss: target 5 at index (1,) is out of range for 4 classes")
    check_raises(LF.softmax_focal_loss, x, torch.tensor([0, 1, 1]), gamma=-1.0, match="gamma must be >= 0; got -1.0")
    check_raises(LF.sigmoid_focal_loss, x, torch.rand(3, 1), match="target shape (3, 1) must match input shape (3, 4)")
    check_raises(LF.dice_loss, torch.rand(2, 3, 4) * 2, torch.zeros(2, 4, dtype=torch.long), from_logits=False,
                 match="dice_loss: input must hold probabilities in [0, 1]")
    check_raises(LF.tversky_loss, torch.randn(2, 3, 4), torch.rand(2, 3, 4), ignore_index=1,
                 match="ignore_index is not supported with class-probability targets")
    check_raises(LF.dice_loss, torch.randn(3), torch.tensor(0), match="input must be [N, C, ...]")


def liger_style_jsd(log_q, log_p, beta=0.5, labels=None, ignore_index=-100):
    """The generalised JSD written with torch's kl_div: beta 0 forward KL, 1 reverse KL."""
    kl = lambda inp, tgt: TF.kl_div(inp, tgt, reduction="none", log_target=True).sum(-1)  # noqa: E731  KL(tgt || inp)
    if beta == 0:
        rows = kl(log_q, log_p)
    elif beta == 1:
        rows = kl(log_p, log_q)
    else:
        log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
        rows = beta * kl(log_m, log_p) + (1 - beta) * kl(log_m, log_q)
    if labels is None:
        return rows.sum() / rows.numel()
    keep = labels != ignore_index
    return (rows * keep).sum() / keep.sum()


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("with_labels", [False, True])
def test_js_divergence_against_written_reference(beta, with_labels):
    student = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5)) if with_labels else None
    if with_labels:
        labels[0, :2] = -100

    def ours(s, t):
        return LF.js_divergence(s, t, beta=beta, from_logits=True, labels=labels)

    def reference(s, t):
        return liger_style_jsd(s.log_softmax(-1), t.log_softmax(-1), beta, labels)

    check_against_torch(ours, reference, student, teacher, atol=1e-10, rtol=1e-10)


def test_js_divergence_properties():
    from losskit import info

    p, q = torch.softmax(torch.randn(4, 6, dtype=torch.float64), -1), torch.softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    rows = LF.js_divergence(q.log(), p.log(), reduction="none")
    torch.testing.assert_close(rows, info.js_divergence(p, q))  # beta = 1/2 is the JS divergence
    torch.testing.assert_close(LF.js_divergence(q.log(), p.log(), beta=0.0, reduction="none"), info.kl_divergence(p, q))
    check_raises(LF.js_divergence, q.log(), p.log(), beta=1.5, match="js_divergence: beta must be in [0, 1]; got 1.5")
