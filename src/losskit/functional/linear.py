"""linear_cross_entropy: the loss of a linear layer's logits, without materialising them."""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .._core.options import CrossEntropyOptions
from .._core.reduction import resolve_reduction
from .._core.validation import check_class_targets, check_class_weight, check_floating
from ..kernels import Replay, auto_chunk_rows, fused_linear_cross_entropy, fused_may_serve
from .classification import class_index_cross_entropy, cross_entropy

__all__ = ["linear_cross_entropy"]


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: Any = None,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    batch_invariant: bool = False,
) -> Tensor:
    r"""Cross-entropy of ``input @ linear_weight.T + linear_bias`` against ``target``.

    Equal to ``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)``, but
    for class-index targets and a ``[C, H]`` weight, on any device, the ``[N, C]`` logits
    are never formed: they are computed, used and turned into gradients chunk by chunk over tokens
    (:mod:`losskit.kernels.linear_cross_entropy`), so the extra memory is
    :math:`O(\text{chunk} \times C)` plus the weight's gradient instead of
    :math:`O(N \times C)`, and the result is the same.

    .. math::
        \ell_i = \operatorname{CE}\big(W x_i + b,\ y_i\big)

    Args:
        input: token features, ``[H]``, ``[N, H]``, or (beyond torch) ``[..., H]``.
        linear_weight: ``[C, H]`` (or torch's K-dimensional ``[C, d1, ..., H]``).
        target: class indices shaped like ``input`` without ``H`` (any integer dtype), or
            class probabilities shaped like the logits.
        linear_bias: ``[C]`` (or ``[C, d1, ...]``).
        weight: per-class rescaling, ``[C]``.
        reduction: ``'mean'`` (over the summed weight of targets not ignored), ``'sum'`` or
            ``'none'`` (shaped like ``target``).
        ignore_index: target value to ignore; ``None`` means -100 for class indices, as in
            torch, and must stay ``None`` with probabilities.
        label_smoothing: in ``[0, 1]``.
        options: torch's ``LinearCrossEntropyOptions``, accepted for compatibility; its
            ``batch_chunk_size`` sets the chunk when ``chunk_size`` is not given.
        lse_square_scale: z-loss scale, as in :func:`cross_entropy`.
        softcap: logit soft-cap, as in :func:`cross_entropy`.
        temperature: the (soft-capped) logits are divided by it before the softmax, as in
            :func:`cross_entropy`.
        chunk_size: tokens per chunk; by default chosen from ``C`` so that a chunk's logits
            are about 64 MiB (256 tokens at 65k classes), which needs no tuning on CPU.
        batch_invariant: with class-index targets, make each token's loss and row of the
            input's gradient bitwise the same whether the token is computed alone, in any
            batch, or with any ``chunk_size`` (every matrix product then takes a fixed block of 256 rows, the
            last padded; the chunk is rounded up to a multiple of 256). Costs 0 to 2% on
            the CPU benchmarks at one thread but 6 to 10% at two, and more for batches
            of fewer than 256 tokens (the padding), hence off by default. Two identical
            calls give identical bits either way.

    Returns:
        A scalar, or the per-token loss for ``reduction='none'``.

    Shape:
        - input: ``[H]``, ``[N, H]`` or ``[..., H]``.
        - linear_weight: ``[C, H]``.
        - target: ``input``'s shape without ``H``.
        - output: ``[]``, or ``target``'s shape for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import cross_entropy, linear_cross_entropy
        >>> x, w = torch.randn(6, 4), torch.randn(10, 4)
        >>> target = torch.tensor([1, 0, 9, 3, 3, 7])
        >>> torch.allclose(linear_cross_entropy(x, w, target), cross_entropy(x @ w.T, target))
        True

    References:
        torch.nn.functional.linear_cross_entropy (torch 2.13); Wijmans et al., "Cut Your
        Losses in Large-Vocabulary Language Models", 2024.
    """
    fn = "linear_cross_entropy"
    reduction = resolve_reduction(None, None, reduction)
    options_given = ignore_index is not None  # kept apart: ignore_index must stay None with probabilities
    ignore = -100 if ignore_index is None else ignore_index
    ce_options = CrossEntropyOptions.checked(
        fn, ignore_index=ignore, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
        softcap=softcap, temperature=temperature, reduction=reduction,
    )
    check_floating(input, "input", fn)
    check_floating(linear_weight, "linear_weight", fn)
    if input.dim() < 1:
        raise ValueError(f"{fn}: input must have a feature dimension, shaped (H,) or (N, H); got a 0-d tensor")
    if linear_weight.dim() < 2:
        raise ValueError(f"{fn}: linear_weight must be (C, H) or (C, d1, ..., H); got shape {tuple(linear_weight.shape)}")
    if input.shape[-1] != linear_weight.shape[-1]:
        raise ValueError(
            f"{fn}: input has {input.shape[-1]} features but linear_weight expects {linear_weight.shape[-1]} "
            f"(input shape {tuple(input.shape)}, linear_weight shape {tuple(linear_weight.shape)})"
        )
    num_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out_features):
        raise ValueError(
            f"{fn}: linear_bias must have shape {(num_classes, *out_features)}; got {tuple(linear_bias.shape)}"
        )
    if chunk_size is None and options is not None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive number of tokens; got {chunk_size}")

    batch = tuple(input.shape[:-1])
    logits_shape = (*batch, num_classes, *out_features)
    probabilities = target.shape == logits_shape
    if probabilities and options_given:
        raise ValueError(f"{fn}: ignore_index cannot be given when target holds class probabilities")

    if not probabilities and not out_features:
        if weight is not None:
            check_class_weight(weight, num_classes, fn)
        targets = check_class_targets(target, batch, num_classes, ignore, tuple(input.shape), fn)
        if fused_may_serve(input, linear_weight) and math.prod(batch) > 0:
            flat = targets.reshape(-1)

            def reference(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
                return class_index_cross_entropy(F.linear(x.reshape(-1, x.shape[-1]), w, b), flat, weight, ce_options)

            loss = fused_linear_cross_entropy(
                input.reshape(-1, input.shape[-1]), linear_weight, linear_bias, flat.target, flat.valid_or_none, weight,
                options=ce_options, replay=Replay(fn, reference, [input, linear_weight, linear_bias]),
                chunk_rows=(chunk_size if chunk_size is not None
                            else auto_chunk_rows(*linear_weight.shape, linear_weight.device.type)),
                batch_invariant=batch_invariant,
            )
            return loss.reshape(target.shape) if reduction == "none" else loss

    # The composed reference: linear, then cross_entropy (torch's K-dimensional layout).
    logits = F.linear(input, linear_weight.reshape(-1, linear_weight.shape[-1]),
                      None if linear_bias is None else linear_bias.reshape(-1))
    logits = logits.reshape(logits_shape)
    if len(batch) > 1:  # beyond torch: (..., H) input; classes go to dim 1 for cross_entropy
        logits = logits.reshape(-1, num_classes, *out_features)
        target = target.reshape(-1, *target.shape[len(batch):])
    if not probabilities and not out_features:  # validated above: no second pass over the targets
        flat = targets.reshape(*target.shape)
        loss = class_index_cross_entropy(logits, flat, weight, ce_options)
    else:
        loss = cross_entropy(
            logits, target, weight=weight, ignore_index=ignore, reduction=reduction,
            label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap,
            temperature=temperature,
        )
    return loss.reshape(*batch, *loss.shape[1:]) if reduction == "none" and len(batch) > 1 else loss

