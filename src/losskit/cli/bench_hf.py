"""`losskit bench hf`: fine-tuning a transformers causal LM with and without losskit.

A Llama built from a small config (vocabulary 16384, hidden 128, 2 layers: the head is
most of the work, as in a real LLM's loss) learns a synthetic language (a random Markov
chain in which every token has four likely successors, so the best loss is about ln 4 =
1.39 nats). Each variant runs in a subprocess of its own, from the same seed: the stock
model, and the same model after ``use_linear_cross_entropy(model)``. Each reports its
loss per step, the time per step and its peak extra memory (growth of the maximum resident
set size over the baseline taken after the model, the optimizer and the data are built),
as in ``losskit bench``. Rows go to ``DIR/hf.csv`` with bench.csv's columns.
"""

from __future__ import annotations

import csv
import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .bench import CSV_FIELDS

VARIANTS = ("transformers", "losskit")


@dataclass(frozen=True)
class Setup:
    vocab: int = 16384
    hidden: int = 128
    layers: int = 2
    batch: int = 4
    seq: int = 256
    steps: int = 12
    lr: float = 3e-3  # 1e-2 overshoots on this model: the loss rises after a few steps
    seed: int = 0

    @property
    def shape(self) -> str:
        return f"llama-v{self.vocab}-h{self.hidden}-l{self.layers}-{self.batch}x{self.seq}"


def synthetic_language(vocab: int, batch: int, seq: int, steps: int, seed: int):
    """``steps`` batches of token ids from a Markov chain: each token is followed by one of
    four fixed successors (probabilities 0.4, 0.3, 0.2, 0.1), so a model can learn it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1])
    batches = []
    for _ in range(steps):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq):
            pick = torch.multinomial(weights, batch, replacement=True, generator=g)
            ids[:, t] = successors[ids[:, t - 1], pick]
        batches.append(ids)
    return batches


def finetune(setup: Setup, variant: str) -> dict:
    """Train the model for ``setup.steps`` AdamW steps; the losses, step times and peak extra memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(setup.seed)
    config = LlamaConfig(vocab_size=setup.vocab, hidden_size=setup.hidden, intermediate_size=4 * setup.hidden,
                         num_hidden_layers=setup.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=setup.seq)
    model = LlamaForCausalLM(config)
    if variant == "losskit":
        from losskit.integrations.transformers import use_linear_cross_entropy

        use_linear_cross_entropy(model)  # the one line
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.lr)
    batches = synthetic_language(setup.vocab, setup.batch, setup.seq, setup.steps, setup.seed)
    # Adam's state is made at the first step, alike for both: make it before the baseline.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(setup.seed)
    model = model.train()
    baseline = _max_rss_bytes()
    losses, times = [], []
    for ids in batches:
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"losses": losses, "times": times, "peak_extra_bytes": max(0, _max_rss_bytes() - baseline),
            "threads": torch.get_num_threads()}


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _run_variant(setup: Setup, variant: str, timeout: float) -> dict:
    spec = json.dumps({"setup": asdict(setup), "variant": variant})
    done = subprocess.run([sys.executable, "-m", "losskit.cli.bench_hf", spec],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"losskit bench hf: the {variant} run failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return pick(0.2), pick(0.5), pick(0.8)


def compare(setup: Setup, timeout: float = 900.0) -> tuple[dict[str, dict], list[str]]:
    """Both variants, each in its own process; their results and a side-by-side table."""
    results = {variant: _run_variant(setup, variant, timeout) for variant in VARIANTS}
    stock, ours = results["transformers"], results["losskit"]
    lines = [f"{setup.shape}, {setup.steps} AdamW steps, lr {setup.lr}, {stock['threads']} CPU threads",
             f"{'step':>4}  {'transformers loss':>18}  {'losskit loss':>13}"]
    for i, (a, b) in enumerate(zip(stock["losses"], ours["losses"])):
        lines.append(f"{i + 1:>4}  {a:>18.6f}  {b:>13.6f}")
    mib = {v: r["peak_extra_bytes"] / 2**20 for v, r in results.items()}
    step = {v: _quantiles(r["times"])[1] for v, r in results.items()}
    lines.append(f"peak extra memory: transformers {mib['transformers']:.0f} MiB, losskit {mib['losskit']:.0f} MiB"
                 + (f" ({mib['losskit'] / mib['transformers']:.0%})" if mib["transformers"] else ""))
    lines.append(f"median time per step: transformers {step['transformers']:.3f} s, losskit {step['losskit']:.3f} s")
    lines.append(f"largest loss difference over the run: "
                 f"{max(abs(a - b) for a, b in zip(stock['losses'], ours['losses'])):.2e} nats")
    return results, lines


def run(out_dir: Path, quick: bool = False) -> int:
    """``losskit bench hf``: print the comparison and append it to ``out_dir/hf.csv``."""
    import torch

    setup = Setup(vocab=2048, hidden=64, batch=4, seq=64, steps=4) if quick else Setup()
    results, lines = compare(setup)
    for line in lines:
        print(line)
    common = {"op": "hf", "shape": setup.shape, "device": f"cpu ({results['losskit']['threads']} threads)",
              "torch": torch.__version__, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    rows = []
    for variant, result in results.items():
        row = {**common, "provider": variant}
        mib = result["peak_extra_bytes"] / 2**20
        rows.append({**row, "mode": "train", "metric": "peak_extra_memory", "unit": "MiB", "p20": mib, "p50": mib, "p80": mib})
        p20, p50, p80 = _quantiles(result["times"])
        rows.append({**row, "mode": "train", "metric": "time", "unit": "s", "p20": p20, "p50": p50, "p80": p80})
        first, last = result["losses"][0], result["losses"][-1]
        rows.append({**row, "mode": "first step", "metric": "loss", "unit": "nats", "p20": first, "p50": first, "p80": first})
        rows.append({**row, "mode": f"step {setup.steps}", "metric": "loss", "unit": "nats", "p20": last, "p50": last, "p80": last})
    out_csv = out_dir / ("hf-quick.csv" if quick else "hf.csv")
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    new_file = not out_csv.exists()
    with out_csv.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} rows appended to {out_csv}")
    same = all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
               for a, b in zip(results["transformers"]["losses"], results["losskit"]["losses"]))
    return 0 if same else 1


if __name__ == "__main__":  # the worker: one variant, its result as one JSON line
    spec = json.loads(sys.argv[1])
    print(json.dumps(finetune(Setup(**spec["setup"]), spec["variant"])))
