"""Numerical building blocks shared by several losses."""

from __future__ import annotations

import torch
from torch import Tensor


def log_softmax(x: Tensor, dim: int) -> Tensor:
    """log softmax(x) along ``dim``, as (x - max) - log(sum(exp(x - max))).

    Subtracting the max before anything else keeps the result exact for huge logits: in
    float32, x - logsumexp(x) at x = 1e4 loses the log(2) of a tie to rounding (the ulp of
    1e4 is 1e-3), while x - max is exact there. The max is detached: log-softmax does not
    depend on the shift, so its gradient needs no path through it.
    """
    shifted = x - x.amax(dim=dim, keepdim=True).detach()
    return shifted - shifted.exp().sum(dim=dim, keepdim=True).log()


def kl_terms(log_p: Tensor, log_q: Tensor, dim: int) -> Tensor:
    """sum_c p_c (log p_c - log q_c) along ``dim`` from log-probabilities, 0 log 0 = 0.

    The difference is masked before the product, so a p of 0 passes no 0 * inf = nan to the
    gradient; p > 0 where q = 0 gives +inf, as KL does.
    """
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(dim)
