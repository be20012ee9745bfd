"""Catalog: segmentation, the overlap of masks. For each loss, its example as a function,
then its Entry; nothing runs at import (see :mod:`losskit.catalog.records`)."""

from __future__ import annotations

import torch

import losskit.functional as F

from .records import REDUCTION, Curve, Entry


# ---- Dice -----------------------------------------------------------------------------------
def dice_example():
    return F.dice_loss(torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]]), torch.tensor([[0, 1]]), smooth=0.0)


def dice_curve(x, smooth=1.0):
    probs = torch.stack([x, 1 - x], 1)[:, :, None]  # one pixel, 2 classes: the true class gets x
    target = torch.zeros(len(x), 1, dtype=torch.long)
    return F.dice_loss(probs, target, from_logits=False, smooth=smooth, reduction='none').mean(1)

DICE = Entry(
    key="dice", title="Dice loss", family="segmentation", problems=("segmentation", "class imbalance"),
    covers=("functional.dice_loss", "nn.DiceLoss", "keras.dice", "keras.Dice"), torch=(), keras=("keras.losses.Dice",),
    aliases=("dice_loss", "f1_loss"),
    prediction="logits [N, C, ...] (or probabilities with from_logits=False)",
    target="class indices [N, ...] or probabilities [N, C, ...]", output_layer="none (raw logits)",
    formula=r"\ell = 1 - \frac{2\,TP + s}{2\,TP + FP + FN + s}", formula_text="1 - (2 TP + s) / (2 TP + FP + FN + s)",
    summary="One minus the soft Dice (F1) overlap of predicted and true masks, per class: small structures count "
            "as much as large ones.",
    properties={"convex": "no", "bounded": "yes: in [0, 1]", "robust to outliers": "yes"},
    options={"from_logits": "softmax the input first", "smooth": "s, keeps empty classes finite",
             "ignore_index": "pixels that count for nothing", "weight": "per class", "reduction": REDUCTION},
    example=dice_example,
    torch_vs_keras="Keras' Dice works on probabilities over the whole batch; losskit's per class, on logits.",
    curve=Curve(dice_curve, "probability p of the true class (one pixel, 2 classes)", (0.01, 0.99),
                ({"smooth": 1.0}, {"smooth": 0.1}), x_symbol="p"),
)


# ---- Tversky --------------------------------------------------------------------------------
def tversky_example():
    logits, target = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]]), torch.tensor([[0, 1]])
    return F.tversky_loss(logits, target, alpha=0.3, beta=0.7, smooth=0.0)


def tversky_curve(x, alpha=0.5, beta=0.5):
    probs = torch.stack([x, 1 - x], 1)[:, :, None]  # one pixel, 2 classes: the true class gets x
    target = torch.zeros(len(x), 1, dtype=torch.long)
    return F.tversky_loss(probs, target, alpha=alpha, beta=beta, from_logits=False, reduction='none').mean(1)

TVERSKY = Entry(
    key="tversky", title="Tversky loss", family="segmentation", problems=("segmentation", "class imbalance"),
    covers=("functional.tversky_loss", "nn.TverskyLoss", "keras.tversky", "keras.Tversky"), torch=(),
    keras=("keras.losses.Tversky",), aliases=("tversky_loss",),
    prediction="logits [N, C, ...]", target="class indices or probabilities", output_layer="none (raw logits)",
    formula=r"\ell = 1 - \frac{TP + s}{TP + \alpha\,FP + \beta\,FN + s}",
    formula_text="1 - (TP + s) / (TP + alpha FP + beta FN + s)",
    summary="Dice with separate weights for false positives and false negatives (beta > alpha favours recall).",
    properties={"convex": "no", "bounded": "yes: in [0, 1]", "robust to outliers": "yes"},
    options={"alpha": "weight of false positives", "beta": "weight of false negatives",
             "from_logits / smooth / ignore_index / weight / reduction": "as dice"},
    example=tversky_example,
    curve=Curve(tversky_curve, "probability p of the true class (one pixel, 2 classes)", (0.01, 0.99),
                ({"alpha": 0.5, "beta": 0.5}, {"alpha": 0.3, "beta": 0.7}, {"alpha": 0.7, "beta": 0.3}), x_symbol="p"),
)

ENTRIES = [DICE, TVERSKY]
