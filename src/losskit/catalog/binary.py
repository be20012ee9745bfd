"""Catalog: binary and multi-label classification. For each loss, its example, mistakes and
curve as functions, then its Entry; nothing runs at import (see
:mod:`losskit.catalog.records`)."""

from __future__ import annotations

import torch

import losskit.functional as F
import losskit.keras as K

from .records import REDUCTION, Curve, Entry, Mistake


# ---- BCE on probabilities -------------------------------------------------------------------
def bce_example():
    return F.binary_cross_entropy(torch.tensor([0.9, 0.2]), torch.tensor([1.0, 0.0]))  # -(ln .9 + ln .8) / 2


def bce_mistake_logits():
    x, y = torch.tensor([20.0, -20.0]), torch.tensor([0.0, 1.0])  # logits, both confidently wrong

    def attempt(loss, input):
        try:
            return loss(input, y).item()
        except ValueError as error:
            return f'{type(error).__name__}: {error}'

    return {
        'bce(x), logits in BCELoss': attempt(F.binary_cross_entropy, x),
        'bce(sigmoid(x)), saturated': attempt(F.binary_cross_entropy, torch.sigmoid(x)),
        'bce_with_logits(x), right': attempt(F.binary_cross_entropy_with_logits, x),
    }


def bce_curve(x):
    return F.binary_cross_entropy(x, torch.ones_like(x), reduction='none')


BCE = Entry(
    key="bce", title="Binary cross-entropy on probabilities", family="binary",
    problems=("binary classification", "multi-label classification"),
    covers=("functional.binary_cross_entropy", "nn.BCELoss", "keras.binary_crossentropy", "keras.BinaryCrossentropy"),
    torch=("torch.nn.BCELoss",), keras=("keras.losses.BinaryCrossentropy",), aliases=("binary_cross_entropy", "log_loss"),
    prediction="probabilities in [0, 1] (after a sigmoid)", target="0/1 labels or soft labels in [0, 1]",
    output_layer="sigmoid (better: no activation and bce_with_logits)",
    formula=r"\ell = -w\,[\,y \log p + (1 - y)\log(1 - p)\,]",
    formula_text="-w [y log p + (1 - y) log(1 - p)]",
    summary="Cross-entropy of a Bernoulli prediction. On probabilities; logs are clamped at -100 as in torch.",
    properties={"convex": "yes in p, and in the logit", "bounded": "at 100 (torch's clamp)",
                "robust to outliers": "no: a confident wrong label costs up to 100"},
    options={"weight": "rescales each element", "reduction": REDUCTION},
    example=bce_example,
    mistakes=(
        Mistake("Logits passed to BCELoss",
                "BCELoss wants probabilities. Raw scores outside [0, 1] are an error in losskit, with the index of "
                "the first one (torch raises too). Squashing them yourself with a sigmoid and then BCELoss gives a "
                "wrong number where the sigmoid saturates: sigmoid(20) rounds to 1, log(1 - 1) is clamped at -100, "
                "and the loss of that element is 100 instead of 20. binary_cross_entropy_with_logits takes the "
                "logits and is exact.",
                bce_mistake_logits),
    ),
    torch_vs_keras="Keras' BinaryCrossentropy takes from_logits=True for logits (torch: BCEWithLogitsLoss), "
                   "clips probabilities at 1e-7 (torch clamps the log at -100) and averages the last axis.",
    curve=Curve(bce_curve, "probability p (label 1)", (0.01, 0.99), x_symbol="p"),
)


# ---- BCE on logits --------------------------------------------------------------------------
def bce_with_logits_example():
    return F.binary_cross_entropy_with_logits(torch.tensor([2.1972, -1.3863]), torch.tensor([1.0, 0.0]))


def bce_with_logits_mistake_sigmoid():
    x, y = torch.tensor([4.0, -4.0], requires_grad=True), torch.tensor([1.0, 0.0])
    right = F.binary_cross_entropy_with_logits(x, y)
    g_right, = torch.autograd.grad(right, x)
    wrong = F.binary_cross_entropy_with_logits(torch.sigmoid(x), y)
    g_wrong, = torch.autograd.grad(wrong, x)
    return {
        'loss (right)': right.item(),
        'loss (extra sigmoid)': wrong.item(),
        '|grad| (right)': g_right.abs().sum().item(),
        '|grad| (extra sigmoid)': g_wrong.abs().sum().item(),
    }


def bce_with_logits_curve(x, pos_weight=1.0):
    return F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction='none',
                                              pos_weight=x.new_tensor(pos_weight))


