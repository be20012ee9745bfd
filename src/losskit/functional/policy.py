r"""Policy-gradient losses on per-token log-probabilities: GRPO and its family (Dr. GRPO,
DAPO, BNPO, CISPO, SAPO, LUSPO; GSPO's sequence-level importance sampling).

For a batch of :math:`B` completions of at most :math:`T` tokens, with mask :math:`m_{it}`,
advantages :math:`A_i` (or :math:`A_{it}`), the importance ratio
:math:`\rho_{it} = \exp(\log\pi_\theta - \log\pi_\text{old})` (per token), or with
``importance_sampling_level='sequence'`` (GSPO) the ratio of the geometric means,
:math:`\rho_i = \exp\bigl(\sum_t m_{it} (\log\pi_\theta - \log\pi_\text{old}) / \max(1, \sum_t m_{it})\bigr)`,
each token's loss is (TRL 1.16, ``GRPOTrainer._compute_loss``):

- grpo, bnpo, dr_grpo, dapo, luspo:
  :math:`\ell_{it} = -\min\bigl(\min(\rho, \delta) A,\
  \mathrm{clip}(\rho, 1 - \epsilon_\text{low}, 1 + \epsilon_\text{high}) A\bigr)`
  (:math:`\delta` only when given: INTELLECT-2's two-sided clipping)
- cispo: :math:`\ell_{it} = -\operatorname{sg}[\min(\rho, \epsilon_\text{high})]\, A \log\pi_\theta`
  (here :math:`\epsilon_\text{high}` caps the ratio itself; ScaleRL recommends 5)
- sapo: :math:`\ell_{it} = -\frac{4}{\tau}\sigma\bigl(\tau(\rho - 1)\bigr) A`, :math:`\tau = \tau_+` where
  :math:`A > 0`, else :math:`\tau_-`

plus :math:`\beta\, k_3` with the k3 estimator of :math:`\mathrm{KL}(\pi_\theta \,\|\, \pi_\text{ref})`,
:math:`k_3 = e^{\log\pi_\text{ref} - \log\pi_\theta} - (\log\pi_\text{ref} - \log\pi_\theta) - 1`,
times :math:`\rho` when ``use_bias_correction_kl`` (TRL 1.16's default). The loss types differ
in how they normalise :math:`\sum m_{it} \ell_{it}`:

==========  =====================================================================  ==================
loss_type   loss                                                                   normaliser
==========  =====================================================================  ==================
grpo, sapo  :math:`\frac1B\sum_i \frac{\sum_t m_{it}\ell_{it}}{\max(1, \sum_t m_{it})}`  each sequence's length
bnpo        :math:`\sum_{it} m_{it}\ell_{it} / \max(1, \sum_{it} m_{it})`           tokens of this batch
dr_grpo     :math:`\sum_{it} m_{it}\ell_{it} / (B \cdot L_\text{max})`               a constant
dapo, cispo :math:`\sum_{it} m_{it}\ell_{it} / \max(1, N)`                           tokens of the global batch
luspo       :math:`\frac1B\sum_i \sum_t m_{it}\ell_{it}`                              the batch size
==========  =====================================================================  ==================

:math:`N` (``num_items``) is the number of tokens that count summed over every
data-parallel rank and every gradient-accumulation micro-batch of the optimiser step. Each
micro-batch's loss is then its share of one global token mean, so summing the micro-batches
(gradient accumulation adds gradients) gives exactly that mean, whatever the ranks' and
micro-batches' lengths; dividing each micro-batch by its own token count instead (bnpo)
weighs the tokens of short micro-batches more. Data-parallel wrappers (DDP, FSDP) average
gradients over the :math:`W` ranks, so multiply the loss by :math:`W` there, as TRL and
transformers' ``Trainer`` do (TRL 1.16's dapo loss is this one times its
``num_processes``). The other loss types are per-micro-batch means: divide them by the
number of accumulation steps yourself, as TRL does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dataclasses import dataclass

from .._core.dtypes import cast, result_dtypes
from .._core.validation import check_floating
from ..kernels.fused_op import FusedOp, Replay, fused_may_serve, remembered_options

__all__ = ["grpo_loss"]

GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_GLOBAL = ("dapo", "cispo")


def grpo_loss(
    log_probs: Tensor,
    old_log_probs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_log_probs: Tensor | None = None,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: Tensor | int | float | None = None,
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    use_bias_correction_kl: bool = True,
) -> Tensor:
    r"""Group relative policy optimisation and its variants, from per-token log-probs.

    .. math::
        \mathcal{L} = \frac{1}{Z}\sum_{i,t} m_{it}\Bigl[-\min\bigl(\rho_{it} A_i,\
        \mathrm{clip}(\rho_{it}, 1 - \epsilon_\text{low}, 1 + \epsilon_\text{high}) A_i\bigr)
        + \beta\, k_3(\pi_\theta, \pi_\text{ref})_{it}\Bigr]

    with the per-token loss and the normaliser :math:`Z` of each ``loss_type`` listed in
    :mod:`losskit.functional.policy` (TRL 1.16's ``GRPOTrainer``: sums over tokens, then the
    normaliser of the loss type; ``'grpo'`` averages each sequence over its own tokens first).

    Masked positions never reach the loss or its gradient, whatever they hold (padding may
    carry ``-inf`` or nan log-probs): they are replaced before any arithmetic, not
    multiplied by 0.

    Args:
        log_probs: policy log-probs of the sampled tokens, ``[batch, tokens]``, with gradient.
        old_log_probs: log-probs of the same tokens under the policy that sampled them, same
            shape, detached; None for on-policy training (then :math:`\rho = 1` in value, as
            TRL uses ``log_probs.detach()``).
        advantages: ``[batch]`` (one per completion) or ``[batch, tokens]``.
        mask: ``[batch, tokens]``, bool or 0/1: which tokens count (the completion, minus padding).
        ref_log_probs: reference-model log-probs, same shape, detached; required when
            ``beta != 0``.
        beta: :math:`\beta \ge 0`, the KL coefficient (0 drops the KL term and the reference).
        epsilon_low: :math:`\epsilon_\text{low} \ge 0`, the lower clip :math:`1 - \epsilon_\text{low}`.
        epsilon_high: :math:`\epsilon_\text{high} \ge 0`, the upper clip :math:`1 + \epsilon_\text{high}`
            (DAPO's clip-higher uses 0.28); for ``'cispo'`` the cap of the ratio itself (TRL's
            meaning; ScaleRL recommends 5.0).
        loss_type: ``'grpo'``, ``'bnpo'``, ``'dr_grpo'``, ``'dapo'`` (TRL's default),
            ``'cispo'``, ``'sapo'`` or ``'luspo'``.
        importance_sampling_level: ``'token'`` (GRPO) or ``'sequence'`` (GSPO: one ratio per
            completion, the exponential of its mean log-ratio).
        max_completion_length: :math:`L_\text{max}` of ``'dr_grpo'``; None for ``tokens``,
            the padded width, which is TRL's value when completions are padded to the maximum.
            Only ``'dr_grpo'`` takes it.
        num_items: :math:`N` of ``'dapo'`` and ``'cispo'``: the number of tokens that count
            across every data-parallel rank and gradient-accumulation micro-batch of the
            optimiser step (an int, or a 0-d tensor, e.g. all-reduced); None for this batch's
            own count (right only in one process without accumulation). Clamped at 1.
        delta: INTELLECT-2's upper bound on the unclipped ratio (greater than
            :math:`1 + \epsilon_\text{high}`); None for none. The clipped loss types only.
        sapo_temperature_pos: SAPO's :math:`\tau_+ > 0`, for tokens with positive advantage.
        sapo_temperature_neg: SAPO's :math:`\tau_- > 0`, for the others.
        use_bias_correction_kl: multiply :math:`k_3` by :math:`\rho` (DeepSeek-V3.2's unbiased
            KL gradient off-policy; TRL 1.16's default; Liger 0.8.5 defaults to False).

    Returns:
        The scalar loss, in the promoted dtype of ``log_probs`` and ``advantages``.

    Example:
        >>> import torch
        >>> from losskit.functional import grpo_loss
        >>> log_probs = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.2, 0.0]])
        >>> mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
        >>> advantages = torch.tensor([1.0, -1.0])
        >>> grpo_loss(log_probs, None, advantages, mask, beta=0.0)  # on-policy: -(3 - 2) / 5 tokens
        tensor(-0.2000)

    References:
        Shao et al., "DeepSeekMath" (GRPO), 2024; Liu et al., "Understanding R1-Zero-Like
        Training" (Dr. GRPO), 2025; Yu et al., "DAPO", 2025; Zheng et al., "Group Sequence
        Policy Optimization" (GSPO), 2025; MiniMax, "MiniMax-M1" (CISPO), 2025; Gao et al.,
        "Soft Adaptive Policy Optimization" (SAPO), 2025; LUSPO, 2026; Schulman et al.,
        "Approximating KL Divergence" (k3), 2020; TRL 1.16 ``GRPOTrainer``.
    """
    fn = "grpo_loss"
    _check_options(fn, loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high, max_completion_length,
                   num_items, delta, sapo_temperature_pos, sapo_temperature_neg, ref_log_probs)
    _check_tensors(fn, log_probs, old_log_probs, advantages, mask, ref_log_probs, num_items)

    if (beta == 0.0 and delta is None and loss_type in _CLIPPED and importance_sampling_level == "token"
            and old_log_probs is not None and not isinstance(num_items, Tensor) and log_probs.numel() > 0
            and not (advantages.requires_grad and torch.is_grad_enabled())
            and fused_may_serve(log_probs, old_log_probs, advantages)):
        length = log_probs.shape[-1] if max_completion_length is None else max_completion_length
        options = remembered_options(ClippedOptions, loss_type, float(epsilon_low), float(epsilon_high), int(length),
                                   None if num_items is None else float(num_items))
        old = old_log_probs.detach()

        def reference(lp: Tensor) -> Tensor:
            return grpo_loss(lp, old, advantages, mask, beta=0.0, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                             loss_type=loss_type, max_completion_length=max_completion_length, num_items=num_items)

        return fused_clipped(log_probs, old, advantages, mask, options=options,
                             replay=Replay(fn, reference, [log_probs]))

    tensors = [log_probs, advantages] + [t for t in (old_log_probs, ref_log_probs) if t is not None]
    compute, out = result_dtypes(*tensors)
    keep = mask if mask.dtype == torch.bool else mask != 0
    weight = keep.to(compute)
    # Masked positions are replaced before any arithmetic: a padding -inf or nan times a
    # mask of 0 would still be nan, in the loss and in the gradient.
    lp = torch.where(keep, cast(log_probs, compute), 0.0)
    old = lp.detach() if old_log_probs is None else torch.where(keep, cast(old_log_probs.detach(), compute), 0.0)
    adv = cast(advantages, compute)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else torch.where(keep, adv, 0.0)
    tokens_per_row = weight.sum(-1, keepdim=True)

    log_ratio = lp - old
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio * weight).sum(-1, keepdim=True) / tokens_per_row.clamp(min=1.0)
    ratio = torch.exp(log_ratio)

    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=epsilon_high).detach() * adv * lp
    elif loss_type == "sapo":
        # Tensors of the compute dtype: torch.where on two Python floats would round them to float32.
        tau = torch.where(adv > 0, torch.full_like(adv, sapo_temperature_pos),
                          torch.full_like(adv, sapo_temperature_neg))
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    else:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token = -torch.min(unclipped * adv, clipped * adv)

    if beta != 0.0:
        ref = torch.where(keep, cast(ref_log_probs.detach(), compute), 0.0)
        d = ref - lp
        k3 = torch.exp(d) - d - 1  # >= 0, unbiased for KL(pi || ref) under samples of pi
        if use_bias_correction_kl:
            k3 = k3 * ratio
        per_token = per_token + beta * k3

    masked = per_token * weight  # per_token may be [batch, 1] (sequence level): broadcast over tokens
    if loss_type in ("grpo", "sapo"):
        loss = (masked.sum(-1) / tokens_per_row.squeeze(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / weight.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        length = log_probs.shape[-1] if max_completion_length is None else max_completion_length
        loss = masked.sum() / (log_probs.shape[0] * length)
    elif loss_type == "luspo":
        loss = masked.sum(-1).mean()
    else:  # dapo, cispo
        if num_items is None:
            normaliser: Tensor | float = weight.sum().clamp(min=1.0)
        elif isinstance(num_items, Tensor):
            normaliser = cast(num_items.detach(), compute).clamp(min=1.0)
        else:
            normaliser = max(float(num_items), 1.0)
        loss = masked.sum() / normaliser
    return loss.to(out)


def _check_options(fn, loss_type, level, beta, epsilon_low, epsilon_high, max_completion_length, num_items, delta,
                   tau_pos, tau_neg, ref_log_probs) -> None:
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"{fn}: loss_type must be one of {', '.join(map(repr, GRPO_LOSS_TYPES))}; got {loss_type!r}")
    if level not in ("token", "sequence"):
        raise ValueError(f"{fn}: importance_sampling_level must be 'token' or 'sequence'; got {level!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"{fn}: beta must be a finite number >= 0; got {beta!r}")
    if beta != 0.0 and ref_log_probs is None:
        raise ValueError(f"{fn}: ref_log_probs is required when beta != 0 (the KL term to the reference model); "
                         "pass beta=0.0 to train without one")
    for name, value in (("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{fn}: {name} must be a finite number >= 0; got {value}")
    if max_completion_length is not None:
        if loss_type != "dr_grpo":
            raise ValueError(f"{fn}: max_completion_length is the normaliser of loss_type='dr_grpo' only; "
                             f"got max_completion_length={max_completion_length} with loss_type={loss_type!r}")
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) or \
                max_completion_length < 1:
            raise ValueError(f"{fn}: max_completion_length must be a positive int; got {max_completion_length!r}")
    if num_items is not None:
        if loss_type not in _GLOBAL:
            raise ValueError(f"{fn}: num_items (the global token count) is the normaliser of loss_type 'dapo' and "
                             f"'cispo' only; got it with loss_type={loss_type!r}")
        if not isinstance(num_items, Tensor) and (isinstance(num_items, bool) or not isinstance(num_items, (int, float))
                                                   or not (num_items >= 0 and math.isfinite(num_items))):
            raise ValueError(f"{fn}: num_items must be a count >= 0 (a number or a 0-d tensor); got {num_items!r}")
    if delta is not None:
        if loss_type not in _CLIPPED:
            raise ValueError(f"{fn}: delta bounds the ratio of the clipped loss types "
                             f"({', '.join(map(repr, _CLIPPED))}) only; got delta={delta} with loss_type={loss_type!r}")
        if not (delta > 0 and math.isfinite(delta)):
            raise ValueError(f"{fn}: delta must be a positive, finite number; got {delta}")
    for name, value in (("sapo_temperature_pos", tau_pos), ("sapo_temperature_neg", tau_neg)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{fn}: {name} must be a positive, finite number; got {value}")


def _check_tensors(fn, log_probs, old_log_probs, advantages, mask, ref_log_probs, num_items) -> None:
    for name, t in (("log_probs", log_probs), ("old_log_probs", old_log_probs), ("advantages", advantages),
                    ("ref_log_probs", ref_log_probs)):
        if t is not None:
            if not isinstance(t, Tensor):
                raise TypeError(f"{fn}: {name} must be a tensor; got {type(t).__name__}")
            check_floating(t, name, fn)
    if log_probs.dim() != 2:
        raise ValueError(f"{fn}: log_probs must be [batch, tokens]; got shape {tuple(log_probs.shape)}")
    shape = tuple(log_probs.shape)
    for name, t in (("old_log_probs", old_log_probs), ("ref_log_probs", ref_log_probs)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{fn}: {name} shape {tuple(t.shape)} must equal log_probs shape {shape}")
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(f"{fn}: advantages must be [batch] {shape[:1]} or [batch, tokens] {shape}; "
                         f"got shape {tuple(advantages.shape)}")
    if not isinstance(mask, Tensor) or mask.is_complex():
        raise TypeError(f"{fn}: mask must be a bool or 0/1 tensor")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{fn}: mask shape {tuple(mask.shape)} must equal log_probs shape {shape}")
    if isinstance(num_items, Tensor):
        if num_items.dim() != 0:
            raise ValueError(f"{fn}: num_items must be a number or a 0-d tensor; got shape {tuple(num_items.shape)}")
        if num_items.is_complex():
            raise TypeError(f"{fn}: num_items must be a real count; got {num_items.dtype}")


# ---- the fused clipped surrogate ---------------------------------------------------------------
# The clipped loss types without the KL term (beta = 0, TRL's default since 0.19), token-level
# ratios and no delta: the loss and the gradient of the log-probs in one pass, which the C++
# node of losskit._native hands out in backward. Per counted token, with u = rho A and
# c = clip(rho, 1 - eps_low, 1 + eps_high) A:
#
#   l = -min(u, c),   dl/d log pi = -u [u <= c]
#
# (du/d log pi = u; c's derivative is u inside the clip range, where u = c, and 0 outside it,
# where the minimum picks c only if u > c; torch's minimum splits a tie's gradient in halves,
# which add up to the same u), times the normaliser of the loss type.


@dataclass(frozen=True)
class ClippedOptions:
    """loss_type: one of _CLIPPED; length: dr_grpo's L_max; num_items: dapo's N (None: this
    batch's token count)."""

    loss_type: str
    epsilon_low: float
    epsilon_high: float
    length: int
    num_items: float | None
    reduction: str = "mean"


def clipped_forward(log_probs, old_log_probs, advantages, mask, *, options: ClippedOptions, needs):
    """(loss, (d loss / d log_probs,)) of the fused clipped surrogate."""
    compute, out = result_dtypes(log_probs, advantages, old_log_probs)
    keep = mask if mask.dtype == torch.bool else mask != 0
    # Masked positions are replaced before any arithmetic (see grpo_loss).
    log_ratio = torch.where(keep, cast(log_probs, compute), 0.0) - torch.where(keep, cast(old_log_probs, compute), 0.0)
    ratio = torch.exp(log_ratio)
    adv = cast(advantages, compute)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else torch.where(keep, adv, 0.0)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - options.epsilon_low, 1 + options.epsilon_high) * adv
    # -min(u, c) on the counted tokens, 0 elsewhere: ratio is 1 there and adv finite.
    per_token = torch.where(keep, torch.minimum(unclipped, clipped), 0.0)
    rows, loss_type = log_probs.shape[0], options.loss_type
    if loss_type == "grpo":
        # Each sequence over its own tokens, then the mean over sequences.
        scale: Tensor | float = keep.sum(-1, keepdim=True).clamp(min=1).to(compute).mul_(-rows).reciprocal_()
        loss = (per_token * scale).sum()
    else:
        if loss_type == "dr_grpo":
            scale = -1.0 / (rows * options.length)
        elif loss_type == "luspo":
            scale = -1.0 / rows
        elif loss_type == "bnpo" or options.num_items is None:
            scale = keep.sum().clamp(min=1).to(compute).neg().reciprocal()
        else:
            scale = -1.0 / max(options.num_items, 1.0)
        loss = per_token.sum() * scale
    grad = None
    if needs[0]:
        grad = torch.where(keep & (unclipped <= clipped), unclipped, 0.0).mul_(scale).to(log_probs.dtype)
    return loss.to(out), (grad,)


fused_clipped = FusedOp(
    "grpo_clipped",
    tensors=("log_probs", "old_log_probs", "advantages", "mask"),
    differentiable=1,
    options=ClippedOptions,
    forward=clipped_forward,
)
