"""`losskit bench catalog`: every loss of the catalog against torch, forward + backward.

One registry, :data:`BENCHES`, holds one :class:`Bench` per public loss function: the
losskit function (by its public name), the reference it is measured against, and the kind
of inputs both take. The reference is

- torch's function of the same name for the torch twins (``functional.cross_entropy`` vs
  ``torch.nn.functional.cross_entropy``);
- for a Keras form, torch's own function where one computes the same per-sample loss
  (``keras.mean_squared_error`` vs ``torch.nn.functional.mse_loss(..., reduction='none')
  .mean(-1)``), otherwise the Keras formula written with torch ops; and, beside it, the
  same loss through losskit.functional (provider ``losskit.functional``), which shows what
  the Keras layer costs on top;
- for the losses torch does not have (focal, Poly-1, dice, Tversky, JS divergence,
  ``info.*``), the definition written out in plain torch below: a few obviously-correct
  lines each.

Each cell (loss, size, dtype) builds its inputs once, warms every provider up (compiling,
for ``torch.compile``), then times the providers call by call in turn, rotating which goes
first, with ``time.perf_counter`` around a synchronised forward + backward; the number of
repetitions comes from a time budget per cell (hundreds at the small size, where the
per-call overhead is what a user pays every step). Rows: p20 / p50 / p80 of the forward
alone and of forward + backward, and each provider's ratio to torch's p50 (compiled
losskit against compiled torch).

A new loss (post-training losses included) is one more :class:`Bench` in
:data:`BENCHES`, with an input kind from :data:`INPUTS` or a new one beside them.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as TF

CSV_FIELDS = [
    "kernel", "entry", "provider", "mode", "size", "shape", "dtype", "options", "metric", "unit",
    "p50", "p20", "p80", "reps", "ratio_to_torch", "note", "device", "timestamp", "version", "commit",
]
SIZES = ("small", "large")
DTYPES = ("float32", "bfloat16")
MODES = ("forward", "full")
# (mode, metric, key of the measurements): wall time of the forward and of forward +
# backward, and the process's CPU time of forward + backward, which a busy machine's
# preemptions do not inflate (it counts every thread of this process, so it exceeds the
# wall time where an op runs on several).
METRICS = (("forward", "time", "forward"), ("full", "time", "full"), ("full", "cpu_time", "cpu"))
EPS = 1e-7  # keras.config.epsilon(), for the written-out Keras formulas

Args = tuple  # the positional arguments of one call, in the losskit function's order


# -- inputs ---------------------------------------------------------------------------------
# An input kind makes (leaves, args) for a size and dtype: the leaves get gradients, args
# are passed to both providers. Shapes: the small size is an everyday batch of 64; the large
# one a (4096, 1000) classifier head or 2M elements.


@dataclass(frozen=True)
class Inputs:
    shapes: dict[str, tuple[int, ...]]  # size -> the main tensor's shape
    make: Callable[[tuple[int, ...], torch.dtype, torch.Generator], tuple[list[torch.Tensor], Args]]


def _randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _leaf(t):
    return t.detach().requires_grad_()


def _classes(n, c, gen):
    return torch.randint(0, c, (n,), generator=gen)


def _regression(shape, dtype, gen):
    x = _leaf(_randn(shape, dtype, gen))
    return [x], (x, _randn(shape, dtype, gen))


def _positive(shape, dtype, gen):  # a rate > 0 and counts (Poisson, MSLE, MAPE)
    x = _leaf((torch.rand(shape, generator=gen) * 4 + 0.1).to(dtype))
    return [x], (x, torch.poisson(torch.full(shape, 2.0), generator=gen).add_(0.5).to(dtype))


def _probabilities(shape, dtype, gen):  # predicted probabilities in (0, 1), soft targets
    x = _leaf((torch.rand(shape, generator=gen) * 0.98 + 0.01).to(dtype))
    return [x], (x, torch.rand(shape, generator=gen).to(dtype))


def _binary_logits(shape, dtype, gen):
    x = _leaf(_randn(shape, dtype, gen))
    return [x], (x, torch.bernoulli(torch.full(shape, 0.3), generator=gen).to(dtype))


def _signs(shape, dtype, gen):  # scores and ±1 labels
    x = _leaf(_randn(shape, dtype, gen))
    return [x], (x, (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(dtype))


def _logits(shape, dtype, gen):
    x = _leaf(_randn(shape, dtype, gen))
    return [x], (x, _classes(shape[0], shape[1], gen))


def _log_probs(shape, dtype, gen):
    x = _leaf(torch.randn(shape, generator=gen).log_softmax(-1).to(dtype))
    return [x], (x, _classes(shape[0], shape[1], gen))


def _one_hot_probs(shape, dtype, gen):  # Keras categorical: softmax output, one-hot labels
    x = _leaf(torch.randn(shape, generator=gen).softmax(-1).to(dtype))
    return [x], (x, TF.one_hot(_classes(shape[0], shape[1], gen), shape[1]).to(dtype))


def _class_probs(shape, dtype, gen):  # Keras sparse forms on probabilities
    x = _leaf(torch.randn(shape, generator=gen).softmax(-1).to(dtype))
    return [x], (x, _classes(shape[0], shape[1], gen))


def _multi_hot(shape, dtype, gen):
    x = _leaf(_randn(shape, dtype, gen))
    return [x], (x, torch.bernoulli(torch.full(shape, 0.1), generator=gen).to(dtype))


def _label_lists(shape, dtype, gen):  # multilabel_margin: 3 labels per row, then -1
    x = _leaf(_randn(shape, dtype, gen))
    target = torch.full(shape, -1, dtype=torch.long)
    target[:, :3] = torch.stack([torch.randperm(shape[1], generator=gen)[:3] for _ in range(shape[0])])
    return [x], (x, target)


def _pairs(shape, dtype, gen):  # two embeddings per row and a ±1 label per row
    a, b = _leaf(_randn(shape, dtype, gen)), _leaf(_randn(shape, dtype, gen))
    return [a, b], (a, b, (torch.randint(0, 2, shape[:1], generator=gen) * 2 - 1).to(dtype))


def _ranked(shape, dtype, gen):  # margin ranking: two scores and a ±1 label per element
    a, b = _leaf(_randn(shape, dtype, gen)), _leaf(_randn(shape, dtype, gen))
    return [a, b], (a, b, (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(dtype))


def _two(shape, dtype, gen):
    a, b = _leaf(_randn(shape, dtype, gen)), _leaf(_randn(shape, dtype, gen))
    return [a, b], (a, b)


def _triplets(shape, dtype, gen):
    leaves = [_leaf(_randn(shape, dtype, gen)) for _ in range(3)]
    return leaves, tuple(leaves)


def _gaussian(shape, dtype, gen):
    x, var = _leaf(_randn(shape, dtype, gen)), _leaf((torch.rand(shape, generator=gen) + 0.5).to(dtype))
    return [x, var], (x, _randn(shape, dtype, gen), var)


def _ctc(shape, dtype, gen):  # (T, N, C); targets of length T // 4 in 1..C-1, blank 0
    t, n, c = shape
    s = t // 4
    x = _leaf(torch.randn(shape, generator=gen).log_softmax(-1).to(dtype))
    targets = torch.randint(1, c, (n, s), generator=gen)
    return [x], (x, targets, torch.full((n,), t, dtype=torch.long), torch.full((n,), s, dtype=torch.long))


def _segmentation(shape, dtype, gen):  # logits [N, C, ...] and class indices [N, ...]
    x = _leaf(_randn(shape, dtype, gen))
    return [x], (x, torch.randint(0, shape[1], shape[:1] + shape[2:], generator=gen))


def _masks(shape, dtype, gen):  # Keras dice / tversky: predicted probabilities, 0/1 mask
    x = _leaf(torch.rand(shape, generator=gen).to(dtype))
    return [x], (x, torch.bernoulli(torch.full(shape, 0.3), generator=gen).to(dtype))


def _two_log_distributions(shape, dtype, gen):  # student and teacher log-probabilities
    x = _leaf(torch.randn(shape, generator=gen).log_softmax(-1).to(dtype))
    return [x], (x, torch.randn(shape, generator=gen).log_softmax(-1).to(dtype))


def _distribution(shape, dtype, gen):
    p = _leaf(torch.randn(shape, generator=gen).softmax(-1).to(dtype))
    return [p], (p,)


def _two_distributions(shape, dtype, gen):  # p fixed, q learned (the first argument is the data)
    q = _leaf(torch.randn(shape, generator=gen).softmax(-1).to(dtype))
    return [q], (torch.randn(shape, generator=gen).softmax(-1).to(dtype), q)


def _linear(shape, dtype, gen):  # (N, H, C): features, a [C, H] weight, class indices
    n, h, c = shape
    x, w = _leaf(_randn((n, h), dtype, gen)), _leaf(_randn((c, h), dtype, gen, 0.02))
    return [x, w], (x, w, _classes(n, c, gen))


def _two_logits(shape, dtype, gen):  # distillation: student logits (learned) and teacher logits
    s = _leaf(_randn(shape, dtype, gen, 2.0))
    return [s], (s, _randn(shape, dtype, gen, 2.0))


def _two_heads(shape, dtype, gen):  # (N, H, V): student and teacher hidden states and output layers
    n, h, v = shape
    xs, ws = _leaf(_randn((n, h), dtype, gen)), _leaf(_randn((v, h), dtype, gen, 0.05))
    return [xs, ws], (xs, ws, _randn((n, h), dtype, gen), _randn((v, h), dtype, gen, 0.05))


def _topk_teacher(shape, dtype, gen):  # student logits and a teacher's cached top-8 ids and log-probs
    s = _leaf(_randn(shape, dtype, gen, 2.0))
    logps, ids = (torch.randn(shape, generator=gen) * 2).log_softmax(-1).topk(8)
    return [s], (s, ids, logps.to(dtype))


def _sequence_log_probs(shape, dtype, gen):
    """For post-training losses: per-sequence log-probs of the policy (chosen, rejected) and
    of the reference model, [B] each; a loss over per-token log-probs takes a new kind."""
    (b,) = shape
    chosen, rejected = _leaf(-_randn((b,), dtype, gen).abs() * 50), _leaf(-_randn((b,), dtype, gen).abs() * 50)
    ref = [(-_randn((b,), dtype, gen).abs() * 50) for _ in range(2)]
    return [chosen, rejected], (chosen, rejected, *ref)


def _sequence_log_prob_pairs(shape, dtype, gen):
    """Per-token mean log-probs of a chosen and a rejected completion, [B] each (SimPO, CPO,
    ORPO: no reference; ORPO wants them below 0)."""
    (b,) = shape
    chosen, rejected = _leaf(-_randn((b,), dtype, gen).abs() - 0.05), _leaf(-_randn((b,), dtype, gen).abs() - 0.05)
    return [chosen, rejected], (chosen, rejected)


def _unpaired_log_probs(shape, dtype, gen):  # KTO: summed log-probs, reference, desirable flags
    (b,) = shape
    logps = _leaf(-_randn((b,), dtype, gen).abs() * 50)
    return [logps], (logps, -_randn((b,), dtype, gen).abs() * 50, torch.randn(b, generator=gen) > 0)


def _token_log_probs(shape, dtype, gen):  # GRPO: (B, T) log-probs, old ones, advantages, a mask
    b, t = shape
    lp = -_randn((b, t), dtype, gen).abs()
    old = (lp.float() + _randn((b, t), torch.float32, gen, 0.1)).to(dtype)
    mask = torch.arange(t) < torch.randint(1, t + 1, (b, 1), generator=gen)
    return [_leaf(lp)], (_leaf(lp), old, _randn((b,), dtype, gen), mask)


ELEMENTS = {"small": (64, 16), "large": (2048, 1024)}
CLASSES = {"small": (64, 10), "large": (4096, 1000)}
INPUTS: dict[str, Inputs] = {
    "regression": Inputs(ELEMENTS, _regression),
    "positive": Inputs(ELEMENTS, _positive),
    "probabilities": Inputs(ELEMENTS, _probabilities),
    "binary_logits": Inputs(ELEMENTS, _binary_logits),
    "signs": Inputs(ELEMENTS, _signs),
    "logits": Inputs(CLASSES, _logits),
    "log_probs": Inputs(CLASSES, _log_probs),
    "one_hot_probs": Inputs(CLASSES, _one_hot_probs),
    "class_probs": Inputs(CLASSES, _class_probs),
    "multi_hot": Inputs(CLASSES, _multi_hot),
    "label_lists": Inputs(CLASSES, _label_lists),
    "pairs": Inputs(ELEMENTS, _pairs),
    "ranked": Inputs(ELEMENTS, _ranked),
    "two": Inputs(ELEMENTS, _two),
    "triplets": Inputs(ELEMENTS, _triplets),
    "gaussian": Inputs(ELEMENTS, _gaussian),
    "ctc": Inputs({"small": (50, 16, 20), "large": (400, 32, 64)}, _ctc),
    "segmentation": Inputs({"small": (64, 4, 16), "large": (16, 8, 128, 128)}, _segmentation),
    "masks": Inputs(ELEMENTS, _masks),
    "two_log_distributions": Inputs(CLASSES, _two_log_distributions),
    "distribution": Inputs(CLASSES, _distribution),
    "two_distributions": Inputs(CLASSES, _two_distributions),
    "two_logits": Inputs(CLASSES, _two_logits),
    "two_heads": Inputs({"small": (64, 128, 1000), "large": (1024, 512, 16384)}, _two_heads),
    "topk_teacher": Inputs(CLASSES, _topk_teacher),
    # (N, H, C): the large size is a 16k vocabulary, so that a CPU run stays within minutes
    "linear": Inputs({"small": (64, 128, 1000), "large": (1024, 512, 16384)}, _linear),
    "sequence_log_probs": Inputs({"small": (64,), "large": (8192,)}, _sequence_log_probs),
    "sequence_log_prob_pairs": Inputs({"small": (64,), "large": (8192,)}, _sequence_log_prob_pairs),
    "unpaired_log_probs": Inputs({"small": (64,), "large": (8192,)}, _unpaired_log_probs),
    "token_log_probs": Inputs({"small": (64, 128), "large": (256, 4096)}, _token_log_probs),
}


# -- the written-out definitions (plain torch) ----------------------------------------------


def sigmoid_focal(x, t, alpha=0.25, gamma=2.0, reduction="mean"):  # torchvision.ops.sigmoid_focal_loss
    p = torch.sigmoid(x)
    ce = TF.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    return ((alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma).mean()


def softmax_focal(x, t, gamma=2.0):  # -(1 - p_y)^gamma log p_y, mean over samples
    log_p = x.float().log_softmax(-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean().to(x.dtype)


def poly1(x, t, epsilon=1.0):  # CE + epsilon (1 - p_y), mean over samples
    ce = TF.cross_entropy(x, t, reduction="none")
    p_y = x.softmax(-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    return (ce + epsilon * (1 - p_y)).mean()


def log_probs(x, w, t):  # the logits materialised: log_softmax, gathered at the targets
    return TF.linear(x, w).float().log_softmax(-1).gather(1, t[:, None]).squeeze(1).to(x.dtype)


def log_probs_and_entropy(x, w, t):
    z = TF.linear(x, w).float().log_softmax(-1)
    return z.gather(1, t[:, None]).squeeze(1).to(x.dtype), -(z.exp() * z).sum(-1).to(x.dtype)


def dpo(c, r, rc, rr, beta=0.1):  # Rafailov et al.: -log sigmoid(beta h), mean over pairs
    return -TF.logsigmoid(beta * ((c - rc) - (r - rr))).mean()


def simpo(c, r, beta=2.0, gamma=1.0):  # Meng et al., on per-token mean log-probs
    return -TF.logsigmoid(beta * (c - r) - gamma).mean()


def cpo(c, r, beta=0.1):  # Xu et al.'s preference term
    return -TF.logsigmoid(beta * (c - r)).mean()


def orpo(c, r, beta=0.1):  # Hong et al.: -beta log sigmoid(log odds ratio)
    log_odds = (c - r) - (torch.log1p(-c.exp()) - torch.log1p(-r.exp()))
    return -beta * TF.logsigmoid(log_odds).mean()


def kto(logps, ref, desirable, beta=0.1):  # Ethayarajh et al. with z0 = 0
    r = logps - ref
    return torch.where(desirable, 1 - torch.sigmoid(beta * r), 1 - torch.sigmoid(-beta * r)).mean()


def grpo(lp, old, adv, mask, beta=0.0):  # DAPO: the clipped surrogate over this batch's tokens
    ratio = torch.exp(lp - old)
    a = adv.unsqueeze(-1)
    per_token = -torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _soft_counts(x, t):  # softmax over classes; TP, sum p, sum t per (sample, class)
    p = x.float().softmax(1)
    truth = TF.one_hot(t, x.shape[1]).movedim(-1, 1).float()
    dims = tuple(range(2, x.dim()))
    return (p * truth).sum(dims), p.sum(dims), truth.sum(dims)


def dice(x, t, smooth=1.0):
    tp, p, g = _soft_counts(x, t)
    return (1 - (2 * tp + smooth) / (p + g + smooth)).mean().to(x.dtype)


def tversky(x, t, alpha=0.5, beta=0.5, smooth=1.0):
    tp, p, g = _soft_counts(x, t)
    return (1 - (tp + smooth) / (tp + alpha * (p - tp) + beta * (g - tp) + smooth)).mean().to(x.dtype)


def js(log_q, log_p, beta=0.5):  # beta KL(P||M) + (1 - beta) KL(Q||M), M = beta P + (1 - beta) Q; batchmean
    q, p = log_q.float().exp(), log_p.float().exp()
    log_m = (beta * p + (1 - beta) * q).log()
    rows = beta * (p * (log_p.float() - log_m)).sum(-1) + (1 - beta) * (q * (log_q.float() - log_m)).sum(-1)
    return rows.mean().to(log_q.dtype)


def _gjsd_rows(log_q, log_p, beta):  # beta KL(P||M) + (1 - beta) KL(Q||M), per row, in float32
    log_q, log_p = log_q.float(), log_p.float()
    q, p = log_q.exp(), log_p.exp()
    log_m = (beta * p + (1 - beta) * q).log()
    return beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)


def distillation(s, t, beta=0.5):  # TRL's generalized_jsd_loss without labels: mean over tokens
    return _gjsd_rows(s.float().log_softmax(-1), t.float().log_softmax(-1), beta).mean().to(s.dtype)


def linear_distillation(xs, ws, xt, wt, beta=0.5):  # both logits formed, the teacher's without gradient
    return distillation(xs @ ws.T, (xt @ wt.T).detach(), beta)


def topk_distillation(s, ids, logps, beta=0.5):  # k + 1 buckets: the teacher's top-k and the rest
    q_top = s.float().softmax(-1).gather(-1, ids)
    q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    p_top = logps.float().exp()
    p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    return _gjsd_rows(q.log(), p.log(), beta).mean().to(s.dtype)


def info_entropy(p):
    return -torch.special.xlogy(p, p).sum(-1)


def info_cross_entropy(p, q):
    return -torch.special.xlogy(p, q).sum(-1)


def info_kl(p, q):
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(-1)


def info_js(p, q):
    m = (p + q) / 2
    return (info_kl(p, m) + info_kl(q, m)) / 2


# Keras formulas (y_true, y_pred), per sample; torch's own function where one computes them.
def k_mse(t, x):
    return TF.mse_loss(x, t, reduction="none").mean(-1)


def k_mae(t, x):
    return TF.l1_loss(x, t, reduction="none").mean(-1)


def k_huber(t, x):
    return TF.huber_loss(x, t, reduction="none").mean(-1)


def k_log_cosh(t, x):
    e = x - t
    return (e + TF.softplus(-2.0 * e) - math.log(2.0)).mean(-1)


def k_mape(t, x):
    return 100.0 * ((t - x) / t.abs().clamp_min(EPS)).abs().mean(-1)


def k_msle(t, x):
    return (torch.log1p(x.clamp_min(EPS)) - torch.log1p(t.clamp_min(EPS))).square().mean(-1)


def k_poisson(t, x):
    return (x - t * (x + EPS).log()).mean(-1)


def k_bce(t, x):
    return TF.binary_cross_entropy(x.clamp(EPS, 1 - EPS), t, reduction="none").mean(-1)


def k_binary_focal(t, x, gamma=2.0):
    bce = TF.binary_cross_entropy(x.clamp(EPS, 1 - EPS), t, reduction="none")
    p_t = t * x + (1 - t) * (1 - x)
    return ((1 - p_t) ** gamma * bce).mean(-1)


def k_hinge(t, x):
    return (1.0 - t * x).clamp_min(0.0).mean(-1)


def k_squared_hinge(t, x):
    return (1.0 - t * x).clamp_min(0.0).square().mean(-1)


def k_categorical(t, x):
    p = (x / x.sum(-1, keepdim=True)).clamp(EPS, 1 - EPS)
    return -(t * p.log()).sum(-1)


def k_sparse_categorical(t, x, from_logits=True):  # from_logits: torch's cross-entropy per sample
    return TF.cross_entropy(x, t, reduction="none")


def k_categorical_focal(t, x, alpha=0.25, gamma=2.0):
    p = (x / x.sum(-1, keepdim=True)).clamp(EPS, 1 - EPS)
    return (alpha * (1 - p) ** gamma * (-t * p.log())).sum(-1)


def k_generalized_ce(t, x, q=0.5):
    p_y = x.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    return (1 - p_y**q) / q


def k_categorical_hinge(t, x):
    return ((((1 - t) * x).amax(-1) - (t * x).sum(-1)) + 1).clamp_min(0.0)


def k_cosine(t, x):
    return -(TF.normalize(t, dim=-1, eps=EPS) * TF.normalize(x, dim=-1, eps=EPS)).sum(-1)


def k_kl(t, x):
    t, x = t.clamp(EPS, 1), x.clamp(EPS, 1)
    return (t * (t / x).log()).sum(-1)


def k_dice(t, x):
    return 1 - 2 * (t * x).sum() / (t.sum() + x.sum() + EPS)


def k_tversky(t, x, alpha=0.5, beta=0.5):
    tp = (t * x).sum()
    return 1 - tp / (tp + alpha * ((1 - x) * t).sum() + beta * (x * (1 - t)).sum() + EPS)


# -- the registry --------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    """One public loss function measured against its reference.

    ``name`` is the public losskit name ('functional.cross_entropy', 'keras.mse',
    'info.entropy'); ``torch`` the reference, called with the same arguments; ``kwargs``
    go to both. A Keras form (or anything else returning one loss per sample) is averaged
    to a scalar, for both providers alike, before the backward pass.
    """

    name: str
    entry: str  # the catalog key
    inputs: str  # a key of INPUTS
    torch: Callable
    kwargs: dict = field(default_factory=dict)
    twin: Callable | None = None  # the same loss through losskit.functional (Keras forms)
    aliases: tuple[str, ...] = ()  # other public names of the very same function
    compile: bool = False  # also time torch.compile of both
    note: str = ""  # where losskit deliberately computes more than the reference

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def losskit(self) -> Callable:
        import importlib

        module, _, attr = self.name.rpartition(".")
        return getattr(importlib.import_module(f"losskit.{module}"), attr)


def _lk(name: str) -> Callable:
    """A losskit.functional twin, found when called (the registry imports nothing of losskit)."""

    def twin(*args, **kwargs):
        import losskit.functional as LF

        return getattr(LF, name)(*args, **kwargs)

    return twin


def _swap_none_mean(name: str, **fixed) -> Callable:
    """losskit.functional.NAME(y_pred, y_true, reduction='none').mean(-1): a Keras form's twin."""
    return lambda t, x: _lk(name)(x, t, reduction="none", **fixed).mean(-1)


