"""Per-token log-probabilities and entropy of a linear output layer, without its logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._core.docs import fill_doc
from .._core.dtypes import result_dtypes
from .._core.ops import log_softmax
from .._core.validation import ClassTargets, check_class_targets, check_floating
from ..kernels.fused_op import fused_may_serve
from ..kernels.linear_log_probs import chunk_rows, fused_linear_log_probs

__all__ = ["linear_log_probs", "linear_log_probs_and_entropy"]

_ARGS = """\
input: token features ``[..., H]`` (``[H]`` for one token).
weight: the output layer, ``[C, H]``.
target: the token whose log-probability is wanted, ``input``'s shape without ``H``,
    integer class indices in ``[0, C)`` or ``ignore_index``.
bias: ``[C]``, or None.
temperature: the logits are divided by it before the softmax, as sampling with a
    temperature does (``T > 0``).
ignore_index: target value of the tokens that count for nothing (padding, prompt):
    their log-probability and entropy are 0 and they pass no gradient.
chunk_size: tokens whose logits are formed at a time; by default half of
    :func:`linear_cross_entropy`'s chunk, since two buffers of it live at once (together
    about 64 MiB of float32, or the weight gradient's size for a wide layer); under
    ``batch_invariant`` rounded up to whole blocks of 256 tokens.
