"""The README's quick start runs, and ends with the error it shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_and_raises_the_error_it_shows():
    text = README.read_text()
    code = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S).group(1)
    shown = re.search(r"# IndexError: (.*)", code).group(1)
    with pytest.raises(IndexError) as raised:
        exec(compile(code, str(README), "exec"), {})
    assert str(raised.value) == shown


def test_the_catalog_bench_figures_are_those_of_its_csv():
    """Every ratio the README quotes from `losskit bench catalog` is in catalog.csv."""
    import csv

    rows = [r for r in csv.DictReader((README.parent / "benchmarks" / "results" / "catalog.csv").open())
            if r["mode"] == "full" and r["metric"] == "time" and r["provider"] == "losskit" and r["ratio_to_torch"]]
    ratios = {(r["kernel"], r["size"], r["shape"], r["dtype"]): f"{float(r['ratio_to_torch']):.2f}x" for r in rows}
    section = README.read_text().split("### Every loss against torch", 1)[1]
    quoted = re.findall(r"^\| `([\w.]+)` \| (small|large) (\S+) \| ([\d.]+x) \|", section, re.M)
    assert quoted, "the README's slowest-losses table is missing"
    for kernel, size, shape, ratio in quoted:
        assert ratios[(kernel, size, shape, "float32")] == ratio, (kernel, size)
    stamp = re.search(r"From the run of (\S+) ", section).group(1)
    assert stamp == rows[0]["timestamp"]


def test_the_before_after_figures_are_those_of_its_csv():
    import csv

    rows = list(csv.DictReader((README.parent / "benchmarks" / "results" / "before-after.csv").open()))
    times = {(r["op"], r["shape"], r["version"]): float(r["p50"]) for r in rows
             if r["metric"] == "time" and r["provider"].startswith("losskit")}
    section = README.read_text().split("### Before and after the one cross-entropy core", 1)[1]
    quoted = re.findall(r"^\| `(\w+)` ([\d x]+) \|.*\| ([\d.]+)x \|", section, re.M)
    assert len(quoted) == 5
    for name, shape, ratio in quoted:
        op = {"cross_entropy": "ce", "linear_cross_entropy": "lce"}[name]
        key = shape.strip().replace(" x ", "x")
        assert f"{times[(op, key, 'after')] / times[(op, key, 'before')]:.2f}" == ratio


def test_the_transformers_figures_are_those_of_its_csv():
    """The README's Hugging Face table quotes benchmarks/results/hf.csv."""
    import csv

    rows = list(csv.DictReader((README.parent / "benchmarks" / "results" / "hf.csv").open()))
    value = {(r["provider"], r["mode"], r["metric"]): float(r["p50"]) for r in rows}
    section = README.read_text().split("## Hugging Face transformers", 1)[1].split("\n## ", 1)[0]
    pattern = r"^\| (loss at step \d+|peak extra memory) \| ([^|]+?) \| ([^|]+?) \|$"
    table = {label: (a, b) for label, a, b in re.findall(pattern, section, re.M)}
    assert len(table) == 3, table
    steps = [m for m in table if m.startswith("loss")]
    for label in steps:
        mode = "first step" if label == "loss at step 1" else label.replace("loss at ", "")
        for provider, quoted in zip(("transformers", "losskit"), table[label]):
            assert f"{value[(provider, mode, 'loss')]:.6f}" == quoted, (label, provider)
    for provider, quoted in zip(("transformers", "losskit"), table["peak extra memory"]):
        assert f"{value[(provider, 'train', 'peak_extra_memory')]:.0f}" == quoted.removesuffix("MiB").strip(), provider
