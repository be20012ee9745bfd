"""Per-token log-probabilities and entropy of a linear layer's softmax, without the logits.

For a token row x (H,), the output layer W (C, H), bias b and temperature T, the
distribution is p = softmax(z) with z = (W x + b) / T. For its target y:

    log p_y = z_y - lse,            lse = log sum_c exp z_c
    H       = -sum_c p_c log p_c    (the entropy, in nats)

and for upstream gradients g (of log p_y) and h (of H), per row:

    dz_c = g ([c = y] - p_c) - h p_c (log p_c + H)
    dx   = dz W / T,   dW += (dz / T)^T x,   db += sum over rows of dz / T

Accuracy. With m = max_c z_c at column a (the argmax) and e_c = exp(z_c - m) <= 1, each
row keeps ``rest = sum_{c != a} e_c``: the sum without the argmax's exact 1, so that

    lse - m = log1p(rest)                 exact even when rest << 1 (a confident row)
    log p_y = (z_y - m) - log1p(rest)     two terms of one sign: no cancellation
    1 - p_y = others / (1 + rest),        others = sum_{c != y} e_c: rest when y = a, else
                                          1 + (rest - e_y) (then 1 - p_y >= 1/2)
    H       = log1p(rest) + s / (1 + rest),   s = sum_c e_c (m - z_c) >= 0

so no term is a difference of nearly equal numbers. The gradient's target column
g (1 - p_y) - h p_y (log p_y + H) is written from ``1 - p_y`` above, never as 1 - softmax:
at p_y = 0.9999, 1 + (many tiny terms) summed in float32 loses about 1e-4 of 1 - p_y's
magnitude relative to the total, some 10% of 1 - p_y itself (torch's log_softmax
backward has that error). Everything is computed, and the weight gradient accumulated, in
float32 (float64 for float64 inputs); each result is rounded once into the output dtype.

Memory. Logits exist one chunk of rows at a time: forward computes each chunk's logits,
its per-row statistics (m, log1p(rest), H, 1 - p_y, log p_y: five numbers per token,
kept for backward) and drops the chunk; backward recomputes each chunk's logits from the
saved input and weight (one matmul), turns them into dz in place and accumulates the
three gradients. Nothing logits-sized is kept between forward and backward, so a second
backward through a retained graph recomputes the same bits. A backward that must itself
be differentiable (``create_graph=True``: double backward, Hessian-vector products)
differentiates the composed torch ops on the whole logits instead.

Batch invariance (``batch_invariant=True``). A token's log-prob, entropy and input
gradient are then bitwise the same alone, in any batch and with any ``chunk_size``: every
matmul that makes a row's numbers (the logits, dz W) runs on blocks of exactly BLOCK_ROWS
rows (the last block padded with zero rows), so the BLAS picks one kernel whatever the
batch (it picks by the row count: a lone row goes to gemv, a few rows to other kernels
than many); the per-row reductions (max, sums) run over whole rows, in one thread per
row, as torch reduces an inner dimension of two or more rows. It is not the default: on
2 CPU cores (N=512 rows, H=512, C=32768) the logits' matmul took 1.94 s in one call and
2.14 s in 256-row blocks (2.65 s in 128-row blocks), dz W 1.69 s against 1.95 s, more
than the 5% that invariance may cost by default. Either way two identical calls are
bitwise identical, the weight's gradient included (its sum over rows is taken in a fixed
chunk order).

The math on a chunk runs with torch ops on any device, or with the Triton kernels of
:mod:`losskit.kernels.triton_log_probs` where Triton serves the tensors (CUDA). The op is a
custom op ``losskit::linear_log_probs`` (and ``_backward``), so torch.compile holds it as
one node; the vocabulary-parallel form (:mod:`losskit.distributed.vocab_parallel_log_probs`)
shares every function here, with its collectives inside its own op.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from .._core.dtypes import result_dtypes
from . import matmul, triton_support
from .linear_cross_entropy import auto_chunk_rows

# Rows per matmul under batch_invariant=True: fixed, so that a row's logits never depend on
# the rows beside it, and large, since a matmul of few rows reads the whole weight for
# little work (the costs are in the module docstring).
BLOCK_ROWS = 256

# The per-row statistics kept for backward, in this order (a (5, N) tensor).
STATS = ("row_max", "log_total", "entropy", "one_minus_p", "log_p")


def chunk_rows(num_classes: int, in_features: int, chunk_size: int | None, batch_invariant: bool) -> int:
    """Rows of logits formed at a time: ``chunk_size`` (by default half of linear
    cross-entropy's, since two chunk buffers live at once: the logits and their
    exponentials), rounded up to whole matmul blocks under ``batch_invariant``."""
    rows = chunk_size if chunk_size is not None else max(16, auto_chunk_rows(num_classes, in_features) // 2)
    return _round_up(rows, BLOCK_ROWS) if batch_invariant else rows


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block if block else n


class LocalStats(NamedTuple):
    """What a row's classes (all of them, or one rank's slice) say about it, relative to
    their own maximum: m, rest = sum of exp(z - m) without the argmax's 1, s = sum of
    exp(z - m) (m - z), the raw target logit (0 where not held) and whether the target is
    the argmax. Each (N,); ``target_is_max`` in the compute dtype (1.0 or 0.0)."""

    row_max: Tensor
    rest: Tensor
    spread: Tensor
    z_target: Tensor
    target_is_max: Tensor


class RowStats(NamedTuple):
    """The per-row results of the whole distribution, each (N,)."""

    row_max: Tensor
    log_total: Tensor  # lse - m = log1p(rest)
    entropy: Tensor
    one_minus_p: Tensor
    log_p: Tensor

    def stacked(self) -> Tensor:
        return torch.stack(list(self))


def finish(local: LocalStats) -> RowStats:
    """The distribution's row results from its (combined) statistics (module docstring)."""
    m, rest, s, z_y, is_max = local
    total = 1.0 + rest
    log_total = torch.log1p(rest)
    d_y = z_y - m  # exactly 0 when the target is the argmax
    e_y = torch.exp(d_y)
    others = torch.where(is_max != 0, rest, (rest - e_y) + 1.0)
    return RowStats(m, log_total, log_total + s / total, others / total, d_y - log_total)


