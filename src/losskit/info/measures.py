"""Information measures of discrete distributions: entropy, cross-entropy, KL and JS divergence.

Each takes distributions along ``dim`` (probabilities, or logits with ``from_logits=True``)
and returns one value per distribution, in nats by default or in any ``base`` (2 for bits).
Inputs that are not distributions raise a ValueError naming the row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _native
from .._core import switches
from .._core.ops import log_softmax
from .._core.checks import check_values, effective_mode
from ..kernels import Replay
from ..kernels.fused_op import eager_native
from ..kernels.fused_op import compiling, fused_may_serve
from ..kernels.row_divergence import fused_row_divergence, fused_row_divergence_call, row_divergence_options
from .._core.validation import (
    at_index,
    broadcast_shape,
    check_floating,
    check_in_unit_interval,
    first_index,
)

__all__ = ["cross_entropy", "entropy", "js_divergence", "kl_divergence"]


def _compiled_checks(x: Tensor):
    """losskit._native, where it may answer for the value checks of ``x``: checks mode 'full'
    on a CPU tensor outside torch.func transforms (where the Python checks read the values
    on the host too), else None."""
    if not switches.native_enabled() or not x.is_cpu or effective_mode(x) != "full":
        return None
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return None
    return _native.load()


def _fused(kind: str, p: Tensor, q: Tensor, dim: int, fn: str, reference) -> Tensor | None:
    """The measure ``kind`` of probabilities p and q in nats, fused (kernels/row_divergence.py's
    info kinds: the terms and the gradient of q in one pass, q being p for the entropy), or
    None where the composed form computes it: eager calls on rows along the last dimension
    of two tensors of one shape and dtype, p fixed (for the cross-entropy and KL), float64
    left to the composed form as fused_may_serve has it.

    On the CPU in checks mode 'full', one compiled call makes the value checks, the rows and
    the autograd node; where a check would fail it declines, and the Python checks raise.
    Elsewhere the Python checks run, then the fused op. ``reference(x)``: the composed form
    of the measure of x in q's place, for a double backward."""
    if not (p.dim() >= 1 and (dim == -1 or dim == p.dim() - 1) and p.shape == q.shape and p.dtype == q.dtype
            and p.dtype.is_floating_point and p.dtype != torch.float64):
        return None
    grad_mode = torch.is_grad_enabled()
    if grad_mode and kind != "info_entropy" and p.requires_grad:
        return None  # the gradient of p too (also when q is p): the composed form
    want = grad_mode and q.requires_grad
    native = eager_native(q, p)
    if native is not None and q.is_cpu and p.is_cpu and effective_mode(q) == "full":
        made = native.info_eager(kind, p, q, _tolerance(p, -1), want, (fused_row_divergence.node_name, fn, reference))
        if made is not None:
            return made
    if compiling() or not fused_may_serve(q, p):
        return None
    _log_probs(p, "p", fn, dim, False, log=False)
    if q is not p:
        _log_probs(q, "q", fn, dim, False, log=False)
    options = row_divergence_options(kind, "none", 0.0, False, 0)
    if not want:
        return fused_row_divergence(q, p, None, options=options)
    replay = Replay(fn, lambda x, _: reference(x), [q, p])
    return fused_row_divergence_call(q, p, None, options, replay)


def _log_probs(x: Tensor, name: str, fn: str, dim: int, from_logits: bool, log: bool = True) -> Tensor | None:
    """Validated log-probabilities of ``x`` along ``dim`` (probabilities given: None unless
    ``log``, for a caller that needs only the probabilities).

    Where the compiled part serves the checks (:func:`_compiled_checks`), it says in one
    call whether the Python checks below would pass (the same comparisons); only where
    they would not do those run, to raise their exception."""
    check_floating(x, name, fn)
    if x.dim() == 0:
        raise ValueError(f"{fn}: {name} must have a dimension holding the distribution; got a 0-d tensor")
    native = _compiled_checks(x)
    if from_logits:
        if native is not None and native.logits_ok(x):
            return log_softmax(x, dim)
        # -inf is a legitimate logit (probability 0); nan and +inf are not.
        def bad_logit(bad: Tensor) -> Exception:
            where = first_index(bad)
            return ValueError(f"{fn}: {name} logits must be finite or -inf; found {float(x.detach()[where])}{at_index(where)}")

        check_values(x, lambda: torch.isnan(x) | (x == math.inf), bad_logit, f"{fn}: {name} logits must be finite or -inf")
        return log_softmax(x, dim)
    if native is not None and -x.dim() <= dim < x.dim() and native.distribution_ok(x, dim, _tolerance(x, dim)):
        return torch.log(x) if log else None
    check_in_unit_interval(x, name, fn)
    sums = x.sum(dim=dim)
    tol = _tolerance(x, dim)

    def not_summing_to_one(off: Tensor) -> Exception:
        where = first_index(off)
        return ValueError(
            f"{fn}: {name} is not a distribution along dim {dim}: the one{at_index(where)} sums to "
            f"{float(sums.detach()[where]):.6g}, not 1 (pass from_logits=True for logits)"
        )

    check_values(
        x, lambda: (sums - 1).abs() > tol, not_summing_to_one, f"{fn}: {name} is not a distribution along dim {dim}"
    )
    return torch.log(x) if log else None


