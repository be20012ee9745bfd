"""Linear layer + cross-entropy without the (tokens x classes) logits, on any device.

For each chunk of B token rows x_b (B, H) of the input:

    logits_b = x_b W^T + bias                     (B, C), in a reused chunk buffer
    dlogits_b = (logits_chunk: softmax, then the coefficients of kernels.rows)
    grad_x[b] = dlogits_b W                        (B, H)
    grad_W  += dlogits_b^T x_b                     (C, H), accumulated in place
    grad_bias += sum over rows of dlogits_b        (C,)

so the extra memory is one (B, C) buffer (the gradient overwrites the logits in place)
and the (C, H) weight gradient, instead of several (N, C) tensors. The per-row
coefficients, for every option, come from :mod:`losskit.kernels.rows`, as in the fused
cross-entropy. For a scalar loss ('mean', 'sum') the gradients are made in forward
and backward only scales them by grad_output (no pass at all when it is 1). For
reduction='none' the per-token grad_output is unknown in forward, so forward keeps only
the inputs and backward recomputes each chunk's logits (one extra matmul per chunk).
Under no_grad / inference_mode only the loss is computed: one matmul per chunk, no
gradient buffers. Half-precision inputs are computed, and the weight gradient
accumulated, in float32, whatever the number of chunks; the gradients are rounded once
into the inputs' dtype. With ``batch_invariant`` every matrix product takes a fixed block
of 256 rows (see ``_chunks``), so that a row's loss and input gradient are bitwise the
same alone, in any batch and with any chunk size. The autograd, custom-op (``losskit::linear_cross_entropy`` and
its ``_backward`` for reduction='none') and replay machinery comes from
:class:`~losskit.kernels.fused_op.FusedOp`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._core import switches
from .._core.dtypes import result_dtypes
from .._core.options import CrossEntropyOptions
from .._core.validation import ClassTargets
from .cross_entropy import RowBuffers, logits_chunk
from . import matmul
from .fused_op import FusedOp
from .rows import RowTerms

# Auto chunk. Every chunk reads and writes the whole (C, H) weight gradient once, so few
# large chunks are faster (measured at N=2048, H=512, C=65536 on 2 cores: the three
# matmuls take 3.17 s in chunks of 128 rows, 2.89 s of 256, 2.54 s of 512). The chunk
# buffer may therefore be as large as the weight gradient itself (B = H rows), or
# switches.chunks().linear_bytes (64 MiB) where that is more, within 16 to 1024 rows: peak
# extra memory stays about twice the weight gradient, whatever the number of tokens.


def auto_chunk_rows(num_classes: int, in_features: int, device_type: str = "cpu") -> int:
    budget = switches.chunks().linear_bytes
    rows = min(1024, max(16, in_features, budget // (4 * max(num_classes, 1))))
    if device_type not in ("cpu", "meta"):
        # On an accelerator each chunk also re-reads the float32 weight gradient (its
        # accumulator), so up to 2048 rows while the float32 chunk of logits stays <= 1 GiB.
        rows = max(rows, min(2048, (1 << 30) // (4 * max(num_classes, 1))))
    return int(rows)


def _compute_copies(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None):
    """(compute dtype, x, w, b): float32 copies of half-precision operands, except on the
    tensor-core path (:mod:`losskit.kernels.matmul`), which keeps them as they are."""
    compute, _ = result_dtypes(input, linear_weight)
    if matmul.serves(input, linear_weight):
        return compute, input, linear_weight, linear_bias
    return compute, input.to(compute), linear_weight.to(compute), None if linear_bias is None else linear_bias.to(compute)


def linear_cross_entropy_forward(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    valid: Tensor | None,
    weight: Tensor | None,
    *,
    options: CrossEntropyOptions,
    needs: tuple[bool, bool, bool],
    chunk_rows: int,
    batch_invariant: bool,
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """(loss, (grad_input, grad_weight, grad_bias)): the gradients, in the compute dtype,
    made here when ``needs`` asks for them; None otherwise."""
    compute, x, w, b = _compute_copies(input, linear_weight, linear_bias)
    n, num_classes = x.shape[0], w.shape[0]
    targets = ClassTargets(target, valid, ignore_index=options.ignore_index, all_valid=valid is None)
    terms = RowTerms.local(targets, weight, num_classes, compute, options)
    safe_target = targets.safe().unsqueeze(1)
    precompute = any(needs)
    coefficients = terms.coefficients() if precompute else None
    grads = _zero_grads(x, w, b, needs) if precompute else (None, None, None)
    stats = RowBuffers(n, x.device, compute)
    for rows, logits, blocks in _chunks(x, w, b, chunk_rows, batch_invariant):
        grad_logits = logits if precompute else None
        stats.put(rows, logits_chunk(logits, terms, coefficients, rows, safe_target[rows], grad_logits, owned=True))
        if precompute:
            _accumulate(grads, grad_logits, x[rows], w, rows, blocks, _half_scale(x))
    _unscale(grads, x)
    loss = terms.loss(*stats.stats())
    return loss.to(input.dtype), grads


def linear_cross_entropy_recompute(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    valid: Tensor | None,
    weight: Tensor | None,
    *,
    options: CrossEntropyOptions,
    needs: tuple[bool, bool, bool],
    grad_output: Tensor,
    chunk_rows: int,
    batch_invariant: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """reduction='none': each chunk's logits again, each row's coefficients times its
    grad_output (folded into the coefficients, so no extra pass over the chunk)."""
    compute, x, w, b = _compute_copies(input, linear_weight, linear_bias)
    targets = ClassTargets(target, valid, ignore_index=options.ignore_index, all_valid=valid is None)
    terms = RowTerms.local(targets, weight, w.shape[0], compute, options)
    coefficients = terms.coefficients(row_factor=grad_output.reshape(-1).to(compute))
    safe_target = targets.safe().unsqueeze(1)
    grads = _zero_grads(x, w, b, needs)
    for rows, logits, blocks in _chunks(x, w, b, chunk_rows, batch_invariant):
        logits_chunk(logits, terms, coefficients, rows, safe_target[rows], logits, owned=True)
        _accumulate(grads, logits, x[rows], w, rows, blocks, _half_scale(x))
    _unscale(grads, x)
    return grads


def _zero_grads(x: Tensor, w: Tensor, b: Tensor | None, needs) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradient buffers: the input's in its dtype (each row written once); the weight's
    and the bias's, sums over every chunk, in float32 also on the tensor-core path."""
    acc = torch.float32 if x.dtype in matmul.HALF else x.dtype
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if needs[0] else None,
        torch.zeros_like(w, dtype=acc, memory_format=torch.contiguous_format) if needs[1] else None,
        torch.zeros_like(b, dtype=acc) if needs[2] and b is not None else None,
    )


