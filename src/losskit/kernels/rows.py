"""The one derivation of cross-entropy's per-row loss and gradient coefficients, shared by
every fast path: the fused CPU kernel, the Triton kernel, linear cross-entropy and the
vocabulary-parallel losses. (The composed reference in losskit.functional stays separate
on purpose: it is the oracle these are tested against.)

For a row with raw logits x, target y (not ignored), class weights w (1 without weight),
W = sum_c w_c over all C classes, label smoothing eps, z-loss scale s, soft-cap cap and
temperature T, the logits the softmax sees are

    z = cap tanh(x / cap) / T          (without softcap: z = x / T)

and with p = softmax(z), lse = log sum_c exp z_c:

    loss   = (1 - eps) w_y (lse - z_y) + eps / C (W lse - sum_c w_c z_c) + s lse^2
    dx_c   = [p_c (coef + lse_coef lse) + target_step [c = y] + smooth_step w_c] (1 - tanh^2(x_c / cap))

    coef        = ((1 - eps) w_y + eps W / C) a        a = scale / T
    target_step = -(1 - eps) w_y a
    smooth_step = -eps / C a
    lse_coef    = 2 s z_scale / T

where 'mean' divides the cross-entropy by the summed target weights (scale = 1 / sum w_y, as
torch) and the z-loss by the number of rows that count (z_scale = 1 / count, a per-token
regulariser as in PaLM), and 'sum' / 'none' take 1 for both. An ignored row has loss 0 and
gradient 0; all rows ignored makes 'mean' 0/0 = nan, with a gradient of 0, as torch. The
1 / T of the chain rule and the 'mean' divisor are folded into the coefficients, so that
they cost nothing per element.

Accuracy. Where the model is confident, p_y is close to 1 and the target's gradient
coef (p_y - 1) cancels: a float32 softmax that sums 1 + (thousands of tiny exp terms)
loses each tiny term that falls below half an ulp of the running total, so p_y - 1 (true
1e-3) comes out ~10% off (torch's own float32 cross-entropy does the same). Every fast
path therefore sums the other classes without the target, others = sum_{c != y} e^{z_c - m},
and forms 1 - p_y = others / (others + e^{z_y - m}) and -log p_y = log1p(others / e^{z_y - m})
from it, never 1 - p_y by subtraction. The target's gradient is then written as

    dx_y = -coef (1 - p_y) + target_rest,     target_rest = coef + target_step

with target_rest formed without cancellation (0 for the plain loss, the smoothing and
z-loss parts otherwise); see :func:`apply_gradient` and :func:`target_gap`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._core.options import CrossEntropyOptions
from .._core.reduction import reduce_loss
from .._core.validation import ClassTargets


class Coefficients(NamedTuple):
    """Per-row factors of the gradient (N,), see the module docstring; None where the
    option that makes them is off."""

    coef: Tensor
    target_step: Tensor
    smooth_step: Tensor | None
    lse_coef: Tensor | None
    # coef + target_step without the cancellation: the smoothing part of coef (None when
    # there is none, i.e. 0); the z-loss part lse_coef lse is added per row by the kernels.
    target_rest: Tensor | float | None = None


class RowTerms:
    """The per-row quantities of a batch of rows that every fast path derives the same way.

    Args:
        options: the cross-entropy options.
        num_classes: C, the size of the whole vocabulary (all ranks' classes together).
        valid: (N,) rows that count; None when every row does.
        target_weight: (N,) w_y, 0 where ignored; None when every row counts with weight 1
            (no class weights, nothing ignored: the common case, which then costs no
            per-row tensor at all).
        total_weight: W, the sum of every class weight (C without weight).
        class_weight: the weights of the classes this caller's logits hold (for the
            smoothing step), None without weight.
        weighted: whether class weights are given (else target_weight counts the rows).
        num_rows: N, needed when neither ``valid`` nor ``target_weight`` says it.
    """

    def __init__(
        self,
        options: CrossEntropyOptions,
        num_classes: int,
        valid: Tensor | None,
        target_weight: Tensor | None,
        total_weight: Tensor | float,
        class_weight: Tensor | None,
        weighted: bool,
        num_rows: int | None = None,
    ) -> None:
        self.options, self.num_classes, self.valid = options, num_classes, valid
        self.total_weight, self.class_weight, self.weighted = total_weight, class_weight, weighted
        self.uniform = target_weight is None
        if self.uniform:
            self.target_weight: Tensor | float = 1.0
            self.counts: Tensor | float = 1.0
            self.denominator: Tensor | float = float(num_rows if valid is None else valid.shape[0])
            self.count: Tensor | float = self.denominator
        else:
            self.target_weight = target_weight
            counted = valid if valid is not None else torch.ones_like(target_weight, dtype=torch.bool)
            self.counts = counted.to(target_weight.dtype) if weighted else target_weight
            self.denominator = target_weight.sum()  # what 'mean' divides the cross-entropy by
            # ... and the z-loss, unweighted: the same number without class weights
            self.count = self.counts.sum() if weighted else self.denominator

    @staticmethod
    def local(
        targets: ClassTargets, weight: Tensor | None, num_classes: int, dtype: torch.dtype, options: CrossEntropyOptions
    ) -> RowTerms:
        """The terms of rows whose logits hold every class (one process)."""
        valid = targets.valid_or_none
        if weight is None:
            return RowTerms(options, num_classes, valid, None if valid is None else valid.to(dtype),
                            float(num_classes), None, False, num_rows=targets.target.shape[0])
        weight = weight.to(dtype)
        picked = weight[targets.safe()]
        target_weight = picked if valid is None else torch.where(valid, picked, 0.0)
        return RowTerms(options, num_classes, valid, target_weight, weight.sum(), weight, True)

    def scales(self) -> tuple[Tensor | float, Tensor | float]:
        """(divisor of the cross-entropy, of the z-loss) as factors: 1 / sum w_y and
        1 / count for 'mean' (0 where nothing counts), else 1."""
        if self.options.reduction != "mean":
            return 1.0, 1.0
        if self.uniform:
            return 1.0 / self.denominator, 1.0 / self.count
        ce = torch.where(self.denominator != 0, self.denominator, torch.inf).reciprocal()
        if not self.weighted:
            return ce, ce
        return ce, torch.where(self.count != 0, self.count, torch.inf).reciprocal()

    def coefficients(self, row_factor: Tensor | None = None) -> Coefficients:
        """The gradient's per-row factors, times ``row_factor`` (a per-row or scalar
        grad_output) when given. Each is a (N,) tensor, or a number or 0-d tensor where
        every row has the same (``uniform`` terms)."""
        opts = self.options
        eps, inv_t = opts.label_smoothing, 1.0 / opts.temperature
        ce_scale, z_scale = self.scales()
        a = ce_scale * inv_t if inv_t != 1.0 else ce_scale
        if row_factor is not None:
            a = a * row_factor
        target_part = self.target_weight * (a if eps == 0.0 else (1.0 - eps) * a)
        coef = target_part
        smooth_step = rest = None
        if eps > 0.0:
            smooth_a = self.counts * a
            rest = smooth_a * (eps * self.total_weight / self.num_classes)
            coef = target_part + rest
            smooth_step = smooth_a * (-eps / self.num_classes)
        lse_coef = None
        if opts.lse_square_scale:
            b = z_scale * (2.0 * opts.lse_square_scale * inv_t)
            if row_factor is not None:
                b = b * row_factor
            lse_coef = self.counts * b
        return Coefficients(coef, -target_part, smooth_step, lse_coef, rest)

    def loss(self, lse: Tensor | None, z_target: Tensor | None, smooth_dot: Tensor | None,
             nll: Tensor | None = None) -> Tensor:
        """The loss from each row's lse, z_y and sum_c w_c z_c, reduced by the options'
        reduction; rows ignored are 0. A kernel that has -log p_y = lse - z_y at hand
        passes it as ``nll`` (and lse only where smoothing or the z-loss need it)."""
        opts = self.options
        eps = opts.label_smoothing
        loss = nll if nll is not None else lse - z_target
        if not self.uniform:
            loss = self.target_weight * loss
        if eps > 0.0:
            loss = (1.0 - eps) * loss + (eps / self.num_classes) * (self.total_weight * lse - smooth_dot)
        if self.valid is not None:
            loss = torch.where(self.valid, loss, 0.0)
        if not opts.lse_square_scale:
            # Every row counting with weight 1: the denominator is the row count, mean()'s.
            return reduce_loss(loss, opts.reduction, None if self.uniform else self.denominator)
        z_loss = opts.lse_square_scale * lse.square()
        if self.valid is not None:
            z_loss = torch.where(self.valid, z_loss, 0.0)
        if opts.reduction == "mean":
            return loss.sum() / self.denominator + z_loss.sum() / self.count
        return reduce_loss(loss + z_loss, opts.reduction)


def per_row(value: Tensor | float, rows: slice) -> Tensor | float:
    """The rows' part of a coefficient: a slice of a (N,) tensor; a number or 0-d tensor
    serves every row as it is."""
    return value[rows] if isinstance(value, Tensor) and value.dim() else value


def transform_logits(x: Tensor, options: CrossEntropyOptions, owned: bool) -> tuple[Tensor, Tensor | None]:
    """(z, tanh(x / cap) or None): the logits the softmax sees, cap tanh(x / cap) / T.

    With ``owned`` the caller's buffer ``x`` may be overwritten; otherwise a new tensor is
    made whenever z differs from x. The tanh is kept for the soft-cap's derivative.
    """
    tanh = None
    z = x
    if options.softcap is not None:
        tanh = torch.tanh(x / options.softcap)
        z = torch.mul(tanh, options.softcap, out=x) if owned else tanh * options.softcap
        owned = True
    if options.temperature != 1.0:
        # A division, not a multiplication by 1 / T: bit for bit what logits / T gives.
        z = z.div_(options.temperature) if owned else z / options.temperature
    return z, tanh


def row_sums(t: Tensor) -> Tensor:
    """sum over dim 1 of a (B, C) tensor, each row's bits the same whatever B is.

    aten's CPU reduction reduces each row whole, in one thread and one order, whenever
    there are several rows; a single output (B = 1) is instead split across threads and
    its partial sums combined, which rounds differently. One row is therefore summed as
    two (a stride-0 view, no copy), so that a row alone equals the same row in a batch.
    """
    if t.shape[0] == 1 and t.is_cpu:
        return t.expand(2, -1).sum(dim=1)[:1]
    return t.sum(dim=1)


def target_gap(others: Tensor, target_share: Tensor, shift: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(1 - p_y, 1 / total, -log p_y) of each row from ``others``, the sum of the other
    classes' e_c = e^{z_c - m} (the target left out), and ``target_share`` = e_y, on any
    common scale (aten's softmax output will do: its error is mostly one factor per row).

    Both are summed without the large target term, so 1 - p_y = others / total keeps its
    relative precision however close p_y is to 1, and -log p_y = log1p(others / e_y) too.
    e_y may underflow (z_y far below the max m): given ``shift`` = z_y - m (on the scale
    e_c = e^{z_c - m}), those rows take -log p_y = log(total) - shift, branch-free;
    without it the caller redoes them.
    """
    total = others + target_share
    scale = total.reciprocal()
    nll = torch.log1p(others / target_share)
    if shift is not None:
        nll = torch.where(target_share >= 1e-30, nll, total.log() - shift)
    return others * scale, scale, nll


