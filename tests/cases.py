"""One sample call of every public loss, on any device: the catalog the device, compile and
grad-mode tests run over.

A case builds its call from an ``Inputs`` (tests/inputs.py) bound to a device and dtype, so
the same call runs on CPU, on ``meta`` tensors and under torch.compile. ``covered_names``
lists what the cases reach, and a test fails when a public loss has no case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import losskit.functional as LF
from inputs import Inputs
from losskit import info, keras, nn


Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class Case:
    id: str
    covers: tuple[str, ...]  # the public names this call goes through, e.g. ("functional.cross_entropy",)
    build: Callable[[Inputs], Call]
    # ctc_loss with concatenated targets and tensor lengths reads the longest length on the
    # host (a data-dependent shape, as torch's own ctc_loss), so that compiled call is not
    # one graph (see its docstring); every other case is.
    fullgraph: bool = True


def _fn(name: str) -> str:
    return f"functional.{name}"


def _log_probs_and_entropy(*args, **kwargs):
    """linear_log_probs_and_entropy's two outputs as one tensor, for the helpers that take one."""
    return torch.stack(LF.linear_log_probs_and_entropy(*args, **kwargs))


def _ctc_padded(m: Inputs) -> Call:
    lp = m.x(6, 2, 4).log_softmax(-1).detach().requires_grad_()
    return LF.ctc_loss, (lp, m.index(3, 2, 3) + 1, torch.tensor([6, 5]), torch.tensor([3, 2])), {}


def _ctc_concatenated(m: Inputs) -> Call:
    lp = m.x(6, 2, 4).log_softmax(-1).detach().requires_grad_()
    # blank = 3, labels in {0, 1, 2}; lengths as Python lists, as torch allows
    return LF.ctc_loss, (lp, m.index(3, 5), [6, 4], [3, 2]), {"blank": 3, "reduction": "sum"}


def _ctc_concatenated_tensor_lengths(m: Inputs) -> Call:
    lp = m.x(6, 2, 4).log_softmax(-1).detach().requires_grad_()
    lengths = torch.tensor([3, 2], device=m.device)
    return LF.ctc_loss, (lp, m.index(3, 5) + 1, torch.tensor([6, 4], device=m.device), lengths), {}


def _triplet_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().sum(-1)


