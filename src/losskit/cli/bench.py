"""`losskit bench`: losskit against the alternatives, side by side in one run.

Each (op, provider, shape) runs in a subprocess of its own, so that its peak memory is its
own: the worker builds the inputs, notes its maximum resident set size (the baseline),
runs a warm-up and the timed repetitions, and reports the growth of the maximum RSS over
the baseline as the peak extra memory. Rows are appended to one long CSV; charts.py draws
the PNGs from it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CSV_FIELDS = ["provider", "op", "mode", "shape", "metric", "unit", "p20", "p50", "p80", "device", "torch", "timestamp"]
MODES = ("forward", "backward", "full")


@dataclass(frozen=True)
class Case:
    op: str  # ce | bce | lce | llp (linear log-probs) | vp (vocab-parallel linear cross-entropy over gloo processes)
    shape: tuple[int, ...]  # ce/bce: (N, C); lce, vp: (N, H, C)
    providers: tuple[str, ...]
    modes: tuple[str, ...] = ("full",)
    reps: int = 5
    device: str = "cpu"
    dtype: str = "float32"


CE_PROVIDERS = ("torch", "torch.compile", "losskit")
BCE_PROVIDERS = ("torch", "losskit")
LCE_PROVIDERS = ("torch", "torch chunked", "torch.compile", "losskit")
# Vocab-parallel: the same total vocabulary split over 1, 2 and 4 gloo processes on CPU.
VP_PROVIDERS = ("losskit 1 rank", "losskit 2 ranks", "losskit 4 ranks")


# On CUDA, in bfloat16: Liger-Kernel and Apple's cut-cross-entropy join when installed.
CUDA_CE_PROVIDERS = ("torch", "torch.compile", "liger", "losskit")
CUDA_LCE_PROVIDERS = ("torch", "torch.compile", "torch chunked", "liger", "cce", "losskit")


def plan(which: str, quick: bool, device: str = "cpu", heads: bool = False) -> list[Case]:
    """The cases of a run: the issue's headline shapes in every mode, then sweeps (with
    ``heads``, the first case of each op alone)."""
    if heads:
        first: dict[str, Case] = {}
        for case in plan(which, quick, device):
            first.setdefault(case.op, case)
        return list(first.values())
    if device == "cuda":
        return _cuda_plan(which, quick)
    cases: list[Case] = []
    if quick:
        if which in ("ce", "all"):
            cases.append(Case("ce", (256, 4096), ("torch", "losskit"), MODES, 3))
        if which in ("bce", "all"):
            cases.append(Case("bce", (256, 4096), BCE_PROVIDERS, MODES, 3))
        if which in ("lce", "all"):
            cases.append(Case("lce", (128, 64, 4096), ("torch", "torch chunked", "losskit"), MODES, 3))
        if which in ("llp", "all"):
            cases.append(Case("llp", (128, 64, 4096), ("torch", "losskit"), MODES, 3))
        if which in ("vp", "all"):
            cases.append(Case("vp", (128, 64, 4096), VP_PROVIDERS, reps=3))
        return cases
    if which in ("ce", "all"):
        cases.append(Case("ce", (8192, 32768), CE_PROVIDERS, MODES))
        cases += [Case("ce", (2048, c), ("torch", "losskit")) for c in (4096, 16384, 65536, 262144)]
        cases += [Case("ce", (n, 32768), ("torch", "losskit")) for n in (1024, 4096)]
    if which in ("bce", "all"):
        cases.append(Case("bce", (8192, 4096), BCE_PROVIDERS, MODES))
    if which in ("lce", "all"):
        cases.append(Case("lce", (2048, 512, 65536), LCE_PROVIDERS, MODES))
        providers = ("torch", "torch chunked", "losskit")
        cases += [Case("lce", (1024, 512, c), providers, reps=3) for c in (4096, 16384, 262144)]
        cases += [Case("lce", (n, 512, 65536), providers, reps=3) for n in (512, 4096)]
    if which in ("llp", "all"):
        cases.append(Case("llp", (2048, 512, 65536), ("torch", "torch.compile", "losskit"), MODES))
    if which in ("vp", "all"):
        cases.append(Case("vp", (1024, 512, 65536), VP_PROVIDERS, reps=3))
    return cases


def _cuda_plan(which: str, quick: bool) -> list[Case]:
    """CE at N=8192, C=131072 and LCE at N=8192, H=4096, C=131072 in bfloat16, then sweeps
    over the vocabulary; --quick shrinks everything to a smoke test."""
    bf16 = {"device": "cuda", "dtype": "bfloat16"}
    cases: list[Case] = []
    if which in ("ce", "all"):
        head = (1024, 8192) if quick else (8192, 131072)
        cases.append(Case("ce", head, CUDA_CE_PROVIDERS, MODES, 3 if quick else 10, **bf16))
        if not quick:
            cases += [Case("ce", (8192, c), CUDA_CE_PROVIDERS, reps=10, **bf16) for c in (32768, 65536, 262144)]
    if which in ("bce", "all"):
        cases.append(Case("bce", (1024, 1024) if quick else (8192, 4096), BCE_PROVIDERS, MODES, 10, **bf16))
    if which in ("lce", "all"):
        head = (512, 256, 8192) if quick else (8192, 4096, 131072)
        cases.append(Case("lce", head, CUDA_LCE_PROVIDERS, MODES, 3 if quick else 10, **bf16))
        if not quick:
            cases += [Case("lce", (8192, 4096, c), CUDA_LCE_PROVIDERS, reps=5, **bf16) for c in (32768, 65536, 262144)]
    if which in ("llp", "all"):
        head = (512, 256, 8192) if quick else (8192, 4096, 131072)
        cases.append(Case("llp", head, ("torch", "torch.compile", "losskit"), MODES, 3 if quick else 10, **bf16))
    return cases


# -- the worker: runs in its own process ------------------------------------------------


def _max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _build(op: str, shape: tuple[int, ...], provider: str, device: str = "cpu", dtype: str = "float32"):
    """Inputs (made in place, so that no temporary inflates the baseline) and the loss."""
    import torch
    import torch.nn.functional as F

    import losskit.functional as LF

    torch.manual_seed(0)
    make = {"device": device, "dtype": getattr(torch, dtype)}
    if op in ("ce", "bce"):
        n, c = shape
        x = torch.empty(n, c, **make).normal_().requires_grad_()
        if op == "ce":
            target = torch.randint(0, c, (n,), device=device)
            fns = {"torch": F.cross_entropy, "losskit": LF.cross_entropy}
            if provider == "liger":
                fns["liger"] = _liger().LigerCrossEntropyLoss()
        else:
            target = torch.empty(n, c, **make).bernoulli_(0.3)
            fns = {"torch": F.binary_cross_entropy_with_logits, "losskit": LF.binary_cross_entropy_with_logits}
        if provider == "torch.compile":
            fns["torch.compile"] = torch.compile(fns["torch"], dynamic=False)
        fn = fns[provider]
        return [x], lambda: fn(x, target)
    n, h, c = shape
    x = torch.empty(n, h, **make).normal_().requires_grad_()
    w = torch.empty(c, h, **make).normal_(std=0.02).requires_grad_()
    target = torch.randint(0, c, (n,), device=device)
    if op == "llp":  # per-token log-probs under a per-token upstream gradient, as a policy-gradient step
        advantage = torch.empty(n, **make).normal_()

        def materialised(x, w, target):
            return F.linear(x, w).float().log_softmax(-1).gather(1, target[:, None]).squeeze(1)

        fn = {"torch": materialised, "losskit": LF.linear_log_probs}.get(provider)
        if provider == "torch.compile":
            fn = torch.compile(materialised, dynamic=False)
        return [x, w], lambda: (fn(x, w, target) * advantage).sum()

    def eager(x, w, target):
        return F.cross_entropy(F.linear(x, w), target)

    if provider == "torch":
        fn: Callable = eager
    elif provider == "torch.compile":
        fn = torch.compile(eager, dynamic=False)
    elif provider == "torch chunked":
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=256)
        fn = lambda x, w, target: F.linear_cross_entropy(x, w, target, options=options)  # noqa: E731
    elif provider == "liger":
        liger_loss = _liger().LigerFusedLinearCrossEntropyLoss()
        fn = lambda x, w, target: liger_loss(w, x, target)  # noqa: E731
    elif provider == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy as cce
        except ImportError:
            raise SystemExit("skipped: cut-cross-entropy is not installed (pip install cut-cross-entropy)") from None
        fn = cce
    else:
        fn = LF.linear_cross_entropy
    return [x, w], lambda: fn(x, w, target)


def _liger():
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        raise SystemExit("skipped: Liger-Kernel is not installed (pip install liger-kernel)") from None
    return liger


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    import numpy as np

    p20, p50, p80 = np.percentile(values, [20, 50, 80])
    return float(p20), float(p50), float(p80)


def worker(spec: dict) -> dict:
    """Measure one (op, provider, shape): times per mode and the peak extra memory."""
    import torch

    if spec["op"] == "vp":
        return _vocab_parallel(spec)

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    device = spec.get("device", "cpu")
    leaves, loss_fn = _build(spec["op"], tuple(spec["shape"]), spec["provider"], device, spec.get("dtype", "float32"))
    cuda = device == "cuda"

    def clear() -> None:
        for leaf in leaves:
            leaf.grad = None

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    if cuda:  # the device's own accounting: peak allocated beyond the inputs
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _max_rss_bytes()
    loss_fn().backward()  # warm-up (and compilation, for torch.compile)
    clear()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {mode: [] for mode in spec["modes"]}
    for _ in range(spec["reps"]):
        for mode in spec["modes"]:
            start = now()
            loss = loss_fn()
            forward_done = now()
            if mode == "forward":
                times[mode].append(forward_done - start)
                del loss
                continue
            loss.backward()
            end = now()
            times[mode].append(end - (forward_done if mode == "backward" else start))
            clear()
    peak = torch.cuda.max_memory_allocated() if cuda else _max_rss_bytes()
    return {"times": times, "peak_extra_bytes": max(0, peak - baseline)}


def _vocab_parallel(spec: dict) -> dict:
    """vocab_parallel_linear_cross_entropy over ``world`` gloo processes: the slowest rank's
    times and the largest peak extra memory of one rank."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    world = int(spec["provider"].split()[1])
    with tempfile.TemporaryDirectory() as tmp:
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_vocab_parallel_rank, args=(world, spec, os.path.join(tmp, "store"), queue), nprocs=world, join=True)
        results = [queue.get() for _ in range(world)]
    times = {mode: [max(r["times"][mode][i] for r in results) for i in range(spec["reps"])] for mode in spec["modes"]}
    return {"times": times, "peak_extra_bytes": max(r["peak_extra_bytes"] for r in results)}


