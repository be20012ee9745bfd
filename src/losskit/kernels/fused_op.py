"""The one factory of fused ops: a kernel supplies its math, :class:`FusedOp` builds the rest.

A fused kernel computes a loss and, in the same pass, the gradients of its differentiable
inputs; backward then only scales them by grad_output. Around that math every kernel needs
the same machinery, built here once:

- eager mode: an autograd node that keeps the precomputed gradients and whose backward
  hands them to autograd once, scaled in place: the C++ node of :mod:`losskit._native`
  where that is built (a Python autograd.Function costs tens of microseconds a call, the
  whole time of a small loss), else an autograd.Function; a kernel that recomputes its
  gradients in backward always takes the autograd.Function, which keeps the inputs;
- no gradient wanted (no_grad, inference_mode, inputs that need none): the loss alone;
- under torch.compile: a custom op ``losskit::NAME`` (and ``losskit::NAME_backward`` for a
  kernel that recomputes), one node in the graph, with its fake implementation and its
  autograd formula, its schema spelled from the kernel's options dataclass;
- double backward and a second backward through a retained graph: the call is replayed
  on the composed reference path (:class:`Replay`);
- a derived first gradient (``derives_first``): for a loss that does not change when every
  differentiable input moves by the same vector (triplet_margin's distances), the first
  input's gradient is minus the sum of the others'; where all of them want one, forward
  makes the others only and backward forms the first from them, scaled, the same way on
  every path (:func:`derived_first`), so that the node keeps one gradient fewer.

A kernel is three functions of its tensors (by name), its options object and the
gradients it is asked for (``needs``): ``forward`` -> (loss, gradients), optionally
``recompute`` (gradients from grad_output, for the losses whose gradients cannot be made
in forward) and, for the fake implementation, whether its unreduced loss has one value per
row or per element.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _native
from .._core import switches
from .._core.dtypes import cast
from .._core.options import op_schema

# Dtypes left to the reference path (see fused_may_serve), unless switches.fused_only().
REFERENCE_DTYPES: tuple[torch.dtype, ...] = (torch.float64,)


def compiling() -> bool:
    """True while torch.compile (dynamo or its autograd tracing) traces this code."""
    return torch.compiler.is_compiling()


def fused_may_serve(*tensors: Tensor) -> bool:
    """Whether a fused kernel may serve a call on these tensors.

    The fused kernels make the first-order gradient in forward and hand it out once, so
    they leave to the reference path what needs more: float64 (the dtype of gradcheck,
    gradgradcheck and numerical checking, where exactness and every autograd feature
    matter more than memory; :func:`losskit._core.switches.fused_only` lets tests through),
    tensors wrapped by torch.func transforms or vmap, and forward-mode AD.
    """
    path = switches.path()
    if path == "reference":
        return False
    if path != "fused" and any(t.dtype in REFERENCE_DTYPES for t in tensors):
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

    def gradients(self, grad_output: Tensor, needs: Sequence[bool], create_graph: bool) -> list[Tensor | None]:
        """d(loss)/d(inputs) times grad_output by the reference path, differentiable when
        ``create_graph``."""
        tensors = self.inputs()
        if not create_graph:
            tensors = [None if t is None else t.detach().requires_grad_(bool(need)) for t, need in zip(tensors, needs)]
        wanted = [bool(need) and t is not None for t, need in zip(tensors, needs)]
        with torch.enable_grad(), switches.reference_only():
            loss = self.reference(*tensors)
        found = iter(
            torch.autograd.grad(
                loss, [t for t, w in zip(tensors, wanted) if w], grad_output, create_graph=create_graph,
                allow_unused=True,
            )
        )
        grads = [next(found) if w else None for w in wanted]
        return [g if g is not None or not w else torch.zeros_like(t) for g, w, t in zip(grads, wanted, tensors)]


def scale_by_grad_output(grads: Sequence[Tensor | None], grad_output: Tensor, per_row: bool, in_place: bool) -> list:
    """Precomputed gradients times grad_output: per row for ``per_row`` (reduction='none':
    grad_output broadcast over the trailing dimensions it lacks), else a scalar.

    In place in eager mode, where the buffers are handed out once; on the CPU a scalar
    grad_output of exactly 1 skips the pass over a buffer as large as the logits (reading
    it costs nothing there; elsewhere it would wait for the device). Out of place while
    compiling, where the graph owns the buffers.
    """
    skip = in_place and not per_row and grad_output.is_cpu and grad_output.item() == 1.0
    out = []
    for grad in grads:
        if grad is None or skip:
            out.append(grad)
            continue
        factor = grad_output.reshape(tuple(grad_output.shape) + (1,) * (grad.dim() - grad_output.dim())) if per_row \
            else grad_output
        factor = factor.to(grad.dtype)
        out.append(grad.mul_(factor) if in_place else grad * factor)
    return out


def derived_first(grads: Sequence[Tensor | None]) -> Tensor:
    """The first gradient of a ``derives_first`` op from the others, already scaled by
    grad_output: -(g_1 + g_2 + ...), summed left to right and then negated (negation is
    exact). In a half type ATen's add forms each sum in float32 and rounds it once. The C++
    node of :mod:`losskit._native` (precomputed.cpp) gives the same bits (two gradients of
    one dtype in one pass: each sum formed in the dtype's op-math type, rounded once, then
    negated)."""
    rest = list(grads[1:])
    if len(rest) == 1:
        return rest[0].neg()
    total = torch.add(rest[0], rest[1])
    for grad in rest[2:]:
        total.add_(grad)
    return total.neg_()


def _needed(grads: Sequence[Tensor | None], needs: Sequence[bool]) -> list[Tensor | None]:
    return [g if need else None for g, need in zip(grads, needs)]


@dataclasses.dataclass(frozen=True)
class _Call:
    """What one call passes besides its tensors (kept on the autograd context)."""

    options: Any
    extras: dict[str, Any]
    replay: Replay | None


class FusedOp:
    """A fused op from a kernel's math.

    Args:
        name: the custom op is ``losskit::name``.
        tensors: the tensor arguments in order, optional ones ending in ``?`` (``weight?``).
        differentiable: how many of the leading tensors may receive a gradient.
        options: the frozen dataclass of the kernel's options (its fields become schema
            arguments).
        extras: further non-tensor arguments as ``(schema type, name)``, e.g.
            ``("int", "chunk_rows")``.
        forward: ``forward(*tensors, options=, needs=, **extras) -> (loss, gradients)``,
            one gradient (or None) per differentiable tensor, made here when ``needs`` asks
            and ``precomputes(options)``; when it does not, only the loss matters.
        unreduced: the shape of the loss under reduction='none': ``"rows"`` (one per row of
            the first tensor) or ``"elements"`` (the first tensor's shape); else a scalar.
        precomputes: whether ``forward`` makes the gradients for these options (default:
            always); where not, ``recompute`` makes them in backward.
        recompute: ``recompute(*tensors, options=, needs=, grad_output=, **extras) ->
            gradients``.
        per_row: whether grad_output is per row for these options (reduction='none').
        native_forward: the name of the kernel's compiled form in :mod:`losskit._native`,
            for eager calls: called with the custom op's flat arguments (tensors, option
            values in field order, extras, needs), it returns ``(loss, *gradients)`` exactly
            as ``forward`` would, bit for bit (tests/test_native.py), or None for a call it
            does not serve. It runs with grad mode off (``at::NoGradGuard``): the caller
            does not turn it off.
        derives_first: whether, for these options, the first differentiable tensor's
            gradient is minus the sum of the others' (see the module docstring and
            :meth:`derives`); default never.
    """

    def __init__(
        self,
        name: str,
        *,
        tensors: Sequence[str],
        differentiable: int,
        options: type,
        forward: Callable[..., tuple[Tensor, Sequence[Tensor | None]]],
        unreduced: str = "rows",
        extras: Sequence[tuple[str, str]] = (),
        precomputes: Callable[[Any], bool] = lambda options: True,
        recompute: Callable[..., Sequence[Tensor | None]] | None = None,
        per_row: Callable[[Any], bool] = lambda options: options.reduction == "none",
        native_forward: str | None = None,
        derives_first: Callable[[Any], bool] = lambda options: False,
    ) -> None:
        self.native_forward = native_forward
        self.derives_first = derives_first
        self.name, self.options_type = name, options
        self.n_tensors, self.n_diff = len(tensors), differentiable
        self.extra_names = [n for _, n in extras]
        self.option_names = [f.name for f in dataclasses.fields(options)]
        self.forward, self.unreduced, self.recompute = forward, unreduced, recompute
        self.precomputes, self.per_row = precomputes, per_row
        tensor_schema = ", ".join(f"Tensor{'?' if t.endswith('?') else ''} {t.rstrip('?')}" for t in tensors)
        args = ", ".join(filter(None, [tensor_schema, op_schema(options), ", ".join(f"{t} {n}" for t, n in extras)]))
        outputs = ", ".join(["Tensor"] * (1 + differentiable))
        self.op = torch.library.custom_op(
            f"losskit::{name}", self._op_forward, mutates_args=(), schema=f"({args}, bool[] needs) -> ({outputs})"
        )
        self.op.register_fake(self._op_fake)
        self.backward_op = None
        if recompute is not None:
            grads = ", ".join(["Tensor"] * differentiable)
            self.backward_op = torch.library.custom_op(
                f"losskit::{name}_backward", self._op_recompute, mutates_args=(),
                schema=f"({args}, bool[] needs, Tensor grad_output) -> ({grads})",
            )
            self.backward_op.register_fake(self._op_recompute_fake)
        self.op.register_autograd(self._compiled_backward, setup_context=self._compiled_setup)
        # Named as it shows in grad_fn: FusedCrossEntropyBackward, ...
        self.eager = type("Fused" + name.title().replace("_", ""), (_EagerFunction,), {"fused": self})
        self.node_name = self.eager.__name__ + "Backward"

    # ---- the call ----------------------------------------------------------------------------
    def derives(self, tensors: Sequence[Tensor | None], options: Any, needs: Sequence[bool]) -> bool:
        """Whether this call forms the first gradient in backward (:func:`derived_first`)
        rather than in forward: ``derives_first(options)``, every differentiable tensor
        wants a gradient (else forward would make gradients nobody asked for) and all have
        one dtype (the sum is formed in it). ``forward`` is then asked for the others only:
        ``needs`` with its first entry False.

        In float16 or bfloat16 the first gradient then carries the roundings of the others
        (each rounded once from float32 in forward) and of their sum, at the size of the
        others rather than its own: where they nearly cancel, its relative error grows, as
        torch's own does, whose half-type autograd sums the same two half-type gradients
        (tests/test_native_embedding_half.py measures both against float64; ours is the
        smaller). The node keeps one gradient fewer: as many bytes as torch keeps."""
        if self.n_diff < 2 or not all(needs) or not self.derives_first(options):
            return False
        first = tensors[0].dtype
        return all(t.dtype == first for t in tensors[1: self.n_diff])

    def __call__(self, *tensors: Tensor | None, options: Any, replay: Replay | None = None, **extras: Any) -> Tensor:
        """The loss; its gradients reach autograd as described in the module docstring.
        ``replay`` serves the backward passes the precomputed gradients cannot."""
        grad_mode = torch.is_grad_enabled()
        needs = [grad_mode and t is not None and t.requires_grad for t in tensors[: self.n_diff]]
        if compiling():
            option_values = [getattr(options, name) for name in self.option_names]
            return self.op(*tensors, *option_values, *self._extra_values(extras), needs)[0]
        native = native_module() if switches.native_enabled() else None
        derived = native is not None and self.precomputes(options) and self.derives(tensors, options, needs)
        made_needs = [False, *needs[1:]] if derived else needs
        if native is not None and self.native_forward is not None and (not any(needs) or self.precomputes(options)):
            # The compiled forward turns grad mode off itself (its contract, below), which
            # saves the Python no_grad context: several microseconds of a small call.
            made = getattr(native, self.native_forward)(
                *tensors, *[getattr(options, name) for name in self.option_names], *self._extra_values(extras),
                made_needs
            )
            if made is not None:
                if not any(needs):
                    return made[0]
                return self.attach(native, made[0], tensors[: self.n_diff], made[1:], self.per_row(options), replay,
                                   derived)
        if not any(needs):
            return self.forward(*tensors, options=options, needs=(False,) * self.n_diff, **extras)[0]
        if native is None or not self.precomputes(options):
            return self.eager.apply(_Call(options, extras, replay), *tensors)
        with torch.no_grad():
            loss, grads = self.forward(*tensors, options=options, needs=tuple(made_needs), **extras)
        return self.attach(native, loss, tensors[: self.n_diff],
                           [g if need else None for g, need in zip(grads, made_needs)], self.per_row(options), replay,
                           derived)

    def attach(self, native, loss: Tensor, inputs: Sequence[Tensor | None], grads: Sequence[Tensor | None],
               per_row: bool, replay: Replay | None, derived: bool = False) -> Tensor:
        """``loss``, made without autograd, with the C++ node of :mod:`losskit._native`
        that hands out ``grads`` (None: not wanted) once, scaled by grad_output, and is
        named as the op's autograd.Function (``FusedCrossEntropyBackward``, ...);
        ``derived``: the first gradient is None but wanted, formed in backward
        (:meth:`derives`)."""
        return attach_precomputed(native, self.node_name, self.name, loss, inputs, grads, per_row, replay, derived)

    def _extra_values(self, extras: dict[str, Any]) -> list[Any]:
        return [extras[n] for n in self.extra_names]

    def _split(self, args: Sequence[Any]) -> tuple[list, Any, dict[str, Any], list[bool]]:
        """(tensors, options, extras, needs) of a custom op's flat arguments, by the schema."""
        k, m = self.n_tensors, len(self.option_names)
        tensors, option_values = list(args[:k]), args[k: k + m]
        extras = dict(zip(self.extra_names, args[k + m: k + m + len(self.extra_names)]))
        needs = list(args[k + m + len(self.extra_names)])
        return tensors, self.options_type(**dict(zip(self.option_names, option_values))), extras, needs

    # ---- custom op (torch.compile) ---------------------------------------------------------
    def _op_forward(self, *args: Any) -> tuple[Tensor, ...]:
        tensors, options, extras, needs = self._split(args)
        precompute = self.precomputes(options)
        if precompute and self.derives(tensors, options, needs):
            needs = [False, *needs[1:]]  # the first is formed in backward (_compiled_backward)
        loss, grads = self.forward(*tensors, options=options, needs=tuple(needs) if precompute else (False,) * self.n_diff,
                                   **extras)
        made = [None if g is None or not precompute else g.to(t.dtype) for g, t in zip(grads, tensors)]
        return (loss, *(_empty_for_none(g, tensors[0]) for g in made))

    def _op_fake(self, *args: Any) -> tuple[Tensor, ...]:
        tensors, options, _, needs = self._split(args)
        first = tensors[0]
        shape = () if options.reduction != "none" else (first.shape[:1] if self.unreduced == "rows" else first.shape)
        loss = first.new_empty(tuple(shape))
        made = self.precomputes(options)
        if made and self.derives(tensors, options, needs):
            needs = [False, *needs[1:]]
        grads = [t.new_empty(t.shape) if made and need and t is not None else tensors[0].new_empty(0)
                 for t, need in zip(tensors, needs)]
        return (loss, *grads)

    def _op_recompute(self, *args: Any) -> tuple[Tensor, ...]:
        *rest, grad_output = args
        tensors, options, extras, needs = self._split(rest)
        grads = self.recompute(*tensors, options=options, needs=tuple(needs), grad_output=grad_output, **extras)
        return tuple(_empty_for_none(None if g is None else g.to(t.dtype), tensors[0]) for g, t in zip(grads, tensors))

    def _op_recompute_fake(self, *args: Any) -> tuple[Tensor, ...]:
        *rest, _ = args
        tensors, _, _, needs = self._split(rest)
        return tuple(t.new_empty(t.shape) if need and t is not None else tensors[0].new_empty(0)
                     for t, need in zip(tensors, needs))

    def _compiled_setup(self, ctx, inputs, output) -> None:
        ctx.args = inputs[self.n_tensors:]
        ctx.save_for_backward(*inputs[: self.n_tensors], *output[1:])

    def _compiled_backward(self, ctx, grad_loss: Tensor, *_unused: Tensor):
        saved = ctx.saved_tensors
        tensors, made = saved[: self.n_tensors], saved[self.n_tensors:]
        _, options, _, needs = self._split([*tensors, *ctx.args])
        if self.precomputes(options):
            derived = self.derives(tensors, options, needs)
            # The placeholders of gradients not made (empty tensors) are not scaled.
            made_needs = [False, *needs[1:]] if derived else needs
            grads = scale_by_grad_output(_needed(made, made_needs), grad_loss, self.per_row(options), in_place=False)
            if derived:
                grads[0] = derived_first(grads)
        else:
            grads = self.backward_op(*tensors, *ctx.args, grad_loss)
        grads = [None if t is None else g for g, t in zip(_needed(grads, needs), tensors)]
        return (*grads, *([None] * (self.n_tensors - self.n_diff + len(ctx.args))))


