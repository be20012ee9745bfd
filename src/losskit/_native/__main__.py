"""``python -m losskit._native``: compile losskit's C++ part (see :mod:`losskit._native`)."""

from __future__ import annotations

import argparse
import time

from . import build, build_dirs, load


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m losskit._native", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args()
    for folder in build_dirs():
        if (folder / "losskit_native.so").exists():
            print(f"losskit: compiled part up to date in {folder}")
            break
    else:
        start = time.perf_counter()
        path = build(verbose=args.verbose)
        print(f"losskit: compiled part built in {time.perf_counter() - start:.0f} s: {path}")
    if load() is None:
        raise SystemExit("losskit: the compiled part was built but does not load")


if __name__ == "__main__":
    main()
