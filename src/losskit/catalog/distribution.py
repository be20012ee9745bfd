"""Catalog: distributions and information. For each loss, its example, mistakes and curve
as functions, then its Entry; nothing runs at import (see :mod:`losskit.catalog.records`)."""

from __future__ import annotations

import torch

import losskit.functional as F
import losskit.info as info

from .records import Curve, Entry, Mistake


# ---- Kullback-Leibler -----------------------------------------------------------------------
def kl_div_example():
    return F.kl_div(torch.tensor([[0.25, 0.75]]).log(), torch.tensor([[0.5, 0.5]]), reduction='batchmean')


def kl_div_mistake_mean():
    p, q = torch.tensor([[0.25, 0.75]]).log(), torch.tensor([[0.5, 0.5]])
    return {
        'mean': F.kl_div(p, q, reduction='mean').item(),
        'batchmean': F.kl_div(p, q, reduction='batchmean').item(),
    }


def kl_div_mistake_probabilities():
    p, q = torch.tensor([[0.25, 0.75]]), torch.tensor([[0.5, 0.5]])
    return {
        'log p (right)': F.kl_div(p.log(), q, reduction='batchmean').item(),
        'p (wrong)': F.kl_div(p, q, reduction='batchmean').item(),
    }


def kl_div_curve(x):
    p = torch.stack([x, 1 - x], 1)  # x is p_0, the probability of class 0
    q = x.new_tensor([[0.5, 0.5]]).expand(len(x), 2)
    return F.kl_div(p.log(), q, reduction='none').sum(1)


KL_DIV = Entry(
    key="kl_div", title="Kullback-Leibler divergence", family="distribution",
    problems=("distillation", "variational inference", "matching distributions"),
    covers=("functional.kl_div", "nn.KLDivLoss", "keras.kl_divergence", "keras.KLDivergence", "info.kl_divergence"),
    torch=("torch.nn.KLDivLoss",), keras=("keras.losses.KLDivergence",), aliases=("kl", "kld", "kl_divergence"),
    prediction="log-probabilities (torch's KLDivLoss); probabilities (Keras, losskit.info)",
    target="probabilities (or log-probabilities with log_target=True)", output_layer="log_softmax",
    formula=r"\mathrm{KL}(q \,\|\, p) = \sum_c q_c (\log q_c - \log p_c)", formula_text="sum_c q_c (log q_c - log p_c)",
    summary="How many extra nats coding q with p costs. Zero iff p = q.",
    properties={"convex": "yes", "bounded": "no", "robust to outliers": "no (inf where p = 0 < q)"},
    options={"reduction": "'batchmean' is the true KL per sample; 'mean' divides by every element (torch's "
                          "default, rarely what is meant)", "log_target": "target given as log-probabilities"},
    example=kl_div_example,
    mistakes=(
        Mistake("reduction='mean' for a KL divergence",
                "'mean' divides by the number of classes too; 'batchmean' gives the KL per sample.",
                kl_div_mistake_mean),
        Mistake("Probabilities where log-probabilities are wanted",
                "torch's KLDivLoss takes log p as input; p itself gives a wrong (even negative) value.",
                kl_div_mistake_probabilities),
    ),
    torch_vs_keras="Keras: kl_divergence(y_true, y_pred) on probabilities, target first; torch: "
                   "kl_div(log p, q), prediction first as log-probabilities.",
    curve=Curve(kl_div_curve, "p_0 (p = [p_0, 1 - p_0], q = [0.5, 0.5])", (0.01, 0.99),
                x_symbol="p_0"),
)


# ---- Jensen-Shannon -------------------------------------------------------------------------
def js_divergence_example():
    return F.js_divergence(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]), from_logits=True)


def js_divergence_mistake_ends():
    student, teacher = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 2.0]])  # logits

    def jsd(beta):
        return F.js_divergence(student, teacher, beta=beta, from_logits=True).item()

    return {
        'beta = 0: forward KL(p || q)': jsd(0.0),
        'beta = 0.001': jsd(0.001),
        'beta = 0.5': jsd(0.5),
        'beta = 0.999': jsd(0.999),
        'beta = 1: reverse KL(q || p)': jsd(1.0),
    }


def js_divergence_curve(x, beta=0.5):
    student = torch.stack([x, 1 - x], 1).log()  # q = [q_0, 1 - q_0], as log-probabilities
    teacher = x.new_tensor([[0.5, 0.5]]).log().expand(len(x), 2)
    return F.js_divergence(student, teacher, beta=beta, reduction='none')