# ---- the row math on one chunk of logits (torch ops; Triton where it serves) -----------------
def local_stats(z: Tensor, index: Tensor, held: Tensor, spare: Tensor) -> LocalStats:
    """The statistics of a chunk of transformed logits ``z`` (P, C_local), a buffer the
    caller owns (overwritten); ``spare`` is a second buffer of its shape. ``index`` (P,)
    is each row's target column among these classes (0 where not ``held``)."""
    if triton_support.serves(z):
        from .triton_log_probs import local_stats_rows

        return local_stats_rows(z, index, held)
    if z.shape[1] == 0:  # a rank that holds no classes
        zeros = z.new_zeros(z.shape[0])
        return LocalStats(z.new_full((z.shape[0],), -math.inf), zeros, zeros, zeros, zeros)
    m, arg = z.max(dim=1)
    z_y = torch.where(held, z.gather(1, index.unsqueeze(1)).squeeze(1), 0.0)
    d = z.sub_(m.unsqueeze(1))
    e = torch.exp(d, out=spare)
    e.scatter_(1, arg.unsqueeze(1), 0.0)  # the argmax's exp(0) = 1 is counted apart
    rest = e.sum(dim=1)
    spread = d.mul_(e).sum(dim=1).neg_()  # sum e (m - z), every term >= 0
    return LocalStats(m, rest, spread, z_y, (held & (arg == index)).to(z.dtype))


