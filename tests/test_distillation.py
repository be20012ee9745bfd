"""Distillation losses against their definitions: a float64 transcription of GKD's
generalised JSD (Agarwal et al. 2024, Eq. 1, with TRL's and Liger-Kernel's ends), TRL 1.16's
``GKDTrainer.generalized_jsd_loss`` and Liger-Kernel 0.8.5's chunked JSD (pure torch, run on
CPU without torch.compile), values and gradients; the k+1-bucket top-k loss against dense
computations; edge cases, bad input, chunking and memory. Meta tensors and torch.compile(fullgraph=True)
run through the shared cases (tests/cases.py, tests/test_devices.py, tests/test_compile.py)."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

import losskit.functional as LF
import losskit.nn as lnn
from compare import check_against_torch, check_raises
from losskit.kernels import fused_only, reference_only

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

trl_gjsd = GKDTrainer.generalized_jsd_loss
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


# ---- the float64 transcription of the definition ---------------------------------------------
def gjsd_rows64(student_logits, teacher_logits, beta, temperature=1.0):
    """Per-row generalised JSD in float64, in probability space, sum over the vocabulary:
    beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; KL(p || q) at beta = 0,
    KL(q || p) at beta = 1 (p teacher, q student, both softmax(logits / T)); 0 log 0 = 0."""
    q = (student_logits.double() / temperature).softmax(-1)
    p = (teacher_logits.double() / temperature).softmax(-1)

    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), 0.0).sum(-1)

    if beta == 0.0:
        return kl(p, q)
    if beta == 1.0:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def distillation64(student_logits, teacher_logits, target=None, *, beta=0.5, temperature=1.0, ignore_index=-100,
                   reduction="mean", weight_hard_loss=0.0, weight_soft_loss=1.0):
    """The whole loss from the definition, in float64, returned in the inputs' dtype."""
    rows = weight_soft_loss * gjsd_rows64(student_logits, teacher_logits, beta, temperature)
    counted = torch.ones(rows.shape, dtype=torch.bool) if target is None else target != ignore_index
    if weight_hard_loss:
        log_q = student_logits.double().log_softmax(-1)
        hard = -log_q.gather(-1, torch.where(counted, target, 0).unsqueeze(-1)).squeeze(-1)
        rows = rows + weight_hard_loss * hard
    rows = torch.where(counted, rows, 0.0)
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / max(int(counted.sum()), 1)
    return out.to(student_logits.dtype)


def _logits(*shape, scale=2.0, dtype=torch.float64, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(grad)


def _target(vocab, *shape, ignored=(1,), seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, shape, generator=g)
    for i in ignored:
        t.view(-1)[i] = -100
    return t


# ---- distillation_loss: the definition, TRL, Liger ----------------------------------------------
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_distillation_loss_equals_the_float64_definition(beta, temperature, reduction):
    s, t = _logits(2, 5, 11, seed=2), _logits(2, 5, 11, seed=3)
    check_against_torch(LF.distillation_loss, distillation64, s, t, _target(11, 2, 5, ignored=(1, 7)), beta=beta,
                        temperature=temperature, reduction=reduction, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-2, 1e-2)])
@pytest.mark.parametrize("beta", BETAS)
def test_distillation_loss_in_float32_and_bfloat16(dtype, atol, rtol, beta):
    # bfloat16 is compared with the definition in float64 on the same rounded inputs.
    s, t = _logits(3, 4, 9, dtype=dtype, seed=4), _logits(3, 4, 9, dtype=dtype, seed=5)
    out = check_against_torch(LF.distillation_loss, distillation64, s, t, _target(9, 3, 4, ignored=(2,)), beta=beta,
                              temperature=1.5, atol=atol, rtol=rtol)
    assert out.dtype == dtype


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("hard", [0.0, 0.7])
def test_distillation_loss_gradcheck(beta, hard):
    s, t = _logits(3, 6, seed=6), _logits(3, 6, seed=7)
    target = torch.tensor([2, -100, 5])

    def f(s, t):
        return LF.distillation_loss(s, t, target, beta=beta, temperature=1.7, weight_hard_loss=hard,
                                    weight_soft_loss=0.6)

    assert torch.autograd.gradcheck(f, (s, t))
    assert torch.autograd.gradgradcheck(f, (s, t))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("labels", [True, False])
def test_distillation_loss_equals_trl_generalized_jsd_loss(beta, temperature, labels):
    # TRL's default reduction 'batchmean' with labels: the sum over the tokens whose label is
    # not -100, divided by their number. Without labels on 2-D logits its denominator is
    # the number of rows: the tokens again.
    s, t = _logits(7, 13, dtype=torch.float32, seed=8), _logits(7, 13, dtype=torch.float32, seed=9)
    target = _target(13, 7, ignored=(1, 4)) if labels else None
    check_against_torch(LF.distillation_loss, trl_gjsd, s, t, target, beta=beta, temperature=temperature)


