r"""Knowledge distillation: a student's next-token distribution against a teacher's.

Three forms of one loss, per token:

- :func:`distillation_loss`: from both models' logits ``[..., V]``;
- :func:`linear_distillation_loss`: from both models' last hidden states and output
  layers, never forming either ``[N, V]`` logits tensor;
- :func:`topk_distillation_loss`: from the student's logits and the teacher's cached top-k
  token ids and log-probabilities (k + 1 buckets: the k tokens and the rest).

The divergence is the generalised Jensen-Shannon divergence of Agarwal et al. (GKD, 2024,
Eq. 1) with TRL's and Liger-Kernel's conventions. With :math:`q` the student's and :math:`p`
the teacher's softmax at temperature :math:`T` (both logits divided by :math:`T`):

.. math::
    D_\beta(p, q) = \begin{cases}
        \mathrm{KL}(p \,\|\, q) & \beta = 0 \text{ (forward KL)} \\
        \beta\, \mathrm{KL}(p \,\|\, m) + (1 - \beta)\, \mathrm{KL}(q \,\|\, m),\quad
        m = \beta p + (1 - \beta) q & 0 < \beta < 1 \\
        \mathrm{KL}(q \,\|\, p) & \beta = 1 \text{ (reverse KL)}
    \end{cases}

**The family is discontinuous at both ends.** Inside (0, 1) the mixture divergence tends
to 0 as :math:`\beta \to 0` (it is about :math:`\beta\,\mathrm{KL}(p \| q)`) and as
:math:`\beta \to 1` (about :math:`(1 - \beta)\,\mathrm{KL}(q \| p)`); :math:`\beta = 0`
and :math:`\beta = 1` are *defined* as the full forward and reverse KL divergences, as in
TRL and Liger-Kernel. A small beta is therefore not "almost forward KL": it is a
divergence close to 0 with a gradient about beta times that of the forward KL.

Each token's loss is ``weight_soft_loss * D + weight_hard_loss * CE``, where CE is the
student's cross-entropy against ``target`` at temperature 1 (Liger-Kernel's "hard loss";
the default ``weight_hard_loss=0`` leaves it out, as TRL's GKD does). No :math:`T^2`
factor is applied (neither TRL nor Liger applies one; multiply by ``T**2`` for Hinton et
al.'s scaling). Tokens whose ``target`` is ``ignore_index`` count neither in the loss nor in
the ``'mean'`` denominator; ``'mean'`` divides the sum over the tokens that count by their
number, and by 1 when none counts (the loss is then 0 with a zero gradient: TRL's and
Liger's ``clamp_min(1)``), so an all-masked micro-batch never poisons a step with nan.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF
from torch import Tensor

from .._core.checks import check_values, effective_mode
from .._core.dtypes import result_dtypes
from .._core.ops import log_softmax
from .._core.validation import ClassTargets, at_index, check_class_targets, check_floating, first_index
from ..kernels.fused_op import Replay, eager_native, fused_may_serve
from ..kernels.topk_distillation import fused_topk_distillation
from ..kernels.linear_distillation import (
    DistillationOptions,
    auto_chunk_rows,
    divergence_rows,
    fused_distillation,
    fused_linear_distillation,
    reduce_rows,
)

__all__ = ["distillation_loss", "linear_distillation_loss", "topk_distillation_loss"]


def _options(fn: str, beta: float, temperature: float, ignore_index: int, reduction: str, weight_hard_loss: float,
             weight_soft_loss: float, target: Tensor | None) -> DistillationOptions:
    options = DistillationOptions.checked(
        fn, beta=beta, temperature=temperature, ignore_index=ignore_index, weight_hard_loss=weight_hard_loss,
        weight_soft_loss=weight_soft_loss, reduction=reduction,
    )
    if weight_hard_loss != 0.0 and target is None:
        raise ValueError(f"{fn}: weight_hard_loss={weight_hard_loss} needs target (the token ids the hard "
                         "cross-entropy is computed against); got target=None")
    return options


def _targets(target: Tensor | None, rows: tuple[int, ...], num_classes: int, ignore_index: int,
             input_shape: tuple[int, ...], fn: str) -> ClassTargets | None:
    """The flat, validated targets (token ids in [0, V) or ``ignore_index``), or None."""
    if target is None:
        return None
    targets = check_class_targets(target, rows, num_classes, ignore_index, input_shape, fn)
    return targets.reshape(-1)


def _masked(x: Tensor, valid: Tensor | None, fill: float = 0.0) -> Tensor:
    """``x`` with the rows of ignored tokens replaced by ``fill``: whatever they held (inf,
    nan) then passes nothing to the loss or to the gradient."""
    return x if valid is None else torch.where(valid.unsqueeze(-1), x, fill)


def _hard_rows(student: Tensor, targets: ClassTargets | None, options: DistillationOptions) -> Tensor | None:
    """The student's cross-entropy at temperature 1 per token (ignored tokens read class 0)."""
    if options.weight_hard_loss == 0.0 or targets is None:
        return None
    return -log_softmax(student, -1).gather(-1, targets.safe().unsqueeze(-1)).squeeze(-1)


