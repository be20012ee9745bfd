"""Catalog: multi-class classification. For each loss, its example, mistakes and curve as
functions, then its Entry; nothing runs at import (see :mod:`losskit.catalog.records`)."""

from __future__ import annotations

import torch

import losskit.functional as F
import losskit.keras as K

from .records import REDUCTION, Curve, Entry, Mistake


# ---- cross-entropy --------------------------------------------------------------------------
def cross_entropy_example():
    return F.cross_entropy(torch.tensor([[1.2, 0.5, -0.8], [-0.5, 0.8, 2.0]]), torch.tensor([0, 2]))


def cross_entropy_mistake_softmax_first():
    x, y = torch.tensor([[4.0, 0.0, -2.0]], requires_grad=True), torch.tensor([0])
    right = F.cross_entropy(x, y)
    g_right, = torch.autograd.grad(right, x)
    wrong = F.cross_entropy(x.softmax(1), y)
    g_wrong, = torch.autograd.grad(wrong, x)
    return {
        'loss (logits)': right.item(),
        'loss (softmax first)': wrong.item(),
        '|grad| (logits)': g_right.abs().sum().item(),
        '|grad| (softmax first)': g_wrong.abs().sum().item(),
    }


def cross_entropy_mistake_integer_one_hot():
    x, indices = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([1])
    one_hot = torch.nn.functional.one_hot(indices, 3)  # int64, shaped like x

    def attempt(target):
        try:
            return F.cross_entropy(x, target).item()
        except TypeError as error:
            return f'{type(error).__name__}: {error}'

    return {
        'indices [1]': attempt(indices),
        'one_hot(...), int64': attempt(one_hot),
        'one_hot(...).float()': attempt(one_hot.float()),
    }


def cross_entropy_mistake_mean_with_ignored():
    x, y = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, -100])
    return {
        'mean (over 1 counted)': F.cross_entropy(x, y).item(),
        'sum / N': (F.cross_entropy(x, y, reduction='sum') / 2).item(),
    }


def cross_entropy_curve(x, **options):
    logits = torch.stack([x, torch.zeros_like(x), torch.zeros_like(x)], 1)
    return F.cross_entropy(logits, x.new_zeros(len(x), dtype=torch.long), reduction='none', **options)


