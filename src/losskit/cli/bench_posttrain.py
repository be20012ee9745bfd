"""`losskit bench posttrain`: DPO and GRPO from hidden states, three ways, in one run.

The same step (policy hidden states and output layer in, loss out, then backward to
both) computed by:

- ``logits``: the naive way: the ``[tokens, vocabulary]`` logits materialised, a float32
  ``log_softmax`` and a gather, then losskit's :func:`~losskit.functional.dpo_loss` or
  :func:`~losskit.functional.grpo_loss` on the per-token log-probs;
- ``liger`` / ``liger eager``: Liger-Kernel's fused linear chunked losses
  (``LigerFusedLinearDPOLoss``, ``LigerFusedLinearGRPOLoss``), their chunk function under
  ``torch.compile`` (Liger's default) or eager (``compiled=False``);
- ``losskit``: :func:`~losskit.functional.linear_log_probs` (no logits held) then the same
  ``dpo_loss`` / ``grpo_loss``; ``losskit chunk=K`` passes ``chunk_size=K``.

The problems, alike for every provider (one seed, float32, CPU):

- DPO: ``pairs`` chosen/rejected pairs of ``seq`` tokens, the first quarter of each
  sequence a prompt (``ignore_index``); sigmoid loss, beta 0.1, summed sequence log-probs.
  The reference model's log-probs come from its own hidden states and output layer under
  no_grad, inside the step: Liger's DPO takes a reference only that way
  (``ref_input``/``ref_weight``), not as precomputed numbers, so the others do the same.
- GRPO: ``completions`` completions of ``seq`` tokens with random lengths (the mask), one
  advantage per completion (what Liger takes), old and reference log-probs given as
  constants; loss type ``'dapo'`` (TRL's default, supported by both), beta 0.04, the
  importance-sampling-corrected KL (TRL 1.16's default) on in both.

Each (problem, provider) runs in a subprocess of its own. The worker imports everything,
builds the inputs in place, runs one warm-up step (compilation, lazy imports, Liger's
first-call work), then resets the kernel's high-water mark of its resident set
(``/proc/self/clear_refs``) and takes the current RSS as the baseline: the peak extra
memory is the high-water mark's growth over it during the timed steps, the step's own
memory, not the one-off cost of compiling. glibc is told to give large blocks back to the
system on free (``MALLOC_MMAP_THRESHOLD_``), so memory freed by the warm-up cannot hide a
step's allocations. The loss of every provider is checked against the ``logits`` one
(relative 1e-4), and the largest gradient difference from it is reported. Rows go to
``DIR/posttrain.csv`` (``posttrain-quick.csv`` with ``--quick``) with bench.csv's columns;
charts to ``DIR/charts/posttrain_*.png``.
"""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bench import CSV_FIELDS

PROBLEMS = ("dpo", "grpo")
PROVIDERS = ("logits", "liger", "liger eager", "losskit")
DPO_BETA = 0.1
GRPO_BETA = 0.04
GRPO_LOSS_TYPE = "dapo"  # TRL's default; Liger's too
IGNORE = -100
# The issue's targets for linear_log_probs' losses.
MEMORY_VS_LOGITS = 0.25
TIME_VS_LIGER = 1.2


