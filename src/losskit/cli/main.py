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
    bench = commands.add_parser(
        "bench",
        help="time and measure losskit against the alternatives, appending to a CSV and drawing charts",
        description="Each op, provider and shape runs in its own process (peak memory per process); "
        "rows are appended to DIR/bench.csv (DIR/quick.csv with --quick) and charts drawn beside it.",
    )
    bench.add_argument("op", nargs="?", default="all", choices=["ce", "bce", "lce", "vp", "all"])
    bench.add_argument("--quick", action="store_true", help="small shapes, a minute in all: a smoke test of the harness")
    bench.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder (default: %(default)s)")
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "tour":
        from .tour import run_tour

        return run_tour(args.out, args.mnist, progress=not args.no_progress)
    if args.command == "bench":
        from .bench import headline, run
        from .charts import draw

        csv_path = args.out / ("quick.csv" if args.quick else "bench.csv")
        rows = run(args.op, args.quick, csv_path, progress=not args.no_progress)
        for line in headline(rows):
            print(line)
        charts = draw(csv_path, args.out / ("quick-charts" if args.quick else "charts"))
        print(f"{len(rows)} rows appended to {csv_path}; charts: {', '.join(str(p) for p in charts)}")
        return 0 if rows else 1
    raise AssertionError(f"unhandled command {args.command}")  # argparse allows no other


if __name__ == "__main__":
    raise SystemExit(main())