def _vocab_parallel_rank(rank: int, world: int, spec: dict, store: str, queue) -> None:
    import torch
    import torch.distributed as dist

    from losskit.distributed import vocab_parallel_linear_cross_entropy

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    n, h, c = spec["shape"]
    start, end = c * rank // world, c * (rank + 1) // world
    torch.manual_seed(0)
    x = torch.empty(n, h).normal_().requires_grad_()
    w = torch.empty(end - start, h).normal_(std=0.02).requires_grad_()
    target = torch.randint(0, c, (n,))
    baseline = _max_rss_bytes()
    vocab_parallel_linear_cross_entropy(x, w, target, vocab_start=start, num_classes=c).backward()  # warm-up
    times: dict[str, list[float]] = {mode: [] for mode in spec["modes"]}
    for _ in range(spec["reps"]):
        for mode in spec["modes"]:
            x.grad = w.grad = None
            dist.barrier()
            began = time.perf_counter()
            vocab_parallel_linear_cross_entropy(x, w, target, vocab_start=start, num_classes=c).backward()
            times[mode].append(time.perf_counter() - began)
    queue.put({"times": times, "peak_extra_bytes": max(0, _max_rss_bytes() - baseline)})
    dist.barrier()  # every rank done before the group is torn down
    dist.destroy_process_group()


