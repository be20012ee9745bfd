"""Autograd beyond ``loss.backward()``: loss-only evaluation under no_grad and
inference_mode, torch.func grad / vmap, forward-mode AD and gradcheck without knowing
about reference_only(), double backward through the fused paths, backward twice, and the
memory the fused paths keep between forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch.func import grad as func_grad
from torch.func import vmap
from torch.utils._python_dispatch import TorchDispatchMode

import losskit.functional as LF


# ---- no_grad: the loss only -----------------------------------------------------------

class Counting(TorchDispatchMode):
    """Counts the gradient work of the fused kernels: each chunk whose softmax is turned
    into a gradient (:func:`losskit.kernels.rows.apply_gradient`, as the CPU kernel calls
    it), and the weight-gradient matmuls of the linear kernel (``addmm_``, dispatched)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.grad_chunks = 0
        self.matmuls = 0
        import losskit.kernels.cross_entropy as kernel

        apply_gradient = kernel.apply_gradient

        def counted(*args, **kwargs):
            self.grad_chunks += 1
            return apply_gradient(*args, **kwargs)

        monkeypatch.setattr(kernel, "apply_gradient", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.matmuls += func is torch.ops.aten.addmm_.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_grad_computes_the_loss_only(context, monkeypatch):
    counts = Counting(monkeypatch)
    x = torch.randn(16, 9, requires_grad=True)
    target = torch.randint(0, 9, (16,))
    hidden, head = torch.randn(16, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    with context(), counts:
        ce = LF.cross_entropy(x, target, label_smoothing=0.1)
        lce = LF.linear_cross_entropy(hidden, head, target, chunk_size=5)
    assert counts.grad_chunks == 0 and counts.matmuls == 0
    assert not ce.requires_grad and not lce.requires_grad
    torch.testing.assert_close(ce, TF.cross_entropy(x.detach(), target, label_smoothing=0.1))
    torch.testing.assert_close(lce, TF.cross_entropy(hidden.detach() @ head.detach().T, target))
    with counts:
        LF.cross_entropy(x, target).backward()  # with grad mode on, the gradient is made
        LF.linear_cross_entropy(hidden, head, target, chunk_size=5).backward()
    assert counts.grad_chunks > 0 and counts.matmuls > 0


# ---- transforms, gradcheck, double backward -------------------------------------------

def test_torch_func_grad_and_vmap_take_the_reference_path_by_themselves():
    x = torch.randn(5, 7)
    target = torch.randint(0, 7, (5,))
    want = torch.autograd.grad(TF.cross_entropy(x.requires_grad_(), target), x)[0]
    torch.testing.assert_close(func_grad(lambda a: LF.cross_entropy(a, target))(x.detach()), want)
    per_sample = vmap(lambda a, t: LF.cross_entropy(a.unsqueeze(0), t.unsqueeze(0)))(x.detach(), target)
    torch.testing.assert_close(per_sample, TF.cross_entropy(x.detach(), target, reduction="none"))
    hidden, head = torch.randn(5, 3), torch.randn(7, 3)
    got = func_grad(lambda h: LF.linear_cross_entropy(h, head, target))(hidden)
    torch.testing.assert_close(got, func_grad(lambda h: TF.cross_entropy(h @ head.T, target))(hidden))


def test_forward_mode_ad_takes_the_reference_path():
    import torch.autograd.forward_ad as fwAD

    x, tangent, target = torch.randn(4, 6), torch.randn(4, 6), torch.randint(0, 6, (4,))
    with fwAD.dual_level():
        got = fwAD.unpack_dual(LF.cross_entropy(fwAD.make_dual(x, tangent), target)).tangent
        want = fwAD.unpack_dual(TF.cross_entropy(fwAD.make_dual(x, tangent), target)).tangent
    torch.testing.assert_close(got, want)


def test_gradcheck_and_gradgradcheck_work_without_reference_only():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, -100, 3])
    assert torch.autograd.gradcheck(lambda a: LF.cross_entropy(a, target, label_smoothing=0.1), (x,))
    assert torch.autograd.gradgradcheck(lambda a: LF.cross_entropy(a, target), (x,))
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: LF.linear_cross_entropy(a, b, target.clamp_min(0)), (x, w))


