"""The embedding losses, fused: triplet_margin (the p-norm distance) and cosine_embedding.

Each forward forms, row by row, the loss and the gradient of every differentiable input,
written out; backward only scales them by grad_output (:class:`FusedOp`). Per row of
``[N, D]`` inputs, with k = 1 / N for 'mean', else 1, and h = k where the hinge's argument
is >= 0 (torch's clamp_min passes the gradient at a tie), else 0:

triplet_margin, d(u, v) = ||u - v + eps||_p (torch's pairwise_distance), s(u, v) its
gradient with respect to u (minus it with respect to v):

    z = margin + d(a, p) - d(a, n)                   loss = max(z, 0)
    p = 2         s = (u - v + eps) / d              (0 where d = 0, as torch's norm backward)
    p = 1         s = sign(u - v + eps)
    1 < p < inf   s = sign(x) |x|^(p - 1) / d^(p - 1), x = u - v + eps  (0 where d = 0)
    dp = -h s_ap      dn = h s_an      da = h (s_ap - s_an) = -(dp + dn)

where all three want a gradient, in one dtype, forward makes dp and dn only and backward
forms da = -(dp + dn) from them once scaled by grad_output (FusedOp's ``derives_first``;
at grad_output 1 in float32 the same bits as h s_ap - h s_an): the node keeps two ``[N, D]``
gradients, as torch keeps its two distances' differences. In a half type da then carries
the roundings of dp and dn (each rounded once from float32) and of their sum, as torch's
own half-type da does, the sum of its two half-type gradients (FusedOp.derives). Where
fewer than three want a gradient, forward makes da = h s_ap - h s_an itself.

With swap, d(a, n) becomes min(d(a, n), d(p, n)), whose gradient goes to the smaller of the
two (half to each at a tie, as torch's minimum): with w_an + w_pn = 1 those weights,

    da = h (s_ap - w_an s_an)   dp = -h (s_ap + w_pn s_pn)   dn = h (w_an s_an + w_pn s_pn)

all three made in forward (torch keeps three differences then; -(dp + dn) would cancel
the s_pn terms in rounding).

(s_pn: the gradient of d(p, n) with respect to p). Other p (0, < 1, inf) keep the composed
form.

cosine_embedding, with torch's eps = 1e-12, m1 = |x1|^2 + eps, m2 = |x2|^2 + eps,
q = sqrt(m1 m2), c = x1.x2 / q:

    loss = 1 - c where y = 1, max(c - margin, 0) where y = -1, else 0
    g = -k where y = 1, k where y = -1 and c - margin >= 0, else 0
    dx1 = g (x2 / q - c x1 / m1)       dx2 = g (x1 / q - c x2 / m2)

margin_ranking and hinge_embedding, element-wise (k = 1 / the number of elements for 'mean'):

    ranking   z = (x2 - x1) y + margin, loss = max(z, 0)
              m = k where z >= 0, else 0;  dx1 = -y m   dx2 = y m   dy = (x2 - x1) m
    hinge     loss = max(margin - x, 0) where y != 1, plus x where y != -1
              dx = k [y != -1] - k [y != 1 and margin - x >= 0]

The half types are computed in float32 (the loss and the gradients rounded once), float32
and float64 in their own dtype. The compiled form (``losskit._native``'s
fused_triplet_margin and fused_cosine_embedding, src/embedding.cpp) runs :func:`_triplet_rows`
/ :func:`_cosine_rows` op for op on blocks of rows, so that a block's float32 temporaries
stay in cache and the inputs are read and the gradients written once from memory; every
op is row-wise (the norms and sums reduce each row on its own, in an order that does not
depend on the other rows), so the blocks give the same bits as this whole-tensor form
(rows longer than ATen's grain, which a lone row's reduction would split across threads,
keep this form). Eager calls that want a gradient only: under torch.compile inductor fuses
the composed form, and without a gradient the composed form costs no more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._core import switches
from .._core.dtypes import cast, result_dtypes
from .._core.reduction import reduce_loss
from .fused_op import compiling, fused_may_serve, FusedOp, native_module, remembered_options, Replay

# Rows longer than this leave a lone row's reduction to ATen's threads (a different
# summation order), which the compiled blocks would not follow: ATen's GRAIN_SIZE.
_LONGEST_ROW = 32767


@dataclass(frozen=True)
class TripletOptions:
    """margin > 0; p: the norm's degree (1 <= p < inf); eps: added to u - v; swap: the
    harder of d(a, n) and d(p, n); reduction: 'mean', 'sum' or 'none'."""

    margin: float
    p: float
    eps: float
    swap: bool
    reduction: str


@dataclass(frozen=True)
class ElementOptions:
    """margin_ranking's or hinge_embedding's margin; reduction: 'mean', 'sum' or 'none'."""

    margin: float
    reduction: str


@dataclass(frozen=True)
class CosineOptions:
    """margin: subtracted from the cosine where y = -1; reduction: 'mean', 'sum' or 'none'."""

    margin: float
    reduction: str


def fused_embedding_applies(*tensors: Tensor) -> bool:
    """Eager calls that want a first-order gradient of one of ``tensors`` (the
    differentiable inputs), all floating ``[N, D]`` of one shape with N >= 1 and
    1 <= D <= ATen's grain (see the module docstring)."""
    first = tensors[0]
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and first.dim() == 2
        and first.shape[0] > 0
        and 0 < first.shape[1] <= _LONGEST_ROW
        and all(t.dtype.is_floating_point and t.shape == first.shape for t in tensors)
        and not compiling()
        and fused_may_serve(*tensors)
    )


