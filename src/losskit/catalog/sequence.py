"""Catalog: sequences without alignment. For each loss, its example and mistakes as
functions, then its Entry; nothing runs at import (see :mod:`losskit.catalog.records`)."""

from __future__ import annotations

import torch

import losskit.functional as F

from .records import Curve, Entry, Mistake


# ---- CTC ------------------------------------------------------------------------------------
def ctc_example():
    return F.ctc_loss(torch.full((2, 1, 2), 0.5).log(), torch.tensor([[1]]), [2], [1], reduction='sum')  # -ln(3/4)


def ctc_mistake_too_short():
    lp = torch.full((2, 1, 2), 0.5).log()
    return {
        'loss': F.ctc_loss(lp, torch.tensor([[1, 1]]), [2], [2]).item(),
        'zero_infinity': F.ctc_loss(lp, torch.tensor([[1, 1]]), [2], [2], zero_infinity=True).item(),
    }


def ctc_curve(x):
    # 2 frames, classes [blank, a]; each frame gives 'a' probability x. Target 'a': the
    # alignments 'a a', 'a -', '- a' collapse to it, so the loss is -log(x^2 + 2 x (1 - x)).
    frame = torch.stack([(1 - x).log(), x.log()], 1)  # [N, C] log-probabilities
    log_probs = torch.stack([frame, frame])  # [T, N, C]
    targets = torch.ones(len(x), 1, dtype=torch.long)
    return F.ctc_loss(log_probs, targets, [2] * len(x), [1] * len(x), reduction='none')

CTC = Entry(
    key="ctc", title="Connectionist temporal classification", family="sequence",
    problems=("speech recognition", "handwriting recognition", "unaligned sequences"),
    covers=("functional.ctc_loss", "nn.CTCLoss"), torch=("torch.nn.CTCLoss",), keras=(), aliases=("ctc_loss",),
    prediction="log-probabilities [T, N, C] (after log_softmax over C)", target="label sequences, no blanks",
    output_layer="log_softmax",
    formula=r"\ell_n = -\log \sum_{\pi \in \mathcal{B}^{-1}(y_n)} \prod_t p_t(\pi_t)",
    formula_text="-log of the summed probability of every alignment that collapses to the target",
    summary="Trains a frame classifier on sequences whose alignment to the frames is unknown.",
    properties={"convex": "no", "bounded": "no (inf for impossible alignments)", "robust to outliers": "no"},
    options={"blank": "the blank class", "zero_infinity": "impossible alignments give 0, not inf",
             "reduction": "'mean' divides each loss by its target length first"},
    example=ctc_example,
    mistakes=(
        Mistake("Input shorter than the target needs",
                "Repeated labels need a blank between them: 'a a' needs 3 frames. With fewer the loss is inf; "
                "zero_infinity=True makes it 0 (and its gradient too).",
                ctc_mistake_too_short),
    ),
    curve=Curve(ctc_curve, "probability p of the label at each of 2 frames (target: 1 label)", (0.02, 0.99),
                x_symbol="p"),
)

ENTRIES = [CTC]
