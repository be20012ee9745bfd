"""Catalog: ranking, similarity and embeddings. For each loss, its example and curve as
functions, then its Entry; nothing runs at import (see :mod:`losskit.catalog.records`)."""

from __future__ import annotations

import torch

import losskit.functional as F

from .records import REDUCTION, Curve, Entry


# ---- margin ranking -------------------------------------------------------------------------
def margin_ranking_example():
    return F.margin_ranking_loss(torch.tensor([0.5]), torch.tensor([0.8]), torch.tensor([1.0]), margin=0.1)


def margin_ranking_curve(x, **options):
    return F.margin_ranking_loss(x, torch.zeros_like(x), torch.ones_like(x), reduction='none', **options)


MARGIN_RANKING = Entry(
    key="margin_ranking", title="Margin ranking loss", family="ranking", problems=("ranking", "pairwise preference"),
    covers=("functional.margin_ranking_loss", "nn.MarginRankingLoss"), torch=("torch.nn.MarginRankingLoss",),
    keras=(), aliases=("ranking",),
    prediction="two scores x1, x2", target="+1 if x1 should rank higher, -1 otherwise", output_layer="none",
    formula=r"\ell = \max(0, -y\,(x_1 - x_2) + m)", formula_text="max(0, -y (x1 - x2) + margin)",
    summary="Pairwise ranking: the preferred item must score margin higher.",
    properties={"convex": "yes", "bounded": "no", "robust to outliers": "no"},
    options={"margin": "required gap", "reduction": REDUCTION},
    example=margin_ranking_example,
    curve=Curve(margin_ranking_curve, "x1 - x2 (x1 preferred)", (-2.0, 2.0),
                ({"margin": 0.0}, {"margin": 0.5}, {"margin": 1.0}), x_symbol="x1"),
)


# ---- hinge embedding ------------------------------------------------------------------------
def hinge_embedding_example():
    return F.hinge_embedding_loss(torch.tensor([0.3, 0.4]), torch.tensor([1.0, -1.0]))  # (0.3 + 0.6) / 2


def hinge_embedding_curve(x, **options):
    return F.hinge_embedding_loss(x, -torch.ones_like(x), reduction='none', **options)


HINGE_EMBEDDING = Entry(
    key="hinge_embedding", title="Hinge embedding loss", family="ranking", problems=("similarity learning",),
    covers=("functional.hinge_embedding_loss", "nn.HingeEmbeddingLoss"), torch=("torch.nn.HingeEmbeddingLoss",),
    keras=(), aliases=(),
    prediction="distances >= 0", target="+1 (similar) / -1 (dissimilar)", output_layer="a distance",
    formula=r"\ell = \begin{cases} x & y = 1 \\ \max(0, m - x) & y = -1 \end{cases}",
    formula_text="x for similar pairs, max(0, margin - x) for dissimilar ones",
    summary="Pulls similar pairs together and pushes dissimilar ones at least margin apart.",
    properties={"convex": "yes", "bounded": "no", "robust to outliers": "no"},
    options={"margin": "distance dissimilar pairs must exceed", "reduction": REDUCTION},
    example=hinge_embedding_example,
    curve=Curve(hinge_embedding_curve, "distance (dissimilar pair)", (0.0, 3.0), ({"margin": 1.0}, {"margin": 2.0})),
)


# ---- cosine embedding -----------------------------------------------------------------------
def cosine_embedding_example():
    return F.cosine_embedding_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([1.0]))


def cosine_embedding_curve(x, y=1.0, margin=0.0):
    x1 = torch.stack([torch.ones_like(x), torch.zeros_like(x)], 1)
    x2 = torch.stack([x.cos(), x.sin()], 1)  # at angle x from x1
    return F.cosine_embedding_loss(x1, x2, torch.full_like(x, y), margin=margin, reduction='none')

COSINE_EMBEDDING = Entry(
    key="cosine_embedding", title="Cosine embedding loss and cosine similarity", family="ranking",
    problems=("similarity learning", "embeddings"),
    covers=("functional.cosine_embedding_loss", "nn.CosineEmbeddingLoss", "keras.cosine_similarity",
            "keras.CosineSimilarity"),
    torch=("torch.nn.CosineEmbeddingLoss",), keras=("keras.losses.CosineSimilarity",), aliases=("cosine",),
    prediction="two embeddings [N, D]", target="+1 (similar) / -1 (dissimilar)", output_layer="an embedding",
    formula=r"\ell = \begin{cases} 1 - \cos(x_1, x_2) & y = 1 \\ \max(0, \cos(x_1, x_2) - m) & y = -1\end{cases}",
    formula_text="1 - cos for similar pairs, max(0, cos - margin) for dissimilar ones",
    summary="Learns directions: similar pairs aligned, dissimilar ones below a cosine margin.",
    properties={"convex": "no", "bounded": "yes: in [0, 2]", "robust to outliers": "yes (bounded)"},
    options={"margin": "cosine dissimilar pairs must stay below, in [-1, 1]", "reduction": REDUCTION},
    example=cosine_embedding_example,
    torch_vs_keras="Keras' CosineSimilarity loss is -cos(y_true, y_pred), with no pairs or margin.",
    curve=Curve(cosine_embedding_curve, "angle between the embeddings (radians)", (0.0, 3.1416),
                ({"y": 1.0}, {"y": -1.0, "margin": 0.0}, {"y": -1.0, "margin": 0.5}), x_symbol="angle"),
)


# ---- triplet margin -------------------------------------------------------------------------
def triplet_margin_example():
    anchor, positive, negative = torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]])
    return F.triplet_margin_loss(anchor, positive, negative, eps=0.0)  # 5 - 1 + 1


def triplet_margin_curve(x, **options):
    anchor, positive, negative = x.new_zeros(len(x), 1), x[:, None], x.new_ones(len(x), 1)
    return F.triplet_margin_loss(anchor, positive, negative, eps=0.0, reduction='none', **options)


TRIPLET_MARGIN = Entry(
    key="triplet_margin", title="Triplet margin loss", family="ranking",
    problems=("metric learning", "face recognition", "retrieval"),
    covers=("functional.triplet_margin_loss", "nn.TripletMarginLoss", "functional.triplet_margin_with_distance_loss",
            "nn.TripletMarginWithDistanceLoss", "functional.pairwise_distance"),
    torch=("torch.nn.TripletMarginLoss", "torch.nn.TripletMarginWithDistanceLoss"), keras=(), aliases=("triplet",),
    prediction="anchor, positive and negative embeddings [N, D]", target="(none: the triplet is the label)",
    output_layer="an embedding",
    formula=r"\ell = \max(0, d(a, p) - d(a, n) + m)", formula_text="max(0, d(a, p) - d(a, n) + margin)",
    summary="The positive must be closer to the anchor than the negative, by margin (FaceNet).",
    properties={"convex": "no", "bounded": "no", "robust to outliers": "no"},
    options={"margin": "> 0", "p": "norm of the distance", "swap": "use d(p, n) when smaller",
             "distance_function": "any distance (the _with_distance form)", "reduction": REDUCTION},
    example=triplet_margin_example,
    curve=Curve(triplet_margin_curve, "d(anchor, positive) (d(anchor, negative) = 1)", (0.0, 3.0),
                ({"margin": 0.5}, {"margin": 1.0}), x_symbol="d(a, p)"),
)

ENTRIES = [MARGIN_RANKING, HINGE_EMBEDDING, COSINE_EMBEDDING, TRIPLET_MARGIN]
