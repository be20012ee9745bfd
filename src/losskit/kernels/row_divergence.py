"""The row divergences, fused: functional.js_divergence and info.kl_divergence.

js_divergence of the student log q against a fixed teacher log p, rows along the last
dimension, M = beta P + (1 - beta) Q (see functional/divergence.py). Each row's terms are
formed by the composed form's ops (the same bits) and kept: the student's gradient is
one of them, times the row's factor k (1 / the rows that count for 'batchmean', 0 on a
row whose label is ignored):

  0 < beta < 1   d row / d log q = (1 - beta) q where(q > 0, log q - log m, 0)
  beta = 0       row = KL(P || Q)         d / d log q = -p
  beta = 1       row = KL(Q || P)         d / d log q = q (where(q > 0, log q - log p, 0) + 1)

and with from_logits, through the log-softmax: g - softmax(x) sum_c g_c.

losskit.info's measures of probabilities p (fixed) and q, each row's terms and gradient
formed by element-wise ops whose CPU kernels the compiled form (losskit._native's
info_rows, src/pointwise.cpp) reproduces element by element, in one pass that also makes
the value checks:

  info_ce       H(p, q) = -sum_c p_c where(p_c > 0, log q_c, 0)   d / dq = -p / q
  info_entropy  H(p)    = -sum_c xlogy(p_c, p_c)                 d / dp = -(xlogy(p != 0, p) + p / p)
  info_kl       KL(p||q) = sum_c p_c where(p_c > 0, log p_c - log q_c, 0)
                                                                d / dq = -where(p > 0, p, 0) / q

the rows being the composed forms' (info/measures.py) by the same ops, the gradients their
autograd chains (0 / 0 = nan where p = q = 0, and for the entropy where p = 0, as there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._core import switches
from .._core.dtypes import cast, result_dtypes
from .fused_op import compiling, fused_may_serve, FusedOp, native_module, Replay

@dataclass(frozen=True)
class RowDivergenceOptions:
    """kind: 'js' (js_divergence: param beta, flag from_logits, ignore_index, reduction
    'batchmean', 'sum' or 'none') or 'info_ce', 'info_entropy', 'info_kl' (losskit.info's
    measures of probabilities: one value per row; flag: the compiled form makes the value
    checks first, param their tolerance)."""

    kind: str
    reduction: str
    param: float
    flag: bool
    ignore_index: int


_ROW_OPTIONS: dict[tuple, RowDivergenceOptions] = {}


def row_divergence_options(kind: str, reduction: str, param: float, flag: bool, ignore_index: int) -> RowDivergenceOptions:
    key = (kind, reduction, param, flag, ignore_index)
    options = _ROW_OPTIONS.get(key)
    if options is None:
        if len(_ROW_OPTIONS) > 256:
            _ROW_OPTIONS.clear()
        options = _ROW_OPTIONS[key] = RowDivergenceOptions(kind, reduction, param, flag, ignore_index)
    return options


def fused_row_divergence_applies(input: Tensor, target: Tensor) -> bool:
    """Eager calls that want the gradient of ``input`` only, rows along the last dimension
    of two tensors of one shape."""
    return (
        input.requires_grad and not target.requires_grad and torch.is_grad_enabled() and input.dim() >= 1
        and input.shape == target.shape and not compiling() and fused_may_serve(input, target)
    )


def fused_row_divergence_call(input: Tensor, target: Tensor, labels: Tensor | None, options: RowDivergenceOptions,
                              replay: Replay) -> Tensor:
    native = native_module() if switches.native_enabled() else None
    if native is not None:
        made = native.row_divergence(input, target, labels, options.kind, options.reduction, options.param,
                                     options.flag, options.ignore_index, [True, False, False])
        if made is not None:
            loss, grad = made
            return fused_row_divergence.attach(native, loss, [input], [grad], options.reduction == "none", replay)
    return fused_row_divergence(input, target, labels, options=options, replay=replay)


def row_divergence_forward(
    input: Tensor, target: Tensor, labels: Tensor | None, *, options: RowDivergenceOptions, needs: tuple[bool, ...]
) -> tuple[Tensor, tuple[Tensor | None]]:
    """(the loss, (d/d input,)): see the comment above RowDivergenceOptions. The compiled
    form (losskit._native's row_divergence) is this function op for op."""
    if options.kind in _INFO_KINDS:  # input q (p for the entropy), target p: probabilities, checked by the caller
        return _info_rows(options.kind, target, input), (_info_grad(options.kind, target, input) if needs[0] else None,)
    compute, out = result_dtypes(input, target)
    beta = options.param
    log_q, log_p = cast(input, compute), cast(target, compute)
    if options.flag:
        log_q, log_p = _log_softmax(log_q), _log_softmax(log_p)
    q = torch.exp(log_q) if beta != 0.0 or options.flag else None
    if beta == 0.0:
        p = log_p.exp()
        rows = (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)
        grad = p.neg_()
    elif beta == 1.0:
        terms = q * torch.where(q > 0, log_q - log_p, 0.0)
        rows = terms.sum(-1)
        grad = terms.add_(q)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        p = log_p.exp()
        kl_p = (p * torch.where(p > 0, log_p - log_m, 0.0)).sum(-1)
        terms = q * torch.where(q > 0, log_q - log_m, 0.0)
        rows = beta * kl_p + (1.0 - beta) * terms.sum(-1)
        grad = terms.mul_(1.0 - beta)
    if labels is not None:
        counted = labels != options.ignore_index
        rows = torch.where(counted, rows, 0.0)
        count = counted.sum()
    else:
        count = rows.numel()
    if options.reduction == "batchmean":
        loss = rows.sum() / count
        factor = torch.where(counted, count.reciprocal(), 0.0) if labels is not None else 1.0 / max(count, 1)
    else:
        loss = rows.sum() if options.reduction == "sum" else rows
        factor = torch.where(counted, 1.0, 0.0) if labels is not None else 1.0
    if isinstance(factor, Tensor):
        grad = grad.mul_(factor.unsqueeze(-1))
    elif factor != 1.0:
        grad = grad.mul_(factor)
    if options.flag:  # through the log-softmax: g - softmax sum(g)
        grad = grad.sub_(q * grad.sum(-1, keepdim=True))
    return cast(loss, out), (cast(grad, input.dtype) if needs[0] else None,)


_INFO_KINDS = ("info_ce", "info_entropy", "info_kl")


def _info_rows(kind: str, p: Tensor, q: Tensor) -> Tensor:
    """The rows of an info kind (see the module docstring), in nats."""
    if kind == "info_kl":
        return (p * torch.where(p > 0, torch.log(p) - torch.log(q), 0.0)).sum(-1)
    if kind == "info_ce":
        return -(p * torch.where(p > 0, torch.log(q), 0.0)).sum(-1)
    return -torch.special.xlogy(p, p).sum(-1)


def _info_grad(kind: str, p: Tensor, q: Tensor) -> Tensor:
    """The gradient of an info kind's rows for q (p for the entropy)."""
    if kind == "info_ce":
        return torch.div(p, q).neg_()
    if kind == "info_entropy":
        return torch.special.xlogy(p != 0, p).add_(torch.div(p, p)).neg_()
    return torch.where(p > 0, p, 0.0).neg_().div_(q)


def _log_softmax(x: Tensor) -> Tensor:
    """losskit._core.ops.log_softmax along the last dimension, its ops spelt out."""
    shifted = x - x.amax(dim=-1, keepdim=True)
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


fused_row_divergence = FusedOp(
    "row_divergence",
    tensors=("input", "target", "labels?"),
    differentiable=1,
    options=RowDivergenceOptions,
    forward=row_divergence_forward,
    unreduced="rows",
    native_forward="row_divergence",
)
