"""Catalog: knowledge distillation (family "posttraining"). For each loss, its example,
mistakes and curve as functions, then its Entry; nothing runs at import (see
:mod:`losskit.catalog.records`)."""

from __future__ import annotations

import torch

import losskit.functional as F

from .records import Curve, Entry, Mistake

_BETA = ("in [0, 1]: 0 forward KL(p || q) (mode-covering), 1 reverse KL(q || p) (mode-seeking), between them the "
         "generalised JSD; the ends are defined as the KLs, so the family jumps there")
_COMMON = {
    "beta": _BETA,
    "temperature": "both distributions are softmax(logits / T); no T^2 factor is applied (TRL and Liger apply none)",
    "target / ignore_index": "token ids; tokens equal to ignore_index (prompt, padding) count neither in the loss "
                             "nor in the mean",
    "weight_hard_loss / weight_soft_loss": "loss = soft * divergence + hard * cross-entropy(student, target) at "
                                           "T = 1; defaults 0 and 1 (TRL's GKD loss; Liger's defaults are 0.5 "
                                           "and 0.5)",
    "reduction": "'mean' over the tokens that count (0 when none does), 'sum', or 'none' (one loss per token)",
}
_FORMULA = (r"D_\beta(p, q) = \begin{cases} \mathrm{KL}(p \,\|\, q) & \beta = 0 \\ "
            r"\beta\,\mathrm{KL}(p \,\|\, m) + (1 - \beta)\,\mathrm{KL}(q \,\|\, m),\; m = \beta p + (1 - \beta) q "
            r"& 0 < \beta < 1 \\ \mathrm{KL}(q \,\|\, p) & \beta = 1 \end{cases}")
_FORMULA_TEXT = ("D = KL(p || q) at beta = 0; beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, "
                 "for 0 < beta < 1; KL(q || p) at beta = 1 (p = softmax(teacher / T), q = softmax(student / T)); "
                 "per token: w_soft D + w_hard CE(student, y), mean over the tokens that count")
_JUMP = ("The family is discontinuous at both ends: inside (0, 1) the divergence tends to 0 as beta -> 0 (about "
         "beta KL(p || q)) and as beta -> 1 (about (1 - beta) KL(q || p)), while beta = 0 and beta = 1 are defined "
         "as the full forward and reverse KL (TRL's and Liger-Kernel's convention).")


# ---- distillation from logits ------------------------------------------------------------------
def distillation_example():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[1.0, 1.0, -1.0], [0.0, 2.0, 0.0]])
    target = torch.tensor([0, -100])  # the second token is a prompt token: not counted
    return F.distillation_loss(student, teacher, target, beta=0.5)


def distillation_mistake_small_beta():
    student = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, 2.0]])
    numbers = {}
    for beta in (0.0, 0.01, 0.5, 0.99, 1.0):
        loss = F.distillation_loss(student, teacher, beta=beta)
        grad, = torch.autograd.grad(loss, student)
        numbers[f'loss, beta = {beta}'] = loss.item()
        numbers[f'|grad|, beta = {beta}'] = grad.abs().sum().item()
    return numbers


def distillation_mistake_temperature_squared():
    student = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, 2.0]])

    def grad_size(temperature, scale=1.0):
        loss = scale * F.distillation_loss(student, teacher, beta=0.0, temperature=temperature)
        grad, = torch.autograd.grad(loss, student)
        return grad.abs().sum().item()

    return {
        '|grad| at T = 1': grad_size(1.0),
        '|grad| at T = 4': grad_size(4.0),
        '|grad| at T = 4, loss times T^2 (Hinton)': grad_size(4.0, scale=16.0),
    }


def distillation_mistake_counting_prompt_tokens():
    student = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([1, -100, -100, 1])  # two prompt tokens, where student and teacher agree
    return {
        'with target (2 completion tokens)': F.distillation_loss(student, teacher, target).item(),
        'without target (prompt counted)': F.distillation_loss(student, teacher).item(),
    }


def distillation_curve(x, beta=0.5):
    student = torch.stack([x, torch.zeros_like(x)], 1)  # the student's logit of class 0
    teacher = x.new_tensor([[1.0, 0.0]]).expand(len(x), 2)
    return F.distillation_loss(student, teacher, beta=beta, reduction='none')