CHECKS_TARGETS = "checks every class index on the host (checks mode 'full', the CPU default)"
CHECKS_PROBS = "checks the inputs are probabilities that sum to 1 (checks mode 'full', the CPU default)"
# Half-type inputs: losskit widens them and computes in float32, rounding the loss and the
# gradient once, where torch's kernel (or the written-out reference) rounds every op's result
# to bfloat16: more accurate, and its passes move float32 instead of bfloat16 (at the large
# size, memory-bound, that is what the bfloat16 ratio measures).
F32_MATH = "bfloat16: computes in float32 and rounds the loss and gradient once (torch rounds each op to bfloat16)"
# The fused triplet keeps two gradients for backward, as torch keeps two differences.
TRIPLET = F32_MATH + "; without swap the anchor's gradient is formed in backward as minus the sum of the other two"
HINGE_NOTE = ("accepts {0, 1} labels too, as Keras does: one read of the labels tests them before the one fused "
              "pass, which rounds each op to bfloat16 as torch does")
# Where losskit deliberately computes more than the reference: loss name -> note.
NOTES: dict[str, str] = {
    "functional.poisson_nll_loss": F32_MATH,
    "functional.gaussian_nll_loss": F32_MATH,
    "functional.kl_div": F32_MATH,
    "functional.sigmoid_focal_loss": F32_MATH,
    "functional.soft_margin_loss": F32_MATH,
    "functional.multilabel_soft_margin_loss": F32_MATH,
    "functional.margin_ranking_loss": F32_MATH,
    "functional.hinge_embedding_loss": F32_MATH,
    "functional.cosine_embedding_loss": F32_MATH,
    "functional.triplet_margin_loss": TRIPLET,
    "functional.triplet_margin_with_distance_loss": TRIPLET,
    "functional.cross_entropy": "checks the class indices on the host and looks at the first rows for probabilities "
                                "given as logits (a warning; CPU eager only)",
    "functional.nll_loss": CHECKS_TARGETS,
    "functional.multi_margin_loss": CHECKS_TARGETS,
    "functional.multilabel_margin_loss": CHECKS_TARGETS,
    "functional.binary_cross_entropy": "checks that input and target lie in [0, 1] on the host (checks mode 'full', "
                                       "the CPU default)",
    "functional.softmax_focal_loss": CHECKS_TARGETS,
    "functional.poly1_cross_entropy": CHECKS_TARGETS,
    "functional.dice_loss": CHECKS_TARGETS,
    "functional.tversky_loss": CHECKS_TARGETS,
    "functional.ctc_loss": "checks the lengths and labels on the host (checks mode 'full', the CPU default); one "
                           "log-space recursion for the whole batch, four ops a frame, its forward and reversed "
                           "problems on a thread each, where torch runs each sequence on a thread of its own",
    "info.entropy": CHECKS_PROBS,
    "info.cross_entropy": CHECKS_PROBS,
    "info.kl_divergence": CHECKS_PROBS + "; sums p (log p - log q) over p > 0, which keeps its digits where p is "
                          "near q (the written-out xlogy(p, p) - xlogy(p, q) cancels there)",
    "info.js_divergence": CHECKS_PROBS,
    "keras.sparse_categorical_crossentropy": CHECKS_TARGETS,
    "keras.hinge": HINGE_NOTE,
    "keras.squared_hinge": HINGE_NOTE,
    "functional.linear_cross_entropy": "never forms the [N, C] logits: chunks over tokens (less memory)",
    "functional.linear_log_probs": "never forms the [N, C] logits: forms each chunk again in backward (less memory)",
    "functional.linear_log_probs_and_entropy": "never forms the [N, C] logits: forms each chunk again in backward",
    "functional.dpo_loss": "computes bfloat16 in float32 (the written-out form computes in bfloat16)",
    "functional.simpo_loss": "computes bfloat16 in float32 (the written-out form computes in bfloat16)",
    "functional.cpo_loss": "computes bfloat16 in float32 (the written-out form computes in bfloat16)",
    "functional.kto_loss": "computes bfloat16 in float32 (the written-out form computes in bfloat16)",
    "functional.grpo_loss": "computes bfloat16 in float32 (the written-out form computes in bfloat16)",
    "functional.orpo_loss": "checks the log-probs are <= 0 on the host (checks mode 'full', the CPU default); forms "
                            "log(1 - e^x) in both of Maechler's branches (log1p(-e^x) loses digits near x = 0); "
                            "bfloat16 in float32 (the written-out form computes in bfloat16)",
    "functional.distillation_loss": "log-softmax as (x - max) - log sum exp(x - max), exact for large logits, and "
                                    "0 log 0 = 0 guards on p, q and the mixture (a dozen passes per chunk)",
    "functional.linear_distillation_loss": "never forms either model's [N, V] logits: chunks over tokens (less "
                                           "memory)",
    "functional.topk_distillation_loss": "checks the cached teacher (ids in range and distinct, log-probabilities) "
                                         "on the host, in one compiled read (checks mode 'full', the CPU default)",
}