def triplet_p_served(p: float) -> bool:
    """The norms whose gradient the fused triplet writes out: 1 <= p < inf."""
    return 1.0 <= p < float("inf")


def triplet_options(margin: float, p: float, eps: float, swap: bool, reduction: str) -> TripletOptions:
    return remembered_options(TripletOptions, float(margin), float(p), float(eps), swap, reduction)


def cosine_options(margin: float, reduction: str) -> CosineOptions:
    return remembered_options(CosineOptions, float(margin), reduction)


def element_options(margin: float, reduction: str) -> ElementOptions:
    return remembered_options(ElementOptions, float(margin), reduction)


def fused_elements_apply(differentiable: tuple[Tensor, ...], others: tuple[Tensor, ...] = ()) -> bool:
    """Eager calls that want a first-order gradient of one of ``differentiable``, all floating
    and non-empty, of one shape with ``others``."""
    first = differentiable[0]
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in differentiable)
        and first.numel() > 0
        and all(t.dtype.is_floating_point and t.shape == first.shape for t in differentiable)
        and all(t.shape == first.shape for t in others)
        and not compiling()
        and fused_may_serve(*differentiable)
    )


def _eager_call(op: FusedOp, tensors: tuple[Tensor, ...], options, replay: Replay) -> Tensor:
    """An eager call of functional/margin.py that wants a gradient: the compiled forward
    (``op.native_forward``, embedding.cpp) with FusedOp's C++ node where they serve it, else
    FusedOp's own call. That call does the same, with the generality these calls do not need
    (compiling, no gradient, extras): about 9 microseconds more, measured on margin_ranking
    at a batch of 64 (125 us against 116 us, of a 290 us forward and backward)."""
    native = native_module() if switches.native_enabled() else None
    if native is not None:
        inputs = tensors[: op.n_diff]
        # Grad mode is on (fused_embedding_applies, fused_elements_apply): a tensor wants a
        # gradient exactly when it requires one, FusedOp's rule.
        needs = [t.requires_grad for t in inputs]
        derived = op.derives(tensors, options, needs)
        if derived:
            needs[0] = False  # formed in backward from the others (FusedOp.derives)
        made = getattr(native, op.native_forward)(*tensors, *[getattr(options, f) for f in op.option_names], needs)
        if made is not None:
            loss, *grads = made
            return op.attach(native, loss, inputs, grads, options.reduction == "none", replay, derived)
    return op(*tensors, options=options, replay=replay)