def apply_gradient(
    probs: Tensor,
    terms: RowTerms,
    coefficients: Coefficients,
    rows: slice,
    lse: Tensor | None,
    index: Tensor,
    tanh: Tensor | None,
    target_here: Tensor | None = None,
    *,
    gap: Tensor | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """Turn ``probs`` (B, C_local), the softmax of rows ``rows`` (times 1 / ``scale``, when
    given: e.g. the unnormalised e^{z - m}), into their gradient, in place:
    dx = [p (coef + lse_coef lse) + target_step [c = y] + smooth_step w] (1 - tanh^2).

    ``index`` (B, 1) is each row's target column in these logits; ``target_here`` (B,)
    says which rows hold their target among them (all, in one process). With ``gap``
    (B,), 1 - p_y formed without cancellation (see the module docstring), the target's
    entry is written as -coef gap + target_rest instead of p_y coef + target_step: the
    accurate form every path uses. Ignored rows are masked (their logits may be -inf and
    their p nan) unless every row counts.
    """
    coef = per_row(coefficients.coef, rows)
    lse_part = None
    if coefficients.lse_coef is not None:
        lse_part = per_row(coefficients.lse_coef, rows) * lse
        coef = coef + lse_part
    factor = coef if scale is None else scale * coef
    if isinstance(factor, Tensor) and factor.dim():
        probs.mul_(factor.unsqueeze(1))
    elif not (isinstance(factor, float) and factor == 1.0):
        probs.mul_(factor)
    if gap is not None:
        # The target's entry, overwritten: -coef (1 - p_y) + (coef + target_step).
        value = -gap * coef
        rest = per_row(coefficients.target_rest, rows) if coefficients.target_rest is not None else None
        if rest is not None:
            value = value + rest
        if lse_part is not None:
            value = value + lse_part
        if target_here is not None:
            value = torch.where(target_here, value, probs.gather(1, index).squeeze(1))
        probs.scatter_(1, index, value.to(probs.dtype).unsqueeze(1))
    if terms.valid is not None:
        probs.masked_fill_(~terms.valid[rows].unsqueeze(1), 0.0)
    if gap is None:
        step = per_row(coefficients.target_step, rows)
        if isinstance(step, float) and target_here is None:  # the same step for every row: no tensor of it
            probs.scatter_(1, index, step, reduce="add")
        else:
            if not isinstance(step, Tensor) or not step.dim():
                step = torch.as_tensor(step, dtype=probs.dtype, device=probs.device).expand(probs.shape[0])
            if target_here is not None:
                step = torch.where(target_here, step, 0.0)
            probs.scatter_add_(1, index, step.unsqueeze(1).to(probs.dtype))
    if coefficients.smooth_step is not None:
        smooth = per_row(coefficients.smooth_step, rows)
        smooth = smooth.unsqueeze(1) if isinstance(smooth, Tensor) and smooth.dim() else smooth
        if terms.class_weight is None:
            probs.add_(smooth)
        elif isinstance(smooth, Tensor):
            probs.addcmul_(smooth, terms.class_weight)
        else:
            probs.add_(terms.class_weight, alpha=smooth)
    if tanh is not None:
        probs.mul_(1.0 - tanh.square())
    return probs