def _b(name, entry, inputs, reference, **kw) -> Bench:
    return Bench(name, entry, inputs, reference, note=NOTES.get(name, ""), **kw)


BENCHES: list[Bench] = [
    # torch twins: losskit.functional.X vs torch.nn.functional.X
    _b("functional.mse_loss", "mse", "regression", TF.mse_loss, compile=True),
    _b("functional.l1_loss", "mae", "regression", TF.l1_loss),
    _b("functional.huber_loss", "huber", "regression", TF.huber_loss, compile=True),
    _b("functional.smooth_l1_loss", "smooth_l1", "regression", TF.smooth_l1_loss),
    _b("functional.poisson_nll_loss", "poisson_nll", "regression", TF.poisson_nll_loss),
    _b("functional.gaussian_nll_loss", "gaussian_nll", "gaussian", TF.gaussian_nll_loss),
    _b("functional.binary_cross_entropy", "bce", "probabilities", TF.binary_cross_entropy),
    _b("functional.binary_cross_entropy_with_logits", "bce_with_logits", "binary_logits",
       TF.binary_cross_entropy_with_logits, compile=True),
    _b("functional.soft_margin_loss", "soft_margin", "signs", TF.soft_margin_loss),
    _b("functional.multilabel_soft_margin_loss", "multilabel_soft_margin", "multi_hot", TF.multilabel_soft_margin_loss),
    _b("functional.multilabel_margin_loss", "multilabel_margin", "label_lists", TF.multilabel_margin_loss),
    _b("functional.cross_entropy", "cross_entropy", "logits", TF.cross_entropy, compile=True),
    _b("functional.nll_loss", "nll", "log_probs", TF.nll_loss),
    _b("functional.multi_margin_loss", "multi_margin", "logits", TF.multi_margin_loss),
    _b("functional.linear_cross_entropy", "linear_cross_entropy", "linear", TF.linear_cross_entropy),
    _b("functional.linear_log_probs", "linear_log_probs", "linear", log_probs),
    _b("functional.linear_log_probs_and_entropy", "linear_log_probs", "linear", log_probs_and_entropy),
    _b("functional.margin_ranking_loss", "margin_ranking", "ranked", TF.margin_ranking_loss),
    _b("functional.hinge_embedding_loss", "hinge_embedding", "signs", TF.hinge_embedding_loss),
    _b("functional.cosine_embedding_loss", "cosine_embedding", "pairs", TF.cosine_embedding_loss),
    _b("functional.triplet_margin_loss", "triplet_margin", "triplets", TF.triplet_margin_loss),
    _b("functional.triplet_margin_with_distance_loss", "triplet_margin", "triplets",
       TF.triplet_margin_with_distance_loss),
    _b("functional.pairwise_distance", "triplet_margin", "two", TF.pairwise_distance),  # summed to a scalar
    _b("functional.ctc_loss", "ctc", "ctc", TF.ctc_loss),
    _b("functional.kl_div", "kl_div", "two_log_distributions", TF.kl_div,
       kwargs={"reduction": "batchmean", "log_target": True}),
    # beyond torch: against the definitions written out above
    _b("functional.sigmoid_focal_loss", "sigmoid_focal", "binary_logits", sigmoid_focal, kwargs={"reduction": "mean"}),
    _b("functional.softmax_focal_loss", "softmax_focal", "logits", softmax_focal),
    _b("functional.poly1_cross_entropy", "poly1", "logits", poly1),
    _b("functional.dice_loss", "dice", "segmentation", dice),
    _b("functional.tversky_loss", "tversky", "segmentation", tversky),
    _b("functional.js_divergence", "js_divergence", "two_log_distributions", js),
    _b("functional.dpo_loss", "dpo", "sequence_log_probs", dpo),
    _b("functional.simpo_loss", "simpo", "sequence_log_prob_pairs", simpo),
    _b("functional.cpo_loss", "cpo", "sequence_log_prob_pairs", cpo),
    _b("functional.orpo_loss", "orpo", "sequence_log_prob_pairs", orpo),
    _b("functional.kto_loss", "kto", "unpaired_log_probs", kto),
    _b("functional.grpo_loss", "grpo", "token_log_probs", grpo, kwargs={"beta": 0.0}),
    _b("functional.distillation_loss", "distillation", "two_logits", distillation),
    _b("functional.linear_distillation_loss", "linear_distillation", "two_heads", linear_distillation),
    _b("functional.topk_distillation_loss", "topk_distillation", "topk_teacher", topk_distillation),
    _b("info.entropy", "entropy", "distribution", info_entropy),
    _b("info.cross_entropy", "entropy", "two_distributions", info_cross_entropy),
    _b("info.kl_divergence", "kl_div", "two_distributions", info_kl),
    _b("info.js_divergence", "js_divergence", "two_distributions", info_js),
    # Keras forms (y_true, y_pred): torch's function where it computes the same, else the formula
    _b("keras.mean_squared_error", "mse", "regression", k_mse, twin=_swap_none_mean("mse_loss"), aliases=("keras.mse",)),
    _b("keras.mean_absolute_error", "mae", "regression", k_mae, twin=_swap_none_mean("l1_loss"), aliases=("keras.mae",)),
    _b("keras.huber", "huber", "regression", k_huber, twin=_swap_none_mean("huber_loss")),
    _b("keras.log_cosh", "log_cosh", "regression", k_log_cosh),
    _b("keras.mean_absolute_percentage_error", "mape", "positive", k_mape, aliases=("keras.mape",)),
    _b("keras.mean_squared_logarithmic_error", "msle", "positive", k_msle, aliases=("keras.msle",)),
    _b("keras.poisson", "poisson_nll", "positive", k_poisson),
    _b("keras.binary_crossentropy", "bce", "probabilities", k_bce),
    _b("keras.binary_focal_crossentropy", "sigmoid_focal", "probabilities", k_binary_focal),
    _b("keras.hinge", "hinge", "signs", k_hinge),
    _b("keras.squared_hinge", "hinge", "signs", k_squared_hinge),
    _b("keras.categorical_crossentropy", "cross_entropy", "one_hot_probs", k_categorical),
    _b("keras.sparse_categorical_crossentropy", "cross_entropy", "logits", k_sparse_categorical,
       kwargs={"from_logits": True}, twin=lambda t, x, from_logits: _lk("cross_entropy")(x, t, reduction="none")),
    _b("keras.categorical_focal_crossentropy", "softmax_focal", "one_hot_probs", k_categorical_focal),
    _b("keras.categorical_generalized_cross_entropy", "generalized_ce", "class_probs", k_generalized_ce,
       kwargs={"q": 0.5}),
    _b("keras.categorical_hinge", "multi_margin", "one_hot_probs", k_categorical_hinge),
    _b("keras.cosine_similarity", "cosine_embedding", "regression", k_cosine),
    _b("keras.kl_divergence", "kl_div", "one_hot_probs", k_kl),
    _b("keras.dice", "dice", "masks", k_dice),
    _b("keras.tversky", "tversky", "masks", k_tversky),
]
# Keras forms whose inputs come as (y_true, y_pred): the input kinds give (prediction, target).
KERAS_ORDER = "keras."