def _tolerance(x: Tensor, dim: int) -> float:
    """How far from 1 the sums along ``dim`` may be: float32 sums of a few thousand
    probabilities drift by ~1e-6; half types by far more."""
    return {torch.float64: 1e-9, torch.float32: 1e-5}.get(x.dtype, 1e-2) * max(1, x.shape[dim]) ** 0.5


def _in_base(nats: Tensor, base: float, fn: str) -> Tensor:
    if not (base > 0 and base != 1):
        raise ValueError(f"{fn}: base must be positive and not 1; got {base}")
    return nats if base == math.e else nats / math.log(base)


def _probs(x: Tensor, log_x: Tensor | None, from_logits: bool) -> Tensor:
    """The probabilities: ``x`` itself where it holds them (not exp(log x), one op and its
    rounding fewer), else exp of the log-softmax."""
    return log_x.exp() if from_logits else x


def _plogq(p: Tensor, log_q: Tensor, dim: int) -> Tensor:
    """sum_c p_c * log q_c with 0 * log 0 = 0, and p > 0 at q = 0 giving -inf."""
    # Mask log q before the product, not after: where(p > 0, p * log_q, 0) would still
    # back-propagate 0 * -inf = nan through the branch it did not take.
    return (p * torch.where(p > 0, log_q, 0.0)).sum(dim)


def _xlogy(p: Tensor, q: Tensor) -> Tensor:
    """p log q of probabilities, in one op (what :func:`_plogq` forms in four): 0 where
    p = 0 (whatever q, NaN aside), -inf where p > 0 and q = 0. The gradients are _plogq's
    too: log q (0 where p = 0) for p, p / q for q (0 where p = 0 < q; 0 / 0 = nan where both
    are 0, as the masked log's backward gives)."""
    return torch.special.xlogy(p, q)


def _kl_terms(p: Tensor, log_p: Tensor, log_q: Tensor, dim: int) -> Tensor:
    """sum_c p_c (log p_c - log q_c) along ``dim``, 0 log 0 = 0 (losskit._core.ops.kl_terms
    with the probabilities given): the difference is masked before the product, so a p of 0
    passes no 0 * inf = nan to the gradient; p > 0 where q = 0 gives +inf, as KL does."""
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(dim)


def entropy(p: Tensor, dim: int = -1, *, base: float = math.e, from_logits: bool = False) -> Tensor:
    r"""Shannon entropy :math:`H(p) = -\sum_c p_c \log p_c` of each distribution along ``dim``.

    Args:
        p: probabilities (or logits with ``from_logits``), shaped ``[..., num_classes]``.
        dim: the dimension holding each distribution.
        base: logarithm base: ``math.e`` for nats, 2 for bits.
        from_logits: read ``p`` as unnormalised logits (softmax is applied).

    Returns:
        The entropies, ``p``'s shape without ``dim``.

    Example:
        >>> import torch
        >>> from losskit.info import entropy
        >>> entropy(torch.tensor([0.5, 0.5]))  # a fair coin: ln 2 nats
        tensor(0.6931)
        >>> entropy(torch.full((6,), 1 / 6))  # a fair die: ln 6
        tensor(1.7918)
        >>> entropy(torch.tensor([0.5, 0.5]), base=2)
        tensor(1.)

    References:
        Shannon, "A Mathematical Theory of Communication", 1948.
    """
    fn = "entropy"
    if not from_logits and isinstance(p, Tensor):
        nats = _fused("info_entropy", p, p, dim, fn, lambda x: -_xlogy(x, x).sum(-1))
        if nats is not None:
            return _in_base(nats, base, fn)
    log_p = _log_probs(p, "p", fn, dim, from_logits, log=from_logits)
    if not from_logits:  # probabilities: _xlogy's one op
        return _in_base(-_xlogy(p, p).sum(dim), base, fn)
    return _in_base(-_plogq(_probs(p, log_p, from_logits), log_p, dim), base, fn)