def fused_triplet_call(anchor: Tensor, positive: Tensor, negative: Tensor, options: TripletOptions,
                       replay: Replay) -> Tensor:
    """The fused loss of a call :func:`fused_embedding_applies` accepts (with :func:`triplet_p_served`)."""
    return _eager_call(fused_triplet, (anchor, positive, negative), options, replay)


def fused_cosine_call(input1: Tensor, input2: Tensor, target: Tensor, options: CosineOptions,
                      replay: Replay) -> Tensor:
    """As :func:`fused_triplet_call`, for cosine_embedding_loss (target ``[N]``)."""
    return _eager_call(fused_cosine, (input1, input2, target), options, replay)


def fused_ranking_call(input1: Tensor, input2: Tensor, target: Tensor, options: ElementOptions,
                       replay: Replay) -> Tensor:
    """As :func:`fused_triplet_call`, for margin_ranking_loss (all three of one shape)."""
    return _eager_call(fused_ranking, (input1, input2, target), options, replay)


def fused_hinge_embedding_call(input: Tensor, target: Tensor, options: ElementOptions, replay: Replay) -> Tensor:
    """As :func:`fused_triplet_call`, for hinge_embedding_loss (input and target of one shape)."""
    return _eager_call(fused_hinge_embedding, (input, target), options, replay)


def _scale(reduction: str, rows: int) -> float:
    """k: 1 / N for 'mean', else 1 (backward multiplies by grad_output, per row for 'none')."""
    return 1.0 / rows if reduction == "mean" else 1.0