CASES: list[Case] = [
    # classification
    Case("cross_entropy-fused", (_fn("cross_entropy"),), lambda m: (LF.cross_entropy, (m.x(6, 5), m.index(5, 6)), {})),
    Case("cross_entropy-fused-options", (_fn("cross_entropy"),), lambda m: (
        LF.cross_entropy, (m.x(6, 5), m.index(5, 6, ignore=-100)),
        {"weight": m.rand(5, low=0.5, high=2.0), "label_smoothing": 0.1, "lse_square_scale": 1e-3, "softcap": 4.0},
    )),
    Case("cross_entropy-fused-none", (_fn("cross_entropy"),), lambda m: (
        LF.cross_entropy, (m.x(6, 5), m.index(5, 6, ignore=2)), {"ignore_index": 2, "reduction": "none"},
    )),
    Case("cross_entropy-kdim", (_fn("cross_entropy"),), lambda m: (
        LF.cross_entropy, (m.x(2, 5, 3), m.index(5, 2, 3, ignore=-100)),
        {"weight": m.rand(5, low=0.5), "label_smoothing": 0.2, "lse_square_scale": 1e-3},
    )),
    Case("cross_entropy-probabilities", (_fn("cross_entropy"),), lambda m: (
        LF.cross_entropy, (m.x(4, 5), m.probs(4, 5)), {"label_smoothing": 0.1, "softcap": 3.0},
    )),
    Case("nll_loss", (_fn("nll_loss"),), lambda m: (
        LF.nll_loss, (m.x(4, 5), m.index(5, 4, ignore=-100)), {"weight": m.rand(5, low=0.5)},
    )),
    Case("binary_cross_entropy", (_fn("binary_cross_entropy"),), lambda m: (
        LF.binary_cross_entropy, (m.rand(4, 3, low=0.05, high=0.95).requires_grad_(), m.rand(4, 3)),
        {"weight": m.rand(3)},
    )),
    Case("bce_with_logits-fused", (_fn("binary_cross_entropy_with_logits"),), lambda m: (
        LF.binary_cross_entropy_with_logits, (m.x(4, 3), m.rand(4, 3)), {"pos_weight": m.rand(3, low=1, high=3)},
    )),
    Case("bce_with_logits-reference", (_fn("binary_cross_entropy_with_logits"),), lambda m: (
        LF.binary_cross_entropy_with_logits, (m.x(4, 3), m.rand(4, 3).requires_grad_()),
        {"weight": m.rand(3), "reduction": "sum"},
    )),
    Case("linear_cross_entropy", (_fn("linear_cross_entropy"),), lambda m: (
        LF.linear_cross_entropy, (m.x(7, 4), m.x(9, 4), m.index(9, 7, ignore=-100)),
        {"linear_bias": m.x(9), "label_smoothing": 0.1, "chunk_size": 3},
    )),
    Case("linear_cross_entropy-none", (_fn("linear_cross_entropy"),), lambda m: (
        LF.linear_cross_entropy, (m.x(7, 4), m.x(9, 4), m.index(9, 7)),
        {"weight": m.rand(9, low=0.5), "reduction": "none", "chunk_size": 4, "lse_square_scale": 1e-2},
    )),
    Case("linear_cross_entropy-kdim", (_fn("linear_cross_entropy"),), lambda m: (
        LF.linear_cross_entropy, (m.x(2, 3, 4), m.x(9, 4), m.index(9, 2, 3)), {},
    )),
    Case("linear_log_probs", (_fn("linear_log_probs"),), lambda m: (
        LF.linear_log_probs, (m.x(2, 5, 4), m.x(9, 4), m.index(9, 2, 5, ignore=-100)),
        {"bias": m.x(9), "temperature": 0.8, "chunk_size": 3},
    )),
    Case("linear_log_probs_and_entropy", (_fn("linear_log_probs_and_entropy"),), lambda m: (
        _log_probs_and_entropy, (m.x(7, 4), m.x(9, 4), m.index(9, 7, ignore=-100)), {"chunk_size": 4},
    )),
    # regression
    Case("mse_loss", (_fn("mse_loss"),), lambda m: (LF.mse_loss, (m.x(4, 3), m.x(4, 3)), {"weight": m.rand(4, 3)})),
    Case("l1_loss", (_fn("l1_loss"),), lambda m: (LF.l1_loss, (m.x(4, 3), m.x(4, 3)), {"reduction": "sum"})),
    Case("smooth_l1_loss", (_fn("smooth_l1_loss"),), lambda m: (LF.smooth_l1_loss, (m.x(4, 3), m.x(4, 3)), {"beta": 0.5})),
    Case("huber_loss", (_fn("huber_loss"),), lambda m: (
        LF.huber_loss, (m.x(4, 3), m.x(4, 3)), {"delta": 0.7, "weight": m.rand(4, 3)},
    )),
    Case("poisson_nll_loss", (_fn("poisson_nll_loss"),), lambda m: (
        LF.poisson_nll_loss, (m.x(4, 3), m.rand(4, 3, high=4.0)), {"full": True},
    )),
    Case("gaussian_nll_loss", (_fn("gaussian_nll_loss"),), lambda m: (
        LF.gaussian_nll_loss, (m.x(4, 3), m.x(4, 3), m.rand(4, 1, low=0.1, high=2.0).requires_grad_()), {"full": True},
    )),
    Case("gaussian_nll_loss-float-var", (_fn("gaussian_nll_loss"),), lambda m: (
        LF.gaussian_nll_loss, (m.x(4, 3), m.x(4, 3), 0.5), {},
    )),
    # divergence
    Case("kl_div", (_fn("kl_div"),), lambda m: (
        LF.kl_div, (m.x(4, 5).log_softmax(-1), m.probs(4, 5)), {"reduction": "batchmean"},
    )),
    Case("kl_div-log-target", (_fn("kl_div"),), lambda m: (
        LF.kl_div, (m.x(4, 5), m.x(4, 5).log_softmax(-1)), {"log_target": True, "reduction": "sum"},
    )),
    Case("js_divergence", (_fn("js_divergence"),), lambda m: (
        LF.js_divergence, (m.x(4, 5), m.x(4, 5)), {"from_logits": True, "labels": m.index(5, 4, ignore=-100), "beta": 0.3},
    )),
    # distillation
    Case("distillation_loss", (_fn("distillation_loss"),), lambda m: (
        LF.distillation_loss, (m.x(7, 9), m.x(7, 9, grad=False), m.index(9, 7, ignore=-100)),
        {"beta": 0.3, "temperature": 2.0, "weight_hard_loss": 0.5},
    )),
    Case("distillation_loss-none", (_fn("distillation_loss"),), lambda m: (
        LF.distillation_loss, (m.x(7, 9), m.x(7, 9)), {"beta": 1.0, "reduction": "none"},
    )),
    Case("linear_distillation_loss", (_fn("linear_distillation_loss"),), lambda m: (
        LF.linear_distillation_loss, (m.x(7, 4), m.x(9, 4), m.x(7, 5, grad=False), m.x(9, 5, grad=False),
                                      m.index(9, 7, ignore=-100)),
        {"student_bias": m.x(9), "weight_hard_loss": 0.25, "chunk_size": 3},
    )),
    Case("linear_distillation_loss-none", (_fn("linear_distillation_loss"),), lambda m: (
        LF.linear_distillation_loss, (m.x(7, 4), m.x(9, 4), m.x(7, 5, grad=False), m.x(9, 5, grad=False)),
        {"beta": 0.0, "reduction": "none", "chunk_size": 4},
    )),
    Case("topk_distillation_loss", (_fn("topk_distillation_loss"),), lambda m: (
        LF.topk_distillation_loss, (m.x(7, 9), torch.tensor([[0, 3], [1, 2], [4, 5], [0, 1], [2, 6], [3, 4], [5, 6]],
                                                            device=m.device),
                                    m.const(torch.tensor([0.5, 0.3]).log().expand(7, 2)), m.index(9, 7, ignore=-100)),
        {"beta": 0.4},
    )),
    # margin and embedding
    Case("soft_margin_loss", (_fn("soft_margin_loss"),), lambda m: (LF.soft_margin_loss, (m.x(4, 3), m.sign(4, 3)), {})),
    Case("multilabel_soft_margin_loss", (_fn("multilabel_soft_margin_loss"),), lambda m: (
        LF.multilabel_soft_margin_loss, (m.x(4, 3), m.rand(4, 3).round()), {"weight": m.rand(3)},
    )),
    Case("multilabel_margin_loss", (_fn("multilabel_margin_loss"),), lambda m: (
        LF.multilabel_margin_loss, (m.x(2, 4), torch.tensor([[3, 0, -1, 1], [1, 2, 0, 3]], device=m.device)), {},
    )),
    Case("multi_margin_loss", (_fn("multi_margin_loss"),), lambda m: (
        LF.multi_margin_loss, (m.x(4, 5), m.index(5, 4)), {"p": 2, "margin": 0.5, "weight": m.rand(5)},
    )),
    Case("margin_ranking_loss", (_fn("margin_ranking_loss"),), lambda m: (
        LF.margin_ranking_loss, (m.x(5), m.x(5), m.sign(5)), {"margin": 0.2},
    )),
    Case("hinge_embedding_loss", (_fn("hinge_embedding_loss"),), lambda m: (
        LF.hinge_embedding_loss, (m.x(5), m.sign(5)), {"margin": 0.5},
    )),
    Case("cosine_embedding_loss", (_fn("cosine_embedding_loss"),), lambda m: (
        LF.cosine_embedding_loss, (m.x(4, 3), m.x(4, 3), m.sign(4)), {"margin": 0.1},
    )),
    Case("pairwise_distance", (_fn("pairwise_distance"),), lambda m: (LF.pairwise_distance, (m.x(4, 3), m.x(4, 3)), {})),
    Case("triplet_margin_loss", (_fn("triplet_margin_loss"),), lambda m: (
        LF.triplet_margin_loss, (m.x(4, 3), m.x(4, 3), m.x(4, 3)), {"swap": True, "p": 1.5},
    )),
    Case("triplet_margin_with_distance_loss", (_fn("triplet_margin_with_distance_loss"),), lambda m: (
        LF.triplet_margin_with_distance_loss, (m.x(4, 3), m.x(4, 3), m.x(4, 3)),
        {"distance_function": _triplet_distance, "swap": True},
    )),
    # sequence
    Case("ctc_loss-padded", (_fn("ctc_loss"),), _ctc_padded),
    Case("ctc_loss-concatenated", (_fn("ctc_loss"),), _ctc_concatenated),
    Case("ctc_loss-concatenated-tensor-lengths", (_fn("ctc_loss"),), _ctc_concatenated_tensor_lengths,
         fullgraph=False),
    # beyond torch
    Case("sigmoid_focal_loss", (_fn("sigmoid_focal_loss"),), lambda m: (
        LF.sigmoid_focal_loss, (m.x(4, 3), m.rand(4, 3).round()), {"reduction": "mean"},
    )),
    Case("softmax_focal_loss", (_fn("softmax_focal_loss"),), lambda m: (
        LF.softmax_focal_loss, (m.x(4, 5), m.index(5, 4, ignore=-100)), {"alpha": m.rand(5), "gamma": 1.5},
    )),
    Case("poly1_cross_entropy", (_fn("poly1_cross_entropy"),), lambda m: (
        LF.poly1_cross_entropy, (m.x(2, 5, 3), m.index(5, 2, 3, ignore=-100)), {"epsilon": 2.0},
    )),
    Case("dice_loss", (_fn("dice_loss"),), lambda m: (LF.dice_loss, (m.x(2, 3, 4), m.index(3, 2, 4, ignore=-100)), {})),
    Case("dice_loss-probabilities", (_fn("dice_loss"),), lambda m: (
        LF.dice_loss, (m.probs(2, 4, 3).transpose(1, 2).requires_grad_(), m.probs(2, 4, 3).transpose(1, 2)),
        {"from_logits": False, "weight": m.rand(3)},
    )),
    Case("tversky_loss", (_fn("tversky_loss"),), lambda m: (
        LF.tversky_loss, (m.x(2, 3, 4), m.index(3, 2, 4)), {"alpha": 0.3, "beta": 0.7, "reduction": "none"},
    )),
    # fine-tuning language models: losses on log-probs
    Case("dpo_loss", (_fn("dpo_loss"),), lambda m: (
        LF.dpo_loss, (m.x(4, scale=3.0), m.x(4, scale=3.0), m.x(4, scale=3.0, grad=False), m.x(4, scale=3.0, grad=False)),
        {"beta": 0.3, "loss_type": "robust", "label_smoothing": 0.1},
    )),
    Case("dpo_loss-discopop-none", (_fn("dpo_loss"),), lambda m: (
        LF.dpo_loss, (m.x(4), m.x(4)), {"loss_type": "discopop", "reduction": "none"},
    )),
    Case("simpo_loss", (_fn("simpo_loss"),), lambda m: (
        LF.simpo_loss, (m.x(4), m.x(4)), {"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.1},
    )),
    Case("cpo_loss", (_fn("cpo_loss"),), lambda m: (LF.cpo_loss, (m.x(4, scale=5.0), m.x(4, scale=5.0)), {"beta": 0.2})),
    Case("orpo_loss", (_fn("orpo_loss"),), lambda m: (
        LF.orpo_loss, (m.leaf(-m.uniform(4, low=0.05, high=2.0)), m.leaf(-m.uniform(4, low=0.05, high=2.0))),
        {"beta": 0.5},
    )),
    Case("kto_loss", (_fn("kto_loss"),), lambda m: (
        LF.kto_loss, (m.x(5, scale=3.0), m.x(5, scale=3.0, grad=False), m.index(2, 5) == 1),
        {"kl": m.rand(1).squeeze(), "undesirable_weight": 1.5},
    )),
    Case("grpo_loss", (_fn("grpo_loss"),), lambda m: (
        LF.grpo_loss, (m.x(3, 5), m.x(3, 5, grad=False), m.x(3, grad=False), m.index(2, 3, 5)),
        {"ref_log_probs": m.x(3, 5, grad=False), "num_items": m.index(20, 1).squeeze() + 5},
    )),
    Case("grpo_loss-gspo-luspo", (_fn("grpo_loss"),), lambda m: (
        LF.grpo_loss, (m.x(3, 5), m.x(3, 5, grad=False), m.x(3, 5, grad=False), m.index(2, 3, 5) == 1),
        {"beta": 0.0, "loss_type": "luspo", "importance_sampling_level": "sequence", "delta": 1.5},
    )),
    Case("grpo_loss-sapo", (_fn("grpo_loss"),), lambda m: (
        LF.grpo_loss, (m.x(3, 5), None, m.x(3, grad=False), m.index(2, 3, 5)),
        {"ref_log_probs": m.x(3, 5, grad=False), "loss_type": "sapo"},
    )),
    # information measures
    Case("info.entropy", ("info.entropy",), lambda m: (info.entropy, (m.probs(3, 4, grad=True),), {"base": 2})),
    Case("info.entropy-logits", ("info.entropy",), lambda m: (info.entropy, (m.x(3, 4),), {"from_logits": True})),
    Case("info.cross_entropy", ("info.cross_entropy",), lambda m: (
        info.cross_entropy, (m.probs(3, 4), m.probs(3, 4, grad=True)), {},
    )),
    Case("info.kl_divergence", ("info.kl_divergence",), lambda m: (
        info.kl_divergence, (m.x(3, 4), m.x(3, 4)), {"from_logits": True},
    )),
    Case("info.js_divergence", ("info.js_divergence",), lambda m: (
        info.js_divergence, (m.probs(3, 4, grad=True), m.probs(3, 4)), {"base": 2},
    )),
]


# nn Modules: each runs the functional case of the same loss through its Module.
def _module_case(cls_name: str, ctor: Callable[[Inputs], dict[str, Any]], args: Callable[[Inputs], tuple[Any, ...]],
                 fullgraph: bool = True) -> Case:
    def build(m: Inputs) -> Call:
        module = getattr(nn, cls_name)(**ctor(m))
        return module, args(m), {}

    return Case(f"nn.{cls_name}", (f"nn.{cls_name}",), build, fullgraph)


def _none(m: Inputs) -> dict[str, Any]:
    return {}


CASES += [
    _module_case("CrossEntropyLoss", lambda m: {"weight": m.rand(5, low=0.5), "label_smoothing": 0.1},
                 lambda m: (m.x(6, 5), m.index(5, 6, ignore=-100))),
    _module_case("NLLLoss", _none, lambda m: (m.x(4, 5).log_softmax(-1), m.index(5, 4))),
    _module_case("BCELoss", _none, lambda m: (m.rand(4, 3, low=0.05, high=0.95).requires_grad_(), m.rand(4, 3))),
    _module_case("BCEWithLogitsLoss", lambda m: {"pos_weight": m.rand(3, low=1, high=2)}, lambda m: (m.x(4, 3), m.rand(4, 3))),
    _module_case("LinearCrossEntropyLoss", lambda m: {"in_features": 4, "num_classes": 9, "device": m.device},
                 lambda m: (m.x(7, 4), m.index(9, 7))),
    _module_case("MSELoss", _none, lambda m: (m.x(4, 3), m.x(4, 3))),
    _module_case("L1Loss", _none, lambda m: (m.x(4, 3), m.x(4, 3))),
    _module_case("SmoothL1Loss", _none, lambda m: (m.x(4, 3), m.x(4, 3))),
    _module_case("HuberLoss", _none, lambda m: (m.x(4, 3), m.x(4, 3))),
    _module_case("PoissonNLLLoss", _none, lambda m: (m.x(4, 3), m.rand(4, 3, high=3.0))),
    _module_case("GaussianNLLLoss", _none, lambda m: (m.x(4, 3), m.x(4, 3), m.rand(4, 3, low=0.1))),
    _module_case("KLDivLoss", lambda m: {"reduction": "batchmean"}, lambda m: (m.x(4, 5).log_softmax(-1), m.probs(4, 5))),
    _module_case("SoftMarginLoss", _none, lambda m: (m.x(4, 3), m.sign(4, 3))),
    _module_case("MultiLabelSoftMarginLoss", _none, lambda m: (m.x(4, 3), m.rand(4, 3).round())),
    _module_case("MultiLabelMarginLoss", _none, lambda m: (m.x(1, 4), torch.tensor([[3, 0, -1, 1]], device=m.device))),
    _module_case("MultiMarginLoss", _none, lambda m: (m.x(4, 5), m.index(5, 4))),
    _module_case("MarginRankingLoss", _none, lambda m: (m.x(5), m.x(5), m.sign(5))),
    _module_case("HingeEmbeddingLoss", _none, lambda m: (m.x(5), m.sign(5))),
    _module_case("CosineEmbeddingLoss", _none, lambda m: (m.x(4, 3), m.x(4, 3), m.sign(4))),
    _module_case("TripletMarginLoss", _none, lambda m: (m.x(4, 3), m.x(4, 3), m.x(4, 3))),
    _module_case("TripletMarginWithDistanceLoss", lambda m: {"distance_function": _triplet_distance},
                 lambda m: (m.x(4, 3), m.x(4, 3), m.x(4, 3))),
    _module_case("SigmoidFocalLoss", lambda m: {"gamma": 0.5, "reduction": "mean"},
                 lambda m: (m.x(4, 3), m.rand(4, 3).round())),
    _module_case("SoftmaxFocalLoss", lambda m: {"alpha": m.rand(5), "gamma": 1.5},
                 lambda m: (m.x(4, 5), m.index(5, 4, ignore=-100))),
    _module_case("Poly1CrossEntropyLoss", lambda m: {"epsilon": 2.0}, lambda m: (m.x(4, 5), m.index(5, 4, ignore=-100))),
    _module_case("DiceLoss", lambda m: {"ignore_index": -100}, lambda m: (m.x(2, 3, 4), m.index(3, 2, 4, ignore=-100))),
    _module_case("TverskyLoss", lambda m: {"alpha": 0.3, "beta": 0.7, "weight": m.rand(3, low=0.5)},
                 lambda m: (m.x(2, 3, 4), m.index(3, 2, 4))),
    _module_case("JSDivergenceLoss", lambda m: {"from_logits": True, "beta": 0.3}, lambda m: (m.x(4, 5), m.x(4, 5))),
    _module_case("DPOLoss", lambda m: {"loss_type": "ipo", "beta": 0.5}, lambda m: (m.x(4), m.x(4), m.x(4), m.x(4))),
    _module_case("SimPOLoss", _none, lambda m: (m.x(4), m.x(4))),
    _module_case("CPOLoss", _none, lambda m: (m.x(4), m.x(4))),
    _module_case("ORPOLoss", _none, lambda m: (m.leaf(-m.uniform(4, low=0.05, high=2.0)),
                                               m.leaf(-m.uniform(4, low=0.05, high=2.0)))),
    _module_case("KTOLoss", lambda m: {"beta": 0.5}, lambda m: (m.x(5), m.x(5, grad=False), m.index(2, 5) == 1)),
    _module_case("GRPOLoss", lambda m: {"loss_type": "grpo"}, lambda m: (
        m.x(3, 5), m.x(3, 5, grad=False), m.x(3, grad=False), m.index(2, 3, 5), m.x(3, 5, grad=False))),
    _module_case("DistillationLoss", lambda m: {"beta": 0.2}, lambda m: (m.x(7, 9), m.x(7, 9, grad=False),
                                                                         m.index(9, 7, ignore=-100))),
    _module_case("LinearDistillationLoss", lambda m: {"chunk_size": 2}, lambda m: (
        m.x(7, 4), m.x(9, 4), m.x(7, 5, grad=False), m.x(9, 5, grad=False), m.index(9, 7, ignore=-100))),
    _module_case("TopKDistillationLoss", lambda m: {"beta": 0.0}, lambda m: (
        m.x(3, 9), torch.tensor([[0, 3], [1, 2], [4, 5]], device=m.device),
        m.const(torch.tensor([0.5, 0.3]).log().expand(3, 2)))),
    _module_case("CTCLoss", _none, lambda m: (
        m.x(6, 2, 4).log_softmax(-1), m.index(3, 2, 3) + 1, torch.tensor([6, 5]), torch.tensor([3, 2]),
    )),
]


# Keras: y_true as a tensor, a list or a NumPy array (Keras users pass all three).
def _keras_case(name: str, y_true: Callable[[Inputs], Any], y_pred: Callable[[Inputs], Any],
                ctor: dict[str, Any] | None = None, sample_weight: bool = False) -> list[Case]:
    function = getattr(keras, _KERAS_FUNCTIONS[name])

    def call_function(m: Inputs) -> Call:
        return function, (y_true(m), y_pred(m)), dict(ctor or {})

    def call_class(m: Inputs) -> Call:
        kwargs = {"sample_weight": np.linspace(0.5, 1.5, 4).astype(np.float32)} if sample_weight else {}
        return getattr(keras, name)(**(ctor or {})), (y_true(m), y_pred(m)), kwargs

    return [
        Case(f"keras.{_KERAS_FUNCTIONS[name]}", (f"keras.{_KERAS_FUNCTIONS[name]}",), call_function),
        Case(f"keras.{name}", (f"keras.{name}",), call_class),
    ]


_KERAS_FUNCTIONS = {
    "BinaryCrossentropy": "binary_crossentropy",
    "BinaryFocalCrossentropy": "binary_focal_crossentropy",
    "CategoricalCrossentropy": "categorical_crossentropy",
    "CategoricalFocalCrossentropy": "categorical_focal_crossentropy",
    "CategoricalGeneralizedCrossEntropy": "categorical_generalized_cross_entropy",
    "CategoricalHinge": "categorical_hinge",
    "CosineSimilarity": "cosine_similarity",
    "Dice": "dice",
    "Hinge": "hinge",
    "Huber": "huber",
    "KLDivergence": "kl_divergence",
    "LogCosh": "log_cosh",
    "MeanAbsoluteError": "mean_absolute_error",
    "MeanAbsolutePercentageError": "mean_absolute_percentage_error",
    "MeanSquaredError": "mean_squared_error",
    "MeanSquaredLogarithmicError": "mean_squared_logarithmic_error",
    "Poisson": "poisson",
    "SparseCategoricalCrossentropy": "sparse_categorical_crossentropy",
    "SquaredHinge": "squared_hinge",
    "Tversky": "tversky",
}


def _one_hot_list(m: Inputs) -> list[list[float]]:
    return [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def _binary_numpy(m: Inputs) -> np.ndarray:
    return np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=np.float32)


def _probs(m: Inputs) -> torch.Tensor:
    return m.probs(4, 3, grad=True)


def _sigmoids(m: Inputs) -> torch.Tensor:
    return m.rand(4, 3, low=0.05, high=0.95).requires_grad_()


def _reals(m: Inputs) -> torch.Tensor:
    return m.x(4, 3)


def _positives(m: Inputs) -> torch.Tensor:
    return m.rand(4, 3, low=0.5, high=2.0).requires_grad_()


for _name, _true, _pred, _options, _weighted in [
    ("BinaryCrossentropy", _binary_numpy, _reals, {"from_logits": True, "label_smoothing": 0.1}, True),
    ("BinaryFocalCrossentropy", _binary_numpy, _sigmoids, {"apply_class_balancing": True}, False),
    ("CategoricalCrossentropy", _one_hot_list, _probs, {"label_smoothing": 0.1}, True),
    ("CategoricalFocalCrossentropy", _one_hot_list, _reals, {"from_logits": True}, False),
    ("CategoricalGeneralizedCrossEntropy", lambda m: [0, 2, 1, 0], _probs, {"q": 0.5}, False),
    ("CategoricalHinge", _one_hot_list, _reals, None, False),
    ("CosineSimilarity", lambda m: m.x(4, 3, grad=False), _reals, None, False),
    ("Dice", _binary_numpy, _sigmoids, None, False),
    ("Hinge", _binary_numpy, _reals, None, True),
    ("Huber", lambda m: m.x(4, 3, grad=False), _reals, {"delta": 0.5}, True),
    ("KLDivergence", _one_hot_list, _probs, None, False),
    ("LogCosh", lambda m: m.x(4, 3, grad=False), _reals, None, False),
    ("MeanAbsoluteError", lambda m: m.x(4, 3, grad=False), _reals, None, True),
    ("MeanAbsolutePercentageError", lambda m: m.rand(4, 3, low=1, high=2), _reals, None, False),
    ("MeanSquaredError", lambda m: m.x(4, 3, grad=False), _reals, None, True),
    ("MeanSquaredLogarithmicError", lambda m: m.rand(4, 3, high=2), _positives, None, False),
    ("Poisson", lambda m: m.rand(4, 3, high=3), _positives, None, False),
    ("SparseCategoricalCrossentropy", lambda m: np.array([0, 2, 1, 0]), _reals, {"from_logits": True, "ignore_class": 1},
     True),
    ("SquaredHinge", _binary_numpy, _reals, None, False),
    ("Tversky", _binary_numpy, _sigmoids, {"alpha": 0.3, "beta": 0.7}, False),
]:
    CASES += _keras_case(_name, _true, _pred, _options, _weighted)


# What the cases deliberately leave out of `covered_names`: aliases of covered names and
# the base class, which is no loss.
KERAS_ALIASES = {"MAE", "MSE", "mae", "mape", "mse", "msle", "Loss"}


def public_losses() -> set[str]:
    """Every public loss of losskit, as 'module.name'."""
    import losskit.functional

    names = {f"functional.{n}" for n in losskit.functional.__all__}
    names |= {f"nn.{n}" for n in nn.__all__}
    names |= {f"keras.{n}" for n in keras.__all__ if n not in KERAS_ALIASES}
    names |= {f"info.{n}" for n in info.__all__}
    return names


def covered_names() -> set[str]:
    return {name for case in CASES for name in case.covers}
