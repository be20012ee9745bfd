"""Input checks shared by every loss: each error names the loss, what is wrong and where.

torch reports many of these as a device-side assert or a bare "Target 7 is out of bounds";
losskit raises a Python exception that says which value, at which index, and what was
expected. Checks never change a value that torch would accept.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import _native
from . import switches
from .checks import check_values, effective_mode, full_checks


def _shape(t: Tensor | torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, Tensor) else tuple(t)


def first_index(mask: Tensor) -> tuple[int, ...]:
    """Index (as a tuple) of the first True element of a boolean mask."""
    if mask.dim() == 0:
        return ()
    return tuple(int(i) for i in mask.nonzero()[0])


def at_index(where: tuple[int, ...]) -> str:
    """' at index (i, j)' for an error message; nothing for a 0-d tensor, which has no index."""
    return f" at index {where}" if where else ""


def check_floating(t: Tensor, name: str, fn: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor; got {t.dtype}")


def check_real(t: Tensor, name: str, fn: str) -> None:
    """A real number type: floating point, or integer/bool that promotes against the input
    (torch accepts ``mse_loss(float_input, int_target)``)."""
    if t.is_complex():
        raise TypeError(f"{fn}: {name} must be a real (floating-point or integer) tensor; got {t.dtype}")


def check_same_shape(input: Tensor, target: Tensor, fn: str) -> None:
    if input.shape != target.shape:
        raise ValueError(
            f"{fn}: target shape {_shape(target)} must match input shape {_shape(input)}"
        )


def broadcast_shape(a: Tensor, b: Tensor, names: tuple[str, str], fn: str) -> tuple[int, ...]:
    """The broadcast shape of two tensors, or a ValueError stating both shapes."""
    if a.shape == b.shape:  # the usual case, without torch.broadcast_shapes' Python cost
        return tuple(a.shape)
    try:
        return tuple(torch.broadcast_shapes(a.shape, b.shape))
    except RuntimeError:
        raise ValueError(
            f"{fn}: {names[0]} shape {_shape(a)} and {names[1]} shape {_shape(b)} cannot be broadcast together"
        ) from None


def check_broadcasts_to(t: Tensor, shape: tuple[int, ...], name: str, fn: str) -> None:
    """``t`` must broadcast to exactly ``shape`` (it may not enlarge it)."""
    try:
        ok = tuple(torch.broadcast_shapes(t.shape, shape)) == tuple(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{fn}: {name} of shape {_shape(t)} does not broadcast to the input shape {tuple(shape)}")


def check_reduction_weight(weight: Tensor, input: Tensor, fn: str) -> None:
    """The element-wise ``weight`` of mse_loss / l1_loss: exactly the input's size, as in torch."""
    if weight.shape != input.shape:
        raise ValueError(f"{fn}: weight shape {_shape(weight)} must equal input shape {_shape(input)}")


def check_class_weight(weight: Tensor, num_classes: int, fn: str) -> None:
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ValueError(
            f"{fn}: weight must be a 1-D tensor with one entry per class ({num_classes}); "
            f"got shape {_shape(weight)}"
        )
    check_floating(weight, "weight", fn)


def class_dim_of(input: Tensor, fn: str) -> int:
    """Class dimension of a (C,), (N, C) or (N, C, d1, ...) input."""
    if input.dim() == 0:
        raise ValueError(
            f"{fn}: input must have a class dimension, shaped (C,), (N, C) or (N, C, d1, ...); "
            "got a 0-dimensional tensor"
        )
    return 0 if input.dim() == 1 else 1


def extremes(t: Tensor) -> tuple[int, int] | None:
    """(smallest, largest) value of a non-empty integer tensor, from one reduction and one
    read on the host, where value checks read values in full; None elsewhere (then a check
    goes element by element, or device-side). A batch whose extremes are in range needs no
    element-wise mask."""
    if not t.numel() or not full_checks(t):
        return None
    if t.is_cpu and switches.native_enabled():  # one loop in C++ (losskit._native), else three ops here
        native = _native.load()
        seen = None if native is None else native.int_extremes(t)
        if seen is not None:
            return seen
    low, high = t.aminmax()
    return int(low), int(high)


class ClassTargets:
    """Class-index targets, validated once: ``target`` as int64 and ``valid``, where it is
    not the ignore index. Everything downstream uses this mask; nothing rebuilds it.

    ``all_valid`` records that no target is ignored, where validation learnt that for free
    (the range check on the CPU reads the smallest and largest target): then ``valid`` is
    made only if someone asks for it, and a fast path skips the masking altogether.
    """

    __slots__ = ("target", "all_valid", "_valid", "_ignore_index")

    def __init__(self, target: Tensor, valid: Tensor | None = None, *, ignore_index: int | None = None,
                 all_valid: bool = False) -> None:
        if valid is None and ignore_index is None:
            raise TypeError("ClassTargets needs the valid mask or the ignore index it comes from")
        self.target, self._valid, self._ignore_index, self.all_valid = target, valid, ignore_index, all_valid

    @property
    def valid(self) -> Tensor:
        if self._valid is None:
            self._valid = self.target != self._ignore_index
        return self._valid

    @property
    def valid_or_none(self) -> Tensor | None:
        """The mask, or None when every target counts."""
        return None if self.all_valid else self.valid

    def safe(self) -> Tensor:
        """The targets with ignored positions read as class 0, safe to gather with (the
        caller masks those positions by ``valid`` afterwards)."""
        return self.target if self.all_valid else torch.where(self.valid, self.target, 0)

    def reshape(self, *shape: int) -> ClassTargets:
        return ClassTargets(self.target.reshape(*shape), None if self._valid is None else self._valid.reshape(*shape),
                            ignore_index=self._ignore_index, all_valid=self.all_valid)


