"""Loss functions with the names, signatures and semantics of ``torch.nn.functional``."""

from .classification import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    nll_loss,
)
from .distillation import distillation_loss, linear_distillation_loss, topk_distillation_loss
from .divergence import js_divergence, kl_div
from .focal import poly1_cross_entropy, sigmoid_focal_loss, softmax_focal_loss
from .linear import linear_cross_entropy
from .log_probs import linear_log_probs, linear_log_probs_and_entropy
from .margin import (
    cosine_embedding_loss,
    hinge_embedding_loss,
    margin_ranking_loss,
    multi_margin_loss,
    multilabel_margin_loss,
    multilabel_soft_margin_loss,
    pairwise_distance,
    soft_margin_loss,
    triplet_margin_loss,
    triplet_margin_with_distance_loss,
)
from .sequence import ctc_loss
from .overlap import dice_loss, tversky_loss
from .policy import grpo_loss
from .preference import cpo_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss
from .regression import gaussian_nll_loss, huber_loss, l1_loss, mse_loss, poisson_nll_loss, smooth_l1_loss

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cosine_embedding_loss",
    "cpo_loss",
    "cross_entropy",
    "ctc_loss",
    "dice_loss",
    "distillation_loss",
    "dpo_loss",
    "gaussian_nll_loss",
    "grpo_loss",
    "hinge_embedding_loss",
    "huber_loss",
    "js_divergence",
    "kl_div",
    "kto_loss",
    "l1_loss",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_log_probs",
    "linear_log_probs_and_entropy",
    "margin_ranking_loss",
    "mse_loss",
    "multi_margin_loss",
    "multilabel_margin_loss",
    "multilabel_soft_margin_loss",
    "nll_loss",
    "orpo_loss",
    "pairwise_distance",
    "poisson_nll_loss",
    "poly1_cross_entropy",
    "sigmoid_focal_loss",
    "simpo_loss",
    "smooth_l1_loss",
    "soft_margin_loss",
    "softmax_focal_loss",
    "topk_distillation_loss",
    "triplet_margin_loss",
    "triplet_margin_with_distance_loss",
    "tversky_loss",
]