_REMEMBERED: dict = {}


def remembered_options(cls: type, *values: Any) -> Any:
    """``cls(*values)``, an options dataclass, made once per distinct values: building a
    frozen dataclass costs microseconds, a fair share of a call at a batch of 64. Any float
    is a key, so the memory is bounded (cleared past 256 entries)."""
    key = (cls, *values)
    options = _REMEMBERED.get(key)
    if options is None:
        if len(_REMEMBERED) > 256:
            _REMEMBERED.clear()
        options = _REMEMBERED[key] = cls(*values)
    return options


_native_loaded: list = []


def native_module():
    """losskit's compiled module with its replay handler set, or None (see :mod:`losskit._native`)."""
    if not _native_loaded:
        module = _native.load()
        if module is not None:
            module.set_replay_handler(_replay_for_native)
        _native_loaded.append(module)
    return _native_loaded[0]


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
_forward_ad = torch.autograd.forward_ad
_functorch_level = torch._C._functorch.maybe_current_level
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def eager_native(*tensors: Tensor | None):
    """losskit's compiled module where an eager call on these tensors (None: absent) may
    take a compiled form of its own, else None: outside torch.compile, forward-mode AD,
    torch.func transforms and :func:`~losskit._core.switches.reference_only`, on plain
    tensors (subclasses such as fake tensors and DTensor keep their own dispatch).
    :func:`fused_may_serve`'s conditions, at a fraction of its cost (at a batch of 64 this
    test is a fair share of a call), without its dtype rule, which each compiled form
    applies by declining what it does not serve."""
    if torch.compiler.is_compiling() or not switches.native_serves() or _forward_ad._current_level >= 0:
        return None
    # Inside a torch.func transform (a functorch level) every tensor may be a wrapper.
    transformed = _functorch_level() is not None
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSORS or transformed and _functorch_wrapped(t)):
            return None
    return _native_loaded[0] if _native_loaded else native_module()