def check_class_targets(
    target: Tensor, expected: tuple[int, ...], num_classes: int, ignore_index: int, input_shape: tuple[int, ...], fn: str
) -> ClassTargets:
    """Class-index targets: integer dtype, shape ``expected``, values in [0, C) or ignored.

    Returns them as int64 with their ``valid`` mask: compared with a negative
    ``ignore_index`` in their own dtype, uint8 targets would wrap it (-100 to class 156).
    Where values are checked in full, one pass reads the smallest and largest target:
    when both lie in [0, C) and the ignore index between them is impossible, every target
    is valid and in range, and nothing more is computed.
    """
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"{fn}: class-index target must be an integer tensor; got {target.dtype} of shape "
            f"{_shape(target)} (class probabilities must have the logits' shape)"
        )
    if tuple(target.shape) != tuple(expected):
        raise ValueError(
            f"{fn}: target shape {_shape(target)} does not fit input shape {tuple(input_shape)}; "
            f"class-index targets must have shape {tuple(expected)}"
        )
    target = target if target.dtype == torch.long else target.long()
    seen = extremes(target) if num_classes > 0 else None
    if seen is not None and 0 <= seen[0] and seen[1] < num_classes and not seen[0] <= ignore_index <= seen[1]:
        return ClassTargets(target, ignore_index=ignore_index, all_valid=True)
    valid = target != ignore_index
    check_target_range(target, valid, num_classes, fn)
    return ClassTargets(target, valid, ignore_index=ignore_index)


def check_target_range(target: Tensor, counted: Tensor, num_classes: int, fn: str) -> None:
    """Every counted class index lies in [0, num_classes); IndexError naming the first that does not.

    One pass finds the smallest and largest counted index (those not counted read as 0,
    in range whenever there is a class); only a bad batch pays for the mask that names
    the first bad index.
    """
    if effective_mode(target) == "off":
        return
    seen = extremes(torch.where(counted, target, 0)) if num_classes > 0 and full_checks(target) else None
    if seen is not None and seen[0] >= 0 and seen[1] < num_classes:
        return

    def report(bad: Tensor) -> Exception:
        where = first_index(bad)
        return IndexError(f"{fn}: target {int(target[where])}{at_index(where)} is out of range for {num_classes} classes")

    check_values(
        target,
        lambda: counted & ((target < 0) | (target >= num_classes)),
        report,
        f"{fn}: a target class index is out of range for {num_classes} classes",
    )


def check_in_unit_interval(t: Tensor, name: str, fn: str, hint: str = "") -> None:
    """Every element in [0, 1]; NaN counts as outside."""

    def report(bad: Tensor) -> Exception:
        where = first_index(bad)
        return ValueError(
            f"{fn}: {name} must hold probabilities in [0, 1]; found {float(t.detach()[where]):g}{at_index(where)}"
            + (f". {hint}" if hint else "")
        )

    check_values(t, lambda: ~((t >= 0) & (t <= 1)), report, f"{fn}: {name} must hold probabilities in [0, 1]")


def check_non_negative(t: Tensor, name: str, fn: str) -> None:
    """Every element >= 0 (NaN passes, as torch lets it through)."""

    def report(bad: Tensor) -> Exception:
        where = first_index(bad)
        return ValueError(f"{fn}: {name} must be >= 0; found {float(t.detach()[where]):g}{at_index(where)}")

    check_values(t, lambda: t < 0, report, f"{fn}: {name} must be >= 0")


def warn_if_probabilities(input: Tensor, class_dim: int, fn: str) -> None:
    """Warn on the classic mistake of passing softmax outputs to a loss that wants logits.

    Looks at the first few rows only, so the check stays cheap at any batch size. It reads
    the data, so it runs only where value checks run in full (CPU eager by default): a
    warning is never worth a device synchronisation or a graph break.
    """
    if input.numel() == 0 or input.shape[class_dim] < 2 or not full_checks(input):
        return
    head = input.detach()
    if head.dim() == 1:
        head = head.unsqueeze(0)
    elif head.dim() > 2:  # the positions of the first sample only: never a copy of the batch
        head = head[:1].movedim(class_dim, -1).reshape(-1, input.shape[class_dim])
    rows = head[:8]
    # Logits almost always have a negative value: one reduction and one read decide. Only
    # rows with none go on to the sums (torch.allclose's atol=1e-4, rtol=1e-5 at 1).
    if rows.amin().item() < 0 or not bool(((rows.sum(-1, dtype=torch.float32) - 1).abs() <= 1.1e-4).all()):
        return
    warnings.warn(
        f"{fn}: input looks like probabilities (non-negative, rows sum to 1) but {fn} expects "
        "raw logits; applying softmax first squashes the loss and its gradient",
        UserWarning,
        stacklevel=3,
    )