@dataclass(frozen=True)
class Setup:
    # The 4096 x 512 x 65536 took 35 s a step on one (shared) CPU core, some 40
    # steps in a run: an eighth of its work, with the same hidden/tokens ratio (the weight
    # gradient, which every provider holds, stays 1/8 of the logits' size).
    tokens: int = 2048  # policy tokens per step: 2 x pairs x seq (DPO), completions x seq (GRPO)
    hidden: int = 256
    vocab: int = 32768
    seq: int = 256
    reps: int = 3
    # An extra "losskit chunk=K" provider (None for none). linear_log_probs' default chunk
    # is half of linear_cross_entropy's, whose floor is H rows: 256 rows here, two float32
    # [256, V] buffers, 64 MiB, a quarter of the logits by itself. 128 rows measured 0.2x
    # the logits for 9-23% more time; 64 and 32 save little more memory for 20-35% more.
    tuned_chunk: int | None = 128
    providers: tuple[str, ...] = field(default=PROVIDERS)

    @property
    def shape(self) -> str:
        return f"{self.tokens}x{self.hidden}x{self.vocab}"

    @property
    def logits_bytes(self) -> int:
        return self.tokens * self.vocab * 4

    def all_providers(self) -> tuple[str, ...]:
        extra = () if self.tuned_chunk is None else (f"losskit chunk={self.tuned_chunk}",)
        return tuple(self.providers) + extra


# -- the worker: runs in its own process ------------------------------------------------


def _rss_now_and_peak() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kib = line.split()[:2]
                values[key] = int(kib) * 1024
    return values["VmRSS:"], values["VmHWM:"]


def _reset_peak() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _constant_log_probs(x, w, target, rows: int = 16):
    """Per-token log-probs under no_grad, ``rows`` tokens at a time, so that making the
    constants (old and reference log-probs) adds only a few MiB to the high-water mark."""
    import torch

    flat_x, flat_t = x.reshape(-1, x.shape[-1]), target.reshape(-1)
    out = torch.empty(flat_t.shape, dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, flat_t.shape[0], rows):
            z = flat_x[start:start + rows] @ w.T
            out[start:start + rows] = z.log_softmax(-1).gather(1, flat_t[start:start + rows, None]).squeeze(1)
    return out.reshape(target.shape)


