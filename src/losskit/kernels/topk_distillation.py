r"""Top-k distillation, fused: the loss and the student's gradient in one forward.

:func:`losskit.functional.topk_distillation_loss` compares k + 1 buckets: the teacher's
top-k tokens (ids :math:`i_j`, log-probabilities :math:`\log P_j`, padding where
:math:`\log P_j = -\infty`) and the rest, :math:`P_r = 1 - \sum_j P_j` (clamped at 0),
against the student's q = softmax(z), z = s / T, grouped the same way. With R the classes
outside the present top-k:

    lse   = log sum_c exp(z_c)
    L_j   = z_{i_j} - lse                    (present j; -inf for padding)
    L_r   = log sum_{c in R} exp(z_c) - lse
    soft  = D_beta((P_1..P_k, P_r), (Q_1..Q_k, Q_r)),   Q_b = exp(L_b)

**Gradient.** With G_b = d soft / d L_b (the buckets' log-probabilities taken as free):

    beta = 0        D = sum_b P_b (log P_b - L_b)          G_b = -P_b
    beta = 1        D = sum_b Q_b (L_b - log P_b)          G_b = Q_b (L_b - log P_b) + Q_b
    0 < beta < 1    D = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q
                    G_b = (1 - beta) Q_b (L_b - log M_b)   (the terms through M cancel)

(each term masked where its P_b, resp. Q_b, is 0, as the composed form's 0 log 0 = 0), and
d lse / d z_c = q_c, d L_j / d z_c = [c = i_j] - q_c, d L_r / d z_c = [c in R] q_c / Q_r - q_c.
So, with Gamma = sum_b G_b:

    d soft / d z_c = G_j - Q_j Gamma                     c = i_j, present
                   = q_c (G_r / Q_r - Gamma)             c in R (padding ids included)

**One pass over the rest.** The rest's log-sum-exp is shifted by the rest's own max m_r
(never the row's max: a rest far below a top token would underflow to 0, where the
composed form's log-space sum stays exact): e_c = exp(z_c - m_r) on R, 0 on the present
top-k, E_r = sum_c e_c, so log sum_R exp(z) = m_r + log E_r, and lse is the log-sum-exp of
the k + 1 numbers (z_{i_j} present, m_r + log E_r). Then q_c / Q_r = e_c / E_r and
q_c = e_c exp(m_r - lse), and the whole (N, V) gradient is the buffer e times one number
per row,

    A = G_r / E_r - Gamma exp(m_r - lse),

plus k values per row written onto the present top-k (where e is 0). The (N, V) work is a
copy, the max, the shift, the exp, the sum and that product: everything else is on (N, k + 1).

The hard loss at temperature 1 (T = 1): -log softmax(s)_y = lse - s_y, whose gradient
q - onehot(y) is the same buffer (A gains exp(m_r - lse), the top-k values Q_j, and -1 at y);
at T != 1 it takes its own log-softmax of s. Each row's gradient is scaled by
w_soft / T, by 1 / (tokens counted) for 'mean', and is 0 on an ignored token (whose
logits read as 0, ids as 0..k-1 and log-probabilities as -inf: finite, whatever it held).
reduction='none' makes the same gradient with a factor of 1 and scales it by each row's
grad_output in backward. The custom op (``losskit::topk_distillation``), its fake, the
autograd node and the double-backward replay come from
:class:`~losskit.kernels.fused_op.FusedOp`; ``losskit._native``'s ``topk_distillation``
is :func:`topk_distillation_forward` op for op, bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core.dtypes import result_dtypes
from .fused_op import FusedOp
from .linear_distillation import DistillationOptions, log_mixture, reduce_rows


def safe_log(x: Tensor) -> Tensor:
    """log x for x >= 0, -inf at 0 with a zero gradient (never 0 * inf = nan)."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).log(), -math.inf)