def chunk_gradient(z: Tensor, stats: RowStats, g: Tensor, h: Tensor | None, index: Tensor, held: Tensor,
                   spare: Tensor) -> Tensor:
    """dz, written over ``z`` (P, C_local transformed logits), for per-row upstream factors
    ``g`` (of log p_y) and ``h`` (of the entropy, None when it has none), both already
    times 1/T and 0 on rows that count for nothing."""
    if triton_support.serves(z):
        from .triton_log_probs import gradient_rows

        return gradient_rows(z, stats, g, h, index, held)
    if z.shape[1] == 0:
        return z
    log_p = z.sub_(stats.row_max.unsqueeze(1)).sub_(stats.log_total.unsqueeze(1))
    if h is None:
        dz = log_p.exp_().mul_(g.neg().unsqueeze(1))
    else:
        p = torch.exp(log_p, out=spare)
        dz = log_p.add_(stats.entropy.unsqueeze(1)).mul_(h.unsqueeze(1)).add_(g.unsqueeze(1)).mul_(p).neg_()
    # The target column from 1 - p_y, not from 1 - softmax (module docstring).
    target = g * stats.one_minus_p
    if h is not None:
        target = target - h * torch.exp(stats.log_p) * (stats.log_p + stats.entropy)
    column = index.unsqueeze(1)
    dz.scatter_(1, column, torch.where(held, target, dz.gather(1, column).squeeze(1)).unsqueeze(1))
    return dz


# ---- chunks of logits, in fixed row blocks ---------------------------------------------------
class Chunk(NamedTuple):
    rows: slice  # the real rows
    padded: int  # rows in the buffers: whole blocks under batch invariance, else the real rows
    z: Tensor  # (padded, C) transformed logits
    spare: Tensor  # (padded, C)


class _Blocks:
    """Matmuls of a chunk of rows: one call, or (``block`` > 0) calls on blocks of exactly
    ``block`` rows, a short last block padded with zero rows, its result read back."""

    def __init__(self, block: int, like: Tensor) -> None:
        self.block, self.like = block, like
        self.buffers: dict[tuple[str, int], Tensor] = {}

    def _buffer(self, role: str, columns: int, dtype: torch.dtype) -> Tensor:
        if (role, columns, dtype) not in self.buffers:
            self.buffers[role, columns, dtype] = self.like.new_empty(self.block, columns, dtype=dtype)
        return self.buffers[role, columns, dtype]

    def mm(self, a: Tensor, b: Tensor, out: Tensor, bias: Tensor | None = None) -> None:
        """out[:len(a)] = a b (+ bias); with blocks, ``out`` may have rows past ``a``'s:
        they receive the padding rows' results."""
        n = a.shape[0]
        if not self.block:
            _mm(a, b, out[:n], bias)
            return
        for start in range(0, n, self.block):
            part = a[start: start + self.block]
            count = part.shape[0]
            if count == self.block:
                _mm(part, b, out[start: start + count], bias)
                continue
            padded = self._buffer("in", a.shape[1], a.dtype)
            padded[:count] = part
            padded[count:] = 0.0
            if out.shape[0] >= start + self.block:
                _mm(padded, b, out[start: start + self.block], bias)
            else:
                result = self._buffer("out", b.shape[1], out.dtype)
                _mm(padded, b, result, bias)
                out[start: start + count] = result[:count]


def _mm(a: Tensor, b: Tensor, out: Tensor, bias: Tensor | None) -> None:
    if a.dtype != out.dtype:  # the tensor-core path: half operands, float32 logits
        matmul.mm_float32(a, b, out=out)
        if bias is not None:
            out.add_(bias)
        return
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


