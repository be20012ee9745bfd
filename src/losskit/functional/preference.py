r"""Preference-optimisation losses on sequence log-probabilities: DPO and its variants,
SimPO, CPO, ORPO and KTO.

Each takes one log-probability per sequence, :math:`\log \pi(y \mid x)`, which the caller
forms from per-token log-probs (``losskit.functional.linear_log_probs`` or
``logits.log_softmax(-1).gather(...)``) as the method defines it:

========  ====================================  ==========================================
loss      sequence log-prob                      as in
========  ====================================  ==========================================
DPO       sum over the completion's tokens       Rafailov et al. 2023; TRL ``DPOTrainer``
  ipo     mean over the completion's tokens      TRL divides the summed log-ratio by the
                                                 completion length (the IPO authors' form)
SimPO     mean over the completion's tokens      Meng et al. 2024; TRL ``CPOTrainer`` simpo
CPO       sum over the completion's tokens       Xu et al. 2024; TRL ``CPOTrainer`` sigmoid
ORPO      mean over the completion's tokens      Hong et al. 2024; TRL ``ORPOTrainer``
KTO       sum over the completion's tokens       Ethayarajh et al. 2024; TRL ``KTOTrainer``
========  ====================================  ==========================================

With the log-ratios against the reference model
:math:`x_w = \log\pi(y_w) - \log\pi_\text{ref}(y_w)`, :math:`x_l = \log\pi(y_l) -
\log\pi_\text{ref}(y_l)` and the margin :math:`h = x_w - x_l`, the DPO loss types are (as
TRL 1.16 writes them; :math:`\sigma` the logistic function, :math:`\varepsilon` the label
smoothing):

- sigmoid: :math:`-(1-\varepsilon)\log\sigma(\beta h) - \varepsilon\log\sigma(-\beta h)`
  (conservative DPO for :math:`\varepsilon > 0`)
- hinge: :math:`\max(0, 1 - \beta h)`
- ipo: :math:`(h - 1/(2\beta))^2` on per-token mean log-probs
- robust: :math:`[-(1-\varepsilon)\log\sigma(\beta h) + \varepsilon\log\sigma(-\beta h)] / (1 - 2\varepsilon)`
- exo_pair: :math:`\sigma(\beta h)[\log\sigma(\beta h) - \log(1-\varepsilon)] +
  \sigma(-\beta h)[\log\sigma(-\beta h) - \log\varepsilon]`
- nca_pair: :math:`-\log\sigma(\beta x_w) - \tfrac12\log\sigma(-\beta x_w) - \tfrac12\log\sigma(-\beta x_l)`
- bco_pair: :math:`-\log\sigma(\beta x_w) - \log\sigma(-\beta x_l)`
- sppo_hard: :math:`(x_w - 1/(2\beta))^2 + (x_l + 1/(2\beta))^2`
- apo_zero: :math:`1 - \sigma(\beta x_w) + \sigma(\beta x_l)`
- apo_down: :math:`\sigma(\beta x_w) + 1 - \sigma(\beta h)`
- discopop: :math:`(1 - m)(-\log\sigma(\beta h)) + m\, e^{-\beta h}`, :math:`m = \sigma(\beta h / \tau)`

The reference log-probs (and KTO's KL estimate) are constants of the objective: the
reference model is frozen. These functions detach them, so a reference computed without
``torch.no_grad()`` (or by the policy itself with its adapter off) sends no gradient back.

Every function computes in float32 for float16/bfloat16 inputs and returns the inputs'
dtype; ``reduction='mean'`` averages over pairs (examples), ``'sum'`` sums, ``'none'``
returns one loss per pair (example).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._core.checks import check_values, effective_mode
from .._core.dtypes import cast, result_dtypes
from .._core.reduction import reduce_loss, resolve_reduction
from .._core.validation import at_index, check_floating, first_index
from ..kernels.fused_op import FusedOp, Replay, eager_native, fused_may_serve, remembered_options

__all__ = ["cpo_loss", "dpo_loss", "kto_loss", "orpo_loss", "simpo_loss"]

DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
    "discopop",
)

# ---- checks shared by the preference losses -----------------------------------------------------


def _check_logps(fn: str, **tensors: Tensor | None) -> torch.Size:
    """Floating-point log-prob tensors of one shape (no broadcasting: a (B,) and a (B, 1)
    would silently form a (B, B) loss); None entries are skipped. Returns that shape."""
    shape, first = None, ""
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor of log-probabilities; got {type(t).__name__}")
        check_floating(t, name, fn)
        if shape is None:
            shape, first = t.shape, name
        elif t.shape != shape:
            raise ValueError(f"{fn}: {name} shape {tuple(t.shape)} must equal {first} shape {tuple(shape)}")
    return shape


def _check_beta(beta: float, fn: str, positive: bool = False) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0 or (
            positive and beta == 0):
        need = "a positive, finite number" if positive else "a finite number >= 0"
        raise ValueError(f"{fn}: beta must be {need}; got {beta!r}")


def _check_smoothing(label_smoothing: float, fn: str, high: float = 0.5, closed: bool = True) -> None:
    ok = 0.0 <= label_smoothing <= high if closed else 0.0 <= label_smoothing < high
    if not ok:
        raise ValueError(f"{fn}: label_smoothing must lie in [0, {high}{']' if closed else ')'}; got {label_smoothing}")


def _smoothed_logistic(z: Tensor, label_smoothing: float) -> Tensor:
    r""":math:`-(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)`. At
    :math:`\varepsilon = 0` the second term is left out rather than multiplied by 0, so a
    margin of :math:`+\infty` gives 0, not :math:`0 \cdot \infty = ` nan."""
    loss = -F.logsigmoid(z)
    if label_smoothing == 0.0:
        return loss
    return (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)


def _refs(fn: str, ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None) -> bool:
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        missing = "ref_rejected_logps" if ref_rejected_logps is None else "ref_chosen_logps"
        raise ValueError(f"{fn}: {missing} is None but its partner is given; pass both reference log-probs, "
                         "or neither for a reference-free loss")
    return ref_chosen_logps is not None


# ---- the fused forms: loss and gradient in one pass ------------------------------------------------
# The logistic losses (DPO's sigmoid, SimPO, CPO), ORPO and KTO are a few elementwise
# operations per pair; their composed forms cost a dozen autograd nodes, which at a batch of
# 64 is the whole time of a call. The fused forms below make the loss and the gradients of
# the policy log-probs in forward (the C++ node of losskit._native hands them out in
# backward), with the written-out derivatives:
#
#   logistic  l = -(1 - e) log s(z) - e log s(-z),  z = beta h - gamma
#             dl/dz = -(1 - e) s(-z) + e s(z);  dz/d chosen = beta = -dz/d rejected
#   orpo      l = -beta log s(L),  L = (c - r) - (log(1 - e^c) - log(1 - e^r))
#             dl/dL = -beta s(-L);  dL/dc = -1 / expm1(c),  dL/dr = 1 / expm1(r)
#   kto       l = w s(u),  u = -beta (r - z0) (desirable), beta (r - z0) (undesirable)
#             dl/dr = w s(u) (1 - s(u)) du/dr  (sigmoid's own backward: s (1 - s))
#
# times 1 / (number of pairs) for 'mean'. losskit._native's preference_pair and kto
# (src/posttraining.cpp) are these functions op for op, with the same bits
# (tests/test_native.py); float64 stays on the composed path (fused_may_serve), which is
# also the double-backward replay.


@dataclass(frozen=True)
class PairOptions:
    """kind: 'logistic' or 'orpo'; gamma: SimPO's margin (0 otherwise); label_smoothing:
    the logistic losses' epsilon."""

    kind: str
    beta: float
    gamma: float
    label_smoothing: float
    reduction: str