JS_DIVERGENCE = Entry(
    key="js_divergence", title="Jensen-Shannon divergence", family="distribution", problems=("distillation",),
    covers=("functional.js_divergence", "nn.JSDivergenceLoss", "info.js_divergence"), torch=(), keras=(),
    aliases=("js", "jsd", "jensen_shannon"),
    prediction="student logits or log-probabilities (q)", target="teacher logits or log-probabilities (p)",
    output_layer="none (logits, from_logits=True)",
    formula=r"\mathrm{JS}_\beta = \begin{cases} \mathrm{KL}(p \,\|\, q) & \beta = 0 \\ "
            r"\beta\,\mathrm{KL}(p \,\|\, m) + (1 - \beta)\,\mathrm{KL}(q \,\|\, m),\; m = \beta p + (1 - \beta) q "
            r"& 0 < \beta < 1 \\ \mathrm{KL}(q \,\|\, p) & \beta = 1 \end{cases}",
    formula_text="beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, for 0 < beta < 1; "
                 "KL(p || q) at beta = 0, KL(q || p) at beta = 1 (p teacher, q student)",
    summary="The generalised Jensen-Shannon divergence of a student q from a teacher p: symmetric at beta = 1/2 "
            "(the JS divergence) and bounded for 0 < beta < 1. The family is discontinuous at its ends: beta = 0 "
            "and beta = 1 are defined as forward KL(p || q) and reverse KL(q || p), as Liger-Kernel and TRL do, "
            "while the mixture formula is about beta KL(p || q) near 0 and (1 - beta) KL(q || p) near 1, so it "
            "tends to 0 there.",
    properties={"convex": "yes, for each beta",
                "bounded": "for 0 < beta < 1, by the binary entropy of beta (ln 2 at beta = 1/2); at beta = 0 "
                           "or 1 it is a KL divergence, unbounded",
                "robust to outliers": "yes for 0 < beta < 1 (bounded); no at the ends"},
    options={"beta": "mixture weight in [0, 1]; exactly 0 or 1 switches to forward or reverse KL (a jump)",
             "from_logits": "inputs are logits", "labels / ignore_index": "skip rows",
             "reduction": "'batchmean' (default), 'sum', 'none'"},
    example=js_divergence_example,
    mistakes=(
        Mistake("A small beta as a soft forward KL",
                "beta = 0 is forward KL(p || q) by definition, but beta = 0.001 is not close to it: inside (0, 1) "
                "the divergence is about beta KL(p || q) near beta = 0 (and (1 - beta) KL(q || p) near 1), so it "
                "falls to 0 at both ends and jumps to the KL exactly there. To blend the two KL divergences, "
                "weigh them yourself.",
                js_divergence_mistake_ends),
    ),
    curve=Curve(js_divergence_curve, "q_0 (student q = [q_0, 1 - q_0], teacher p = [0.5, 0.5])", (0.01, 0.99),
                ({"beta": 0.1}, {"beta": 0.5}, {"beta": 0.9}), x_symbol="q_0"),
)


# ---- entropy --------------------------------------------------------------------------------
def entropy_example():
    return info.entropy(torch.full((6,), 1 / 6))  # a fair die: ln 6


def entropy_curve(x, base=2.718281828459045):
    return info.entropy(torch.stack([x, 1 - x], 1), dim=1, base=base)  # a coin with P(heads) = x

ENTROPY = Entry(
    key="entropy", title="Entropy and cross-entropy of distributions", family="distribution",
    problems=("information theory", "uncertainty"),
    covers=("info.entropy", "info.cross_entropy"), torch=(), keras=(), aliases=("shannon", "information"),
    prediction="probabilities (or logits with from_logits=True)", target="(entropy) none; (cross-entropy) q",
    output_layer="softmax",
    formula=r"H(p) = -\sum_c p_c \log p_c, \qquad H(p, q) = -\sum_c p_c \log q_c",
    formula_text="H(p) = -sum p log p;  H(p, q) = -sum p log q",
    summary="Uncertainty of a distribution, in nats (or bits with base=2): a fair coin has ln 2 = 0.693, a fair "
            "die ln 6 = 1.792.",
    properties={"convex": "H is concave in p", "bounded": "H by log C", "robust to outliers": "n/a"},
    options={"dim": "the class dimension", "base": "e (nats), 2 (bits), ...", "from_logits": "inputs are logits"},
    example=entropy_example,
    curve=Curve(entropy_curve, "p_0 of a two-outcome distribution [p_0, 1 - p_0]", (0.01, 0.99),
                ({}, {"base": 2.0}), x_symbol="p_0"),
)

ENTRIES = [KL_DIV, JS_DIVERGENCE, ENTROPY]