def safe_logsumexp(x: Tensor) -> Tensor:
    """logsumexp over the last dimension; -inf for a row of -inf (or no entries) with a
    zero gradient, where torch.logsumexp's backward gives nan (exp(-inf - -inf))."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], -math.inf)
    shift = x.amax(-1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    return safe_log((x - shift).exp().sum(-1)) + shift.squeeze(-1)


def teacher_rest(log_p_top: Tensor) -> Tensor:
    """log P_r, the teacher's tail: 1 - sum p, as -expm1(logsumexp) (exact when the top-k
    hold little mass); clamped at 0, since rounding can take the sum a little above 1."""
    return safe_log((-torch.expm1(safe_logsumexp(log_p_top))).clamp_min(0.0))


def topk_distillation_forward(student: Tensor, ids: Tensor, logps: Tensor, target: Tensor | None,
                              valid: Tensor | None, *, options: DistillationOptions, needs):
    """(loss, (d loss / d student,)) of flat ``student`` [N, V] logits, ``ids`` [N, k]
    (int64, checked), ``logps`` [N, k], ``target`` [N] (validated, ignored tokens read as
    0) and ``valid`` [N] (None: every token counts). See the module docstring."""
    compute, out = result_dtypes(student, logps)
    n, k = ids.shape
    temperature, beta = options.temperature, options.beta
    w_soft, w_hard = options.weight_soft_loss, options.weight_hard_loss
    want_grad = bool(needs[0])
    hard = w_hard != 0.0 and target is not None
    # The kernel's own (N, V) buffer of z = s / T, overwritten below.
    if temperature == 1.0:
        buf = student.to(compute, copy=True, memory_format=torch.contiguous_format)
    else:
        buf = torch.div(student.to(compute), temperature)
    if valid is not None:
        # An ignored token's logits may hold anything (inf, nan): read as 0, they pass
        # nothing to the loss or to the gradient; its ids as 0..k-1 (distinct, in range),
        # its log-probabilities as -inf (no teacher mass: all padding).
        counted = valid.unsqueeze(1)
        buf.masked_fill_(counted.logical_not(), 0.0)
        ids = torch.where(counted, ids, torch.arange(k, device=ids.device))
        log_p_top = torch.where(counted, logps.to(compute), -math.inf)
    else:
        log_p_top = logps.to(compute)
    column = None if target is None else target.unsqueeze(1)
    z_y = buf.gather(1, column).squeeze(1) if hard and temperature == 1.0 else None
    present = log_p_top > -math.inf
    z_top = buf.gather(1, ids)
    top = torch.where(present, z_top, -math.inf)
    # The rest: the present top-k's entries set to -inf (padding ids keep their logits).
    buf.scatter_(1, ids, torch.where(present, -math.inf, z_top))
    m_r = buf.amax(1, keepdim=True)
    m_r = torch.where(torch.isfinite(m_r), m_r, 0.0)  # k = V: no rest; exp(-inf - 0) = 0
    e = buf.sub_(m_r).exp_()
    e_r = e.sum(1)
    rest = safe_log(e_r) + m_r.squeeze(1)
    log_q = torch.cat([top, rest.unsqueeze(1)], 1)  # the buckets' log-sum-exps of z
    lse = safe_logsumexp(log_q)
    log_q = log_q.sub_(lse.unsqueeze(1))
    log_p = torch.cat([log_p_top, teacher_rest(log_p_top).unsqueeze(1)], 1)
    q = log_q.exp()
    # D_beta over the k + 1 buckets (divergence_rows' terms) and G = d D / d log_q.
    if beta == 0.0:
        p = log_p.exp()
        soft = (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(1)
        g = p.neg_()
    elif beta == 1.0:
        qr = q * torch.where(q > 0, log_q - log_p, 0.0)
        soft = qr.sum(1)
        g = qr.add_(q)
    else:
        log_m = log_mixture(log_p, log_q, beta)
        p = log_p.exp()
        qr = q * torch.where(q > 0, log_q - log_m, 0.0)
        soft = beta * (p * torch.where(p > 0, log_p - log_m, 0.0)).sum(1) + (1.0 - beta) * qr.sum(1)
        g = qr.mul_(1.0 - beta)
    rows = soft if w_soft == 1.0 else soft * w_soft
    log_q1 = None
    if hard:
        if temperature == 1.0:
            hard_rows = lse - z_y
        else:
            x = student.to(compute)
            if valid is not None:
                x = x.masked_fill(valid.unsqueeze(1).logical_not(), 0.0)
            log_q1 = x - x.amax(1, keepdim=True)
            log_q1 = log_q1 - log_q1.exp().sum(1, keepdim=True).log()
            hard_rows = log_q1.gather(1, column).squeeze(1).neg()
        rows = rows + hard_rows * w_hard
    if valid is not None:
        rows = torch.where(valid, rows, 0.0)
    loss = reduce_rows(rows, valid, options.reduction).to(out)
    if not want_grad:
        return loss, (None,)
    # Each row's factor: 1 / (tokens counted) for 'mean', else 1; 0 where ignored.
    if options.reduction == "mean":
        factor = 1.0 / max(n, 1) if valid is None else valid.sum().clamp_min(1).to(compute).reciprocal()
    else:
        factor = 1.0
    if valid is not None:
        factor = torch.where(valid, factor, 0.0) if isinstance(factor, Tensor) else valid.to(compute) * factor
    scale = factor * (w_soft / temperature)  # a float, or one value per row
    g_top, g_r = g[:, :k], g[:, k]
    gamma = g.sum(1)
    q_shift = torch.exp(m_r.squeeze(1) - lse)  # q_c / e_c
    positive = e_r > 0
    coef = torch.where(positive, g_r / torch.where(positive, e_r, 1.0), 0.0) - gamma * q_shift
    coef = coef * scale
    q_top = q[:, :k]
    values = torch.where(present, g_top - q_top * gamma.unsqueeze(1), 0.0)
    values = values * (scale.unsqueeze(1) if isinstance(scale, Tensor) else scale)
    if hard and temperature == 1.0:  # + w_hard (q - onehot(y)), q from the same buffer
        h = factor * w_hard
        coef = coef + q_shift * h
        values = values + torch.where(present, q_top, 0.0) * (h.unsqueeze(1) if isinstance(h, Tensor) else h)
    grad = e.mul_(coef.unsqueeze(1)).scatter_add_(1, ids, values)
    if hard:
        h = factor * w_hard
        if temperature == 1.0:
            minus = h.neg().unsqueeze(1) if isinstance(h, Tensor) else torch.full_like(column, -h, dtype=compute)
            grad.scatter_add_(1, column, minus)
        else:  # softmax(s) - onehot(y) of its own log-softmax
            hard_grad = log_q1.exp_().scatter_add_(1, column, torch.full_like(column, -1, dtype=compute))
            grad.add_(hard_grad.mul_(h.unsqueeze(1) if isinstance(h, Tensor) else h))
    return loss, (grad.to(student.dtype),)


fused_topk_distillation = FusedOp(
    "topk_distillation",
    tensors=("student", "ids", "logps", "target?", "valid?"),
    differentiable=1,
    options=DistillationOptions,
    forward=topk_distillation_forward,
    unreduced="rows",
    native_forward="topk_distillation",
)
