"""Catalog: fine-tuning language models (preference optimisation and policy gradients on
log-probs). For each loss, its example, mistakes and curve as functions, then its Entry;
nothing runs at import (see :mod:`losskit.catalog.records`)."""

from __future__ import annotations

import torch

import losskit.functional as F

from .records import REDUCTION, Curve, Entry, Mistake

_SEQUENCE = "sequence log-probs of the policy (one per completion)"


# ---- DPO ------------------------------------------------------------------------------------------
def dpo_example():
    chosen, rejected = torch.tensor([-12.0, -9.0]), torch.tensor([-15.0, -8.0])  # summed over tokens
    ref_chosen, ref_rejected = torch.tensor([-13.0, -9.5]), torch.tensor([-14.0, -8.5])  # frozen reference
    return F.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)  # margins 2 and 0


def dpo_mistake_reference_with_gradient():
    # Step 0: the policy is its own reference (the adapter is off), computed without torch.no_grad().
    chosen = torch.tensor([-12.0], requires_grad=True)
    rejected = torch.tensor([-15.0], requires_grad=True)
    ref_chosen, ref_rejected = chosen * 1.0, rejected * 1.0  # same graph: not constants
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    hand_written = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
    right = F.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)  # detaches the reference
    return {
        'd loss / d chosen (hand-written, reference not detached)': torch.autograd.grad(hand_written, chosen)[0].item(),
        'd loss / d chosen (reference constant)': torch.autograd.grad(right, chosen)[0].item(),
    }


def dpo_mistake_means():
    # Two tokens of the chosen and twelve of the rejected completion, with their log-probs:
    chosen, rejected = torch.tensor([[-1.0, -1.0]]), torch.tensor([[-0.8] * 12])
    ref_chosen, ref_rejected = torch.tensor([[-1.2, -1.2]]), torch.tensor([[-0.85] * 12])
    return {
        'sums (DPO)': F.dpo_loss(chosen.sum(1), rejected.sum(1), ref_chosen.sum(1), ref_rejected.sum(1)).item(),
        'per-token means': F.dpo_loss(chosen.mean(1), rejected.mean(1), ref_chosen.mean(1),
                                      ref_rejected.mean(1)).item(),
    }


def dpo_curve(x, loss_type='sigmoid'):
    # x is the margin h: the chosen log-ratio minus the rejected one (reference-free, rejected at 0)
    return F.dpo_loss(x, torch.zeros_like(x), beta=1.0, loss_type=loss_type, reduction='none')


DPO = Entry(
    key="dpo", title="Direct preference optimisation (DPO and variants)", family="posttraining",
    problems=("preference tuning of language models", "RLHF without a reward model"),
    covers=("functional.dpo_loss", "nn.DPOLoss"), torch=(), keras=(),
    aliases=("direct_preference_optimization", "ipo", "rdpo", "cdpo", "apo", "discopop", "exo", "nca", "bco_pair",
             "sppo"),
    prediction=_SEQUENCE + ", chosen and rejected, summed over tokens (IPO: per-token means)",
    target="the reference model's log-probs of the same completions (constants), or none",
    output_layer="log_softmax, gathered at the completion's tokens and summed (linear_log_probs)",
    formula=r"\ell = -\log\sigma\Bigl(\beta\bigl[(\log\pi(y_w) - \log\pi_\text{ref}(y_w)) - "
            r"(\log\pi(y_l) - \log\pi_\text{ref}(y_l))\bigr]\Bigr)",
    formula_text="-log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))), "
                 "log-probs summed over the completion's tokens",
    summary="Fits the policy to pairwise preferences directly: the implicit reward of a completion is beta times "
            "its log-ratio to a frozen reference model, and the loss is the logistic loss of the chosen minus the "
            "rejected reward. loss_type selects TRL's variants (hinge, ipo, robust, exo_pair, nca_pair, bco_pair, "
            "sppo_hard, apo_zero, apo_down, discopop); with no reference the log-ratios are the log-probs.",
    properties={"convex": "in the margin, for sigmoid, hinge, ipo (not in the model's weights)",
                "bounded": "below by 0 for most types; sigmoid is unbounded above as the margin falls",
                "robust to outliers": "no; 'robust' (flipped-label rate) and label_smoothing (cDPO) soften it"},
    options={"beta": "strength of the implicit KL penalty (0.1); IPO's tau", "loss_type": "sigmoid (DPO), hinge, "
             "ipo, robust, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop",
             "label_smoothing": "conservative DPO (sigmoid), rDPO's flip rate (robust), EXO's epsilon",
             "reduction": REDUCTION.replace("element", "pair")},
    example=dpo_example,
    mistakes=(
        Mistake("Letting gradients flow through the reference log-probs",
                "The reference model is frozen: its log-probs are constants. Computed with gradient (no torch.no_grad, "
                "or the policy itself with its adapter off), a hand-written loss sends the gradient through both "
                "sides: at the first step, where policy and reference are one model, it is exactly 0 and nothing "
                "trains. losskit detaches the reference.",
                dpo_mistake_reference_with_gradient),
        Mistake("Per-token means where DPO sums",
                "DPO's log-probs are sums over the completion's tokens (TRL's); means shrink every log-ratio by the "
                "length, so beta means something else and pairs of different lengths weigh differently.",
                dpo_mistake_means),
    ),
    curve=Curve(dpo_curve, "margin h (chosen minus rejected log-ratio), beta = 1", (-4.0, 4.0),
                ({'loss_type': 'sigmoid'}, {'loss_type': 'hinge'}, {'loss_type': 'ipo'}), x_symbol="h"),
)