@dataclass(frozen=True)
class KtoOptions:
    beta: float
    z0: float
    desirable_weight: float
    undesirable_weight: float
    reduction: str


def _mean_factor(n: int, reduction: str) -> float:
    return 1.0 / n if reduction == "mean" else 1.0


def _reduce_negated(terms: Tensor, reduction: str) -> Tensor:
    """-terms reduced: the negation on the scalar, not on every term."""
    if reduction == "none":
        return terms.neg()
    return (terms.mean() if reduction == "mean" else terms.sum()).neg()


def pair_forward(chosen, rejected, ref_chosen, ref_rejected, *, options: PairOptions, needs, check: bool):
    """(loss, (d/d chosen, d/d rejected)) of the fused pair losses (``check`` serves the
    compiled form only: the Python caller has checked the values already)."""
    compute, out = result_dtypes(chosen, rejected, ref_chosen, ref_rejected)
    c, r = cast(chosen, compute), cast(rejected, compute)
    beta, reduction = options.beta, options.reduction
    k = _mean_factor(chosen.numel(), reduction)
    if options.kind == "orpo":
        n = c.numel()
        x = torch.cat([c.reshape(-1), r.reshape(-1)])
        # log(1 - e^x), Maechler's two branches (see _log1mexp), both formed on every value:
        # no gradient passes through them here, so the unused branch's inf is harmless.
        em = torch.expm1(x)
        low = x < -math.log(2)
        log1mexp = torch.where(low, torch.log1p(torch.exp(x).neg_()), torch.log(em.neg()))
        log_odds = (c - r).reshape(-1) - (log1mexp[:n] - log1mexp[n:])
        ls = F.logsigmoid(log_odds)
        loss = reduce_loss((ls * -beta).reshape(chosen.shape), reduction)
        grads = [None, None]
        if needs[0] or needs[1]:
            sk = torch.sigmoid(log_odds.neg()) * (beta * k)
            grads[0] = (sk / em[:n]).reshape(chosen.shape) if needs[0] else None
            grads[1] = (sk.neg() / em[n:]).reshape(rejected.shape) if needs[1] else None
    else:
        h = c - r if ref_chosen is None else (c - cast(ref_chosen, compute)) - (r - cast(ref_rejected, compute))
        z = h * beta
        if options.gamma != 0.0:
            z = z - options.gamma
        eps = options.label_smoothing
        ls = F.logsigmoid(z)
        if eps == 0.0:
            loss = _reduce_negated(ls, reduction)
        else:
            loss = reduce_loss(ls * -(1 - eps) - F.logsigmoid(z.neg()) * eps, reduction)
        grads = [None, None]
        if needs[0] or needs[1]:
            # dl/dz times beta k; the rejected side's is its negative (an exact negation).
            dz = torch.sigmoid(z.neg())
            if eps != 0.0:
                dz = dz * (1 - eps) - torch.sigmoid(z) * eps
            grads[0] = dz * (-beta * k) if needs[0] else None
            grads[1] = dz * (beta * k) if needs[1] else None
    return loss.to(out), (None if grads[0] is None else grads[0].to(chosen.dtype),
                          None if grads[1] is None else grads[1].to(rejected.dtype))