def _combine(soft: Tensor, hard: Tensor | None, valid: Tensor | None, options: DistillationOptions) -> Tensor:
    rows = soft * options.weight_soft_loss
    if hard is not None:
        rows = rows + options.weight_hard_loss * hard
    return rows if valid is None else torch.where(valid, rows, 0.0)


def _finish(rows: Tensor, valid: Tensor | None, options: DistillationOptions, shape: tuple[int, ...],
            out: torch.dtype) -> Tensor:
    loss = reduce_rows(rows, valid, options.reduction)
    return (loss.reshape(shape) if options.reduction == "none" else loss).to(out)


def _check_logits(t: Tensor, name: str, fn: str) -> None:
    check_floating(t, name, fn)
    if t.dim() < 1:
        raise ValueError(f"{fn}: {name} must have a vocabulary dimension, shaped [..., V]; got a 0-d tensor")


def _dense_rows(student: Tensor, teacher: Tensor, targets: ClassTargets | None,
                options: DistillationOptions) -> Tensor:
    """Per-token loss of flat (N, V) logits in the compute dtype: the composed reference."""
    valid = None if targets is None else targets.valid_or_none
    student, teacher = _masked(student, valid), _masked(teacher, valid)
    temperature = options.temperature
    log_q = log_softmax(student if temperature == 1.0 else student / temperature, -1)
    log_p = log_softmax(teacher if temperature == 1.0 else teacher / temperature, -1)
    soft = divergence_rows(log_q, log_p, options.beta)
    return _combine(soft, _hard_rows(student, targets, options), valid, options)


