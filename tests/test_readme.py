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
    section, compiled = section.split("**The compiled part.**", 1)
    quoted = re.findall(r"^\| `([\w.]+)` \| (small|large) (\S+) \| ([\d.]+x) \|", section, re.M)
    assert quoted, "the README's slowest-losses table is missing"
    for kernel, size, shape, ratio in quoted:
        assert ratios[(kernel, size, shape, "float32")] == ratio, (kernel, size)
    stamp = re.search(r"From the run of (\S+) ", section).group(1)
    assert stamp == rows[0]["timestamp"]
    # The summary: losses, median ratio, how many within 1.0x and 1.25x, per dtype and size.
    import statistics

    summary = re.findall(r"^\| (float32|bfloat16) \| (small|large) \| (\d+) \| ([\d.]+)x \| (\d+) \| (\d+) \|$",
                         section, re.M)
    assert len(summary) == 4, "the summary table is missing"
    for dtype, size, count, median, within_one, within_quarter in summary:
        values = [float(r["ratio_to_torch"]) for r in rows if r["dtype"] == dtype and r["size"] == size]
        assert (int(count), f"{statistics.median(values):.2f}") == (len(values), median), (dtype, size)
        assert int(within_one) == sum(v <= 1.0 for v in values), (dtype, size)
        assert int(within_quarter) == sum(v <= 1.25 for v in values), (dtype, size)
    # The before / after table of the compiled part: the run before it, kept beside, and this one.
    before_rows = [r for r in csv.DictReader((README.parent / "benchmarks" / "results" /
                                              "catalog-before-native.csv").open())
                   if r["mode"] == "full" and r["metric"] == "time" and r["provider"] == "losskit"
                   and r["ratio_to_torch"]]
    before = {(r["kernel"], r["size"], r["shape"]): f"{float(r['ratio_to_torch']):.2f}x" for r in before_rows
              if r["dtype"] == "float32"}
    compiled, this_round = compiled.split("**This round.**", 1)
    # ... and the table of this round: the previous run (kept beside) and this one.
    previous_rows = [r for r in csv.DictReader((README.parent / "benchmarks" / "results" /
                                                "catalog-previous.csv").open())
                     if r["mode"] == "full" and r["metric"] == "time" and r["provider"] == "losskit"
                     and r["ratio_to_torch"]]
    previous = {(r["kernel"], r["size"], r["shape"], r["dtype"]): f"{float(r['ratio_to_torch']):.2f}x"
                for r in previous_rows}
    before = {key + ("float32",): ratio for key, ratio in before.items()}
    # A row names its dtype in a column of its own, or is float32.
    pair_row = r"^\| `([\w.]+)` \| (small|large) (\S+) \|(?: (float32|bfloat16) \|)? ([\d.]+x) \| ([\d.]+x) \|$"
    for part, earlier, least in ((compiled, before, 10), (this_round, previous, 10)):
        pairs = re.findall(pair_row, part, re.M)
        assert len(pairs) >= least, "a before / after table is missing"
        for kernel, size, shape, dtype, was, now in pairs:
            dtype = dtype or "float32"
            assert earlier[(kernel, size, shape, dtype)] == was, (kernel, size, dtype, "before")
            assert ratios[(kernel, size, shape, dtype)] == now, (kernel, size, dtype, "after")


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