def chunks(x: Tensor, w: Tensor, b: Tensor | None, rows_per_chunk: int, temperature: float,
           blocks: _Blocks) -> Iterator[Chunk]:
    """Each chunk's transformed logits (x W^T + b) / T in a reused buffer, with a spare."""
    n, num_classes = x.shape[0], w.shape[0]
    size = min(rows_per_chunk, _round_up(n, blocks.block))
    compute = compute_dtype(x)
    buffer, spare = x.new_empty(size, num_classes, dtype=compute), x.new_empty(size, num_classes, dtype=compute)
    w_t = w.t()
    for start in range(0, n, size):
        rows = slice(start, min(start + size, n))
        padded = _round_up(rows.stop - start, blocks.block)
        z = buffer[:padded]
        blocks.mm(x[rows], w_t, z, b)
        if temperature != 1.0:
            # A division, not a multiplication by 1 / T: bit for bit what logits / T gives.
            z.div_(temperature)
        yield Chunk(rows, padded, z, spare[:padded])


def _padded(t: Tensor, size: int, fill: float | int | bool = 0) -> Tensor:
    """A (N,) row vector's chunk extended to ``size`` rows (the padding rows count for nothing)."""
    if t.shape[0] == size:
        return t
    return torch.cat([t, t.new_full((size - t.shape[0],), fill)])


def _rows_of(stats: RowStats, rows: slice, size: int) -> RowStats:
    return RowStats(*(_padded(s[rows], size) for s in stats))


# ---- forward and backward, single process or one rank of many --------------------------------
Combine = Callable[[LocalStats], LocalStats]


def forward_stats(x: Tensor, w: Tensor, b: Tensor | None, index: Tensor, held: Tensor, temperature: float,
                  rows_per_chunk: int, batch_invariant: bool, combine: Combine | None = None) -> RowStats:
    """Every row's statistics, chunk by chunk; ``combine`` merges the ranks' (vocab-parallel)."""
    n = x.shape[0]
    parts = [x.new_empty(n, dtype=compute_dtype(x)) for _ in LocalStats._fields]
    blocks = _Blocks(BLOCK_ROWS if batch_invariant else 0, x)
    for chunk in chunks(x, w, b, rows_per_chunk, temperature, blocks):
        rows, p = chunk.rows, chunk.padded
        local = local_stats(chunk.z, _padded(index[rows], p), _padded(held[rows], p, False), chunk.spare)
        for part, value in zip(parts, local):
            part[rows] = value[: rows.stop - rows.start]
    local = LocalStats(*parts)
    return finish(combine(local) if combine is not None else local)