def register(bench: Bench) -> Bench:
    """Add a loss to the plan (e.g. a post-training loss on "sequence_log_probs" inputs)."""
    if any(set(bench.names) & set(b.names) for b in BENCHES):
        raise ValueError(f"bench catalog: {bench.name} is already registered")
    BENCHES.append(bench)
    return bench


# -- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    bench: Bench
    size: str
    dtype: str
    providers: tuple[str, ...]
    skip: str = ""  # why this cell is planned but not timed (a row with the reason, no time)

    @property
    def shape(self) -> tuple[int, ...]:
        return INPUTS[self.bench.inputs].shapes[self.size]


# --quick: these also in bfloat16, and QUICK_COMPILE compiled (one, to exercise the path)
QUICK = ("functional.cross_entropy", "functional.mse_loss", "functional.sigmoid_focal_loss", "keras.mean_squared_error",
         "info.entropy")
QUICK_COMPILE = ("functional.mse_loss",)


def providers(bench: Bench, dtype: str, compiled: bool) -> tuple[str, ...]:
    out = ["torch", "losskit"]
    if bench.twin is not None:
        out.append("losskit.functional")
    if compiled and bench.compile and dtype == "float32":
        out += ["torch.compile", "losskit.compile"]
    return tuple(out)


def plan(quick: bool = False, benches: Sequence[Bench] | None = None) -> list[Cell]:
    """Every registered loss at both sizes, in float32 and bfloat16, with torch.compile of
    both for a few in float32; --quick: every loss at the small size in float32, a few in
    bfloat16, and one compiled."""
    benches = BENCHES if benches is None else benches
    cells = []
    for bench in benches:
        for size in ("small",) if quick else SIZES:
            for dtype in DTYPES:
                if quick and dtype == "bfloat16" and bench.name not in QUICK:
                    continue
                compiled = not quick or bench.name in QUICK_COMPILE
                cells.append(Cell(bench, size, dtype, providers(bench, dtype, compiled), _skip(bench, size, dtype)))
    return cells


