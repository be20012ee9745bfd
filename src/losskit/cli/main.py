"""Entry point of the `losskit` command (also `python -m losskit`)."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from pathlib import Path

# What each command imports beyond losskit, and the extra that installs it.
EXTRAS = {
    "tour": ("tqdm", "matplotlib", "sklearn"),
    "bench": ("tqdm", "matplotlib"),
    "explain": (),  # plain text from the base install; matplotlib and plotext add the plots
}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module blocked in sys.modules
        return False


def missing_extra(command: str) -> str | None:
    """One line saying what to install, or None when the command has what it needs."""
    missing = [m for m in EXTRAS.get(command, ()) if not _available(m)]
    if not missing:
        return None
    names = ", ".join("scikit-learn" if m == "sklearn" else m for m in missing)
    return f"losskit {command} needs {names}: pip install 'losskit[{command}]'"


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
        "rows are appended to DIR/bench.csv (DIR/quick.csv with --quick) and charts drawn beside it. "
        "'catalog': every loss of the catalog against torch (or its written-out definition), small and large, "
        "float32 and bfloat16, forward + backward, in one process; rows replace DIR/catalog.csv "
        "(DIR/catalog-quick.csv with --quick), charts go to DIR/charts/catalog_*.png. "
        "'posttrain': DPO and GRPO from hidden states (naive logits, Liger-Kernel's chunked losses, "
        "linear_log_probs), losses checked against each other, to DIR/posttrain.csv and DIR/charts/posttrain_*.png. "
        "'accuracy': each path's error against float64 by dtype, vocabulary, confidence and chunk count, "
        "to DIR/accuracy.csv (DIR/accuracy-quick.csv) and DIR/accuracy_*.png; set TRITON_INTERPRET=1 on CPU to "
        "include the Triton kernels (losskit's, Liger's).",
    )
    bench.add_argument("op", nargs="?", default="all",
                       choices=["ce", "bce", "lce", "llp", "vp", "all", "catalog", "accuracy", "hf", "posttrain"])
    bench.add_argument("--quick", action="store_true", help="small shapes, a minute in all: a smoke test of the harness")
    bench.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder (default: %(default)s)")
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    bench.add_argument("--heads", action="store_true",
                       help="only each op's headline shape, every provider and mode (no sweeps): what make gpu-check runs")
    bench.add_argument("--only", metavar="NAMES",
                       help="catalog: only the losses whose name contains one of these comma-separated words "
                            "(e.g. cross_entropy,huber); their rows replace theirs in the CSV, the others stay")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="cuda: bfloat16, with Liger-Kernel and cut-cross-entropy when installed; rows go to "
                            "DIR/bench-cuda.csv")
    explain = commands.add_parser(
        "explain",
        help="which loss for which problem; or one loss explained, with live numbers and a plot",
        description="Without NAME: the table of losses by problem, with their losskit, torch and Keras names. "
        "With NAME (any name or alias, e.g. bce, huber, sparse_categorical_crossentropy): its formula, inputs, "
        "options, a worked example and its common mistakes computed now, and a PNG of the loss and its gradient.",
    )
    explain.add_argument("name", nargs="?", help="a loss, by any of its names")
    explain.add_argument("--out", type=Path, default=Path("losskit-explain"), help="folder for the PNG (default: %(default)s)")
    explain.add_argument("--json", action="store_true", help="print the same as JSON")
    explain.add_argument("--no-terminal-plot", action="store_true", help="skip the plot drawn in the terminal")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    message = missing_extra(args.command)
    if message:
        print(message)
        return 1
    if args.command == "explain":
        from .explain import run_explain

        return run_explain(args.name, args.out, args.json, terminal_plots=not args.no_terminal_plot)
    if args.command == "tour":
        from .tour import run_tour

        return run_tour(args.out, args.mnist, progress=not args.no_progress)
    if args.command == "bench" and args.op == "hf":  # fine-tuning a transformers model, with and without losskit
        if not _available("transformers"):
            print("losskit bench hf needs transformers: pip install 'losskit[transformers]'")
            return 1
        from .bench_hf import run as bench_hf

        return bench_hf(args.out, args.quick)
    if args.command == "bench" and args.op == "posttrain":  # DPO and GRPO from hidden states: logits, Liger, losskit
        from .bench_posttrain import run as bench_posttrain

        return bench_posttrain(args.out, args.quick, progress=not args.no_progress)
    if args.command == "bench" and args.op == "accuracy":
        from .bench_accuracy import run as bench_accuracy

        print(f"written: {bench_accuracy(args.quick, args.out, progress=not args.no_progress)}")
        return 0
    if args.command == "bench" and args.op == "catalog":
        from .bench_catalog import main as bench_catalog

        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print("losskit bench --device cuda: no CUDA device here (torch.cuda.is_available() is False)")
                return 1
        only = [word.strip() for word in args.only.split(",") if word.strip()] if args.only else None
        return bench_catalog(args.out, args.quick, progress=not args.no_progress, device=args.device, only=only)
    if args.command == "bench":
        from .bench import headline, run
        from .charts import draw

        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print("losskit bench --device cuda: no CUDA device here (torch.cuda.is_available() is False)")
                return 1
            if args.op == "vp":
                print("losskit bench --device cuda: vp runs on CPU processes only")
                return 1
        suffix = "" if args.device == "cpu" else f"-{args.device}"
        csv_path = args.out / (f"quick{suffix}.csv" if args.quick else f"bench{suffix}.csv")
        rows = run(args.op, args.quick, csv_path, progress=not args.no_progress, device=args.device, heads=args.heads)
        for line in headline(rows):
            print(line)
        charts = draw(csv_path, args.out / (f"quick-charts{suffix}" if args.quick else f"charts{suffix}"))
        print(f"{len(rows)} rows appended to {csv_path}; charts: {', '.join(str(p) for p in charts)}")
        return 0 if rows else 1
    raise AssertionError(f"unhandled command {args.command}")  # argparse allows no other


if __name__ == "__main__":
    raise SystemExit(main())