def _build(problem: str, provider: str, setup: Setup):
    """(leaves with gradients, a function returning the loss of one step)."""
    import torch
    import torch.nn.functional as F

    import losskit.functional as LF

    liger = None
    if provider.startswith("liger"):
        import liger_kernel.chunked_loss as liger
    chunk = int(provider.split("=")[1]) if provider.startswith("losskit chunk=") else None

    g = torch.Generator().manual_seed(0)
    n, h, v, t = setup.tokens, setup.hidden, setup.vocab, setup.seq
    rows = n // t
    x = torch.empty(rows, t, h).normal_(generator=g).requires_grad_()
    w = torch.empty(v, h).normal_(std=0.05, generator=g).requires_grad_()
    target = torch.randint(0, v, (rows, t), generator=g)

    def logits_log_probs(x, w, target):
        logits = F.linear(x, w)
        log_p = logits.float().log_softmax(-1)
        return log_p.gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)

    if problem == "dpo":
        target[:, : t // 4] = IGNORE  # the prompt
        ref_x = (x.detach() + 0.1 * torch.empty_like(x).normal_(generator=g))
        ref_w = (w.detach() + 0.01 * torch.empty_like(w).normal_(generator=g))
        pairs = rows // 2
        valid = target != IGNORE

        def from_token_log_probs(per_token, ref_per_token):
            seq, ref = per_token.masked_fill(~valid, 0).sum(-1), ref_per_token.masked_fill(~valid, 0).sum(-1)
            return LF.dpo_loss(seq[:pairs], seq[pairs:], ref[:pairs], ref[pairs:], beta=DPO_BETA)

        if provider == "logits":
            def step():
                with torch.no_grad():
                    ref = logits_log_probs(ref_x, ref_w, target)
                return from_token_log_probs(logits_log_probs(x, w, target), ref)
        elif liger is not None:
            loss = liger.LigerFusedLinearDPOLoss(beta=DPO_BETA, ignore_index=IGNORE, use_ref_model=True,
                                                 average_log_prob=False, compiled=provider == "liger")

            def step():
                return loss(w, x, target, ref_input=ref_x, ref_weight=ref_w)[0]
        else:
            def step():
                with torch.no_grad():
                    ref = LF.linear_log_probs(ref_x, ref_w, target, ignore_index=IGNORE, chunk_size=chunk)
                return from_token_log_probs(LF.linear_log_probs(x, w, target, ignore_index=IGNORE, chunk_size=chunk), ref)
        return [x, w], step

    # GRPO: completions of random lengths (at least a quarter of seq), padding masked out.
    lengths = torch.randint(t // 4, t + 1, (rows,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    rewards = torch.empty(rows).normal_(generator=g)
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)  # one group
    current = _constant_log_probs(x.detach(), w.detach(), target)
    old = current + 0.05 * torch.empty_like(current).normal_(generator=g)  # some ratios clipped
    ref = current + 0.2 * torch.empty_like(current).normal_(generator=g)
    del current
    options = {"beta": GRPO_BETA, "loss_type": GRPO_LOSS_TYPE, "use_bias_correction_kl": True}

    if provider == "logits":
        def step():
            return LF.grpo_loss(logits_log_probs(x, w, target), old, advantages, mask, ref_log_probs=ref, **options)
    elif liger is not None:
        loss = liger.LigerFusedLinearGRPOLoss(use_ref_model=True, compiled=provider == "liger", **options)

        def step():
            return loss(x, w, target, mask, advantages, ref_per_token_logps=ref, old_per_token_logps=old)[0]
    else:
        def step():
            log_p = LF.linear_log_probs(x, w, target, chunk_size=chunk)
            return LF.grpo_loss(log_p, old, advantages, mask, ref_log_probs=ref, **options)
    return [x, w], step


def worker(spec: dict) -> dict:
    """One (problem, provider): its loss, step times, peak extra memory, and (with
    ``grads_to``) its gradients saved for the parent to compare."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    setup = Setup(**{k: tuple(v) if k == "providers" else v for k, v in spec["setup"].items()})
    leaves, step = _build(spec["problem"], spec["provider"], setup)

    def clear() -> None:
        for leaf in leaves:
            leaf.grad = None

    started = time.perf_counter()
    loss = step()
    loss.backward()  # warm-up: compilation, lazy imports, first-call work
    warmup_s = time.perf_counter() - started
    value = loss.item()
    del loss
    if spec.get("grads_to"):
        torch.save({"x": leaves[0].grad, "w": leaves[1].grad}, spec["grads_to"])
    clear()
    gc.collect()
    hwm_reset = _reset_peak()
    baseline = _rss_now_and_peak()[0] if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(spec["reps"]):
        started = time.perf_counter()
        step().backward()
        times.append(time.perf_counter() - started)
        clear()
    peak = _rss_now_and_peak()[1]
    return {"loss": value, "times": times, "warmup_s": warmup_s, "peak_extra_bytes": max(0, peak - baseline),
            "hwm_reset": hwm_reset, "threads": torch.get_num_threads()}


# -- the runner -------------------------------------------------------------------------


def _run_worker(spec: dict, timeout: float) -> dict | str:
    # Large blocks from mmap and back to the system on free, in every provider alike: with
    # glibc's dynamic threshold, blocks freed by the warm-up stay in the heap and a later
    # step reuses them without growing the RSS.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    try:
        done = subprocess.run([sys.executable, "-m", "losskit.cli.bench_posttrain", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    import numpy as np

    p20, p50, p80 = np.percentile(values, [20, 50, 80])
    return float(p20), float(p50), float(p80)


def measure(setup: Setup, timeout: float = 600.0, progress: bool = True) -> dict[str, dict[str, dict]]:
    """Every problem and provider, each in its own process: {problem: {provider: result}},
    each result with ``grad_max_diff`` against the ``logits`` provider's gradients."""
    import torch

    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for problem in PROBLEMS:
            results[problem] = {}
            reference = None
            for provider in setup.all_providers():
                grads_to = os.path.join(tmp, f"{problem}-{provider.replace(' ', '_')}.pt")
                spec = {"problem": problem, "provider": provider, "setup": asdict(setup), "reps": setup.reps,
                        "grads_to": grads_to}
                began = time.perf_counter()
                result = _run_worker(spec, timeout)
                if isinstance(result, str):
                    print(f"  {problem} {provider}: skipped ({result})", file=sys.stderr)
                    continue
                grads = torch.load(grads_to)
                os.remove(grads_to)
                if reference is None:
                    reference = grads  # the first provider, logits
                result["grad_max_diff"] = max(float((grads[k] - reference[k]).abs().max()) for k in ("x", "w"))
                results[problem][provider] = result
                if progress:
                    print(f"  {problem} {provider}: loss {result['loss']:.6f}, step "
                          f"{_quantiles(result['times'])[1]:.3f} s, peak extra "
                          f"{result['peak_extra_bytes'] / 2**20:.0f} MiB ({time.perf_counter() - began:.0f} s)",
                          file=sys.stderr)
            del reference
    return results


def rows_of(setup: Setup, results: dict[str, dict[str, dict]]) -> list[dict]:
    import torch

    threads = next(r["threads"] for by in results.values() for r in by.values())
    common = {"mode": "full", "shape": setup.shape, "device": f"cpu ({threads} threads)", "torch": torch.__version__,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    rows = []
    for problem, by_provider in results.items():
        for provider, result in by_provider.items():
            row = {**common, "provider": provider, "op": problem}
            p20, p50, p80 = _quantiles(result["times"])
            rows.append({**row, "metric": "time", "unit": "s", "p20": p20, "p50": p50, "p80": p80})
            mib = result["peak_extra_bytes"] / 2**20
            rows.append({**row, "metric": "peak_extra_memory", "unit": "MiB", "p20": mib, "p50": mib, "p80": mib})
            rows.append({**row, "metric": "loss", "unit": "nats", "p20": result["loss"], "p50": result["loss"],
                         "p80": result["loss"]})
            diff = result["grad_max_diff"]
            rows.append({**row, "metric": "grad_max_abs_diff_vs_logits", "unit": "1", "p20": diff, "p50": diff,
                         "p80": diff})
    return rows


def agreement(results: dict[str, dict[str, dict]], rel: float = 1e-4, abs_: float = 1e-5) -> list[str]:
    """Lines naming each provider whose loss differs from the logits' (empty when all agree)."""
    bad = []
    for problem, by_provider in results.items():
        want = by_provider.get("logits", {}).get("loss")
        for provider, result in by_provider.items():
            if want is not None and not math.isclose(result["loss"], want, rel_tol=rel, abs_tol=abs_):
                bad.append(f"{problem}: {provider}'s loss {result['loss']:.8g} differs from the logits' {want:.8g}")
    return bad


def headline(setup: Setup, results: dict[str, dict[str, dict]]) -> list[str]:
    """losskit's memory and time against Liger's and the logits' size, and the targets."""
    logits_mib = setup.logits_bytes / 2**20
    lines = [f"{setup.shape} (tokens x hidden x vocabulary), float32, logits {logits_mib:.0f} MiB; "
             f"targets: memory <= Liger's and <= {MEMORY_VS_LOGITS}x the logits, time <= {TIME_VS_LIGER}x Liger's"]
    for problem, by in results.items():
        liger = by.get("liger") or by.get("liger eager")
        for ours in [p for p in by if p.startswith("losskit")]:
            mine = by[ours]
            mib, step = mine["peak_extra_bytes"] / 2**20, _quantiles(mine["times"])[1]
            parts = [f"{problem} {ours}: {mib:.0f} MiB = {mib / logits_mib:.2f}x the logits "
                     f"({'met' if mib <= MEMORY_VS_LOGITS * logits_mib else 'MISSED'}), {step:.2f} s"]
            for name in ("liger", "liger eager"):
                if name in by:
                    other = by[name]
                    omib, ostep = other["peak_extra_bytes"] / 2**20, _quantiles(other["times"])[1]
                    parts.append(f"vs {name} {omib:.0f} MiB ({'met' if mib <= omib else 'MISSED'}), "
                                 f"{ostep:.2f} s = {step / ostep:.2f}x ({'met' if step <= TIME_VS_LIGER * ostep else 'MISSED'})")
            if "logits" in by:
                lmib, lstep = by["logits"]["peak_extra_bytes"] / 2**20, _quantiles(by["logits"]["times"])[1]
                parts.append(f"vs logits {lmib:.0f} MiB, {lstep:.2f} s")
            lines.append("; ".join(parts))
        if liger is None:
            lines.append(f"{problem}: no Liger row (is Liger-Kernel installed?)")
    return lines


def draw(rows: list[dict], out_dir: Path, logits_mib: float, prefix: str = "posttrain") -> list[Path]:
    """Two PNGs: time and peak extra memory, one group of bars per problem."""
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in ("time", "peak_extra_memory"):
        picked = [r for r in rows if r["metric"] == metric]
        if not picked:
            continue
        problems = [p for p in PROBLEMS if any(r["op"] == p for r in picked)]
        providers = list(dict.fromkeys(r["provider"] for r in picked))
        fig = Figure(figsize=(7.5, 4), dpi=100)
        ax = fig.subplots()
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            values = {r["op"]: r for r in picked if r["provider"] == provider}
            xs = [j + i * width for j, p in enumerate(problems) if p in values]
            p50 = [float(values[p]["p50"]) for p in problems if p in values]
            err = None
            if metric == "time":
                err = [[v - float(values[p]["p20"]) for v, p in zip(p50, problems)],
                       [float(values[p]["p80"]) - v for v, p in zip(p50, problems)]]
            ax.bar(xs, p50, width, yerr=err, label=provider)
        if metric == "peak_extra_memory":
            ax.axhline(logits_mib, color="grey", linestyle="--", linewidth=1, label="the logits' size")
            ax.axhline(MEMORY_VS_LOGITS * logits_mib, color="grey", linestyle=":", linewidth=1,
                       label=f"{MEMORY_VS_LOGITS}x the logits")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(problems))], [p.upper() for p in problems])
        unit = picked[0]["unit"]
        ax.set(ylabel=f"{metric.replace('_', ' ')} ({unit})",
               title=f"forward + backward from hidden states, {picked[0]['shape']} (N x H x V), {picked[0]['device']}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        path = out_dir / f"{prefix}_{metric}.png"
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    return paths


QUICK = Setup(tokens=256, hidden=64, vocab=2048, seq=64, reps=2, tuned_chunk=32)


def run(out_dir: Path, quick: bool = False, progress: bool = True, setup: Setup | None = None) -> int:
    """``losskit bench posttrain``: measure, print the headline, append the CSV, draw the charts."""
    setup = setup or (QUICK if quick else Setup())
    results = measure(setup, progress=progress)
    rows = rows_of(setup, results)
    for line in headline(setup, results):
        print(line)
    for problem, by in results.items():
        print(f"{problem}: largest gradient difference from the logits': "
              + ", ".join(f"{p} {r['grad_max_diff']:.1e}" for p, r in by.items() if p != "logits"))
    out_csv = out_dir / ("posttrain-quick.csv" if quick else "posttrain.csv")
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    new_file = not out_csv.exists()
    with out_csv.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    charts = draw(rows, out_dir / ("quick-charts" if quick else "charts"), setup.logits_bytes / 2**20)
    print(f"{len(rows)} rows appended to {out_csv}; charts: {', '.join(str(p) for p in charts)}")
    disagreements = agreement(results)
    for line in disagreements:
        print(line)
    return 1 if disagreements or not rows else 0


if __name__ == "__main__":  # the worker: one JSON spec in, one JSON result out
    print(json.dumps(worker(json.loads(sys.argv[1]))))
