"""The fused triplet_margin's anchor gradient in half types (kernels/embedding.py).

Without swap, where all three inputs want a gradient, the node keeps dp and dn only (as
torch keeps two differences) and backward forms da = -(dp + dn) from them: in bfloat16 or
float16 da then carries the roundings of dp and dn and of their sum, at the size of dp and
dn, as torch's own half-type da does, which its autograd sums from the same two half-type
gradients. losskit's accuracy contract: no larger error against float64 than torch's own on
the same inputs. Held here in aggregate over many random calls, half of them with dp and dn
nearly cancelling (the negative a small step from the positive), by the median, the 90th
percentile and the largest of the per-call errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF

CALLS = 400


def _calls(dtype):
    g = torch.Generator().manual_seed(16)
    for i in range(CALLS):
        n, d = (int(v) for v in torch.randint(1, 9, (2,), generator=g))
        a, pos, neg = (torch.randn(n, d, generator=g) for _ in range(3))
        if i % 2:  # s_ap ~ s_an: da = h (s_ap - s_an) nearly cancels
            neg = pos + 1e-2 * torch.randn(n, d, generator=g)
        reduction = ("mean", "sum", "none")[i % 3]
        kwargs = {"margin": 0.1 + 3 * float(torch.rand((), generator=g)), "p": (2.0, 1.0, 3.0, 1.5)[i // 3 % 4],
                  "reduction": reduction}
        grad_output = torch.randn((n,) if reduction == "none" else (), generator=g) + (i % 4 >= 2)
        yield [t.to(dtype) for t in (a, pos, neg)], kwargs, grad_output.to(dtype)


def _anchor_gradient(fn, inputs, kwargs, grad_output):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = fn(*leaves, **kwargs)
    return torch.autograd.grad(loss, leaves, grad_output.to(loss.dtype))[0].double()


def _relative_error(got, ref):
    """The largest error over the call's elements, relative to the largest reference; inf
    where the gradient is not finite (torch's float16 overflows |x|^(p - 1) for p = 3)."""
    scale = ref.abs().max()
    error = float((got - ref).abs().max() / scale if scale > 0 else (got - ref).abs().max())
    return error if error == error else float("inf")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_type_anchor_gradient_no_less_accurate_than_torch(dtype):
    ours, theirs = [], []
    for inputs, kwargs, grad_output in _calls(dtype):
        ref = _anchor_gradient(TF.triplet_margin_loss, [t.double() for t in inputs], kwargs, grad_output.double())
        ours.append(_relative_error(_anchor_gradient(LF.triplet_margin_loss, inputs, kwargs, grad_output), ref))
        theirs.append(_relative_error(_anchor_gradient(TF.triplet_margin_loss, inputs, kwargs, grad_output), ref))
    ours_t, theirs_t = torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64)
    for q in (0.5, 0.9, 1.0):
        mine, torch_s = (float(e.quantile(q, interpolation="higher")) for e in (ours_t, theirs_t))
        assert mine <= torch_s, f"{dtype} anchor gradient, quantile {q} of the relative error: ours {mine}, torch's {torch_s}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_type_anchor_gradient_is_the_negated_sum_of_the_others(dtype):
    # The same bits on every path: the sum formed in float32 and rounded once, then negated.
    g = torch.Generator().manual_seed(17)
    leaves = [torch.randn(40, 300, generator=g).to(dtype).requires_grad_() for _ in range(3)]
    loss = LF.triplet_margin_loss(*leaves, reduction="none")
    go = torch.randn(40, generator=g).to(dtype)
    da, dp, dn = torch.autograd.grad(loss, leaves, go)
    want = (dp.float() + dn.float()).to(dtype).neg()
    torch.testing.assert_close(da, want, rtol=0, atol=0)