def _fused_calls():
    """(name, loss of the leaves, leaves) for each fused kernel, in float32."""
    target = torch.tensor([0, 1, 2, 3])
    logits = torch.randn(4, 5, requires_grad=True)
    probs = torch.rand(4, 5)
    hidden, head = torch.randn(2, 2, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    return [
        ("cross_entropy", lambda a, ref: ref.cross_entropy(a, target, label_smoothing=0.1), (logits,)),
        ("bce_with_logits", lambda a, ref: ref.binary_cross_entropy_with_logits(a, probs), (logits,)),
        ("linear_cross_entropy", lambda h, w, ref: _linear(ref, h, w, target.reshape(2, 2), "mean"), (hidden, head)),
        ("linear_cross_entropy none", lambda h, w, ref: _linear(ref, h, w, target.reshape(2, 2), "none").sum(),
         (hidden, head)),
    ]


def _linear(module, h, w, target, reduction):
    if module is TF:
        return TF.cross_entropy((h @ w.T).movedim(-1, 1), target, reduction=reduction)
    return LF.linear_cross_entropy(h, w, target, reduction=reduction)


@pytest.mark.parametrize("case", range(4))
def test_double_backward_through_a_fused_path_matches_torch(case):
    name, fn, leaves = _fused_calls()[case]
    got = torch.autograd.grad(fn(*leaves, LF), leaves, create_graph=True)
    want = torch.autograd.grad(fn(*leaves, TF), leaves, create_graph=True)
    probe = [torch.randn_like(g) for g in got]  # a Hessian-vector product of each
    hvp_got = torch.autograd.grad(sum((g * p).sum() for g, p in zip(got, probe)), leaves)
    hvp_want = torch.autograd.grad(sum((g * p).sum() for g, p in zip(want, probe)), leaves)
    for a, b in zip(got + hvp_got, want + hvp_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", range(4))
def test_retained_graph_backward_twice_gives_the_same_gradient(case):
    name, fn, leaves = _fused_calls()[case]
    loss = fn(*leaves, LF)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


def test_double_backward_after_the_input_is_freed_or_changed_is_a_clear_error():
    x = torch.randn(4, 5, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3])
    loss = LF.cross_entropy(x * 2, target)  # the logits die with the expression
    with pytest.raises(RuntimeError, match="an input was freed or changed in place since forward"):
        torch.autograd.grad(loss, x, create_graph=True)
    logits = x * 2
    loss = LF.cross_entropy(logits, target)
    torch.autograd.grad(loss, x, retain_graph=True)
    with torch.no_grad():
        logits.add_(1.0)
    with pytest.raises(RuntimeError, match="changed in place since forward"):
        torch.autograd.grad(loss, x)


# ---- memory between forward and backward ------------------------------------------------

def _bytes_kept_for_backward(fn, *args, **kwargs) -> int:
    """Bytes of the distinct tensors autograd keeps for backward: saved tensors, plus what
    a fused kernel keeps on its ctx, leaves and inputs excluded."""
    inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(*args, **kwargs)
    precomputed = getattr(loss.grad_fn, "precomputed", None)
    for grad in [precomputed] if isinstance(precomputed, torch.Tensor) else precomputed or []:
        if isinstance(grad, torch.Tensor):
            kept[grad.untyped_storage().data_ptr()] = grad.untyped_storage().nbytes()
    return sum(kept.values())


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_keeps_at_most_one_logits_between_forward_and_backward(device, dtype):
    x = torch.randn(64, 1000, dtype=dtype, device=device, requires_grad=True)
    target = torch.randint(0, 1000, (64,), device=device)
    logits_bytes = x.numel() * x.element_size()
    ours = _bytes_kept_for_backward(LF.cross_entropy, x, target, label_smoothing=0.1)
    assert ours <= logits_bytes
    if device == "cpu":  # torch keeps its log-softmax, the same size
        assert _bytes_kept_for_backward(TF.cross_entropy, x, target, label_smoothing=0.1) >= logits_bytes


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_linear_cross_entropy_keeps_no_logits_on_any_device(device):
    n, h, c = 64, 16, 1000
    x = torch.randn(n, h, device=device, requires_grad=True)
    w = torch.randn(c, h, device=device, requires_grad=True)
    target = torch.randint(0, c, (n,), device=device)
    kept = _bytes_kept_for_backward(LF.linear_cross_entropy, x, w, target, chunk_size=8)
    assert kept <= (n * h + c * h) * 4  # the input and weight gradients, nothing of size n x c
    kept_none = _bytes_kept_for_backward(LF.linear_cross_entropy, x, w, target, reduction="none", chunk_size=8)
    assert kept_none < n * c * 4