def _skip(bench: Bench, size: str, dtype: str) -> str:
    """The large linear cross-entropy in bfloat16 on a CPU without bfloat16 matrix units: its
    matmuls would take minutes per call (hundreds of times float32's)."""
    if bench.inputs == "linear" and size == "large" and dtype == "bfloat16" and not _bf16_matmul_units():
        return "skipped: this CPU has no bfloat16 matrix units (minutes per call); run it with --device cuda"
    return ""


def _bf16_matmul_units() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# -- measuring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    seconds: float  # per provider and cell
    min_reps: int
    max_reps: int


BUDGETS = {"small": Budget(0.06, 100, 400), "large": Budget(0.3, 3, 20)}
QUICK_BUDGET = Budget(0.01, 10, 40)


def _callable(cell: Cell, provider: str) -> Callable:
    bench = cell.bench
    fn = {"torch": bench.torch, "losskit": bench.losskit(), "losskit.functional": bench.twin,
          "torch.compile": bench.torch, "losskit.compile": bench.losskit()}[provider]
    kwargs = bench.kwargs
    if bench.name == "functional.pairwise_distance":
        base = fn
        fn = lambda *a, **k: base(*a, **k).sum()  # noqa: E731 - a distance per row, summed
    if bench.name == "functional.linear_log_probs_and_entropy":
        pair = fn
        fn = lambda *a, **k: sum(t.sum() for t in pair(*a, **k))  # noqa: E731 - both outputs, summed
    if provider.endswith(".compile"):
        fn = torch.compile(fn, dynamic=False)
    if bench.name.startswith(KERAS_ORDER):
        call = lambda x, t, *rest: fn(t, x, *rest, **kwargs)  # noqa: E731
    else:
        call = lambda *args: fn(*args, **kwargs)  # noqa: E731

    def scalar(*args):
        loss = call(*args)
        return loss if loss.dim() == 0 else loss.mean()

    return scalar


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)

    def at(q: float) -> float:  # linear interpolation, as numpy.percentile
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return at(0.2), at(0.5), at(0.8)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def measure(cell: Cell, budget: Budget, device: str = "cpu") -> dict[str, dict]:
    """Time every provider of one cell: {provider: {"forward": [...], "full": [...]}} or
    {provider: {"skip": why}}."""
    if cell.skip:
        return {p: {"skip": cell.skip} for p in cell.providers}
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, cell.dtype)
    leaves, args = INPUTS[cell.bench.inputs].make(cell.shape, dtype, gen)
    if device != "cpu":
        moved = {id(leaf): leaf.detach().to(device).requires_grad_() for leaf in leaves}
        leaves = list(moved.values())
        args = tuple(moved.get(id(a), a.to(device) if isinstance(a, torch.Tensor) else a) for a in args)
    cuda = device.startswith("cuda")

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def clear() -> None:
        for leaf in leaves:
            leaf.grad = None

    def once(fn) -> tuple[float, float, float]:
        clear()
        cpu = time.process_time()
        start = now()
        loss = fn(*args)
        forward = now()
        loss.backward()
        end = now()
        return forward - start, end - start, time.process_time() - cpu

    fns: dict[str, Callable] = {}
    results: dict[str, dict] = {}
    estimates: dict[str, float] = {}
    for provider in cell.providers:
        try:
            fn = _callable(cell, provider)
            first = once(fn)[1]  # warm-up: first call, caches, compilation
            # a second warm-up, timed to choose the repetitions (the first will do if slow)
            estimates[provider] = first if first > 2.0 else once(fn)[1]
        except Exception as error:  # noqa: BLE001 - a provider that cannot run is a row, not a crash
            if provider == "torch" and cell.dtype != "float32":
                why = f"skipped: torch has no {cell.dtype} kernel here ({_short(error)})"
                return {p: {"skip": why} for p in cell.providers}
            results[provider] = {"skip": f"failed: {_short(error)}"}
            continue
        fns[provider] = fn
    # Each provider's repetitions: what the budget allows, at least min_reps, unless a call
    # is so slow that min_reps would take more than 4 budgets: then what 4 budgets allow, and
    # never fewer than 3. Providers alternate while they have repetitions left.
    reps = {}
    for provider, estimate in estimates.items():
        affordable = budget.seconds / max(estimate, 1e-9)
        reps[provider] = max(3, min(max(budget.min_reps, min(budget.max_reps, int(affordable))), int(4 * affordable)))
    times = {p: {"forward": [], "full": [], "cpu": []} for p in fns}
    order = list(fns)
    gc.collect()
    gc.disable()  # no collection pause inside one provider's timing
    try:
        for rep in range(max(reps.values(), default=0)):
            k = rep % len(order)
            for provider in order[k:] + order[:k]:  # alternate, rotating who goes first
                if rep >= reps[provider]:
                    continue
                forward, full, cpu = once(fns[provider])
                times[provider]["forward"].append(forward)
                times[provider]["full"].append(full)
                times[provider]["cpu"].append(cpu)
    finally:
        gc.enable()
    clear()
    results.update(times)
    return {p: results[p] for p in cell.providers}


