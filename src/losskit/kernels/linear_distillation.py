"""Distillation of a student's output layer towards a teacher's, without either's logits.

The loss of one token, with student logits s = x_s W_s^T + b_s and teacher logits
t = x_t W_t^T + b_t over the same V classes, a temperature T, q = softmax(s / T) (student),
p = softmax(t / T) (teacher) and beta in [0, 1]:

    soft = KL(p || q)                                          beta = 0 (forward KL)
         = beta KL(p || m) + (1 - beta) KL(q || m),            0 < beta < 1, m = beta p + (1 - beta) q
         = KL(q || p)                                          beta = 1 (reverse KL)
    hard = -log softmax(s)[y]                                  the task cross-entropy, at temperature 1
    loss = weight_soft_loss * soft + weight_hard_loss * hard

(TRL's ``generalized_jsd_loss`` and Liger-Kernel's JSD: the ends are plain KL divergences by
definition, so the family jumps there; see :func:`losskit.functional.distillation_loss`.)

Its gradient with respect to the student's scaled logits z = s / T has one form for all
three: with g_c the partial derivative of ``soft`` with respect to q_c,

    d soft / d z_j = q_j g_j - q_j sum_c q_c g_c
    g = -p / q                       (beta = 0; so the gradient is q - p)
    g = log q - log p  (+ 1)         (beta = 1; the constant cancels)
    g = (1 - beta) (log q - log m)   (0 < beta < 1: the KL(p || m) and KL(q || m) terms
                                      through m sum to (1 - beta) log(q / m))

and d hard / d s = softmax(s) - onehot(y). So for each chunk of B token rows:

    S_b = x_b W_s^T + b_s,  T_b = x_t,b W_t^T + b_t        two (B, V) buffers
    dS_b = weight_soft * d soft / d z / T + weight_hard * d hard / d s, per row times
           (1 / tokens counted for 'mean', 1 for 'sum', grad_output for 'none') and 0 where ignored
    grad_x[b] = dS_b W_s,  grad_W_s += dS_b^T x_b,  grad_b_s += sum of dS_b's rows

The teacher gets no gradient (its logits are a target; Liger-Kernel does the same). The
extra memory is a few (B, V) buffers and the (V, H) weight gradient; neither (N, V) logits
tensor exists. Half-precision inputs are computed, and the weight gradient accumulated, in
float32. As the fused linear cross-entropy: a scalar loss makes its gradients in forward;
reduction='none' recomputes each chunk in backward with the per-token grad_output folded
into the row factor. The custom op (``losskit::linear_distillation``), its fake, the
autograd.Function and the double-backward replay come from
:class:`~losskit.kernels.fused_op.FusedOp`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._core import switches
from .._core.dtypes import result_dtypes
from .._core.ops import kl_terms, log_softmax
from .fused_op import FusedOp

DISTILLATION_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class DistillationOptions:
    """How a distillation loss is computed, beyond its tensors (validated once).

    Attributes:
        beta: in [0, 1]: 0 forward KL(p || q), 1 reverse KL(q || p), between them the
            generalised Jensen-Shannon divergence with mixture m = beta p + (1 - beta) q.
        temperature: T > 0: both logits are divided by T before their softmax.
        ignore_index: the target value of tokens that count neither in the loss nor in the
            'mean' denominator.
        weight_hard_loss: the weight of the student's cross-entropy against the target.
        weight_soft_loss: the weight of the divergence.
        reduction: 'mean' (over the tokens that count; 0 when none does), 'sum' or 'none'.
    """

    beta: float = 0.5
    temperature: float = 1.0
    ignore_index: int = -100
    weight_hard_loss: float = 0.0
    weight_soft_loss: float = 1.0
    reduction: str = "mean"

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem is not None:
            raise ValueError(problem)

    def _problem(self) -> str | None:
        if not 0.0 <= self.beta <= 1.0:
            return f"beta must be in [0, 1]; got {self.beta}"
        if not 0.0 < self.temperature < math.inf:
            return f"temperature must be a positive, finite number; got {self.temperature}"
        if not math.isfinite(self.weight_hard_loss):
            return f"weight_hard_loss must be a finite number; got {self.weight_hard_loss}"
        if not math.isfinite(self.weight_soft_loss):
            return f"weight_soft_loss must be a finite number; got {self.weight_soft_loss}"
        if self.reduction not in DISTILLATION_REDUCTIONS:
            return f"reduction must be one of {', '.join(map(repr, DISTILLATION_REDUCTIONS))}; got {self.reduction!r}"
        return None

    @staticmethod
    def checked(fn: str, **options: Any) -> DistillationOptions:
        """The options of a call of ``fn``; a ValueError naming ``fn`` and the option when one
        is out of range."""
        try:
            return DistillationOptions(**options) if torch.compiler.is_compiling() else _cached(**options)
        except ValueError as error:
            raise ValueError(f"{fn}: {error}") from None


@functools.lru_cache(maxsize=64)
def _cached(**options: Any) -> DistillationOptions:
    return DistillationOptions(**options)


# ---- the per-row math, shared by the composed functions and the kernel ------------------------
def log_mixture(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """log(beta p + (1 - beta) q) from log-probabilities, for 0 < beta < 1.

    A logaddexp whose shift is detached (it cancels in value and gradient) and whose log is
    guarded: where both p and q are 0 the result is -inf with a gradient of 0, where
    torch.logaddexp would pass nan back (exp(-inf - -inf)) and poison a whole row through
    the softmax. Such a class adds nothing to either KL term, which mask by p > 0 and q > 0.
    """
    a, b = log_p + math.log(beta), log_q + math.log1p(-beta)
    shift = torch.maximum(a, b).detach()
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    total = (a - shift).exp() + (b - shift).exp()
    positive = total > 0
    return torch.where(positive, torch.where(positive, total, 1.0).log(), -math.inf) + shift


def divergence_rows(log_q: Tensor, log_p: Tensor, beta: float) -> Tensor:
    """The generalised JSD of student ``log_q`` from teacher ``log_p`` along the last
    dimension (the ends are the plain KL divergences), 0 log 0 = 0."""
    if beta == 0.0:
        return kl_terms(log_p, log_q, -1)
    if beta == 1.0:
        return kl_terms(log_q, log_p, -1)
    log_m = log_mixture(log_p, log_q, beta)
    return beta * kl_terms(log_p, log_m, -1) + (1.0 - beta) * kl_terms(log_q, log_m, -1)


# ---- the kernel ---------------------------------------------------------------------------------
def auto_chunk_rows(num_classes: int) -> int:
    """Tokens per chunk: a chunk holds about eight (B, V) float32 buffers (both logits, the
    two softmaxes, the mixture, the gradient), so B is chosen for a sixteenth of
    switches.chunks().linear_bytes (64 MiB) per buffer, within 16 to 1024 rows."""
    budget = switches.chunks().linear_bytes
    return int(min(1024, max(16, budget // (16 * 4 * max(num_classes, 1)))))


def _chunk(s: Tensor, t: Tensor, target: Tensor | None, options: DistillationOptions,
           want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """(per-row loss, d loss / d s or None) of one chunk of student logits ``s`` and
    teacher logits ``t`` (both (B, V) buffers owned by the kernel, in the compute dtype,
    ignored rows already zeroed; both are overwritten).

    The mixture is formed in probability space, m = beta p + (1 - beta) q, with one log:
    every term that reads log m is multiplied by p or q, and where those underflow to 0 the
    term is 0 whatever the precision of log m, so the log-space mixture of the composed
    path (which keeps -inf exact for its gradient) would cost two more exps for nothing.
    """
    temperature, beta = options.temperature, options.beta
    hard_rows = hard_grad = None
    if options.weight_hard_loss != 0.0 and target is not None:
        # The hard loss reads the student's logits at temperature 1, before they are scaled.
        column = target.unsqueeze(1)
        log_q1 = log_softmax(s, -1)
        hard_rows = -log_q1.gather(1, column).squeeze(1)
        if want_grad:  # softmax(s) - onehot(y), in the log-softmax's own buffer
            hard_grad = log_q1.exp_().scatter_add_(1, column, torch.full_like(column, -1, dtype=log_q1.dtype))
    if temperature != 1.0:
        s.div_(temperature)
        t.div_(temperature)
    log_q, log_p = log_softmax(s, -1), log_softmax(t, -1)
    q = log_q.exp()
    grad = None
    if beta == 0.0:  # KL(p || q); gradient q - p
        p = log_p.exp()
        rows = (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)
        if want_grad:
            grad = q.sub_(p)
    elif beta == 1.0:  # KL(q || p); gradient q (r - KL), r = log q - log p
        qr = q * torch.where(q > 0, log_q - log_p, 0.0)
        rows = qr.sum(-1)
        if want_grad:
            grad = qr.sub_(q.mul_(rows.unsqueeze(1)))
    else:  # beta KL(p || m) + (1 - beta) KL(q || m); gradient (1 - beta) q (r - sum q r), r = log(q / m)
        p = log_p.exp()
        m = p * beta + q * (1.0 - beta)
        log_m = torch.where(m > 0, m, 1.0).log_()
        rows = beta * (p * torch.where(p > 0, log_p - log_m, 0.0)).sum(-1)
        qr = q * torch.where(q > 0, log_q - log_m, 0.0)
        kl_q = qr.sum(-1)
        rows = rows + (1.0 - beta) * kl_q
        if want_grad:
            grad = qr.sub_(q.mul_(kl_q.unsqueeze(1))).mul_(1.0 - beta)
    # A factor of 1 (the defaults) is left out: the product would be the same bits.
    if options.weight_soft_loss != 1.0:
        rows = rows * options.weight_soft_loss
    if grad is not None and options.weight_soft_loss / temperature != 1.0:
        grad.mul_(options.weight_soft_loss / temperature)
    if hard_rows is not None:
        rows = rows + options.weight_hard_loss * hard_rows
        if hard_grad is not None:
            grad.add_(hard_grad, alpha=options.weight_hard_loss)
    return rows, grad


def _row_factor(valid: Tensor | None, n: int, options: DistillationOptions, compute: torch.dtype,
                grad_output: Tensor | None) -> Tensor | float:
    """What each row's gradient is multiplied by: 1 / (tokens counted) for 'mean', 1 for
    'sum', the row's grad_output for 'none'; 0 where the token is ignored. A float, or one
    value per row."""
    if grad_output is not None:  # reduction='none', in backward
        factor: Tensor | float = grad_output.reshape(-1).to(compute)
    elif options.reduction == "mean":
        factor = 1.0 / max(n, 1) if valid is None else 1.0 / valid.sum().clamp_min(1).to(compute)
    else:
        factor = 1.0
    if valid is None:
        return factor
    return torch.where(valid, factor, 0.0) if isinstance(factor, Tensor) else valid.to(compute) * factor


def _logits(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> None:
    if b is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(b, x, w.t(), out=out)


def _pass(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, target, valid, *,
          options: DistillationOptions, needs, chunk_rows: int, grad_output: Tensor | None = None):
    compute, _ = result_dtypes(student_input, student_weight)
    x, w = student_input.to(compute), student_weight.to(compute)
    b = None if student_bias is None else student_bias.to(compute)
    xt, wt = teacher_input.to(compute), teacher_weight.to(compute)
    bt = None if teacher_bias is None else teacher_bias.to(compute)
    n, num_classes = x.shape[0], w.shape[0]
    want_grad = any(needs)
    factor = _row_factor(valid, n, options, compute, grad_output) if want_grad else None
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if needs[0] else None
    grad_w = torch.zeros_like(w, memory_format=torch.contiguous_format) if needs[1] else None
    grad_b = torch.zeros_like(b) if needs[2] and b is not None else None
    losses = x.new_empty(n)
    size = max(1, min(chunk_rows, n))
    s_buf, t_buf = x.new_empty(size, num_classes), x.new_empty(size, num_classes)
    for start in range(0, n, size):
        rows = slice(start, min(start + size, n))
        s, t = s_buf[: rows.stop - rows.start], t_buf[: rows.stop - rows.start]
        chunk_valid = None if valid is None else valid[rows]
        x_rows, xt_rows = x[rows], xt[rows]
        if chunk_valid is not None:
            # An ignored token's hidden states and logits may hold anything (inf, nan): read
            # as 0, they pass nothing to the loss or to a gradient (not even 0 * inf into
            # the weight's).
            x_rows = torch.where(chunk_valid.unsqueeze(1), x_rows, 0.0)
            xt_rows = torch.where(chunk_valid.unsqueeze(1), xt_rows, 0.0)
        _logits(x_rows, w, b, out=s)
        _logits(xt_rows, wt, bt, out=t)
        if chunk_valid is not None:
            s.masked_fill_(~chunk_valid.unsqueeze(1), 0.0)
            t.masked_fill_(~chunk_valid.unsqueeze(1), 0.0)
        chunk_target = None if target is None else target[rows]
        row_loss, grad_s = _chunk(s, t, chunk_target, options, want_grad)
        losses[rows] = row_loss if chunk_valid is None else torch.where(chunk_valid, row_loss, 0.0)
        if grad_s is not None:
            grad_s = grad_s * (factor[rows].unsqueeze(1) if isinstance(factor, Tensor) else factor)
            if grad_x is not None:
                torch.mm(grad_s, w, out=grad_x[rows])
            if grad_w is not None:
                grad_w.addmm_(grad_s.t(), x_rows)
            if grad_b is not None:
                grad_b.add_(grad_s.sum(0))
    return losses, (grad_x, grad_w, grad_b)


def reduce_rows(losses: Tensor, valid: Tensor | None, reduction: str) -> Tensor:
    """'mean' over the tokens that count (0 when none does, with a zero gradient), 'sum', or
    the rows themselves ('none', ignored tokens 0)."""
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    if valid is None:
        return total / max(losses.shape[0], 1)
    return total / valid.sum().clamp_min(1).to(total.dtype)


def linear_distillation_forward(student_input, student_weight, student_bias, teacher_input, teacher_weight,
                                teacher_bias, target, valid, *, options: DistillationOptions, needs, chunk_rows: int):
    """(loss, (grad_student_input, grad_student_weight, grad_student_bias)), gradients in
    the compute dtype where ``needs`` asks for them."""
    losses, grads = _pass(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias,
                          target, valid, options=options, needs=needs, chunk_rows=chunk_rows)
    return reduce_rows(losses, valid, options.reduction).to(student_input.dtype), grads


def linear_distillation_recompute(student_input, student_weight, student_bias, teacher_input, teacher_weight,
                                  teacher_bias, target, valid, *, options: DistillationOptions, needs,
                                  grad_output: Tensor, chunk_rows: int):
    """reduction='none': each chunk again, each row's gradient times its grad_output."""
    return _pass(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, target,
                 valid, options=options, needs=needs, chunk_rows=chunk_rows, grad_output=grad_output)[1]


