"""Result and gradient dtypes of mixed-precision calls, against torch 2.13.

Every ``losskit.functional`` loss with a ``torch.nn.functional`` twin is called, through
each of its sample calls in tests/cases.py (and the weighted calls below, so that every
weight a torch loss takes is exercised), with its floating tensors in one dtype but one of
them (the input, the target, a weight, a variance, ...) in another: float32 with float64,
bfloat16 and float16 with float32, each way round. For every call:

- where torch computes, losskit computes and returns torch's dtype (where torch's CPU has
  no half kernel, the dtype torch gives the same mix one step up in precision);
- where torch refuses the mix (it wants a weight, or both sides of a matmul, in the
  input's dtype), losskit computes (README: "Where losskit differs from torch"), in the
  dtype ``REFUSED_BY_TORCH`` states;
- every leaf's gradient has the leaf's dtype, also where torch's backward fails
  (huber_loss, as for an integer target);
- the value is no further from torch in float64 on the same (rounded) inputs than twice
  torch's own error plus the result dtype's rounding, as in the fuzz.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from cases import CASES, Case
from inputs import Inputs

PAIRS = [(torch.float32, torch.float64), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
# Rounding allowance of the result dtype, relative to max(1, |reference|) (as tests/test_fuzz.py).
ALLOWANCE = {torch.float64: 1e-7, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

TWINS = sorted(n for n in LF.__all__ if hasattr(TF, n))

# Where torch refuses a mixed call and losskit computes: the result dtype losskit gives.
# "input": the input's (the logits', the hidden states'), as if a weight of another dtype
# were cast to it first, which is what torch asks of the caller; "promoted": the promoted
# dtype of all floating tensors. The test fails if torch starts accepting one of these or
# refuses another.
REFUSED_BY_TORCH = {
    "binary_cross_entropy": "promoted",  # input, target and weight: one dtype in torch
    "cross_entropy": "input",  # weight: the input's dtype in torch
    "nll_loss": "input",
    "multi_margin_loss": "input",
    "linear_cross_entropy": "input",  # input, linear_weight, linear_bias, weight: one dtype
}
# Where torch's forward computes a mixed call and its backward raises.
BACKWARD_REFUSED_BY_TORCH = {"huber_loss"}
# Samples known to be off torch's dtype (none now). Strict: the test fails once one passes,
# so that its entry goes.
PENDING: set[str] = set()


def _weighted(case_id: str, name: str, build) -> Case:
    return Case(f"{case_id}-weighted", (f"functional.{name}",), build)


# Weights the catalog cases leave out; every weight parameter of a torch twin is covered
# (test_every_weight_is_exercised).
EXTRA = [
    _weighted("l1_loss", "l1_loss", lambda m: (LF.l1_loss, (m.x(4, 3), m.x(4, 3)), {"weight": m.rand(4, 3)})),
    _weighted("bce_with_logits", "binary_cross_entropy_with_logits", lambda m: (
        LF.binary_cross_entropy_with_logits, (m.x(4, 3), m.rand(4, 3)),
        {"weight": m.rand(4, 3), "pos_weight": m.rand(3, low=1, high=3)},
    )),
    _weighted("cross_entropy-probabilities", "cross_entropy", lambda m: (
        LF.cross_entropy, (m.x(4, 5), m.probs(4, 5)), {"weight": m.rand(5, low=0.5), "label_smoothing": 0.1},
    )),
]


def _samples(name: str) -> list[Case]:
    return [case for case in CASES + EXTRA if case.covers == (f"functional.{name}",)]


def _torch_parameters(name: str) -> set[str] | None:
    try:
        return set(inspect.signature(getattr(TF, name)).parameters)
    except ValueError:  # a builtin (pairwise_distance): losskit's options are torch's
        return None


def _torch_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options torch's function takes (losskit's extras, e.g. softcap, left out)."""
    accepted = _torch_parameters(name)
    return kwargs if accepted is None else {k: v for k, v in kwargs.items() if k in accepted}


