"""losskit's compiled part: what a call into torch from Python costs too much to do there.

On the CPU one torch op dispatched from Python costs 5-15 us, and torch's own loss is one
or two C++ ops with a C++ autograd node. At a batch of 64 that fixed cost is the whole
time, so the small-call paths of the fused losses are here, in C++ over the same ATen ops:

- ``attach``: the autograd node of every fused loss in eager mode (the gradients were made
  in forward; backward scales them by grad_output and hands them out once), instead of a
  Python ``autograd.Function`` (see :mod:`losskit.kernels.fused_op`).

The extension is compiled once, at install (``python -m losskit._native``, which
``make install`` runs), with torch's own toolchain (:mod:`torch.utils.cpp_extension`), into
a folder named after the sources, torch and Python, so that a change of any of them asks
for a new build instead of loading a stale one. Where it is not built (no compiler, or
``LOSSKIT_NATIVE=0``), :func:`load` returns None and every loss takes its Python path,
with the same results: the compiled code is never needed for correctness.
``LOSSKIT_NATIVE=require`` turns a missing build into an error (the test suite sets it).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

NAME = "losskit_native"
SOURCES = sorted(Path(__file__).with_name("src").glob("*.cpp"))
HEADERS = sorted(Path(__file__).with_name("src").glob("*.h"))
# -ffp-contract=off: every product rounded before the sum it feeds, never one fused
# multiply-add, as ATen's element-wise kernels round (the written-out loops of binary.cpp,
# hinge.cpp, pointwise.cpp count on it for the Python forms' bits; x86-64 without -march
# has no FMA, but GCC on aarch64 would contract by default).
# -fopenmp: at::parallel_for is inline code that splits its range over OpenMP threads only
# where the including file is compiled with OpenMP; without it every parallel_for of these
# sources runs on one thread. The library it links, libgomp.so.1, is the one torch has
# already loaded (the same soname): one thread pool, torch.set_num_threads holds.
_CFLAGS = ["-O2", "-std=c++17", "-ffp-contract=off", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]

_module: ModuleType | None = None
_looked = False


def tag() -> str:
    """What a build depends on: the sources, the flags, torch and Python."""
    h = hashlib.sha256()
    for source in [*SOURCES, *HEADERS]:
        h.update(source.name.encode())
        h.update(source.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def build_dirs() -> list[Path]:
    """Where a build may be: ``LOSSKIT_NATIVE_DIR``, beside the sources, or the user's cache."""
    if os.environ.get("LOSSKIT_NATIVE_DIR"):
        return [Path(os.environ["LOSSKIT_NATIVE_DIR"]) / tag()]
    return [Path(__file__).with_name("build") / tag(),
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "losskit" / "native" / tag()]


def _wanted() -> str:
    setting = os.environ.get("LOSSKIT_NATIVE", "1").lower()
    if setting not in ("0", "1", "require"):
        raise ValueError(f"LOSSKIT_NATIVE must be 0, 1 or require; got {setting!r}")
    return setting


def load() -> ModuleType | None:
    """The compiled module, or None where it is not built or ``LOSSKIT_NATIVE=0``."""
    global _module, _looked
    if _looked:
        return _module
    _looked = True
    wanted = _wanted()
    if wanted == "0":
        return None
    for folder in build_dirs():
        path = folder / f"{NAME}.so"
        if path.exists():
            loader = importlib.machinery.ExtensionFileLoader(NAME, str(path))
            spec = importlib.util.spec_from_file_location(NAME, path, loader=loader)
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
            _module = module
            return _module
    if wanted == "require":
        raise RuntimeError(
            "losskit: LOSSKIT_NATIVE=require, but the compiled part is not built for these sources, this torch "
            f"and this Python (looked in {', '.join(map(str, build_dirs()))}); build it with python -m losskit._native"
        )
    return None


def _seed(folder: Path) -> None:
    """Start a new build from the newest earlier one beside it, so that ninja recompiles only
    the sources that changed since (it compares times and commands, and its dependency log
    names the headers each object read); a fresh folder would recompile every file."""
    if (folder / "build.ninja").exists():
        return
    earlier = [d for d in folder.parent.iterdir()
               if d.is_dir() and d != folder and len(d.name) == len(folder.name) and (d / "build.ninja").exists()]
    if earlier:
        newest = max(earlier, key=lambda d: d.stat().st_mtime)
        shutil.copytree(newest, folder, dirs_exist_ok=True)  # copy2: the objects keep their times


def build(verbose: bool = False) -> Path:
    """Compile the extension into the first writable build folder; returns the library."""
    from torch.utils import cpp_extension

    last_error: Exception | None = None
    for folder in build_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            last_error = error
            continue
        _seed(folder)
        # copies: cpp_extension.load appends its own flags to the lists it is given (the tag reads these)
        cpp_extension.load(NAME, [str(s) for s in SOURCES], extra_cflags=list(_CFLAGS), extra_ldflags=list(_LDFLAGS),
                           build_directory=str(folder),
                           verbose=verbose)
        for stale in folder.parent.iterdir():  # builds of earlier sources
            if stale.is_dir() and stale != folder and len(stale.name) == len(folder.name):
                shutil.rmtree(stale, ignore_errors=True)
        return folder / f"{NAME}.so"
    raise RuntimeError(f"losskit: no writable folder to build the compiled part in: {last_error}")
