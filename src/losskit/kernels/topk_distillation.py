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

plus k values per row added onto the top-k ids (where e is 0; on padding ids the values
are 0, since G_j = Q_j = 0 there). E_r is at least 1 (the rest's max contributes exp(0))
unless the rest is empty (k = V), where it multiplies nothing (E_r is clamped at 1, not
divided by where 0). The (N, V) work is a copy, the max, the shift, the exp and the sum,
over chunks of rows that stay in the cache, then that product: everything else is on
(N, k + 1). The teacher's tail is 1 - sum_j P_j as -expm1(log sum_j P_j), clamped at 0.

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
from .linear_distillation import DistillationOptions, reduce_rows


def chunk_rows(num_classes: int) -> int:
    """Rows per chunk of the (N, V) passes: about 2 MiB of float32, which stay in the cache
    between the passes (measured at (4096, 1000), fwd+bwd: 1 MiB, 2 MiB, 4 MiB and one
    chunk took 30.2, 24.7, 25.4 and 28.8 ms on one thread, 14.2, 13.8, 14.2 and 14.7 ms on
    two, on a shared machine)."""
    return int(max(16, (1 << 19) // max(num_classes, 1)))


def _rest(z: Tensor, ids: Tensor, present: Tensor, y: Tensor | None):
    """(z_y or None, z_top, m_r, e_r) of rows ``z`` of the buffer, which becomes e: the rest,
    its present top-k's entries set to -inf (padding ids keep their logits), shifted by its
    own max (0 where there is no rest: k = V), exponentiated; e_r its sum, 0 (no rest) or
    at least 1 (the max's own term)."""
    z_y = None if y is None else z.gather(1, y)
    z_top = z.gather(1, ids)
    z.scatter_(1, ids, z_top.masked_fill(present, -math.inf))
    m_r = z.amax(1, keepdim=True).nan_to_num_(0.0, 0.0, 0.0)
    e_r = z.sub_(m_r).exp_().sum(1, keepdim=True)
    return z_y, z_top, m_r, e_r


def topk_distillation_forward(student: Tensor, ids: Tensor, logps: Tensor, target: Tensor | None,
                              valid: Tensor | None, *, options: DistillationOptions, needs):
    """(loss, (d loss / d student,)) of flat ``student`` [N, V] logits, ``ids`` [N, k]
    (int64, checked), ``logps`` [N, k], ``target`` [N] (validated, ignored tokens read as
    0) and ``valid`` [N] (None: every token counts). See the module docstring; every
    operation on [N, k + 1] is spelt so that there are few of them (a batch of 64 costs
    what its operations' dispatch costs)."""
    compute, out = result_dtypes(student, logps)
    k = ids.shape[1]
    temperature, beta = options.temperature, options.beta
    w_soft, w_hard = options.weight_soft_loss, options.weight_hard_loss
    hard = w_hard != 0.0 and target is not None
    n, v = student.shape
    if valid is not None:
        # An ignored token's logits may hold anything (inf, nan): read as 0, they pass
        # nothing to the loss or to the gradient; its ids as 0..k-1 (distinct, in range),
        # its log-probabilities as -inf (no teacher mass: all padding).
        counted = valid.unsqueeze(1)
        ignored = counted.logical_not()
        ids = torch.where(counted, ids, torch.arange(k, device=ids.device))
        log_p_top = torch.where(counted, logps.to(compute), -math.inf)
    else:
        ignored, log_p_top = None, logps.to(compute)
    column = None if target is None else target.unsqueeze(1)
    y = column if hard and temperature == 1.0 else None
    present = log_p_top > -math.inf
    # The kernel's own (N, V) buffer of z = s / T, overwritten by e and then the gradient;
    # its passes go over chunks of rows that stay in the cache (every step is per row).
    size = chunk_rows(v)
    if size >= n:
        if temperature == 1.0:
            buf = student.to(compute, copy=True, memory_format=torch.contiguous_format)
        else:
            buf = torch.div(student.to(compute), temperature)
        if ignored is not None:
            buf.masked_fill_(ignored, 0.0)
        z_y, z_top, m_r, e_r = _rest(buf, ids, present, y)
    else:
        buf = student.new_empty((n, v), dtype=compute)
        parts = []
        for start in range(0, n, size):
            rows = slice(start, min(start + size, n))
            chunk = buf[rows]
            if temperature == 1.0:
                chunk.copy_(student[rows])
            else:
                torch.div(student[rows].to(compute), temperature, out=chunk)
            if ignored is not None:
                chunk.masked_fill_(ignored[rows], 0.0)
            parts.append(_rest(chunk, ids[rows], present[rows], None if y is None else y[rows]))
        z_y, z_top, m_r, e_r = (None if part is None else torch.cat([p[i] for p in parts])
                                for i, part in enumerate(parts[0]))
    e = buf
    # The k + 1 buckets' log-sum-exps of z, then their log-softmax (never all -inf).
    log_q = torch.cat([z_top.masked_fill_(present.logical_not(), -math.inf), e_r.log().add_(m_r)], 1)
    shift = log_q.amax(1, keepdim=True)
    lse = (log_q - shift).exp_().sum(1, keepdim=True).log_().add_(shift)
    log_q = log_q.sub_(lse)
    q = log_q.exp()
    # The teacher's tail: 1 - sum p as -expm1(log sum p), clamped at 0 (the k rounded
    # probabilities may sum a little above 1). log p <= 0, so the sum cannot overflow, and
    # where it underflows the tail is 1 either way.
    p_top = log_p_top.exp()
    p_rest = p_top.sum(1, keepdim=True).log_().expm1_().neg_().clamp_min_(0.0)
    p = torch.cat([p_top, p_rest], 1)
    log_p = torch.cat([log_p_top, p_rest.log()], 1)
    # D_beta over the k + 1 buckets (0 log 0 = 0: a difference is zeroed where its factor
    # p or q is 0; p, q, m >= 0, and masked_fill with a number costs one operation where
    # where() with one costs three) and G = d D / d log_q. The mixture is formed in
    # probability space, as the dense kernel does: every term that reads log m is
    # multiplied by p or q, which are 0 wherever m is.
    if beta == 0.0:
        soft = (p * (log_p - log_q).masked_fill_(p == 0, 0.0)).sum(1)
        g = p.neg_()
    elif beta == 1.0:
        qr = q * (log_q - log_p).masked_fill_(q == 0, 0.0)
        soft = qr.sum(1)
        g = qr.add_(q)
    else:
        m = p * beta + q * (1.0 - beta)
        log_m = m.masked_fill_(m == 0, 1.0).log_()
        qr = q * (log_q - log_m).masked_fill_(q == 0, 0.0)
        soft = (p * (log_p - log_m).masked_fill_(p == 0, 0.0)).sum(1) * beta + qr.sum(1) * (1.0 - beta)
        g = qr.mul_(1.0 - beta)
    rows = soft if w_soft == 1.0 else soft * w_soft
    log_q1 = None
    if hard:
        if temperature == 1.0:
            hard_rows = (lse - z_y).squeeze(1)
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
    if not needs[0]:
        return loss, (None,)
    # Each row's factor: 1 / (tokens counted) for 'mean', else 1; 0 where ignored.
    if options.reduction == "mean":
        factor = 1.0 / max(ids.shape[0], 1) if valid is None else valid.sum().clamp_min(1).to(compute).reciprocal()
    else:
        factor = 1.0
    if valid is not None:
        factor = (torch.where(valid, factor, 0.0) if isinstance(factor, Tensor) else valid.to(compute) * factor)
        factor = factor.unsqueeze(1)
    # The rest's coefficient A = G_r / E_r - Gamma q_shift and the present top-k's values
    # G_j - Q_j Gamma (0 on padding, where G_j = Q_j = 0); E_r is 0 only where the rest is
    # empty, and then multiplies nothing.
    gamma = g.sum(1, keepdim=True)
    q_shift = (m_r - lse).exp_()  # q_c / e_c
    coef = (g[:, k:] / e_r.clamp_min(1.0)).sub_(gamma * q_shift)
    q_top = q[:, :k]
    values = g[:, :k] - q_top * gamma
    scale = factor * (w_soft / temperature)  # a float, or one value per row
    if isinstance(scale, Tensor) or scale != 1.0:
        coef, values = coef * scale, values * scale
    h = factor * w_hard
    if hard and temperature == 1.0:  # + w_hard (q - onehot(y)), q from the same buffer
        coef, values = coef + q_shift * h, values + q_top * h
    grad = e.mul_(coef).scatter_add_(1, ids, values)
    if hard:
        if temperature == 1.0:
            grad.scatter_add_(1, column, h.neg() if isinstance(h, Tensor) else torch.full_like(z_y, -h))
        else:  # softmax(s) - onehot(y) of its own log-softmax
            hard_grad = log_q1.exp_().scatter_add_(1, column, torch.full_like(column, -1, dtype=compute))
            grad.add_(hard_grad.mul_(h))
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
