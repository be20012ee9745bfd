"""Every Triton kernel of losskit, compiled ahead of time for real GPU targets, no GPU needed.

Triton's interpreter (how the tests run the kernels on CPU) accepts programs its compiler
rejects and says nothing of registers, spills or shared memory. Here each kernel is
compiled by the real compiler, down to a cubin through ``ptxas``, for a
``GPUTarget("cuda", arch, 32)``: sm_80 (A100), sm_90 (H100/H200) and sm_100 (B200), for
every combination of its constexpr switches a call can select and every dtype its
pointers are launched with. ``ptxas -v`` reports the registers, spill stores/loads and
shared memory of each.

What a call can select is read off the kernel itself, by convention, so that a new switch
is covered without touching this file:

- a ``*_ptr`` parameter is a float32 pointer, except those in a kernel's ``inputs`` (the
  launcher passes the caller's tensors there: float32, bfloat16 or float16, the same dtype
  for all of them in one call) and ``int64`` (class indices);
- ``stride_*``, ``n_*``, ``n`` and ``*_period`` are 64-bit integers; other scalars float32;
- a constexpr in ``blocks`` takes each of the block sizes the launcher can choose;
  ``ROUND_BF16`` is true exactly when the launch writes bfloat16 (and computes a
  gradient); every other constexpr is a switch, and all of their combinations are
  compiled at the largest block (the most registers), every block size with all switches on.

``tests/test_triton_aot.py`` (``pytest -k aot``) fails on a compile error or any spill;
``python -m losskit.kernels.triton_aot --out FILE.csv`` writes the table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import itertools
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ARCHS = (80, 90, 100)
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class Kernel:
    """A kernel module's jitted function and how its launcher calls it."""

    name: str
    module: str
    function: str
    inputs: tuple[str, ...]  # pointers to the caller's tensors, in the call's dtype
    int64: tuple[str, ...] = ()  # pointers to class indices
    int8: tuple[str, ...] = ()  # pointers to flags
    dtypes: tuple[str, ...] = tuple(DTYPES)  # the dtypes ``inputs`` are launched with
    blocks: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every block size the launcher can pick
    grad_switch: str | None = "WITH_GRAD"  # the switch without which nothing is written in the call's dtype
    num_warps: str | None = None  # the module attribute the launcher passes as num_warps (Triton's 4 otherwise)


def _pow2_blocks(largest: int) -> tuple[int, ...]:
    return tuple(1 << b for b in range(4, largest.bit_length()))  # 16, 32, ..., largest


KERNELS = (
    Kernel("cross_entropy_rows", "losskit.kernels.triton_cross_entropy", "_cross_entropy_rows",
           inputs=("logits_ptr", "grad_ptr"), int64=("target_ptr",), blocks={"BLOCK": _pow2_blocks(2048)},
           num_warps="NUM_WARPS"),
    Kernel("bce_with_logits", "losskit.kernels.triton_binary_cross_entropy", "_bce_with_logits",
           inputs=("x_ptr", "y_ptr", "grad_ptr"), blocks={"BLOCK": (1024,)}),
    # linear_log_probs: the chunk of logits is float32 whatever the operands' dtype.
    Kernel("log_probs_stats", "losskit.kernels.triton_log_probs", "_stats_rows", inputs=(), int64=("index_ptr",),
           int8=("held_ptr",), blocks={"BLOCK": _pow2_blocks(1024)}, dtypes=("float32",), grad_switch=None),
    Kernel("log_probs_gradient", "losskit.kernels.triton_log_probs", "_gradient_rows", inputs=(),
           int64=("index_ptr",), int8=("held_ptr",), blocks={"BLOCK": _pow2_blocks(1024)}, dtypes=("float32",),
           grad_switch=None),
)


@dataclass(frozen=True)
class Variant:
    kernel: Kernel
    arch: int
    dtype: str
    constexprs: tuple[tuple[str, object], ...]

    @property
    def label(self) -> str:
        on = [k for k, v in self.constexprs if v is True]
        blocks = [f"{k}={v}" for k, v in self.constexprs if isinstance(v, int) and not isinstance(v, bool)]
        return f"{self.kernel.name} sm_{self.arch} {self.dtype} {' '.join(blocks)} [{','.join(on) or '-'}]"


@dataclass(frozen=True)
class Resources:
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int  # bytes of shared memory, as Triton's metadata records it
    stack: int


def _jit(kernel: Kernel):
    return getattr(importlib.import_module(kernel.module), kernel.function)


def _params(kernel: Kernel) -> list[tuple[str, bool]]:
    """(name, is constexpr) of the kernel's parameters, whether Triton compiles it or, under
    TRITON_INTERPRET=1 (as in the tests), interprets it."""
    import inspect

    jit = _jit(kernel)
    if hasattr(jit, "params"):
        return [(p.name, p.is_constexpr) for p in jit.params]
    signature = inspect.signature(jit.fn)
    return [(name, "constexpr" in str(p.annotation)) for name, p in signature.parameters.items()]


