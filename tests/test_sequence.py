"""ctc_loss against torch 2.13, gradient quirk included, and against brute-force enumeration."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as TF

import losskit
import losskit.functional as LF
import losskit.nn as LN
from compare import REDUCTIONS, TOLERANCES, check_against_torch, check_raises


def log_probs(steps, batch, classes, dtype=torch.float64):
    return torch.randn(steps, batch, classes, dtype=torch.float64).log_softmax(2).to(dtype).detach().requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("blank", [0, 3])
@pytest.mark.parametrize("layout", ["padded", "concatenated"])
def test_ctc_matches_torch(layout, blank, reduction, dtype):
    steps, batch, classes = 12, 4, 5
    lengths = torch.tensor([3, 1, 0, 4])
    padded = torch.randint(0, classes - 1, (batch, 4))
    padded[padded >= blank] += 1  # never the blank
    padded[1, 1] = padded[1, 0]  # a repeat beyond the length: ignored
    padded[3, 2] = padded[3, 1]  # a repeat inside: needs a blank between
    targets = padded if layout == "padded" else torch.cat([padded[n, :k] for n, k in enumerate(lengths.tolist())])
    atol, rtol = TOLERANCES[dtype]
    check_against_torch(
        LF.ctc_loss, TF.ctc_loss, log_probs(steps, batch, classes, dtype), targets, torch.tensor([12, 9, 5, 10]),
        lengths, blank=blank, reduction=reduction, atol=atol * 10, rtol=rtol * 10,
    )


def test_ctc_unbatched_and_module():
    lp = log_probs(7, 1, 4)[:, 0].detach().requires_grad_()
    check_against_torch(LF.ctc_loss, TF.ctc_loss, lp, torch.tensor([1, 2, 2]), torch.tensor(7), torch.tensor(3),
                        reduction="none")
    batched = log_probs(7, 2, 4)
    targets, il, tl = torch.tensor([[1, 2], [3, 3]]), torch.tensor([7, 6]), torch.tensor([2, 2])
    check_against_torch(LN.CTCLoss(reduction="sum"), torch.nn.CTCLoss(reduction="sum"), batched, targets, il, tl)


def test_ctc_impossible_alignment_and_zero_infinity():
    # Two repeated labels need three frames (a, blank, a); two frames cannot hold them.
    lp = log_probs(2, 1, 3)
    targets, il, tl = torch.tensor([[1, 1]]), torch.tensor([2]), torch.tensor([2])
    assert torch.isinf(LF.ctc_loss(lp, targets, il, tl, reduction="sum"))
    out = check_against_torch(LF.ctc_loss, TF.ctc_loss, lp, targets, il, tl, zero_infinity=True, reduction="sum")
    assert out == 0


def test_ctc_equals_brute_force_and_its_true_gradient_through_log_softmax():
    # Sum over every path of T=5 frames that collapses to [1, 2]; gradients on the logits.
    logits = torch.randn(5, 1, 3, dtype=torch.float64, requires_grad=True)

    def collapse(path):
        out, prev = [], None
        for c in path:
            if c != prev and c != 0:
                out.append(c)
            prev = c
        return out

    lp = logits.log_softmax(2)
    paths = [p for p in itertools.product(range(3), repeat=5) if collapse(p) == [1, 2]]
    brute = -torch.logsumexp(torch.stack([sum(lp[t, 0, c] for t, c in enumerate(p)) for p in paths]), 0)
    ours = LF.ctc_loss(logits.log_softmax(2), torch.tensor([[1, 2]]), [5], [2], reduction="sum")
    torch.testing.assert_close(ours, brute)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(brute, logits)[0])


def test_ctc_bad_input():
    lp = log_probs(5, 2, 4)
    check_raises(LF.ctc_loss, lp, torch.tensor([[1, 4], [2, 3]]), [5, 5], [2, 2],
                 match="ctc_loss: target 4 at index (0, 1) must be a class in [0, 4)")
    check_raises(LF.ctc_loss, lp[:, 0], torch.tensor([1, 2, 3]), 5, 2,
                 match="unbatched targets must hold exactly target_lengths labels (2); got 3")
    check_raises(LF.ctc_loss, lp, torch.tensor([[1, 9], [2, 3]]), [5, 5], [2, 2], match="target 9 at index (0, 1)")
    check_raises(LF.ctc_loss, lp, torch.tensor([[1, 2], [2, 3]]), [6, 5], [2, 2],
                 match="input_lengths must lie in [0, 5]; got [6, 5]")
    check_raises(LF.ctc_loss, lp, torch.tensor([1, 2, 3]), [5, 5], [2, 2],
                 match="1-D targets hold 3 labels but target_lengths sum to 4")
    check_raises(LF.ctc_loss, lp, torch.tensor([[1, 2], [2, 3]]), [5], [2, 2],
                 match="input_lengths must have one entry per sequence (2); got 1")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ctc_gradcheck_through_log_softmax(reduction):
    # Through log_softmax, torch's (and losskit's) CTC gradient is the true one.
    logits = torch.randn(6, 2, 4, dtype=torch.float64, requires_grad=True)
    targets, il, tl = torch.tensor([[1, 2], [3, 3]]), torch.tensor([6, 5]), torch.tensor([2, 2])
    assert torch.autograd.gradcheck(
        lambda z: LF.ctc_loss(z.log_softmax(2), targets, il, tl, reduction=reduction), (logits,)
    )


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize(
    "targets, input_lengths, target_lengths",
    [
        ([[1, 2], [2, 3]], [0, 5], [0, 2]),  # no frames, empty target: loss 0
        ([[1, 2], [2, 3]], [0, 5], [1, 2]),  # no frames, a label: inf, gradient 0
        ([[], []], [3, 3], [0, 0]),  # every target empty: all blanks
        ([[3, 3], [2, 2]], [5, 2], [2, 2]),  # repeats; the second an impossible alignment
        ([[3], [2]], [1, 1], [1, 1]),  # one frame
    ],
)
def test_ctc_edge_cases_match_torch(targets, input_lengths, target_lengths, zero_infinity):
    # An impossible alignment gives torch's nan gradient only inside the input length.
    lp = log_probs(5, 2, 4)
    targets = torch.tensor(targets, dtype=torch.long).reshape(2, -1)
    for reduction in REDUCTIONS:
        check_against_torch(LF.ctc_loss, TF.ctc_loss, lp, targets, torch.tensor(input_lengths),
                            torch.tensor(target_lengths), reduction=reduction, zero_infinity=zero_infinity)


def test_ctc_gradient_is_zero_not_nan_for_a_class_of_probability_zero():
    # Documented difference: torch's gradient is nan for a log-probability of -inf.
    lp = log_probs(4, 1, 3).detach()
    lp[:, 0, 2] = -float("inf")
    lp.requires_grad_()
    loss = LF.ctc_loss(lp, torch.tensor([[1]]), [4], [1], reduction="sum")
    (got,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(got).all() and (got[:, 0, 2] == 0).all()
    torch.testing.assert_close(loss, TF.ctc_loss(lp, torch.tensor([[1]]), [4], [1], reduction="sum"))


@pytest.mark.parametrize("blank, targets, lengths, where", [
    (0, [[1, 2], [3, 0]], [2, 2], "index (1, 1)"),  # the default blank, last
    (2, [[1, 2, 3], [3, 1, 1]], [3, 2], "index (0, 1)"),  # a blank inside the class range, first of a row
    (3, [2, 3, 1], [1, 2], "index (1, 0)"),  # concatenated (the position is in the padded (N, S) form)
])
def test_ctc_target_equal_to_blank_is_refused(blank, targets, lengths, where):
    # torch documents such a target as invalid (no alignment collapses to a blank) but
    # computes it; README: "Where losskit differs from torch".
    lp = log_probs(5, 2, 4)
    targets = torch.tensor(targets)
    check_raises(LF.ctc_loss, lp, targets, [5, 5], lengths, blank=blank,
                 match=f"ctc_loss: target {blank} at {where} is the blank ({blank}); a label must be another class")
    with losskit.checks("async"), pytest.raises(RuntimeError, match=re.escape(
            f"ctc_loss: a target must be a class in [0, 4) other than the blank ({blank})")):
        LF.ctc_loss(lp, targets, [5, 5], lengths, blank=blank)
    TF.ctc_loss(lp, targets, [5, 5], lengths, blank=blank)  # torch computes


def test_ctc_blank_as_padding_beyond_the_lengths_is_accepted():
    lp = log_probs(5, 2, 4)
    targets = torch.tensor([[1, 0, 0], [3, 2, 0]])  # padded with the blank, never read
    check_against_torch(LF.ctc_loss, TF.ctc_loss, lp, targets, torch.tensor([5, 4]), torch.tensor([1, 2]))


def test_ctc_target_equal_to_blank_with_checks_off():
    # Computed as written: torch's value and gradient where the blank label is not last;
    # where it is last, torch's gradient at that sequence's last frame drops one of the two
    # final states, and losskit's is the true gradient of the same loss (gradcheck).
    lp = log_probs(5, 2, 4)
    with losskit.checks("off"):
        inside = torch.tensor([[0, 1], [2, 0]])  # blank first in one row, last in the other
        check_against_torch(lambda *a, **k: LF.ctc_loss(*a, **k)[0], lambda *a, **k: TF.ctc_loss(*a, **k)[0],
                            lp, inside, torch.tensor([5, 4]), torch.tensor([2, 2]), reduction="none")
        logits = torch.randn(5, 1, 3, dtype=torch.float64, requires_grad=True)
        last = torch.tensor([[1, 0]])
        assert torch.autograd.gradcheck(lambda z: LF.ctc_loss(z.log_softmax(2), last, [5], [2]), (logits,))
        z = logits.log_softmax(2)
        torch.testing.assert_close(LF.ctc_loss(z, last, [5], [2]), TF.ctc_loss(z, last, [5], [2]))


@pytest.mark.parametrize("scale, atol", [(1.0, 1e-4), (60.0, 1e-2)])
def test_ctc_long_and_confident_sequences_match_torch_in_float32(scale, atol):
    # Long inputs with uneven lengths. At scale 60 the model is confidently wrong about the
    # targets (emissions down to about -500 a frame, losses in the thousands): a recursion in
    # probability space, even rescaled every frame, underflows there (e^-88 in float32) and
    # turns the loss inf; log space, losskit's as torch's, stays finite. Compared with torch
    # in float32, and with torch in float64 on the same inputs (both float32 results are
    # about 1e-3 off that, from the rounding of the inputs).
    g = torch.Generator().manual_seed(3)
    steps, batch, classes = 90, 5, 7
    lp = (torch.randn(steps, batch, classes, generator=g, dtype=torch.float64) * scale).log_softmax(2)
    targets = torch.randint(1, classes, (batch, 30), generator=g)
    targets[0, 5:8] = targets[0, 4]  # repeats need blanks between them
    il, tl = torch.tensor([90, 77, 64, 90, 41]), torch.tensor([30, 22, 30, 1, 0])
    check_against_torch(LF.ctc_loss, TF.ctc_loss, lp.float().requires_grad_(), targets, il, tl, reduction="none",
                        atol=atol, rtol=1e-5)
    got = LF.ctc_loss(lp.float(), targets, il, tl, reduction="none")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), TF.ctc_loss(lp, targets, il, tl, reduction="none"), atol=atol, rtol=1e-5)


def test_ctc_padding_beyond_the_lengths_is_never_read():
    # torch ignores targets beyond target_lengths, whatever they hold (here -1 and C).
    lp = log_probs(8, 3, 5)
    targets = torch.tensor([[1, 2, -1, -1], [3, 5, 5, 5], [4, 4, 1, 2]])
    il, tl = torch.tensor([8, 6, 8]), torch.tensor([2, 1, 4])
    for reduction in REDUCTIONS:
        check_against_torch(LF.ctc_loss, TF.ctc_loss, lp, targets, il, tl, reduction=reduction)


def test_ctc_without_grad_and_backward_twice():
    lp = log_probs(9, 3, 4, torch.float32)
    targets, il, tl = torch.tensor([[1, 2, 2], [3, 1, 0], [2, 2, 2]]), torch.tensor([9, 7, 8]), torch.tensor([3, 2, 3])
    with torch.no_grad():  # the forward recursion alone
        alone = LF.ctc_loss(lp, targets, il, tl, reduction="none")
    loss = LF.ctc_loss(lp, targets, il, tl, reduction="none")
    torch.testing.assert_close(alone, loss.detach(), atol=0, rtol=0)
    first = torch.autograd.grad(loss.sum(), lp, retain_graph=True)[0]
    second = torch.autograd.grad(loss.sum(), lp)[0]
    torch.testing.assert_close(first, second, atol=0, rtol=0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ctc_matches_torch_on_one_thread_and_two(threads, reduction):
    # On two threads losskit runs the forward and the reversed problem on a thread each
    # (torch: each sequence on a thread); the batch here is the benchmark's small size, with
    # uneven lengths, an impossible alignment and repeats, and a grad_output other than 1
    # (scaled by the C++ node for 'mean' and 'sum'). float32 against torch in float64 on
    # the same inputs (torch's float32 is as far from it: the gradient's exp(lp) - occupancy
    # loses digits to cancellation).
    g = torch.Generator().manual_seed(5)
    steps, batch, classes = 50, 16, 20
    lp = torch.randn(steps, batch, classes, generator=g, dtype=torch.float64).log_softmax(2).float().double()
    targets = torch.randint(1, classes, (batch, 12), generator=g)
    targets[:, 3] = targets[:, 2]
    il = torch.randint(20, steps + 1, (batch,), generator=g)
    tl = torch.randint(0, 13, (batch,), generator=g)
    il[0], tl[0] = 5, 12  # impossible: inf and a nan gradient, as torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for zero_infinity in (False, True):
            ours, theirs = lp.float().requires_grad_(), lp.clone().requires_grad_()
            got = LF.ctc_loss(ours, targets, il, tl, reduction=reduction, zero_infinity=zero_infinity)
            want = TF.ctc_loss(theirs, targets, il, tl, reduction=reduction, zero_infinity=zero_infinity)
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
            go = torch.linspace(-1, 2, batch, dtype=torch.float64) if reduction == "none" else torch.tensor(0.75).double()
            got.backward(go.float())
            want.backward(go)
            torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-4, rtol=1e-4, equal_nan=True)
    finally:
        torch.set_num_threads(before)
