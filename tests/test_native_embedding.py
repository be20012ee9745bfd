"""The fused triplet_margin and cosine_embedding losses (kernels/embedding.py): the compiled
form (losskit._native embedding.cpp, blocks of rows) against the Python form (whole
tensors), to the bit, and both against torch and a float64 oracle.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from losskit import _native
from losskit._core import switches
from losskit.kernels import embedding

native = _native.load() if os.environ.get("LOSSKIT_NATIVE", "1") != "0" else None
needs_native = pytest.mark.skipif(native is None, reason="losskit._native is not built here (make test builds it)")


def _rows(shape, dtype, seed, special=False, count=3):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g) for _ in range(count)]
    if special and shape[0] >= 6:
        xs[1][0] = xs[0][0]  # d(a, p) = |eps|, and d(a, n) = d(p, n): the swap's tie
        xs[-1][1] = xs[0][1]  # d(a, n) = |eps|
        xs[0][2, 0] = float("nan")
        xs[-1][3, 1] = float("inf")
        xs[1][4] = 0.0  # a zero vector (cosine: the epsilon keeps it finite)
        xs[0][5] = xs[-1][5]
    return [x.to(dtype) for x in xs]


def _run(fn, leaves, others, kwargs, wanted, grad_output_seed):
    leaves = [t.detach().clone().requires_grad_(w) for t, w in zip(leaves, wanted)]
    loss = fn(*leaves, *others, **kwargs)
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_output_seed)).to(loss.dtype)
    targets = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(loss, targets, go)
    return loss.detach(), grads, loss.grad_fn.name()


def _same(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


def _both(fn, leaves, others, kwargs, wanted=None, seed=0):
    wanted = wanted or [True] * len(leaves)
    got = _run(fn, leaves, others, kwargs, wanted, seed)
    with switches.without_native():
        ref = _run(fn, leaves, others, kwargs, wanted, seed)
    assert got[2] == ref[2]
    _same(got[0], ref[0])
    for a, b in zip(got[1], ref[1]):
        _same(a, b)
    return got


# shapes: one block, several blocks, a row longer than a block, the longest row served
SHAPES = [(6, 5), (1, 7), (100, 1000), (7, 20000)]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("p, swap", [(2.0, False), (2.0, True), (1.0, True), (1.5, False), (3.0, True)])
@pytest.mark.parametrize("shape", SHAPES)
def test_triplet_same_bits_as_python(shape, p, swap, reduction, dtype):
    leaves = _rows(shape, dtype, 0, special=True)
    got = _both(LF.triplet_margin_loss, leaves, [], {"p": p, "swap": swap, "reduction": reduction, "margin": 0.7},
                seed=1)
    assert got[2] == "FusedTripletMarginBackward"


@needs_native
@pytest.mark.parametrize("wanted", [[True, False, False], [False, True, False], [False, False, True],
                                    [False, True, True], [True, True, False], [True, False, True]])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triplet_some_inputs_want_gradients(wanted, swap, dtype):
    leaves = _rows((40, 900), dtype, 2)
    _both(LF.triplet_margin_loss, leaves, [], {"swap": swap}, wanted=wanted, seed=3)
    _both(LF.triplet_margin_with_distance_loss, leaves, [], {"swap": swap}, wanted=wanted, seed=3)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wanted", [[True, True], [False, True]])
def test_cosine_same_bits_as_python(wanted, shape, reduction, dtype):
    x1, x2 = _rows(shape, dtype, 4, special=True, count=2)
    target = torch.tensor([1, -1, 0, 2, -1, 1] * shape[0])[: shape[0]].to(dtype)  # 0, 2: neither label
    got = _both(LF.cosine_embedding_loss, [x1, x2], [target], {"margin": -0.1, "reduction": reduction},
                wanted=wanted, seed=5)
    assert got[2] == "FusedCosineEmbeddingBackward"


def _errors(fn, leaves, others, kwargs, torch_fn, half):
    """Max error of the loss and of the gradients against float64 on the same (rounded) inputs."""
    exact = [t.double().requires_grad_() for t in leaves]
    want = torch_fn(*exact, *[o.double() for o in others], **kwargs)
    go = torch.randn(want.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    want_grads = torch.autograd.grad(want, exact, go)
    got_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    got = fn(*got_leaves, *others, **kwargs)
    got_grads = torch.autograd.grad(got, got_leaves, go.to(half))
    return ((got.double() - want).abs().max().item(),
            max((a.double() - b).abs().max().item() for a, b in zip(got_grads, want_grads)))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", ["triplet", "triplet swap p=1.5", "cosine"])
def test_bfloat16_at_least_as_accurate_as_torch_against_float64(name, reduction):
    # float32 math rounded once, against torch's bfloat16 kernels that round every op
    shape = (64, 256)
    if name.startswith("triplet"):
        leaves, others = _rows(shape, torch.bfloat16, 6), []
        kwargs = {"swap": True, "p": 1.5} if "swap" in name else {}
        ours, theirs = LF.triplet_margin_loss, TF.triplet_margin_loss
    else:
        leaves = _rows(shape, torch.bfloat16, 7, count=2)
        others = [torch.tensor([1.0, -1.0] * 32).to(torch.bfloat16)]
        kwargs, ours, theirs = {"margin": -0.2}, LF.cosine_embedding_loss, TF.cosine_embedding_loss
    kwargs["reduction"] = reduction
    got = _errors(ours, leaves, others, kwargs, theirs, torch.bfloat16)
    torch_errors = _errors(theirs, leaves, others, kwargs, theirs, torch.bfloat16)
    assert got[0] <= torch_errors[0] and got[1] <= torch_errors[1], (got, torch_errors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p, swap", [(2.0, False), (2.0, True), (1.0, False), (3.0, True)])
def test_triplet_ties_and_zero_distances_match_torch(p, swap, dtype):
    # eps = 0 with a = p: d(a, p) = 0, where torch's norm passes no gradient; a = p also makes
    # d(a, n) = d(p, n), the swap's tie (half the gradient to each)
    a, n = _rows((5, 4), torch.float64, 8, count=2)
    pos = a.clone()
    pos[3] += 0.5
    ours = [t.to(dtype).requires_grad_() for t in (a, pos, n)]
    theirs = [t.to(dtype).double().requires_grad_() for t in (a, pos, n)]
    kwargs = {"p": p, "swap": swap, "eps": 0.0, "reduction": "sum", "margin": 3.0}
    got, want = LF.triplet_margin_loss(*ours, **kwargs), TF.triplet_margin_loss(*theirs, **kwargs)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    torch.testing.assert_close(got.double(), want, **tol)
    for g, w in zip(torch.autograd.grad(got, ours), torch.autograd.grad(want, theirs)):
        torch.testing.assert_close(g.double(), w, **tol)


def _held_shapes(loss):
    if native is not None:
        return [tuple(t.shape) for t in native.held(loss.grad_fn)]
    return [tuple(t.shape) for t in loss.grad_fn.precomputed if t is not None]  # the autograd.Function's


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_swap_the_anchor_gradient_is_formed_in_backward(dtype, swap):
    # Without swap the node keeps dp and dn only (torch keeps two differences) and hands out
    # da = -(dp + dn), scaled (in bfloat16: the sum formed in float32, rounded once); swap
    # keeps all three.
    leaves = [t.requires_grad_() for t in _rows((8, 6), dtype, 11)]
    loss = LF.triplet_margin_loss(*leaves, swap=swap, reduction="none")
    derived = not swap
    assert _held_shapes(loss) == [(8, 6)] * (2 if derived else 3)
    go = torch.randn(8, generator=torch.Generator().manual_seed(12)).to(dtype)
    da, dp, dn = torch.autograd.grad(loss, leaves, go)
    if derived:
        _same(da, torch.add(dp, dn).neg_())
    refs = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(TF.triplet_margin_loss(*refs, swap=swap, reduction="none"), refs, go.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, ref in zip((da, dp, dn), want):
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_a_derived_anchor_gradient_second_backward_and_create_graph_replay():
    leaves = [t.requires_grad_() for t in _rows((8, 6), torch.float32, 13)]
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    loss, ref = LF.triplet_margin_loss(*leaves), TF.triplet_margin_loss(*refs)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    again = torch.autograd.grad(loss, leaves, create_graph=True)  # used up: replayed
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in again), leaves)
    ref_first = torch.autograd.grad(ref, refs, create_graph=True)
    ref_second = torch.autograd.grad(sum(g.pow(2).sum() for g in ref_first), refs)
    for got, want in zip([*first, *again, *second], [*ref_first, *ref_first, *ref_second]):
        torch.testing.assert_close(got, want)


@needs_native
def test_the_node_keeps_only_the_gradients_and_create_graph_replays():
    leaves = [t.requires_grad_() for t in _rows((8, 6), torch.float32, 10)]
    loss = LF.triplet_margin_loss(*leaves, swap=True)
    assert [tuple(t.shape) for t in native.held(loss.grad_fn)] == [(8, 6)] * 3
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in first), leaves)
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    ref = TF.triplet_margin_loss(*refs, swap=True)
    ref_first = torch.autograd.grad(ref, refs, create_graph=True)
    ref_second = torch.autograd.grad(sum(g.pow(2).sum() for g in ref_first), refs)
    for got, want in zip([*first, *second], [*ref_first, *ref_second]):
        torch.testing.assert_close(got, want)


def test_calls_it_does_not_serve_keep_the_composed_form():
    a, b, c = (t.requires_grad_() for t in _rows((4, 3), torch.float32, 11))
    assert LF.triplet_margin_loss(a, b, c).grad_fn.name() == "FusedTripletMarginBackward"
    assert LF.triplet_margin_loss(a, b, c, p=float("inf")).grad_fn.name() != "FusedTripletMarginBackward"
    assert LF.triplet_margin_loss(a, b, c, p=0.5).grad_fn.name() != "FusedTripletMarginBackward"
    assert LF.triplet_margin_loss(a[0], b[0], c[0]).grad_fn.name() != "FusedTripletMarginBackward"
    assert LF.triplet_margin_loss(a.double(), b, c).grad_fn.name() != "FusedTripletMarginBackward"
    with torch.no_grad():
        assert LF.cosine_embedding_loss(a, b, torch.ones(4)).grad_fn is None
    assert not embedding.fused_embedding_applies(torch.randn(2, embedding._LONGEST_ROW + 1, requires_grad=True))


ELEMENT_SHAPES = [(), (9,), (6, 5), (3, 7, 4), (70, 1000)]  # the last: several blocks


def _elements(shape, dtype, seed, count):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g) * 2 for _ in range(count)]
    if xs[0].numel() > 4:
        flat = xs[0].view(-1)
        flat[0], flat[1], flat[2] = float("nan"), float("inf"), 1.5  # 1.5: the hinge's tie at margin 1.5
        xs[1].view(-1)[3] = flat[3] + 0.25  # z = 0 for margin 0.25 and y = -1: the ranking's tie
    return [x.to(dtype) for x in xs]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", ELEMENT_SHAPES)
@pytest.mark.parametrize("wanted", [[True, True, False], [False, True, True], [True, False, False]])
def test_margin_ranking_same_bits_as_python(wanted, shape, reduction, dtype):
    x1, x2 = _elements(shape, dtype, 12, 2)
    target = (torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(13)) * 2 - 1).to(dtype)
    if target.numel() > 4:
        target.view(-1)[3] = -1
    got = _both(LF.margin_ranking_loss, [x1, x2, target], [], {"margin": 0.25, "reduction": reduction},
                wanted=wanted, seed=14)
    assert got[2] == "FusedMarginRankingBackward"


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", ELEMENT_SHAPES)
def test_hinge_embedding_same_bits_as_python(shape, reduction, dtype):
    (x,) = _elements(shape, dtype, 15, 1) if shape == () else _elements(shape, dtype, 15, 2)[:1]
    target = torch.tensor([1.0, -1.0, 0.0, 2.0, -1.0] * (x.numel() + 1))[: x.numel()].reshape(shape).to(dtype)
    got = _both(LF.hinge_embedding_loss, [x.abs()], [target], {"margin": 1.5, "reduction": reduction}, seed=16)
    assert got[2] == "FusedHingeEmbeddingBackward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_margin_ranking_target_gradient_matches_torch(reduction, dtype):
    # torch differentiates the target too: d/dy = (x2 - x1) where the hinge is open
    x1, x2, y = _elements((8, 5), torch.float64, 17, 3)
    y = y.sign()
    x1.view(-1)[:3] = 0.0  # no nan / inf here: a plain comparison
    x1 = x1.to(dtype).double()
    x2 = x2.to(dtype).double()
    check = [t.to(dtype).requires_grad_() for t in (x1, x2, y)]
    exact = [t.clone().requires_grad_() for t in (x1, x2, y)]
    got = LF.margin_ranking_loss(*check, margin=0.1, reduction=reduction)
    want = TF.margin_ranking_loss(*exact, margin=0.1, reduction=reduction)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    torch.testing.assert_close(got.double(), want, **tol)
    go = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(18)) + 2
    for g, w in zip(torch.autograd.grad(got, check, go.to(dtype)), torch.autograd.grad(want, exact, go)):
        torch.testing.assert_close(g.double(), w, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", [True, False])
def test_the_default_distance_computes_as_triplet_margin_loss(grad, dtype):
    # with or without a gradient (fused, or composed): the same numbers, a half type in float32
    leaves = [t.requires_grad_(grad) for t in _rows((6, 5), dtype, 19)]
    got = LF.triplet_margin_with_distance_loss(*leaves, swap=True, margin=0.8, reduction="none")
    want = LF.triplet_margin_loss(*leaves, swap=True, margin=0.8, reduction="none")
    _same(got.detach(), want.detach())
    with torch.no_grad():
        _same(LF.triplet_margin_with_distance_loss(*leaves, swap=True, margin=0.8, reduction="none"), got.detach())
