"""Classification losses: cross_entropy, nll_loss, binary_cross_entropy(_with_logits).

Signatures and semantics are those of ``torch.nn.functional`` in torch 2.13; the arithmetic
(log-softmax, gathers, weighting, reductions) is losskit's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._core.docs import LEGACY_ARGS, fill_doc
from .._core.dtypes import cast, result_dtypes
from .._core.ops import log_softmax
from .._core.options import CrossEntropyOptions
from .._core.reduction import reduce_loss, resolve_reduction
from .._core.validation import (
    ClassTargets,
    check_class_targets,
    check_class_weight,
    check_floating,
    check_same_shape,
    class_dim_of,
    warn_if_probabilities,
)
from ..distributed.dtensor import class_sharded_cross_entropy, is_class_sharded
from ..kernels import Replay, fused_applies, fused_bce_applies, fused_bce_with_logits, fused_cross_entropy
from ..kernels.binary_cross_entropy import (
    REDUCTION_OPTIONS,
    bce_with_logits_chunk,
    check_extra_weight,
    check_probabilities,
    fused_bce,
    fused_bce_probabilities_applies,
)
from ..kernels.cross_entropy import eager_class_index, fused_nll_loss
from ..kernels.probability_cross_entropy import fused_probability_cross_entropy, probability_applies

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "nll_loss",
]


_OPTIONS: dict[tuple, CrossEntropyOptions] = {}


def _checked_options(fn: str, ignore_index: int, label_smoothing: float, lse_square_scale: float,
                     softcap: float | None, temperature: float, reduction: str) -> CrossEntropyOptions:
    """CrossEntropyOptions.checked(fn, ...), remembered by value in eager mode: one dict
    lookup, where the checked constructor's cache of keyword arguments costs microseconds
    (a batch of 64 costs a few tens of them in all)."""
    key = (fn, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, reduction)
    if not torch.compiler.is_compiling():
        try:
            found = _OPTIONS.get(key)
        except TypeError:  # an unhashable value: the checked constructor deals with it
            found = None
        if found is not None:
            return found
    options = CrossEntropyOptions.checked(
        fn, ignore_index=ignore_index, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
        softcap=softcap, temperature=temperature, reduction=reduction,
    )
    if not torch.compiler.is_compiling() and len(_OPTIONS) < 256:
        try:
            _OPTIONS[key] = options
        except TypeError:
            pass
    return options


def check_index_targets(input: Tensor, target: Tensor, class_dim: int, ignore_index: int, fn: str) -> ClassTargets:
    """Class-index targets of (C,), (N, C) or (N, C, d1, ...) logits, validated once: as
    int64, with their ``valid`` mask.

    As torch, unbatched (C,) logits take a target of shape () or (1,) (the loss is () for both).
    """
    expected = tuple(input.shape[:class_dim] + input.shape[class_dim + 1 :])
    if input.dim() == 1 and tuple(target.shape) == (1,):
        target = target.reshape(())
    return check_class_targets(target, expected, input.shape[class_dim], ignore_index, tuple(input.shape), fn)


def _class_shape(num_dims: int, class_dim: int, num_classes: int) -> list[int]:
    """Shape that broadcasts a per-class weight along ``class_dim``."""
    shape = [1] * num_dims
    shape[class_dim] = num_classes
    return shape


def _class_index_loss(
    log_probs: Tensor,
    targets: ClassTargets,
    weight: Tensor | None,
    label_smoothing: float,
    class_dim: int,
    compute: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | float]:
    """Per-position loss of class-index targets and the 'mean' denominator.

    loss_i = w_{y_i} * (1 - eps) * (-log p_{i, y_i}) + eps / C * sum_c w_c * (-log p_{i, c}),
    0 where y_i is ignored; the denominator is sum_i w_{y_i} over positions not ignored
    (their count when there is no weight), which is how torch normalises both terms.
    ``compute``: the dtype to compute in, when ``log_probs`` is not in it already (gathered
    values are cast, never the whole input; no smoothing then).
    """
    num_classes = log_probs.shape[class_dim]
    compute = log_probs.dtype if compute is None else compute
    if targets.all_valid and weight is None and label_smoothing == 0.0:
        # Every position counts with weight 1 (validation saw it for free): the plain mean.
        picked = log_probs.gather(class_dim, targets.target.unsqueeze(class_dim)).squeeze(class_dim)
        nll = -cast(picked, compute)
        return nll, float(nll.numel())
    valid = targets.valid
    # Ignored positions may hold any value (-100 by default): gather at class 0 instead and
    # mask afterwards with `where`, never a multiplication, so that a -inf log-probability
    # at an ignored position cannot turn into 0 * inf = nan, in the value or the gradient.
    safe_target = targets.safe()
    nll = -cast(log_probs.gather(class_dim, safe_target.unsqueeze(class_dim)).squeeze(class_dim), compute)
    if weight is None:
        target_weight = valid.to(compute)
    else:
        weight = weight.to(compute)
        picked_weight = weight[safe_target]
        target_weight = torch.where(valid, picked_weight, 0.0)
        nll = nll * picked_weight
    if label_smoothing > 0.0:
        per_class = log_probs if weight is None else log_probs * weight.view(
            _class_shape(log_probs.dim(), class_dim, num_classes)
        )
        smooth = -per_class.sum(class_dim)
        nll = (1.0 - label_smoothing) * nll + (label_smoothing / num_classes) * smooth
    loss = torch.where(valid, nll, 0.0)
    return loss, target_weight.sum()


def _probability_target_loss(
    log_probs: Tensor,
    target: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    class_dim: int,
) -> Tensor:
    """Per-position loss of class-probability targets: -sum_c w_c * q_c * log p_c.

    With label smoothing the target becomes q * (1 - eps) + eps / C. Its 'mean' is over
    positions (N * d1 * ...), not over summed weights, as in torch.
    """
    num_classes = log_probs.shape[class_dim]
    if label_smoothing > 0.0:
        target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    product = log_probs * target
    if weight is not None:
        product = product * weight.to(product.dtype).view(
            _class_shape(log_probs.dim(), class_dim, num_classes)
        )
    return -product.sum(class_dim)


@fill_doc(legacy_args=LEGACY_ARGS)
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    r"""Cross-entropy between raw logits and class indices or class probabilities.

    .. math::
        \ell_i = -\sum_c w_c\, q_{i,c} \log \operatorname{softmax}(x_i)_c

    where :math:`q_i` is the one-hot vector of class :math:`y_i` (class-index targets) or the
    given distribution (probability targets), smoothed to
    :math:`(1-\varepsilon) q_i + \varepsilon / C` by ``label_smoothing``.

    Args:
        input: unnormalised logits, shaped ``[C]``, ``[N, C]`` or ``[N, C, d1, ...]``.
        target: class indices (any integer dtype) shaped like ``input`` without its class
            dimension, or class probabilities (floating point) shaped exactly like ``input``.
        weight: per-class rescaling, shaped ``[C]``.
        {legacy_args}
        ignore_index: class-index target value that contributes neither loss nor gradient,
            and is left out of the 'mean' denominator. Not allowed (>= 0) with probabilities.
        reduction: ``'mean'`` (class indices: divided by the summed weight of the targets
            that are not ignored; nan when all are ignored), ``'sum'`` or ``'none'``.
        label_smoothing: :math:`\varepsilon` in ``[0, 1]``.
        lse_square_scale: beyond torch: adds the z-loss
            :math:`s \,(\log \sum_c e^{x_c})^2` of each position that counts (PaLM's
            auxiliary loss, keeping the softmax normaliser near 1); 0 turns it off. Under
            'mean' it is averaged over the positions that count, unweighted by ``weight``
            (a per-token regulariser, as in PaLM and Liger).
        softcap: beyond torch: logits are first soft-capped to
            :math:`\text{cap} \tanh(x / \text{cap})` (as in Gemma 2); None turns it off.
        temperature: beyond torch: the (soft-capped) logits are divided by :math:`T > 0`
            before the softmax, as sampling with a temperature does (RL log-probs,
            distillation): equal to ``cross_entropy(input / T, ...)``, values and gradients.

    Returns:
        A scalar, or for ``reduction='none'`` the per-position loss shaped ``[]``, ``[N]``
        or ``[N, d1, ...]``.

    Shape:
        - input: ``[C]``, ``[N, C]`` or ``[N, C, d1, ...]``.
        - target: ``[]``, ``[N]`` or ``[N, d1, ...]`` (class indices), or ``input``'s shape
          (class probabilities).
        - output: ``[]``, or for ``reduction='none'`` ``target``'s shape without the class
          dimension.

    (N, C) logits with class-index targets take a fused kernel (:mod:`losskit.kernels`,
    any device, a custom op under torch.compile) that computes loss and gradient in one
    pass over row chunks and holds one logits-sized gradient instead of torch's (N, C)
    log-softmax; under no_grad it computes the loss only. float64 inputs, torch.func
    transforms, vmap and forward-mode AD, and any call inside
    ``losskit.kernels.reference_only()``, use the composed reference code.

    Example:
        >>> import torch
        >>> from losskit.functional import cross_entropy
        >>> logits = torch.tensor([[1.2, 0.5, -0.8], [-0.5, 0.8, 2.0]])
        >>> cross_entropy(logits, torch.tensor([0, 2]))
        tensor(0.4071)
        >>> cross_entropy(logits, torch.tensor([0, 2]), reduction="none")
        tensor([0.4898, 0.3245])

    References:
        torch.nn.CrossEntropyLoss (torch 2.13); Szegedy et al., "Rethinking the Inception
        Architecture for Computer Vision", 2016 (label smoothing); Chowdhery et al., "PaLM:
        Scaling Language Modeling with Pathways", 2022 (z-loss); Gemma Team, "Gemma 2:
        Improving Open Language Models at a Practical Size", 2024 (soft-capping).
    """
    fn = "cross_entropy"
    if (size_average is None and reduce is None and softcap is None and type(temperature) is float
            and temperature == 1.0 and type(lse_square_scale) is float and lse_square_scale == 0.0):
        # The everyday eager CPU call, checked and computed in one call into compiled code.
        eager = eager_class_index(
            fused_cross_entropy, input, target, weight, ignore_index, label_smoothing, reduction,
            lambda logits: _class_index_reference(logits, _index_targets(target, ignore_index), weight, _checked_options(
                fn, ignore_index, label_smoothing, 0.0, None, 1.0, reduction)),
            probe=True,
        )
        if eager is not None:
            loss, maybe_probabilities = eager
            if maybe_probabilities:
                warn_if_probabilities(input, 1, fn)
            return loss
    reduction = resolve_reduction(size_average, reduce, reduction)
    options = _checked_options(fn, ignore_index, label_smoothing, lse_square_scale, softcap, temperature, reduction)
    if is_class_sharded(input):  # a DTensor sharded on classes: the vocab-parallel loss, no gather
        return class_sharded_cross_entropy(input, target, fn, weight=weight, options=options)
    class_dim = class_dim_of(input, fn)
    check_floating(input, "input", fn)
    if weight is not None:
        check_class_weight(weight, input.shape[class_dim], fn)
    warn_if_probabilities(input, class_dim, fn)

    # torch's rule: a target shaped exactly like the input holds class probabilities.
    if target.shape == input.shape:
        check_floating(target, "target (class probabilities, shaped like input)", fn)
        if ignore_index >= 0:
            raise ValueError(f"{fn}: ignore_index ({ignore_index}) is not supported with class-probability targets")

        def reference(x: Tensor) -> Tensor:
            compute, out = result_dtypes(x, target, weight)  # torch's: promoted with the weight too
            logits = _transformed(x.to(compute), options)
            loss = _probability_target_loss(
                log_softmax(logits, class_dim), target.to(compute), weight, label_smoothing, class_dim
            )
            if lse_square_scale:
                loss = loss + lse_square_scale * torch.logsumexp(logits, class_dim).square()
            return reduce_loss(loss, reduction).to(out)

        if probability_applies(input, target, options):
            return fused_probability_cross_entropy(
                input, target, weight, options=options, replay=Replay(fn, reference, [input])
            )
        return reference(input)

    targets = check_index_targets(input, target, class_dim, ignore_index, fn)
    return class_index_cross_entropy(input, targets, weight, options)


def class_index_cross_entropy(
    input: Tensor, targets: ClassTargets, weight: Tensor | None, options: CrossEntropyOptions
) -> Tensor:
    """cross_entropy of validated class-index targets: the fused kernel where it applies,
    else the composed reference."""

    def reference(logits: Tensor) -> Tensor:
        """The composed form: also what a fused call replays for a second backward."""
        return _class_index_reference(logits, targets, weight, options)

    if fused_applies(input, targets.target):
        return fused_cross_entropy(
            input, targets.target, targets.valid_or_none, weight, options=options,
            replay=Replay("cross_entropy", reference, [input]),
        )
    return reference(input)


def _class_index_reference(
    logits: Tensor, targets: ClassTargets, weight: Tensor | None, options: CrossEntropyOptions
) -> Tensor:
    """The composed cross_entropy of class-index targets (the oracle of the fused kernel)."""
    class_dim = 0 if logits.dim() == 1 else 1
    compute, out = result_dtypes(logits)
    z = _transformed(cast(logits, compute), options)
    loss, denominator = _class_index_loss(
        log_softmax(z, class_dim), targets, weight, options.label_smoothing, class_dim
    )
    reduction, scale = options.reduction, options.lse_square_scale
    if not scale:
        return reduce_loss(loss, reduction, denominator).to(out)
    # The z-loss is a per-token regulariser: 'mean' averages it over the positions that
    # count, unweighted, while the cross-entropy divides by the summed target weights.
    z_loss = torch.where(targets.valid, scale * torch.logsumexp(z, class_dim).square(), 0.0)
    if reduction == "mean":
        return (reduce_loss(loss, reduction, denominator) + z_loss.sum() / targets.valid.sum()).to(out)
    return reduce_loss(loss + z_loss, reduction).to(out)


def _index_targets(target: Tensor, ignore_index: int) -> ClassTargets:
    """Targets that the compiled checks found valid, for a replay of the composed form."""
    return ClassTargets(target.long(), ignore_index=ignore_index)


def _transformed(logits: Tensor, options: CrossEntropyOptions) -> Tensor:
    """cap * tanh(logits / cap) / T: smooth clipping of the logits to (-cap, cap), then the
    temperature."""
    if options.softcap is not None:
        logits = options.softcap * torch.tanh(logits / options.softcap)
    return logits if options.temperature == 1.0 else logits / options.temperature


@fill_doc(legacy_args=LEGACY_ARGS)
def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Negative log-likelihood of class indices under given log-probabilities.

    .. math::
        \ell_i = -w_{y_i} \, x_{i, y_i}

    Args:
        input: log-probabilities, shaped ``[C]``, ``[N, C]`` or ``[N, C, d1, ...]``.
        target: class indices (any integer dtype), ``input``'s shape without the class dim.
        weight: per-class rescaling, shaped ``[C]``.
        {legacy_args}
        ignore_index: target value that contributes neither loss nor gradient.
        reduction: ``'mean'`` (divided by the summed weight of non-ignored targets),
            ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the per-position loss for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import nll_loss
        >>> log_probs = torch.tensor([[0.5, 0.1, 0.3]]).log()
        >>> nll_loss(log_probs, torch.tensor([2]))  # -ln(0.3)
        tensor(1.2040)

    References:
        torch.nn.NLLLoss (torch 2.13).
    """
    fn = "nll_loss"
    if size_average is None and reduce is None:
        # The everyday eager CPU call, checked and computed in one call into compiled code.
        eager = eager_class_index(
            fused_nll_loss, input, target, weight, ignore_index, 0.0, reduction,
            lambda log_probs: _nll_reference(log_probs, _index_targets(target, ignore_index), weight, reduction),
            probe=False,
        )
        if eager is not None:
            return eager[0]
    reduction = resolve_reduction(size_average, reduce, reduction)
    options = _checked_options(fn, ignore_index, 0.0, 0.0, None, 1.0, reduction)
    class_dim = class_dim_of(input, fn)
    check_floating(input, "input", fn)
    if weight is not None:
        check_class_weight(weight, input.shape[class_dim], fn)
    targets = check_index_targets(input, target, class_dim, ignore_index, fn)

    def reference(log_probs: Tensor) -> Tensor:
        """The composed form: also what a fused call replays for a second backward."""
        return _nll_reference(log_probs, targets, weight, reduction)

    if fused_applies(input, targets.target):
        return fused_nll_loss(
            input, targets.target, targets.valid_or_none, weight, options=options,
            replay=Replay(fn, reference, [input]),
        )
    return reference(input)