batch_invariant: make each token's results bitwise independent of the batch and of
    ``chunk_size`` (see Notes), at some speed."""

_NOTES = """\
The ``[N, C]`` logits are never held: forward forms them a chunk of tokens at a time
and keeps five numbers per token; backward forms each chunk again from ``input`` and
``weight`` (one more matmul per chunk) and turns it into the gradients in place. Any
upstream gradient works. float16/bfloat16 inputs are computed in float32 and each
result, the gradients included, is rounded once. With ``batch_invariant=True`` the
log-probs, entropies and rows of ``input``'s gradient are bitwise the same for a token
alone, in any batch and with any ``chunk_size``: the matmuls run on fixed blocks of 256
token rows, whatever the batch (up to 10-15% slower on a CPU, where the BLAS is faster
on larger calls). Two identical calls give identical bits either way. float64 inputs,
torch.func transforms and forward-mode AD take the composed reference path
(``log_softmax(input @ weight.T + bias).gather``), which is the oracle of the tests."""


def _prepared(fn: str, input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, temperature: float,
              ignore_index: int, chunk_size: int | None) -> ClassTargets:
    """Checks every argument; returns the validated targets, flattened to ``[N]``."""
    check_floating(input, "input", fn)
    check_floating(weight, "weight", fn)
    if input.dim() < 1:
        raise ValueError(f"{fn}: input must have a feature dimension, shaped [..., H]; got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be [C, H]; got shape {tuple(weight.shape)}")
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{fn}: input has {input.shape[-1]} features but weight expects {weight.shape[1]} "
            f"(input shape {tuple(input.shape)}, weight shape {tuple(weight.shape)})"
        )
    if bias is not None:
        check_floating(bias, "bias", fn)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 < temperature < math.inf:
        raise ValueError(f"{fn}: temperature must be a positive, finite number; got {temperature!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int; got {ignore_index!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{fn}: chunk_size must be a positive number of tokens; got {chunk_size!r}")
    batch = tuple(input.shape[:-1])
    targets = check_class_targets(target, batch, weight.shape[0], ignore_index, tuple(input.shape), fn)
    return targets.reshape(-1)


def _reference(input: Tensor, weight: Tensor, bias: Tensor | None, targets: ClassTargets, temperature: float,
               with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """The composed path, [N] each: log_softmax of the logits, gathered."""
    logits = F.linear(input.reshape(-1, input.shape[-1]), weight, bias)
    compute, out = result_dtypes(logits)
    z = logits.to(compute)
    if temperature != 1.0:
        z = z / temperature
    log_p = log_softmax(z, 1)
    valid = targets.valid
    picked = torch.where(valid, log_p.gather(1, targets.safe().unsqueeze(1)).squeeze(1), 0.0)
    entropy = None
    if with_entropy:
        p = log_p.exp()
        # 0 log 0 = 0: a probability that underflows adds nothing (and no nan to the gradient).
        entropy = torch.where(valid, -(p * torch.where(p > 0, log_p, 0.0)).sum(1), 0.0).to(out)
    return picked.to(out), entropy


def _compute(fn: str, input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, temperature: float,
             ignore_index: int, chunk_size: int | None, batch_invariant: bool,
             with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    flat = _prepared(fn, input, weight, target, bias, temperature, ignore_index, chunk_size)
    n = flat.target.shape[0]
    if n > 0 and fused_may_serve(input, weight, *(() if bias is None else (bias,))):
        log_p, entropy = fused_linear_log_probs(
            input.reshape(-1, input.shape[-1]), weight, bias, flat.target, flat.valid_or_none,
            temperature=temperature, with_entropy=with_entropy, batch_invariant=bool(batch_invariant),
            chunk_rows=chunk_rows(weight.shape[0], weight.shape[1], chunk_size, bool(batch_invariant)),
        )
        entropy = entropy if with_entropy else None
    else:
        log_p, entropy = _reference(input, weight, bias, flat, temperature, with_entropy)
    shape = tuple(target.shape)
    return log_p.reshape(shape), None if entropy is None else entropy.reshape(shape)


@fill_doc(args=_ARGS, notes=_NOTES)
def linear_log_probs(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    batch_invariant: bool = False,
) -> Tensor:
    r"""Per-token log-probability of ``target`` under ``softmax((input @ weight.T + bias) / T)``.

    What RL and preference fine-tuning (GRPO, PPO, DPO) need of a language model's output
    layer, without its ``[tokens, vocabulary]`` logits.

    .. math::
        \log p(y_i \mid x_i) = z_{i, y_i} - \log \sum_c e^{z_{i,c}}, \qquad
        z_i = (W x_i + b) / T

    Args:
        {args}

    Returns:
        The log-probabilities, shaped like ``target``, in the promoted dtype of ``input``
        and ``weight``; 0 where ``target == ignore_index``.

    Shape:
        - input: ``[..., H]``.
        - weight: ``[C, H]``; bias: ``[C]``.
        - target and output: ``input``'s shape without ``H``.

    Notes:
        {notes}

    Example:
        >>> import torch
        >>> from losskit.functional import linear_log_probs
        >>> x, w = torch.randn(2, 5, 8), torch.randn(100, 8)
        >>> y = torch.randint(0, 100, (2, 5))
        >>> want = torch.log_softmax(x @ w.T, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        >>> torch.allclose(linear_log_probs(x, w, y), want, atol=1e-5)
        True

    References:
        Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024 (the
        logits formed a block at a time).
    """
    log_p, _ = _compute("linear_log_probs", input, weight, target, bias, temperature, ignore_index, chunk_size,
                        batch_invariant, False)
    return log_p


@fill_doc(args=_ARGS, notes=_NOTES)
def linear_log_probs_and_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    batch_invariant: bool = False,
) -> tuple[Tensor, Tensor]:
    r"""Per-token log-probability of ``target`` and entropy of the same distribution, in one
    pass over the output layer (as :func:`linear_log_probs`).

    .. math::
        \log p(y_i \mid x_i) = z_{i, y_i} - \log \sum_c e^{z_{i,c}}, \qquad
        H_i = -\sum_c p_{i,c} \log p_{i,c}, \qquad z_i = (W x_i + b) / T

    The entropy's gradient is :math:`\partial H / \partial z_c = -p_c (\log p_c + H)`;
    either output may be used alone or both together (e.g. a policy-gradient loss with an
    entropy bonus).

    Args:
        {args}

    Returns:
        ``(log_probs, entropy)``, both shaped like ``target``, in nats, in the promoted dtype
        of ``input`` and ``weight``; both 0 where ``target == ignore_index``.

    Notes:
        {notes}

    Example:
        >>> import torch
        >>> from losskit.functional import linear_log_probs_and_entropy
        >>> x, w, y = torch.randn(6, 8), torch.randn(50, 8), torch.randint(0, 50, (6,))
        >>> log_p, entropy = linear_log_probs_and_entropy(x, w, y)
        >>> p = torch.softmax(x @ w.T, -1)
        >>> torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-5)
        True
    """
    log_p, entropy = _compute("linear_log_probs_and_entropy", input, weight, target, bias, temperature, ignore_index,
                              chunk_size, batch_invariant, True)
    return log_p, entropy