DISTILLATION = Entry(
    key="distillation", title="Distillation (generalised JSD)", family="posttraining",
    problems=("knowledge distillation", "on-policy distillation (GKD)", "LLM post-training"),
    covers=("functional.distillation_loss", "nn.DistillationLoss"), torch=(), keras=(),
    aliases=("kd", "gkd", "knowledge_distillation", "generalized_jsd", "generalized_jsd_loss"),
    prediction="student logits [..., V]", target="teacher logits [..., V]; optional token ids [...] (mask, hard loss)",
    output_layer="none (raw logits of both models)",
    formula=_FORMULA, formula_text=_FORMULA_TEXT,
    summary="Matches a student's next-token distribution to a teacher's, per token, with GKD's generalised "
            "Jensen-Shannon divergence (TRL's generalized_jsd_loss, Liger-Kernel's JSD). " + _JUMP,
    properties={"convex": "in the student's log-probabilities for each beta; not in the logits",
                "bounded": "for 0 < beta < 1 by the binary entropy of beta (ln 2 at 1/2); the KL ends are not",
                "robust to outliers": "the JSD (0 < beta < 1) is bounded; forward KL is infinite where the student "
                                      "gives 0 to a token the teacher uses, reverse KL the other way round"},
    options=_COMMON,
    example=distillation_example,
    mistakes=(
        Mistake("A small beta as 'almost forward KL'",
                "beta = 0 is the forward KL by definition, but beta = 0.01 is a divergence near 0 whose gradient is "
                "about a hundredth of the forward KL's: the family jumps at both ends. For forward KL pass exactly "
                "0; to blend forward and reverse KL, add the two losses with your own weights.",
                distillation_mistake_small_beta),
        Mistake("A temperature without the T^2 factor",
                "Dividing both logits by T shrinks the gradient by about 1/T^2 (Hinton et al. 2015), which TRL and "
                "Liger do not compensate and neither does losskit: multiply the loss by T**2 to keep the step size "
                "when mixing it with a hard loss.",
                distillation_mistake_temperature_squared),
        Mistake("Counting prompt and padding tokens",
                "Without target (or with the prompt not set to ignore_index), tokens the student never generates "
                "dilute the mean: here two prompt tokens where the models agree halve the loss.",
                distillation_mistake_counting_prompt_tokens),
    ),
    curve=Curve(distillation_curve, "student logit of class 0 (teacher logits [1, 0])", (-4.0, 6.0),
                variants=({"beta": 0.0}, {"beta": 0.5}, {"beta": 1.0})),
    notes=("TRL's reduction='batchmean' without labels divides (B, T, V) logits by B; losskit's 'mean' divides by "
           "the B * T tokens (with labels both divide by the tokens that count).",),
)


# ---- distillation of two linear heads ---------------------------------------------------------
def linear_distillation_example():
    student_hidden, student_head = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    teacher_hidden, teacher_head = torch.tensor([[0.0, 1.0, 1.0]]), torch.eye(3)
    # student logits [2, 0, 0], teacher logits [0, 1, 1], never formed as a whole
    return F.linear_distillation_loss(student_hidden, student_head, teacher_hidden, teacher_head, beta=0.5)


def linear_distillation_mistake_liger_defaults():
    torch.manual_seed(0)
    hs, ws, ht, wt = torch.randn(4, 8), torch.randn(16, 8), torch.randn(4, 8), torch.randn(16, 8)
    target = torch.tensor([3, 1, 4, 1])
    return {
        'losskit default (JSD only, as TRL)': F.linear_distillation_loss(hs, ws, ht, wt, target).item(),
        "Liger's default weights (0.5 CE + 0.5 JSD)": F.linear_distillation_loss(
            hs, ws, ht, wt, target, weight_hard_loss=0.5, weight_soft_loss=0.5).item(),
    }



def linear_distillation_curve(x, beta=0.5):
    # one hidden unit: the student's head maps h = x to logits [x, 0], the teacher's gives [1, 0]
    student_input, teacher_input = x[:, None], torch.ones_like(x)[:, None]
    student_weight, teacher_weight = x.new_tensor([[1.0], [0.0]]), x.new_tensor([[1.0], [0.0]])
    return F.linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, beta=beta,
                                      reduction='none')


LINEAR_DISTILLATION = Entry(
    key="linear_distillation", title="Linear distillation (fused output layers)", family="posttraining",
    problems=("knowledge distillation of LLMs", "large-vocabulary distillation"),
    covers=("functional.linear_distillation_loss", "nn.LinearDistillationLoss"), torch=(), keras=(),
    aliases=("fused_linear_jsd", "linear_jsd", "liger_jsd", "LigerFusedLinearJSDLoss"),
    prediction="the student's hidden states [..., H_s] and output layer [V, H_s]",
    target="the teacher's hidden states [..., H_t] and output layer [V, H_t]; optional token ids [...]",
    output_layer="both output layers, folded into the loss",
    formula=r"\ell_i = w_\text{soft}\, D_\beta\big(\mathrm{softmax}(W_t g_i / T), \mathrm{softmax}(W_s h_i / T)\big) "
            r"+ w_\text{hard}\, \mathrm{CE}(W_s h_i, y_i)",
    formula_text="distillation_loss(h W_s^T + b_s, g W_t^T + b_t), chunked over tokens: neither logits tensor is "
                 "formed; the teacher gets no gradient",
    summary="distillation_loss of two linear heads, computed chunk by chunk over the tokens with the student's "
            "gradients made on the way (Liger-Kernel's fused linear JSD), so neither (tokens x vocabulary) "
            "logits tensor exists. " + _JUMP,
    properties={"convex": "in the student's log-probabilities for each beta; not in the weights",
                "bounded": "for 0 < beta < 1; the KL ends are not",
                "robust to outliers": "as distillation_loss"},
    options={**_COMMON, "student_bias / teacher_bias": "biases of the heads ([V])",
             "chunk_size": "tokens per chunk (default: about 4 MiB per [chunk, V] buffer)"},
    example=linear_distillation_example,
    mistakes=(
        Mistake("Liger's defaults mix in the cross-entropy",
                "LigerFusedLinearJSDLoss defaults to weight_hard_loss = weight_soft_loss = 0.5: half the task "
                "cross-entropy plus half the JSD. losskit's default is the divergence alone (TRL's GKD loss); pass "
                "both weights to get Liger's.",
                linear_distillation_mistake_liger_defaults),
    ),
    notes=("A teacher vocabulary larger than the student's is an error; Liger pads the student's logits with zeros, "
           "which gives the padded classes student mass.",),
    curve=Curve(linear_distillation_curve, "student's hidden state h (logits [h, 0]; teacher logits [1, 0])",
                (-4.0, 6.0), ({'beta': 0.0}, {'beta': 0.5}, {'beta': 1.0}), x_symbol="h"),
)


