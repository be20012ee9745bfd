"""CTC: the loss and torch's gradient in one sweep over the frames, batched, in log space.

With extended labels l = (blank, y1, blank, y2, ..., blank) of length L_n = 2 S_n + 1 and
emissions e_t(s) = lp_t(l_s), the forward and backward variables are

    alpha_t(s) = e_t(s) + logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1), alpha_{t-1}(s-2))
    beta_t(s)  = e_t(s) + logsumexp(beta_{t+1}(s), beta_{t+1}(s+1), beta_{t+1}(s+2))

where a step of two counts only between different labels (l_s != l_{s-2}, torch's rule).
Sequence n starts in its first two states and ends, at frame T_n - 1, in its last two:
log p = logaddexp(alpha_{T_n - 1}(L_n - 1), alpha_{T_n - 1}(L_n - 2)). The occupancy of
state s at frame t is gamma_t(s) = exp(alpha_t(s) + beta_t(s) - e_t(s) - log p), and the
gradient torch returns for log_probs is

    exp(lp_t(c)) - sum_{s: l_s = c} gamma_t(s)      inside each input length, 0 beyond it

(the gradient with respect to the logits of a log_softmax that made lp; see
:func:`losskit.functional.ctc_loss`). An impossible alignment has loss inf and, as in torch,
a nan gradient inside its input length; zero_infinity makes both 0.

How it is computed, so that a frame costs four tensor ops whatever N and L:

- beta is alpha of the reversed problem (frames and states reversed), so both run through
  one recursion: one loop over T serves forward and backward.
- alpha lives state-major in a (2, T + 1, L + 2, N) buffer, the forward problem's half then
  the reversed one's: a frame of a problem is one contiguous row, and the terms from s - 1
  and s - 2 are the previous row read N and 2N places earlier, so every op of the loop
  runs on two contiguous rows, one per problem (vectorised, no copies). Two rows of -inf
  stand before state 0; row 0 is a seed (0 in each sequence's first state) from which
  the recursion itself makes frame 0, and which, read at T_n = 0, gives the loss of an
  empty input (0 for an empty target, inf otherwise) with no special case.
- The three-term logsumexp is two logaddexp, each exact where both terms are -inf
  (unreachable states stay -inf, with no nan), and as accurate as torch's max-shifted sum;
  the rule for a step of two is one additive mask (0 or -inf), fixed for the call.
- The emissions are gathered once; the occupancy and its scatter onto the classes are one
  vectorised pass after the loop.

Log space, not the probability space with per-frame rescaling of the classic
implementations: rescaled probabilities underflow where one state outweighs another by
more than the float range (e^88 in float32), which a confident model meeting a wrong or
noisy target reaches within a few frames; the loss would turn inf where torch's is finite.

Eager CPU calls (float32, float64) run in C++ where losskit's compiled part is built
(:mod:`losskit._native`, ctc.cpp: the same ops, the same bits, without Python's cost per
op; with two threads or more the two problems' frame loops run on a thread each, and a
call reduced to a scalar gets a C++ autograd node in place of :class:`CTCLoss`). Other
eager calls run this code directly (on any device, meta included). Under torch.compile it
is the custom op ``losskit::ctc_loss``, one node with its fake, so the loop over T is not
unrolled into the graph.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .fused_op import eager_native

MINUS_INF = float("-inf")


def ctc_loss_and_grad(
    log_probs: Tensor, labels: Tensor, input_lengths: Tensor, target_lengths: Tensor, zero_infinity: bool,
    want_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """(-log p(target | input) per sequence ``[N]``, torch's gradient for ``log_probs`` or None).

    Args:
        log_probs: ``[T, N, C]``.
        labels: extended labels, state-major ``[L, N]``; beyond L_n any class (never read).
        input_lengths, target_lengths: ``[N]`` int64, checked: T_n <= T, 2 S_n + 1 <= L.
        zero_infinity: impossible alignments get loss 0 and gradient 0.
        want_grad: make the gradient (the reversed problem and the occupancy) too.
    """
    native = _native_for(log_probs, labels, input_lengths, target_lengths)
    if native is not None:  # the same ops from C++ (losskit/_native/src/ctc.cpp)
        losses, grad = native.ctc_loss_and_grad(log_probs, labels, input_lengths, target_lengths, zero_infinity,
                                                want_grad, _log_flush(log_probs.dtype), _REDUCTIONS["none"])
        return losses, grad
    steps, batch, _ = log_probs.shape
    width = labels.shape[0]
    device = log_probs.device
    extended = 2 * target_lengths + 1  # L_n
    emit = log_probs.new_empty(2 if want_grad else 1, steps, width, batch)
    forward_emit = torch.gather(log_probs.transpose(1, 2), 1, labels.expand(steps, width, batch),
                                out=emit[0])  # e_t(s), [T, L, N]
    first_state = torch.zeros_like(extended)
    if want_grad:
        # The reversed problem, in frames and states reversed as a whole (t' = T - 1 - t,
        # s' = L - 1 - s): sequence n's states begin at s' = L - L_n and its frames at
        # t' = T - T_n, before which its emissions are 0 in that first state and -inf in
        # the others, so that the seed waits there until they begin.
        first_state = torch.stack([first_state, width - extended])
        waiting = emit.new_full((width, batch), MINUS_INF).scatter_(0, first_state[1:], 0.0)
        before = torch.arange(steps, device=device).unsqueeze(1) < steps - input_lengths  # [T, N]
        torch.where(before.unsqueeze(1), waiting, forward_emit.flip(0, 1), out=emit[1])
        labels = torch.stack([labels, labels.flip(0)])
    else:
        first_state, labels = first_state.unsqueeze(0), labels.unsqueeze(0)
    buffer = _forward_variables(emit, labels, first_state)

    # log p from frame T_n - 1 (buffer row T_n) and states L_n - 1, L_n - 2 (rows L_n + 1,
    # L_n); state -1, for an empty target, is a row of -inf.
    sequences = torch.arange(batch, device=device)
    last = buffer[0, input_lengths, extended + 1, sequences], buffer[0, input_lengths, extended, sequences]
    losses = torch.logaddexp(*last).neg_()
    finite = losses.abs() < float("inf")  # isfinite, in two ops instead of four
    safe_loss = torch.where(finite, losses, 0.0)
    if not want_grad:
        return (safe_loss if zero_infinity else losses), None

    # log occupancy = alpha + beta - e - log p; beta is the reversed problem's alpha, flipped.
    alpha = buffer[:, 1:, 2:]
    log_occupancy = alpha[1].flip(0, 1).add_(alpha[0]).sub_(forward_emit).add_(safe_loss)
    # Occupancies below e times the smallest normal float are 0 (flushed, as a CPU in
    # flush-to-zero mode would): subnormal results make exp twenty times slower, and this
    # changes the gradient by less than 4e-38 (float32). It also makes the states no
    # alignment passes exactly 0 (alpha + beta = -inf; where e = -inf too the sum is nan)
    # and the states beyond L_n (beta = -inf there).
    floor = _log_flush(log_probs.dtype)
    passed = log_occupancy > floor
    occupancy = torch.where(passed, log_occupancy.clamp_min_(floor).exp_(), 0.0).neg_()
    grad = log_probs.exp()
    grad.transpose(1, 2).scatter_add_(1, labels[0].expand(steps, width, batch), occupancy)
    grad.masked_fill_(~finite.view(1, -1, 1), 0.0 if zero_infinity else float("nan"))
    outside = torch.arange(steps, device=device).unsqueeze(1) >= input_lengths  # frames past T_n
    return (safe_loss if zero_infinity else losses), grad.masked_fill_(outside.unsqueeze(2), 0.0)


def _native_for(*tensors: Tensor):
    """The compiled module where it serves this call (eager, plain float32 / float64 CPU
    tensors), else None."""
    if tensors[0].device.type != "cpu" or tensors[0].dtype not in (torch.float32, torch.float64):
        return None
    return eager_native(*tensors)


def _log_flush(dtype: torch.dtype) -> float:
    """log of e times the smallest normal number of ``dtype``: exp is fast from there on
    (at the smallest normal itself it already takes the slow path)."""
    return math.log(torch.finfo(dtype).tiny) + 1.0


def _forward_variables(emit: Tensor, labels: Tensor, first_state: Tensor) -> Tensor:
    """The buffer ``[D, T + 1, L + 2, N]`` of alpha for D problems of emissions
    ``[D, T, L, N]`` and extended labels ``[D, L, N]``, each sequence starting at its
    ``first_state`` ``[D, N]``: alpha_t(s) at ``[d, t + 1, s + 2]``, the seed in row 0,
    -inf in the first two state rows."""
    directions, steps, width, batch = emit.shape
    buffer = emit.new_full((directions, steps + 1, width + 2, batch), MINUS_INF)
    buffer[:, 0, 2:].scatter_(1, first_state.unsqueeze(1), 0.0)
    # A step of two (from s - 2) only between different labels: an additive 0 / -inf mask.
    skip = emit.new_full((directions, width, batch), MINUS_INF)
    skip[:, 2:].masked_fill_(labels[:, 2:] != labels[:, :-2], 0.0)
    skip = skip.view(directions, -1)
    stay_or_step, jump = torch.empty_like(skip), torch.empty_like(skip)
    # Every frame's views made by one call each (unbind), not sliced per frame in Python:
    # [D, L N], each problem's frame one contiguous row.
    flat = buffer.view(directions, steps + 1, -1)
    rows, left, two_left = (flat[:, :, 2 * batch:].unbind(1), flat[:, :, batch:-batch].unbind(1),
                            flat[:, :, :-2 * batch].unbind(1))
    emissions = emit.view(directions, steps, -1).unbind(1)
    for t in range(steps):
        torch.logaddexp(rows[t], left[t], out=stay_or_step)
        torch.add(two_left[t], skip, out=jump)
        torch.logaddexp(stay_or_step, jump, out=stay_or_step)
        torch.add(stay_or_step, emissions[t], out=rows[t + 1])
    return buffer


@torch.library.custom_op("losskit::ctc_loss", mutates_args=())
def _ctc_op(
    log_probs: Tensor, labels: Tensor, input_lengths: Tensor, target_lengths: Tensor, zero_infinity: bool,
    want_grad: bool,
) -> tuple[Tensor, Tensor]:
    losses, grad = ctc_loss_and_grad(log_probs, labels, input_lengths, target_lengths, zero_infinity, want_grad)
    return losses, (log_probs.new_empty(0) if grad is None else grad)


@_ctc_op.register_fake
def _(log_probs, labels, input_lengths, target_lengths, zero_infinity, want_grad):
    return log_probs.new_empty(log_probs.shape[1]), log_probs.new_empty(log_probs.shape if want_grad else (0,))


_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # as ctc.cpp takes them


def _reduce(losses: Tensor, grad: Tensor, target_lengths: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """The loss reduced as torch's ctc_loss ('mean': each loss over its target length, then
    the batch mean) and the gradient that goes with it (scaled per sequence; 'none' leaves
    both as they are). ctc.cpp repeats these ops."""
    if reduction == "sum":
        return losses.sum(), grad
    if reduction == "mean":
        divisor = target_lengths.clamp_min(1)  # int64: the quotients keep the losses' dtype
        return (losses / divisor).mean(), grad.div_((divisor * losses.shape[0]).view(1, -1, 1))
    return losses, grad


class CTCLoss(torch.autograd.Function):
    """The reduced CTC loss whose gradient, formed in forward, is torch's: exp(log_probs)
    minus the occupancy, scaled as the reduction asks. Backward scales it by grad_output;
    as torch's, it is differentiable once (a retained graph may run backward more than
    once)."""

    @staticmethod
    def forward(ctx, log_probs, labels, input_lengths, target_lengths, zero_infinity, reduction):  # type: ignore[override]
        args = (log_probs, labels, input_lengths, target_lengths, zero_infinity, True)
        losses, grad = _ctc_op(*args) if torch.compiler.is_compiling() else ctc_loss_and_grad(*args)
        loss, grad = _reduce(losses, grad, target_lengths, reduction)
        ctx.save_for_backward(grad)
        ctx.per_sequence = reduction == "none"
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * (grad_output.view(1, -1, 1) if ctx.per_sequence else grad_output), None, None, None, None, None


def ctc_loss_with_grad(log_probs: Tensor, labels: Tensor, input_lengths: Tensor, target_lengths: Tensor,
                       zero_infinity: bool, reduction: str) -> Tensor:
    """The reduced loss, differentiable for ``log_probs``.

    An eager CPU call reduced to a scalar runs whole in C++ (ctc.cpp: the kernel and
    :func:`_reduce`) and gets a C++ autograd node that does what :class:`CTCLoss` does:
    the same numbers, without an autograd.Function's cost in Python.
    """
    if reduction != "none":
        native = _native_for(log_probs, labels, input_lengths, target_lengths)
        if native is not None:
            return native.ctc_loss_attached(log_probs, labels, input_lengths, target_lengths, zero_infinity,
                                            _log_flush(log_probs.dtype), _REDUCTIONS[reduction])
    return CTCLoss.apply(log_probs, labels, input_lengths, target_lengths, zero_infinity, reduction)


def ctc_loss_only(log_probs: Tensor, labels: Tensor, input_lengths: Tensor, target_lengths: Tensor,
                  zero_infinity: bool) -> Tensor:
    """The per-sequence loss alone (no gradient wanted): the forward recursion only."""
    args = (log_probs, labels, input_lengths, target_lengths, zero_infinity, False)
    return _ctc_op(*args)[0] if torch.compiler.is_compiling() else ctc_loss_and_grad(*args)[0]