CROSS_ENTROPY = Entry(
    key="cross_entropy", title="Cross-entropy (softmax)", family="multiclass",
    problems=("multi-class classification", "language modelling", "segmentation (per pixel)"),
    covers=("functional.cross_entropy", "nn.CrossEntropyLoss", "keras.sparse_categorical_crossentropy",
            "keras.SparseCategoricalCrossentropy", "keras.categorical_crossentropy", "keras.CategoricalCrossentropy"),
    torch=("torch.nn.CrossEntropyLoss",),
    keras=("keras.losses.SparseCategoricalCrossentropy", "keras.losses.CategoricalCrossentropy"),
    aliases=("ce", "softmax_cross_entropy", "categorical_cross_entropy", "log_softmax_loss"),
    prediction="logits [N, C] (or [C], or [N, C, d1, ...]): raw scores, no softmax",
    target="class indices [N] (sparse) or class probabilities [N, C] (one-hot / soft)",
    output_layer="none (raw logits)",
    formula=r"\ell_i = -\sum_c w_c\, q_{i,c} \log \frac{e^{x_{i,c}}}{\sum_k e^{x_{i,k}}}",
    formula_text="-sum_c w_c q_c log softmax(x)_c; q one-hot (indices) or given probabilities",
    summary="The loss of multi-class classification: log-softmax and negative log-likelihood in one stable step.",
    properties={"convex": "yes in the logits", "bounded": "no (grows linearly with a wrong logit margin)",
                "robust to outliers": "no: label noise costs a lot (see label_smoothing, poly-1)"},
    options={"weight": "per-class weights; 'mean' divides by the summed weights of the targets",
             "ignore_index": "target value that counts for nothing (padding), default -100",
             "label_smoothing": "eps: target becomes (1 - eps) one-hot + eps / C",
             "lse_square_scale": "beyond torch: z-loss s (log sum exp)^2, keeps logits from drifting",
             "softcap": "beyond torch: logits pass through cap tanh(x / cap) (Gemma 2)",
             "reduction": REDUCTION},
    example=cross_entropy_example,
    mistakes=(
        Mistake("Softmax before CrossEntropyLoss",
                "The loss applies log-softmax itself. Probabilities passed as logits are squashed a second time: "
                "however right the model, the loss cannot approach 0, and the gradient shrinks. losskit warns.",
                cross_entropy_mistake_softmax_first),
        Mistake("An integer one-hot target",
                "A target shaped like the logits ([N, C]) is read as class probabilities, never as class indices, "
                "and probabilities must be floating point. So the int64 one-hot that "
                "torch.nn.functional.one_hot returns is an error: a TypeError naming the dtype (torch raises too). "
                "Pass the class indices (one_hot.argmax(1)), or the one-hot as floats: the same loss.",
                cross_entropy_mistake_integer_one_hot),
        Mistake("'mean' with ignored targets",
                "The mean divides by the targets that count, not by N: padding does not dilute the loss. A batch "
                "where everything is ignored gives nan (0/0), as in torch.",
                cross_entropy_mistake_mean_with_ignored),
    ),
    torch_vs_keras="Keras has two names: sparse_categorical_crossentropy for indices, "
                   "categorical_crossentropy for one-hot; both take probabilities unless from_logits=True (torch "
                   "always takes logits). Keras' ignore_class is torch's ignore_index.",
    curve=Curve(cross_entropy_curve, "logit of the true class (others 0)", (-4.0, 6.0),
                ({"label_smoothing": 0.0}, {"label_smoothing": 0.1}, {"label_smoothing": 0.3})),
)


# ---- negative log-likelihood ----------------------------------------------------------------
def nll_example():
    return F.nll_loss(torch.tensor([[-0.2, -1.7]]), torch.tensor([0]))


def nll_mistake_logits():
    x, y = torch.tensor([[3.0, 1.0]]), torch.tensor([0])
    return {
        'nll(logits)': F.nll_loss(x, y).item(),
        'nll(log_softmax)': F.nll_loss(x.log_softmax(1), y).item(),
    }


def nll_curve(x):
    log_probs = torch.stack([x, torch.log1p(-x.exp())], 1)  # two classes: log p_y and log(1 - p_y)
    return F.nll_loss(log_probs, x.new_zeros(len(x), dtype=torch.long), reduction='none')


NLL = Entry(
    key="nll", title="Negative log-likelihood", family="multiclass", problems=("multi-class classification",),
    covers=("functional.nll_loss", "nn.NLLLoss"), torch=("torch.nn.NLLLoss",), keras=(), aliases=("nll_loss",),
    prediction="log-probabilities [N, C] (after log_softmax)", target="class indices [N]",
    output_layer="log_softmax",
    formula=r"\ell_i = -w_{y_i}\, x_{i, y_i}", formula_text="-w_y x_y (x: log-probabilities)",
    summary="Picks the log-probability of the target. log_softmax + NLL = cross-entropy.",
    properties={"convex": "linear in x", "bounded": "no", "robust to outliers": "no"},
    options={"weight": "per class", "ignore_index": "target value that counts for nothing", "reduction": REDUCTION},
    example=nll_example,
    mistakes=(
        Mistake("Logits passed to NLLLoss",
                "NLLLoss does not normalise: raw logits give a loss that can go below 0 and never ends.",
                nll_mistake_logits),
    ),
    curve=Curve(nll_curve, "log-probability log p_y of the true class", (-5.0, -0.01), x_symbol="log p_y"),
)


# ---- softmax focal --------------------------------------------------------------------------
def softmax_focal_example():
    return F.softmax_focal_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))  # 0.5^2 ln 2