def _baseline(provider: str) -> str:
    return "torch.compile" if provider == "losskit.compile" else "torch"


def _rows(cell: Cell, result: dict[str, dict], common: dict) -> list[dict]:
    shape = "x".join(map(str, cell.shape))
    options = ", ".join(f"{k}={v!r}" for k, v in cell.bench.kwargs.items())
    base = {**common, "kernel": cell.bench.name, "entry": cell.bench.entry, "size": cell.size, "shape": shape,
            "dtype": cell.dtype, "options": options, "metric": "time", "unit": "s"}
    p50s = {(p, m): _quantiles(r[m])[1] for p, r in result.items() if "skip" not in r for m in r}
    rows = []
    for provider, r in result.items():
        note = cell.bench.note if provider.startswith("losskit") and provider != "losskit.functional" else ""
        for mode, metric, key in METRICS:
            row = {**base, "provider": provider, "mode": mode, "metric": metric, "note": note}
            if "skip" in r:
                rows.append({**row, "p50": "", "p20": "", "p80": "", "reps": 0, "ratio_to_torch": "",
                             "note": r["skip"]})
                continue
            p20, p50, p80 = _quantiles(r[key])
            ref = p50s.get((_baseline(provider), key))
            ratio = f"{p50 / ref:.4g}" if ref else ""
            rows.append({**row, "p50": f"{p50:.6g}", "p20": f"{p20:.6g}", "p80": f"{p80:.6g}", "reps": len(r[mode]),
                         "ratio_to_torch": ratio})
    return rows


