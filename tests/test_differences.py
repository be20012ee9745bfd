"""README "Where losskit differs from torch": one test per row, showing torch's behaviour
next to losskit's, so that a row goes stale (torch fixed, losskit changed) loudly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import losskit
import losskit.functional as LF


def _grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), g


def test_ignored_row_holding_inf_logits_has_zero_gradient():
    x, target = torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), torch.tensor([-100, 0])
    theirs, g_theirs = _grad(TF.cross_entropy, x, target)
    ours, g_ours = _grad(LF.cross_entropy, x, target)
    torch.testing.assert_close(ours, theirs)
    assert g_theirs[0].isnan().all() and (g_ours[0] == 0).all()
    torch.testing.assert_close(g_ours[1], g_theirs[1])


def test_soft_margin_is_finite_where_torch_overflows():
    x, y = torch.tensor([-200.0, 1.0]), torch.tensor([1.0, 1.0])
    theirs, g_theirs = _grad(TF.soft_margin_loss, x, y)
    ours, g_ours = _grad(LF.soft_margin_loss, x, y)
    assert theirs.isinf() and g_theirs[0].isnan()
    want = (torch.nn.functional.softplus(-x.double()).mean()).float()
    torch.testing.assert_close(ours, want)
    torch.testing.assert_close(g_ours, torch.tensor([-0.5, -0.5 * torch.sigmoid(torch.tensor(-1.0)).item()]))


@pytest.mark.parametrize("fn, target", [("multi_margin_loss", torch.zeros(0, dtype=torch.long)),
                                        ("multilabel_margin_loss", torch.zeros(0, 3, dtype=torch.long))])
def test_empty_mean_of_margin_losses_is_nan(fn, target):
    assert getattr(LF, fn)(torch.zeros(0, 3), target).isnan()


def test_ctc_gradient_of_an_impossible_class_is_zero():
    lp = torch.randn(4, 1, 3, dtype=torch.float64).log_softmax(2)
    lp[:, 0, 2] = -float("inf")
    args = (torch.tensor([[1]]), [4], [1])
    _, g_theirs = _grad(TF.ctc_loss, lp, *args)
    _, g_ours = _grad(LF.ctc_loss, lp, *args)
    assert g_theirs[:, 0, 2].isnan().all() and (g_ours[:, 0, 2] == 0).all()
    torch.testing.assert_close(g_ours[:, :, :2], g_theirs[:, :, :2])


def test_ctc_target_equal_to_blank_is_refused():
    # torch documents it as invalid yet computes, and where the blank label is last its
    # gradient at that sequence's last frame is not its loss's (gradcheck fails); losskit
    # raises, and with checks off computes the same loss with its true gradient.
    logits = torch.randn(5, 1, 3, dtype=torch.float64, requires_grad=True)
    args = (torch.tensor([[1, 0]]), [5], [2])
    assert not torch.autograd.gradcheck(lambda z: TF.ctc_loss(z.log_softmax(2), *args), (logits,),
                                        raise_exception=False)
    with pytest.raises(ValueError, match=r"ctc_loss: target 0 at index \(0, 1\) is the blank \(0\)"):
        LF.ctc_loss(logits.log_softmax(2), *args)
    with losskit.checks("off"):
        assert torch.autograd.gradcheck(lambda z: LF.ctc_loss(z.log_softmax(2), *args), (logits,))
        _, g_theirs = _grad(TF.ctc_loss, logits.detach().log_softmax(2), *args)
        _, g_ours = _grad(LF.ctc_loss, logits.detach().log_softmax(2), *args)
    assert not torch.allclose(g_ours[-1], g_theirs[-1])  # torch's last frame differs
    torch.testing.assert_close(g_ours[:-1], g_theirs[:-1])


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_any_integer_dtype_is_a_class_index(dtype):
    x, target = torch.randn(4, 5), torch.tensor([0, 4, 2, 1])
    with pytest.raises(RuntimeError):
        TF.cross_entropy(x, target.to(dtype))
    torch.testing.assert_close(LF.cross_entropy(x, target.to(dtype)), TF.cross_entropy(x, target))
    spatial, targets = torch.randn(2, 5, 3), torch.randint(0, 5, (2, 3))
    with pytest.raises(RuntimeError):
        TF.cross_entropy(spatial, targets.to(torch.uint8))
    torch.testing.assert_close(LF.cross_entropy(spatial, targets.to(torch.uint8)), TF.cross_entropy(spatial, targets))


def test_uint8_targets_raise_in_torch_only_with_smoothing_and_a_class_weight():
    x, target = torch.randn(4, 5), torch.tensor([0, 4, 2, 1])
    weight = torch.rand(5)
    with pytest.raises(RuntimeError, match="Expected dtype int32/int64 for index"):
        TF.cross_entropy(x, target.to(torch.uint8), weight=weight, label_smoothing=0.1)
    torch.testing.assert_close(LF.cross_entropy(x, target.to(torch.uint8), weight=weight, label_smoothing=0.1),
                               TF.cross_entropy(x, target, weight=weight, label_smoothing=0.1))


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_uint8_class_156_keeps_its_smoothing_term(fn, reduction):
    # torch compares uint8 targets with ignore_index -100 wrapped to uint8, 156, when it
    # masks the smoothing term: a target of class 156 keeps its NLL term, loses its
    # smoothing term and leaves the smoothing 'mean' (no error; linear_cross_entropy is
    # cross_entropy of x @ W.T, so it inherits this). losskit: class 156 is a class.
    eps = 0.1
    hidden, head = torch.randn(4, 3, dtype=torch.float64), torch.randn(200, 3, dtype=torch.float64)
    target = torch.tensor([156, 3, 199, 156])
    call = (hidden, head) if fn == "linear_cross_entropy" else (hidden @ head.T,)
    theirs = getattr(TF, fn)(*call, target.to(torch.uint8), label_smoothing=eps, reduction=reduction)
    log_p = (hidden @ head.T).log_softmax(1)
    nll, smooth = -log_p.gather(1, target.unsqueeze(1)).squeeze(1), -log_p.mean(1)
    kept = target != 156
    wrapped = {"none": (1 - eps) * nll + eps * smooth * kept,
               "sum": (1 - eps) * nll.sum() + eps * smooth[kept].sum(),
               "mean": (1 - eps) * nll.mean() + eps * smooth[kept].sum() / kept.sum()}[reduction]
    torch.testing.assert_close(theirs, wrapped)
    want = getattr(TF, fn)(*call, target, label_smoothing=eps, reduction=reduction)  # int64: 156 is a class
    torch.testing.assert_close(getattr(LF, fn)(*call, target.to(torch.uint8), label_smoothing=eps,
                                               reduction=reduction), want)
    assert not torch.allclose(theirs, want)


def test_linear_cross_entropy_takes_batched_sequences():
    hidden, head, target = torch.randn(2, 3, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 3))
    with pytest.raises(RuntimeError):
        TF.linear_cross_entropy(hidden, head, target)
    torch.testing.assert_close(LF.linear_cross_entropy(hidden, head, target),
                               TF.linear_cross_entropy(hidden.reshape(6, 4), head, target.reshape(6)))


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_unbatched_target_of_shape_one_has_a_gradient(fn):
    x = torch.randn(5)
    loss = getattr(TF, fn)(x.requires_grad_(), torch.tensor([2]))
    with pytest.raises(RuntimeError, match="size mismatch"):
        loss.backward()
    _, g_ours = _grad(getattr(LF, fn), x, torch.tensor([2]))
    _, g_want = _grad(getattr(TF, fn), x, torch.tensor(2))
    torch.testing.assert_close(g_ours, g_want)


def test_huber_loss_with_an_integer_target_has_a_gradient():
    x, target = torch.tensor([0.5, 3.0]), torch.tensor([1, 0])
    loss = TF.huber_loss(x.clone().requires_grad_(), target)
    with pytest.raises(RuntimeError):
        loss.backward()
    _, g_ours = _grad(LF.huber_loss, x, target)
    _, g_want = _grad(TF.huber_loss, x, target.float())
    torch.testing.assert_close(g_ours, g_want)


def test_poisson_full_with_integer_target_is_promoted_first():
    x, target = torch.tensor([4.85, 3.54], dtype=torch.float64), torch.tensor([5, 3])
    exact = LF.poisson_nll_loss(x, target.double(), log_input=False, full=True)
    torch.testing.assert_close(LF.poisson_nll_loss(x, target, log_input=False, full=True), exact, rtol=0, atol=0)
    theirs = TF.poisson_nll_loss(x, target, log_input=False, full=True)
    assert (theirs - exact).abs() > 1e-9  # torch's Stirling term went through float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    torch.manual_seed(0)
    x, target = torch.randn(64, 1000).to(dtype), torch.randint(0, 1000, (64,))
    exact = TF.cross_entropy(x.double(), target, reduction="none")
    ours = LF.cross_entropy(x, target, reduction="none").double()
    theirs = TF.cross_entropy(x, target, reduction="none").double()
    assert (ours - exact).abs().max() <= (theirs - exact).abs().max()


@pytest.mark.parametrize("smoothing", [-0.1, float("nan")])
@pytest.mark.parametrize("targets", ["indices", "probabilities"])
def test_negative_label_smoothing_raises_where_torch_ignores_it(smoothing, targets):
    x = torch.randn(4, 5, dtype=torch.float64)
    target = torch.tensor([0, 2, 4, 1]) if targets == "indices" else torch.randn(4, 5).softmax(1).double()
    theirs, g_theirs = _grad(TF.cross_entropy, x, target, label_smoothing=smoothing)
    unsmoothed, g_unsmoothed = _grad(TF.cross_entropy, x, target)
    assert torch.equal(theirs, unsmoothed) and torch.equal(g_theirs, g_unsmoothed)  # silently no smoothing
    with pytest.raises(ValueError, match="cross_entropy: label_smoothing must be between 0.0 and 1.0; got "):
        LF.cross_entropy(x, target, label_smoothing=smoothing)
    head = torch.randn(5, 5, dtype=torch.float64)
    if targets == "indices":  # linear_cross_entropy: the same rule
        theirs = TF.linear_cross_entropy(x, head, target, label_smoothing=smoothing)
        assert torch.equal(theirs, TF.linear_cross_entropy(x, head, target))
        with pytest.raises(ValueError, match="linear_cross_entropy: label_smoothing must be between"):
            LF.linear_cross_entropy(x, head, target, label_smoothing=smoothing)
    # above 1 both refuse
    with pytest.raises(RuntimeError, match="label_smoothing"):
        TF.cross_entropy(x, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        LF.cross_entropy(x, target, label_smoothing=1.5)