def test_trl_batchmean_without_labels_divides_3d_logits_by_the_batch_not_the_tokens():
    # A deliberate difference (README's table): TRL's 'batchmean' without labels divides by
    # logits.size(0), the batch of a (B, T, V) tensor; losskit's 'mean' is per token.
    s, t = _logits(2, 5, 7, dtype=torch.float32, seed=10), _logits(2, 5, 7, dtype=torch.float32, seed=11)
    theirs = trl_gjsd(s, t, beta=0.5)
    ours = LF.distillation_loss(s, t, beta=0.5)
    torch.testing.assert_close(theirs, LF.distillation_loss(s, t, beta=0.5, reduction="sum") / 2)
    torch.testing.assert_close(ours, theirs / 5)
    with_labels = trl_gjsd(s, t, torch.zeros(2, 5, dtype=torch.long), beta=0.5)
    torch.testing.assert_close(ours, with_labels)


def test_all_masked_and_empty_give_zero_with_a_zero_gradient_as_trl():
    s, t = _logits(3, 5, dtype=torch.float32, seed=12), _logits(3, 5, dtype=torch.float32, seed=13)
    masked = torch.full((3,), -100)
    for reduction in ("mean", "sum"):
        loss = LF.distillation_loss(s, t, masked, reduction=reduction)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.equal(grad, torch.zeros_like(s))
    torch.testing.assert_close(LF.distillation_loss(s, t, masked), trl_gjsd(s, t, masked))
    assert torch.equal(LF.distillation_loss(s, t, masked, reduction="none"), torch.zeros(3))
    empty_s, empty_t = _logits(0, 5, dtype=torch.float32), _logits(0, 5, dtype=torch.float32)
    empty = LF.distillation_loss(empty_s, empty_t, torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0 and torch.autograd.grad(empty, empty_s)[0].shape == (0, 5)
    assert LF.distillation_loss(empty_s, empty_t, reduction="none").shape == (0,)


@pytest.mark.parametrize("beta", BETAS)
def test_an_ignored_token_holding_inf_or_nan_logits_adds_nothing(beta):
    s, t = _logits(3, 6, dtype=torch.float32, seed=14), _logits(3, 6, dtype=torch.float32, seed=15)
    with torch.no_grad():
        s[1, 0], s[1, 2], t[1, 3] = math.nan, math.inf, -math.inf
    target = torch.tensor([1, -100, 4])
    loss = LF.distillation_loss(s, t, target, beta=beta)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and torch.equal(grad[1], torch.zeros(6))
    keep = torch.tensor([0, 2])
    sliced = LF.distillation_loss(s[keep].detach(), t[keep].detach(), target[keep], beta=beta)
    torch.testing.assert_close(loss.detach(), sliced)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_teacher_logits_of_minus_inf_are_classes_of_no_mass(beta):
    # A padded vocabulary: the teacher gives its last classes -inf. The loss and the
    # gradient are finite (for beta < 1) and equal the definition.
    s, t = _logits(4, 7, seed=16), _logits(4, 7, seed=17).detach()
    t[:, 5:] = -math.inf
    check_against_torch(LF.distillation_loss, distillation64, s, t, beta=beta, atol=1e-10, rtol=1e-10)
    loss = LF.distillation_loss(s, t, beta=beta)
    assert torch.isfinite(torch.autograd.grad(loss, s)[0]).all()
    # Reverse KL there is infinite: the student puts mass where the teacher puts none.
    assert LF.distillation_loss(s, t, beta=1.0).item() == math.inf


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_class_both_models_mask_with_minus_inf_is_nan_in_trl_and_liger_and_absent_here(beta):
    # A deliberate difference (README's table): a vocabulary entry both models mask (-inf
    # logits, e.g. a padded vocabulary) makes kl_div(log_target=True) compute
    # exp(-inf) * (-inf - -inf) = nan in TRL and Liger. The class has no mass on either
    # side, so losskit drops it: the loss over the other classes.
    s = torch.tensor([[1.0, 0.0, -math.inf]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, -math.inf]])
    assert trl_gjsd(s, t, beta=beta).isnan()
    assert LigerFusedLinearJSDFunction.distillation_loss_fn(s, t, beta=beta).isnan()
    loss = LF.distillation_loss(s, t, beta=beta)
    torch.testing.assert_close(loss, LF.distillation_loss(s[:, :2], t[:, :2], beta=beta))
    (grad,) = torch.autograd.grad(loss, s)
    (want,) = torch.autograd.grad(LF.distillation_loss(s[:, :2], t[:, :2], beta=beta), s)
    torch.testing.assert_close(grad, want)


