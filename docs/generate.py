"""Build the documentation sources in build/docs from docs/pages and losskit.catalog.

    python docs/generate.py        (make docs runs it, then mkdocs build --strict)

Hand-written pages are copied; the choosing table, one page per family of losses (each
loss with its formula, inputs, options, the worked example and its mistakes computed now,
and the plot of its loss and gradient), the error messages and the benchmark charts are
generated, so that the site says what the code does today. The code shown beside a number
is the body of the catalog function that computed it (losskit.catalog.snippet).
"""

from __future__ import annotations

import inspect
import shutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "docs" / "pages"
OUT = ROOT / "build" / "docs"


def _number(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _losskit_names(entry) -> list[str]:
    """losskit's names of a loss as a user imports them: cross_entropy, CrossEntropyLoss,
    keras.Huber, info.entropy."""
    return [c if c.split(".")[0] in ("keras", "info") else c.split(".", 1)[1] for c in entry.covers]


def choosing_page(catalog) -> str:
    lines = ["# Which loss for which problem", "",
             "Every loss of losskit by the problem it serves: what the model's last layer should give (the "
             "**output layer**), the **target** the loss wants, then its names in losskit, torch and Keras. "
             "Not sure between BCE and cross-entropy? See [BCE or CE?](index.md#bce-or-ce). The same list "
             "in a terminal: `losskit explain`.", ""]
    for family, title in catalog.FAMILIES.items():
        entries = [e for e in catalog.ENTRIES if e.family == family]
        if not entries:
            continue
        lines += [f"## {title}", "", "| loss | output layer | target | losskit | torch | Keras |",
                  "|---|---|---|---|---|---|"]
        for entry in entries:
            losskit = ", ".join(f"`{c}`" for c in _losskit_names(entry))
            torch_names = ", ".join(f"`{t.split('.')[-1]}`" for t in entry.torch) or "-"
            keras_names = ", ".join(f"`{k.removeprefix('keras.losses.')}`" for k in entry.keras) or "-"
            lines.append(f"| [{entry.title}](losses/{family}.md#{entry.key})<br>*{_cell(', '.join(entry.problems))}* | "
                         f"{_cell(entry.output_layer)} | {_cell(entry.target)} | {losskit} | {torch_names} | "
                         f"{keras_names} |")
        lines.append("")
    return "\n".join(lines)


def family_page(catalog, explain, family: str) -> str:
    title = catalog.FAMILIES[family]
    lines = [f"# {title}", ""]
    for entry in catalog.ENTRIES:
        if entry.family != family:
            continue
        data = explain.explain_data(entry, OUT / "img")
        main_name = _losskit_names(entry)[0]
        heading = entry.title if main_name.lower() in entry.title.lower() else f"{entry.title}: `{main_name}`"
        lines += [f"## {heading} {{ #{entry.key} }}", "", entry.summary, ""]
        lines += [line for note in entry.notes for line in (note, "")]
        lines += ["```math", entry.formula, "```", "",
                  f"- **losskit**: {', '.join(f'`{c}`' for c in entry.covers)}",
                  f"- **torch**: {', '.join(f'`{t}`' for t in entry.torch) or '-'}",
                  f"- **Keras**: {', '.join(f'`{k}`' for k in entry.keras) or '-'}",
                  f"- **also called**: {', '.join(f'`{a}`' for a in entry.aliases) or '-'}",
                  f"- **for**: {', '.join(entry.problems)}",
                  f"- **input**: {entry.prediction}",
                  f"- **target**: {entry.target}",
                  f"- **output layer**: {entry.output_layer}", ""]
        lines += ["**Properties**", ""] + [f"- {k}: {v}" for k, v in entry.properties.items()] + [""]
        lines += ["**Options**", ""] + [f"- `{k}`: {v}" for k, v in entry.options.items()] + [""]
        lines += ["**Example** (computed when this page was built)", "", "```python",
                  "import torch", "import losskit.functional as F  # K = losskit.keras, info = losskit.info", "",
                  catalog.session(data["example"]["code"]), _number(data["example"]["value"]), "```", ""]
        if data["plot"]:
            lines += [f"![{entry.title}: the loss and its gradient](../img/{entry.key}.png)", ""]
        measured = bench_sentences(entry.key, "..")
        if measured:
            lines += ["**Measured**", ""] + [f"- {sentence}" for sentence in measured] + [""]
        for mistake in data["mistakes"]:
            lines += [f'!!! warning "Common mistake: {mistake["title"]}"', "", f"    {mistake['why']}", "",
                      "    ```python"] + [f"    {line}" for line in mistake["code"].splitlines()] + ["    ```", ""]
            lines += ["    | case | gives |", "    |---|---|"] + [
                f"    | {_cell(str(k))} | {_cell(_number(v))} |" for k, v in mistake["numbers"].items()] + [""]
            for warning in mistake["warnings"]:
                lines += [f"    losskit warns: *{_cell(warning)}*", ""]
        if entry.torch_vs_keras:
            lines += [f"**torch and Keras.** {entry.torch_vs_keras}", ""]
        if entry.links:
            lines += ["**See also**: " + "; ".join(f"[{text}](../{target})" for text, target in entry.links), ""]
    return "\n".join(lines)


BCE_OR_CE = """\
z = torch.tensor([1.5, -0.3])  # one logit per example
y = torch.tensor([1, 0])  # their classes
F.binary_cross_entropy_with_logits(z, y.float())
F.cross_entropy(torch.stack([torch.zeros_like(z), z], 1), y)  # logits [0, z]"""


def bce_or_ce_block() -> str:
    """The home page's BCE-or-CE example as a session, each value computed now."""
    import torch

    import losskit.functional as F

    namespace = {"torch": torch, "F": F}
    lines = ["```python", ">>> import torch", ">>> import losskit.functional as F"]
    for line in BCE_OR_CE.splitlines():
        lines.append(f">>> {line}")
        code = line.split("  #")[0]
        if "=" in code.split("(")[0]:
            exec(code, namespace)  # noqa: S102 - the page's own example
        else:
            lines.append(repr(eval(code, namespace)))  # noqa: S307
    return "\n".join(lines + ["```"])


def errors_page(catalog) -> str:
    """The hand-written page with its table filled in: each bad call of
    losskit.catalog.errors (its code) beside the message losskit raises now."""
    from losskit.catalog.errors import ERRORS

    text = (PAGES / "errors.md").read_text()
    rows = ["| bad input | what losskit says |", "|---|---|"]
    for title, call in ERRORS:
        code = catalog.snippet(call)
        try:
            catalog.run(call)
        except Exception as error:  # noqa: BLE001 - the message is what is shown
            rows.append(f"| {title}: `{_cell(code)}` | `{type(error).__name__}: {_cell(str(error))}` |")
        else:
            raise AssertionError(f"{code} did not raise")
    return text.replace("{{ error_table }}", "\n".join(rows))


# The cases of `losskit bench` (benchmarks/results/bench.csv) quoted on the site: (catalog
# entry, op, shape, how the page names it). Every figure is read from the CSV's newest run
# of the case; docs/check_site.py reads the CSV again and fails if the site says otherwise.
BENCH_CASES = (
    ("cross_entropy", "ce", "8192x32768", "`cross_entropy`, N=8192, C=32768"),
    ("linear_cross_entropy", "lce", "2048x512x65536", "`linear_cross_entropy`, N=2048, H=512, C=65536"),
    ("linear_cross_entropy", "lce", "1024x512x262144", "`linear_cross_entropy`, N=1024, H=512, C=262144"),
    ("bce_with_logits", "bce", "8192x4096", "`binary_cross_entropy_with_logits`, 8192 x 4096"),
)
BENCH_CSV = ROOT / "benchmarks" / "results" / "bench.csv"


def format_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def format_memory(mib: float) -> str:
    return f"{mib / 1024:.3g} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def bench_case(op: str, shape: str, path: Path = BENCH_CSV) -> dict | None:
    """The newest run of one case (forward + backward): {'timestamp', 'providers': {provider:
    {'time': s, 'memory': MiB}}}, or None when the CSV has no such run."""
    import csv

    if not path.exists():
        return None
    rows = [r for r in csv.DictReader(path.open()) if r["op"] == op and r["shape"] == shape and r["mode"] == "full"
            and r["p50"]]
    stamps = [r["timestamp"] for r in rows if r["provider"] == "losskit"]
    if not stamps:
        return None
    stamp = max(stamps)
    providers: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["timestamp"] == stamp:
            providers.setdefault(r["provider"], {})[{"time": "time", "peak_extra_memory": "memory"}[r["metric"]]] = \
                float(r["p50"])
    return {"timestamp": stamp, "providers": providers}


def bench_figures(path: Path = BENCH_CSV) -> list[dict]:
    """Every BENCH_CASES figure as the site prints it: one dict per (case, other provider)
    with the formatted times, memories and losskit's ratios."""
    out = []
    for key, op, shape, label in BENCH_CASES:
        case = bench_case(op, shape, path)
        if case is None:
            continue
        ours = case["providers"].get("losskit", {})
        for provider, theirs in case["providers"].items():
            if provider == "losskit" or "time" not in theirs or "time" not in ours:
                continue
            out.append({
                "key": key, "label": label, "timestamp": case["timestamp"], "provider": provider,
                "losskit_time": format_time(ours["time"]), "losskit_memory": format_memory(ours["memory"]),
                "time": format_time(theirs["time"]), "memory": format_memory(theirs["memory"]),
                "time_ratio": f"{ours['time'] / theirs['time']:.2f}x",
                "memory_ratio": f"{ours['memory'] / theirs['memory']:.2f}x",
            })
    return out


def headline_table(path: Path = BENCH_CSV) -> str:
    """The performance page's first table, from bench.csv's newest run of each case."""
    lines = ["| case | losskit: time, peak extra memory | against | its time, memory | losskit / it: time, memory |",
             "|---|---|---|---|---|"]
    previous = None
    for f in bench_figures(path):
        first = f["label"] != previous
        previous = f["label"]
        case = f"{f['label']}<br>*run of {f['timestamp']}*" if first else ""
        ours = f"{f['losskit_time']}, {f['losskit_memory']}" if first else ""
        lines.append(f"| {case} | {ours} | {f['provider']} | {f['time']}, {f['memory']} | "
                     f"**{f['time_ratio']}**, **{f['memory_ratio']}** |")
    return "\n".join(lines)


def bench_sentences(key: str, root: str) -> list[str]:
    """What a loss's section says of its benchmark cases (``root``: the site root, relative)."""
    out = []
    for label, figures in _grouped(f for f in bench_figures() if f["key"] == key):
        against = "; ".join(f"{f['provider']} {f['time']} and {f['memory']} ({f['time_ratio']} the time, "
                            f"{f['memory_ratio']} the memory)" for f in figures)
        out.append(f"{label}, forward + backward on a 2-core CPU (run of {figures[0]['timestamp']}): losskit "
                   f"{figures[0]['losskit_time']} and {figures[0]['losskit_memory']} of extra memory; {against}. "
                   f"[All the benchmarks]({root}/performance.md).")
    return out


def _grouped(figures) -> list[tuple[str, list[dict]]]:
    groups: dict[str, list[dict]] = {}
    for f in figures:
        groups.setdefault(f["label"], []).append(f)
    return list(groups.items())


# ---- the API reference ---------------------------------------------------------------------
# Public objects beyond the catalog's losses: (module, names; None for the module's __all__).
API_EXTRA = (
    ("losskit", ("checks", "checks_mode")),
    ("losskit.distributed", None),
    ("losskit.integrations", None),
    ("losskit.kernels", ("reference_only", "fused_only", "chunk_sizes")),
)


def api_objects(catalog) -> list[tuple[str, str, list[str]]]:
    """(section title, catalog anchor or '', object paths), the losses grouped by family."""
    import importlib

    sections = []
    for family, title in catalog.FAMILIES.items():
        for entry in (e for e in catalog.ENTRIES if e.family == family):
            sections.append((f"{title}|{entry.title}", f"losses/{family}.md#{entry.key}",
                             [f"losskit.{c}" for c in entry.covers]))
    covered = {path for _, _, paths in sections for path in paths}
    for module_name, names in API_EXTRA:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # an optional part not in this tree (yet)
        names = getattr(module, "__all__", ()) if names is None else names
        paths = [f"{module_name}.{n}" for n in names if hasattr(module, n)
                 and not inspect.ismodule(getattr(module, n)) and f"{module_name}.{n}" not in covered]
        if paths:
            sections.append((f"More of losskit|{module_name}", "", paths))
    return sections


def api_page(catalog) -> str:
    import importlib

    lines = ["# API reference", "",
             "Every public function and class of losskit, grouped as the [catalog](choosing.md) groups the "
             "losses; each loss's heading links to its explanation (formula, example, mistakes, plot). "
             "`import losskit.functional as F`, `losskit.nn`, `losskit.keras` and `losskit.info` hold them; "
             "the last section lists the rest (vocabulary-parallel losses, the checks switch, ...).", ""]
    family = None
    for title, anchor, paths in api_objects(catalog):
        group, name = title.split("|")
        if group != family:
            lines += [f"## {group}", ""]
            family = group
        lines += [f"### [{name}]({anchor})" if anchor else f"### `{name}`", ""]
        for path in paths:
            module, _, name = path.rpartition(".")
            # A class shows its own docstring and signature; its methods (forward, ...)
            # are torch.nn.Module's and say nothing of the loss.
            is_class = inspect.isclass(getattr(importlib.import_module(module), name))
            lines += [f"::: {path}"] + (["    options:", "      members: false"] if is_class else []) + [""]
    return "\n".join(lines)


def catalog_speed_section() -> str:
    """'Every loss against torch': the ratios of `losskit bench catalog`'s CSV, float32,
    forward + backward, worst first, with its notes: every figure read from the CSV."""
    import csv

    path = ROOT / "benchmarks" / "results" / "catalog.csv"
    if not path.exists():
        return ""
    rows = [r for r in csv.DictReader(path.open()) if r["mode"] == "full" and r["metric"] == "time"
            and r["dtype"] == "float32" and r["provider"] == "losskit" and r["ratio_to_torch"]]
    rows.sort(key=lambda r: -float(r["ratio_to_torch"]))
    stamp = rows[0]["timestamp"] if rows else ""
    lines = [
        "## Every loss against torch",
        "",
        f"`losskit bench catalog` (run of {stamp}, `benchmarks/results/catalog.csv`): every loss of the catalog,",
        "forward + backward, float32, beside torch's function of the same name (or the definition written out in",
        "plain torch, for the losses torch lacks), at a batch of 64 and at a large size; median times, worst ratio",
        "first. The note says where losskit deliberately does more than torch.",
        "",
        "![every loss against torch](img/bench/catalog_float32.png)",
        "",
        "| loss | size | shape | torch | losskit | ratio | note |",
        "|---|---|---|---|---|---|---|",
    ]
    torch_times = {(r["kernel"], r["size"], r["dtype"]): r for r in csv.DictReader(path.open())
                   if r["mode"] == "full" and r["metric"] == "time" and r["provider"] == "torch"}
    for r in rows:
        twin = torch_times.get((r["kernel"], r["size"], r["dtype"]))
        torch_time = f"{float(twin['p50']) * 1e3:.3g} ms" if twin and twin["p50"] else ""
        lines.append(f"| `{r['kernel']}` | {r['size']} | {r['shape']} | {torch_time} | "
                     f"{float(r['p50']) * 1e3:.3g} ms | {float(r['ratio_to_torch']):.2f}x | {r['note']} |")
    return "\n".join(lines) + "\n"


def gpu_section() -> str:
    """'On an NVIDIA GPU': the newest run of `make gpu-check` in bench-cuda.csv, every figure
    read from the CSV."""
    import csv

    path = ROOT / "benchmarks" / "results" / "bench-cuda.csv"
    if not path.exists():
        return ""
    rows = list(csv.DictReader(path.open()))
    stamp = max(r["timestamp"] for r in rows)
    rows = [r for r in rows if r["timestamp"] == stamp and r["mode"] == "full"]
    value = {(r["op"], r["provider"], r["metric"]): float(r["p50"]) for r in rows}
    shapes = {r["op"]: r["shape"] for r in rows}
    device = rows[0]["device"]
    names = {"ce": "cross_entropy", "bce": "binary_cross_entropy_with_logits", "lce": "linear_cross_entropy",
             "llp": "linear_log_probs"}
    providers = [("torch", "torch"), ("torch.compile", "torch.compile"), ("liger", "Liger-Kernel"),
                 ("cce", "cut-cross-entropy"), ("losskit", "losskit")]
    lines = ["## On an NVIDIA GPU", "",
             f"`make gpu-check` on {device}, run of {stamp} (`benchmarks/results/bench-cuda.csv`; torch "
             f"{rows[0]['torch']}): forward + backward, median time and peak memory allocated beyond the inputs.", "",
             "| op, shape | " + " | ".join(label for _, label in providers) + " |",
             "|---|" + "---|" * len(providers)]
    for op, name in names.items():
        if op not in shapes:
            continue
        cells = []
        for key, _ in providers:
            t, m = value.get((op, key, "time")), value.get((op, key, "peak_extra_memory"))
            cells.append("" if t is None else f"{t * 1e3:.2f} ms, {m:,.0f} MiB")
        lines.append(f"| `{name}` {shapes[op].replace('x', ' x ')} | " + " | ".join(cells) + " |")
    lines += ["", "![linear cross-entropy on the GPU](img/bench-cuda/lce_time.png)",
              "![linear cross-entropy memory on the GPU](img/bench-cuda/lce_peak_extra_memory.png)", ""]
    return "\n".join(lines) + "\n"


def accuracy_section() -> str:
    """'Accuracy against float64': the worst case of each path in accuracy.csv, in
    roundings of the dtype, and its charts."""
    import csv

    path = ROOT / "benchmarks" / "results" / "accuracy.csv"
    if not path.exists():
        return ""
    rows = list(csv.DictReader(path.open()))
    worst: dict[tuple[str, str, str, str], float] = {}
    for r in rows:
        if r["roundings"]:
            key = (r["op"], r["metric"], r["dtype"], r["provider"])
            worst[key] = max(worst.get(key, 0.0), float(r["roundings"]))
    providers = sorted({k[3] for k in worst}, key=lambda p: (p != "torch", p))
    lines = ["## Accuracy against float64", "",
             f"`losskit bench accuracy` (run of {rows[0]['timestamp']}, `benchmarks/results/accuracy.csv`): the error "
             "of each path against float64 on the same rounded inputs, in roundings of the output dtype (1 = the one "
             "unavoidable final rounding), worst case over vocabularies, confidences up to 0.9999 and chunk counts. "
             "The contract (README, tests/test_accuracy.py): at most 2 in bfloat16 and float16.", "",
             "| quantity | dtype | " + " | ".join(providers) + " |", "|---|---|" + "---|" * len(providers)]
    for op, metric, dtype in sorted({k[:3] for k in worst}):
        if metric == "loss":
            continue
        cells = [f"{worst[(op, metric, dtype, p)]:.3g}" if (op, metric, dtype, p) in worst else "" for p in providers]
        lines.append(f"| `{op}` {metric} | {dtype} | " + " | ".join(cells) + " |")
    lines += ["", "![dlogits error](img/accuracy/accuracy_dlogits.png)",
              "![dW error](img/accuracy/accuracy_dW.png)", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from losskit import catalog
    from losskit.cli import explain

    warnings.simplefilter("ignore")
    if OUT.exists():
        shutil.rmtree(OUT)
    shutil.copytree(PAGES, OUT)
    for page in (ROOT / "docs").glob("*.md"):  # pages written beside docs/pages (fine-tuning.md, ...)
        shutil.copy(page, OUT / page.name)
    (OUT / "choosing.md").write_text(choosing_page(catalog))
    (OUT / "losses").mkdir()
    for family in catalog.FAMILIES:
        (OUT / "losses" / f"{family}.md").write_text(family_page(catalog, explain, family))
    (OUT / "errors.md").write_text(errors_page(catalog))
    (OUT / "api.md").write_text(api_page(catalog))
    (OUT / "api-objects.txt").write_text("\n".join(p for _, _, paths in api_objects(catalog) for p in paths) + "\n")
    charts = ROOT / "benchmarks" / "results" / "charts"
    shutil.copytree(charts, OUT / "img" / "bench")
    if (ROOT / "benchmarks" / "results" / "charts-cuda").exists():
        shutil.copytree(ROOT / "benchmarks" / "results" / "charts-cuda", OUT / "img" / "bench-cuda")
    (OUT / "img" / "accuracy").mkdir(parents=True, exist_ok=True)
    for chart in (ROOT / "benchmarks" / "results").glob("accuracy_*.png"):
        shutil.copy(chart, OUT / "img" / "accuracy" / chart.name)
    for page in OUT.glob("*.md"):
        text = page.read_text()
        if "{{" in text:
            text = text.replace("{{ headline_table }}", headline_table())
            text = text.replace("{{ bce_or_ce }}", bce_or_ce_block())
            text = text.replace("{{ lce_figures }}", "\n".join(
                f"- {s}" for s in bench_sentences("linear_cross_entropy", ".")))
            page.write_text(text)
    performance = OUT / "performance.md"
    performance.write_text(performance.read_text() + "\n" + catalog_speed_section() + "\n" + gpu_section() + "\n"
                           + accuracy_section())
    print(f"documentation sources in {OUT}: {sum(1 for _ in OUT.rglob('*.md'))} pages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
