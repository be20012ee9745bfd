"""Every Triton kernel compiled ahead of time for sm_80, sm_90 and sm_100, no GPU needed
(``pytest -k aot``): for every constexpr combination a call can select and every dtype it
launches with (see :mod:`losskit.kernels.triton_aot`), the real compiler must accept the
kernel and ptxas must report no spill. The registers, spills and shared memory of each
variant are printed (``-s``); ``python -m losskit.kernels.triton_aot --out FILE`` writes
them as CSV."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

triton = pytest.importorskip("triton")

import losskit.kernels  # noqa: E402
from losskit.kernels import triton_aot  # noqa: E402


@pytest.mark.parametrize("arch", triton_aot.ARCHS, ids=lambda arch: f"sm_{arch}")
def test_aot_every_kernel_variant_compiles_without_spilling(arch):
    variants = [v for kernel in triton_aot.KERNELS for v in triton_aot.variants(kernel, arch)]
    results = triton_aot.compile_all(variants)
    failed = [f"{v.label}: {error}" for v, _, error in results if error]
    spilled = [f"{v.label}: {r.spill_stores} B spill stores, {r.spill_loads} B spill loads"
               for v, r, _ in results if r and (r.spill_stores or r.spill_loads)]
    for kernel in triton_aot.KERNELS:
        mine = [r for v, r, _ in results if v.kernel.name == kernel.name and r]
        print(f"sm_{arch} {kernel.name}: {len(mine)} variants, registers {min(r.registers for r in mine)}"
              f"-{max(r.registers for r in mine)}, shared memory up to {max(r.shared for r in mine)} B, "
              f"stack up to {max(r.stack for r in mine)} B")
    assert not failed, "\n".join(failed)
    assert not spilled, "\n".join(spilled)


def test_aot_lists_each_kernel_losskit_launches():
    """A new @triton.jit kernel taking pointers must be listed in triton_aot.KERNELS."""
    listed = {(k.module, k.function) for k in triton_aot.KERNELS}
    found = set()
    for info in pkgutil.iter_modules(losskit.kernels.__path__, "losskit.kernels."):
        if not info.name.rsplit(".", 1)[1].startswith("triton_") or info.name.endswith("triton_aot"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)  # a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1
            if callable(fn) and getattr(fn, "__module__", None) == info.name and any(
                    p.endswith("_ptr") for p in inspect.signature(fn).parameters):
                found.add((info.name, name))
    assert found, "no kernel found: the discovery itself is broken"
    assert found <= listed, f"kernels not compiled ahead of time: {sorted(found - listed)}"


@pytest.mark.parametrize(("function", "block", "expect"), [
    ("_not_a_power_of_two", 100, "error"),
    ("_too_many_live_values", 32768, "spill"),
])
def test_aot_reports_a_compile_error_and_a_spill(function, block, expect):
    """The check can fail: a kernel the compiler rejects, and one that spills."""
    kernel = triton_aot.Kernel(function, "triton_planted_kernels", function, inputs=("x_ptr",),
                               blocks={"BLOCK": (block,)}, grad_switch=None)
    (variant,) = [v for v in triton_aot.variants(kernel, 90) if v.dtype == "float32"]
    [(_, resources, error)] = triton_aot.compile_all([variant], workers=1)
    if expect == "error":
        assert resources is None and "power of 2" in error
    else:
        assert error is None and resources.spill_stores > 0 and resources.spill_loads > 0