def _slots(args, kwargs) -> list[int | str]:
    """Where the call's floating tensors are: positions and keyword names."""
    floating = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return floating + [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def _build(args, kwargs, dtypes: dict, upcast: bool = False, device: str = "cpu"):
    """Fresh copies with the floating tensor at each slot in ``dtypes[slot]`` (then in
    float64 with ``upcast``); those that required grad become leaves."""
    leaves: list[torch.Tensor] = []

    def copy(value: torch.Tensor, slot) -> torch.Tensor:
        t = value.detach().to(dtypes[slot])
        t = (t.double() if upcast else t.clone()).to(device)
        if value.requires_grad:
            t.requires_grad_()
            leaves.append(t)
        return t

    def other(value):  # integer tensors (targets, lengths) follow to the device
        return value.to(device) if isinstance(value, torch.Tensor) else value

    new_args = [copy(a, i) if i in dtypes else other(a) for i, a in enumerate(args)]
    new_kwargs = {k: copy(v, k) if k in dtypes else other(v) for k, v in kwargs.items()}
    return new_args, new_kwargs, leaves


def _run(fn, args, kwargs, leaves):
    """(forward error, output, backward error, gradients)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - either side's error counts
        return error, None, None, None
    if not (leaves and out.requires_grad):
        return None, out, None, None
    try:
        grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    except Exception as error:  # noqa: BLE001
        return None, out, error, None
    return None, out, None, grads


def _calls(name: str):
    """Every mixed call of ``name``: (label, args, kwargs, dtypes), each dtype mix once. A
    sample torch refuses in one dtype (a documented addition, e.g. (..., H) hidden states
    of linear_cross_entropy) is left to its own test."""
    seen = set()
    for case in _samples(name):
        _, args, kwargs = case.build(Inputs("cpu", torch.float64, seed=3))
        kwargs = _torch_kwargs(name, kwargs)
        slots = _slots(args, kwargs)
        if _run(getattr(TF, name), *_build(args, kwargs, dict.fromkeys(slots, torch.float32)))[0] is not None:
            continue
        for a, b in PAIRS:
            for base, other in ((a, b), (b, a)):
                for odd in slots:
                    dtypes = {s: other if s == odd else base for s in slots}
                    label = f"{case.id}(" + ", ".join(f"{s}={str(d)[6:]}" for s, d in dtypes.items()) + ")"
                    if label not in seen:
                        seen.add(label)
                        yield label, args, kwargs, dtypes


def _promoted(dtypes) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


# A step up in precision, and back: how a call torch's CPU has no half kernel for is judged
# (the same mix one step up: bfloat16 with float32 becomes float32 with float64).
_UP = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64,
       torch.float64: torch.float64}


def _torch_side(name: str, args, kwargs, dtypes):
    """torch's (forward error, result dtype, backward error) for the call; without a half
    kernel, those of the call one step up, its dtype stepped back down."""
    error, out, backward_error, _ = _run(getattr(TF, name), *_build(args, kwargs, dtypes))
    if error is None or "not implemented for" not in str(error):
        return error, None if out is None else out.dtype, backward_error, out
    up = {s: _UP[d] for s, d in dtypes.items()}
    error, out, backward_error, _ = _run(getattr(TF, name), *_build(args, kwargs, up))
    down = {up[s]: d for s, d in dtypes.items()}
    return error, None if out is None else down[out.dtype], backward_error, None


def _check(name: str, label: str, args, kwargs, dtypes, refused: set, backward_refused: set) -> list[str]:
    problems = []
    l_args, l_kwargs, l_leaves = _build(args, kwargs, dtypes)
    error, out, backward_error, grads = _run(getattr(LF, name), l_args, l_kwargs, l_leaves)
    t_error, t_dtype, t_backward_error, t_out = _torch_side(name, args, kwargs, dtypes)
    if error is not None:
        if t_error is None:
            problems.append(f"{label}: losskit raised {error!r}, torch computed")
        return problems
    if t_error is not None:
        refused.add(name)
        rule = REFUSED_BY_TORCH.get(name)
        want = _promoted(list(dtypes.values())) if rule == "promoted" else dtypes[0]
        if rule is None:
            problems.append(f"{label}: losskit computed, torch raised {str(t_error)[:60]!r}")
        elif out.dtype != want:
            problems.append(f"{label}: torch refuses; losskit's result {out.dtype}, not the {rule} dtype {want}")
    elif out.dtype != t_dtype:
        problems.append(f"{label}: result {out.dtype}, torch's {t_dtype}")
    if t_error is None and t_backward_error is not None:
        backward_refused.add(name)
    if backward_error is not None:
        problems.append(f"{label}: losskit's backward raised {backward_error!r}")
    for leaf, g in zip(l_leaves, grads or ()):
        if g is not None and g.dtype != leaf.dtype:
            problems.append(f"{label}: gradient {g.dtype} for a {leaf.dtype} leaf")
    # the value, against torch in float64 on the same rounded inputs
    r_error, reference, _, _ = _run(getattr(TF, name), *_build(args, kwargs, dtypes, upcast=True))
    assert r_error is None, f"{label}: torch in float64 raised {r_error!r}"
    ours = out.detach().double()
    theirs = reference if t_out is None else t_out.detach().double()
    allowance = 2 * (theirs - reference).abs() + ALLOWANCE[out.dtype] * reference.abs().clamp_min(1)
    if not ((ours - reference).abs() <= allowance).all():
        problems.append(f"{label}: value {ours.flatten()[:3].tolist()} vs float64 {reference.flatten()[:3].tolist()}"
                        f" (torch {theirs.flatten()[:3].tolist()})")
    return problems


@pytest.mark.parametrize("name", TWINS)
def test_mixed_precision_result_dtype_is_torchs(name):
    calls = list(_calls(name))
    assert calls, f"{name}: no sample call in tests/cases.py that torch computes"
    problems: list[str] = []
    refused: set[str] = set()
    backward_refused: set[str] = set()
    for label, args, kwargs, dtypes in calls:
        problems += _check(name, label, args, kwargs, dtypes, refused, backward_refused)
    for case_id in PENDING:
        if any(case.id == case_id for case in _samples(name)):
            awaiting = [p for p in problems if p.startswith(case_id + "(")]
            assert awaiting, f"{case_id} now gives torch's dtypes: remove it from PENDING"
            problems = [p for p in problems if p not in awaiting]
    assert not problems, f"{len(problems)} of {len(calls)} calls:\n" + "\n".join(problems[:40])
    # The README rows stay true: torch refuses exactly the mixes listed above.
    assert refused == {name} & set(REFUSED_BY_TORCH), f"{name}: torch refused a mix: {bool(refused)}"
    assert backward_refused == {name} & BACKWARD_REFUSED_BY_TORCH, \
        f"{name}: torch's backward refused a mix: {bool(backward_refused)}"


def test_every_weight_is_exercised():
    """Each weight-like parameter of a torch twin appears in a sample call above."""
    missing = []
    for name in TWINS:
        wanted = {p for p in _torch_parameters(name) or () if "weight" in p and p != "linear_weight"}
        given = set()
        for case in _samples(name):
            _, args, kwargs = case.build(Inputs("cpu", torch.float64, seed=3))
            given |= {k for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        missing += [f"{name}({p})" for p in sorted(wanted - given)]
    assert not missing, f"no sample call passes {missing}"
