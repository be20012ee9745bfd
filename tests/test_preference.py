"""Preference losses (dpo, simpo, cpo, orpo, kto) against TRL 1.16's own code and
Liger-Kernel 0.8.5's chunked losses, on the same log-probs.

TRL's DPO loss lives inside ``DPOTrainer._compute_loss``: it is called here, unbound, with a
stand-in ``self`` that carries the config fields and a stand-in model whose output holds the
per-token log-probs (precomputed reference log-probs, as ``precompute_ref_logps=True``).
CPO/SimPO and ORPO are TRL methods called the same way; KTO's is written out line for line
(its trainer reads the model twice). Liger's ``preference_loss_fn`` pieces are static and are
called directly; one test per family runs Liger's fused module (hidden states + weight,
``compiled=False``) against losskit on log-probs of the same logits.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as TF
from liger_kernel.chunked_loss.cpo_loss import LigerFusedLinearCPOFunction
from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction, LigerFusedLinearDPOLoss
from liger_kernel.chunked_loss.kto_loss import LigerFusedLinearKTOFunction
from liger_kernel.chunked_loss.orpo_loss import LigerFusedLinearORPOFunction
from liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction, LigerFusedLinearSimPOLoss
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer

import losskit.functional as LF
import losskit.nn as LN
from compare import DTYPES, check_against_torch, check_raises
from losskit.functional.preference import DPO_LOSS_TYPES

B, T = 4, 6
FLOATS = [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-2, 1e-2)]


def _tokens(dtype=torch.float64, seed=0, scale=1.0):
    """Per-token log-probs [B, T] (with gradient) and a mask of completions of lengths 6, 3, 5, 1."""
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 2 * scale + 0.05)
    mask = torch.arange(T) < torch.tensor([6, 3, 5, 1])[:, None]
    return lp.to(dtype).requires_grad_(), mask


def _seq(tok, mask, mean=False):
    s = torch.where(mask, tok, 0).sum(-1)
    return s / mask.sum(-1) if mean else s


# ---- TRL 1.16 DPO, called unbound ----------------------------------------------------------------


def trl_dpo(chosen_tok, rejected_tok, mask_c, mask_r, ref_c, ref_r, *, beta, loss_type, label_smoothing=0.0,
            discopop_tau=0.05):
    """TRL's DPOTrainer._compute_loss on per-token log-probs (masked positions hold 0, as the
    model's fused head gives for labels of -100) and precomputed summed reference log-probs."""
    per_token = torch.cat([torch.where(mask_c, chosen_tok, 0), torch.where(mask_r, rejected_tok, 0)])
    n, t = per_token.shape
    completion_mask = torch.cat([torch.zeros(n, 1, dtype=torch.long), torch.cat([mask_c, mask_r]).long()], 1)

    def model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        args=SimpleNamespace(discopop_tau=discopop_tau),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros(n, t + 1, dtype=torch.long), "attention_mask": torch.ones(n, t + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)


def _dpo_inputs(dtype, seed=0):
    chosen, mask_c = _tokens(dtype, seed)
    rejected, _ = _tokens(dtype, seed + 1)
    mask_r = mask_c.flip(0)
    g = torch.Generator().manual_seed(seed + 2)
    ref_c = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 2 + 0.05).to(dtype)
    ref_r = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 2 + 0.05).to(dtype)
    return chosen, rejected, mask_c, mask_r, ref_c, ref_r


def _smoothing(loss_type):
    return {"robust": 0.2, "exo_pair": 1e-3}.get(loss_type, 0.0)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("dtype, atol, rtol", FLOATS, ids=["f64", "f32", "bf16"])