def _nll_reference(log_probs: Tensor, targets: ClassTargets, weight: Tensor | None, reduction: str) -> Tensor:
    """The composed nll_loss (the oracle of the fused kernel)."""
    compute, out = result_dtypes(log_probs)
    # Only the gathered log-probabilities are computed with: gather first, then cast (a cast
    # of the whole half-precision input would cost a full pass; the gather rounds nothing).
    loss, denominator = _class_index_loss(log_probs, targets, weight, 0.0, class_dim_of(log_probs, "nll_loss"),
                                          compute)
    return cast(reduce_loss(loss, reduction, denominator), out)


class _BinaryCrossEntropy(torch.autograd.Function):
    """Element-wise BCE on probabilities with torch's clamps in forward and backward.

    forward:  -(y * max(log p, -100) + (1 - y) * max(log(1 - p), -100))
    backward: d/dp = (p - y) / max(p (1 - p), 1e-12);  d/dy = log(1 - p) - log p
    Autograd through the clamped forward would give 0 * inf = nan at p = 0 or 1; the
    written-out gradient stays finite there, as torch's does.
    """

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(input, target)
        log_p = torch.log(input).clamp_min(-100.0)
        log_1mp = torch.log1p(-input).clamp_min(-100.0)
        return -(target * log_p + (1.0 - target) * log_1mp)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        input, target = ctx.saved_tensors
        grad_input = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_input = grad * (input - target) / (input * (1.0 - input)).clamp_min(1e-12)
        if ctx.needs_input_grad[1]:
            grad_target = grad * -torch.logit(input)
        return grad_input, grad_target


