"""Fine-tune a Hugging Face causal LM with and without losskit; loss and peak memory side by side.

The one line that matters::

    from losskit.integrations.transformers import use_linear_cross_entropy
    model = use_linear_cross_entropy(model)  # model(ids, labels=ids).loss: same numbers, no logits

A Llama built from a config (no download: vocabulary 16384, hidden 128, 2 layers) learns
a synthetic language (a Markov chain with four likely successors per token) offline on
CPU. The stock model and the patched one each run in a process of their own, from the
same seed, so that each peak memory is its own; see ``losskit.cli.bench_hf.finetune`` for
the training loop. ``losskit bench hf`` runs the same and appends the figures to
benchmarks/results/hf.csv.

    python examples/finetune_transformers.py                # the full size, a minute or two
    python examples/finetune_transformers.py --steps 4 --vocab 2048 --seq 64   # quick
"""

from __future__ import annotations

import argparse

from losskit.cli.bench_hf import Setup, compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Setup()
    for name in ("vocab", "hidden", "layers", "batch", "seq", "steps"):
        parser.add_argument(f"--{name}", type=int, default=getattr(default, name))
    parser.add_argument("--lr", type=float, default=default.lr)
    args = parser.parse_args()
    _, lines = compare(Setup(**vars(args)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
