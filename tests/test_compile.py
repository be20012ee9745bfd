"""Every loss under torch.compile(fullgraph=True) with inductor: no graph break, and eager's
values and gradients. Plus compiled training steps with the cross-entropy Modules."""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_flatten

import losskit.nn as lnn
from cases import CASES
from inputs import Inputs


def _grad_inputs(args, kwargs) -> list[torch.Tensor]:
    return [t for t in tree_flatten((list(args), kwargs))[0] if isinstance(t, torch.Tensor) and t.requires_grad]


def _run(fn, args, kwargs):
    loss = fn(*args, **kwargs)
    leaves = _grad_inputs(args, kwargs) + list(getattr(fn, "parameters", lambda: [])())
    grads = torch.autograd.grad(loss.sum() * 1.5, leaves, allow_unused=True) if loss.requires_grad else []
    return loss.detach(), grads


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_compiled_equals_eager(case):
    torch.manual_seed(0)  # Modules draw their parameters from the global generator
    fn, args, kwargs = case.build(Inputs("cpu"))
    want, want_grads = _run(fn, args, kwargs)
    torch.manual_seed(0)
    fn, args, kwargs = case.build(Inputs("cpu"))  # fresh leaves, same numbers
    compiled = torch.compile(fn, fullgraph=case.fullgraph, backend="inductor")
    got, got_grads = _run(compiled, args, kwargs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