def test_an_ignored_token_with_nan_logits_poisons_trls_gradient_and_not_ours():
    # A deliberate difference (README's table): TRL drops ignored tokens after the softmax,
    # so a nan there still reaches the gradient (0 * nan); losskit reads them as 0 first.
    s = torch.tensor([[1.0, 0.0, 2.0], [math.nan, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.5, 1.0, -1.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, -100])
    (theirs,) = torch.autograd.grad(trl_gjsd(s, t, labels), s)
    (ours,) = torch.autograd.grad(LF.distillation_loss(s, t, labels), s)
    assert theirs[1].isnan().all() and torch.equal(ours[1], torch.zeros(3))
    torch.testing.assert_close(ours[0], theirs[0])


def test_a_nan_logit_in_a_counted_token_gives_nan():
    s, t = _logits(2, 4, dtype=torch.float32, seed=18), _logits(2, 4, dtype=torch.float32, seed=19)
    with torch.no_grad():
        s[0, 1] = math.nan
    assert LF.distillation_loss(s, t).isnan()


def test_beta_at_the_ends_is_the_kl_and_the_family_jumps_there():
    s, t = _logits(5, 8, seed=20), _logits(5, 8, seed=21)
    forward = TF.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="batchmean", log_target=True)
    reverse = TF.kl_div(t.log_softmax(-1), s.log_softmax(-1), reduction="batchmean", log_target=True)
    torch.testing.assert_close(LF.distillation_loss(s, t, beta=0.0), forward)
    torch.testing.assert_close(LF.distillation_loss(s, t, beta=1.0), reverse)
    # Just inside the ends the divergence is about beta KL(p || q) and (1 - beta) KL(q || p):
    # it tends to 0, not to the KL that the end itself is.
    eps = 1e-6
    torch.testing.assert_close(LF.distillation_loss(s, t, beta=eps), eps * forward, rtol=1e-4, atol=0)
    torch.testing.assert_close(LF.distillation_loss(s, t, beta=1 - eps), eps * reverse, rtol=1e-4, atol=0)
    assert LF.distillation_loss(s, t, beta=eps) < 1e-3 * forward


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_hard_loss_is_the_students_cross_entropy_at_temperature_1(temperature):
    s, t = _logits(6, 9, seed=22), _logits(6, 9, seed=23)
    target = _target(9, 6, ignored=(0, 3))
    got = LF.distillation_loss(s, t, target, beta=0.3, temperature=temperature, weight_hard_loss=0.4,
                               weight_soft_loss=0.6)
    soft = LF.distillation_loss(s, t, target, beta=0.3, temperature=temperature)
    want = 0.6 * soft + 0.4 * TF.cross_entropy(s, target)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_liger_chunked_jsd_of_logits_equals_the_sum(beta):
    # Liger's per-chunk loss function: the masked sum over tokens of the JSD of logits
    # (already divided by the temperature).
    s, t = _logits(6, 10, dtype=torch.float32, seed=24), _logits(6, 10, dtype=torch.float32, seed=25)
    target = _target(10, 6, ignored=(2,))

    def liger(s, t, target, beta, reduction):
        return LigerFusedLinearJSDFunction.distillation_loss_fn(s, t, beta=beta, target=target)

    check_against_torch(LF.distillation_loss, liger, s, t, target, beta=beta, reduction="sum")


def test_bad_input_names_the_argument():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    f = LF.distillation_loss
    check_raises(f, s, t, beta=1.5, match="distillation_loss: beta must be in [0, 1]; got 1.5")
    check_raises(f, s, t, beta=math.nan, match="beta must be in [0, 1]")
    check_raises(f, s, t, temperature=0.0, match="temperature must be a positive, finite number; got 0.0")
    check_raises(f, s, t, reduction="batchmean", match="reduction must be one of 'mean', 'sum', 'none'")
    check_raises(f, s, t, weight_hard_loss=0.5, match="weight_hard_loss=0.5 needs target")
    check_raises(f, s, t, weight_soft_loss=math.inf, match="weight_soft_loss must be a finite number")
    check_raises(f, s, torch.randn(3, 6), match="teacher_logits shape (3, 6) must equal student_logits shape (3, 5)")
    check_raises(f, s, t, torch.tensor([0, 1]), match="target shape (2,) does not fit")
    check_raises(f, s, t, torch.tensor([0, 5, 1]), error=IndexError, match="target 5 at index (1,) is out of range")
    check_raises(f, s, t, torch.zeros(3), error=TypeError, match="class-index target must be an integer tensor")
    check_raises(f, s.long(), t, error=TypeError, match="student_logits must be a floating-point tensor")
    check_raises(f, s, t.long(), error=TypeError, match="teacher_logits must be a floating-point tensor")
    check_raises(f, torch.tensor(1.0), torch.tensor(1.0), match="student_logits must have a vocabulary dimension")


# ---- linear_distillation_loss -------------------------------------------------------------------
def _heads(n=7, hs=4, ht=6, v=11, dtype=torch.float64, bias=False, seed=30):
    xs, ws = _logits(n, hs, scale=1.0, dtype=dtype, seed=seed), _logits(v, hs, scale=1.0, dtype=dtype, seed=seed + 1)
    xt = _logits(n, ht, scale=1.0, dtype=dtype, grad=False, seed=seed + 2)
    wt = _logits(v, ht, scale=1.0, dtype=dtype, grad=False, seed=seed + 3)
    kwargs = {}
    if bias:
        kwargs = {"student_bias": _logits(v, dtype=dtype, seed=seed + 4),
                  "teacher_bias": _logits(v, dtype=dtype, grad=False, seed=seed + 5)}
    return (xs, ws, xt, wt), kwargs