# ---- SimPO ----------------------------------------------------------------------------------------
def simpo_example():
    return F.simpo_loss(torch.tensor([-0.8]), torch.tensor([-1.4]), beta=2.0, gamma=1.0)  # per-token means


def simpo_mistake_sums():
    # A long, good chosen answer (30 tokens at -0.5) against a short, worse rejected one (4 tokens at -0.9):
    chosen, rejected = torch.full((1, 30), -0.5), torch.full((1, 4), -0.9)
    return {
        'per-token means (SimPO)': F.simpo_loss(chosen.mean(1), rejected.mean(1), beta=2.0, gamma=1.0).item(),
        'sums': F.simpo_loss(chosen.sum(1), rejected.sum(1), beta=2.0, gamma=1.0).item(),
    }


def simpo_curve(x, gamma=1.0):
    # x is the difference of the per-token mean log-probs, chosen minus rejected
    return F.simpo_loss(x, torch.zeros_like(x), beta=2.0, gamma=gamma, reduction='none')


SIMPO = Entry(
    key="simpo", title="Simple preference optimisation (SimPO)", family="posttraining",
    problems=("preference tuning of language models without a reference model",),
    covers=("functional.simpo_loss", "nn.SimPOLoss"), torch=(), keras=(),
    aliases=("simple_preference_optimization",),
    prediction=_SEQUENCE + ", chosen and rejected, averaged over tokens",
    target="none (reference-free): the preference is which completion is chosen",
    output_layer="log_softmax, gathered at the completion's tokens and averaged",
    formula=r"\ell = -\log\sigma\Bigl(\frac{\beta}{|y_w|}\log\pi(y_w) - \frac{\beta}{|y_l|}\log\pi(y_l) - \gamma\Bigr)",
    formula_text="-log sigmoid(beta * (mean log pi(y_w) - mean log pi(y_l)) - gamma), means over each "
                 "completion's tokens",
    summary="A reference-free margin loss whose reward is the length-normalised log-probability: no reference "
            "model to run, and no reward for sheer length.",
    properties={"convex": "in the margin", "bounded": "below by 0", "robust to outliers": "no"},
    options={"beta": "reward scale (the paper: 2 to 2.5)", "gamma": "target reward margin (the paper: 0.5 to 1.5)",
             "label_smoothing": "assumed flipped-label rate", "reduction": REDUCTION.replace("element", "pair")},
    example=simpo_example,
    mistakes=(
        Mistake("Summing where SimPO averages",
                "SimPO's reward is the per-token mean log-prob. Summed log-probs of a long chosen answer are far "
                "below those of a short rejected one, so the loss pushes the right answer down and rewards "
                "brevity.",
                simpo_mistake_sums),
    ),
    curve=Curve(simpo_curve, "difference of mean log-probs (chosen - rejected), beta = 2", (-2.0, 2.0),
                ({'gamma': 0.0}, {'gamma': 1.0}), x_symbol="d"),
)


# ---- CPO ------------------------------------------------------------------------------------------
def cpo_example():
    return F.cpo_loss(torch.tensor([-20.0]), torch.tensor([-26.0]), beta=0.1)  # summed log-probs


def cpo_mistake_no_nll():
    chosen, rejected = torch.tensor([-20.0]), torch.tensor([-26.0])
    nll = -chosen / 10  # the chosen completion's negative log-likelihood per token (10 tokens)
    return {
        'preference term alone': F.cpo_loss(chosen, rejected, beta=0.1).item(),
        'CPO objective (preference + NLL)': (F.cpo_loss(chosen, rejected, beta=0.1) + nll).item(),
    }