def backward_grads(x: Tensor, w: Tensor, b: Tensor | None, index: Tensor, held: Tensor, stats: RowStats,
                   g: Tensor, h: Tensor | None, temperature: float, rows_per_chunk: int, batch_invariant: bool,
                   needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_x, grad_w, grad_b) in the compute dtype, each chunk's logits recomputed; ``g`` and
    ``h`` (N,) are the upstream gradients times 1/T, 0 where a row counts for nothing."""
    acc = compute_dtype(x)  # the weight's and bias's gradients sum chunks: float32 on the tensor-core path too
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if needs[0] else None
    grad_w = torch.zeros_like(w, dtype=acc, memory_format=torch.contiguous_format) if needs[1] else None
    grad_b = torch.zeros_like(b, dtype=acc) if needs[2] and b is not None else None
    blocks = _Blocks(BLOCK_ROWS if batch_invariant else 0, x)
    for chunk in chunks(x, w, b, rows_per_chunk, temperature, blocks):
        rows, p = chunk.rows, chunk.padded
        count = rows.stop - rows.start
        dz = chunk_gradient(chunk.z, _rows_of(stats, rows, p), _padded(g[rows], p),
                            None if h is None else _padded(h[rows], p), _padded(index[rows], p),
                            _padded(held[rows], p, False), chunk.spare)
        # On the tensor-core path dz is float32 and is rounded once to the operands' dtype.
        dz_rows = dz[:count] if dz.dtype == x.dtype else dz[:count].to(x.dtype)
        if grad_x is not None:
            blocks.mm(dz_rows, w, grad_x[rows])  # in the same blocks as the logits
        if grad_w is not None:
            if dz_rows.dtype == grad_w.dtype:
                grad_w.addmm_(dz_rows.t(), x[rows])
            else:
                matmul.addmm_float32_(grad_w, dz_rows.t(), x[rows])
        if grad_b is not None:
            grad_b.add_(dz[:count].sum(dim=0))
    return grad_x, grad_w, grad_b


def upstream(grad_log_p: Tensor | None, grad_entropy: Tensor | None, valid: Tensor | None, n: int, like: Tensor,
             temperature: float, with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """The per-row factors g, h of :func:`backward_grads`: the upstream gradients (zeros
    where None) in the compute dtype, times 1/T, 0 where the row is ignored (so that a
    nan or inf upstream on a padding token does not leak into the weight's gradient)."""
    g = like.new_zeros(n) if grad_log_p is None else grad_log_p.reshape(-1).to(like.dtype)
    h = None
    if with_entropy and grad_entropy is not None:
        h = grad_entropy.reshape(-1).to(like.dtype)
    if valid is not None:
        g = torch.where(valid, g, 0.0)
        h = None if h is None else torch.where(valid, h, 0.0)
    if temperature != 1.0:
        g = g / temperature
        h = None if h is None else h / temperature
    return g, h


def compute_copies(x: Tensor, w: Tensor, b: Tensor | None) -> tuple[torch.dtype, Tensor, Tensor, Tensor | None]:
    """Float32 copies of half-precision operands, except on the tensor-core path
    (:mod:`losskit.kernels.matmul`), which keeps them and makes float32 logits."""
    compute, _ = result_dtypes(x, w)
    if matmul.serves(x, w):
        return compute, x, w, b
    return compute, x.to(compute), w.to(compute), None if b is None else b.to(compute)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the statistics and float32-accumulated gradients are made in."""
    return torch.float32 if x.dtype in matmul.HALF else x.dtype


# ---- the custom op ------------------------------------------------------------------------
def _index_held(target: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    if valid is None:
        return target, torch.ones_like(target, dtype=torch.bool)
    return torch.where(valid, target, 0), valid


def _outputs(stats: RowStats, valid: Tensor | None, out: torch.dtype, with_entropy: bool) -> tuple[Tensor, Tensor]:
    log_p, entropy = stats.log_p, stats.entropy
    if valid is not None:
        log_p = torch.where(valid, log_p, 0.0)
        entropy = torch.where(valid, entropy, 0.0)
    return log_p.to(out), entropy.to(out) if with_entropy else log_p.new_empty(0, dtype=out)


@torch.library.custom_op("losskit::linear_log_probs", mutates_args=())
def _linear_log_probs_op(input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, valid: Tensor | None,
                         temperature: float, chunk_rows: int, with_entropy: bool,
                         batch_invariant: bool) -> tuple[Tensor, Tensor, Tensor]:
    _, out = result_dtypes(input, weight)
    _, x, w, b = compute_copies(input, weight, bias)
    index, held = _index_held(target, valid)
    stats = forward_stats(x, w, b, index, held, temperature, chunk_rows, batch_invariant)
    return (*_outputs(stats, valid, out, with_entropy), stats.stacked())


@_linear_log_probs_op.register_fake
def _(input, weight, bias, target, valid, temperature, chunk_rows, with_entropy, batch_invariant):
    compute, out = result_dtypes(input, weight)
    n = input.shape[0]
    return (input.new_empty(n, dtype=out), input.new_empty(n if with_entropy else 0, dtype=out),
            input.new_empty(len(STATS), n, dtype=compute))


@torch.library.custom_op("losskit::linear_log_probs_backward", mutates_args=())
def _linear_log_probs_backward_op(
    input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, valid: Tensor | None, stats: Tensor,
    grad_log_p: Tensor | None, grad_entropy: Tensor | None, temperature: float, chunk_rows: int, with_entropy: bool,
    batch_invariant: bool, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    _, x, w, b = compute_copies(input, weight, bias)
    index, held = _index_held(target, valid)
    g, h = upstream(grad_log_p, grad_entropy, valid, x.shape[0], x.new_empty(0, dtype=compute_dtype(x)), temperature,
                    with_entropy)
    grads = backward_grads(x, w, b, index, held, RowStats(*stats.unbind(0)), g, h, temperature, chunk_rows,
                           batch_invariant, tuple(needs))
    return tuple(input.new_empty(0) if grad is None else grad.to(t.dtype)
                 for grad, t in zip(grads, (input, weight, bias)))


@_linear_log_probs_backward_op.register_fake
def _(input, weight, bias, target, valid, stats, grad_log_p, grad_entropy, temperature, chunk_rows, with_entropy,
      batch_invariant, needs):
    return tuple(t.new_empty(t.shape) if need and t is not None else input.new_empty(0)
                 for t, need in zip((input, weight, bias), needs))


def _setup(ctx, inputs, output) -> None:
    input, weight, bias, target, valid, *options = inputs
    ctx.save_for_backward(input, weight, bias, target, valid, output[2])
    ctx.options = options  # temperature, chunk_rows, with_entropy, batch_invariant
    ctx.needs = [input.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]


def _composed(input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, valid: Tensor | None,
              temperature: float) -> tuple[Tensor, Tensor]:
    """(log p_y, entropy) through torch's differentiable ops on the whole logits: what a
    backward that must itself be differentiable (``create_graph=True``) differentiates."""
    compute, out = result_dtypes(input, weight)
    logits = torch.nn.functional.linear(input, weight, bias).to(compute) / temperature
    log_p = torch.log_softmax(logits, dim=1)
    index, _ = _index_held(target, valid)
    picked = log_p.gather(1, index.unsqueeze(1)).squeeze(1)
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, 0.0)).sum(1)
    if valid is not None:
        picked, entropy = torch.where(valid, picked, 0.0), torch.where(valid, entropy, 0.0)
    return picked.to(out), entropy.to(out)


def _differentiable_backward(ctx, grad_log_p, grad_entropy):
    """create_graph=True (double backward, Hessian-vector products): the gradients of the
    composed computation, with their own graph. Logits-sized, as such a backward is."""
    input, weight, bias, target, valid, _ = ctx.saved_tensors
    temperature, _, with_entropy, _ = ctx.options
    outputs = _composed(input, weight, bias, target, valid, temperature)
    pairs = [(o, g) for o, g in zip(outputs, (grad_log_p, grad_entropy if with_entropy else None)) if g is not None]
    wanted = [t for t, need in zip((input, weight, bias), ctx.needs) if need]
    found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                     allow_unused=True))
    grads = [next(found) if need else None for need in ctx.needs]
    return (*grads, None, None, None, None, None, None)


def _backward(ctx, grad_log_p, grad_entropy, _grad_stats):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _differentiable_backward(ctx, grad_log_p, grad_entropy)
    input, weight, bias, target, valid, stats = ctx.saved_tensors
    temperature, rows, with_entropy, batch_invariant = ctx.options
    grads = _linear_log_probs_backward_op(input, weight, bias, target, valid, stats, grad_log_p,
                                          grad_entropy if with_entropy else None, temperature, rows, with_entropy,
                                          batch_invariant, ctx.needs)
    grads = [g if need else None for g, need in zip(grads, ctx.needs)]
    return (*grads, None, None, None, None, None, None)


_linear_log_probs_op.register_autograd(_backward, setup_context=_setup)


def fused_linear_log_probs(input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, valid: Tensor | None,
                           *, temperature: float, chunk_rows: int, with_entropy: bool,
                           batch_invariant: bool) -> tuple[Tensor, Tensor]:
    """(log p_y, entropy or an empty tensor), each (N,), of (N, H) input rows and their
    validated int64 targets (``valid`` None when every row counts)."""
    log_p, entropy, _ = _linear_log_probs_op(input, weight, bias, target, valid, float(temperature), int(chunk_rows),
                                             bool(with_entropy), bool(batch_invariant))
    return log_p, entropy