def softmax_focal_curve(x, **options):
    logits = torch.stack([x, torch.zeros_like(x)], 1)
    return F.softmax_focal_loss(logits, x.new_zeros(len(x), dtype=torch.long), reduction='none', **options)


SOFTMAX_FOCAL = Entry(
    key="softmax_focal", title="Softmax focal loss", family="multiclass",
    problems=("multi-class classification", "class imbalance"),
    covers=("functional.softmax_focal_loss", "nn.SoftmaxFocalLoss", "keras.categorical_focal_crossentropy",
            "keras.CategoricalFocalCrossentropy"),
    torch=(), keras=("keras.losses.CategoricalFocalCrossentropy",), aliases=("multiclass_focal",),
    prediction="logits [N, C]", target="class indices", output_layer="none (raw logits)",
    formula=r"\ell_i = -\alpha_{y_i} (1 - p_{i,y_i})^\gamma \log p_{i,y_i}",
    formula_text="-alpha_y (1 - p_y)^gamma log p_y",
    summary="Cross-entropy down-weighting the examples already right.",
    properties={"convex": "no (gamma > 0)", "bounded": "no", "robust to outliers": "no"},
    options={"alpha": "per-class weights or one number", "gamma": "focusing, 0 gives cross-entropy",
             "ignore_index": "target value that counts for nothing", "reduction": REDUCTION},
    example=softmax_focal_example,
    curve=Curve(softmax_focal_curve, "logit of the true class (other 0)", (-4.0, 6.0),
                ({"gamma": 0.0}, {"gamma": 1.0}, {"gamma": 2.0}, {"gamma": 5.0})),
)


# ---- Poly-1 ---------------------------------------------------------------------------------
def poly1_example():
    return F.poly1_cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))  # ln 2 + 0.5


def poly1_curve(x, **options):
    logits = torch.stack([x, torch.zeros_like(x)], 1)
    return F.poly1_cross_entropy(logits, x.new_zeros(len(x), dtype=torch.long), reduction='none', **options)


POLY1 = Entry(
    key="poly1", title="Poly-1 cross-entropy", family="multiclass", problems=("multi-class classification",),
    covers=("functional.poly1_cross_entropy", "nn.Poly1CrossEntropyLoss"), torch=(), keras=(),
    aliases=("polyloss", "poly1_cross_entropy"),
    prediction="logits", target="class indices", output_layer="none (raw logits)",
    formula=r"\ell_i = -\log p_{i,y_i} + \epsilon\,(1 - p_{i,y_i})", formula_text="-log p_y + eps (1 - p_y)",
    summary="Cross-entropy plus its first polynomial term (PolyLoss): a one-knob change that often helps.",
    properties={"convex": "yes for eps >= -1", "bounded": "no", "robust to outliers": "no"},
    options={"epsilon": "weight of the (1 - p_y) term", "ignore_index": "as cross-entropy", "reduction": REDUCTION},
    example=poly1_example,
    curve=Curve(poly1_curve, "logit of the true class (other 0)", (-4.0, 6.0),
                ({"epsilon": -1.0}, {"epsilon": 0.0}, {"epsilon": 1.0}, {"epsilon": 3.0})),
)


# ---- generalized cross-entropy --------------------------------------------------------------
def generalized_ce_example():
    return K.categorical_generalized_cross_entropy(torch.tensor([0]), torch.tensor([[0.5, 0.5]]), q=0.5)


def generalized_ce_curve(x, **options):
    probabilities = torch.stack([x, 1 - x], 1)
    return K.categorical_generalized_cross_entropy(x.new_zeros(len(x), dtype=torch.long), probabilities, **options)


