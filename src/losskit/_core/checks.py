"""The checks mode: how losskit verifies the values of its inputs (class indices in range,
probabilities in [0, 1], distributions summing to 1, non-negative variances, ...).

Shape, dtype and option checks cost nothing and always run. A check of the values needs
the data, and reading data on the host stalls an accelerator and breaks a compiled graph,
so it runs in one of these modes:

- ``'full'``: read the data on the host and raise a Python exception naming the first bad
  value and its index. Free on a CPU; on an accelerator it waits for the device.
- ``'async'``: a device-side assert (``torch._assert_async``) that never synchronises: a
  bad value still stops the program, later, when the device gets to it, with a message
  that says what was wrong but not where. On CUDA, as with any device-side assert, the
  process cannot go on using the GPU afterwards.
- ``'off'``: no value checks. An out-of-range class index still fails in the gather that
  reads it; a probability outside [0, 1] gives a wrong number.
- ``'auto'`` (the default): ``'full'`` for CPU tensors in eager mode, ``'async'`` on any
  other device and whenever torch.compile is tracing.

``'full'`` asked for while compiling acts as ``'async'``, which is all a graph can hold.
Meta tensors have no values: ``'full'`` acts as ``'async'`` there, which checks nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import switches
from .switches import MODES, checks, checks_mode  # noqa: F401  (re-exported: losskit.checks)


def effective_mode(t: Tensor) -> str:
    """'full', 'async' or 'off' for a check of tensor ``t`` here and now."""
    mode = switches.checks_mode()
    if mode == "off":
        return "off"
    if torch.compiler.is_compiling() or t.is_meta:
        return "async"
    if mode == "auto":
        return "full" if t.is_cpu else "async"
    return mode


def check_values(
    on: Tensor,
    find_bad: Callable[[], Tensor],
    report: Callable[[Tensor], Exception],
    summary: str,
) -> None:
    """Raise if ``find_bad()`` (a boolean mask computed from ``on``) has any True element.

    In 'full' mode the exception is ``report(mask)``, which names the first bad value; in
    'async' mode a device-side assert carries ``summary``; in 'off' mode nothing is computed.
    """
    mode = effective_mode(on)
    if mode == "off":
        return
    bad = find_bad()
    if _transformed(bad):
        # Inside torch.func.grad / vmap: check the values underneath the transform's
        # wrappers (all of vmap's samples at once), where the index has no meaning.
        bad = _unwrapped(bad)
        if mode == "full":
            if bool(bad.any()):
                raise ValueError(f"{summary} (found inside a torch.func transform)")
            return
    if mode == "full":
        if bool(bad.any()):
            raise report(bad)
    else:
        torch._assert_async(~bad.any(), summary)


def _unwrapped(t: Tensor) -> Tensor:
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def full_checks(t: Tensor) -> bool:
    """Whether this call may read ``t`` on the host (for warnings about data): full mode,
    outside torch.func transforms."""
    return effective_mode(t) == "full" and not _transformed(t)


def _transformed(t: Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform (grad, vmap) in eager mode."""
    return not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(t)