def test_dpo_matches_trl(loss_type, beta, dtype, atol, rtol):
    chosen, rejected, mask_c, mask_r, ref_c_tok, ref_r_tok = _dpo_inputs(dtype)
    ls = _smoothing(loss_type)
    mean = loss_type == "ipo"  # TRL divides IPO's summed log-ratios by the completion length

    def ours(c, r):
        return LF.dpo_loss(_seq(c, mask_c, mean), _seq(r, mask_r, mean), _seq(ref_c_tok, mask_c, mean),
                           _seq(ref_r_tok, mask_r, mean), beta=beta, loss_type=loss_type, label_smoothing=ls)

    def theirs(c, r):
        ref_c, ref_r = _seq(ref_c_tok.to(c.dtype), mask_c), _seq(ref_r_tok.to(c.dtype), mask_r)
        # TRL's IPO divides by a float32 token count, which promotes a bfloat16 loss to float32.
        return trl_dpo(c, r, mask_c, mask_r, ref_c, ref_r, beta=beta, loss_type=loss_type,
                       label_smoothing=ls).to(c.dtype)

    if loss_type == "exo_pair" and dtype == torch.float64:
        atol = rtol = 1e-7  # TRL makes epsilon a float32 tensor: its log(1 - eps) and log(eps) are float32
    check_against_torch(ours, theirs, chosen, rejected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("loss_type", [t for t in DPO_LOSS_TYPES if t not in ("ipo", "sppo_hard")])
def test_dpo_at_beta_zero_matches_trl(loss_type):
    chosen, rejected, mask_c, mask_r, ref_c_tok, ref_r_tok = _dpo_inputs(torch.float64, seed=3)
    ls = _smoothing(loss_type)
    ref_c, ref_r = _seq(ref_c_tok, mask_c), _seq(ref_r_tok, mask_r)
    check_against_torch(
        lambda c, r: LF.dpo_loss(_seq(c, mask_c), _seq(r, mask_r), ref_c, ref_r, beta=0.0, loss_type=loss_type,
                                 label_smoothing=ls),
        lambda c, r: trl_dpo(c, r, mask_c, mask_r, ref_c, ref_r, beta=0.0, loss_type=loss_type, label_smoothing=ls),
        chosen, rejected, atol=1e-7 if loss_type == "exo_pair" else 1e-12, rtol=1e-7)  # exo_pair: see above


@pytest.mark.parametrize("loss_type", [t for t in DPO_LOSS_TYPES if t != "ipo"])  # Liger has no IPO
@pytest.mark.parametrize("reference", [True, False])
def test_dpo_matches_liger_preference_loss_fn(loss_type, reference):
    chosen, rejected, mask_c, mask_r, ref_c_tok, ref_r_tok = _dpo_inputs(torch.float64, seed=5)
    ls = _smoothing(loss_type)
    refs = (_seq(ref_c_tok, mask_c), _seq(ref_r_tok, mask_r)) if reference else (None, None)
    full_target = torch.zeros(2 * B, T)
    check_against_torch(
        lambda c, r: LF.dpo_loss(c, r, *refs, beta=0.3, loss_type=loss_type, label_smoothing=ls),
        lambda c, r: LigerFusedLinearDPOFunction.preference_loss_fn(
            c, r, full_target, *refs, beta=0.3, loss_type=loss_type, label_smoothing=ls)[0],
        _seq(chosen, mask_c).detach().requires_grad_(), _seq(rejected, mask_r).detach().requires_grad_(),
        atol=1e-7 if loss_type == "exo_pair" else 1e-12, rtol=1e-7)  # Liger's epsilon is float32 too


def _liger_case(seed=0, H=8, V=11):
    """Hidden states [2B, T, H] (chosen rows first), a weight [V, H], targets with -100 padding."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g) * 0.5
    weight = torch.randn(V, H, generator=g) * 0.5
    target = torch.randint(0, V, (2 * B, T), generator=g)
    lengths = torch.tensor([6, 3, 5, 1, 2, 6, 4, 3])
    target = torch.where(torch.arange(T) < lengths[:, None], target, -100)
    return hidden, weight, target


def _token_logps(hidden, weight, target):
    """Log-probs of the targets from logits = hidden @ weight.T, and the mask (what
    linear_log_probs returns, written out)."""
    mask = target != -100
    logp = (hidden @ weight.T).float().log_softmax(-1)
    return logp.gather(-1, torch.where(mask, target, 0).unsqueeze(-1)).squeeze(-1), mask


@pytest.mark.parametrize("loss_type", ["sigmoid", "apo_zero", "discopop"])
def test_dpo_on_log_probs_of_the_same_logits_matches_liger_fused(loss_type):
    hidden, weight, target = _liger_case()
    ref_hidden, ref_weight, _ = _liger_case(seed=1)
    liger = LigerFusedLinearDPOLoss(beta=0.5, compiled=False, loss_type=loss_type, chunk_size=2)

    def theirs(h, w):
        out = liger(w, h, target, ref_input=ref_hidden, ref_weight=ref_weight)
        return out[0] if isinstance(out, tuple) else out

    def ours(h, w):
        tok, mask = _token_logps(h, w, target)
        seq = torch.where(mask, tok, 0).sum(-1)
        with torch.no_grad():
            ref_tok, _ = _token_logps(ref_hidden, ref_weight, target)
            ref = torch.where(mask, ref_tok, 0).sum(-1)
        return LF.dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=0.5, loss_type=loss_type)

    check_against_torch(ours, theirs, hidden.requires_grad_(), weight.requires_grad_(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_gradcheck_and_reductions(loss_type):
    g = torch.Generator().manual_seed(7)
    c, r, rc, rr = (-(torch.rand(5, generator=g, dtype=torch.float64) * 20) for _ in range(4))
    ls = _smoothing(loss_type) or (0.1 if loss_type == "sigmoid" else 0.0)
    kw = dict(beta=0.2, loss_type=loss_type, label_smoothing=ls)
    c.requires_grad_(), r.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: LF.dpo_loss(a, b, rc, rr, **kw), (c, r))
    assert torch.autograd.gradgradcheck(lambda a, b: LF.dpo_loss(a, b, rc, rr, **kw), (c, r))
    each = LF.dpo_loss(c, r, rc, rr, reduction="none", **kw)
    assert each.shape == (5,)
    torch.testing.assert_close(LF.dpo_loss(c, r, rc, rr, **kw), each.mean())
    torch.testing.assert_close(LF.dpo_loss(c, r, rc, rr, reduction="sum", **kw), each.sum())


def _cdpo_definition(c, r, rc, rr, beta, eps):
    """Conservative DPO (Mitchell 2023; TRL < 0.20's sigmoid with label_smoothing), float64."""
    z = beta * ((c - rc) - (r - rr))
    return (-(1 - eps) * TF.logsigmoid(z) - eps * TF.logsigmoid(-z)).mean()


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["f64", "f32", "bf16", "f16"])
def test_dpo_sigmoid_with_label_smoothing_is_conservative_dpo(dtype, atol, rtol):
    g = torch.Generator().manual_seed(8)
    c, r, rc, rr = (-(torch.rand(6, generator=g, dtype=torch.float64) * 10).to(dtype) for _ in range(4))
    check_against_torch(lambda a, b: LF.dpo_loss(a, b, rc, rr, beta=0.5, label_smoothing=0.3),
                        lambda a, b: _cdpo_definition(a, b, rc.to(a.dtype), rr.to(a.dtype), 0.5, 0.3),
                        c.requires_grad_(), r.requires_grad_(), atol=atol, rtol=rtol)


def test_differences_dpo_sigmoid_label_smoothing_where_trl_and_liger_ignore_it():
    """README differences: dpo_loss(loss_type='sigmoid', label_smoothing=eps) is conservative DPO;
    TRL 1.16 and Liger 0.8.5 read label_smoothing only for robust and exo_pair."""
    chosen, rejected, mask_c, mask_r, ref_c_tok, ref_r_tok = _dpo_inputs(torch.float64)
    c, r, rc, rr = _seq(chosen, mask_c), _seq(rejected, mask_r), _seq(ref_c_tok, mask_c), _seq(ref_r_tok, mask_r)
    trl_smoothed = trl_dpo(chosen, rejected, mask_c, mask_r, rc, rr, beta=0.5, loss_type="sigmoid",
                           label_smoothing=0.2)
    liger_smoothed = LigerFusedLinearDPOFunction.preference_loss_fn(c, r, torch.zeros(2 * B), rc, rr, beta=0.5,
                                                                    label_smoothing=0.2)[0]
    plain = LF.dpo_loss(c, r, rc, rr, beta=0.5)
    torch.testing.assert_close(trl_smoothed, plain)  # TRL: the smoothing is silently unused
    torch.testing.assert_close(liger_smoothed, plain)
    ours = LF.dpo_loss(c, r, rc, rr, beta=0.5, label_smoothing=0.2)
    torch.testing.assert_close(ours, _cdpo_definition(c, r, rc, rr, 0.5, 0.2))
    assert not torch.isclose(ours, plain)


def test_differences_discopop_is_finite_where_trl_gives_nan():
    """README differences: DiscoPOP's m * exp(-beta h) for a very negative margin: TRL and Liger
    form 0 * inf = nan; losskit forms exp(log m - beta h), whose limit (tau < 1) is 0 ... plus
    the logistic term, which is finite."""
    c, r = torch.tensor([-900.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    theirs = LigerFusedLinearDPOFunction.preference_loss_fn(c, r, torch.zeros(2), zero, zero, beta=1.0,
                                                            loss_type="discopop")[0]
    mask = torch.ones(1, 1, dtype=torch.bool)
    trl = trl_dpo(c[:, None], r[:, None], mask, mask, zero, zero, beta=1.0, loss_type="discopop")
    assert theirs.isnan() and trl.isnan()
    ours = LF.dpo_loss(c, r, zero, zero, beta=1.0, loss_type="discopop")
    torch.testing.assert_close(ours, -TF.logsigmoid(torch.tensor(-899.0, dtype=torch.float64)))


def test_reference_log_probs_are_constants():
    c, r = torch.tensor([-3.0], requires_grad=True), torch.tensor([-4.0], requires_grad=True)
    rc, rr = c * 1.0, r * 1.0  # the policy as its own reference, not detached: the classic slip
    loss = LF.dpo_loss(c, r, rc, rr)
    g_c, g_r = torch.autograd.grad(loss, (c, r))
    # -d/dh log sigmoid(beta h) at h = 0 is -beta / 2, and the reference contributes nothing.
    torch.testing.assert_close(g_c, torch.tensor([-0.05]))
    torch.testing.assert_close(g_r, torch.tensor([0.05]))
    hand_written = -TF.logsigmoid(0.1 * ((c - rc) - (r - rr))).mean()
    assert torch.autograd.grad(hand_written, c)[0].abs().item() == 0.0


def test_dpo_edge_cases():
    empty = torch.zeros(0, requires_grad=True)
    assert LF.dpo_loss(empty, empty, empty, empty).isnan()  # a mean over no pairs, as torch
    assert LF.dpo_loss(empty, empty, empty, empty, reduction="sum") == 0
    inf = torch.tensor([-math.inf, -2.0], dtype=torch.float64, requires_grad=True)
    other = torch.tensor([-3.0, -1.0], dtype=torch.float64)
    loss = LF.dpo_loss(inf, other, reduction="none")  # an impossible chosen completion: an infinite loss
    assert loss[0] == math.inf and torch.isfinite(loss[1])
    nan = torch.tensor([math.nan, -2.0], dtype=torch.float64)
    assert LF.dpo_loss(nan, other).isnan()  # nan is never hidden
    # beta = 0: every pair scores the same, no gradient (sigmoid: ln 2)
    c = torch.tensor([-3.0, -9.0], dtype=torch.float64, requires_grad=True)
    loss = LF.dpo_loss(c, other, beta=0.0)
    torch.testing.assert_close(loss, torch.tensor(math.log(2), dtype=torch.float64))
    assert (torch.autograd.grad(loss, c)[0] == 0).all()


def test_dpo_bad_input():
    x = torch.tensor([-1.0, -2.0])
    check_raises(LF.dpo_loss, x, x, loss_type="kto", match="loss_type must be one of")
    check_raises(LF.dpo_loss, x, x[:1], match="rejected_logps shape (1,) must equal chosen_logps shape (2,)")
    check_raises(LF.dpo_loss, x, x, x, match="ref_rejected_logps is None but its partner is given")
    check_raises(LF.dpo_loss, x, x, x, x[:, None], match="ref_rejected_logps shape (2, 1)")
    check_raises(LF.dpo_loss, x.long(), x, error=TypeError, match="chosen_logps must be a floating-point tensor")
    check_raises(LF.dpo_loss, x, x, beta=-0.1, match="beta must be a finite number >= 0")
    check_raises(LF.dpo_loss, x, x, beta=0.0, loss_type="ipo", match="beta must be a positive, finite number")
    check_raises(LF.dpo_loss, x, x, loss_type="exo_pair", match="label_smoothing must lie in (0, 1)")
    check_raises(LF.dpo_loss, x, x, loss_type="robust", label_smoothing=0.5,
                 match="label_smoothing must lie in [0, 0.5)")
    check_raises(LF.dpo_loss, x, x, loss_type="hinge", label_smoothing=0.1,
                 match="label_smoothing applies to loss_type 'sigmoid', 'robust' and 'exo_pair' only")
    check_raises(LF.dpo_loss, x, x, reduction="batchmean", match="reduction must be one of")
    check_raises(LF.dpo_loss, x, x, loss_type="discopop", discopop_tau=0.0, match="discopop_tau must be")


# ---- SimPO and CPO: TRL's CPOTrainer.cpo_loss, unbound -------------------------------------------


def trl_cpo(c, r, *, loss_type, beta, gamma=0.5, label_smoothing=0.0):
    stand_in = SimpleNamespace(alpha=0.0, loss_type=loss_type, simpo_gamma=gamma, beta=beta,
                               label_smoothing=label_smoothing, accelerator=SimpleNamespace(device=c.device))
    return CPOTrainer.cpo_loss(stand_in, c, r)[0].mean()


@pytest.mark.parametrize("beta, gamma, ls", [(2.0, 1.0, 0.0), (0.1, 0.5, 0.2), (1.0, 0.0, 0.5)])
@pytest.mark.parametrize("dtype, atol, rtol", FLOATS, ids=["f64", "f32", "bf16"])
def test_simpo_matches_trl_on_mean_log_probs(beta, gamma, ls, dtype, atol, rtol):
    chosen, mask_c = _tokens(dtype, 10)
    rejected, _ = _tokens(dtype, 11)
    mask_r = mask_c.flip(0)
    check_against_torch(
        lambda a, b: LF.simpo_loss(_seq(a, mask_c, True), _seq(b, mask_r, True), beta=beta, gamma=gamma,
                                   label_smoothing=ls),
        lambda a, b: trl_cpo(_seq(a, mask_c, True), _seq(b, mask_r, True), loss_type="simpo", beta=beta,
                             gamma=gamma, label_smoothing=ls),
        chosen, rejected, atol=atol, rtol=rtol)


def test_simpo_at_beta_zero_is_a_constant_where_trl_divides_by_zero():
    c = torch.tensor([-0.5, -2.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-1.0, -0.1], dtype=torch.float64)
    with pytest.raises(ZeroDivisionError):  # TRL writes the margin as beta * (delta - gamma / beta)
        trl_cpo(c, r, loss_type="simpo", beta=0.0, gamma=0.5)
    loss = LF.simpo_loss(c, r, beta=0.0, gamma=0.5, label_smoothing=0.1)
    gamma = torch.tensor(0.5, dtype=torch.float64)
    torch.testing.assert_close(loss, -0.9 * TF.logsigmoid(-gamma) - 0.1 * TF.logsigmoid(gamma))
    assert (torch.autograd.grad(loss, c)[0] == 0).all()


@pytest.mark.parametrize("beta, ls", [(0.1, 0.0), (1.0, 0.3), (0.0, 0.0)])
@pytest.mark.parametrize("dtype, atol, rtol", FLOATS, ids=["f64", "f32", "bf16"])
def test_cpo_matches_trl_on_summed_log_probs(beta, ls, dtype, atol, rtol):
    chosen, mask_c = _tokens(dtype, 12)
    rejected, _ = _tokens(dtype, 13)
    check_against_torch(
        lambda a, b: LF.cpo_loss(_seq(a, mask_c), _seq(b, mask_c), beta=beta, label_smoothing=ls),
        lambda a, b: trl_cpo(_seq(a, mask_c), _seq(b, mask_c), loss_type="sigmoid", beta=beta, label_smoothing=ls),
        chosen, rejected, atol=atol, rtol=rtol)


def test_simpo_and_cpo_match_liger():
    g = torch.Generator().manual_seed(14)
    c, r = (-(torch.rand(5, generator=g, dtype=torch.float64) * 3) for _ in range(2))
    full = torch.zeros(10)
    check_against_torch(lambda a, b: LF.simpo_loss(a, b, beta=2.0, gamma=0.7, label_smoothing=0.1),
                        lambda a, b: LigerFusedLinearSimPOFunction.preference_loss_fn(
                            a, b, full, beta=2.0, gamma=0.7, label_smoothing=0.1)[0],
                        c.requires_grad_(), r.requires_grad_(), atol=1e-12, rtol=1e-12)
    check_against_torch(lambda a, b: LF.cpo_loss(a, b, beta=0.4, label_smoothing=0.1),
                        lambda a, b: LigerFusedLinearCPOFunction.preference_loss_fn(
                            a, b, full, beta=0.4, label_smoothing=0.1)[0],
                        c, r, atol=1e-12, rtol=1e-12)


def test_simpo_on_log_probs_of_the_same_logits_matches_liger_fused():
    hidden, weight, target = _liger_case(seed=3)
    liger = LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.5, compiled=False, compute_nll_loss=False, chunk_size=2)

    def theirs(h, w):
        out = liger(w, h, target)
        return out[0] if isinstance(out, tuple) else out

    def ours(h, w):
        tok, mask = _token_logps(h, w, target)
        mean = torch.where(mask, tok, 0).sum(-1) / mask.sum(-1)  # SimPO: per-token means
        return LF.simpo_loss(mean[:B], mean[B:], beta=2.0, gamma=0.5)

    check_against_torch(ours, theirs, hidden.requires_grad_(), weight.requires_grad_(), atol=1e-5, rtol=1e-5)


def test_simpo_bad_input():
    x = torch.tensor([-1.0])
    check_raises(LF.simpo_loss, x, x, label_smoothing=0.6, match="label_smoothing must lie in [0, 0.5]")
    check_raises(LF.simpo_loss, x, x, gamma=math.inf, match="gamma must be a finite number")
    check_raises(LF.cpo_loss, x, x, beta=math.nan, match="beta must be a finite number >= 0")
    check_raises(LF.cpo_loss, x, torch.tensor([-1.0, -2.0]), match="rejected_logps shape (2,)")


# ---- ORPO ------------------------------------------------------------------------------------------


def trl_orpo(c, r, beta):
    stand_in = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=c.device))
    return -ORPOTrainer.odds_ratio_loss(stand_in, c, r)[0].mean()  # TRL subtracts the mean of beta log sigma