def attach_precomputed(native, node_name: str, what: str, loss: Tensor, inputs: Sequence[Tensor | None],
                       grads: Sequence[Tensor | None], per_row: bool, replay: Replay | None,
                       derived: bool = False) -> Tensor:
    """``loss`` (made without autograd) with the C++ autograd node of :mod:`losskit._native`
    named ``node_name``: backward hands out ``grads`` (None where not wanted; one per
    input) once, scaled by grad_output (per row of ``grad_output`` when ``per_row``);
    ``create_graph`` and a second backward replay the call on the reference path
    (``replay``; None: such a backward raises, naming ``what``). What every eager fused
    call ends with, whether :class:`FusedOp` or a loss's own compiled call made it.
    ``derived``: the first gradient (None here) is wanted and formed in backward from the
    others (:func:`derived_first`; every other one is made)."""
    needs = [g is not None for g in grads]
    if derived:
        needs[0] = True
    shapes = [None if t is None else t.shape for t in inputs]
    return native.attach(node_name, loss.detach() if loss._is_view() else loss, list(inputs), list(grads), per_row,
                         (what, replay, needs, shapes), derived)


def _replay_for_native(name: str, call: tuple, grad_output: Tensor, create_graph: bool) -> list[Tensor | None]:
    """The backward passes the C++ node of :mod:`losskit._native` hands back to Python:
    ``create_graph=True`` and a second backward, replayed on the reference path."""
    what, replay, needs, shapes = call
    if type(replay) is tuple:  # (reference, weak reference to the one input, its version), from C++
        reference, handle, version = replay
        replay = Replay.__new__(Replay)
        replay.what, replay.reference, replay.handles = what, reference, [(handle, version)]
    if replay is None:
        raise RuntimeError(
            f"losskit {what}: a second backward through the same graph, or create_graph=True, is not supported by "
            "this loss"
        )
    return [None if g is None else g.reshape(shape)
            for g, shape in zip(replay.gradients(grad_output, needs, create_graph), shapes)]