def _distance(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """(||x||_p per row, the per-row factor c of the norm's gradient s = c * f(x)): 1 / d for
    p = 2, 1 / d^(p - 1) otherwise (0 where d = 0, as torch's norm backward), 1 for p = 1."""
    d = torch.linalg.vector_norm(x, p, -1)
    if p == 1.0:
        return d, torch.ones_like(d)
    c = d.reciprocal() if p == 2.0 else d.pow(p - 1).reciprocal_()
    return d, c.masked_fill_(d == 0, 0.0)


def _direction(x: Tensor, p: float) -> Tensor:
    """f(x), in place of x where it can be: x (p = 2), sign(x) (p = 1), sign(x) |x|^(p - 1)."""
    if p == 2.0:
        return x
    if p == 1.0:
        return x.sign_()
    return x.sign().mul_(x.abs_().pow_(p - 1))


def _triplet_rows(a: Tensor, pos: Tensor, neg: Tensor, options: TripletOptions, k: float,
                  needs: tuple[bool, ...]) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(the per-row loss, da, dp, dn) of rows in the compute dtype (see the module docstring);
    the compiled form runs this op for op on each block of rows."""
    p, eps = options.p, options.eps
    x_ap = torch.sub(a, pos).add_(eps)  # torch's order: u - v, then + eps
    x_an = torch.sub(a, neg).add_(eps)
    d_ap, c_ap = _distance(x_ap, p)
    d_an, c_an = _distance(x_an, p)
    if options.swap:
        x_pn = torch.sub(pos, neg).add_(eps)
        d_pn, c_pn = _distance(x_pn, p)
        z = torch.add(d_ap, options.margin).sub_(torch.minimum(d_an, d_pn))
    else:
        z = torch.add(d_ap, options.margin).sub_(d_an)
    loss = z.clamp_min(0)
    if not any(needs):
        return loss, None, None, None
    h = z.ge(0).to(z.dtype)
    if k != 1.0:
        h.mul_(k)
    c_ap.mul_(h)
    c_an.mul_(h)
    if options.swap:
        # torch's minimum backward: all to the smaller, half to each at a tie (NaN: to both)
        tie = d_an.eq(d_pn).to(z.dtype).mul_(-0.5).add_(1)
        c_pn.mul_(h).mul_(tie.masked_fill(d_an.lt(d_pn), 0.0))
        c_an.mul_(tie.masked_fill_(d_an.gt(d_pn), 0.0))
    # Without da (formed in backward, or not wanted) and without swap, dp = -h s_ap comes
    # from the factor negated per row: x (-c) is -(x c) exactly, a pass over the block saved.
    negated = not options.swap and not needs[0]
    if negated:
        c_ap.neg_()
    u = _direction(x_ap, p).mul_(c_ap.unsqueeze(1))
    v = _direction(x_an, p).mul_(c_an.unsqueeze(1))
    t = _direction(x_pn, p).mul_(c_pn.unsqueeze(1)) if options.swap else None
    da = torch.sub(u, v) if needs[0] else None
    dn = (v if t is None else v.add_(t)) if needs[2] else None
    dp = (u if negated else u.neg_() if t is None else u.add_(t).neg_()) if needs[1] else None
    return loss, da, dp, dn


def triplet_forward(anchor: Tensor, positive: Tensor, negative: Tensor, *, options: TripletOptions,
                    needs: tuple[bool, ...]) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """(the loss reduced, (d/d anchor, d/d positive, d/d negative)), in the inputs' dtypes."""
    compute, out = result_dtypes(anchor, positive, negative)
    loss, *grads = _triplet_rows(cast(anchor, compute), cast(positive, compute), cast(negative, compute), options,
                                 _scale(options.reduction, anchor.shape[0]), needs)
    grads = [None if g is None else cast(g, t.dtype) for g, t in zip(grads, (anchor, positive, negative))]
    return cast(reduce_loss(loss, options.reduction), out), tuple(grads)


def _cosine_rows(x1: Tensor, x2: Tensor, target: Tensor, options: CosineOptions, k: float,
                 needs: tuple[bool, ...]) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(the per-row loss, dx1, dx2) of rows in the compute dtype (see the module docstring);
    the compiled form runs this op for op on each block of rows."""
    epsilon = 1e-12  # torch's
    dot = torch.mul(x1, x2).sum(-1)
    m1 = torch.mul(x1, x1).sum(-1).add_(epsilon)
    m2 = torch.mul(x2, x2).sum(-1).add_(epsilon)
    q = torch.mul(m1, m2).sqrt_()
    cos = dot.div_(q)
    positive, negative = target.eq(1), target.eq(-1)
    shifted = torch.sub(cos, options.margin)
    loss = torch.where(positive, torch.rsub(cos, 1), 0.0).add_(torch.where(negative, shifted.clamp_min(0), 0.0))
    if not any(needs):
        return loss, None, None
    g = shifted.ge_(0).logical_and_(negative).to(cos.dtype).sub_(positive.to(cos.dtype))
    if k != 1.0:
        g.mul_(k)
    gc = torch.mul(g, cos)
    alpha = g.div_(q).unsqueeze(1)
    dx1 = torch.mul(x2, alpha).addcmul_(x1, gc.div(m1).unsqueeze(1), value=-1) if needs[0] else None
    dx2 = torch.mul(x1, alpha).addcmul_(x2, gc.div_(m2).unsqueeze(1), value=-1) if needs[1] else None
    return loss, dx1, dx2


def cosine_forward(input1: Tensor, input2: Tensor, target: Tensor, *, options: CosineOptions,
                   needs: tuple[bool, ...]) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """(the loss reduced, (d/d input1, d/d input2)), in the inputs' dtypes."""
    compute, out = result_dtypes(input1, input2)
    loss, *grads = _cosine_rows(cast(input1, compute), cast(input2, compute), target, options,
                                _scale(options.reduction, input1.shape[0]), needs)
    grads = [None if g is None else cast(g, t.dtype) for g, t in zip(grads, (input1, input2))]
    return cast(reduce_loss(loss, options.reduction), out), tuple(grads)


def _ranking_elements(x1: Tensor, x2: Tensor, y: Tensor, options: ElementOptions, k: float,
                      needs: tuple[bool, ...]) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(the element-wise loss, dx1, dx2, dy) in the compute dtype; the composed form's loss
    ops (functional/margin.py), the compiled form's op for op on each block."""
    e = torch.sub(x2, x1)  # (x2 - x1) y is -y (x1 - x2) exactly
    z = torch.mul(e, y).add_(options.margin)
    loss = z.clamp_min(0)
    if not any(needs):
        return loss, None, None, None
    m = z.ge_(0)  # 1 where the hinge is open, tie included (clamp_min's gradient), else 0
    if k != 1.0:
        m.mul_(k)
    g2 = torch.mul(y, m) if needs[0] or needs[1] else None
    g1 = g2.neg() if needs[0] else None
    gy = e.mul_(m) if needs[2] else None
    return loss, g1, g2 if needs[1] else None, gy


def ranking_forward(input1: Tensor, input2: Tensor, target: Tensor, *, options: ElementOptions,
                    needs: tuple[bool, ...]) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """(the loss reduced, (d/d input1, d/d input2, d/d target)), in the inputs' dtypes."""
    compute, out = result_dtypes(input1, input2, target)
    loss, *grads = _ranking_elements(cast(input1, compute), cast(input2, compute), cast(target, compute), options,
                                     _scale(options.reduction, input1.numel()), needs)
    grads = [None if g is None else cast(g, t.dtype) for g, t in zip(grads, (input1, input2, target))]
    return cast(reduce_loss(loss, options.reduction), out), tuple(grads)


def _hinge_elements(x: Tensor, target: Tensor, options: ElementOptions, k: float,
                    needs: tuple[bool, ...]) -> tuple[Tensor, Tensor | None]:
    """(the element-wise loss, dx) in the compute dtype; the composed form's loss ops."""
    not_positive, not_negative = target.ne(1), target.ne(-1)
    gap = torch.rsub(x, options.margin)
    loss = torch.where(not_positive, gap.clamp_min(0), 0.0).add_(torch.where(not_negative, x, 0.0))
    if not needs[0]:
        return loss, None
    g = not_negative.to(x.dtype).sub_(gap.ge_(0).logical_and_(not_positive))
    return loss, g if k == 1.0 else g.mul_(k)


def hinge_embedding_forward(input: Tensor, target: Tensor, *, options: ElementOptions,
                  needs: tuple[bool, ...]) -> tuple[Tensor, tuple[Tensor | None]]:
    """(the loss reduced, (d/d input,)), in the input's dtype."""
    compute, out = result_dtypes(input)
    loss, grad = _hinge_elements(cast(input, compute), target, options, _scale(options.reduction, input.numel()),
                                 needs)
    return cast(reduce_loss(loss, options.reduction), out), (None if grad is None else cast(grad, input.dtype),)


fused_ranking = FusedOp(
    "margin_ranking",
    tensors=("input1", "input2", "target"),
    differentiable=3,
    options=ElementOptions,
    forward=ranking_forward,
    unreduced="elements",
    native_forward="fused_margin_ranking",
)

fused_hinge_embedding = FusedOp(
    "hinge_embedding",
    tensors=("input", "target"),
    differentiable=1,
    options=ElementOptions,
    forward=hinge_embedding_forward,
    unreduced="elements",
    native_forward="fused_hinge_embedding",
)

fused_triplet = FusedOp(
    "triplet_margin",
    tensors=("anchor", "positive", "negative"),
    differentiable=3,
    options=TripletOptions,
    forward=triplet_forward,
    unreduced="rows",
    native_forward="fused_triplet_margin",
    # Without swap, da = -(dp + dn) (module docstring): formed in backward where all three
    # want a gradient, so the node keeps two gradients, as torch keeps two differences.
    derives_first=lambda options: not options.swap,
)

fused_cosine = FusedOp(
    "cosine_embedding",
    tensors=("input1", "input2", "target"),
    differentiable=2,
    options=CosineOptions,
    forward=cosine_forward,
    unreduced="rows",
    native_forward="fused_cosine_embedding",
)
