"""The fused CPU cross-entropy against the composed reference and torch, chunk edges included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from losskit.kernels import cross_entropy as kernel
from losskit._core.switches import chunk_sizes
from losskit.kernels import fused_only, reference_only
from compare import DTYPES, REDUCTIONS, check_against_torch

@pytest.fixture(autouse=True)
def fused_float64():
    """float64 normally takes the reference path; here it runs the kernel, so that the
    kernel is held to float64's tight tolerances."""
    with fused_only():
        yield



@pytest.fixture
def tiny_chunks():
    """Chunks of 3 rows (at C=7), so every test crosses several chunk boundaries."""
    with chunk_sizes(cross_entropy_bytes=3 * 4 * 7):
        assert kernel.rows_per_chunk(7) == 3
        yield


def reference(*args, **kwargs):
    with reference_only():
        return LF.cross_entropy(*args, **kwargs)


def written_out(x, target, lse_square_scale=0.0, softcap=None, ignore_index=-100):
    """z-loss and soft-capping by their definitions, mean over the targets that count."""
    z = x if softcap is None else softcap * torch.tanh(x / softcap)
    lse = torch.logsumexp(z, dim=1)
    valid = target != ignore_index
    picked = z.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1)
    per_row = torch.where(valid, lse - picked + lse_square_scale * lse**2, 0.0)
    return per_row.sum() / valid.sum()


def test_fused_path_is_taken():
    x = torch.randn(4, 7, requires_grad=True)
    assert LF.cross_entropy(x, torch.tensor([0, 1, 2, 3])).grad_fn.name() == "FusedCrossEntropyBackward"
    with reference_only():
        assert "Fused" not in LF.cross_entropy(x, torch.tensor([0, 1, 2, 3])).grad_fn.name()


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.2}, {"weight": True}, {"weight": True, "label_smoothing": 0.1, "ignore_index": 2}],
    ids=["plain", "smoothing", "weight", "all"],
)
def test_fused_matches_torch_across_chunks(tiny_chunks, options, reduction, dtype, atol, rtol):
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = (torch.rand(7, dtype=torch.float64) + 0.1).to(dtype)
    x = (torch.randn(11, 7, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, 7, (11,))
    target[[1, 5]] = options.get("ignore_index", -100)
    check_against_torch(LF.cross_entropy, TF.cross_entropy, x, target, reduction=reduction, atol=atol, rtol=rtol, **options)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", [{"lse_square_scale": 1e-2}, {"softcap": 2.0}, {"lse_square_scale": 0.1, "softcap": 1.5,
                                     "label_smoothing": 0.1, "ignore_index": 0}])
def test_fused_matches_reference_for_z_loss_and_softcap(tiny_chunks, options, reduction):
    x = (torch.randn(10, 7, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, 7, (10,))
    weight = torch.rand(7, dtype=torch.float64) + 0.5
    check_against_torch(LF.cross_entropy, reference, x, target, weight=weight, reduction=reduction, atol=1e-10, rtol=1e-10,
                        **options)


@pytest.mark.parametrize("fused", [True, False])
def test_z_loss_and_softcap_follow_their_definitions(fused):
    x = (torch.randn(9, 6, dtype=torch.float64) * 4).requires_grad_()
    target = torch.tensor([0, 1, 2, 3, 4, 5, -100, 1, 2])
    options = {"lse_square_scale": 1e-3, "softcap": 3.0}
    if fused:
        got = LF.cross_entropy(x, target, **options)
    else:
        got = reference(x, target, **options)
    want = written_out(x, target, **options)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


# No gradcheck here: it runs backward many times through one graph, which the fused
# kernel's use-once gradient buffer refuses (tested below); the float64 comparisons with
# the reference above, under a random grad_output, check the same Jacobian products.


def test_rows_of_minus_inf_that_are_ignored_stay_finite():
    x = torch.randn(3, 5)
    x[1] = -float("inf")  # a fully masked row, ignored
    x.requires_grad_()
    target = torch.tensor([0, -100, 4])
    loss = LF.cross_entropy(x, target)
    torch.testing.assert_close(loss, TF.cross_entropy(x, target))
    loss.backward()
    # torch's gradient is nan on that row (0 * nan through its log-softmax); an ignored
    # row contributes nothing, so losskit's fused gradient there is exactly 0.
    assert torch.equal(x.grad[1], torch.zeros(5))
    assert torch.isfinite(x.grad).all()


def test_does_not_write_into_the_logits():
    x = torch.randn(6, 7, requires_grad=True)
    before = x.detach().clone()
    LF.cross_entropy(x, torch.randint(0, 7, (6,)), label_smoothing=0.1).backward()
    assert torch.equal(x.detach(), before)


def test_second_backward_through_the_same_graph_replays_the_call():
    x = torch.randn(4, 5, requires_grad=True)
    loss = LF.cross_entropy(x, torch.tensor([0, 1, 2, 3]), label_smoothing=0.2)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)