def _empty_for_none(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


class _EagerFunction(torch.autograd.Function):
    """The eager form of every fused op (subclassed per op with ``fused`` set).

    Forward keeps the precomputed gradients (or, for a kernel that recomputes, the
    inputs); backward hands the precomputed ones to autograd once, scaled in place by
    grad_output, and forms a derived first gradient from them (:meth:`FusedOp.derives`). Inside backward, grad mode is on exactly when autograd was asked for a
    differentiable gradient (``create_graph=True``): that, and a second backward that
    finds the precomputed gradients used up, replay the call on the reference path.
    """

    fused: FusedOp

    @staticmethod
    def forward(ctx, call: _Call, *tensors: Tensor | None) -> Tensor:  # type: ignore[override]
        fused: FusedOp = ctx._forward_cls.fused
        needs = tuple(ctx.needs_input_grad[1: 1 + fused.n_diff])
        ctx.fused, ctx.call, ctx.needs = fused, call, needs
        ctx.dtypes = [None if t is None else t.dtype for t in tensors[: fused.n_diff]]
        ctx.shapes = [None if t is None else t.shape for t in tensors[: fused.n_diff]]
        precompute = fused.precomputes(call.options)
        ctx.derived = precompute and fused.derives(tensors, call.options, needs)
        made_needs = (False, *needs[1:]) if ctx.derived else needs
        loss, grads = fused.forward(*tensors, options=call.options,
                                    needs=made_needs if precompute else (False,) * fused.n_diff, **call.extras)
        if precompute:
            ctx.precomputed = [None, *grads[1:]] if ctx.derived else list(grads)
        else:
            ctx.precomputed = None
            ctx.save_for_backward(*tensors)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        fused: FusedOp = ctx.fused
        call: _Call = ctx.call
        create_graph = torch.is_grad_enabled()
        precomputed, ctx.precomputed = ctx.precomputed, None
        if create_graph or (precomputed is None and fused.precomputes(call.options)):
            if call.replay is None:
                raise RuntimeError(
                    f"losskit {fused.name}: a second backward through the same graph, or create_graph=True, is not "
                    "supported by this loss"
                )
            # The reference takes the caller's tensors, which the op may see reshaped.
            grads = [None if g is None else g.reshape(shape)
                     for g, shape in zip(call.replay.gradients(grad_output, ctx.needs, create_graph), ctx.shapes)]
        elif precomputed is not None:
            grads = scale_by_grad_output(precomputed, grad_output, fused.per_row(call.options), in_place=True)
            if ctx.derived:
                grads[0] = derived_first(grads)
        else:
            grads = fused.recompute(*ctx.saved_tensors, options=call.options, needs=ctx.needs,
                                    grad_output=grad_output, **call.extras)
        grads = [None if g is None else cast(g, dtype) for g, dtype in zip(_needed(grads, ctx.needs), ctx.dtypes)]
        return (None, *grads, *([None] * (fused.n_tensors - fused.n_diff)))
