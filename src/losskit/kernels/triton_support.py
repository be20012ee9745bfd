"""When the Triton kernels serve a call.

They serve CUDA tensors when Triton is installed (``pip install 'losskit[gpu]'``); Triton is
never needed to import losskit. With ``TRITON_INTERPRET=1`` (Triton's interpreter, set
before the kernels are first used) :func:`on_cpu` makes them serve CPU tensors too: that
is how the tests run every kernel on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

from torch import Tensor

from .._core import switches


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def on_cpu() -> Iterator[None]:
    """Within this block the Triton kernels serve CPU tensors through Triton's interpreter."""
    if not (available() and interpreting()):
        raise RuntimeError("losskit: the Triton kernels run on CPU only under TRITON_INTERPRET=1 with triton installed")
    with switches.triton_on_cpu():
        yield


def serves(tensor: Tensor) -> bool:
    """Whether a Triton kernel computes for this tensor."""
    if tensor.is_cuda:
        return available()
    return tensor.is_cpu and switches.triton_serves_cpu()