GENERALIZED_CE = Entry(
    key="generalized_ce", title="Generalized cross-entropy", family="multiclass",
    problems=("multi-class classification", "noisy labels"),
    covers=("keras.categorical_generalized_cross_entropy", "keras.CategoricalGeneralizedCrossEntropy"),
    torch=(), keras=("keras.losses.CategoricalGeneralizedCrossEntropy",), aliases=("gce",),
    prediction="probabilities (Keras convention)", target="class indices", output_layer="softmax",
    formula=r"\ell = \frac{1 - p_y^{\,q}}{q}", formula_text="(1 - p_y^q) / q",
    summary="Between cross-entropy (q -> 0) and MAE (q = 1): robust to noisy labels.",
    properties={"convex": "no", "bounded": "yes, by 1 / q", "robust to outliers": "yes"},
    options={"q": "in (0, 1]", "reduction": "Keras reductions"},
    example=generalized_ce_example,
    curve=Curve(generalized_ce_curve, "probability p_y of the true class (of 2)", (0.01, 0.99),
                ({"q": 0.1}, {"q": 0.5}, {"q": 1.0}), x_symbol="p_y"),
)


# ---- multi-class hinge ----------------------------------------------------------------------
def multi_margin_example():
    return F.multi_margin_loss(torch.tensor([[0.1, 0.2, 0.4, 0.8]]), torch.tensor([3]))


def multi_margin_curve(x, **options):
    scores = torch.stack([x, torch.zeros_like(x)], 1)
    return F.multi_margin_loss(scores, x.new_zeros(len(x), dtype=torch.long), reduction='none', **options)


MULTI_MARGIN = Entry(
    key="multi_margin", title="Multi-class hinge (margin) loss", family="multiclass",
    problems=("multi-class classification",),
    covers=("functional.multi_margin_loss", "nn.MultiMarginLoss", "keras.categorical_hinge", "keras.CategoricalHinge"),
    torch=("torch.nn.MultiMarginLoss",), keras=("keras.losses.CategoricalHinge",), aliases=("multiclass_hinge",),
    prediction="scores [N, C]", target="class indices", output_layer="none",
    formula=r"\ell_n = \frac{1}{C}\sum_{i \ne y} \max(0, m - x_y + x_i)^p",
    formula_text="mean over the other classes of max(0, margin - x_y + x_i)^p",
    summary="The multi-class SVM loss (Weston-Watkins): every other class must score margin below the target.",
    properties={"convex": "yes", "bounded": "no", "robust to outliers": "no"},
    options={"p": "1 or 2", "margin": "the required gap", "weight": "per class", "reduction": REDUCTION},
    example=multi_margin_example,
    torch_vs_keras="Keras' categorical_hinge uses the largest other score only (Crammer-Singer), on one-hot.",
    curve=Curve(multi_margin_curve, "score of the true class (other 0)", (-3.0, 3.0), ({"p": 1}, {"p": 2})),
)


# ---- linear cross-entropy -------------------------------------------------------------------
def linear_cross_entropy_example():
    hidden = torch.tensor([[1.0, 0.0]])  # one token's hidden state, H = 2
    lm_head = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # the output layer's weight, [C, H]
    target = torch.tensor([0])
    return F.linear_cross_entropy(hidden, lm_head, target)  # logits [2, 0]: ln(1 + e^-2)


def linear_cross_entropy_mistake_transposed():
    hidden = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]])  # 2 tokens, H = 3
    lm_head = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])  # C = 4
    target = torch.tensor([2, 0])

    def attempt(weight):
        try:
            return F.linear_cross_entropy(hidden, weight, target).item()
        except ValueError as error:
            return f'{type(error).__name__}: {error}'

    return {
        'lm_head ([C, H], right)': attempt(lm_head),
        'cross_entropy(hidden @ lm_head.T)': F.cross_entropy(hidden @ lm_head.T, target).item(),
        'lm_head.T ([H, C])': attempt(lm_head.T),
    }


def linear_cross_entropy_mistake_padding():
    hidden, weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # the third token is padding; pad_token_id is 0 here
    return {
        'padding labelled -100 (ignored)': F.linear_cross_entropy(hidden, weight, torch.tensor([0, 1, -100])).item(),
        'padding labelled 0 (pad_token_id)': F.linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 0])).item(),
    }