@fill_doc(legacy_args=LEGACY_ARGS)
def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Binary cross-entropy between probabilities and targets in [0, 1].

    .. math::
        \ell = -w \left[ y \log p + (1 - y) \log (1 - p) \right]

    with each log clamped at -100, as torch does, so that p = 0 or 1 gives a finite loss.

    Args:
        input: probabilities in ``[0, 1]`` (e.g. sigmoid outputs), any shape ``[...]``.
        target: same shape as ``input``, values in ``[0, 1]``.
        weight: rescaling that broadcasts to ``input``'s shape.
        {legacy_args}
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.

    Returns:
        A scalar, or the element-wise loss shaped like ``input`` for ``reduction='none'``.

    Raises:
        ValueError: when ``input`` holds a value outside [0, 1] (or nan), naming it and its
            index; logits belong in :func:`binary_cross_entropy_with_logits`.

    On CPU, when only ``input`` needs a gradient, a fused kernel computes loss and gradient
    in one pass (:mod:`losskit.kernels.binary_cross_entropy`).

    Example:
        >>> import torch
        >>> from losskit.functional import binary_cross_entropy
        >>> p = torch.tensor([0.9, 0.2, 0.6])
        >>> binary_cross_entropy(p, torch.tensor([1.0, 0.0, 1.0]))
        tensor(0.2798)

    References:
        torch.nn.BCELoss (torch 2.13).
    """
    fn = "binary_cross_entropy"
    reduction = resolve_reduction(size_average, reduce, reduction)
    check_same_shape(input, target, fn)
    check_floating(input, "input", fn)
    check_probabilities(input, "input", fn, hint="For raw scores (logits) use binary_cross_entropy_with_logits")
    check_probabilities(target, "target", fn)  # as torch, which raises there too
    if weight is not None:
        check_extra_weight(weight, tuple(input.shape), "weight", fn)

    def reference(probabilities: Tensor) -> Tensor:
        compute, out = result_dtypes(probabilities, target)
        loss = _BinaryCrossEntropy.apply(probabilities.to(compute), target.to(compute))
        if weight is not None:
            loss = loss * weight.to(compute)
        return reduce_loss(loss, reduction).to(out)

    if fused_bce_probabilities_applies(input, target, weight):
        return fused_bce(input, target, weight, options=REDUCTION_OPTIONS[reduction],
                         replay=Replay(fn, reference, [input]))
    return reference(input)


@fill_doc(legacy_args=LEGACY_ARGS)
def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    r"""Binary cross-entropy on logits, stable at any magnitude.

    .. math::
        \ell = w \left[ (1 - y)\, x - (1 + (p_w - 1)\, y) \log \sigma(x) \right]

    which equals :math:`-w [p_w\, y \log \sigma(x) + (1 - y) \log(1 - \sigma(x))]` but never
    forms :math:`\sigma(x)`, so logits of :math:`\pm 10^4` give exact, finite losses.

    Args:
        input: logits, any shape ``[...]``.
        target: same shape as ``input``, values in ``[0, 1]``.
        weight: rescaling that broadcasts to ``input``'s shape.
        {legacy_args}
        reduction: ``'mean'``, ``'sum'`` or ``'none'``.
        pos_weight: weight of the positive term, broadcast from the right (e.g. ``[C]``
            for ``[N, C]`` multi-label input); > 1 raises recall, < 1 precision.

    Returns:
        A scalar, or the element-wise loss shaped like ``input`` for ``reduction='none'``.

    On CPU, when only ``input`` needs a gradient, a fused kernel computes loss and gradient
    in one pass over chunks (:mod:`losskit.kernels.binary_cross_entropy`).

    Example:
        >>> import torch
        >>> from losskit.functional import binary_cross_entropy_with_logits
        >>> x = torch.tensor([2.1972, -1.3863, 0.4055])  # logit(0.9), logit(0.2), logit(0.6)
        >>> binary_cross_entropy_with_logits(x, torch.tensor([1.0, 0.0, 1.0]))
        tensor(0.2798)

    References:
        torch.nn.BCEWithLogitsLoss (torch 2.13).
    """
    fn = "binary_cross_entropy_with_logits"
    reduction = resolve_reduction(size_average, reduce, reduction)
    check_same_shape(input, target, fn)
    check_floating(input, "input", fn)
    shape = tuple(input.shape)
    for name, extra in (("weight", weight), ("pos_weight", pos_weight)):
        if extra is not None:
            check_extra_weight(extra, shape, name, fn)

    def reference(logits: Tensor) -> Tensor:
        compute, out = result_dtypes(logits, target, result=(target,))  # torch's: the target's dtype
        x, y = logits.to(compute), target.to(compute)
        log_sigmoid = F.logsigmoid(x)
        if pos_weight is not None:
            log_sigmoid = log_sigmoid * (1.0 + (pos_weight.to(compute) - 1.0) * y)
        loss = (1.0 - y) * x - log_sigmoid
        if weight is not None:
            loss = loss * weight.to(compute)
        return reduce_loss(loss, reduction).to(out)

    if fused_bce_applies(input, target, weight, pos_weight):
        return fused_bce_with_logits(
            input, target, weight, pos_weight, options=REDUCTION_OPTIONS[reduction],
            replay=Replay(fn, reference, [input]), chunk=bce_with_logits_chunk(input),
        )
    return reference(input)
