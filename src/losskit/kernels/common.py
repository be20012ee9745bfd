"""What every fused kernel shares: when a fused path may serve a call, how its precomputed
gradient reaches autograd, and how a launcher picks the eager autograd.Function or the
custom op that torch.compile traces as one node."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor

_state = threading.local()

# Dtypes the fused kernels leave to the reference path (see fused_may_serve).
REFERENCE_DTYPES: tuple[torch.dtype, ...] = (torch.float64,)


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Within this block losskit uses its composed reference code, never a fused kernel.

    Rarely needed: calls that the fused kernels cannot serve (float64 inputs, torch.func
    transforms, vmap, forward-mode AD) take the reference path by themselves. What is left
    is a second backward through a float32 or half graph (``retain_graph=True`` reuse or
    ``create_graph=True``), which the fused kernels refuse with an error that points here.
    """
    previous = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = previous


def fused_enabled() -> bool:
    return not getattr(_state, "disabled", False)


def fused_may_serve(*tensors: Tensor) -> bool:
    """Whether a fused kernel may serve a call on these tensors.

    The fused kernels make the first-order gradient in forward and hand it out once, so
    they leave to the reference path what needs more: float64 (the dtype of gradcheck,
    gradgradcheck and numerical checking, where exactness and every autograd feature
    matter more than memory), tensors wrapped by torch.func transforms or vmap, and
    forward-mode AD.
    """
    if not fused_enabled() or any(t.dtype in REFERENCE_DTYPES for t in tensors):
        return False
    if compiling():  # dynamo runs torch.func transforms itself, around the custom ops
        return True
    if torch.autograd.forward_ad._current_level >= 0:
        return False
    return not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def wants_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will ask for a gradient of any of these: grad mode on and one of
    them requires grad. Under no_grad or inference_mode the kernels compute the loss only."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def take_precomputed(ctx, what: str):
    """The gradient(s) forward stored on ``ctx``, handed out once.

    Backward scales them in place and gives them to autograd, so a second backward through
    the same graph (retain_graph) would see them changed: refuse it with a clear error.
    create_graph=True asks for a differentiable gradient, which a precomputed one is not.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"losskit {what}: backward with create_graph=True (double backward) needs the reference path; "
            "float64 inputs take it by themselves, or wrap the call in losskit.kernels.reference_only()."
        )
    grads = getattr(ctx, "precomputed", None)
    if grads is None:
        raise RuntimeError(
            f"losskit {what}: backward ran twice through the same graph (retain_graph); its gradient, "
            "made in forward, is used up. Wrap the call in losskit.kernels.reference_only()."
        )
    ctx.precomputed = None
    return grads


def scale_by_grad_output(grads: list[Tensor], grad_output: Tensor, reduction: str, in_place: bool) -> list[Tensor]:
    """Precomputed gradients times grad_output: per element or row for 'none' (grad_output
    broadcast over the trailing dimensions it lacks), else a scalar.

    In place in eager mode, where the buffers are handed out once; on the CPU a scalar
    grad_output of exactly 1 skips the pass over a buffer as large as the logits (reading
    it costs nothing there; elsewhere it would wait for the device). Out of place while
    compiling, where the graph owns the buffers.
    """
    out = []
    for grad in grads:
        if reduction == "none":
            factor = grad_output.reshape(tuple(grad_output.shape) + (1,) * (grad.dim() - grad_output.dim()))
        else:
            factor = grad_output
        factor = factor.to(grad.dtype)
        if not in_place:
            out.append(grad * factor)
        elif reduction == "none" or grad_output.device.type != "cpu" or bool(grad_output != 1):
            out.append(grad.mul_(factor))
        else:
            out.append(grad)
    return out


def compiling() -> bool:
    """True while torch.compile (dynamo or its autograd tracing) traces this code."""
    return torch.compiler.is_compiling()