def cpo_curve(x, label_smoothing=0.0):
    # x is the difference of the summed log-probs, chosen minus rejected
    return F.cpo_loss(x, torch.zeros_like(x), beta=1.0, label_smoothing=label_smoothing, reduction='none')


CPO = Entry(
    key="cpo", title="Contrastive preference optimisation (CPO)", family="posttraining",
    problems=("preference tuning without a reference model", "machine translation"),
    covers=("functional.cpo_loss", "nn.CPOLoss"), torch=(), keras=(), aliases=("contrastive_preference_optimization",),
    prediction=_SEQUENCE + ", chosen and rejected, summed over tokens",
    target="none (reference-free)", output_layer="log_softmax, gathered and summed (linear_log_probs)",
    formula=r"\ell = -\log\sigma\bigl(\beta(\log\pi(y_w) - \log\pi(y_l))\bigr) \;[+\; \mathrm{NLL}(y_w)]",
    formula_text="-log sigmoid(beta * (log pi(y_w) - log pi(y_l))), plus the chosen NLL (yours to add)",
    summary="DPO with the reference model dropped (a uniform prior), kept near the data by the chosen "
            "completions' likelihood; this function is the preference term.",
    properties={"convex": "in the margin", "bounded": "below by 0", "robust to outliers": "no"},
    options={"beta": "temperature (0.1)", "label_smoothing": "assumed flipped-label rate",
             "reduction": REDUCTION.replace("element", "pair")},
    example=cpo_example,
    mistakes=(
        Mistake("Leaving out the NLL term",
                "CPO is the preference term plus the negative log-likelihood of the chosen completions (TRL's "
                "cpo_alpha weighs it). Without it nothing anchors the policy to the data; add "
                "linear_cross_entropy of the chosen tokens.",
                cpo_mistake_no_nll),
    ),
    curve=Curve(cpo_curve, "log-prob difference (chosen - rejected), beta = 1", (-4.0, 4.0),
                ({'label_smoothing': 0.0}, {'label_smoothing': 0.2}), x_symbol="d"),
)


# ---- ORPO -----------------------------------------------------------------------------------------
def orpo_example():
    return F.orpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), beta=0.1)  # per-token means


def orpo_mistake_sums():
    chosen, rejected = torch.full((1, 20), -0.5), torch.full((1, 20), -0.6)  # 20 tokens each
    return {
        'per-token means (ORPO)': F.orpo_loss(chosen.mean(1), rejected.mean(1), beta=1.0).item(),
        'sums': F.orpo_loss(chosen.sum(1), rejected.sum(1), beta=1.0).item(),
    }



def orpo_curve(x, beta=0.1):
    # x is the chosen completion's mean log-prob; the rejected one's is fixed at -1
    return F.orpo_loss(x, torch.full_like(x, -1.0), beta=beta, reduction='none')


ORPO = Entry(
    key="orpo", title="Odds-ratio preference optimisation (ORPO)", family="posttraining",
    problems=("supervised fine-tuning and preference tuning in one stage",),
    covers=("functional.orpo_loss", "nn.ORPOLoss"), torch=(), keras=(), aliases=("odds_ratio_preference",),
    prediction=_SEQUENCE + ", chosen and rejected, averaged over tokens (each < 0)",
    target="none (reference-free)", output_layer="log_softmax, gathered and averaged",
    formula=r"\mathcal{L}_\text{OR} = -\beta\log\sigma\Bigl(\log\frac{\mathrm{odds}(y_w)}{\mathrm{odds}(y_l)}\Bigr),"
            r"\quad \mathrm{odds}(y) = \frac{P(y)}{1 - P(y)},\ \log P(y) = \overline{\log\pi}(y)",
    formula_text="-beta * log sigmoid(log odds(y_w) - log odds(y_l)), odds = P / (1 - P), log P the per-token "
                 "mean log-prob; plus the chosen NLL (yours to add)",
    summary="An odds-ratio penalty added to supervised fine-tuning's NLL, so that one stage both imitates the "
            "chosen answers and pushes the rejected ones down; no reference model.",
    properties={"convex": "no", "bounded": "below by 0", "robust to outliers": "no"},
    options={"beta": "weight of the odds-ratio term (the paper's lambda, 0.1)",
             "reduction": REDUCTION.replace("element", "pair")},
    example=orpo_example,
    mistakes=(
        Mistake("Summing where ORPO averages",
                "ORPO's probability is the per-token mean's exponential. With sums P(y) is tiny for any long "
                "completion, odds equal P and the term collapses to a ratio of sequence probabilities, with a "
                "different scale and gradient.",
                orpo_mistake_sums),
    ),
    curve=Curve(orpo_curve, "mean log-prob of the chosen completion (rejected: -1)", (-3.0, -0.05),
                ({'beta': 0.1}, {'beta': 1.0}), x_symbol="c"),
)