fused_pair = FusedOp(
    "preference_pair",
    tensors=("chosen", "rejected", "ref_chosen?", "ref_rejected?"),
    differentiable=2,
    options=PairOptions,
    extras=(("bool", "check"),),
    forward=pair_forward,
    unreduced="elements",
    native_forward="preference_pair",
)


def kto_forward(logps, ref_logps, desirable, *, options: KtoOptions, needs):
    """(loss, (d/d logps,)) of the fused KTO loss with a number for z0."""
    compute, out = result_dtypes(logps, ref_logps)
    r = cast(logps, compute)
    if ref_logps is not None:
        r = r - cast(ref_logps, compute)
    beta, reduction = options.beta, options.reduction
    wd, wu = options.desirable_weight, options.undesirable_weight
    a = (r - options.z0 if options.z0 != 0.0 else r) * beta
    s = torch.sigmoid(torch.where(desirable, a.neg(), a))
    loss = reduce_loss(s if wd == 1.0 and wu == 1.0 else torch.where(desirable, s * wd, s * wu), reduction)
    grad = None
    if needs[0]:
        k = _mean_factor(logps.numel(), reduction)
        ds = s * (1 - s)  # sigmoid's backward, as autograd forms it
        grad = torch.where(desirable, ds * (-beta * k * wd), ds * (beta * k * wu)).to(logps.dtype)
    return loss.to(out), (grad,)


fused_kto = FusedOp(
    "kto",
    tensors=("logps", "ref_logps?", "desirable"),
    differentiable=1,
    options=KtoOptions,
    forward=kto_forward,
    unreduced="elements",
    native_forward="kto",
)


def _pair_call(fn: str, reference, chosen: Tensor, rejected: Tensor, ref_chosen: Tensor | None,
               ref_rejected: Tensor | None, options: PairOptions) -> Tensor:
    """The fused loss of a pair call, by the compiled form where it serves (ORPO's value
    check included: it declines a call with a positive log-prob, which the Python check
    below then reports), else the checks and FusedOp."""
    if ref_chosen is not None:
        ref_chosen, ref_rejected = ref_chosen.detach(), ref_rejected.detach()
    check = options.kind == "orpo"
    native = eager_native(chosen, rejected, ref_chosen, ref_rejected)
    if native is not None:
        grad_mode = torch.is_grad_enabled()
        needs = [grad_mode and chosen.requires_grad, grad_mode and rejected.requires_grad]
        made = native.preference_pair(chosen, rejected, ref_chosen, ref_rejected, options.kind, options.beta,
                                      options.gamma, options.label_smoothing, options.reduction,
                                      check and effective_mode(chosen) == "full", needs)
        if made is not None:
            if not any(needs):
                return made[0]
            return fused_pair.attach(native, made[0], [chosen, rejected], made[1:], options.reduction == "none",
                                     Replay(fn, reference, [chosen, rejected]))
    if check:
        for name, t in (("chosen_logps", chosen), ("rejected_logps", rejected)):
            _check_not_positive(t, name, fn)
    return fused_pair(chosen, rejected, ref_chosen, ref_rejected, options=options,
                      replay=Replay(fn, reference, [chosen, rejected]), check=False)


