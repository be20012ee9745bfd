"""grpo_loss against TRL 1.16's own ``GRPOTrainer._compute_loss`` (called unbound, with a
stand-in ``self`` carrying the config fields and returning the given per-token log-probs in
place of the model's) and Liger-Kernel 0.8.5's ``ppo_loss_fn``, over loss types, importance
sampling levels, the KL term, dtypes; then the global token count, edge cases and bad input."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction
from trl.trainer.grpo_trainer import GRPOTrainer

import losskit.functional as LF
import losskit.nn as LN
from compare import check_against_torch, check_raises
from losskit.functional.policy import GRPO_LOSS_TYPES

B, T = 4, 7
FLOATS = [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2)]


def _batch(dtype=torch.float64, seed=0, token_advantages=False):
    """log_probs (with gradient), old and reference log-probs off by up to +-0.4 (so that some
    ratios are clipped), advantages and a mask of completions of lengths 7, 3, 5, 1."""
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 3 + 0.01)
    old = lp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.8
    ref = lp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.8
    shape = (B, T) if token_advantages else (B,)
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = (torch.arange(T) < torch.tensor([7, 3, 5, 1])[:, None]).long()
    return lp.to(dtype).requires_grad_(), old.to(dtype), ref.to(dtype), adv.to(dtype), mask


def trl_grpo(lp, old, ref, adv, mask, *, beta, loss_type, level="token", epsilon_low=0.2, epsilon_high=0.2,
             delta=None, max_completion_length=None, num_items=None, use_bias_correction_kl=True, tau_pos=1.0,
             tau_neg=1.05):
    """TRL 1.16's GRPOTrainer._compute_loss in one process without accumulation (num_processes
    = gradient accumulation steps = steps per generation = 1)."""
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=use_bias_correction_kl, delta=delta, steps_per_generation=1,
                             sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg),
    )
    n = lp.shape[0]
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": torch.zeros_like(mask), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum() if num_items is None else torch.tensor(num_items)}
    return GRPOTrainer._compute_loss(stand_in, None, inputs)


def _options(loss_type):
    """Per-loss-type options as TRL would be configured."""
    if loss_type == "dr_grpo":
        return {"max_completion_length": T}
    if loss_type == "cispo":
        return {"epsilon_high": 1.1}  # the ratio cap: low enough that some ratios hit it
    return {}


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta, bias_correction", [(0.0, True), (0.04, True), (1.0, False)])
@pytest.mark.parametrize("dtype, atol, rtol", FLOATS, ids=["f64", "f32", "bf16"])
def test_grpo_matches_trl(loss_type, level, beta, bias_correction, dtype, atol, rtol):
    lp, old, ref, adv, mask = _batch(dtype)
    opts = _options(loss_type)
    # TRL picks SAPO's temperatures with torch.where on Python floats, which rounds them to
    # float32: 1.25 is exact there, TRL's default 1.05 is not.
    ours_sapo, trl_sapo = ({"sapo_temperature_neg": 1.25}, {"tau_neg": 1.25}) if loss_type == "sapo" else ({}, {})
    check_against_torch(
        lambda x, a: LF.grpo_loss(x, old, a, mask, ref_log_probs=ref, beta=beta, loss_type=loss_type,
                                  importance_sampling_level=level, use_bias_correction_kl=bias_correction, **opts,
                                  **ours_sapo),
        lambda x, a: trl_grpo(x, old.to(x.dtype), ref.to(x.dtype), a, mask, beta=beta, loss_type=loss_type, level=level,
                              use_bias_correction_kl=bias_correction, **opts, **trl_sapo).to(x.dtype),
        # (TRL's normalisers are float32 tensors: its loss of bfloat16 log-probs comes out in float32.)
        lp, adv, atol=atol, rtol=rtol)


@pytest.mark.parametrize("loss_type, extra", [
    ("dapo", {"num_items": 41}), ("cispo", {"num_items": 41, "epsilon_high": 5.0}),
    ("dr_grpo", {"max_completion_length": 12}),
    ("grpo", {"delta": 1.25, "epsilon_high": 0.28}), ("bnpo", {"epsilon_low": 0.1}), ("sapo", {}),
    ("luspo", {"delta": 1.3}),
])
def test_grpo_options_and_token_advantages_match_trl(loss_type, extra):
    lp, old, ref, adv, mask = _batch(seed=1, token_advantages=True)
    trl_extra = dict(extra)
    if loss_type == "sapo":
        trl_extra = {"tau_pos": 0.75, "tau_neg": 1.5}  # exact in float32, as TRL's are (see above)
        extra = {"sapo_temperature_pos": 0.75, "sapo_temperature_neg": 1.5}
    check_against_torch(
        lambda x: LF.grpo_loss(x, old, adv, mask, ref_log_probs=ref, beta=0.1, loss_type=loss_type, **extra),
        lambda x: trl_grpo(x, old, ref, adv, mask, beta=0.1, loss_type=loss_type, **trl_extra),
        lp, atol=1e-10, rtol=1e-10)


def test_on_policy_old_log_probs_none_is_trls_detached_copy():
    lp, _, ref, adv, mask = _batch(seed=2)
    check_against_torch(
        lambda x: LF.grpo_loss(x, None, adv, mask, ref_log_probs=ref),
        lambda x: trl_grpo(x, x.detach(), ref, adv, mask, beta=0.04, loss_type="dapo"),
        lp, atol=1e-10, rtol=1e-10)


def liger_grpo(lp, old, ref, adv, mask, *, beta, loss_type, level="token", **options):
    return LigerFusedLinearGRPOFunction.ppo_loss_fn(
        lp, mask, adv, mask, ref_per_token_logps=ref, old_per_token_logps=old, beta=beta, loss_type=loss_type,
        importance_sampling_level=level, **options)[0]


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_grpo_matches_liger_ppo_loss_fn(loss_type, level, bias_correction):
    if level == "sequence" and loss_type in ("cispo", "sapo"):
        pytest.skip("Liger refuses sequence-level importance sampling for cispo and sapo (TRL's cases cover it)")
    if level == "token" and loss_type == "luspo":
        pytest.skip("Liger 0.8.5's token-level luspo is TRL's older formula: see the differences test")
    lp, old, ref, adv, mask = _batch(seed=3)
    # luspo with a KL term is per token even at sequence level, where Liger's older form differs.
    beta = 0.0 if loss_type == "luspo" else 0.3
    opts = dict(_options(loss_type), **({"num_items": 33} if loss_type in ("dapo", "cispo") else {}))
    liger_opts = {("num_items_in_batch" if k == "num_items" else k): v for k, v in opts.items()}
    liger_opts.setdefault("epsilon_high", 0.2)
    check_against_torch(
        lambda x: LF.grpo_loss(x, old, adv, mask, ref_log_probs=ref, beta=beta, loss_type=loss_type,
                               importance_sampling_level=level, use_bias_correction_kl=bias_correction, **opts),
        lambda x: liger_grpo(x, old, ref, adv, mask, beta=beta, loss_type=loss_type, level=level,
                             use_bias_correction_kl=bias_correction, **liger_opts),
        lp, atol=1e-10, rtol=1e-10)


def test_differences_token_level_luspo_follows_trl_not_liger():
    """README differences: luspo with token-level ratios (or a KL term) is TRL 1.16's
    sum over each sequence's tokens, averaged over sequences; Liger 0.8.5 weighs every
    position by its row's length and divides by B * T (TRL's older form)."""
    lp, old, ref, adv, mask = _batch(seed=4)
    ours = LF.grpo_loss(lp, old, adv, mask, ref_log_probs=ref, beta=0.0, loss_type="luspo")
    torch.testing.assert_close(ours, trl_grpo(lp, old, ref, adv, mask, beta=0.0, loss_type="luspo"))
    liger = liger_grpo(lp, old, ref, adv, mask, beta=0.0, loss_type="luspo")
    assert not torch.isclose(ours, liger)
    # At sequence level without KL every token of a row carries the same loss: the two agree.
    seq = LF.grpo_loss(lp, old, adv, mask, beta=0.0, loss_type="luspo", importance_sampling_level="sequence")
    torch.testing.assert_close(seq, liger_grpo(lp, old, ref, adv, mask, beta=0.0, loss_type="luspo", level="sequence"))


def test_differences_masked_inf_and_nan_log_probs_are_ignored():
    """README differences: masked positions never reach the loss; TRL and Liger multiply by the
    mask, and -inf or nan padding (0 * inf) turns their loss and gradient into nan."""
    lp, old, ref, adv, mask = _batch(seed=5)
    padded = lp.detach().clone()
    padded[1, 5], padded[3, 2] = -math.inf, math.nan  # both outside the mask
    padded.requires_grad_()
    ours = LF.grpo_loss(padded, old, adv, mask, ref_log_probs=ref, loss_type="bnpo")
    (g,) = torch.autograd.grad(ours, padded)
    clean = LF.grpo_loss(lp, old, adv, mask, ref_log_probs=ref, loss_type="bnpo")
    (g_clean,) = torch.autograd.grad(clean, lp)
    torch.testing.assert_close(ours, clean)
    torch.testing.assert_close(g, g_clean)
    assert (g[mask == 0] == 0).all()
    assert trl_grpo(padded, old, ref, adv, mask, beta=0.04, loss_type="bnpo").isnan()
    assert liger_grpo(padded, old, ref, adv, mask, beta=0.04, loss_type="bnpo").isnan()


def _microbatches():
    """Two ranks x two accumulation steps of completions with very different lengths."""
    out = []
    for seed, lengths in enumerate([[7, 7], [1, 2], [6, 5], [1, 1]]):
        g = torch.Generator().manual_seed(seed + 10)
        lp = -(torch.rand(2, T, generator=g, dtype=torch.float64) * 3)
        old = lp + (torch.rand(2, T, generator=g, dtype=torch.float64) - 0.5) * 0.5
        adv = torch.randn(2, generator=g, dtype=torch.float64)
        mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
        out.append((lp.requires_grad_(), old, adv, mask))
    return out


def test_num_items_makes_micro_batches_add_up_to_the_global_token_mean():
    parts = _microbatches()
    num_items = sum(int(m.sum()) for *_, m in parts)  # all ranks, all accumulation steps
    summed = sum(LF.grpo_loss(lp, old, adv, m, beta=0.0, num_items=num_items) for lp, old, adv, m in parts)
    # The whole optimiser step as one batch, normalised by its own token count: the global mean.
    lp, old, adv, m = (torch.cat(t) for t in zip(*parts))
    whole = LF.grpo_loss(lp, old, adv, m, beta=0.0, loss_type="bnpo")
    torch.testing.assert_close(summed, whole)
    grads = torch.autograd.grad(summed, [p[0] for p in parts])
    torch.testing.assert_close(torch.cat(grads), torch.autograd.grad(whole, lp)[0])
    # The slip (torchtune #1875, torchtitan #2206): each micro-batch divided by its own token count.
    local = sum(LF.grpo_loss(lp, old, adv, m, beta=0.0) for lp, old, adv, m in parts) / len(parts)
    assert not torch.isclose(local, whole)
    # A 0-d tensor count (an all-reduced one) is the same as the int.
    as_tensor = LF.grpo_loss(*parts[0][:3], parts[0][3], beta=0.0, num_items=torch.tensor(num_items))
    torch.testing.assert_close(as_tensor, LF.grpo_loss(*parts[0][:3], parts[0][3], beta=0.0, num_items=num_items))


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_gradcheck(loss_type, level):
    lp, old, ref, adv, mask = _batch(seed=6)
    opts = _options(loss_type)
    if loss_type == "cispo":
        # CISPO stops the gradient through its clipped weight, so finite differences (which see
        # the weight move) agree with autograd only where every weight sits at the cap:
        # ratios here are at least exp(-0.4) > 0.5.
        opts = {"epsilon_high": 0.5}
    assert torch.autograd.gradcheck(
        lambda x: LF.grpo_loss(x, old, adv, mask, ref_log_probs=ref, beta=0.2, loss_type=loss_type,
                               importance_sampling_level=level, **opts), (lp,))


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_grpo_edge_cases(loss_type):
    lp, old, ref, adv, mask = _batch(seed=7)
    opts = _options(loss_type)
    none = torch.zeros_like(mask)
    loss = LF.grpo_loss(lp, old, adv, none, ref_log_probs=ref, loss_type=loss_type, **opts)
    (g,) = torch.autograd.grad(loss, lp)
    assert loss == 0 and (g == 0).all()  # no token counts: 0 (the normalisers are clamped at 1), as TRL
    torch.testing.assert_close(loss, trl_grpo(lp, old, ref, adv, none, beta=0.04, loss_type=loss_type, **opts))
    # An empty completion among others, and an empty batch.
    mask = mask.clone()
    mask[2] = 0
    torch.testing.assert_close(LF.grpo_loss(lp, old, adv, mask, ref_log_probs=ref, loss_type=loss_type, **opts),
                               trl_grpo(lp, old, ref, adv, mask, beta=0.04, loss_type=loss_type, **opts))
    empty = torch.zeros(0, T, dtype=torch.float64)
    out = LF.grpo_loss(empty, empty, torch.zeros(0, dtype=torch.float64), empty.long(), beta=0.0, loss_type=loss_type,
                       **opts)
    assert out.shape == () and (out.isnan() if loss_type in ("grpo", "sapo", "luspo", "dr_grpo") else out == 0)


def test_grpo_without_reference_and_at_beta_one():
    lp, old, ref, adv, mask = _batch(seed=8)
    with_ref_unused = LF.grpo_loss(lp, old, adv, mask, ref_log_probs=ref, beta=0.0)
    torch.testing.assert_close(with_ref_unused, LF.grpo_loss(lp, old, adv, mask, beta=0.0))
    # The KL term alone, on-policy (ratios of 1, advantages of 0): the masked mean of k3.
    zero = torch.zeros(B, dtype=torch.float64)
    kl_only = LF.grpo_loss(lp, None, zero, mask, ref_log_probs=ref, beta=1.0, loss_type="bnpo")
    d = (ref - lp).detach()
    k3 = (d.exp() - d - 1)[mask.bool()].mean()
    torch.testing.assert_close(kl_only, k3)
    assert torch.autograd.grad(kl_only, lp)[0].abs().sum() > 0
    refs = ref.clone().requires_grad_()
    assert torch.autograd.grad(LF.grpo_loss(lp, None, adv, mask, ref_log_probs=refs, beta=1.0), refs,
                               allow_unused=True)[0] is None  # the reference is a constant


def test_grpo_bad_input():
    lp, old, ref, adv, mask = _batch()
    f = LF.grpo_loss
    check_raises(f, lp, old, adv, mask, match="ref_log_probs is required when beta != 0")
    check_raises(f, lp, old, adv, mask, beta=0.0, loss_type="ppo", match="loss_type must be one of")
    check_raises(f, lp, old, adv, mask, beta=0.0, importance_sampling_level="token_mean",
                 match="importance_sampling_level must be 'token' or 'sequence'")
    check_raises(f, lp, old, adv, mask, beta=-1.0, match="beta must be a finite number >= 0")
    check_raises(f, lp, old, adv, mask, beta=0.0, epsilon_low=-0.1, match="epsilon_low must be")
    check_raises(f, lp, old, adv, mask, beta=0.0, loss_type="bnpo", num_items=10,
                 match="num_items (the global token count) is the normaliser of loss_type 'dapo' and 'cispo' only")
    check_raises(f, lp, old, adv, mask, beta=0.0, num_items=-3, match="num_items must be a count >= 0")
    check_raises(f, lp, old, adv, mask, beta=0.0, num_items=torch.tensor([3]),
                 match="num_items must be a number or a 0-d")
    check_raises(f, lp, old, adv, mask, beta=0.0, max_completion_length=8,
                 match="max_completion_length is the normaliser of loss_type='dr_grpo' only")
    check_raises(f, lp, old, adv, mask, beta=0.0, loss_type="dr_grpo", max_completion_length=0,
                 match="max_completion_length must be a positive int")
    check_raises(f, lp, old, adv, mask, beta=0.0, loss_type="cispo", delta=2.0, match="delta bounds the ratio")
    check_raises(f, lp, old, adv, mask, beta=0.0, sapo_temperature_neg=0.0, match="sapo_temperature_neg must be")
    check_raises(f, lp[0], old[0], adv, mask[0], beta=0.0, match="log_probs must be [batch, tokens]")
    check_raises(f, lp, old[:, :3], adv, mask, beta=0.0, match="old_log_probs shape (4, 3) must equal log_probs shape")
    check_raises(f, lp, old, adv[:2], mask, beta=0.0, match="advantages must be [batch] (4,) or [batch, tokens]")
    check_raises(f, lp, old, adv, mask[:, :2], beta=0.0, match="mask shape (4, 2) must equal log_probs shape")
    check_raises(f, lp.long(), old, adv, mask, beta=0.0, error=TypeError, match="log_probs must be a floating-point")


def test_module_and_compiled_fullgraph():
    lp, old, ref, adv, mask = _batch(seed=9)
    module = LN.GRPOLoss(beta=0.1, loss_type="cispo", epsilon_high=3.0)
    torch.testing.assert_close(module(lp, old, adv, mask, ref, num_items=20),
                               LF.grpo_loss(lp, old, adv, mask, ref_log_probs=ref, beta=0.1, loss_type="cispo",
                                            epsilon_high=3.0, num_items=20))
    assert "cispo" in repr(module)
    check_raises(LN.GRPOLoss, loss_type="dapo", delta=-1.0, match="GRPOLoss: delta must be")
    for loss_type in GRPO_LOSS_TYPES:
        torch._dynamo.reset()
        fn = torch.compile(lambda *a, lt=loss_type: LF.grpo_loss(*a[:4], ref_log_probs=a[4], loss_type=lt,
                                                                num_items=a[5] if lt in ("dapo", "cispo") else None),
                           fullgraph=True, backend="aot_eager")
        num = torch.tensor(17.0, dtype=torch.float64)
        torch.testing.assert_close(fn(lp, old, adv, mask.bool(), ref, num),
                                   LF.grpo_loss(lp, old, adv, mask.bool(), ref_log_probs=ref, loss_type=loss_type,
                                                num_items=num if loss_type in ("dapo", "cispo") else None))
