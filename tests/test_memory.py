"""Memory: what autograd keeps for backward, losskit against its torch twin on the same call.

"Saved" counts every storage the graph holds for backward, once each: the tensors autograd
saves (seen through ``torch.autograd.graph.saved_tensors_hooks``) and the tensors a
losskit autograd.Function keeps on its ctx or losskit's C++ nodes keep (a precomputed
gradient, CTC's gradient), found by walking the graph from the loss. An input saved by the
graph counts too: it is what keeps the input alive after forward, as torch's own losses do
with theirs. No timing, only sizes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import losskit.functional as LF
from losskit import _native
from cases import CASES
from inputs import Inputs

# Bytes losskit may save beyond torch: a few scalars and shapes.
SLACK = 256


def _storages(t: torch.Tensor, found: dict[int, int]) -> None:
    if isinstance(t, torch.Tensor) and t.device.type != "meta":
        storage = t.untyped_storage()
        found[storage.data_ptr()] = storage.nbytes()


def _walk_ctx(grad_fn, found: dict[int, int]) -> None:
    """Tensors on the ctx of every Python autograd.Function node reachable from grad_fn, and
    the gradients every C++ node of losskit's keeps."""
    native = _native.load()
    seen, stack = set(), [grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for t in [*native.held(node), *native.ctc_held(node)] if native is not None else ():
            _storages(t, found)
        for value in getattr(node, "__dict__", {}).values():
            for t in tree_flatten(value)[0]:
                _storages(t, found)
        stack.extend(next_node for next_node, _ in node.next_functions)


def saved_bytes(fn, args, kwargs) -> int:
    found: dict[int, int] = {}

    def pack(t):
        _storages(t, found)
        return t

    with warnings.catch_warnings(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        warnings.simplefilter("ignore")
        loss = fn(*args, **kwargs)
    _walk_ctx(loss.grad_fn, found)
    return sum(found.values())


def _twin_cases():
    for case in CASES:
        fn, _, _ = case.build(Inputs("cpu"))
        name = getattr(fn, "__name__", "")
        if case.id.startswith("functional.") or fn is getattr(LF, name, None):
            if hasattr(TF, name) and name != "pairwise_distance":
                yield pytest.param(case, id=case.id)


@pytest.mark.parametrize("case", list(_twin_cases()))
def test_losskit_saves_no_more_than_torch(case):
    fn, args, kwargs = case.build(Inputs("cpu"))
    twin = getattr(TF, fn.__name__)
    t_fn, t_args, t_kwargs = case.build(Inputs("cpu"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin(*t_args, **t_kwargs)
    except (TypeError, RuntimeError):
        pytest.skip("an option torch does not have, or a call torch rejects: no twin for this call")
    t_args, t_kwargs = case.build(Inputs("cpu"))[1:]
    ours, theirs = saved_bytes(fn, args, kwargs), saved_bytes(twin, t_args, t_kwargs)
    assert ours <= theirs + SLACK, f"{case.id}: losskit saves {ours} bytes for backward, torch {theirs}"


def _moderate(name: str, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, requires_grad=False):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(requires_grad)

    x = randn(256, 512, requires_grad=True)
    if name in ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"):
        return (x, randn(256, 512)), {}
    if name == "multi_margin_loss":
        return (x, torch.randint(0, 512, (256,), generator=g)), {}
    if name == "multilabel_margin_loss":
        target = torch.stack([torch.randperm(512, generator=g) for _ in range(256)])
        return (x, torch.where(torch.arange(512) < 40, target, -1)), {}
    if name == "margin_ranking_loss":
        return (x, randn(256, 512), randn(256, 512).sign()), {}
    if name == "hinge_embedding_loss":
        return (x, randn(256, 512).sign()), {}
    if name == "triplet_margin_loss":  # without swap (the catalog's case has it): two distances
        return (x, *(randn(256, 512, requires_grad=True) for _ in range(2))), {}
    if name == "cosine_embedding_loss":
        return (x, randn(256, 512, requires_grad=True), randn(256).sign()), {}
    assert name == "ctc_loss"
    lp = torch.randn(60, 8, 20, generator=g).log_softmax(2).requires_grad_()
    return (lp, torch.randint(1, 20, (8, 12), generator=g), [60] * 8, [12] * 8), {}


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "multi_margin_loss",
                                  "multilabel_margin_loss", "margin_ranking_loss", "triplet_margin_loss",
                                  "cosine_embedding_loss", "ctc_loss"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_saved_bytes_at_a_moderate_size(name, reduction):
    args, kwargs = _moderate(name)
    ours = saved_bytes(getattr(LF, name), args, {**kwargs, "reduction": reduction})
    args, kwargs = _moderate(name)
    theirs = saved_bytes(getattr(TF, name), args, {**kwargs, "reduction": reduction})
    assert ours <= theirs + SLACK, f"{name}: losskit saves {ours} bytes for backward, torch {theirs}"


@pytest.mark.parametrize("name", ["margin_ranking_loss", "hinge_embedding_loss", "triplet_margin_loss",
                                  "cosine_embedding_loss"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_saved_bytes_of_the_embedding_losses_in_half_types(name, reduction, dtype):
    # The fused embedding losses compute in float32 and keep their gradients in the inputs'
    # half type: no more bytes than the half-type tensors torch's own graph saves
    # (triplet_margin without swap: two gradients, da formed in backward, as torch's two
    # differences).
    ours = saved_bytes(getattr(LF, name), _moderate(name, dtype)[0], {"reduction": reduction})
    theirs = saved_bytes(getattr(TF, name), _moderate(name, dtype)[0], {"reduction": reduction})
    assert ours <= theirs + SLACK, f"{name} {dtype}: losskit saves {ours} bytes for backward, torch {theirs}"


class LargestAllocation(TorchDispatchMode):
    """The size in bytes of the largest tensor any op makes (outputs, views excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs or {}))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("classes", [64, 256])
def test_multilabel_margin_memory_grows_as_n_times_c(classes):
    # The hinge of every (target, non-target) pair is never formed: the largest tensor,
    # forward and backward, is a few bytes per (row, class), not per (row, class, class).
    rows = 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, classes, generator=g, requires_grad=True)
    target = torch.stack([torch.randperm(classes, generator=g) for _ in range(rows)])
    target = torch.where(torch.arange(classes) < classes // 2, target, -1)
    with LargestAllocation() as mode:
        LF.multilabel_margin_loss(x, target).backward()
    assert mode.largest <= 8 * rows * (classes + 1), f"largest tensor {mode.largest} bytes"
    assert saved_bytes(LF.multilabel_margin_loss, (x, target), {}) <= 4 * rows * classes + SLACK