def _fused_serves(*tensors: Tensor | None) -> bool:
    """Non-empty tensors the fused kernels may serve (float64 stays composed)."""
    return tensors[0].numel() > 0 and fused_may_serve(*[t for t in tensors if t is not None])


# ---- DPO ------------------------------------------------------------------------------------------


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    discopop_tau: float = 0.05,
) -> Tensor:
    r"""Direct preference optimisation and TRL's variants of it, from sequence log-probs.

    .. math::
        h = \bigl(\log\pi(y_w) - \log\pi_\text{ref}(y_w)\bigr) - \bigl(\log\pi(y_l) -
        \log\pi_\text{ref}(y_l)\bigr), \qquad
        \ell_\text{sigmoid} = -(1 - \varepsilon)\log\sigma(\beta h) - \varepsilon\log\sigma(-\beta h)

    and the other ``loss_type`` values as listed in :mod:`losskit.functional.preference`
    (TRL 1.16's ``DPOTrainer`` formulas, one per pair, then averaged over pairs as TRL does).

    Sequence log-probs are **sums** over the completion's tokens (TRL's convention), except
    for ``loss_type='ipo'``, which takes per-token **means**: TRL divides IPO's summed
    log-ratio by the completion length, which is the log-ratio of the means.

    Args:
        chosen_logps: policy log-probs of the preferred completions, ``[batch]`` (any shape,
            one value per pair).
        rejected_logps: policy log-probs of the dispreferred completions, same shape.
        ref_chosen_logps: reference-model log-probs of the preferred completions, same shape;
            detached (a constant of the objective). None (with ``ref_rejected_logps``) for a
            reference-free loss: the log-ratios become the policy log-probs.
        ref_rejected_logps: reference-model log-probs of the dispreferred completions.
        beta: :math:`\beta \ge 0`, the strength of the implicit KL penalty (IPO's
            :math:`\tau`); must be positive for ``'ipo'`` and ``'sppo_hard'``, which divide by it.
        loss_type: one of ``'sigmoid'`` (DPO), ``'hinge'`` (SLiC), ``'ipo'``, ``'robust'``
            (rDPO), ``'exo_pair'``, ``'nca_pair'``, ``'bco_pair'``, ``'sppo_hard'``,
            ``'apo_zero'``, ``'apo_down'``, ``'discopop'``.
        label_smoothing: :math:`\varepsilon`: the flipped-label rate of ``'robust'`` (in
            [0, 0.5)) and of conservative DPO with ``'sigmoid'`` (in [0, 0.5]), EXO's
            :math:`\varepsilon` with ``'exo_pair'`` (in (0, 1); the paper uses 1e-3). Any
            other loss type takes none (0), and says so if given one.
        reduction: ``'mean'`` over pairs (TRL's), ``'sum'``, or ``'none'`` (one loss per pair).
        discopop_tau: DiscoPOP's temperature :math:`\tau > 0` (TRL's default, 0.05).

    Returns:
        A scalar, or the per-pair losses (the inputs' shape) with ``reduction='none'``.

    Shape:
        - every log-prob input: :math:`(*)`, one value per preference pair
        - output: scalar, or :math:`(*)` with ``reduction='none'``

    Example:
        >>> import torch
        >>> from losskit.functional import dpo_loss
        >>> chosen, rejected = torch.tensor([-12.0, -9.0]), torch.tensor([-15.0, -8.0])
        >>> ref_chosen, ref_rejected = torch.tensor([-13.0, -9.5]), torch.tensor([-14.0, -8.5])
        >>> dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)  # margins 2 and 0
        tensor(0.6456)

    References:
        Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a
        Reward Model", 2023; Azar et al., "A General Theoretical Paradigm to Understand
        Learning from Human Preferences" (IPO), 2023; Chowdhury et al., "Provably Robust DPO",
        2024; Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment"
        (EXO), 2024; Chen et al., "Noise Contrastive Alignment of Language Models with
        Explicit Rewards" (NCA), 2024; Jung et al., "Binary Classifier Optimization for
        Large Language Model Alignment" (BCO), 2024; Wu et al., "Self-Play Preference
        Optimization" (SPPO), 2024; D'Oosterlinck et al., "Anchored Preference Optimization"
        (APO), 2024; Lu et al., "Discovering Preference Optimization Algorithms with and for
        Large Language Models" (DiscoPOP), 2024; TRL 1.16 ``DPOTrainer``.
    """
    fn = "dpo_loss"
    reduction = resolve_reduction(None, None, reduction)
    check_dpo_options(fn, beta, loss_type, label_smoothing, discopop_tau)
    has_ref = _refs(fn, ref_chosen_logps, ref_rejected_logps)
    _check_logps(fn, chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)

    def reference(chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
        tensors = [chosen_logps, rejected_logps] + ([ref_chosen_logps, ref_rejected_logps] if has_ref else [])
        compute, out = result_dtypes(*tensors)
        chosen, rejected = cast(chosen_logps, compute), cast(rejected_logps, compute)
        if has_ref:
            # The reference model is frozen: its log-probs are constants of the objective.
            chosen = chosen - cast(ref_chosen_logps.detach(), compute)
            rejected = rejected - cast(ref_rejected_logps.detach(), compute)
        loss = _dpo_terms(chosen, rejected, beta, loss_type, label_smoothing, discopop_tau)
        return reduce_loss(loss, reduction).to(out)

    if loss_type == "sigmoid" and _fused_serves(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
        return _pair_call(fn, reference, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          remembered_options(PairOptions, "logistic", float(beta), 0.0, float(label_smoothing),
                                             reduction))
    return reference(chosen_logps, rejected_logps)


def check_dpo_options(fn: str, beta: float, loss_type: str, label_smoothing: float, discopop_tau: float) -> None:
    """The options of :func:`dpo_loss`, checked once (the Module checks them at construction)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"{fn}: loss_type must be one of {', '.join(map(repr, DPO_LOSS_TYPES))}; got {loss_type!r}")
    _check_beta(beta, fn, positive=loss_type in ("ipo", "sppo_hard"))
    if loss_type == "sigmoid":
        _check_smoothing(label_smoothing, fn)
    elif loss_type == "robust":
        _check_smoothing(label_smoothing, fn, closed=False)
    elif loss_type == "exo_pair":
        if not 0.0 < label_smoothing < 1.0:
            raise ValueError(f"{fn}: label_smoothing must lie in (0, 1) for loss_type='exo_pair' (EXO's epsilon; "
                             f"the paper uses 1e-3); got {label_smoothing}")
    elif label_smoothing != 0.0:
        raise ValueError(f"{fn}: label_smoothing applies to loss_type 'sigmoid', 'robust' and 'exo_pair' only; "
                         f"got label_smoothing={label_smoothing} with loss_type={loss_type!r}")
    if loss_type == "discopop" and not (discopop_tau > 0 and math.isfinite(discopop_tau)):
        raise ValueError(f"{fn}: discopop_tau must be a positive, finite number; got {discopop_tau}")


def _dpo_terms(x_w: Tensor, x_l: Tensor, beta: float, loss_type: str, eps: float, tau: float) -> Tensor:
    """One DPO-family loss per pair from the chosen and rejected log-ratios."""
    z = beta * (x_w - x_l)
    if loss_type == "sigmoid":
        return _smoothed_logistic(z, eps)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        return ((x_w - x_l) - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        # KL(softmax(beta x) || [1 - eps, eps]) over {chosen, rejected}, written with log-sigmoids.
        log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
        return log_qw.exp() * (log_qw - math.log1p(-eps)) + log_ql.exp() * (log_ql - math.log(eps))
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * x_w) - 0.5 * F.logsigmoid(-beta * x_w) - 0.5 * F.logsigmoid(-beta * x_l)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * x_w) - F.logsigmoid(-beta * x_l)
    if loss_type == "sppo_hard":
        return (x_w - 0.5 / beta) ** 2 + (x_l + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return torch.sigmoid(-beta * x_w) + torch.sigmoid(beta * x_l)  # 1 - sigmoid(u) = sigmoid(-u)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * x_w) + torch.sigmoid(-z)
    # discopop. m e^{-z} is formed as exp(log m - z): for a very negative margin TRL's
    # product is 0 * inf = nan where the limit (for tau < 1) is 0.
    log_m = F.logsigmoid(z / tau)
    return -F.logsigmoid(z) * torch.sigmoid(-z / tau) + torch.exp(log_m - z)


# ---- SimPO and CPO --------------------------------------------------------------------------------


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    r"""Simple preference optimisation: a reference-free margin loss on length-normalised
    log-probs.

    .. math::
        z = \beta\,\bigl(\overline{\log\pi}(y_w) - \overline{\log\pi}(y_l)\bigr) - \gamma, \qquad
        \ell = -(1 - \varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)

    where :math:`\overline{\log\pi}(y) = \frac{1}{|y|}\sum_t \log\pi(y_t \mid x, y_{<t})`:
    SimPO's log-probs are **per-token means** over the completion (the paper, TRL's
    ``CPOTrainer`` with ``loss_type='simpo'``, Liger), never sums. TRL writes the margin as
    :math:`\beta(\Delta - \gamma/\beta)`, the same number.

    Args:
        chosen_logps: per-token mean log-probs of the preferred completions, ``[batch]``.
        rejected_logps: per-token mean log-probs of the dispreferred completions, same shape.
        beta: :math:`\beta \ge 0`, the reward scale (the paper uses 2.0 to 2.5; TRL and Liger
            default to 0.1).
        gamma: :math:`\gamma`, the target reward margin (the paper uses 0.5 to 1.5; TRL's
            ``simpo_gamma`` and Liger default to 0.5).
        label_smoothing: :math:`\varepsilon` in [0, 0.5], the assumed rate of flipped labels.
        reduction: ``'mean'`` over pairs, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the per-pair losses with ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import simpo_loss
        >>> simpo_loss(torch.tensor([-0.8]), torch.tensor([-1.4]), beta=2.0, gamma=1.0)  # -log sigmoid(0.2)
        tensor(0.5981)

    References:
        Meng, Xia and Chen, "SimPO: Simple Preference Optimization with a Reference-Free
        Reward", 2024; TRL 1.16 ``CPOTrainer``.
    """
    fn = "simpo_loss"
    reduction = resolve_reduction(None, None, reduction)
    _check_beta(beta, fn)
    _check_smoothing(label_smoothing, fn)
    if not math.isfinite(gamma):
        raise ValueError(f"{fn}: gamma must be a finite number; got {gamma}")
    _check_logps(fn, chosen_logps=chosen_logps, rejected_logps=rejected_logps)

    def reference(chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
        compute, out = result_dtypes(chosen_logps, rejected_logps)
        z = beta * (cast(chosen_logps, compute) - cast(rejected_logps, compute)) - gamma
        return reduce_loss(_smoothed_logistic(z, label_smoothing), reduction).to(out)

    if _fused_serves(chosen_logps, rejected_logps):
        return _pair_call(fn, reference, chosen_logps, rejected_logps, None, None,
                          remembered_options(PairOptions, "logistic", float(beta), float(gamma), float(label_smoothing),
                                   reduction))
    return reference(chosen_logps, rejected_logps)


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    r"""Contrastive preference optimisation: the preference term of CPO (DPO without a
    reference model).

    .. math::
        z = \beta\,\bigl(\log\pi(y_w) - \log\pi(y_l)\bigr), \qquad
        \ell = -(1 - \varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)

    Sequence log-probs are **sums** over the completion's tokens (TRL's ``CPOTrainer`` with
    ``loss_type='sigmoid'``). CPO's full objective adds the negative log-likelihood of the
    chosen completions (TRL's ``cpo_alpha`` times it): compute that with
    :func:`~losskit.functional.linear_cross_entropy` or
    :func:`~losskit.functional.cross_entropy` and add it.

    Args:
        chosen_logps: summed log-probs of the preferred completions, ``[batch]``.
        rejected_logps: summed log-probs of the dispreferred completions, same shape.
        beta: :math:`\beta \ge 0` (TRL's default, 0.1).
        label_smoothing: :math:`\varepsilon` in [0, 0.5], the assumed rate of flipped labels.
        reduction: ``'mean'`` over pairs, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the per-pair losses with ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import cpo_loss
        >>> cpo_loss(torch.tensor([-20.0]), torch.tensor([-26.0]), beta=0.1)  # -log sigmoid(0.6)
        tensor(0.4375)

    References:
        Xu et al., "Contrastive Preference Optimization: Pushing the Boundaries of LLM
        Performance in Machine Translation", 2024; TRL 1.16 ``CPOTrainer``.
    """
    fn = "cpo_loss"
    reduction = resolve_reduction(None, None, reduction)
    _check_beta(beta, fn)
    _check_smoothing(label_smoothing, fn)
    _check_logps(fn, chosen_logps=chosen_logps, rejected_logps=rejected_logps)

    def reference(chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
        compute, out = result_dtypes(chosen_logps, rejected_logps)
        z = beta * (cast(chosen_logps, compute) - cast(rejected_logps, compute))
        return reduce_loss(_smoothed_logistic(z, label_smoothing), reduction).to(out)

    if _fused_serves(chosen_logps, rejected_logps):
        return _pair_call(fn, reference, chosen_logps, rejected_logps, None, None,
                          remembered_options(PairOptions, "logistic", float(beta), 0.0, float(label_smoothing),
                                             reduction))
    return reference(chosen_logps, rejected_logps)


# ---- ORPO -----------------------------------------------------------------------------------------


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x <= 0, in two branches split at -ln 2 (Maechler): log1p(-e^x) loses
    nothing where e^x is small, log(-expm1(x)) where x is near 0. Each branch reads a
    value safe for it, so the unused branch's gradient is never inf * 0."""
    low = x < -math.log(2)
    return torch.where(low, torch.log1p(-torch.exp(torch.where(low, x, -1.0))),
                       torch.log(-torch.expm1(torch.where(low, -1.0, x))))


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float = 0.1, reduction: str = "mean") -> Tensor:
    r"""The odds-ratio term of ORPO, on per-token mean log-probs.

    .. math::
        \log\mathrm{OR} = \log\frac{\mathrm{odds}(y_w)}{\mathrm{odds}(y_l)}
        = (\bar\ell_w - \bar\ell_l) - \bigl(\log(1 - e^{\bar\ell_w}) - \log(1 - e^{\bar\ell_l})\bigr),
        \qquad \mathcal{L}_\text{OR} = -\beta \log\sigma(\log\mathrm{OR})

    with :math:`\mathrm{odds}(y) = P(y) / (1 - P(y))` and :math:`\bar\ell` the **per-token
    mean** log-prob of a completion (the paper, TRL's ``ORPOTrainer``, Liger). ORPO's full
    objective is :math:`\mathcal{L}_\text{SFT} + \mathcal{L}_\text{OR}`, the first being the
    chosen completions' negative log-likelihood: add
    :func:`~losskit.functional.linear_cross_entropy` (or ``cross_entropy``) of the chosen
    tokens. TRL returns :math:`\beta\log\sigma(\log\mathrm{OR})` and subtracts it; this
    function returns the term to add.

    Args:
        chosen_logps: per-token mean log-probs of the preferred completions, ``[batch]``;
            log-probs are at most 0 (a positive value is an error where values are checked).
        rejected_logps: per-token mean log-probs of the dispreferred completions, same shape.
        beta: :math:`\beta \ge 0`, the weight of the odds-ratio term (ORPO's :math:`\lambda`;
            TRL's default, 0.1).
        reduction: ``'mean'`` over pairs, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the per-pair losses with ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import orpo_loss
        >>> orpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), beta=0.1)
        tensor(0.0171)

    References:
        Hong, Lee and Thorne, "ORPO: Monolithic Preference Optimization without Reference
        Model", 2024; TRL 1.16 ``ORPOTrainer``.
    """
    fn = "orpo_loss"
    reduction = resolve_reduction(None, None, reduction)
    _check_beta(beta, fn)
    _check_logps(fn, chosen_logps=chosen_logps, rejected_logps=rejected_logps)

    def reference(chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
        compute, out = result_dtypes(chosen_logps, rejected_logps)
        c, r = cast(chosen_logps, compute), cast(rejected_logps, compute)
        log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
        return reduce_loss(-beta * F.logsigmoid(log_odds), reduction).to(out)

    if _fused_serves(chosen_logps, rejected_logps):  # the values are checked there
        return _pair_call(fn, reference, chosen_logps, rejected_logps, None, None,
                          remembered_options(PairOptions, "orpo", float(beta), 0.0, 0.0, reduction))
    for name, t in (("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps)):
        _check_not_positive(t, name, fn)
    return reference(chosen_logps, rejected_logps)


def _check_not_positive(t: Tensor, name: str, fn: str) -> None:
    def report(bad: Tensor) -> Exception:
        where = first_index(bad)
        return ValueError(f"{fn}: {name} must hold log-probabilities (<= 0); found {float(t.detach()[where]):g}"
                          f"{at_index(where)}")

    check_values(t, lambda: t > 0, report, f"{fn}: {name} must hold log-probabilities (<= 0)")


# ---- KTO ------------------------------------------------------------------------------------------


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor | None,
    desirable: Tensor,
    *,
    beta: float = 0.1,
    kl: Tensor | float | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    r"""Kahneman-Tversky optimisation: a loss on unpaired completions labelled desirable or
    undesirable.

    .. math::
        r = \log\pi(y) - \log\pi_\text{ref}(y), \qquad
        \ell = \begin{cases} \lambda_D\,\bigl(1 - \sigma(\beta (r - z_0))\bigr) & y \text{ desirable} \\
        \lambda_U\,\bigl(1 - \sigma(\beta (z_0 - r))\bigr) & y \text{ undesirable} \end{cases}

    where :math:`z_0 = \max(0, \mathrm{kl})` is the batch's estimate of
    :math:`\mathrm{KL}(\pi \,\|\, \pi_\text{ref})` (TRL: the mean of :math:`\log\pi -
    \log\pi_\text{ref}` over mismatched prompt-completion pairs, clamped at 0), used as a
    constant (detached). Sequence log-probs are **sums** over the completion's tokens (TRL's
    ``KTOTrainer``). ``'mean'`` divides the weighted sum by the number of examples, as TRL
    does, not by the summed weights.

    Args:
        logps: summed policy log-probs of the completions, ``[batch]``.
        ref_logps: summed reference log-probs, same shape, detached; None for a reference-free
            loss (:math:`r = \log\pi(y)`, as Liger allows).
        desirable: boolean ``[batch]``, True where the completion is desirable.
        beta: :math:`\beta \ge 0` (TRL's default, 0.1).
        kl: the KL estimate :math:`\mathrm{kl}` (a number or a 0-d / broadcastable tensor),
            clamped at 0 and detached; None for :math:`z_0 = 0` (TRL's
            ``apo_zero_unpaired``-style runs without a KL estimate).
        desirable_weight: :math:`\lambda_D \ge 0`.
        undesirable_weight: :math:`\lambda_U \ge 0`.
        reduction: ``'mean'`` over examples, ``'sum'`` or ``'none'`` (one weighted loss per
            example, in input order).

    Returns:
        A scalar, or the per-example losses with ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import kto_loss
        >>> logps, ref = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.0])
        >>> kto_loss(logps, ref, torch.tensor([True, False]), beta=1.0)  # both rewards favour the label
        tensor(0.2689)

    References:
        Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization", 2024;
        TRL 1.16 ``KTOTrainer``.
    """
    fn = "kto_loss"
    reduction = resolve_reduction(None, None, reduction)
    _check_beta(beta, fn)
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not (w >= 0 and math.isfinite(w)):
            raise ValueError(f"{fn}: {name} must be a finite number >= 0; got {w}")
    shape = _check_logps(fn, logps=logps, ref_logps=ref_logps)
    if not isinstance(desirable, Tensor) or desirable.dtype != torch.bool:
        got = desirable.dtype if isinstance(desirable, Tensor) else type(desirable).__name__
        raise TypeError(f"{fn}: desirable must be a boolean tensor (True for a desirable completion); got {got}")
    if desirable.shape != shape:
        raise ValueError(f"{fn}: desirable shape {tuple(desirable.shape)} must equal logps shape {tuple(shape)}")
    if isinstance(kl, Tensor):
        check_floating(kl, "kl", fn)
        try:
            torch.broadcast_shapes(kl.shape, shape)
        except RuntimeError:
            raise ValueError(f"{fn}: kl of shape {tuple(kl.shape)} does not broadcast to logps shape "
                             f"{tuple(shape)}") from None
    elif kl is not None and not math.isfinite(kl):
        raise ValueError(f"{fn}: kl must be a finite number, a tensor or None; got {kl}")

    if not isinstance(kl, Tensor) and _fused_serves(logps, ref_logps):
        z0_value = 0.0 if kl is None else max(float(kl), 0.0)
        ref = None if ref_logps is None else ref_logps.detach()
        options = remembered_options(KtoOptions, float(beta), z0_value, float(desirable_weight),
                                     float(undesirable_weight), reduction)
        return fused_kto(logps, ref, desirable, options=options,
                         replay=Replay(fn, lambda x: kto_loss(x, ref_logps, desirable, beta=beta, kl=kl,
                                                              desirable_weight=desirable_weight,
                                                              undesirable_weight=undesirable_weight,
                                                              reduction=reduction), [logps]))

    tensors = [logps] + ([ref_logps] if ref_logps is not None else [])
    compute, out = result_dtypes(*tensors)
    r = cast(logps, compute)
    if ref_logps is not None:
        r = r - cast(ref_logps.detach(), compute)
    if kl is None:
        z0: Tensor | float = 0.0
    elif isinstance(kl, Tensor):
        z0 = cast(kl.detach(), compute).clamp(min=0)
    else:
        z0 = max(float(kl), 0.0)
    # 1 - sigmoid(u) = sigmoid(-u), which keeps its precision where sigmoid(u) is near 1.
    loss = torch.where(desirable, desirable_weight * torch.sigmoid(-beta * (r - z0)),
                       undesirable_weight * torch.sigmoid(-beta * (z0 - r)))
    return reduce_loss(loss, reduction).to(out)