def cross_entropy(
    p: Tensor, q: Tensor, dim: int = -1, *, base: float = math.e, from_logits: bool = False
) -> Tensor:
    r"""Cross-entropy :math:`H(p, q) = -\sum_c p_c \log q_c` of ``q`` relative to the true ``p``.

    Args:
        p: the true distributions, shaped ``[..., num_classes]``.
        q: the model's distributions, broadcastable to ``p``.
        dim: the dimension holding each distribution.
        base: logarithm base: ``math.e`` for nats, 2 for bits.
        from_logits: read ``p`` and ``q`` as logits.

    Returns:
        One value per distribution; ``inf`` where ``q`` gives 0 to an outcome ``p`` does not.

    Example:
        >>> import torch
        >>> from losskit.info import cross_entropy
        >>> lion = torch.tensor([0.0, 0.0, 1.0])
        >>> cross_entropy(lion, torch.tensor([0.6, 0.1, 0.3]))  # -ln(0.3)
        tensor(1.2040)
    """
    fn = "cross_entropy"
    broadcast_shape(p, q, ("p", "q"), fn)
    if not from_logits:
        nats = _fused("info_ce", p, q, dim, fn, lambda x: -_plogq(p, torch.log(x), -1))
        if nats is not None:
            return _in_base(nats, base, fn)
    log_p = _log_probs(p, "p", fn, dim, from_logits, log=from_logits)  # log p: only for the softmax
    log_q = _log_probs(q, "q", fn, dim, from_logits)
    return _in_base(-_plogq(_probs(p, log_p, from_logits), log_q, dim), base, fn)


def kl_divergence(
    p: Tensor, q: Tensor, dim: int = -1, *, base: float = math.e, from_logits: bool = False
) -> Tensor:
    r"""Kullback-Leibler divergence :math:`KL(p \,\|\, q) = \sum_c p_c \log (p_c / q_c)`.

    Equal to :math:`H(p, q) - H(p)`: the extra cost of coding ``p`` with a code built for ``q``.

    Args:
        p: the true distributions, shaped ``[..., num_classes]``.
        q: the approximating distributions, broadcastable to ``p``.
        dim: the dimension holding each distribution.
        base: logarithm base: ``math.e`` for nats, 2 for bits.
        from_logits: read ``p`` and ``q`` as logits.

    Returns:
        One non-negative value per distribution (``inf`` where ``q`` misses ``p``'s support).

    Example:
        >>> import torch
        >>> from losskit.info import kl_divergence
        >>> kl_divergence(torch.tensor([0.36, 0.48, 0.16]), torch.full((3,), 1 / 3))
        tensor(0.0853)

    References:
        Kullback and Leibler, "On Information and Sufficiency", 1951.
    """
    fn = "kl_divergence"
    broadcast_shape(p, q, ("p", "q"), fn)
    if not from_logits:
        nats = _fused("info_kl", p, q, dim, fn, lambda x: _kl_divergence(p, x, -1))
        if nats is not None:
            return _in_base(nats, base, fn)
    log_p = _log_probs(p, "p", fn, dim, from_logits)
    log_q = _log_probs(q, "q", fn, dim, from_logits)
    return _in_base(_kl_terms(_probs(p, log_p, from_logits), log_p, log_q, dim), base, fn)


def _kl_divergence(p: Tensor, q: Tensor, dim: int) -> Tensor:
    """kl_divergence of checked probabilities in nats: its composed form (the fused path's oracle)."""
    return _kl_terms(p, torch.log(p), torch.log(q), dim)


def js_divergence(
    p: Tensor, q: Tensor, dim: int = -1, *, base: float = math.e, from_logits: bool = False
) -> Tensor:
    r"""Jensen-Shannon divergence :math:`\tfrac12 KL(p \,\|\, m) + \tfrac12 KL(q \,\|\, m)`,
    :math:`m = \tfrac12 (p + q)`.

    Symmetric, finite, and at most :math:`\ln 2` nats (1 bit).

    Args:
        p: distributions, shaped ``[..., num_classes]``.
        q: distributions, broadcastable to ``p``.
        dim: the dimension holding each distribution.
        base: logarithm base: ``math.e`` for nats, 2 for bits.
        from_logits: read ``p`` and ``q`` as logits.

    Returns:
        One value per distribution, in ``[0, log(2) / log(base)]``.

    Example:
        >>> import torch
        >>> from losskit.info import js_divergence
        >>> js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), base=2)
        tensor(1.)

    References:
        Lin, "Divergence Measures Based on the Shannon Entropy", 1991.
    """
    fn = "js_divergence"
    broadcast_shape(p, q, ("p", "q"), fn)
    log_p = _log_probs(p, "p", fn, dim, from_logits)
    log_q = _log_probs(q, "q", fn, dim, from_logits)
    # log m = log((p + q) / 2), formed in log space so that tiny probabilities keep precision.
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_p = _kl_terms(_probs(p, log_p, from_logits), log_p, log_m, dim)
    return _in_base(0.5 * (kl_p + _kl_terms(_probs(q, log_q, from_logits), log_q, log_m, dim)), base, fn)
