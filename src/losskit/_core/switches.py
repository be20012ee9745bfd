"""Every runtime switch of losskit, in one place: how input values are checked, which path
computes a loss (fused kernels or the composed reference), and the chunk sizes of the
fused kernels. Each switch is a context manager; the kernels read the switches at call
time and take chunk sizes as parameters whose defaults come from here, so tests switch
paths through these, never by patching module globals.

- :class:`checks` (``losskit.checks``): the checks mode, process-wide as torch's own
  switches (``set_grad_enabled``); see :mod:`losskit._core.checks`.
- :func:`reference_only`: the composed reference code for every loss in this thread.
- :func:`fused_only`: the fused kernels wherever their shapes allow, float64 included
  (which normally takes the reference path); for tests that hold the kernels to float64
  tolerances.
- :func:`chunk_sizes`: smaller (or larger) chunks for the fused kernels in this thread,
  e.g. so that a test crosses chunk edges with a few rows.
- :func:`triton_on_cpu`: the Triton kernels serve CPU tensors (Triton's interpreter).
- :func:`without_native`: the Python forms of what :mod:`losskit._native` compiles, for
  tests that hold the two to the same results.

The path and chunk switches are per thread: the backward pass of a fused call can run in
autograd's own thread, and what it switches there stays there.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

MODES: tuple[str, ...] = ("auto", "full", "async", "off")

# The checks mode: one process-wide setting.
_mode = "auto"


class checks:
    """Set how losskit checks input values: ``losskit.checks("async")`` sets the mode for
    the whole process; ``with losskit.checks("off"): ...`` sets it for a block and restores
    the previous mode afterwards.

    Example:
        >>> import losskit
        >>> with losskit.checks("off"):
        ...     losskit.checks_mode()
        'off'
        >>> losskit.checks_mode()
        'auto'
    """

    def __init__(self, mode: str) -> None:
        global _mode
        if mode not in MODES:
            raise ValueError(f"losskit.checks: mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
        self.previous, _mode = _mode, mode

    def __enter__(self) -> checks:
        return self

    def __exit__(self, *exc: object) -> None:
        global _mode
        _mode = self.previous


def checks_mode() -> str:
    """The mode set by :class:`checks`: 'auto', 'full', 'async' or 'off'."""
    return _mode


@dataclass(frozen=True)
class ChunkSizes:
    """How much of its input a fused kernel takes at a time.

    cross_entropy_bytes: rows per chunk of the fused cross-entropy on the CPU are chosen so
        that a chunk of float32 logits is about this many bytes: the chunk stays in cache
        across the few passes over it, while the handful of torch calls per chunk stay a
        small part of the time.
    device_bytes: the same off the CPU, where a chunk only bounds the temporaries and
        larger chunks mean fewer kernel launches.
    linear_bytes: the automatic chunk of linear cross-entropy (see
        :func:`losskit.kernels.linear_cross_entropy.auto_chunk_rows`).
    bce_elements: elements per chunk of the fused BCE-with-logits on the CPU.
    pointwise_elements: elements per chunk of the fused regression losses (mse, l1,
        smooth_l1, huber): a chunk's temporaries stay in cache.
    """

    cross_entropy_bytes: int = 4 << 20
    device_bytes: int = 256 << 20
    linear_bytes: int = 64 << 20
    bce_elements: int = 1 << 16
    pointwise_elements: int = 1 << 18


_DEFAULT_CHUNKS = ChunkSizes()


class _ThreadSwitches(threading.local):
    path = "auto"  # 'auto', 'reference' or 'fused'
    triton_on_cpu = False
    tensor_cores_on_cpu = False
    native = True
    chunks = _DEFAULT_CHUNKS


_local = _ThreadSwitches()


@contextlib.contextmanager
def _switched(name: str, value: object) -> Iterator[None]:
    previous = getattr(_local, name)
    setattr(_local, name, value)
    try:
        yield
    finally:
        setattr(_local, name, previous)


def reference_only() -> contextlib.AbstractContextManager[None]:
    """Within this block losskit uses its composed reference code, never a fused kernel.

    Rarely needed: calls that the fused kernels cannot serve (float64 inputs, torch.func
    transforms, vmap, forward-mode AD) take the reference path by themselves, and a second
    backward (``retain_graph=True`` reuse or ``create_graph=True``) replays the call on it.
    What is left is a second backward after the inputs were freed or changed in place,
    which raises an error that points here.
    """
    return _switched("path", "reference")


def fused_only() -> contextlib.AbstractContextManager[None]:
    """Within this block the fused kernels serve float64 too (for tests)."""
    return _switched("path", "fused")


def path() -> str:
    """'auto', 'reference' or 'fused': the path switch of this thread."""
    return _local.path


def chunk_sizes(**sizes: int) -> contextlib.AbstractContextManager[None]:
    """Within this block the fused kernels of this thread use these chunk sizes (the
    fields of :class:`ChunkSizes`); the others keep their values."""
    names = {f.name for f in fields(ChunkSizes)}
    unknown = set(sizes) - names
    if unknown:
        raise TypeError(f"chunk_sizes: unknown size(s) {sorted(unknown)}; expected some of {sorted(names)}")
    return _switched("chunks", replace(_local.chunks, **sizes))


def chunks() -> ChunkSizes:
    """The chunk sizes in force in this thread."""
    return _local.chunks


def triton_on_cpu() -> contextlib.AbstractContextManager[None]:
    """Within this block the Triton kernels serve CPU tensors (under TRITON_INTERPRET=1)."""
    return _switched("triton_on_cpu", True)


def triton_serves_cpu() -> bool:
    return _local.triton_on_cpu


def tensor_cores_on_cpu() -> contextlib.AbstractContextManager[None]:
    """Within this block the linear losses take their accelerator path (half-precision
    operands, float32 products: :mod:`losskit.kernels.matmul`) for CPU tensors too, so
    that the tests run that code without a GPU."""
    return _switched("tensor_cores_on_cpu", True)


def tensor_cores_serve_cpu() -> bool:
    return _local.tensor_cores_on_cpu


def without_native() -> contextlib.AbstractContextManager[None]:
    """Within this block losskit runs none of its compiled code (:mod:`losskit._native`):
    the Python forms serve every call, as where the extension is not built."""
    return _switched("native", False)


def native_serves() -> bool:
    """:func:`native_enabled`, and not within :func:`reference_only`: whether a compiled form
    may serve an eager call of this thread (one read of the switches, as every call asks)."""
    local = _local
    return local.native and not local.triton_on_cpu and local.path != "reference"


def native_enabled() -> bool:
    """Whether losskit's compiled code may serve calls in this thread: not within
    :func:`without_native`, nor within :func:`triton_on_cpu`, where the Triton kernels are
    to serve the CPU tensors the compiled forms would otherwise take."""
    return _local.native and not _local.triton_on_cpu