BCE_WITH_LOGITS = Entry(
    key="bce_with_logits", title="Binary cross-entropy on logits", family="binary",
    problems=("binary classification", "multi-label classification"),
    covers=("functional.binary_cross_entropy_with_logits", "nn.BCEWithLogitsLoss"),
    torch=("torch.nn.BCEWithLogitsLoss",), keras=("keras.losses.BinaryCrossentropy(from_logits=True)",),
    aliases=("bcewithlogits", "sigmoid_cross_entropy", "binary_cross_entropy_with_logits"),
    prediction="logits: raw scores, any real number", target="0/1 labels or soft labels in [0, 1]",
    output_layer="none (raw logits)",
    formula=r"\ell = w\,[\,(1 - y)\,x - (1 + (p_w - 1)\,y)\log\sigma(x)\,]",
    formula_text="w [(1 - y) x - (1 + (pos_weight - 1) y) log sigmoid(x)]",
    summary="BCE computed from logits without forming the sigmoid: exact at any magnitude. The right default.",
    properties={"convex": "yes in the logit", "bounded": "no (linear for confident mistakes)",
                "robust to outliers": "no"},
    options={"pos_weight": "weight of positives per class: > 1 raises recall (e.g. negatives / positives)",
             "weight": "rescales each element", "reduction": REDUCTION},
    example=bce_with_logits_example,
    mistakes=(
        Mistake("A sigmoid before BCEWithLogitsLoss",
                "The loss applies the sigmoid itself; a second one squeezes every score into (0.5, 0.73) and "
                "the gradient almost vanishes.",
                bce_with_logits_mistake_sigmoid),
    ),
    torch_vs_keras="Keras: BinaryCrossentropy(from_logits=True); pos_weight has no Keras counterpart.",
    curve=Curve(bce_with_logits_curve, "logit x (label 1)", (-6.0, 6.0), ({"pos_weight": 1.0}, {"pos_weight": 3.0})),
)


# ---- sigmoid focal --------------------------------------------------------------------------
def sigmoid_focal_example():
    return F.sigmoid_focal_loss(torch.tensor([0.0, 3.0]), torch.tensor([1.0, 1.0]), reduction='sum')


def sigmoid_focal_curve(x, **options):
    return F.sigmoid_focal_loss(x, torch.ones_like(x), alpha=-1, **options)


SIGMOID_FOCAL = Entry(
    key="sigmoid_focal", title="Sigmoid focal loss", family="binary",
    problems=("binary classification", "dense detection", "class imbalance"),
    covers=("functional.sigmoid_focal_loss", "nn.SigmoidFocalLoss", "keras.binary_focal_crossentropy",
            "keras.BinaryFocalCrossentropy"),
    torch=("torchvision.ops.sigmoid_focal_loss",), keras=("keras.losses.BinaryFocalCrossentropy",),
    aliases=("focal", "focal_loss", "binary_focal"),
    prediction="logits", target="0/1 labels", output_layer="none (raw logits)",
    formula=r"\ell = \alpha_t (1 - p_t)^\gamma\, \mathrm{BCE}(x, y),\quad p_t = p y + (1 - p)(1 - y)",
    formula_text="alpha_t (1 - p_t)^gamma BCE(x, y)",
    summary="BCE scaled down for examples already classified well, so the rare hard ones dominate (RetinaNet).",
    properties={"convex": "no (for gamma > 0)", "bounded": "no", "robust to outliers": "no"},
    options={"alpha": "weight of positives in [0, 1], or -1 for none", "gamma": "focusing; 0 gives BCE",
             "reduction": "'none' (torchvision's default), 'mean', 'sum'"},
    example=sigmoid_focal_example,
    torch_vs_keras="Keras' BinaryFocalCrossentropy applies alpha only with apply_class_balancing=True.",
    curve=Curve(sigmoid_focal_curve, "logit x (label 1)", (-6.0, 6.0),
                ({"gamma": 0.0}, {"gamma": 1.0}, {"gamma": 2.0}, {"gamma": 5.0})),
)


# ---- soft margin ----------------------------------------------------------------------------
def soft_margin_example():
    return F.soft_margin_loss(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0]))


def soft_margin_curve(x):
    return F.soft_margin_loss(x, torch.ones_like(x), reduction='none')


SOFT_MARGIN = Entry(
    key="soft_margin", title="Soft margin (logistic) loss", family="binary", problems=("binary classification",),
    covers=("functional.soft_margin_loss", "nn.SoftMarginLoss"), torch=("torch.nn.SoftMarginLoss",), keras=(),
    aliases=("logistic",),
    prediction="scores", target="+1 / -1 labels", output_layer="none (raw scores)",
    formula=r"\ell = \log(1 + e^{-y x})", formula_text="log(1 + exp(-y x))",
    summary="Logistic loss with ±1 labels: BCE-with-logits in another notation.",
    properties={"convex": "yes", "bounded": "no", "robust to outliers": "no"},
    options={"reduction": REDUCTION},
    example=soft_margin_example,
    curve=Curve(soft_margin_curve, "score x (label +1)", (-4.0, 4.0)),
)


# ---- hinge ----------------------------------------------------------------------------------
def hinge_example():
    return K.hinge(torch.tensor([[1.0, -1.0]]), torch.tensor([[0.3, -2.0]]))  # (0.7 + 0) / 2


