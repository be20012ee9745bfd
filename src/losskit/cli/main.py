"""Entry point of the `losskit` command (also `python -m losskit`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="losskit", description="Loss functions for PyTorch, shown and checked.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tour = commands.add_parser(
        "tour",
        help="walk through the tutorials' worked examples, each beside its expected value",
        description="Reproduce the tutorials' worked examples (entropy, cross-entropy, BCE, KL, "
        "a linear regression and a softmax classifier) and check each against its expected value.",
    )
    tour.add_argument("--out", type=Path, default=Path("losskit-tour"), help="folder for the PNG plots (default: %(default)s)")
    tour.add_argument("--mnist", type=Path, metavar="DIR", help="train the classifier on the MNIST IDX files in DIR instead of scikit-learn's digits")
    tour.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "tour":
        from .tour import run_tour

        return run_tour(args.out, args.mnist, progress=not args.no_progress)
    raise AssertionError(f"unhandled command {args.command}")  # argparse allows no other


if __name__ == "__main__":
    raise SystemExit(main())