# ---- KTO ------------------------------------------------------------------------------------------
def kto_example():
    logps, ref = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.0])  # summed over tokens
    return F.kto_loss(logps, ref, torch.tensor([True, False]), beta=1.0, kl=0.0)


def kto_mistake_imbalance():
    logps, ref = torch.tensor([-10.0, -12.0, -12.5, -13.0]), torch.tensor([-10.5, -11.0, -11.0, -11.0])
    desirable = torch.tensor([True, False, False, False])  # 1 desirable, 3 undesirable
    each = F.kto_loss(logps, ref, desirable, beta=0.5, reduction='none')
    balanced = F.kto_loss(logps, ref, desirable, beta=0.5, desirable_weight=3.0, reduction='none')
    return {
        'share of the loss from desirable (weights 1, 1)': (each[desirable].sum() / each.sum()).item(),
        'share from desirable (desirable_weight = 3)': (balanced[desirable].sum() / balanced.sum()).item(),
    }



def kto_curve(x, desirable=True):
    # x is the completion's log-ratio to the reference (log pi - log ref), the KL baseline at 0
    flags = torch.full(x.shape, desirable, dtype=torch.bool)
    return F.kto_loss(x, torch.zeros_like(x), flags, beta=1.0, kl=0.0, reduction='none')


KTO = Entry(
    key="kto", title="Kahneman-Tversky optimisation (KTO)", family="posttraining",
    problems=("alignment from thumbs-up / thumbs-down labels, no pairs",),
    covers=("functional.kto_loss", "nn.KTOLoss"), torch=(), keras=(), aliases=("kahneman_tversky",),
    prediction=_SEQUENCE + ", summed over tokens, each labelled desirable or not",
    target="reference log-probs (constants), a desirable flag per completion, the batch's KL estimate",
    output_layer="log_softmax, gathered and summed (linear_log_probs)",
    formula=r"\ell = \begin{cases}\lambda_D\bigl(1 - \sigma(\beta(r - z_0))\bigr) & \text{desirable}\\ "
            r"\lambda_U\bigl(1 - \sigma(\beta(z_0 - r))\bigr) & \text{undesirable}\end{cases},\ "
            r"r = \log\pi(y) - \log\pi_\text{ref}(y)",
    formula_text="desirable: w_D (1 - sigmoid(beta (r - z0))); undesirable: w_U (1 - sigmoid(beta (z0 - r))); "
                 "r = log pi(y) - log ref(y), z0 = max(0, KL estimate)",
    summary="A prospect-theory value function on the implied reward: gains above the reference point z0 (the "
            "policy's KL to the reference) for desirable completions, losses for undesirable ones; unpaired data.",
    properties={"convex": "no (a sigmoid)", "bounded": "between 0 and the class weight",
                "robust to outliers": "yes (bounded, saturating)"},
    options={"beta": "0.1", "kl": "the KL estimate z0 (clamped at 0, detached)",
             "desirable_weight / undesirable_weight": "balance the classes (TRL: w_D n_D / (w_U n_U) in [1, 4/3])",
             "reduction": REDUCTION.replace("element", "example")},
    example=kto_example,
    mistakes=(
        Mistake("Unbalanced labels at the default weights",
                "The mean runs over every example, so the more frequent label dominates; the paper and TRL set the "
                "weights so that w_D n_D / (w_U n_U) lies in [1, 4/3].",
                kto_mistake_imbalance),
    ),
    curve=Curve(kto_curve, "log-ratio of the completion to the reference, beta = 1", (-4.0, 4.0),
                ({'desirable': True}, {'desirable': False}), x_symbol="r"),
)


# ---- GRPO -----------------------------------------------------------------------------------------
def grpo_example():
    log_probs = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.2, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the second completion has two tokens
    advantages = torch.tensor([1.0, -1.0])
    return F.grpo_loss(log_probs, None, advantages, mask, beta=0.0, loss_type='dapo')  # -(3 - 2) / 5 tokens


