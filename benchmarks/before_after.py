"""Two versions of losskit side by side in one run: `losskit bench`'s workers for the same
cases, alternating between a checkout of the earlier version and this one.

    python benchmarks/before_after.py --before ../old-checkout/src [--reps 5] [--out CSV]

Each (case, provider, version) runs in a process of its own (as `losskit bench` does), the
versions taking turns case by case, so that both see the same machine. The torch
providers run once per case, from this version. Rows: version, provider, op, shape, metric,
unit, p20, p50, p80, device, torch, timestamp, commit.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = [  # (op, shape, providers, reps): the headline shapes and an everyday batch
    ("ce", (8192, 32768), ("torch", "losskit"), 5),
    ("ce", (4096, 1000), ("torch", "losskit"), 20),
    ("ce", (64, 10), ("torch", "losskit"), 400),
    ("lce", (2048, 512, 65536), ("torch", "torch chunked", "losskit"), 3),
    ("lce", (1024, 512, 16384), ("torch chunked", "losskit"), 5),
]


def _worker(src: Path, op: str, shape, provider: str, reps: int) -> dict:
    spec = {"op": op, "shape": list(shape), "provider": provider, "modes": ["full"], "reps": reps}
    env = dict(os.environ, PYTHONPATH=str(src))
    done = subprocess.run([sys.executable, "-m", "losskit.cli.bench", json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=1800)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _commit(src: Path) -> str:
    done = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the src/ folder of the earlier checkout")
    parser.add_argument("--after", type=Path, default=HERE.parent / "src")
    parser.add_argument("--rounds", type=int, default=2, help="turns per version and case")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "before-after.csv")
    args = parser.parse_args()
    import torch

    versions = {"before": args.before.resolve(), "after": args.after.resolve()}
    commits = {name: _commit(src) for name, src in versions.items()}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = []
    for op, shape, providers, reps in CASES:
        runs: dict[tuple[str, str], list[float]] = {}
        peaks: dict[tuple[str, str], int] = {}
        for _ in range(args.rounds):
            for provider in providers:
                names = ("before", "after") if provider == "losskit" else ("after",)
                for name in names:
                    result = _worker(versions[name], op, shape, provider, reps)
                    runs.setdefault((name, provider), []).extend(result["times"]["full"])
                    peaks[(name, provider)] = max(peaks.get((name, provider), 0), result["peak_extra_bytes"])
        for (name, provider), times in runs.items():
            times = sorted(times)
            q = [times[int(p * (len(times) - 1))] for p in (0.2, 0.5, 0.8)]
            label = provider if provider != "losskit" else f"losskit ({name})"
            rows.append({"version": name, "provider": label, "op": op, "shape": "x".join(map(str, shape)),
                         "metric": "time", "unit": "s", "p20": q[0], "p50": q[1], "p80": q[2], "device": "cpu",
                         "torch": torch.__version__, "timestamp": stamp, "commit": commits[name]})
            rows.append({"version": name, "provider": label, "op": op, "shape": "x".join(map(str, shape)),
                         "metric": "peak_extra_memory", "unit": "bytes", "p20": "", "p50": peaks[(name, provider)],
                         "p80": "", "device": "cpu", "torch": torch.__version__, "timestamp": stamp,
                         "commit": commits[name]})
            print(f"{op} {shape} {label}: {q[1] * 1e3:.3f} ms, peak extra {peaks[(name, provider)] / 2**20:.0f} MiB",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