def _logits_into(out: Tensor, x_rows: Tensor, w_t: Tensor, b: Tensor | None) -> None:
    """out = x_rows w^T + b; float32 ``out`` from half operands on the tensor-core path."""
    if x_rows.dtype != out.dtype:
        matmul.mm_float32(x_rows, w_t, out=out)
        if b is not None:
            out.add_(b)
    elif b is None:
        torch.mm(x_rows, w_t, out=out)
    else:
        torch.addmm(b, x_rows, w_t, out=out)


# Rows per matrix product in the batch-invariant mode, see _chunks. Measured at 1 thread
# (N x H x C): 64 rows cost +12 to +15% (512x256x32768, 2048x128x8192), 128 rows +3 to
# +7%, 256 rows -1.5 to +2% (also 1024x512x16384, 512x512x65536); at 2 threads 256 rows
# cost +6 to +10%, and a batch under 256 rows pays for the padding (+39% at 128x64x4096).
BLOCK_ROWS = 256


def _chunks(x: Tensor, w: Tensor, b: Tensor | None, chunk_rows: int, invariant: bool):
    """Yield (rows, logits, blocks) per chunk, the logits in one reused (B, C) buffer.

    With ``invariant``, every matrix product takes exactly BLOCK_ROWS rows, copied into a
    fixed buffer (the chunk rounded up to a multiple of BLOCK_ROWS; the last block padded
    with zero rows): a BLAS picks its kernel, its threads' split of the work and its
    vectorisation by the shape and the alignment, so a row's logits would otherwise
    depend on how many rows share its product (one row alone is a matrix-vector product)
    and where it sits. ``blocks`` is then the padded logits buffer, for the input's
    gradient, in the same blocks; None otherwise.
    """
    n = x.shape[0]
    logits_dtype = torch.float32 if x.dtype in matmul.HALF else x.dtype  # float32 logits on the tensor-core path
    if not invariant:
        size = min(chunk_rows, n)
        logits_buf = x.new_empty(size, w.shape[0], dtype=logits_dtype)
        w_t = w.t()
        for start in range(0, n, size):
            rows = slice(start, min(start + size, n))
            logits = logits_buf[: rows.stop - rows.start]
            _logits_into(logits, x[rows], w_t, b)
            yield rows, logits, None
        return
    size = _round_up(min(chunk_rows, n))
    logits_buf = x.new_empty(size, w.shape[0], dtype=logits_dtype)
    x_buf = x.new_empty(size, x.shape[1])
    w_t = w.t()
    for start in range(0, n, size):
        rows = slice(start, min(start + size, n))
        m = rows.stop - rows.start
        padded = _round_up(m)
        x_buf[:m].copy_(x[rows])
        x_buf[m:padded].zero_()
        for j in range(0, padded, BLOCK_ROWS):
            block = slice(j, j + BLOCK_ROWS)
            _logits_into(logits_buf[block], x_buf[block], w_t, b)
        yield rows, logits_buf[:m], logits_buf[:padded]


