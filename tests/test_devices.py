"""Every loss on a device that is not the CPU: the whole catalog on ``meta`` tensors, under a
dispatch mode that fails on any CPU tensor of one or more dimensions meeting a tensor of
another device. On a CUDA machine that mix is an error, so this finds device bugs here."""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from cases import CASES, covered_names, public_losses
from inputs import Inputs


class NoCpuMixing(TorchDispatchMode):
    """Raise on an op whose tensor arguments include a non-0-d CPU tensor and a non-CPU one
    (0-d CPU tensors are scalars, which torch accepts beside any device)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if len(devices) > 1 and any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            shapes = [(t.device.type, tuple(t.shape)) for t in tensors]
            raise AssertionError(f"{func}: CPU tensor mixed with another device: {shapes}")
        return func(*args, **(kwargs or {}))


def test_every_public_loss_has_a_case():
    missing = public_losses() - covered_names()
    assert not missing, f"no device/compile case for {sorted(missing)}"


def _grad_leaves(args, kwargs) -> list[torch.Tensor]:
    flat = tree_flatten((list(args), kwargs))[0]
    return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_and_backward_on_meta(case):
    fn, args, kwargs = case.build(Inputs("meta"))
    with NoCpuMixing():
        loss = fn(*args, **kwargs)
        assert loss.device.type == "meta"
        leaves = _grad_leaves(args, kwargs) + [p for p in getattr(fn, "parameters", lambda: [])()]
        grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
    for leaf, grad in zip(leaves, grads):
        assert grad is None or (grad.device.type == "meta" and grad.shape == leaf.shape)


def test_the_mode_catches_a_mix():
    with pytest.raises(AssertionError, match="CPU tensor mixed"), NoCpuMixing():
        torch.ones(3, device="meta") * torch.ones(3)
