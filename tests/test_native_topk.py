"""The compiled form of topk_distillation_loss (losskit/_native/src/topk_distillation.cpp):
the same bits as the Python fused forward over the options the catalog's case leaves out,
and the cached teacher's checks read in C++ raising the Python checks' messages."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

import losskit.functional as LF
from losskit import _native
from losskit._core import switches

native = _native.load() if os.environ.get("LOSSKIT_NATIVE", "1") != "0" else None
pytestmark = pytest.mark.skipif(
    native is None, reason="losskit._native is not built here (make test builds it and sets LOSSKIT_NATIVE=require)"
)


def _teacher(n, v, k, seed, dtype=torch.float32, pad=True):
    """Distinct ids per row and log-probabilities holding 0.8 of the mass, the last entry
    of each row padding (-inf) when ``pad``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    logps = (torch.randn(n, k, generator=g).softmax(-1) * 0.8).log()
    if pad:
        logps[:, -1] = -math.inf
    return ids, logps.to(dtype)


def _same_bits(student, ids, logps, target, grad_output, **options):
    def run():
        s = student.detach().requires_grad_()
        loss = LF.topk_distillation_loss(s, ids, logps, target, **options)
        (grad,) = torch.autograd.grad(loss, s, grad_output(loss))
        return loss.detach(), grad, loss.grad_fn.name()

    loss, grad, node = run()
    with switches.without_native():
        ref_loss, ref_grad, ref_node = run()
    assert node == ref_node == ("FusedTopkDistillationBackward" if student.dim() == 2 else "ViewBackward0")
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0, equal_nan=True)
    assert grad.dtype == ref_grad.dtype == student.dtype
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_same_bits_as_the_python_forward(dtype, beta, reduction):
    g = torch.Generator().manual_seed(70)
    for temperature, hard, with_target, soft in itertools.product([1.0, 1.6], [0.0, 0.3], [False, True], [1.0, 0.7]):
        if hard and not with_target:
            continue
        student = (torch.randn(9, 13, generator=g) * 3).to(dtype)
        ids, logps = _teacher(9, 13, 4, seed=71, dtype=dtype)
        target = torch.randint(0, 13, (9,), generator=g) if with_target else None
        if target is not None:
            target[3] = -100
        _same_bits(student, ids, logps, target, lambda loss: torch.full_like(loss, 0.75), beta=beta,
                   temperature=temperature, reduction=reduction, weight_hard_loss=hard, weight_soft_loss=soft)


def test_the_same_bits_for_3d_logits_float64_k_equal_to_v_and_without_grad():
    g = torch.Generator().manual_seed(72)
    student = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(7, generator=g) for _ in range(6)]).reshape(2, 3, 7)
    logps = student.log_softmax(-1).gather(-1, ids)
    with switches.fused_only():
        _same_bits(student, ids, logps, None,
                   lambda loss: torch.linspace(0.2, 1.1, loss.numel(), dtype=loss.dtype).reshape(loss.shape),
                   beta=0.5, reduction="none")
    s, i, lp = torch.randn(5, 9, generator=g), *_teacher(5, 9, 3, seed=73)
    with torch.no_grad():
        loss = LF.topk_distillation_loss(s, i, lp)
        with switches.without_native():
            torch.testing.assert_close(loss, LF.topk_distillation_loss(s, i, lp), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 1.6])
def test_the_same_bits_over_chunks_of_rows(dtype, temperature):
    # V = 40000: chunks of 16 rows (kernels/topk_distillation.py's chunk_rows), 3 of them.
    g = torch.Generator().manual_seed(75)
    student = (torch.randn(40, 40000, generator=g) * 3).to(dtype)
    ids, logps = _teacher(40, 40000, 5, seed=76, dtype=dtype)
    target = torch.randint(0, 40000, (40,), generator=g)
    target[[3, 17, 33]] = -100
    _same_bits(student, ids, logps, target, lambda loss: torch.full_like(loss, 0.75), beta=0.4,
               temperature=temperature, weight_hard_loss=0.3)


def test_the_compiled_check_passes_good_teachers_and_defers_every_bad_one():
    ids, logps = _teacher(4, 10, 3, seed=74)
    assert native.topk_check(ids, logps, None, 10, 1e-5)
    bad = {
        "out of range": (ids.clone().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(10)), logps),
        "negative": (ids.clone().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(-1)), logps),
        "repeat": (ids.clone().index_put_((torch.tensor(2), torch.tensor(1)), ids[2, 0]), logps),
        "positive": (ids, logps.clone().index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(0.1))),
        "nan": (ids, logps.clone().index_put_((torch.tensor(3), torch.tensor(1)), torch.tensor(math.nan))),
        "mass above 1": (ids, torch.tensor([[0.7, 0.6, 0.0]]).log().expand(4, 3).contiguous()),
        "mass at the slack": (ids, torch.tensor([[0.5, 0.5, 0.0]]).log().expand(4, 3).contiguous()),
    }
    for what, (i, lp) in bad.items():
        assert not native.topk_check(i, lp, None, 10, 1e-5), what
        # An ignored row is not checked.
        row = 0 if what in ("positive", "mass above 1", "mass at the slack") else (1 if what != "repeat" else 2)
        if what not in ("mass above 1", "mass at the slack", "nan"):
            valid = torch.ones(4, dtype=torch.bool)
            valid[row] = False
            assert native.topk_check(i, lp, valid, 10, 1e-5), what


@pytest.mark.parametrize("native_on", [True, False])
def test_the_messages_are_the_python_checks(native_on):
    s = torch.randn(2, 6)
    ids, logps = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0.5, 0.3], [0.2, 0.1]]).log()
    cases = [
        (torch.tensor([[0, 6], [2, 3]]), logps, IndexError, "teacher_topk_ids holds 6 at index (0, 1), out of range"),
        (torch.tensor([[0, 1], [3, 3]]), logps, ValueError, "teacher_topk_ids names a token twice in row (1,)"),
        (ids, torch.tensor([[-0.5, math.nan], [-1.0, -2.0]]), ValueError,
         "found nan at index (0, 1)"),
        (ids, torch.tensor([[0.7, 0.6], [0.2, 0.1]]).log(), ValueError, "of row (0,) sum to probability 1.3 > 1"),
        # Both wrong: the range check comes first, as in Python.
        (torch.tensor([[0, 1], [9, 9]]), torch.tensor([[0.7, 0.6], [0.2, 0.1]]).log(), IndexError, "holds 9"),
    ]
    for i, lp, error, message in cases:
        with switches.without_native() if not native_on else _nothing():
            with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
                LF.topk_distillation_loss(s, i, lp)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
