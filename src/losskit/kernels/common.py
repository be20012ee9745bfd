"""What every fused kernel shares: when a fused path may serve a call, how its precomputed
gradient reaches autograd, and how a launcher picks the eager autograd.Function or the
custom op that torch.compile traces as one node."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

_state = threading.local()

# Dtypes the fused kernels leave to the reference path (see fused_may_serve).
REFERENCE_DTYPES: tuple[torch.dtype, ...] = (torch.float64,)


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Within this block losskit uses its composed reference code, never a fused kernel.

    Rarely needed: calls that the fused kernels cannot serve (float64 inputs, torch.func
    transforms, vmap, forward-mode AD) take the reference path by themselves, and a second
    backward (``retain_graph=True`` reuse or ``create_graph=True``) replays the call on it
    (see :class:`Replay`). What is left is a second backward after the inputs were freed or
    changed in place, which raises an error that points here.
    """
    with thread_flag(_state, "disabled"):
        yield


@contextlib.contextmanager
def thread_flag(state: threading.local, name: str) -> Iterator[None]:
    """Set ``state.name`` to True for this thread within the block, restoring it after."""
    previous = getattr(state, name, False)
    setattr(state, name, True)
    try:
        yield
    finally:
        setattr(state, name, previous)


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


def take_precomputed(ctx):
    """The gradient(s) forward stored on ``ctx``, handed out once; None when they cannot
    serve this backward and the call must be replayed (:class:`Replay`).

    Backward scales them in place and gives them to autograd, so a second backward through
    the same graph (retain_graph) finds them used up. create_graph=True asks for a
    differentiable gradient, which a precomputed one is not.
    """
    grads = getattr(ctx, "precomputed", None)
    ctx.precomputed = None
    return None if torch.is_grad_enabled() else grads


class Replay:
    """The reference computation of a fused call, for the backward passes its precomputed
    gradient cannot serve: ``create_graph=True`` (double backward, Hessians, MAML) and a
    second backward through a retained graph.

    It holds the differentiable inputs weakly, so it costs no memory: a fused call keeps
    one gradient-sized buffer, as before. If an input was freed before such a backward, or
    changed in place since forward, the replay cannot be exact and raises instead.
    """

    def __init__(self, what: str, reference: Callable[..., Tensor], inputs: Sequence[Tensor | None]) -> None:
        self.what, self.reference = what, reference
        self.handles = [None if t is None else (weakref.ref(t), t._version) for t in inputs]

    def inputs(self) -> list[Tensor | None]:
        alive: list[Tensor | None] = []
        for handle in self.handles:
            tensor = None if handle is None else handle[0]()
            if handle is not None and (tensor is None or tensor._version != handle[1]):
                raise RuntimeError(
                    f"losskit {self.what}: this backward (create_graph=True, or a second backward through the same "
                    "graph) recomputes the loss from its inputs, but an input was freed or changed in place since "
                    "forward. Keep a reference to the inputs until then, or compute the loss inside "
                    "losskit.kernels.reference_only()."
                )
            alive.append(tensor)
        return alive

    def gradients(
        self, grad_output: Tensor, needs: Sequence[bool], inputs: Sequence[Tensor | None] | None = None
    ) -> list[Tensor | None]:
        """d(loss)/d(inputs) times grad_output by the reference path, differentiable when
        backward runs with create_graph=True (grad mode on)."""
        tensors = list(self.inputs() if inputs is None else inputs)
        create_graph = torch.is_grad_enabled()
        if not create_graph:
            tensors = [None if t is None else t.detach().requires_grad_(bool(need)) for t, need in zip(tensors, needs)]
        wanted = [bool(need) and t is not None for t, need in zip(tensors, needs)]
        with torch.enable_grad(), reference_only():
            loss = self.reference(*tensors)
        found = iter(
            torch.autograd.grad(
                loss, [t for t, w in zip(tensors, wanted) if w], grad_output, create_graph=create_graph,
                allow_unused=True,
            )
        )
        grads = [next(found) if w else None for w in wanted]
        return [g if g is not None or not w else torch.zeros_like(t) for g, w, t in zip(grads, wanted, tensors)]


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
