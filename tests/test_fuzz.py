"""Differential fuzz: random valid (and some invalid) calls of every torch-twin loss,
compared with torch 2.13 in value and gradient.

How the calls are drawn is in tests/fuzz_strategies.py (one strategy per loss family);
this file holds the check every drawn call goes through and the tests, one per loss. The
fused kernels run with their chunk budget shrunk to a few rows, so batches cross chunk
edges.

The rules checked for every example:
- torch raises iff losskit raises (a dtype torch's CPU kernels do not implement, e.g.
  half, is a documented addition: there losskit is only judged against float64);
- float64: losskit equals torch, value and gradient;
- float32 / float16 / bfloat16: losskit's error against torch in float64 is at most
  twice torch's own error plus a rounding allowance of the dtype;
- non-finite results: where torch in float64 is inf or nan, so is losskit, with the
  documented exceptions of README "Where losskit differs from torch";
- losskit never changes its inputs.

Profiles (tests/conftest.py): ``ci`` (the default; derandomised, a few dozen examples per
loss) and ``fuzz`` (``make fuzz``: thousands per loss, the seed printed for replay with
``make fuzz SEED=...``).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, strategies as st

import losskit.functional as LF
from losskit._core.switches import chunk_sizes
from fuzz_strategies import STRATEGIES, Call

HALF = (torch.float16, torch.bfloat16)
# Rounding allowance per dtype, relative to max(1, |reference|).
ALLOWANCE = {torch.float64: 1e-7, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


# ---- the check ------------------------------------------------------------------------------

@contextlib.contextmanager
def small_chunks():
    """The fused kernels' chunks shrunk to a few rows, so that batches cross chunk edges."""
    with chunk_sizes(cross_entropy_bytes=64, bce_elements=8):
        yield


def _run(fn: Callable[..., torch.Tensor], args, kwargs, leaves):
    """(error, output, gradients of the leaves under a fixed grad_output)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(*args, **kwargs)
            grads = None
            if leaves and out.requires_grad:
                grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
                grads = torch.autograd.grad(out, leaves, (grad_output + 2).to(out.dtype), allow_unused=True)
        return None, out, grads
    except Exception as error:  # noqa: BLE001 - any error counts: both sides must agree
        return error, None, None


def _snapshot(values) -> list[torch.Tensor]:
    return [v.detach().clone() for v in values if isinstance(v, torch.Tensor)]


def _unimplemented(error: Exception | None) -> bool:
    return error is not None and "not implemented for" in str(error)


def _compare(what: str, ours: torch.Tensor, theirs: torch.Tensor, reference: torch.Tensor, dtype, case: Call):
    """ours and theirs (in ``dtype``) against reference (torch in float64)."""
    assert ours.shape == reference.shape, f"{what}: shape {tuple(ours.shape)} != torch's {tuple(reference.shape)}"
    ours, theirs, reference = ours.double(), theirs.double(), reference.double()
    finite = torch.isfinite(reference)
    if not case.finite_by_design:
        same = (torch.isnan(ours) == torch.isnan(reference)) & ((ours == reference) | finite | torch.isnan(ours))
        assert same.all(), f"{what}: non-finite where torch's is not (or not the same): {ours} vs {reference}"
    # Where torch's own result in this dtype overflowed, losskit may overflow too.
    check = finite & (torch.isfinite(ours) | ~torch.isfinite(theirs))
    check &= torch.isfinite(ours)
    assert (torch.isfinite(ours) | ~finite | ~torch.isfinite(theirs)).all(), f"{what}: overflow where torch has none"
    error = (ours - reference).abs()
    allowance = 2 * (theirs - reference).abs().nan_to_num(0, 0, 0) + ALLOWANCE[dtype] * reference.abs().clamp_min(1)
    bad = check & (error > allowance)
    assert not bad.any(), (
        f"{what} in {dtype}: losskit {ours[bad][:3].tolist()} vs reference {reference[bad][:3].tolist()} "
        f"(torch {theirs[bad][:3].tolist()})"
    )


def check_call(case: Call, dtype: torch.dtype) -> None:
    ours_fn, torch_fn = getattr(LF, case.name), case.oracle or getattr(TF, case.name)
    args, kwargs, leaves = case.build(dtype)
    before = _snapshot([*args, *kwargs.values()])
    with small_chunks():
        error, out, grads = _run(ours_fn, args, kwargs, leaves)
    after = _snapshot([*args, *kwargs.values()])
    for b, a in zip(before, after):
        assert torch.equal(b, a) or (b.isnan() == a.isnan()).all() and torch.equal(b.nan_to_num(), a.nan_to_num()), \
            f"{case.name} changed an input"

    t_args, t_kwargs, t_leaves = case.build(dtype)
    t_error, t_out, t_grads = _run(torch_fn, t_args, t_kwargs, t_leaves)
    if t_error is not None and case.addition and re.search(case.addition, str(t_error)):
        torch_fn = case.twin
        t_args, t_kwargs, t_leaves = case.build(dtype)
        t_error, t_out, t_grads = _run(torch_fn, t_args, t_kwargs, t_leaves)
    if _unimplemented(t_error) and dtype in HALF:  # an addition: judge against float64 alone
        t_error = None
        t_out = t_grads = None
    assert (error is None) == (t_error is None), (
        f"{case.name}({dtype}): losskit {'raised ' + repr(error) if error else 'computed'}, "
        f"torch {'raised ' + repr(t_error) if t_error else 'computed'}"
    )
    if error is not None:
        return
    r_args, r_kwargs, r_leaves = case.build(torch.float64, dtype)
    r_error, reference, r_grads = _run(torch_fn, r_args, r_kwargs, r_leaves)
    assert r_error is None, f"torch in float64 raised {r_error!r}"
    theirs = reference if t_out is None else t_out
    assert out.dtype == theirs.dtype or t_out is None, f"dtype {out.dtype} != torch's {theirs.dtype}"
    _compare(f"{case.name} value", out, theirs, reference, dtype, case)
    if grads is None or r_grads is None:
        assert (grads is None) == (r_grads is None or not any(g is not None for g in r_grads)), "gradient presence"
        return
    for i, (g, tg, rg) in enumerate(zip(grads, t_grads or r_grads, r_grads)):
        assert (g is None) == (rg is None), f"{case.name}: gradient {i} present on one side only"
        if g is not None:
            _compare(f"{case.name} gradient {i}", g, tg, rg, dtype, case)


# ---- the tests: one per loss ----------------------------------------------------------------

def test_every_torch_twin_is_fuzzed():
    twins = {n for n in LF.__all__ if hasattr(TF, n)} - {"pairwise_distance", "triplet_margin_with_distance_loss"}
    assert twins <= set(STRATEGIES), f"no fuzz strategy for {sorted(twins - set(STRATEGIES))}"


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_losskit_agrees_with_torch(name):
    @given(case=STRATEGIES[name](), dtype=st.sampled_from([torch.float64, torch.float32, torch.float16,
                                                           torch.bfloat16]))
    def run(case: Call, dtype: torch.dtype) -> None:
        if dtype in case.dtypes:
            check_call(case, dtype)

    run()
