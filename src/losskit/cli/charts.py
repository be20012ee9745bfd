"""Charts of a benchmark CSV: one PNG per (op, metric), the newest run of each row."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


def _latest(rows: list[dict]) -> list[dict]:
    """Keep the newest measurement of each (provider, op, mode, shape, metric)."""
    newest: dict[tuple, dict] = {}
    for row in rows:
        key = (row["provider"], row["op"], row["mode"], row["shape"], row["metric"])
        if key not in newest or row["timestamp"] >= newest[key]["timestamp"]:
            newest[key] = row
    return list(newest.values())


def draw(csv_path: Path, out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure

    with csv_path.open() as handle:
        rows = _latest(list(csv.DictReader(handle)))
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        if row["mode"] == "full":
            groups[(row["op"], row["metric"])].append(row)
    paths = []
    for (op, metric), group in sorted(groups.items()):
        shapes = sorted({r["shape"] for r in group}, key=lambda s: [int(v) for v in s.split("x")])
        providers = sorted({r["provider"] for r in group}, key=lambda p: (p != "losskit", p))
        fig = Figure(figsize=(max(6, 1.3 * len(shapes)), 4), dpi=100)
        ax = fig.subplots()
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            values = {r["shape"]: r for r in group if r["provider"] == provider}
            xs = [j + i * width for j, s in enumerate(shapes) if s in values]
            p50 = [float(values[s]["p50"]) for s in shapes if s in values]
            low = [p - float(values[s]["p20"]) for p, s in zip(p50, [s for s in shapes if s in values])]
            high = [float(values[s]["p80"]) - p for p, s in zip(p50, [s for s in shapes if s in values])]
            ax.bar(xs, p50, width, yerr=[low, high] if metric == "time" else None, label=provider)
        unit = group[0]["unit"]
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=20)
        ax.set(ylabel=f"{metric.replace('_', ' ')} ({unit})", xlabel="shape (N x C, or N x H x C)",
               title=f"{op}: forward + backward, {group[0]['device']}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the bars, never over one
        path = out_dir / f"{op}_{metric}.png"
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    return paths