def _orpo_definition(c, r, beta):
    """Hong et al.'s Eq. 7 on probabilities, float64: -beta log sigma(log(odds_w / odds_l))."""
    pc, pr = c.exp(), r.exp()
    return (-beta * TF.logsigmoid(torch.log((pc / (1 - pc)) / (pr / (1 - pr))))).mean()


@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0])
def test_orpo_matches_trl_and_the_definition(beta):
    chosen, mask = _tokens(torch.float64, 20)
    rejected, _ = _tokens(torch.float64, 21)
    # The paper's formula in float64 on probabilities: exact where they are far from 0 and 1.
    check_against_torch(lambda a, b: LF.orpo_loss(_seq(a, mask, True), _seq(b, mask, True), beta=beta),
                        lambda a, b: _orpo_definition(_seq(a, mask, True), _seq(b, mask, True), beta),
                        chosen, rejected, atol=1e-12, rtol=1e-12)
    # TRL casts to float32 first: compared at float32's precision.
    check_against_torch(lambda a, b: LF.orpo_loss(_seq(a, mask, True), _seq(b, mask, True), beta=beta),
                        lambda a, b: trl_orpo(_seq(a, mask, True), _seq(b, mask, True), beta).double(),
                        chosen, rejected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype, atol, rtol", FLOATS, ids=["f64", "f32", "bf16"])
def test_orpo_matches_liger(dtype, atol, rtol):
    g = torch.Generator().manual_seed(22)
    c, r = (-(torch.rand(5, generator=g, dtype=torch.float64) * 3 + 0.01).to(dtype) for _ in range(2))
    check_against_torch(lambda a, b: LF.orpo_loss(a, b, beta=0.5),
                        lambda a, b: LigerFusedLinearORPOFunction.preference_loss_fn(
                            a, b, torch.zeros(10), beta=0.5)[0],
                        c.requires_grad_(), r.requires_grad_(), atol=atol, rtol=rtol)


def test_orpo_near_zero_and_bad_input():
    # A completion of probability close to 1: log(1 - e^x) needs its expm1 branch.
    c = torch.tensor([-1e-3, -0.3], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-2.0, -5.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: LF.orpo_loss(a, r, beta=1.0), (c,))
    check_raises(LF.orpo_loss, torch.tensor([0.5]), torch.tensor([-1.0]),
                 match="chosen_logps must hold log-probabilities (<= 0); found 0.5 at index (0,)")


# ---- KTO ---------------------------------------------------------------------------------------------


def trl_kto(logps, ref, desirable, kl, beta, dw, uw):
    """KTOTrainer._compute_loss's loss lines (TRL 1.16), line for line, on summed log-probs."""
    chosen_idx = torch.nonzero(desirable).view(-1)
    rejected_idx = torch.nonzero(~desirable).view(-1)
    kl = torch.as_tensor(kl, dtype=logps.dtype).clamp(min=0)
    chosen_losses = 1 - TF.sigmoid(beta * ((logps[chosen_idx] - ref[chosen_idx]) - kl))
    rejected_losses = 1 - TF.sigmoid(beta * (kl - (logps[rejected_idx] - ref[rejected_idx])))
    losses = torch.cat((dw * chosen_losses, uw * rejected_losses), 0)
    return losses.nanmean()


@pytest.mark.parametrize("beta, kl, dw, uw", [(0.1, 0.3, 1.0, 1.0), (1.0, 0.0, 1.33, 0.7), (0.0, 2.0, 1.0, 1.0),
                                              (0.5, -0.4, 1.0, 2.0)])
@pytest.mark.parametrize("dtype, atol, rtol", FLOATS, ids=["f64", "f32", "bf16"])
def test_kto_matches_trl(beta, kl, dw, uw, dtype, atol, rtol):
    tok, mask = _tokens(dtype, 30)
    ref = _seq(_tokens(dtype, 31)[0].detach(), mask)
    desirable = torch.tensor([True, False, False, True])
    check_against_torch(
        lambda t: LF.kto_loss(_seq(t, mask), ref, desirable, beta=beta, kl=torch.tensor(kl, dtype=dtype),
                              desirable_weight=dw, undesirable_weight=uw),
        lambda t: trl_kto(_seq(t, mask), ref.to(t.dtype), desirable, kl, beta, dw, uw),
        tok, atol=atol, rtol=rtol)


@pytest.mark.parametrize("kl", [None, 0.4])
@pytest.mark.parametrize("reference", [True, False])
def test_kto_matches_liger(kl, reference):
    g = torch.Generator().manual_seed(32)
    logps = -(torch.rand(6, generator=g, dtype=torch.float64) * 10)
    ref = -(torch.rand(6, generator=g, dtype=torch.float64) * 10) if reference else None
    desirable = torch.tensor([True, False, True, True, False, False])
    check_against_torch(
        lambda x: LF.kto_loss(x, ref, desirable, beta=0.2, kl=kl),
        lambda x: LigerFusedLinearKTOFunction.preference_loss_fn(
            x, desirable, torch.zeros(6), ref, beta=0.2,
            kl=None if kl is None else torch.tensor(kl, dtype=torch.float64))[0],
        logps.requires_grad_(), atol=1e-12, rtol=1e-12)


def test_differences_kto_clamps_a_negative_kl_estimate_and_keeps_nan():
    """README differences: kto_loss clamps a negative KL estimate at 0 (as TRL) where Liger
    uses it as given; a nan log-prob makes losskit's mean nan where TRL's nanmean drops it."""
    logps, ref = torch.tensor([-3.0, -5.0], dtype=torch.float64), torch.tensor([-4.0, -4.0], dtype=torch.float64)
    desirable = torch.tensor([True, False])
    liger = LigerFusedLinearKTOFunction.preference_loss_fn(logps, desirable, torch.zeros(2), ref, beta=1.0,
                                                           kl=torch.tensor(-0.5, dtype=torch.float64))[0]
    ours = LF.kto_loss(logps, ref, desirable, beta=1.0, kl=-0.5)
    torch.testing.assert_close(ours, LF.kto_loss(logps, ref, desirable, beta=1.0, kl=0.0))
    torch.testing.assert_close(ours, trl_kto(logps, ref, desirable, -0.5, 1.0, 1.0, 1.0))
    assert not torch.isclose(ours, liger)
    with_nan = torch.tensor([-3.0, math.nan], dtype=torch.float64)
    assert LF.kto_loss(with_nan, ref, desirable).isnan()
    assert trl_kto(with_nan, ref, desirable, 0.0, 0.1, 1.0, 1.0).isfinite()


def test_kto_reductions_gradcheck_and_bad_input():
    logps = torch.tensor([-3.0, -5.0, -1.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-4.0, -4.0, -2.0], dtype=torch.float64)
    desirable = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(lambda x: LF.kto_loss(x, ref, desirable, beta=0.7, kl=0.2,
                                                          undesirable_weight=1.5), (logps,))
    each = LF.kto_loss(logps, ref, desirable, reduction="none", desirable_weight=2.0)
    torch.testing.assert_close(LF.kto_loss(logps, ref, desirable, desirable_weight=2.0), each.mean())
    kl = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.grad(LF.kto_loss(logps, ref, desirable, kl=kl), kl, allow_unused=True)[0] is None
    check_raises(LF.kto_loss, logps, ref, torch.tensor([1, 0, 1]), error=TypeError,
                 match="desirable must be a boolean tensor")
    check_raises(LF.kto_loss, logps, ref, desirable[:2], match="desirable shape (2,) must equal logps shape (3,)")
    check_raises(LF.kto_loss, logps, ref, desirable, desirable_weight=-1.0, match="desirable_weight must be")
    check_raises(LF.kto_loss, logps, ref, desirable, kl=torch.zeros(2), match="kl of shape (2,) does not broadcast")
    check_raises(LF.kto_loss, logps, ref[:2], desirable, match="ref_logps shape (2,) must equal logps shape (3,)")


# ---- Modules -------------------------------------------------------------------------------------------


def test_modules_call_their_functions():
    g = torch.Generator().manual_seed(40)
    c, r, rc, rr = (-(torch.rand(4, generator=g, dtype=torch.float64) * 3) for _ in range(4))
    desirable = torch.tensor([True, False, True, False])
    pairs = [
        (LN.DPOLoss(beta=0.3, loss_type="robust", label_smoothing=0.1, reduction="sum"), (c, r, rc, rr),
         lambda: LF.dpo_loss(c, r, rc, rr, beta=0.3, loss_type="robust", label_smoothing=0.1, reduction="sum")),
        (LN.SimPOLoss(beta=2.0, gamma=0.4), (c, r), lambda: LF.simpo_loss(c, r, beta=2.0, gamma=0.4)),
        (LN.CPOLoss(beta=0.2, reduction="none"), (c, r), lambda: LF.cpo_loss(c, r, beta=0.2, reduction="none")),
        (LN.ORPOLoss(beta=0.3), (c, r), lambda: LF.orpo_loss(c, r, beta=0.3)),
        (LN.KTOLoss(beta=0.4, undesirable_weight=1.5), (c, rc, desirable),
         lambda: LF.kto_loss(c, rc, desirable, beta=0.4, undesirable_weight=1.5)),
    ]
    for module, args, want in pairs:
        torch.testing.assert_close(module(*args), want())
        assert repr(module).startswith(type(module).__name__)
    check_raises(LN.DPOLoss, loss_type="nope", match="loss_type must be one of")