def _signature(kernel: Kernel, dtype: str) -> dict[str, str]:
    sig = {}
    for name, is_constexpr in _params(kernel):
        if is_constexpr:
            sig[name] = "constexpr"
        elif name in kernel.inputs:
            sig[name] = f"*{DTYPES[dtype]}"
        elif name in kernel.int64:
            sig[name] = "*i64"
        elif name in kernel.int8:
            sig[name] = "*i8"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name.startswith(("stride_", "n_")) or name == "n" or name.endswith("_period"):
            sig[name] = "i64"
        else:
            sig[name] = "fp32"
    return sig


def variants(kernel: Kernel, arch: int) -> Iterator[Variant]:
    constexprs = [name for name, is_constexpr in _params(kernel) if is_constexpr]
    switches = [c for c in constexprs if c not in kernel.blocks and c != "ROUND_BF16"]
    largest = {name: max(sizes) for name, sizes in kernel.blocks.items()}
    for dtype in kernel.dtypes:
        chosen: list[dict[str, object]] = []
        for values in itertools.product((False, True), repeat=len(switches)):
            chosen.append({**dict(zip(switches, values)), **largest})
        for name, sizes in kernel.blocks.items():
            chosen += [{**dict.fromkeys(switches, True), **largest, name: size} for size in sizes if size != largest[name]]
        for values in chosen:
            if "ROUND_BF16" in constexprs:
                writes = values.get(kernel.grad_switch, True) if kernel.grad_switch else True
                values["ROUND_BF16"] = bool(writes) and dtype == "bfloat16"
            yield Variant(kernel, arch, dtype, tuple((c, values[c]) for c in constexprs))


def every_variant(archs: tuple[int, ...] = ARCHS) -> list[Variant]:
    return [v for arch in archs for kernel in KERNELS for v in variants(kernel, arch)]


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def compile_variant(variant: Variant) -> Resources:
    """Compile one variant to a cubin for its target; raise on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs = triton.knobs
    log = io.StringIO()
    # A fresh cache, so that ptxas really runs (and prints its report) on every compile.
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
        saved = (knobs.cache.dir, knobs.nvidia.dump_ptxas_log)
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log = cache, True
        try:
            source = ASTSource(fn=_jit(variant.kernel), signature=_signature(variant.kernel, variant.dtype),
                               constexprs=dict(variant.constexprs))
            options = {}
            if variant.kernel.num_warps:
                options["num_warps"] = getattr(importlib.import_module(variant.kernel.module), variant.kernel.num_warps)
            compiled = triton.compile(source, target=GPUTarget("cuda", variant.arch, 32), options=options)
        finally:
            knobs.cache.dir, knobs.nvidia.dump_ptxas_log = saved
    report = log.getvalue()
    registers, spills, stack = _PTXAS.search(report), _SPILLS.search(report), _STACK.search(report)
    if registers is None or spills is None:
        raise RuntimeError(f"{variant.label}: no ptxas report in {report!r}")
    return Resources(int(registers.group(1)), int(spills.group(1)), int(spills.group(2)),
                     int(compiled.metadata.shared), int(stack.group(1)) if stack else 0)


def _compiling_process() -> None:
    """A worker compiles: the kernels must be jitted, not interpreted, whatever the parent's
    TRITON_INTERPRET (Triton reads it when a kernel module is imported)."""
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said out loud


def _compile_or_error(variant: Variant) -> tuple[Variant, Resources | None, str | None]:
    try:
        return variant, compile_variant(variant), None
    except Exception as error:  # reported per variant by the caller
        return variant, None, f"{type(error).__name__}: {error}"


def compile_all(variants: list[Variant], workers: int | None = None):
    """[(variant, resources or None, error or None)], compiled in parallel processes."""
    import multiprocessing

    workers = workers or max(1, min(len(variants), os.cpu_count() or 1))
    context = multiprocessing.get_context("spawn")  # fresh interpreters, kernels imported after _compiling_process
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_compiling_process) as pool:
        return list(pool.map(_compile_or_error, variants, chunksize=8))


def write_csv(results, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["kernel", "arch", "dtype", "constexprs", "registers", "spill_stores", "spill_loads",
                      "shared_bytes", "stack_bytes", "error"])
        for variant, res, error in results:
            flags = " ".join(f"{k}={v}" for k, v in variant.constexprs)
            row = [variant.kernel.name, f"sm_{variant.arch}", variant.dtype, flags]
            row += ([res.registers, res.spill_stores, res.spill_loads, res.shared, res.stack] if res else [""] * 5)
            out.writerow(row + [error or ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m losskit.kernels.triton_aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="80, 90, 100 (default: all three)")
    parser.add_argument("--out", type=Path, help="write the table as CSV")
    args = parser.parse_args(argv)
    results = compile_all(every_variant(tuple(args.arch or ARCHS)))
    if args.out:
        write_csv(results, args.out)
    failed = [(v, e) for v, _, e in results if e]
    spilled = [(v, r) for v, r, _ in results if r and (r.spill_stores or r.spill_loads)]
    compiled = [r for _, r, _ in results if r]
    print(f"{len(results)} variants: {len(failed)} failed, {len(spilled)} spilled; "
          f"registers up to {max((r.registers for r in compiled), default=0)}, "
          f"shared memory up to {max((r.shared for r in compiled), default=0)} bytes")
    for v, e in failed:
        print(f"FAILED {v.label}: {e}", file=sys.stderr)
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