def _round_up(rows: int) -> int:
    return -(-rows // BLOCK_ROWS) * BLOCK_ROWS


def _accumulate(grads, grad_logits: Tensor, x_rows: Tensor, w: Tensor, rows: slice, blocks: Tensor | None,
                scale: float = 1.0) -> None:
    grad_x, grad_w, grad_b = grads
    if grad_logits.dtype != x_rows.dtype:  # the tensor-core path: float32 dlogits, half operands
        _accumulate_half(grads, grad_logits, x_rows, w, rows, blocks, scale)
        return
    if grad_x is not None:
        if blocks is None:
            torch.mm(grad_logits, w, out=grad_x[rows])
        else:  # the same fixed blocks as the logits (see _chunks); padded rows dropped
            part = blocks.new_empty(blocks.shape[0], w.shape[1])
            for j in range(0, blocks.shape[0], BLOCK_ROWS):
                block = slice(j, j + BLOCK_ROWS)
                torch.mm(blocks[block], w, out=part[block])
            grad_x[rows] = part[: rows.stop - rows.start]
    if grad_w is not None:
        grad_w.addmm_(grad_logits.t(), x_rows)
    if grad_b is not None:
        grad_b.add_(grad_logits.sum(dim=0))


def _half_scale(x: Tensor) -> float:
    """The power of two dlogits are multiplied by before they are rounded to float16: a
    'mean' over N rows makes them about 1/N, deep in float16's subnormals (below 6e-5),
    where they would keep only a few bits. bfloat16 has float32's range: no scale."""
    return float(2 ** max(0, math.ceil(math.log2(max(x.shape[0], 1))))) if x.dtype == torch.float16 else 1.0


def _accumulate_half(grads, grad_logits: Tensor, x_rows: Tensor, w: Tensor, rows: slice, blocks: Tensor | None,
                     scale: float) -> None:
    """The tensor-core path's products: dlogits (times ``scale``) rounded once to the
    operands' dtype; the input's rows in their dtype (float32 accumulation inside the
    product), the weight's gradient accumulated in float32 across chunks, the bias's summed
    from float32 dlogits. The scale comes off in :func:`_unscale` (exactly: a power of two)."""
    grad_x, grad_w, grad_b = grads
    source = grad_logits if blocks is None else blocks
    half = (source * scale if scale != 1.0 else source).to(x_rows.dtype)
    m = rows.stop - rows.start
    if grad_x is not None:
        if blocks is None:
            torch.mm(half, w, out=grad_x[rows])
        else:  # the same fixed blocks as the logits (see _chunks); padded rows dropped
            part = half.new_empty(half.shape[0], w.shape[1])
            for j in range(0, half.shape[0], BLOCK_ROWS):
                block = slice(j, j + BLOCK_ROWS)
                torch.mm(half[block], w, out=part[block])
            grad_x[rows] = part[:m]
        if scale != 1.0:
            grad_x[rows] = (grad_x[rows].float() / scale).to(grad_x.dtype)
    if grad_w is not None:
        matmul.addmm_float32_(grad_w, half[:m].t(), x_rows)
    if grad_b is not None:
        grad_b.add_(grad_logits.sum(dim=0))


def _unscale(grads, x: Tensor) -> None:
    scale = _half_scale(x) if x.dtype in matmul.HALF and grads[1] is not None and grads[1].dtype != x.dtype else 1.0
    if scale != 1.0:
        grads[1].div_(scale)


fused_linear_cross_entropy = FusedOp(
    "linear_cross_entropy",
    tensors=("input", "linear_weight", "linear_bias?", "target", "valid?", "weight?"),
    differentiable=3,
    options=CrossEntropyOptions,
    extras=(("int", "chunk_rows"), ("bool", "batch_invariant")),
    forward=linear_cross_entropy_forward,
    # A per-row grad_output is unknown in forward, and the weight's gradient sums rows:
    # reduction='none' keeps the inputs and makes the gradients in backward.
    precomputes=lambda options: options.reduction != "none",
    recompute=linear_cross_entropy_recompute,
)