def hinge_curve(x):
    return K.hinge(torch.ones_like(x)[:, None], x[:, None])


HINGE = Entry(
    key="hinge", title="Hinge and squared hinge", family="binary", problems=("binary classification", "SVM"),
    covers=("keras.hinge", "keras.Hinge", "keras.squared_hinge", "keras.SquaredHinge"), torch=(),
    keras=("keras.losses.Hinge", "keras.losses.SquaredHinge"), aliases=("squared_hinge", "svm"),
    prediction="scores", target="+1/-1 labels (0/1 are mapped to -1/+1)", output_layer="none (raw scores)",
    formula=r"\ell = \max(0, 1 - y\,x)\;(\text{squared: } \max(0, 1 - y x)^2)",
    formula_text="max(0, 1 - y x), or its square",
    summary="The SVM loss: no penalty once the margin exceeds 1.",
    properties={"convex": "yes", "bounded": "no", "robust to outliers": "no"},
    options={"reduction": "Keras reductions"},
    example=hinge_example,
    curve=Curve(hinge_curve, "score x (label +1)", (-3.0, 3.0)),
)


# ---- multi-label soft margin ----------------------------------------------------------------
def multilabel_soft_margin_example():
    return F.multilabel_soft_margin_loss(torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]]))


def multilabel_soft_margin_curve(x):
    return F.multilabel_soft_margin_loss(x[:, None], torch.ones_like(x)[:, None], reduction='none')


MULTILABEL_SOFT_MARGIN = Entry(
    key="multilabel_soft_margin", title="Multi-label soft margin loss", family="binary",
    problems=("multi-label classification",),
    covers=("functional.multilabel_soft_margin_loss", "nn.MultiLabelSoftMarginLoss"),
    torch=("torch.nn.MultiLabelSoftMarginLoss",), keras=(), aliases=(),
    prediction="logits [N, C]", target="0/1 per class [N, C]", output_layer="none (raw logits)",
    formula=r"\ell_n = -\frac{1}{C}\sum_c w_c [y_c \log\sigma(x_c) + (1 - y_c)\log(1-\sigma(x_c))]",
    formula_text="per sample, the mean over classes of BCE-with-logits",
    summary="BCE-with-logits averaged over classes per sample.",
    properties={"convex": "yes", "bounded": "no", "robust to outliers": "no"},
    options={"weight": "per class", "reduction": REDUCTION},
    example=multilabel_soft_margin_example,
    curve=Curve(multilabel_soft_margin_curve, "logit (label 1)", (-4.0, 4.0)),
)


# ---- multi-label margin ---------------------------------------------------------------------
def multilabel_margin_example():
    return F.multilabel_margin_loss(torch.tensor([[0.1, 0.2, 0.4, 0.8]]), torch.tensor([[3, 0, -1, 1]]))


def multilabel_margin_mistake_mask():
    x = torch.tensor([[0.1, 0.2, 0.4, 0.8]])
    return {
        'indices [3, 0, -1, -1]': F.multilabel_margin_loss(x, torch.tensor([[3, 0, -1, -1]])).item(),
        'mask [1, 0, 0, 1]': F.multilabel_margin_loss(x, torch.tensor([[1, 0, 0, 1]])).item(),
    }


def multilabel_margin_curve(x):
    scores = torch.stack([x, torch.zeros_like(x)], 1)  # the label class scores x, the other 0
    target = torch.tensor([[0, -1]]).expand(len(x), 2)  # labels: class 0, then the -1 end mark
    return F.multilabel_margin_loss(scores, target, reduction='none')

MULTILABEL_MARGIN = Entry(
    key="multilabel_margin", title="Multi-label margin loss", family="binary", problems=("multi-label classification",),
    covers=("functional.multilabel_margin_loss", "nn.MultiLabelMarginLoss"),
    torch=("torch.nn.MultiLabelMarginLoss",), keras=(), aliases=(),
    prediction="scores [N, C]", target="class indices, padded with -1 after the last", output_layer="none",
    formula=r"\ell_n = \frac{1}{C}\sum_{j \in y}\sum_{i \notin y} \max(0, 1 - (x_j - x_i))",
    formula_text="sum over label j, non-label i of max(0, 1 - (x_j - x_i)), over C",
    summary="Every true class must score 1 above every other class.",
    properties={"convex": "yes", "bounded": "no", "robust to outliers": "no"},
    options={"reduction": REDUCTION},
    example=multilabel_margin_example,
    mistakes=(
        Mistake("A 0/1 mask as target",
                "The target lists class indices and stops at the first -1; a 0/1 mask reads as classes 0 and 1.",
                multilabel_margin_mistake_mask),
    ),
    curve=Curve(multilabel_margin_curve, "score of the label class (other class 0)", (-2.0, 3.0)),
)

ENTRIES = [BCE, BCE_WITH_LOGITS, SIGMOID_FOCAL, SOFT_MARGIN, HINGE, MULTILABEL_SOFT_MARGIN, MULTILABEL_MARGIN]