def _commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def run(out_csv: Path, quick: bool = False, progress: bool = True, device: str = "cpu",
        cells: Sequence[Cell] | None = None) -> list[dict]:
    """Measure the plan and write its rows to ``out_csv`` (replaced: one run's ratios)."""
    import warnings

    import losskit

    cells = plan(quick) if cells is None else cells
    if device == "cpu":
        where = f"cpu ({torch.get_num_threads()} threads)"
    else:
        where = torch.cuda.get_device_name()
    common = {"device": where, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "version": f"losskit {losskit.__version__}, torch {torch.__version__}", "commit": _commit()}
    rows: list[dict] = []
    began = time.perf_counter()
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as handle, _memory_cap(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the one-time warnings of a loss on random inputs
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for i, cell in enumerate(cells):
            budget = QUICK_BUDGET if quick else BUDGETS[cell.size]
            new = _rows(cell, measure(cell, budget, device), common)
            writer.writerows(new)  # row by row: a run cut short keeps what it measured
            handle.flush()
            rows += new
            if progress:
                done = [r for r in new if r["provider"] == "losskit" and r["mode"] == "full" and r["metric"] == "time"]
                ratio = done[0]["ratio_to_torch"] if done else ""
                print(f"[{i + 1}/{len(cells)} {time.perf_counter() - began:5.0f} s] {cell.bench.name} {cell.size} "
                      f"{cell.dtype}: losskit/torch {ratio or '-'}", file=sys.stderr, flush=True)
    return rows


@contextlib.contextmanager
def _memory_cap(fraction: float = 0.6):
    """Cap this process's data segment at a fraction of the memory available now (Linux), so
    that a loss needing more fails with a RuntimeError, reported in its row, instead of the
    kernel's OOM killer ending the whole run."""
    try:
        import resource

        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        cap = int(available * fraction)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    except (ImportError, OSError, KeyError, ValueError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


# -- reading the results --------------------------------------------------------------------


def ratios(rows: Sequence[dict], provider: str = "losskit", dtype: str | None = None,
           metric: str = "time") -> list[tuple[str, float, dict]]:
    """(label, losskit/torch p50 ratio of forward + backward, row), worst first."""
    out = []
    for row in rows:
        if row["provider"] != provider or row["mode"] != "full" or row["metric"] != metric or not row["ratio_to_torch"]:
            continue
        if dtype is not None and row["dtype"] != dtype:
            continue
        label = f"{row['kernel']} {row['size']}" + ("" if dtype else f" {row['dtype']}")
        out.append((label, float(row["ratio_to_torch"]), row))
    return sorted(out, key=lambda item: -item[1])


def table(rows: Sequence[dict], n: int = 15, metric: str = "time") -> list[str]:
    """The n worst losskit/torch ratios of forward + backward, as lines of a Markdown table,
    with the CPU-time ratio beside the wall-time one."""
    lines = ["| loss | size | dtype | torch p50 | losskit p50 | losskit/torch | CPU-time ratio | note |",
             "|---|---|---|---|---|---|---|---|"]
    full = [r for r in rows if r["mode"] == "full" and r["p50"]]
    torch_p50 = {(r["kernel"], r["size"], r["dtype"]): float(r["p50"]) for r in full
                 if r["provider"] == "torch" and r["metric"] == metric}
    cpu = {(r["kernel"], r["size"], r["dtype"]): r["ratio_to_torch"] for r in full
           if r["provider"] == "losskit" and r["metric"] == "cpu_time"}
    for _, ratio, row in ratios(rows, metric=metric)[:n]:
        key = (row["kernel"], row["size"], row["dtype"])
        other = f"{float(cpu[key]):.2f}x" if cpu.get(key) else ""
        lines.append(f"| {row['kernel']} | {row['size']} {row['shape']} | {row['dtype']} | {_fmt(torch_p50[key])} | "
                     f"{_fmt(float(row['p50']))} | {ratio:.2f}x | {other} | {row['note']} |")
    return lines


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def draw(rows: Sequence[dict], out_dir: Path, prefix: str = "catalog") -> list[Path]:
    """One horizontal bar chart per dtype (and one for torch.compile): losskit / torch p50 of
    forward + backward, one bar per (loss, size), sorted, with the 1.0x line marked."""
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    charts = [(dtype, "losskit", dtype) for dtype in DTYPES] + [("compile", "losskit.compile", "float32")]
    paths = []
    for tag, provider, dtype in charts:
        items = ratios(rows, provider, dtype)[::-1]  # best at the bottom, worst on top
        if not items:
            continue
        fig = Figure(figsize=(9, 1.2 + 0.19 * len(items)), dpi=100)
        ax = fig.subplots()
        values = [ratio for _, ratio, _ in items]
        colors = ["#c0392b" if v > 1.1 else "#27ae60" if v < 0.9 else "#7f8c8d" for v in values]
        ax.barh(range(len(items)), values, color=colors, height=0.75)
        ax.set_yticks(range(len(items)), [label for label, _, _ in items], fontsize=7)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=1)
        ax.text(1.0, len(items) - 0.3, " 1.0x = torch", fontsize=8, va="bottom")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}x", fontsize=6, va="center")
        against = "torch.compile" if provider.endswith("compile") else "torch eager"
        ax.set(xlabel=f"{provider} / {against}: p50 time of forward + backward (log scale; < 1 is faster)",
               ylim=(-0.7, len(items) - 0.3),
               title=f"losskit catalog vs {against}, {dtype}, {rows[0]['device']}")
        path = out_dir / f"{prefix}_{tag}.png"
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    return paths


