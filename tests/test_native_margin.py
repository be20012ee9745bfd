"""The compiled forms of multi_margin_loss and multilabel_margin_loss (losskit._native
margin.cpp) against the Python kernels they replace in eager CPU calls, and against torch.

Up to PAIRWISE_CLASSES classes both give the same bits; beyond it the compiled multilabel
loop is torch's own arithmetic (per-term float32, summed in double, per row), while the
Python form sums the same terms by sort and prefix sums: their losses agree to float32
rounding, their gradients exactly (both are counts of terms, scaled once).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from losskit import _native, checks
from losskit._core import switches
from losskit.functional.margin import PAIRWISE_CLASSES

native = _native.load() if os.environ.get("LOSSKIT_NATIVE", "1") != "0" else None
needs_native = pytest.mark.skipif(native is None, reason="losskit._native is not built here (make test builds it)")


def _scores(shape, dtype, seed, special=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    if special and x.numel() > 6:
        flat = x.view(-1)
        flat[0], flat[3], flat[5] = float("nan"), float("inf"), -float("inf")
    return x.to(dtype)


def _multilabel_targets(rows, classes, seed, duplicates=False):
    g = torch.Generator().manual_seed(seed)
    target = torch.full((rows, classes), -1, dtype=torch.long)
    for r in range(rows):
        k = int(torch.randint(0, min(classes, 6) + 1, (1,), generator=g))
        target[r, :k] = torch.randperm(classes, generator=g)[:k]
        if duplicates and k >= 2:
            target[r, 1] = target[r, 0]  # a class listed twice counts twice, as in torch
        if k + 1 < classes:
            target[r, k + 1:] = torch.randint(0, classes, (classes - k - 1,), generator=g)  # ignored after the -1
    return target


def _both(fn, x, *args, grad_output=None, **kwargs):
    """(loss, grad) with the compiled form, then with the Python form."""
    results = []
    for context in (lambda: switches.chunk_sizes(), switches.without_native):
        leaf = x.detach().clone().requires_grad_()
        with context():
            loss = fn(leaf, *args, **kwargs)
        go = torch.full_like(loss, 0.75) if grad_output is None else grad_output.to(loss.dtype).reshape(loss.shape)
        (grad,) = torch.autograd.grad(loss, leaf, go)
        results.append((loss.detach(), grad, loss.grad_fn.name()))
    return results


def _same(got, ref):
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    assert got.dtype == ref.dtype and got.shape == ref.shape


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(7,), (1, 5), (6, 9), (33, 40)])
def test_multi_margin_same_bits_as_python(shape, weighted, p, reduction, dtype):
    x = _scores(shape, dtype, 0, special=shape == (6, 9))
    classes = shape[-1]
    target = torch.randint(0, classes, shape[:-1], generator=torch.Generator().manual_seed(1))
    weight = torch.rand(classes, generator=torch.Generator().manual_seed(2)) - 0.2 if weighted else None
    rows = 1 if len(shape) == 1 else shape[0]
    go = torch.linspace(-2, 3, rows) if reduction == "none" else torch.tensor(-1.5)
    (loss, grad, node), (ref_loss, ref_grad, _) = _both(LF.multi_margin_loss, x, target, p=p, margin=0.7,
                                                        weight=weight, reduction=reduction, grad_output=go)
    assert node == "FusedMultiMarginLossBackward"
    _same(loss, ref_loss)
    _same(grad, ref_grad)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(6,), (5, 4), (9, 10), (16, PAIRWISE_CLASSES)])
def test_multilabel_margin_pairwise_same_bits_as_python(shape, reduction, dtype):
    rows, classes = (1, shape[0]) if len(shape) == 1 else shape
    x = _scores(shape, dtype, 3, special=shape == (9, 10))
    target = _multilabel_targets(rows, classes, 4, duplicates=True).reshape(shape)
    go = torch.linspace(-2, 3, rows) if reduction == "none" else torch.tensor(2.5)
    (loss, grad, node), (ref_loss, ref_grad, _) = _both(LF.multilabel_margin_loss, x, target, reduction=reduction,
                                                        grad_output=go)
    assert node == "FusedMultilabelMarginLossBackward"
    _same(loss, ref_loss)
    _same(grad, ref_grad)


@needs_native
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("special", [False, True])
def test_multilabel_margin_rows_loop_against_python_and_torch(reduction, special):
    # Beyond PAIRWISE_CLASSES: gradients the same bits, losses within float32 rounding; the
    # compiled loop sums torch's terms in torch's order (then scales by 1 / C where torch
    # divides by C: one rounding apart).
    rows, classes = 24, 3 * PAIRWISE_CLASSES + 5
    x = _scores((rows, classes), torch.float32, 5, special=special)
    target = _multilabel_targets(rows, classes, 6, duplicates=True)
    (loss, grad, node), (ref_loss, ref_grad, _) = _both(LF.multilabel_margin_loss, x, target, reduction=reduction)
    assert node == "FusedMultilabelMarginLossBackward"
    torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=1e-6, equal_nan=True)
    _same(grad, ref_grad)
    if reduction == "none" and not special:
        torch.testing.assert_close(loss, TF.multilabel_margin_loss(x, target, reduction="none"), rtol=1.2e-7, atol=0)


@needs_native
def test_no_grad_and_inputs_that_want_none_give_the_loss_alone():
    x, target = _scores((4, 5), torch.float32, 7), torch.tensor([0, 1, 2, 4])
    with torch.no_grad():
        loss = LF.multi_margin_loss(x.requires_grad_(), target)
    assert loss.grad_fn is None
    with switches.without_native():
        _same(loss, LF.multi_margin_loss(x.detach(), target))
    labels = _multilabel_targets(4, 5, 8)
    assert LF.multilabel_margin_loss(x.detach(), labels).grad_fn is None


@needs_native
def test_a_second_backward_and_create_graph_replay_on_the_python_path():
    x = _scores((4, 5), torch.float32, 9).requires_grad_()
    target = torch.tensor([0, 1, 2, 4])
    loss = LF.multi_margin_loss(x, target, p=2)
    (once,) = torch.autograd.grad(loss, x, retain_graph=True)
    (twice,) = torch.autograd.grad(loss, x)
    _same(once, twice)
    loss = LF.multilabel_margin_loss(x, _multilabel_targets(4, 5, 10))
    (first,) = torch.autograd.grad(loss, x, create_graph=True)
    with switches.without_native():
        (ref,) = torch.autograd.grad(LF.multilabel_margin_loss(x, _multilabel_targets(4, 5, 10)), x)
    _same(first.detach(), ref)


@needs_native
@pytest.mark.parametrize("mode", ["full", "off"])
def test_targets_out_of_range_take_the_python_path(mode):
    x = _scores((3, 4), torch.float32, 11).requires_grad_()
    if mode == "full":
        with pytest.raises(IndexError, match=r"multi_margin_loss: target 4 at index \(1,\) is out of range for 4 classes"):
            LF.multi_margin_loss(x, torch.tensor([0, 4, 1]))
        with pytest.raises(IndexError, match=r"multilabel_margin_loss: target -2 at index \(0, 1\) is out of range for 4 classes"):
            LF.multilabel_margin_loss(x, torch.tensor([[1, -2, -1, 0]] * 3))
    # Values past a row's first -1 are never read (torch refuses them; losskit ignores them,
    # as everything after the -1): the Python path serves the call.
    target = torch.tensor([[1, -1, 7, -5]] * 3)
    with checks(mode):
        loss = LF.multilabel_margin_loss(x, target)
    assert loss.grad_fn.name() == "_MultilabelMarginBackward"
    _same(loss, LF.multilabel_margin_loss(x, torch.tensor([[1, -1, 0, 0]] * 3)))


# ---- the composed losses: the Python form's ops, run from C++ (embedding.cpp) --------------

def _composed_calls(dtype, shape):
    """(name, fn, differentiable leaves, other arguments, options) for each composed loss."""
    g = torch.Generator().manual_seed(12)

    def x(scale=2.0):
        return (torch.randn(shape, generator=g) * scale).to(dtype)

    signs = (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(dtype)
    row_signs = torch.tensor([1, -1, 0, 2] * shape[0])[: shape[0]].to(dtype)  # 0 and 2: neither label
    multi_hot = torch.rand(shape, generator=g).round().to(dtype)
    weight = torch.rand(shape[-1], generator=g) + 0.1
    hinge_target = torch.tensor([1.0, -1.0, 0.0, 2.0] * (shape[0] * shape[1]))[: shape[0] * shape[1]].reshape(shape)
    return [
        ("soft_margin", LF.soft_margin_loss, [x()], [signs], {}),
        ("multilabel_soft_margin", LF.multilabel_soft_margin_loss, [x()], [multi_hot], {}),
        ("multilabel_soft_margin weighted", LF.multilabel_soft_margin_loss, [x()], [multi_hot],
         {"weight": weight.to(dtype)}),
        ("margin_ranking", LF.margin_ranking_loss, [x(), x()], [signs], {"margin": 0.3}),
        ("hinge_embedding", LF.hinge_embedding_loss, [x().abs()], [hinge_target.to(dtype)], {"margin": 1.5}),
        ("cosine_embedding", LF.cosine_embedding_loss, [x(), x()], [row_signs], {"margin": 0.2}),
        ("triplet_margin", LF.triplet_margin_loss, [x(), x(), x()], [], {"p": 1.5, "swap": True, "margin": 0.5}),
        ("triplet_margin p=2", LF.triplet_margin_loss, [x(), x(), x()], [], {}),
        ("triplet_margin_with_distance", LF.triplet_margin_with_distance_loss, [x(), x(), x()], [], {"swap": True}),
    ]


def _composed_run(fn, leaves, others, kwargs, grad_output_seed):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves, *others, **kwargs)
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_output_seed)).to(loss.dtype)
    grads = torch.autograd.grad(loss, leaves, go, create_graph=True)
    # create_graph: the second derivative goes through the same graph (where the gradient
    # depends on the inputs: not for the piecewise-linear hinges)
    outer = sum(g.float().pow(2).sum() for g in grads)
    second = torch.autograd.grad(outer, leaves, allow_unused=True) if outer.requires_grad else []
    return loss.detach(), [g.detach() for g in grads], second, loss.grad_fn.name()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("index", range(9))
def test_composed_losses_same_bits_and_graph_as_python(index, reduction, dtype):
    name, fn, leaves, others, kwargs = _composed_calls(dtype, (6, 5))[index]
    got = _composed_run(fn, leaves, others, {**kwargs, "reduction": reduction}, index)
    with switches.without_native():
        ref = _composed_run(fn, leaves, others, {**kwargs, "reduction": reduction}, index)
    assert got[3] == ref[3], name  # the same autograd graph: the same last node
    _same(got[0], ref[0])
    for a, b in zip(got[1], ref[1]):
        _same(a, b)
    for a, b in zip(got[2], ref[2]):
        assert (a is None) == (b is None)
        if a is not None:
            _same(a, b)


@needs_native
def test_composed_losses_take_the_compiled_form_where_it_serves(monkeypatch):
    from losskit.kernels.fused_op import native_module

    module, taken = native_module(), []
    for name in ("margin_ranking", "hinge_embedding", "cosine_embedding", "triplet_margin"):
        compiled = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _f=compiled, _n=name: taken.append(_n) or _f(*args))
    for _, fn, leaves, others, kwargs in _composed_calls(torch.float32, (4, 3)):
        fn(*leaves, *others, **kwargs)
    assert taken == ["margin_ranking", "hinge_embedding", "cosine_embedding", "triplet_margin", "triplet_margin",
                     "triplet_margin"]
    taken.clear()
    x = torch.randn(4, 3)
    with switches.without_native():
        LF.soft_margin_loss(x, x.sign())
    LF.soft_margin_loss(x.to("meta"), x.sign().to("meta"))
    assert taken == []


@needs_native
def test_composed_losses_keep_the_python_form_where_the_compiled_one_does_not_serve():
    # A tensor margin, unequal shapes that broadcast, a weight that enlarges the result: the
    # Python form, with the same result; and the same errors on both paths.
    a = torch.randn(4, 3, requires_grad=True)
    b, y = torch.randn(4, 3), torch.randn(4, 3).sign()
    margin = torch.tensor(0.25)
    with switches.without_native():
        ref = LF.margin_ranking_loss(a, b, y, margin=margin)
    _same(LF.margin_ranking_loss(a, b, y, margin=margin), ref)
    row = torch.randn(1, 3)
    with switches.without_native():
        ref = LF.margin_ranking_loss(a, row, y)
    _same(LF.margin_ranking_loss(a, row, y), ref)
    weight = torch.rand(2, 4, 3)
    with switches.without_native():
        ref = LF.multilabel_soft_margin_loss(a, y.clamp_min(0), weight=weight, reduction="none")
    _same(LF.multilabel_soft_margin_loss(a, y.clamp_min(0), weight=weight, reduction="none"), ref)
    with pytest.raises(ValueError, match="triplet_margin_loss: margin must be > 0; got 0.0"):
        LF.triplet_margin_loss(a, b, b, margin=0.0)
    with pytest.raises(ValueError, match="triplet_margin_with_distance_loss: margin must be > 0; got -1.0"):
        LF.triplet_margin_with_distance_loss(a, b, b, margin=-1.0)