def linear_distillation64(xs, ws, xt, wt, target=None, *, student_bias=None, teacher_bias=None, chunk_size=None,
                          **options):
    """The composed definition: both logits formed, the teacher's detached."""
    s = TF.linear(xs, ws, student_bias)
    t = TF.linear(xt, wt, teacher_bias).detach()
    return distillation64(s, t, target, **options)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 3, 50])
def test_linear_kernel_in_float64_equals_the_definition(beta, reduction, chunk_size):
    (xs, ws, xt, wt), bias = _heads(bias=chunk_size == 3)
    target = _target(11, 7, ignored=(1, 5))
    with fused_only():  # the kernel itself, in float64
        check_against_torch(LF.linear_distillation_loss, linear_distillation64, xs, ws, xt, wt, target, beta=beta,
                            temperature=1.3, reduction=reduction, weight_hard_loss=0.25, weight_soft_loss=0.75,
                            chunk_size=chunk_size, atol=1e-10, rtol=1e-10, **bias)


def test_linear_reference_path_gradcheck():
    (xs, ws, xt, wt), bias = _heads(n=4, v=5, bias=True)
    target = torch.tensor([1, -100, 4, 0])

    def f(xs, ws, b):
        return LF.linear_distillation_loss(xs, ws, xt, wt, target, student_bias=b, teacher_bias=bias["teacher_bias"],
                                           beta=0.4, temperature=2.0, weight_hard_loss=0.5)

    assert torch.autograd.gradcheck(f, (xs, ws, bias["student_bias"]))


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_kernel_in_float32_and_bfloat16(dtype, atol, rtol, reduction):
    (xs, ws, xt, wt), bias = _heads(n=9, v=13, dtype=dtype, bias=True)
    out = check_against_torch(LF.linear_distillation_loss, linear_distillation64, xs, ws, xt, wt,
                              _target(13, 9, ignored=(3,)), beta=0.5, reduction=reduction, chunk_size=4, atol=atol,
                              rtol=rtol, **bias)
    assert out.dtype == dtype


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("hard", [(0.5, 0.5), (0.0, 1.0), (1.0, 0.3)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_linear_equals_liger_fused_linear_jsd(beta, hard, temperature):
    # Liger's loss: weight_hard * CE(student logits, T = 1) / tokens + weight_soft * JSD(T) /
    # tokens, tokens counted once (clamped at 1); gradients of the student side only.
    (xs, ws, xt, wt), bias = _heads(n=10, hs=8, ht=5, v=16, dtype=torch.float32, bias=True, seed=40)
    target = _target(16, 10, ignored=(0, 7))

    def ours(xs, ws, xt, wt, target, student_bias, teacher_bias):
        return LF.linear_distillation_loss(xs, ws, xt, wt, target, student_bias=student_bias,
                                           teacher_bias=teacher_bias, beta=beta, temperature=temperature,
                                           weight_hard_loss=hard[0], weight_soft_loss=hard[1], chunk_size=4)

    def liger(xs, ws, xt, wt, target, student_bias, teacher_bias):
        return LigerFusedLinearJSDFunction.apply(xs, ws, xt, wt, target, student_bias, teacher_bias, hard[0], hard[1],
                                                 beta, -100, temperature, False, 4)

    check_against_torch(ours, liger, xs, ws, xt, wt, target, bias["student_bias"], bias["teacher_bias"])


def test_liger_pads_a_larger_teacher_vocabulary_and_losskit_refuses_it():
    # A deliberate difference (README's table): Liger pads the student's logits with zeros
    # up to the teacher's vocabulary, which gives the padding classes student mass.
    xs, ws = torch.randn(4, 3, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    xt, wt = torch.randn(4, 5), torch.randn(8, 5)
    target = torch.tensor([0, 1, 2, 3])
    padded = LigerFusedLinearJSDFunction.apply(xs, ws, xt, wt, target, None, None, 0.0, 1.0, 0.5, -100, 1.0, False)
    s = torch.cat([xs @ ws.T, torch.zeros(4, 2)], 1)
    torch.testing.assert_close(padded, LF.distillation_loss(s, xt @ wt.T, target))
    check_raises(LF.linear_distillation_loss, xs, ws, xt, wt, target,
                 match="teacher_weight has 8 classes but student_weight has 6")


def test_linear_teacher_gets_no_gradient_and_ignored_rows_with_inf_add_nothing():
    (xs, ws, xt, wt), _ = _heads(n=5, dtype=torch.float32)
    xt = xt.clone().requires_grad_()
    with torch.no_grad():
        xs[2, 0] = math.inf
        xt[2, 1] = math.nan
    target = torch.tensor([1, 2, -100, 3, 4])
    loss = LF.linear_distillation_loss(xs, ws, xt, wt, target, beta=0.5, chunk_size=2)
    grads = torch.autograd.grad(loss, [xs, ws, xt], allow_unused=True)
    assert grads[2] is None
    assert torch.isfinite(loss) and torch.isfinite(grads[0]).all() and torch.isfinite(grads[1]).all()
    assert torch.equal(grads[0][2], torch.zeros(4))
    keep = torch.tensor([0, 1, 3, 4])
    torch.testing.assert_close(loss.detach(), LF.linear_distillation_loss(xs[keep].detach(), ws.detach(),
                                                                          xt[keep].detach(), wt, target[keep]))


def test_linear_all_masked_and_empty():
    (xs, ws, xt, wt), _ = _heads(n=4, dtype=torch.float32)
    loss = LF.linear_distillation_loss(xs, ws, xt, wt, torch.full((4,), -100))
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(loss, [xs, ws]))
    empty = LF.linear_distillation_loss(xs[:0], ws, xt[:0], wt)
    assert empty.item() == 0.0
    assert LF.linear_distillation_loss(xs[:0], ws, xt[:0], wt, reduction="none").shape == (0,)


def test_linear_3d_hidden_states_and_double_backward():
    (xs, ws, xt, wt), _ = _heads(n=6, dtype=torch.float32)
    loss3 = LF.linear_distillation_loss(xs.reshape(2, 3, 4), ws, xt.reshape(2, 3, 6), wt, reduction="none")
    assert loss3.shape == (2, 3)
    torch.testing.assert_close(loss3.reshape(-1), LF.linear_distillation_loss(xs, ws, xt, wt, reduction="none"))
    # create_graph=True replays the call on the composed path (the Hessian-vector product).
    loss = LF.linear_distillation_loss(xs, ws, xt, wt, beta=0.3)
    (g,) = torch.autograd.grad(loss, ws, create_graph=True)
    (hv,) = torch.autograd.grad(g.sum(), ws)
    with reference_only():
        loss_ref = LF.linear_distillation_loss(xs, ws, xt, wt, beta=0.3)
        (g_ref,) = torch.autograd.grad(loss_ref, ws, create_graph=True)
        (hv_ref,) = torch.autograd.grad(g_ref.sum(), ws)
    torch.testing.assert_close(hv, hv_ref)


class _Largest(TorchDispatchMode):
    """The most elements of any tensor an op makes (its outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_never_forms_either_logits(reduction):
    n, h, v, chunk = 64, 8, 300, 8
    xs, ws = torch.randn(n, h, requires_grad=True), torch.randn(v, h, requires_grad=True)
    xt, wt = torch.randn(n, h), torch.randn(v, h)
    with _Largest() as mode:
        loss = LF.linear_distillation_loss(xs, ws, xt, wt, beta=0.5, chunk_size=chunk, reduction=reduction)
        torch.autograd.grad(loss.sum(), [xs, ws])
    assert mode.largest <= chunk * v, f"a tensor of {mode.largest} elements; the logits have {n * v}"


def test_linear_bad_input_names_the_argument():
    (xs, ws, xt, wt), _ = _heads(n=3, dtype=torch.float32)
    f = LF.linear_distillation_loss
    check_raises(f, xs, ws[:, :3], xt, wt, match="student_weight must be [V, H] with H = 4")
    check_raises(f, xs, ws, xt, wt[:, :2], match="teacher_weight must be [V, H] with H = 6")
    check_raises(f, xs, ws, xt[:2], wt, match="teacher_input shape (2, 6) must have the tokens of student_input")
    check_raises(f, xs, ws, xt, wt, student_bias=torch.zeros(3), match="student_bias must have shape (11,)")
    check_raises(f, xs, ws, xt, wt, teacher_bias=torch.zeros(3), match="teacher_bias must have shape (11,)")
    check_raises(f, xs, ws, xt, wt, chunk_size=0, match="chunk_size must be a positive number of tokens")
    check_raises(f, xs, ws, xt, wt, beta=-0.1, match="linear_distillation_loss: beta must be in [0, 1]")
    check_raises(f, xs.long(), ws, xt, wt, error=TypeError, match="student_input must be a floating-point tensor")
    check_raises(f, xs, ws, xt, wt, torch.tensor([0, 11, 1]), error=IndexError, match="target 11 at index (1,)")


# ---- topk_distillation_loss ----------------------------------------------------------------------
def _topk_teacher(n, v, k, tail, seed=50, student=None):
    """Dense teacher logits whose top-k hold 1 - tail of the mass: with ``student`` given,
    the tail is spread in proportion to the student's softmax there, else as drawn."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    top = torch.randn(n, k, generator=g, dtype=torch.float64).softmax(-1) * (1 - tail)
    mask = torch.zeros(n, v, dtype=torch.bool).scatter(1, ids, True)
    if student is not None:
        rest = torch.where(mask, 0.0, student.detach().double().softmax(-1))
    else:
        rest = torch.where(mask, 0.0, torch.rand(n, v, generator=g, dtype=torch.float64))
    rest = rest / rest.sum(-1, keepdim=True) * tail
    p = rest.scatter(1, ids, top)
    return p.log(), ids, top.log()


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 0.8])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_without_a_tail_equals_the_dense_loss(beta, temperature):
    s = _logits(6, 12, seed=51)
    dense_teacher, ids, logps = _topk_teacher(6, 12, 4, 0.0)
    target = _target(12, 6, ignored=(2,))
    # temperature applies to the student only: the dense teacher is given at temperature 1.
    check_against_torch(
        lambda s, t, target, **kw: LF.topk_distillation_loss(s, ids, logps, target, **kw),
        lambda s, t, target, **kw: distillation64(s, t * temperature, target, **kw),
        s, dense_teacher, target, beta=beta, temperature=temperature, reduction="none", atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("beta", BETAS)
def test_topk_with_a_tail_equals_the_dense_loss_against_a_teacher_tail_shaped_like_the_student(beta):
    s = _logits(5, 10, seed=52)
    dense_teacher, ids, logps = _topk_teacher(5, 10, 3, 0.25, student=s)
    check_against_torch(lambda s, t: LF.topk_distillation_loss(s, ids, logps, beta=beta),
                        lambda s, t: distillation64(s, t, beta=beta), s, dense_teacher, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("beta", BETAS)
def test_topk_with_a_tail_is_the_bucketed_definition_and_never_above_the_dense(beta):
    s = _logits(5, 10, seed=53)
    dense_teacher, ids, logps = _topk_teacher(5, 10, 3, 0.3)

    def buckets64(s, ids, logps, beta):
        # Written out: k + 1 buckets in probability space, in float64.
        q = s.double().softmax(-1)
        q_top = q.gather(1, ids)
        q_b = torch.cat([q_top, 1 - q_top.sum(1, keepdim=True)], 1)
        p_top = logps.double().exp()
        p_b = torch.cat([p_top, 1 - p_top.sum(1, keepdim=True)], 1)
        return gjsd_rows64(q_b.log(), p_b.log(), beta).mean()

    check_against_torch(lambda s: LF.topk_distillation_loss(s, ids, logps, beta=beta),
                        lambda s: buckets64(s, ids, logps, beta), s, atol=1e-10, rtol=1e-9)
    bucketed = LF.topk_distillation_loss(s, ids, logps, beta=beta, reduction="none")
    dense = LF.distillation_loss(s, dense_teacher, beta=beta, reduction="none")
    assert (bucketed <= dense + 1e-12).all()  # merging classes never increases a divergence


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_topk_gradcheck_and_float32_bfloat16(beta):
    s = _logits(4, 9, seed=54)
    _, ids, logps = _topk_teacher(4, 9, 3, 0.1)
    target = torch.tensor([0, -100, 3, 8])
    assert torch.autograd.gradcheck(
        lambda s, lp: LF.topk_distillation_loss(s, ids, lp, target, beta=beta, temperature=1.5, weight_hard_loss=0.3),
        (s, logps.clone().requires_grad_()))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        s_low, lp_low = s.detach().to(dtype).requires_grad_(), logps.to(dtype)
        check_against_torch(lambda s: LF.topk_distillation_loss(s, ids, lp_low, target, beta=beta),
                            lambda s: LF.topk_distillation_loss(s.double(), ids, lp_low.double(), target,
                                                                beta=beta).to(s.dtype),
                            s_low, atol=tol, rtol=tol)


def test_topk_padding_of_minus_inf_and_ignored_garbage():
    s = _logits(3, 8, dtype=torch.float32, seed=55)
    _, ids, logps = _topk_teacher(3, 8, 2, 0.2)
    logps = logps.float()
    # Two more ids per row with log-probability -inf (no mass): the same loss.
    extra = torch.stack([torch.tensor([i for i in range(8) if i not in row][:2]) for row in ids.tolist()])
    padded_ids = torch.cat([ids, extra], 1)
    padded_logps = torch.cat([logps, torch.full((3, 2), -math.inf)], 1)
    torch.testing.assert_close(LF.topk_distillation_loss(s, padded_ids, padded_logps),
                               LF.topk_distillation_loss(s, ids, logps))
    # An ignored row may hold anything: out-of-range ids, nan log-probabilities, inf logits.
    garbage_ids, garbage_logps = ids.clone(), logps.clone()
    garbage_ids[1] = torch.tensor([99, 99])
    garbage_logps[1] = math.nan
    s2 = s.detach().clone()
    s2[1, 0] = math.inf
    s2.requires_grad_()
    target = torch.tensor([1, -100, 2])
    loss = LF.topk_distillation_loss(s2, garbage_ids, garbage_logps, target)
    (grad,) = torch.autograd.grad(loss, s2)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and torch.equal(grad[1], torch.zeros(8))
    all_masked = LF.topk_distillation_loss(s, ids, logps, torch.full((3,), -100))
    assert all_masked.item() == 0.0
    # k = V: no rest bucket on either side, the dense loss.
    full = s.detach().log_softmax(-1)
    order = torch.argsort(torch.rand(3, 8), 1)
    torch.testing.assert_close(LF.topk_distillation_loss(s, order, full.gather(1, order), beta=0.3),
                               LF.distillation_loss(s, full, beta=0.3))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("hard", [0.0, 0.4])
def test_topk_fused_gradient_is_the_composed_forms_autograd(beta, temperature, reduction, hard):
    # The fused op writes d loss / d student out (kernels/topk_distillation.py's closed
    # form); the oracle is autograd through the composed form, both in float64, with a
    # tail, a padding entry, an ignored token and grad_output != 1.
    s = _logits(6, 11, scale=3.0, seed=56)
    _, ids, logps = _topk_teacher(6, 11, 4, 0.2, seed=57)
    logps[:, -1] = -math.inf  # padding: that token joins the rest bucket
    target = _target(11, 6, ignored=(2,), seed=58)
    kw = dict(beta=beta, temperature=temperature, reduction=reduction, weight_hard_loss=hard, weight_soft_loss=0.8)
    grad_output = torch.rand(6, dtype=torch.float64) if reduction == "none" else torch.tensor(1.3, dtype=torch.float64)
    with reference_only():
        ref = LF.topk_distillation_loss(s, ids, logps, target, **kw)
        (ref_grad,) = torch.autograd.grad(ref, s, grad_output)
    with fused_only():
        loss = LF.topk_distillation_loss(s, ids, logps, target, **kw)
        (grad,) = torch.autograd.grad(loss, s, grad_output)
    assert "TopkDistillation" in loss.grad_fn.name()
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_fused_keeps_a_rest_far_below_the_top_exact(beta, dtype):
    # The student's top token (a teacher's top-k token) 300 nats above all the others:
    # the rest bucket's mass, e^-300 or so, underflows to 0 in any softmax; its log-sum-exp
    # shifted by the rest's own max stays exact, as the composed form's does.
    s = _logits(3, 9, seed=59).detach()
    s[:, 0] += 300.0
    s = s.to(dtype).requires_grad_()
    ids = torch.tensor([[0, 1], [0, 5], [0, 8]])
    logps = torch.tensor([[0.6, 0.2], [0.5, 0.1], [0.7, 0.2]], dtype=torch.float64).log()
    with fused_only():
        check_against_torch(lambda s: LF.topk_distillation_loss(s, ids, logps.to(dtype), beta=beta),
                            lambda s: _topk_buckets_logspace64(s, ids, logps, beta), s,
                            atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=1e-6 if dtype == torch.float32 else 1e-12)


def _topk_buckets_logspace64(s, ids, logps, beta):
    """The bucketed loss in float64 from log-space buckets (logsumexp of the rest)."""
    log_q = s.double().log_softmax(-1)
    mask = torch.zeros_like(log_q, dtype=torch.bool).scatter(1, ids, True)
    rest = torch.where(mask, -math.inf, log_q).logsumexp(-1, keepdim=True)
    log_q_b = torch.cat([log_q.gather(1, ids), rest], 1)
    log_p_b = torch.cat([logps, (1 - logps.exp().sum(1, keepdim=True)).log()], 1)
    p, q = log_p_b.exp(), log_q_b.exp()
    if beta == 0.0:
        rows = (p * (log_p_b - log_q_b)).sum(1)
    else:
        log_m = torch.logaddexp(log_p_b + math.log(beta), log_q_b + math.log1p(-beta))
        rows = beta * (p * (log_p_b - log_m)).sum(1) + (1 - beta) * (q * (log_q_b - log_m)).sum(1)
    return rows.mean().to(s.dtype)


def test_topk_fused_k_equal_to_v_ignored_garbage_and_no_grad():
    s = _logits(4, 6, seed=60, dtype=torch.float32)
    full = s.detach().double().log_softmax(-1)
    order = torch.argsort(torch.rand(4, 6, generator=torch.Generator().manual_seed(61)), 1)
    target = torch.tensor([1, -100, 2, 3])
    garbage = full.gather(1, order).float()
    garbage[1] = math.nan
    garbage_ids = order.clone()
    garbage_ids[1] = 7
    for ids, logps in ((order, full.gather(1, order).float()), (garbage_ids, garbage)):
        with reference_only():
            ref = LF.topk_distillation_loss(s, ids, logps, target, beta=0.3)
            (ref_grad,) = torch.autograd.grad(ref, s)
        loss = LF.topk_distillation_loss(s, ids, logps, target, beta=0.3)
        (grad,) = torch.autograd.grad(loss, s)
        assert "TopkDistillation" in loss.grad_fn.name()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(grad, ref_grad)
    with torch.no_grad():
        torch.testing.assert_close(LF.topk_distillation_loss(s, order, full.gather(1, order).float(), target, beta=0.3),
                                   ref.detach())


@pytest.mark.parametrize("temperature", [1.0, 1.6])
def test_topk_fused_over_chunks_of_rows_is_the_composed_form(temperature):
    # V = 40000: the fused pass goes over chunks of 16 rows (3 here).
    s = _logits(40, 40000, scale=3.0, seed=64)
    _, ids, logps = _topk_teacher(40, 40000, 5, 0.2, seed=65)
    target = _target(40000, 40, ignored=(3, 17, 33), seed=66)
    kw = dict(beta=0.4, temperature=temperature, weight_hard_loss=0.3)
    with reference_only():
        ref = LF.topk_distillation_loss(s, ids, logps, target, **kw)
        (ref_grad,) = torch.autograd.grad(ref, s)
    with fused_only():
        loss = LF.topk_distillation_loss(s, ids, logps, target, **kw)
        (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-12)


def test_topk_fused_double_backward_and_a_second_backward_replay_the_composed_form():
    s = _logits(5, 9, seed=62, dtype=torch.float32)
    _, ids, logps = _topk_teacher(5, 9, 3, 0.2, seed=63)
    logps = logps.float()
    loss = LF.topk_distillation_loss(s, ids, logps, beta=0.3)
    assert "TopkDistillation" in loss.grad_fn.name()
    (grad,) = torch.autograd.grad(loss, s, create_graph=True)
    (hess_row,) = torch.autograd.grad(grad[:, 0].sum(), s)
    with reference_only():
        ref = LF.topk_distillation_loss(s, ids, logps, beta=0.3)
        (ref_grad,) = torch.autograd.grad(ref, s, create_graph=True)
        (ref_hess_row,) = torch.autograd.grad(ref_grad[:, 0].sum(), s)
    torch.testing.assert_close(grad, ref_grad)
    torch.testing.assert_close(hess_row, ref_hess_row)
    loss = LF.topk_distillation_loss(s, ids, logps, beta=0.3)
    (first,) = torch.autograd.grad(loss, s, retain_graph=True)
    (second,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(first, second)


def test_topk_bad_input_names_the_argument():
    s = torch.randn(2, 6)
    ids, logps = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0.5, 0.3], [0.2, 0.1]]).log()
    f = LF.topk_distillation_loss
    check_raises(f, s, ids.float(), logps, error=TypeError, match="teacher_topk_ids must be an integer tensor")
    check_raises(f, s, ids, logps.long(), error=TypeError, match="teacher_topk_logps must be a floating-point")
    check_raises(f, s, ids[:1], logps[:1], match="teacher_topk_ids shape (1, 2) must be [..., k]")
    check_raises(f, s, ids, logps[:, :1], match="teacher_topk_logps shape (2, 1) must equal teacher_topk_ids shape")
    check_raises(f, s, torch.tensor([[0, 6], [2, 3]]), logps, error=IndexError,
                 match="teacher_topk_ids holds 6 at index (0, 1), out of range for 6 classes")
    check_raises(f, s, torch.tensor([[0, 1], [3, 3]]), logps, match="teacher_topk_ids names a token twice in row (1,)")
    check_raises(f, s, ids, torch.tensor([[-0.5, math.nan], [-1.0, -2.0]]),
                 match="teacher_topk_logps must hold log-probabilities (<= 0, not nan); found nan at index (0, 1)")
    check_raises(f, s, ids, torch.tensor([[0.7, 0.6], [0.2, 0.1]]).log(),
                 match="teacher_topk_logps of row (0,) sum to probability 1.3 > 1")
    check_raises(f, s, torch.arange(7).expand(2, 7), torch.full((2, 7), -3.0), match="k = 7 ids per position")
    check_raises(f, s, ids, logps, beta=2.0, match="topk_distillation_loss: beta must be in [0, 1]")


