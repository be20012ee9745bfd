"""The fused paths of poisson_nll_loss, gaussian_nll_loss, kl_div, sigmoid_focal_loss,
softmax_focal_loss, poly1_cross_entropy, js_divergence and info.kl_divergence
(the elementwise_forward, target_prob_forward and row_divergence_forward of kernels/likelihood.py,
target_probability.py and row_divergence.py, and their compiled forms in src/pointwise.cpp):

- the loss has the composed form's bits (the fused forms form it by the same ops), and the
  written-out gradient agrees with autograd's through the composed form (the oracle, run
  under reference_only on the same inputs) to float32 rounding;
- the compiled forms give the Python forms' bits, over the options the catalog cases do not
  reach (tests/test_native.py runs those);
- calls the fused forms do not serve (a gradient they do not write out, 0 < gamma < 1) take
  the composed form.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import losskit.functional as LF
from losskit import _native, info
from losskit._core import switches

native = _native.load() if os.environ.get("LOSSKIT_NATIVE", "1") != "0" else None
needs_native = pytest.mark.skipif(
    native is None, reason="losskit._native is not built here (make test builds it and sets LOSSKIT_NATIVE=require)"
)

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g)
    x[0, :3] = torch.tensor([25.0, -25.0, 0.0])  # saturated sigmoid / huge exp
    lq = torch.randn(6, 5, generator=g).log_softmax(-1)
    lq[1, 2] = -math.inf  # a class of probability 0
    lp = torch.randn(6, 5, generator=g).log_softmax(-1)
    lp[0, 1] = -math.inf
    p = torch.randn(6, 5, generator=g).softmax(-1)
    p[2, :2] = torch.tensor([0.0, p[2, 0] + p[2, 1]])  # p = 0 somewhere
    labels = torch.tensor([1, -100, 2, 3, -100, 0])
    return {
        "x": x.to(dtype), "y": torch.randn(6, 5, generator=g).to(dtype),
        "counts": torch.poisson(torch.full((6, 5), 2.0), generator=g).to(dtype),
        "rate": (torch.rand(6, 5, generator=g) * 3).to(dtype),
        "var": (torch.rand(6, 5, generator=g) + 1e-3).to(dtype),
        "bits": torch.bernoulli(torch.full((6, 5), 0.3), generator=g).to(dtype),
        "soft": torch.rand(6, 5, generator=g).to(dtype),
        "lq": lq.to(dtype), "lp": lp.to(dtype), "p": p.to(dtype),
        "q": torch.randn(6, 5, generator=g).softmax(-1).to(dtype),
        "index": torch.randint(0, 5, (6,), generator=g), "ignored": torch.tensor([1, -100, 2, 3, -100, 0]),
        "none": torch.full((6,), -100), "alpha": torch.rand(5, generator=g), "labels": labels,
    }


# (name, fn, argument names, which of them want a gradient, kwargs, node name of the fused path)
ELEMENTWISE = "FusedElementwiseLossBackward"
TARGET_PROB = "FusedTargetProbLossBackward"
ROWS = "FusedRowDivergenceBackward"
CALLS = []
for red in ("mean", "sum", "none"):
    CALLS += [
        (f"poisson-{red}", LF.poisson_nll_loss, ("x", "y"), (0, 1), {"reduction": red}, ELEMENTWISE),
        (f"poisson-full-{red}", LF.poisson_nll_loss, ("x", "counts"), (0,), {"reduction": red, "full": True}, ELEMENTWISE),
        (f"poisson-rate-{red}", LF.poisson_nll_loss, ("rate", "counts"), (0, 1),
         {"reduction": red, "log_input": False}, ELEMENTWISE),
        (f"gaussian-{red}", LF.gaussian_nll_loss, ("x", "y", "var"), (0, 1, 2), {"reduction": red, "full": True},
         ELEMENTWISE),
        (f"gaussian-clamped-{red}", LF.gaussian_nll_loss, ("x", "y", "var"), (0, 2), {"reduction": red, "eps": 0.3},
         ELEMENTWISE),
        (f"sigmoid_focal-{red}", LF.sigmoid_focal_loss, ("x", "bits"), (0,), {"reduction": red}, ELEMENTWISE),
        (f"sigmoid_focal-g3-soft-{red}", LF.sigmoid_focal_loss, ("x", "soft"), (0,),
         {"reduction": red, "gamma": 3.0, "alpha": -1}, ELEMENTWISE),
        (f"sigmoid_focal-g0-{red}", LF.sigmoid_focal_loss, ("x", "bits"), (0,), {"reduction": red, "gamma": 0.0},
         ELEMENTWISE),
        (f"sigmoid_focal-g1-{red}", LF.sigmoid_focal_loss, ("x", "bits"), (0,), {"reduction": red, "gamma": 1.0},
         ELEMENTWISE),
        (f"softmax_focal-{red}", LF.softmax_focal_loss, ("x", "index"), (0,), {"reduction": red}, TARGET_PROB),
        (f"softmax_focal-alpha-ignored-{red}", LF.softmax_focal_loss, ("x", "ignored", "alpha"), (0,),
         {"reduction": red, "gamma": 3.0}, TARGET_PROB),
        (f"softmax_focal-g0-none-counts-{red}", LF.softmax_focal_loss, ("x", "none"), (0,),
         {"reduction": red, "gamma": 0.0, "alpha": 0.3}, TARGET_PROB),
        (f"softmax_focal-g1-{red}", LF.softmax_focal_loss, ("x", "ignored"), (0,), {"reduction": red, "gamma": 1.0},
         TARGET_PROB),
        (f"poly1-{red}", LF.poly1_cross_entropy, ("x", "ignored"), (0,), {"reduction": red, "epsilon": 2.0},
         TARGET_PROB),
    ]
for red in ("batchmean", "mean", "sum", "none"):
    CALLS += [
        (f"kl_div-log-target-{red}", LF.kl_div, ("lq", "lp"), (0, 1), {"reduction": red, "log_target": True},
         ELEMENTWISE),
        (f"kl_div-{red}", LF.kl_div, ("lq", "p"), (0,), {"reduction": red}, ELEMENTWISE),
    ]
for red in ("batchmean", "sum", "none"):
    for beta in (0.5, 0.0, 1.0, 0.2):
        CALLS += [
            (f"js-b{beta}-{red}", LF.js_divergence, ("lq", "lp"), (0,), {"reduction": red, "beta": beta}, ROWS),
            (f"js-logits-labels-b{beta}-{red}", LF.js_divergence, ("x", "y"), (0,),
             {"reduction": red, "beta": beta, "from_logits": True, "labels": "labels"}, ROWS),
            (f"js-no-label-counts-b{beta}-{red}", LF.js_divergence, ("lq", "lp"), (0,),
             {"reduction": red, "beta": beta, "labels": "none"}, ROWS),
        ]
CALLS += [
    ("info.kl_divergence", info.kl_divergence, ("p", "q"), (1,), {}, ROWS),
    ("info.kl_divergence-p-zero", info.kl_divergence, ("p", "p"), (1,), {}, ROWS),
    ("info.kl_divergence-bits", info.kl_divergence, ("p", "q"), (1,), {"base": 2}, "DivBackward0"),
]


def _run(call, dtype, grad_output):
    _, fn, names, wanted, kwargs, _ = call
    values = _inputs(dtype)
    args = [values[n].detach().clone().requires_grad_(i in wanted) for i, n in enumerate(names)]
    kwargs = {k: values[v] if k == "labels" else v for k, v in kwargs.items()}
    loss = fn(*args, **kwargs)
    leaves = [a for i, a in enumerate(args) if i in wanted]
    grads = torch.autograd.grad(loss, leaves, torch.full_like(loss, grad_output))
    return loss.detach(), grads, loss.grad_fn.name()


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.filterwarnings("ignore:kl_div. reduction='mean'")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("call", CALLS, ids=lambda c: c[0])
def test_the_fused_path_has_the_composed_loss_and_its_gradient(call, dtype):
    loss, grads, node = _run(call, dtype, 0.75)
    assert node == call[5]
    with switches.reference_only():  # the composed form, which autograd differentiates
        ref_loss, ref_grads, ref_node = _run(call, dtype, 0.75)
    assert ref_node != call[5] or call[5] == "DivBackward0"
    _same(loss, ref_loss)
    # The written-out gradient rounds differently from autograd's chain: float32 rounding,
    # and for bfloat16 one more rounding (of the gradient before grad_output scales it).
    tol = {"rtol": 2e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-3}
    for got, ref in zip(grads, ref_grads):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        torch.testing.assert_close(got, ref, equal_nan=True, **tol)


@needs_native
@pytest.mark.filterwarnings("ignore:kl_div. reduction='mean'")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("call", CALLS, ids=lambda c: c[0])
def test_the_compiled_forms_give_the_python_forms_bits(call, dtype):
    loss, grads, _ = _run(call, dtype, 0.75)
    with switches.without_native():
        ref_loss, ref_grads, _ = _run(call, dtype, 0.75)
    _same(loss, ref_loss)
    for got, ref in zip(grads, ref_grads):
        _same(got, ref)


def test_calls_the_fused_forms_do_not_serve_take_the_composed_form():
    x = torch.randn(4, 3, requires_grad=True)
    assert LF.sigmoid_focal_loss(x, torch.rand(4, 3), gamma=0.5).grad_fn.name() != ELEMENTWISE
    p = torch.rand(4, 3, requires_grad=True)
    assert LF.kl_div(x.log_softmax(-1), p, reduction="sum").grad_fn.name() != ELEMENTWISE  # xlogy(p, p)'s gradient
    assert LF.poisson_nll_loss(x, p, full=True).grad_fn.name() != ELEMENTWISE  # Stirling's gradient for the counts
    assert LF.softmax_focal_loss(x, torch.tensor([0, 1, 2, 0]), gamma=0.5).grad_fn.name() != TARGET_PROB
    assert LF.js_divergence(x.log_softmax(-1), p.log()).grad_fn.name() != ROWS  # the teacher's gradient
    with torch.no_grad():
        assert LF.gaussian_nll_loss(x, x, torch.ones(4, 3)).grad_fn is None
