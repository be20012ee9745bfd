"""Two kernels that must fail the ahead-of-time check (tests/test_triton_aot.py): one the
compiler rejects, one that spills to local memory."""

import triton
import triton.language as tl

@triton.jit
def _not_a_power_of_two(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)

@triton.jit
def _too_many_live_values(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    s = tl.sum(x, 0)
    y = tl.exp(x - s)
    t = tl.sum(y, 0)
    tl.store(out_ptr + offs, x * t + y, mask=offs < n)