def main(out: Path, quick: bool, progress: bool = True, device: str = "cpu", only: Sequence[str] | None = None) -> int:
    """Run the plan (with ``only``: the losses whose name contains one of those words, whose
    rows then replace theirs in the CSV, each row keeping its own timestamp and commit)."""
    suffix = "" if device == "cpu" else f"-{device}"
    name = f"catalog-quick{suffix}" if quick else f"catalog{suffix}"
    csv_path = out / f"{name}.csv"
    if only:
        cells = [cell for cell in plan(quick) if any(word in cell.bench.name for word in only)]
        if not cells:
            print(f"losskit bench catalog --only: no loss matches {', '.join(only)}")
            return 1
        kept = []
        if csv_path.exists():
            measured = {cell.bench.name for cell in cells}
            with csv_path.open(newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if row["kernel"] not in measured]
        part = csv_path.with_name(f"{name}-part.csv")
        new = run(part, quick, progress, device, cells)
        part.unlink()
        rows = kept + new
        with csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    else:
        rows = run(csv_path, quick, progress, device)
    for line in table(rows):
        print(line)
    charts = draw(rows, out / "charts", prefix=name.replace("-", "_"))
    print(f"{len(rows)} rows written to {csv_path}; charts: {', '.join(str(p) for p in charts)}")
    return 0 if rows else 1