# ---- Modules ------------------------------------------------------------------------------------
def test_modules_equal_the_functions():
    s, t = _logits(4, 7, dtype=torch.float32, seed=60), _logits(4, 7, dtype=torch.float32, seed=61)
    target = torch.tensor([0, -100, 3, 6])
    options = dict(beta=0.3, temperature=1.5, reduction="sum", weight_hard_loss=0.2, weight_soft_loss=0.8)
    torch.testing.assert_close(lnn.DistillationLoss(**options)(s, t, target),
                               LF.distillation_loss(s, t, target, **options))
    (xs, ws, xt, wt), bias = _heads(n=4, v=7, dtype=torch.float32, bias=True)
    torch.testing.assert_close(lnn.LinearDistillationLoss(chunk_size=2, **options)(xs, ws, xt, wt, target, **bias),
                               LF.linear_distillation_loss(xs, ws, xt, wt, target, **bias, **options))
    _, ids, logps = _topk_teacher(4, 7, 3, 0.2)
    torch.testing.assert_close(lnn.TopKDistillationLoss(**options)(s, ids, logps.float(), target),
                               LF.topk_distillation_loss(s, ids, logps.float(), target, **options))
    with pytest.raises(ValueError, match="DistillationLoss: beta must be in"):
        lnn.DistillationLoss(beta=3.0)
    with pytest.raises(ValueError, match="LinearDistillationLoss: chunk_size"):
        lnn.LinearDistillationLoss(chunk_size=0)
    assert "beta=0.3" in repr(lnn.TopKDistillationLoss(beta=0.3))