fused_linear_distillation = FusedOp(
    "linear_distillation",
    tensors=("student_input", "student_weight", "student_bias?", "teacher_input", "teacher_weight", "teacher_bias?",
             "target?", "valid?"),
    differentiable=3,
    options=DistillationOptions,
    extras=(("int", "chunk_rows"),),
    forward=linear_distillation_forward,
    # A per-token grad_output is unknown in forward and the weight's gradient sums the
    # tokens: reduction='none' keeps the inputs and makes the gradients in backward.
    precomputes=lambda options: options.reduction != "none",
    recompute=linear_distillation_recompute,
)


# ---- the same loss from both models' logits ----------------------------------------------------
def distillation_forward(student, teacher, target, valid, *, options: DistillationOptions, needs, chunk_rows: int):
    """(loss, (d loss / d student,)) of :func:`losskit.functional.distillation_loss` from
    logits ``[..., V]``, by :func:`_chunk` over chunks of ``chunk_rows`` token rows: the loss
    and the student's gradient in one pass (the composed path forms the log-space mixture
    with its guarded logaddexp and keeps every intermediate for autograd). The teacher
    gets no gradient here; a call whose teacher wants one takes the composed path. The
    gradient is in the student's dtype, the loss in the promoted dtype of both."""
    compute, out = result_dtypes(student, teacher)
    num_classes = student.shape[-1]
    s_all, t_all = student.reshape(-1, num_classes), teacher.reshape(-1, num_classes)
    n = s_all.shape[0]
    want_grad = bool(needs[0])
    factor = _row_factor(valid, n, options, compute, None) if want_grad else None
    grad = torch.empty((n, num_classes), dtype=compute, device=student.device) if want_grad else None
    losses = s_all.new_empty(n, dtype=compute)
    size = max(1, min(chunk_rows, n))
    for start in range(0, n, size):
        rows = slice(start, min(start + size, n))
        # _chunk overwrites its buffers: fresh copies in the compute dtype.
        s = s_all[rows].to(compute, copy=True, memory_format=torch.contiguous_format)
        t = t_all[rows].to(compute, copy=True, memory_format=torch.contiguous_format)
        chunk_valid = None if valid is None else valid[rows]
        if chunk_valid is not None:
            # An ignored token's logits may hold anything (inf, nan): read as 0, they pass
            # nothing to the loss or to the gradient.
            s.masked_fill_(~chunk_valid.unsqueeze(1), 0.0)
            t.masked_fill_(~chunk_valid.unsqueeze(1), 0.0)
        row_loss, grad_s = _chunk(s, t, None if target is None else target[rows], options, want_grad)
        losses[rows] = row_loss if chunk_valid is None else torch.where(chunk_valid, row_loss, 0.0)
        if grad_s is not None:
            torch.mul(grad_s, factor[rows].unsqueeze(1) if isinstance(factor, Tensor) else factor, out=grad[rows])
    loss = reduce_rows(losses, valid, options.reduction).to(out)
    return loss, (None if grad is None else grad.reshape(student.shape).to(student.dtype),)