def _dense_chunk_rows(num_classes: int) -> int:
    """Token rows per chunk of the fused dense pass: about 1 MiB of float32 per (rows, V)
    buffer, so that the dozen passes over a chunk stay in the cache (measured at (4096,
    1000): 256 rows take 0.90x the time of 1024 and 0.88x that of one chunk, one thread)."""
    return int(min(4096, max(16, (1 << 18) // max(num_classes, 1))))


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    weight_hard_loss: float = 0.0,
    weight_soft_loss: float = 1.0,
) -> Tensor:
    r"""Generalised Jensen-Shannon distillation loss of a student's logits from a teacher's.

    Per token, with :math:`q = \mathrm{softmax}(s / T)` (student), :math:`p =
    \mathrm{softmax}(t / T)` (teacher) and :math:`D_\beta` as in the module docstring
    (:math:`\beta = 0` forward KL, :math:`\beta = 1` reverse KL, the mixture JSD between):

    .. math::
        \ell_i = w_\text{soft}\, D_\beta(p_i, q_i) + w_\text{hard}\, (-\log \mathrm{softmax}(s_i)_{y_i})

    :math:`D_\beta` is discontinuous at :math:`\beta = 0` and :math:`\beta = 1`: inside
    (0, 1) it tends to 0 at both ends, while the ends themselves are the full KL
    divergences (TRL's and Liger-Kernel's definition).

    Equal to TRL 1.16's ``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits,
    labels, beta, temperature)`` (its default ``'batchmean'`` with ``labels``: the sum over
    the tokens that count divided by their number, at least 1) for ``reduction='mean'``
    with ``target=labels``, and to Liger-Kernel's JSD with ``weight_hard_loss`` and
    ``weight_soft_loss`` set as there (Liger's defaults are 0.5 and 0.5; losskit's are 0
    and 1, TRL's loss).

    Args:
        student_logits: ``[..., V]``; receives the gradient.
        teacher_logits: ``[..., V]``, the same shape. It receives a gradient too if it
            requires one (as in TRL); detach it for a fixed teacher.
        target: token ids ``[...]`` (the logits' shape without ``V``), any integer dtype, or
            None: every token counts. Tokens equal to ``ignore_index`` are masked out;
            ids are the hard loss's classes when ``weight_hard_loss`` is not 0.
        beta: in [0, 1]: 0 forward KL(p || q), 1 reverse KL(q || p), 0.5 the symmetric JSD.
        temperature: :math:`T > 0`; both logits are divided by it. The hard loss uses the
            student's logits as they are.
        ignore_index: the target value of tokens to skip.
        reduction: ``'mean'`` (over the tokens that count; 0 when none does), ``'sum'`` or
            ``'none'`` (one loss per token, 0 where ignored, shaped like ``target``).
        weight_hard_loss: weight of the student's cross-entropy against ``target`` (needs
            ``target``).
        weight_soft_loss: weight of the divergence.

    Returns:
        A scalar, or the per-token loss ``[...]`` for ``reduction='none'``.

    Shape:
        - student_logits, teacher_logits: ``[..., V]``.
        - target: ``[...]``.
        - output: ``[]``, or ``[...]`` for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import distillation_loss
        >>> student, teacher = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
        >>> distillation_loss(student, teacher)  # beta = 0.5: the JS divergence
        tensor(0.3278)
        >>> distillation_loss(student, teacher, beta=0.0)  # forward KL(teacher || student)
        tensor(1.5232)

    References:
        Agarwal et al., "On-Policy Distillation of Language Models: Learning from
        Self-Generated Mistakes" (GKD), ICLR 2024, Eq. 1; Hinton et al., "Distilling the
        Knowledge in a Neural Network", 2015; TRL 1.16 ``GKDTrainer.generalized_jsd_loss``;
        Liger-Kernel 0.8.5 ``LigerFusedLinearJSDLoss``.
    """
    fn = "distillation_loss"
    options = _options(fn, beta, temperature, ignore_index, reduction, weight_hard_loss, weight_soft_loss, target)
    _check_logits(student_logits, "student_logits", fn)
    check_floating(teacher_logits, "teacher_logits", fn)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"{fn}: teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
                         f"{tuple(student_logits.shape)}")
    rows_shape, num_classes = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    targets = _targets(target, rows_shape, num_classes, ignore_index, tuple(student_logits.shape), fn)
    compute, out = result_dtypes(student_logits, teacher_logits)
    valid = None if targets is None else targets.valid_or_none

    def reference(s: Tensor) -> Tensor:
        """The composed loss (the oracle of the fused path and its double-backward replay)."""
        rows = _dense_rows(s.reshape(-1, num_classes).to(compute), teacher_logits.reshape(-1, num_classes).to(compute),
                           targets, options)
        return _finish(rows, valid, options, rows_shape, out)

    # The fused pass makes the student's gradient only: a teacher that wants one (TRL's
    # generalized_jsd_loss lets it) takes the composed path.
    if (student_logits.numel() > 0 and not (teacher_logits.requires_grad and torch.is_grad_enabled())
            and fused_may_serve(student_logits, teacher_logits)):
        # 2-D as it comes, so that the gradient's edge leads straight to the caller's tensor.
        student = student_logits if student_logits.dim() == 2 else student_logits.reshape(-1, num_classes)
        loss = fused_distillation(
            student, teacher_logits.reshape(-1, num_classes), None if targets is None else targets.safe(), valid,
            options=options, replay=Replay(fn, reference, [student_logits]), chunk_rows=_dense_chunk_rows(num_classes),
        )
        return loss.reshape(rows_shape) if options.reduction == "none" else loss
    return reference(student_logits)


def linear_distillation_loss(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    target: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    weight_hard_loss: float = 0.0,
    weight_soft_loss: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    r""":func:`distillation_loss` of two linear output layers, without their logits.

    Equal to ``distillation_loss(linear(student_input, student_weight, student_bias),
    linear(teacher_input, teacher_weight, teacher_bias).detach(), target, ...)``, but the
    ``[N, V]`` logits of neither model are formed: chunk by chunk over the tokens, both
    chunks of logits are computed, turned into the loss and the student's gradients, and
    dropped (:mod:`losskit.kernels.linear_distillation`, on any device, and one custom op
    under ``torch.compile``). The extra memory is a few ``[chunk, V]`` buffers and the
    student weight's gradient. Half-precision inputs are computed in float32.

    .. math::
        \ell_i = w_\text{soft}\, D_\beta\big(\mathrm{softmax}(t_i / T), \mathrm{softmax}(s_i / T)\big)
                 + w_\text{hard}\, \mathrm{CE}(s_i, y_i), \quad s_i = W_s h_i + b_s,\ t_i = W_t g_i + b_t

    The teacher side (``teacher_input``, ``teacher_weight``, ``teacher_bias``) gets no
    gradient, as in Liger-Kernel: its logits are the target.

    Args:
        student_input: the student's hidden states ``[..., H_s]``.
        student_weight: the student's output layer ``[V, H_s]``.
        teacher_input: the teacher's hidden states ``[..., H_t]`` (same tokens).
        teacher_weight: the teacher's output layer ``[V, H_t]``, the same vocabulary.
        target: token ids ``[...]`` or None, as in :func:`distillation_loss`.
        student_bias: ``[V]`` or None.
        teacher_bias: ``[V]`` or None.
        beta, temperature, ignore_index, reduction, weight_hard_loss, weight_soft_loss: as
            in :func:`distillation_loss`.
        chunk_size: tokens per chunk; by default about 4 MiB of float32 per ``[chunk, V]``
            buffer (64 tokens at V = 65536), within 16 to 1024.

    Returns:
        A scalar, or the per-token loss ``[...]`` for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import distillation_loss, linear_distillation_loss
        >>> hs, ws = torch.randn(6, 4), torch.randn(10, 4)
        >>> ht, wt = torch.randn(6, 8), torch.randn(10, 8)
        >>> torch.allclose(linear_distillation_loss(hs, ws, ht, wt, beta=0.2),
        ...                distillation_loss(hs @ ws.T, ht @ wt.T, beta=0.2))
        True

    References:
        Liger-Kernel 0.8.5 ``LigerFusedLinearJSDLoss`` (chunked, its CE "hard loss" and
        weights); Agarwal et al., GKD, ICLR 2024.
    """
    fn = "linear_distillation_loss"
    options = _options(fn, beta, temperature, ignore_index, reduction, weight_hard_loss, weight_soft_loss, target)
    for name, t in (("student_input", student_input), ("student_weight", student_weight),
                    ("teacher_input", teacher_input), ("teacher_weight", teacher_weight)):
        check_floating(t, name, fn)
    for name, t in (("student_input", student_input), ("teacher_input", teacher_input)):
        if t.dim() < 1:
            raise ValueError(f"{fn}: {name} must have a feature dimension, shaped [..., H]; got a 0-d tensor")
    for name, w, x in (("student_weight", student_weight, student_input), ("teacher_weight", teacher_weight,
                                                                          teacher_input)):
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            side = name.split("_")[0]
            raise ValueError(f"{fn}: {name} must be [V, H] with H = {x.shape[-1]} ({side}_input's last dimension); "
                             f"got shape {tuple(w.shape)}")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"{fn}: teacher_weight has {teacher_weight.shape[0]} classes but student_weight has "
                         f"{student_weight.shape[0]}; both must cover the same vocabulary")
    if tuple(teacher_input.shape[:-1]) != tuple(student_input.shape[:-1]):
        raise ValueError(f"{fn}: teacher_input shape {tuple(teacher_input.shape)} must have the tokens of "
                         f"student_input shape {tuple(student_input.shape)} (all but the last dimension equal)")
    num_classes = student_weight.shape[0]
    for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if b is not None:
            check_floating(b, name, fn)
            if tuple(b.shape) != (num_classes,):
                raise ValueError(f"{fn}: {name} must have shape ({num_classes},); got {tuple(b.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive number of tokens; got {chunk_size}")
    rows_shape = tuple(student_input.shape[:-1])
    targets = _targets(target, rows_shape, num_classes, ignore_index, tuple(student_input.shape), fn)
    xs, xt = student_input.reshape(-1, student_input.shape[-1]), teacher_input.reshape(-1, teacher_input.shape[-1])

    def reference(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """The composed loss: both logits formed, the teacher's without a gradient."""
        compute, _ = result_dtypes(x, w)
        valid = None if targets is None else targets.valid_or_none
        # Ignored tokens' hidden states read as 0, so that an inf there cannot reach the
        # weight's gradient as 0 * inf.
        student = TF.linear(_masked(x.reshape(-1, x.shape[-1]), valid), w, b).to(compute)
        with torch.no_grad():
            teacher = TF.linear(_masked(xt, valid), teacher_weight, teacher_bias).to(compute)
        rows = _dense_rows(student, teacher, targets, options)
        return reduce_rows(rows, valid, options.reduction)

    _, out = result_dtypes(student_input, student_weight)
    if fused_may_serve(student_input, student_weight) and xs.shape[0] > 0:
        loss = fused_linear_distillation(
            xs, student_weight, student_bias, xt.detach(), teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(),
            None if targets is None else targets.safe(), None if targets is None else targets.valid_or_none,
            options=options, replay=Replay(fn, reference, [student_input, student_weight, student_bias]),
            chunk_rows=chunk_size if chunk_size is not None else auto_chunk_rows(num_classes),
        )
    else:
        loss = reference(student_input, student_weight, student_bias)
    return (loss.reshape(rows_shape) if options.reduction == "none" else loss).to(out)


def _check_topk(ids: Tensor, logps: Tensor, valid: Tensor | None, num_classes: int, fn: str) -> None:
    """The cached teacher: ids in [0, V), no id twice in a row, log-probabilities <= 0 (nan
    is bad, -inf a token of no mass) whose probabilities sum to at most 1 (up to rounding),
    on the tokens that count."""
    # k probabilities rounded in the input's dtype may sum a little above 1.
    slack = 4 * (logps.shape[-1] + 1) * torch.finfo(logps.dtype).eps
    if effective_mode(logps) == "full":
        # All four checks in one read of the small [N, k] inputs in C++; where it finds
        # anything wrong (or a sum too close to call), the checks below run and report it.
        native = eager_native(ids, logps, valid)
        if native is not None and native.topk_check(ids, logps, valid, num_classes, slack):
            return
    counted = None if valid is None else valid.unsqueeze(-1)

    def report_ids(bad: Tensor) -> Exception:
        where = first_index(bad)
        return IndexError(f"{fn}: teacher_topk_ids holds {int(ids[where])}{at_index(where)}, out of range for "
                          f"{num_classes} classes")

    def bad_ids() -> Tensor:
        bad = (ids < 0) | (ids >= num_classes)
        return bad if counted is None else bad & counted

    check_values(ids, bad_ids, report_ids, f"{fn}: a teacher_topk_ids entry is out of range for {num_classes} classes")

    def bad_repeats() -> Tensor:
        ordered = ids.sort(-1).values
        repeat = (ordered[..., 1:] == ordered[..., :-1]).any(-1)
        return repeat if valid is None else repeat & valid

    def report_repeats(bad: Tensor) -> Exception:
        where = first_index(bad)
        return ValueError(f"{fn}: teacher_topk_ids names a token twice in row {where} ({ids[where].tolist()}); "
                          "each of the k ids must be distinct")

    if ids.shape[-1] > 1:
        check_values(ids, bad_repeats, report_repeats, f"{fn}: teacher_topk_ids names a token twice in a row")

    def bad_logps() -> Tensor:
        bad = ~(logps <= 0)  # nan and positive values
        return bad if counted is None else bad & counted

    def report_logps(bad: Tensor) -> Exception:
        where = first_index(bad)
        return ValueError(f"{fn}: teacher_topk_logps must hold log-probabilities (<= 0, not nan); found "
                          f"{float(logps.detach()[where]):g}{at_index(where)}")

    check_values(logps, bad_logps, report_logps, f"{fn}: teacher_topk_logps must hold log-probabilities (<= 0)")

    def bad_mass() -> Tensor:
        over = torch.logsumexp(logps.to(torch.float32 if logps.element_size() < 4 else logps.dtype), -1) > slack
        return over if valid is None else over & valid

    def report_mass(bad: Tensor) -> Exception:
        where = first_index(bad)
        total = float(logps.detach()[where].double().exp().sum())
        return ValueError(f"{fn}: teacher_topk_logps of row {where} sum to probability {total:.6g} > 1; they must be "
                          "the teacher's log-probabilities of k distinct tokens")

    if logps.shape[-1] > 0:
        check_values(logps, bad_mass, report_mass, f"{fn}: teacher_topk_logps sum to a probability above 1")


def _safe_log(x: Tensor) -> Tensor:
    """log x for x >= 0, -inf at 0 with a zero gradient (never 0 * inf = nan)."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).log(), -math.inf)


def _safe_logsumexp(x: Tensor) -> Tensor:
    """logsumexp over the last dimension; -inf for a row of -inf (or no entries) with a
    zero gradient, where torch.logsumexp's backward gives nan (exp(-inf - -inf))."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], -math.inf)
    shift = x.amax(-1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    return _safe_log((x - shift).exp().sum(-1)) + shift.squeeze(-1)


def topk_distillation_loss(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logps: Tensor,
    target: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    weight_hard_loss: float = 0.0,
    weight_soft_loss: float = 1.0,
) -> Tensor:
    r""":func:`distillation_loss` against a teacher cached as its top-k tokens per position.

    The teacher is known by k token ids :math:`i_1, \dots, i_k` and their log-probabilities
    :math:`\log p_{i_j}`; the rest of its mass, :math:`p_\text{rest} = 1 - \sum_j p_{i_j}`
    (clamped at 0), is one more bucket. The student's softmax :math:`q = \mathrm{softmax}(s
    / T)` over the full vocabulary is grouped the same way: :math:`q_{i_1}, \dots, q_{i_k}`
    and :math:`q_\text{rest} = \sum_{c \notin \{i_j\}} q_c` (a log-sum-exp over the other
    logits, exact however small). The loss is :math:`D_\beta` of those two (k + 1)-bucket
    distributions:

    .. math::
        \ell = w_\text{soft}\, D_\beta\big((p_{i_1}, \dots, p_{i_k}, p_\text{rest}),\
               (q_{i_1}, \dots, q_{i_k}, q_\text{rest})\big) + w_\text{hard}\, \mathrm{CE}(s, y)

    What this means:

    - When the teacher's top-k hold all its mass (tail 0) this *equals* the dense
      :func:`distillation_loss` against that teacher for every beta < 1: the classes the
      teacher gives no mass add to :math:`D_\beta` a term linear in the student's mass
      there, which the bucket reproduces exactly. (beta = 1, reverse KL, is then +inf, as
      densely: the student always puts some mass where the teacher puts none.)
    - With a tail, it equals the dense loss against a teacher whose tail is spread over
      the other tokens in proportion to the student's; against any other teacher it is
      smaller (merging classes never increases a divergence), so no information outside
      the top k is invented.
    - The student is pushed to put :math:`p_\text{rest}` on the other tokens in total,
      and not told how to spread it; renormalising the teacher's top-k to 1 instead (a
      common shortcut) would push the student's tail mass to 0.

    ``teacher_topk_logps`` are used as given: ``temperature`` divides only the student's
    logits (cache the teacher's log-probabilities at the temperature wanted). An entry of
    log-probability ``-inf`` is padding (fewer than k tokens known at that position): its
    token stays in the rest bucket, so padding never changes the loss; its id must still
    be in range and distinct from the others in the row.

    Args:
        student_logits: ``[..., V]``.
        teacher_topk_ids: ``[..., k]`` integer token ids, distinct within each position.
        teacher_topk_logps: ``[..., k]`` the teacher's log-probabilities of those tokens
            (no gradient is needed; one flows if it requires one).
        target: token ids ``[...]`` or None, as in :func:`distillation_loss`.
        beta, temperature, ignore_index, reduction, weight_hard_loss, weight_soft_loss: as
            in :func:`distillation_loss`.

    Returns:
        A scalar, or the per-token loss ``[...]`` for ``reduction='none'``.

    Example:
        >>> import torch
        >>> from losskit.functional import distillation_loss, topk_distillation_loss
        >>> student = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
        >>> teacher = torch.tensor([[2.0, 1.0, -float("inf"), -float("inf")]])  # all mass on 2 tokens
        >>> ids = torch.tensor([[0, 1]])
        >>> logps = teacher.log_softmax(-1).gather(-1, ids)
        >>> torch.allclose(topk_distillation_loss(student, ids, logps), distillation_loss(student, teacher))
        True

    References:
        Agarwal et al., GKD, ICLR 2024 (the divergence); Anshumann et al., "Sparse Logit
        Sampling: Accelerating Knowledge Distillation in LLMs", 2025 (the bias of
        renormalised top-k teachers).
    """
    fn = "topk_distillation_loss"
    options = _options(fn, beta, temperature, ignore_index, reduction, weight_hard_loss, weight_soft_loss, target)
    _check_logits(student_logits, "student_logits", fn)
    if teacher_topk_ids.is_floating_point() or teacher_topk_ids.is_complex() or teacher_topk_ids.dtype == torch.bool:
        raise TypeError(f"{fn}: teacher_topk_ids must be an integer tensor of token ids; got {teacher_topk_ids.dtype}")
    check_floating(teacher_topk_logps, "teacher_topk_logps", fn)
    rows_shape, num_classes = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if teacher_topk_ids.dim() != len(rows_shape) + 1 or tuple(teacher_topk_ids.shape[:-1]) != rows_shape:
        raise ValueError(f"{fn}: teacher_topk_ids shape {tuple(teacher_topk_ids.shape)} must be [..., k] with "
                         f"student_logits' leading dimensions {rows_shape}")
    if teacher_topk_logps.shape != teacher_topk_ids.shape:
        raise ValueError(f"{fn}: teacher_topk_logps shape {tuple(teacher_topk_logps.shape)} must equal "
                         f"teacher_topk_ids shape {tuple(teacher_topk_ids.shape)}")
    k = teacher_topk_ids.shape[-1]
    if k > num_classes:
        raise ValueError(f"{fn}: teacher_topk_ids has k = {k} ids per position, more than the {num_classes} classes")
    targets = _targets(target, rows_shape, num_classes, ignore_index, tuple(student_logits.shape), fn)
    valid = None if targets is None else targets.valid_or_none
    ids = teacher_topk_ids.reshape(-1, k).long()
    logps = teacher_topk_logps.reshape(-1, k)
    _check_topk(ids, logps, valid, num_classes, fn)

    compute, out = result_dtypes(student_logits, teacher_topk_logps)

    def reference(s: Tensor) -> Tensor:
        """The composed loss (the oracle of the fused path and its double-backward replay)."""
        rows = _topk_rows(s.reshape(-1, num_classes).to(compute), ids, logps, targets, valid, options)
        return _finish(rows, valid, options, rows_shape, out)

    # The fused pass makes the student's gradient only: log-probabilities that want one
    # take the composed path.
    if (student_logits.numel() > 0 and not (teacher_topk_logps.requires_grad and torch.is_grad_enabled())
            and fused_may_serve(student_logits, teacher_topk_logps)):
        student = student_logits if student_logits.dim() == 2 else student_logits.reshape(-1, num_classes)
        loss = fused_topk_distillation(
            student, ids, logps, None if targets is None else targets.safe(), valid, options=options,
            replay=Replay(fn, reference, [student_logits]),
        )
        return loss.reshape(rows_shape) if options.reduction == "none" and len(rows_shape) != 1 else loss
    return reference(student_logits)


def _topk_rows(student: Tensor, ids: Tensor, logps: Tensor, targets: ClassTargets | None, valid: Tensor | None,
               options: DistillationOptions) -> Tensor:
    """Per-token loss of flat (N, V) logits in the compute dtype: the composed reference."""
    k, temperature = ids.shape[-1], options.temperature
    student = _masked(student, valid)
    # Ignored positions read as: ids 0..k-1 (distinct, in range), no teacher mass on them.
    if valid is not None:
        ids = torch.where(valid.unsqueeze(-1), ids, torch.arange(k, device=ids.device))
    log_p_top = _masked(logps.to(student.dtype), valid, -math.inf)
    # The teacher's tail: 1 - sum p, as -expm1(logsumexp) (exact when the top-k hold
    # little mass); clamped at 0, since rounding can take the sum a little above 1.
    log_p_rest = _safe_log((-torch.expm1(_safe_logsumexp(log_p_top))).clamp_min(0.0))
    log_q = log_softmax(student if temperature == 1.0 else student / temperature, -1)
    # An entry of log-probability -inf is padding: its token stays in the rest bucket.
    present = log_p_top > -math.inf
    gathered = log_q.gather(-1, ids)
    log_q_top = torch.where(present, gathered, -math.inf)
    # The student's tail: the log-sum-exp of its classes outside the (present) top-k,
    # never 1 - sum q, which loses all precision when the top-k hold nearly all the mass.
    log_q_rest = _safe_logsumexp(log_q.scatter(-1, ids, torch.where(present, -math.inf, gathered)))
    log_p = torch.cat([log_p_top, log_p_rest.unsqueeze(-1)], -1)
    log_q_buckets = torch.cat([log_q_top, log_q_rest.unsqueeze(-1)], -1)
    soft = divergence_rows(log_q_buckets, log_p, options.beta)
    return _combine(soft, _hard_rows(student, targets, options), valid, options)