def test_reference_only_supports_second_order_gradients():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3])
    with reference_only():
        assert torch.autograd.gradgradcheck(lambda a: LF.cross_entropy(a, target), (x,))


def test_underflowing_target_probability_still_gives_the_exact_loss():
    # p_y = exp(-200) underflows float32: lse comes from a direct logsumexp for that row.
    x = torch.zeros(2, 4)
    x[0, 1] = 200.0
    x.requires_grad_()
    check_against_torch(LF.cross_entropy, TF.cross_entropy, x, torch.tensor([0, 2]), reduction="none")


def test_logit_option_errors():
    from compare import check_raises

    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    check_raises(LF.cross_entropy, x, t, lse_square_scale=-1.0, match="lse_square_scale must be >= 0; got -1.0")
    check_raises(LF.cross_entropy, x, t, softcap=0.0, match="softcap must be a positive number or None; got 0.0")


# ---- class-probability targets ------------------------------------------------------------

@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.2}, {"weight": True}, {"weight": True, "label_smoothing": 0.1}],
    ids=["plain", "smoothing", "weight", "all"],
)
def test_fused_probability_targets_match_torch_across_chunks(tiny_chunks, options, reduction, dtype, atol, rtol):
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = (torch.rand(7, dtype=torch.float64) + 0.1).to(dtype)
    x = (torch.randn(11, 7, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    probs = torch.softmax(torch.randn(11, 7, dtype=torch.float64), 1).to(dtype)
    assert LF.cross_entropy(x, probs).grad_fn.name() == "FusedProbabilityCrossEntropyBackward"
    check_against_torch(LF.cross_entropy, TF.cross_entropy, x, probs, reduction=reduction, atol=atol, rtol=rtol,
                        **options)


def test_fused_probability_targets_take_the_temperature_and_stay_exact_at_large_logits():
    x = (torch.randn(6, 7, dtype=torch.float64) * 1e4).requires_grad_()
    probs = torch.softmax(torch.randn(6, 7, dtype=torch.float64), 1)
    check_against_torch(lambda a, q: LF.cross_entropy(a, q, temperature=2.5),
                        lambda a, q: TF.cross_entropy(a / 2.5, q), x, probs, atol=1e-9, rtol=1e-9)
    x32 = x.detach().float().requires_grad_()
    want = TF.cross_entropy(x.detach(), probs)
    torch.testing.assert_close(LF.cross_entropy(x32, probs.float()).double(), want, atol=1e-3, rtol=1e-6)


def test_probability_targets_that_need_a_gradient_take_the_reference_path():
    x = torch.randn(4, 7, requires_grad=True)
    probs = torch.softmax(torch.randn(4, 7), 1).requires_grad_()
    assert "Fused" not in LF.cross_entropy(x, probs).grad_fn.name()
    check_against_torch(LF.cross_entropy, TF.cross_entropy, x, probs)