def distillation_recompute(student, teacher, target, valid, *, options: DistillationOptions, needs,
                           grad_output: Tensor, chunk_rows: int):
    """reduction='none': the student's gradient with each token's grad_output in its row factor."""
    compute, _ = result_dtypes(student, teacher)
    num_classes = student.shape[-1]
    s_all, t_all = student.reshape(-1, num_classes), teacher.reshape(-1, num_classes)
    n = s_all.shape[0]
    factor = _row_factor(valid, n, options, compute, grad_output)
    grad = torch.empty((n, num_classes), dtype=compute, device=student.device)
    size = max(1, min(chunk_rows, n))
    for start in range(0, n, size):
        rows = slice(start, min(start + size, n))
        s = s_all[rows].to(compute, copy=True, memory_format=torch.contiguous_format)
        t = t_all[rows].to(compute, copy=True, memory_format=torch.contiguous_format)
        if valid is not None:
            s.masked_fill_(~valid[rows].unsqueeze(1), 0.0)
            t.masked_fill_(~valid[rows].unsqueeze(1), 0.0)
        _, grad_s = _chunk(s, t, None if target is None else target[rows], options, True)
        torch.mul(grad_s, factor[rows].unsqueeze(1), out=grad[rows])
    return (grad.reshape(student.shape).to(student.dtype),)


fused_distillation = FusedOp(
    "distillation",
    tensors=("student", "teacher", "target?", "valid?"),
    differentiable=1,
    options=DistillationOptions,
    extras=(("int", "chunk_rows"),),
    forward=distillation_forward,
    # distillation_forward and _chunk op for op in C++ (losskit/_native/src/posttraining.cpp).
    native_forward="distillation",
    # reduction='none': the per-token grad_output is folded into each row's factor in backward.
    precomputes=lambda options: options.reduction != "none",
    recompute=distillation_recompute,
)
