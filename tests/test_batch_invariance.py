"""Batch invariance and determinism (README, "Batch invariance").

A row's per-token loss and its row of the input's gradient are bitwise the same whether it
is computed alone, inside any batch, or with any chunk size (cross_entropy always,
linear_cross_entropy with batch_invariant=True); two identical calls give
bitwise identical results, the weight's gradient included. Compared with torch.equal
(no tolerance), on the CPU with torch's thread settings as they are.
"""

from __future__ import annotations

import pytest
import torch

import losskit.functional as LF
from losskit._core import switches

GEN = torch.Generator().manual_seed(7)
SLICES = [slice(0, 1), slice(5, 6), slice(39, 40), slice(3, 17), slice(20, 40), slice(0, 40)]


def _rows(fn, x, target, grad_output, rows):
    """(per-token loss, gradient rows) of ``fn`` on rows ``rows`` alone, reduction='none'
    with a per-row grad_output."""
    leaf = x[rows].clone().requires_grad_()
    loss = fn(leaf, target[rows])
    loss.backward(grad_output[rows])
    return loss.detach(), leaf.grad


def _assert_same(got, want, what):
    for name, a, b in zip(("loss", "gradient"), got, want):
        assert torch.equal(a, b), f"{what}: {name} differs in {int((a != b).sum())} of {a.numel()} entries"


CE_OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"weight": "w", "ignore_index": 2},
    {"lse_square_scale": 1e-3, "softcap": 5.0, "temperature": 1.5},
]


@pytest.mark.parametrize("options", CE_OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("classes", [3000, 70000])
def test_cross_entropy_rows_do_not_depend_on_the_batch(options, dtype, classes):
    n = 40 if classes < 10000 else 8
    slices = SLICES if n == 40 else [slice(0, 1), slice(3, 4), slice(2, 7), slice(0, 8)]
    x = (torch.randn(n, classes, generator=GEN) * 3).to(dtype)
    target = torch.randint(0, classes, (n,), generator=GEN)
    options = dict(options)
    if options.get("weight") == "w":
        options["weight"] = torch.rand(classes, generator=GEN) + 0.5
        target[::3] = 2  # ignored
    grad_output = torch.rand(n, generator=GEN).to(dtype) + 0.5

    def fn(inp, tgt):
        return LF.cross_entropy(inp, tgt, reduction="none", **options)

    whole = _rows(fn, x, target, grad_output, slice(None))
    for rows in slices:
        _assert_same(_rows(fn, x, target, grad_output, rows), (whole[0][rows], whole[1][rows]), f"rows {rows}")
    for rows_per_chunk in (1, 3, 16):
        with switches.chunk_sizes(cross_entropy_bytes=4 * classes * rows_per_chunk):
            _assert_same(_rows(fn, x, target, grad_output, slice(None)), whole, f"{rows_per_chunk} rows per chunk")


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "lse_square_scale": 1e-3}, {"bias": True}], ids=str)
def test_linear_cross_entropy_rows_do_not_depend_on_the_batch_or_the_chunk(options):
    """With batch_invariant=True (off by default: up to 10% at two threads, see the README)."""
    n, hidden, classes = 300, 48, 3000  # more rows than one 256-row block
    x = torch.randn(n, hidden, generator=GEN)
    w = torch.randn(classes, hidden, generator=GEN) * 0.2
    bias = torch.randn(classes, generator=GEN) if options.get("bias") else None
    options = {k: v for k, v in options.items() if k != "bias"}
    target = torch.randint(0, classes, (n,), generator=GEN)
    grad_output = torch.rand(n, generator=GEN) + 0.5

    def fn_with(chunk_size):
        def fn(inp, tgt):
            return LF.linear_cross_entropy(inp, w, tgt, linear_bias=bias, reduction="none", chunk_size=chunk_size,
                                           batch_invariant=True, **options)
        return fn

    whole = _rows(fn_with(None), x, target, grad_output, slice(None))
    for rows in [*SLICES, slice(250, 262), slice(299, 300)]:
        _assert_same(_rows(fn_with(None), x, target, grad_output, rows), (whole[0][rows], whole[1][rows]),
                     f"rows {rows}")
    for chunk_size in (1, 7, 64, 256, 300):
        _assert_same(_rows(fn_with(chunk_size), x, target, grad_output, slice(None)), whole, f"chunk_size={chunk_size}")
    with torch.no_grad():  # the loss alone, as the training loss would be read
        assert torch.equal(fn_with(9)(x, target), whole[0])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_two_identical_calls_give_identical_bits(reduction):
    """Determinism, the weight's gradient included (it sums over rows and chunks)."""
    x = torch.randn(70, 32, generator=GEN)
    w = torch.randn(2000, 32, generator=GEN) * 0.2
    b = torch.randn(2000, generator=GEN)
    target = torch.randint(0, 2000, (70,), generator=GEN)
    logits = torch.randn(70, 2000, generator=GEN) * 3

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, w, b, logits)]
        lce = LF.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2], reduction=reduction,
                                      chunk_size=16)
        ce = LF.cross_entropy(leaves[3], target, reduction=reduction)
        (lce.sum() + ce.sum()).backward()
        return [lce.detach(), ce.detach(), *(leaf.grad for leaf in leaves)]

    first, second = run(), run()
    for name, a, b_ in zip(("lce", "ce", "grad input", "grad weight", "grad bias", "grad logits"), first, second):
        assert torch.equal(a, b_), f"{name} differs between two identical calls"