def grpo_mistake_local_mean():
    # One optimiser step, two micro-batches (or ranks): a long completion, then a short one.
    g = torch.Generator().manual_seed(0)
    batches = [(-torch.rand(1, 8, generator=g), torch.tensor([1.0]), torch.ones(1, 8)),
               (-torch.rand(1, 8, generator=g), torch.tensor([-1.0]), torch.tensor([[1.0, 1.0] + [0.0] * 6]))]
    num_items = sum(mask.sum() for _, _, mask in batches)  # 10 tokens in the whole step
    old = [lp + 0.1 for lp, _, _ in batches]  # off-policy, so the ratios are not all 1
    return {
        'global token mean (num_items = 10)': sum(
            F.grpo_loss(lp, o, a, m, beta=0.0, num_items=num_items) for (lp, a, m), o in zip(batches, old)).item(),
        'mean of local token means': (sum(
            F.grpo_loss(lp, o, a, m, beta=0.0) for (lp, a, m), o in zip(batches, old)) / 2).item(),
    }


def grpo_curve(x, advantage=1.0):
    # x is the ratio pi / pi_old of one token; one single-token completion per point
    old, mask = torch.zeros(1, 1, dtype=x.dtype), torch.ones(1, 1)
    a = torch.tensor([advantage], dtype=x.dtype)
    return torch.stack([F.grpo_loss(r.log().view(1, 1), old, a, mask, beta=0.0, loss_type='grpo') for r in x])


GRPO = Entry(
    key="grpo", title="Group relative policy optimisation (GRPO and variants)", family="posttraining",
    problems=("reinforcement learning of language models from rewards", "reasoning with verifiable rewards"),
    covers=("functional.grpo_loss", "nn.GRPOLoss"), torch=(), keras=(),
    aliases=("dapo", "dr_grpo", "bnpo", "gspo", "cispo", "sapo", "luspo", "group_relative_policy_optimization"),
    prediction="per-token log-probs of the sampled completions [batch, tokens], with gradient",
    target="the sampling policy's log-probs, advantages (group-normalised rewards), the completion mask, the "
           "reference log-probs for the KL term",
    output_layer="log_softmax, gathered at the sampled tokens (linear_log_probs)",
    formula=r"\mathcal{L} = \frac{1}{Z}\sum_{i,t} m_{it}\Bigl[-\min\bigl(\rho_{it}A_i,\ "
            r"\mathrm{clip}(\rho_{it}, 1-\epsilon_\text{low}, 1+\epsilon_\text{high})A_i\bigr) + \beta\,k_3\Bigr],\ "
            r"\rho_{it} = \frac{\pi_\theta}{\pi_\text{old}},\ k_3 = e^{\log\pi_\text{ref} - \log\pi_\theta} - "
            r"(\log\pi_\text{ref} - \log\pi_\theta) - 1",
    formula_text="sum over tokens that count of -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + "
                 "beta * k3, divided by Z: each sequence's length then the batch (grpo), this batch's tokens "
                 "(bnpo), batch * max length (dr_grpo), the global token count num_items (dapo, cispo), the batch "
                 "(luspo)",
    summary="PPO's clipped surrogate without a value model: advantages come from comparing each completion's reward "
            "with its group's. The loss types differ in the per-token term (clipped ratio, CISPO's clipped weight "
            "on the log-prob, SAPO's soft gate) and above all in the normaliser; dapo's is the token count of the "
            "whole optimiser step across ranks and accumulation steps (num_items).",
    properties={"convex": "no", "bounded": "by the clipped ratio times the advantages, plus the KL term",
                "robust to outliers": "clipping bounds each token's update; large advantages still dominate"},
    options={"loss_type": "grpo, bnpo, dr_grpo, dapo (default), cispo, sapo, luspo",
             "importance_sampling_level": "token (GRPO) or sequence (GSPO)", "beta": "KL coefficient (0.04)",
             "epsilon_low / epsilon_high": "clip range (DAPO: 0.2 / 0.28); cispo: the ratio cap",
             "num_items": "global token count across ranks and accumulation steps (dapo, cispo)",
             "max_completion_length": "dr_grpo's constant", "delta": "INTELLECT-2's upper bound of the ratio"},
    example=grpo_example,
    mistakes=(
        Mistake("A mean over the local batch where the global token count was meant",
                "Dividing each micro-batch (or rank) by its own token count and averaging them weighs the tokens "
                "of short micro-batches more, so the gradient depends on how the step was split (torchtune #1875, "
                "torchtitan #2206). Pass num_items, the token count of the whole step, and sum the micro-batches.",
                grpo_mistake_local_mean),
    ),
    curve=Curve(grpo_curve, "ratio pi / pi_old of one token (clip range 0.8 to 1.2)", (0.5, 1.6),
                ({'advantage': 1.0}, {'advantage': -1.0}), x_symbol="rho"),
)

ENTRIES = [DPO, SIMPO, CPO, ORPO, KTO, GRPO]