def _generate():
    """docs/generate.py, whose bench_figures() is what the documentation site prints."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_generate", README.parent / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fast_path_figures_are_those_of_bench_csv_as_on_the_site():
    """The README's fast-path table quotes bench.csv's newest run of each case, the run the
    site's performance page is generated from."""
    figures = _generate().bench_figures()
    by_case = {}
    for f in figures:
        by_case.setdefault(f["label"], {})[f["provider"]] = f
    section = README.read_text().split("## Fast paths and what they measure", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| (`\w+`, [^|]+?) \| ([\d.]+x), ([\d.]+x)[^|]*\| ([^|]*)\|", section, re.M)
    assert len(rows) == 4, rows
    for label, time_ratio, memory_ratio, others in rows:
        case = by_case[label.strip()]
        assert (case["torch"]["time_ratio"], case["torch"]["memory_ratio"]) == (time_ratio, memory_ratio), label
        for name, t, m in re.findall(r"(torch\.compile|torch(?:'s)? chunked)[^:]*: ([\d.]+x) time, ([\d.]+x) memory",
                                     others):
            provider = "torch chunked" if "chunked" in name else name
            assert (case[provider]["time_ratio"], case[provider]["memory_ratio"]) == (t, m), (label, name)
    stamp = re.search(r"newest rows of the CSV \(a run of ([\d-]+)\)", section).group(1)
    assert {f["timestamp"][:10] for f in figures} == {stamp}


def test_the_vocab_parallel_figures_are_those_of_bench_csv():
    import csv

    rows = [r for r in csv.DictReader((README.parent / "benchmarks" / "results" / "bench.csv").open())
            if r["op"] == "vp" and r["mode"] == "full"]
    newest = max(r["timestamp"] for r in rows)
    value = {(r["provider"], r["metric"]): float(r["p50"]) for r in rows if r["timestamp"] == newest}
    ranks = ("losskit 1 rank", "losskit 2 ranks", "losskit 4 ranks")
    memory = ", ".join(f"{value[(p, 'peak_extra_memory')]:.0f}" for p in ranks).rsplit(", ", 1)
    times = ", ".join(f"{value[(p, 'time')]:.2f}" for p in ranks).rsplit(", ", 1)
    text = " ".join(README.read_text().split())
    assert f"peak extra memory per rank {' and '.join(memory)} MiB" in text
    assert f"forward + backward {' and '.join(times)} s for the slowest rank" in text


def test_the_gpu_figures_are_those_of_the_newest_gpu_check_run():
    """The README's H200 table quotes the newest run in benchmarks/results/bench-cuda.csv."""
    import csv

    rows = list(csv.DictReader((README.parent / "benchmarks" / "results" / "bench-cuda.csv").open()))
    stamp = max(r["timestamp"] for r in rows)
    value = {(r["op"], r["provider"], r["metric"]): float(r["p50"]) for r in rows
             if r["timestamp"] == stamp and r["mode"] == "full"}
    section = README.read_text().split("### Measured on an NVIDIA H200", 1)[1].split("\n## ", 1)[0]
    assert f"Its run\nof {stamp} " in section or f"run of {stamp}" in section.replace("\n", " ")
    header = next(line for line in section.splitlines() if line.startswith("| op, shape"))
    table = [line for line in section.splitlines() if line.startswith("| `")]
    providers = {"torch": "torch", "torch.compile": "torch.compile", "Liger-Kernel": "liger",
                 "cut-cross-entropy": "cce", "losskit": "losskit"}
    columns = [providers[c.strip()] for c in header.strip("|").split("|")[1:]]
    ops = {"cross_entropy": "ce", "binary_cross_entropy_with_logits": "bce", "linear_cross_entropy": "lce",
           "linear_log_probs": "llp"}
    quoted = [line for line in table if line.startswith("| `")]
    assert len(quoted) == 4
    for line in quoted:
        cells = [c.strip() for c in line.strip("|").split("|")]
        op = ops[re.match(r"`(\w+)`", cells[0]).group(1)]
        for provider, cell in zip(columns, cells[1:]):
            if cell == "—":
                assert (op, provider, "time") not in value, (op, provider)
                continue
            ms, mib = re.fullmatch(r"([\d.]+) ms, ([\d,]+) MiB", cell).groups()
            assert f"{value[(op, provider, 'time')] * 1e3:.2f}" == ms, (op, provider)
            assert f"{value[(op, provider, 'peak_extra_memory')]:,.0f}" == mib, (op, provider)


def test_the_accuracy_figures_are_the_worst_cases_of_its_csv():
    import csv

    rows = list(csv.DictReader((README.parent / "benchmarks" / "results" / "accuracy.csv").open()))
    worst: dict[tuple[str, str, str, str], float] = {}
    for r in rows:
        if r["roundings"]:
            key = (r["op"], r["provider"], r["metric"], r["dtype"])
            worst[key] = max(worst.get(key, 0.0), float(r["roundings"]))
    section = README.read_text().split("## Accuracy and batch invariance", 1)[1].split("\n## ", 1)[0]
    quoted = re.findall(r"^\| `(\w+)` (\w+) \| (\w+) \| (\S+) \| (\S+) \| (\S+) \|$", section, re.M)
    assert len(quoted) == 6
    for op, metric, dtype, *figures in quoted:
        for provider, figure in zip(("torch", "liger", "losskit"), figures):
            assert f"{worst[(op, provider, metric, dtype)]:.3g}" == figure, (op, metric, dtype, provider)


def test_the_posttrain_figures_are_those_of_its_csv():
    import csv

    rows = list(csv.DictReader((README.parent / "benchmarks" / "results" / "posttrain.csv").open()))
    value = {(r["provider"], r["op"], r["metric"]): float(r["p50"]) for r in rows if r["mode"] == "full"}
    section = README.read_text().split("`losskit bench posttrain` runs", 1)[1].split("\n\n", 3)[1]
    providers = ("logits", "liger", "losskit", "losskit chunk=128")
    quoted = re.findall(r"^\| (DPO|GRPO) (peak extra memory|time per step) \| (.+) \|$", section, re.M)
    assert len(quoted) == 4
    for op, what, cells in quoted:
        for provider, cell in zip(providers, (c.strip() for c in cells.split("|"))):
            if what == "time per step":
                assert f"{value[(provider, op.lower(), 'time')]:.2f} s" == cell, (op, provider)
            else:
                assert f"{value[(provider, op.lower(), 'peak_extra_memory')]:.0f} MiB" == cell, (op, provider)