# ---- distillation from a cached top-k teacher --------------------------------------------------
def topk_distillation_example():
    student = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    ids = torch.tensor([[0, 3]])  # the teacher's two most likely tokens
    logps = torch.tensor([[0.6, 0.3]]).log()  # their probabilities; the other 0.1 is one 'rest' bucket
    return F.topk_distillation_loss(student, ids, logps, beta=0.0)


def topk_distillation_mistake_renormalising():
    student = torch.tensor([[1.0, 0.0, -1.0, 0.5, 0.2]])
    teacher = torch.tensor([[2.0, 0.5, -1.0, 1.5, 0.3]])  # the full teacher, to compare with
    logps, ids = teacher.log_softmax(-1).topk(2)
    return {
        'dense teacher (all 5 tokens)': F.distillation_loss(student, teacher, beta=0.0).item(),
        'top-2 with the rest bucket': F.topk_distillation_loss(student, ids, logps, beta=0.0).item(),
        'top-2 renormalised to 1': F.topk_distillation_loss(student, ids, logps - logps.logsumexp(-1, keepdim=True),
                                                            beta=0.0).item(),
    }



def topk_distillation_curve(x, beta=0.5):
    # student logits [x, 0, 0]; the teacher cached its top-1: class 0 at p = 0.7 (a tail of 0.3)
    student = torch.stack([x, torch.zeros_like(x), torch.zeros_like(x)], 1)
    ids = torch.zeros(len(x), 1, dtype=torch.long)
    logps = x.new_full((len(x), 1), 0.7).log()
    return F.topk_distillation_loss(student, ids, logps, beta=beta, reduction='none')


TOPK_DISTILLATION = Entry(
    key="topk_distillation", title="Top-k distillation (cached sparse teacher)", family="posttraining",
    problems=("offline knowledge distillation", "distillation from cached teacher log-probs"),
    covers=("functional.topk_distillation_loss", "nn.TopKDistillationLoss"), torch=(), keras=(),
    aliases=("sparse_distillation", "topk_kd", "topk_jsd", "sparse_kd"),
    prediction="student logits [..., V]",
    target="the teacher's top-k token ids [..., k] and log-probabilities [..., k]; optional token ids [...]",
    output_layer="none (raw student logits)",
    formula=r"D_\beta\big((p_{i_1}, \dots, p_{i_k}, 1 - \textstyle\sum_j p_{i_j}),\ "
            r"(q_{i_1}, \dots, q_{i_k}, \textstyle\sum_{c \notin \{i_j\}} q_c)\big)",
    formula_text="D_beta over k + 1 buckets: the teacher's k tokens and its remaining mass, against the student's "
                 "mass on the same k tokens and on all the others",
    summary="Distillation against a teacher stored as its top-k tokens per position: the teacher's remaining mass "
            "is one 'rest' bucket matched by the student's total mass outside those tokens. Exact (equal to "
            "the dense loss) when the top-k hold all the teacher's mass; never above the dense loss otherwise. "
            + _JUMP,
    properties={"convex": "in the student's bucket log-probabilities for each beta",
                "bounded": "for 0 < beta < 1; the KL ends are not (reverse KL is infinite with a tail of 0)",
                "robust to outliers": "as distillation_loss"},
    options={**_COMMON, "temperature": "divides the student's logits only; the cached teacher log-probabilities "
                                       "are used as given",
             "teacher_topk_logps": "-inf entries are padding: their tokens stay in the rest bucket"},
    example=topk_distillation_example,
    mistakes=(
        Mistake("Renormalising the top-k teacher",
                "Dividing the teacher's top-k probabilities by their sum claims the teacher gives the other tokens "
                "nothing, which pushes the student's mass there to 0 and overstates the loss; the rest bucket "
                "keeps the teacher's true tail.",
                topk_distillation_mistake_renormalising),
    ),
    curve=Curve(topk_distillation_curve, "student logit of class 0 (teacher's top-1: class 0, p = 0.7)",
                (-4.0, 6.0), ({'beta': 0.0}, {'beta': 0.5}, {'beta': 1.0})),
)

ENTRIES = [DISTILLATION, LINEAR_DISTILLATION, TOPK_DISTILLATION]