# -- the runner ---------------------------------------------------------------------------


def _run_worker(case: Case, provider: str, timeout: float) -> dict | str:
    spec = {"op": case.op, "shape": list(case.shape), "provider": provider, "modes": list(case.modes),
            "reps": case.reps, "device": case.device, "dtype": case.dtype}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "losskit.cli.bench", json.dumps(spec)],
            capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(
    which: str, quick: bool, out_csv: Path, timeout: float = 600.0, progress: bool = True, device: str = "cpu",
    heads: bool = False,
) -> list[dict]:
    """Run the plan, append its rows to ``out_csv`` and return them."""
    import torch

    from tqdm import tqdm

    cases = plan(which, quick, device, heads)
    jobs = [(case, provider) for case in cases for provider in case.providers]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    if device == "cuda":
        device = f"{torch.cuda.get_device_name()} (bfloat16)"
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
    rows: list[dict] = []
    for case, provider in tqdm(jobs, desc="losskit bench", disable=not progress):
        shape = "x".join(str(s) for s in case.shape)
        result = _run_worker(case, provider, timeout)
        if isinstance(result, str):
            print(f"  {case.op} {shape} {provider}: skipped ({result})", file=sys.stderr)
            continue
        common = {"provider": provider, "op": case.op, "shape": shape, "device": device,
                  "torch": torch.__version__, "timestamp": stamp}
        for mode, values in result["times"].items():
            p20, p50, p80 = _quantiles(values)
            rows.append({**common, "mode": mode, "metric": "time", "unit": "s", "p20": p20, "p50": p50, "p80": p80})
        mib = result["peak_extra_bytes"] / 2**20
        rows.append({**common, "mode": "full", "metric": "peak_extra_memory", "unit": "MiB", "p20": mib, "p50": mib, "p80": mib})
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    new_file = not out_csv.exists()
    with out_csv.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    return rows


def headline(rows: list[dict]) -> list[str]:
    """losskit's time and memory as a fraction of each alternative's, per op and shape."""
    full = {(r["op"], r["shape"], r["provider"], r["metric"]): float(r["p50"]) for r in rows if r["mode"] == "full"}
    lines = []
    for (op, shape, provider, metric), value in sorted(full.items()):
        if provider == "losskit":
            continue
        ours = full.get((op, shape, "losskit", metric))
        if ours is None or value <= 0:
            continue
        unit = "s" if metric == "time" else "MiB"
        lines.append(
            f"{op} {shape} {metric}: losskit {ours:.3g} {unit} vs {provider} {value:.3g} {unit} = {ours / value:.2f}x"
        )
    return lines


if __name__ == "__main__":  # the worker entry point: one JSON spec in, one JSON result out
    print(json.dumps(worker(json.loads(sys.argv[1]))))