def linear_cross_entropy_curve(x, **options):
    weight = x.new_tensor([[1.0], [0.0], [0.0]])  # 3 classes, 1 feature: the true class's row is [1]
    target = x.new_zeros(len(x), dtype=torch.long)
    return F.linear_cross_entropy(x[:, None], weight, target, reduction='none', **options)


LINEAR_CROSS_ENTROPY = Entry(
    key="linear_cross_entropy", title="Linear cross-entropy (fused output layer)", family="multiclass",
    problems=("language modelling", "large-vocabulary classification"),
    covers=("functional.linear_cross_entropy", "nn.LinearCrossEntropyLoss"),
    torch=("torch.nn.functional.linear_cross_entropy",), keras=(), aliases=("fused_linear_cross_entropy", "lce"),
    prediction="hidden states [..., H] and the output layer's weight [C, H]", target="class indices [...]",
    output_layer="the output layer itself, folded into the loss",
    formula=r"\ell = \mathrm{cross\_entropy}(h W^\top + b,\ y)",
    formula_text="cross_entropy(h W^T + b, y), without forming h W^T",
    summary="The last linear layer and cross-entropy in one, chunked so the (tokens x vocabulary) logits are "
            "never formed: the memory of an LLM's loss drops by the logits' size.",
    properties={"convex": "in the logits, yes", "bounded": "no", "robust to outliers": "no"},
    options={"linear_bias": "bias of the output layer", "chunk_size": "tokens per chunk",
             "weight / ignore_index / label_smoothing / reduction / lse_square_scale / softcap": "as cross_entropy"},
    example=linear_cross_entropy_example,
    mistakes=(
        Mistake("The weight transposed",
                "linear_cross_entropy takes the output layer's weight as nn.Linear stores it, [C, H] (classes x "
                "features): pass lm_head.weight itself. Its transpose is an error naming both shapes.",
                linear_cross_entropy_mistake_transposed),
        Mistake("Padding labelled with the pad token",
                "Only targets equal to ignore_index (-100, as in torch and transformers) count for nothing. "
                "Padding labelled with pad_token_id is trained on as if it were text, and counts in the mean.",
                linear_cross_entropy_mistake_padding),
    ),
    curve=Curve(linear_cross_entropy_curve, "hidden h (true class's weight row 1, others 0)", (-4.0, 6.0),
                ({"label_smoothing": 0.0}, {"label_smoothing": 0.1}), x_symbol="h"),
    notes=(
        "In a causal language model, give it the last hidden states and the output layer's weight, shifted as "
        "usual: `F.linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, labels[:, 1:])`, with hidden "
        "[batch, seq, H] and padding labelled -100. `nn.LinearCrossEntropyLoss` is the same as a Module.",
        "Memory: losskit holds one chunk of logits (about 64 MiB, `chunk_size` tokens at a time) and the "
        "weight's gradient, never the [tokens, C] logits, their softmax or their gradient; the value and "
        "gradients equal `cross_entropy(hidden @ W.T, target)`. With the vocabulary split over processes "
        "(tensor parallelism), `losskit.distributed.vocab_parallel_linear_cross_entropy` does the same on each "
        "rank's slice of W.",
    ),
    links=(
        ("speed and memory against torch", "performance.md#linear-cross-entropy"),
        ("the vocabulary-parallel losses", "performance.md#vocabulary-parallel-linear-cross-entropy"),
        ("API: linear_cross_entropy", "api.md#losskit.functional.linear_cross_entropy"),
        ("API: vocab_parallel_linear_cross_entropy",
         "api.md#losskit.distributed.vocab_parallel_linear_cross_entropy"),
    ),
)

ENTRIES = [CROSS_ENTROPY, NLL, SOFTMAX_FOCAL, POLY1, GENERALIZED_CE, MULTI_MARGIN, LINEAR_CROSS_ENTROPY]
