"""Build the documentation sources in build/docs from docs/pages and losskit.catalog.

    python docs/generate.py        (make docs runs it, then mkdocs build --strict)

Hand-written pages are copied; the choosing table, one page per family of losses (each
loss with its formula, inputs, options, the worked example and its mistakes computed now,
and the plot of its loss and gradient), the error messages and the benchmark charts are
generated, so that the site says what the code does today. The code shown beside a number
is the body of the catalog function that computed it (losskit.catalog.snippet).
"""

from __future__ import annotations

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


def choosing_page(catalog) -> str:
    lines = ["# Which loss for which problem", "",
             "Every loss of losskit, by the problem it serves, with its names in losskit, torch and Keras, the "
             "output layer it wants and its target. The same table is `losskit explain`.", ""]
    for family, title in catalog.FAMILIES.items():
        lines += [f"## {title}", "", "| loss | losskit | torch | Keras | output layer | target |",
                  "|---|---|---|---|---|---|"]
        for entry in catalog.ENTRIES:
            if entry.family != family:
                continue
            short = [c.split(".", 1)[1] for c in entry.covers if not c.startswith("keras.")]
            short = short or [c for c in entry.covers if c.startswith("keras.")][:2]
            losskit = ", ".join(f"`{c}`" for c in short)
            torch_names = ", ".join(f"`{t.split('.')[-1]}`" for t in entry.torch) or "-"
            keras_names = ", ".join(f"`{k.split('.')[-1]}`" for k in entry.keras) or "-"
            lines.append(f"| [{entry.title}](losses/{family}.md#{entry.key})<br>*{_cell(', '.join(entry.problems))}* | "
                         f"{losskit} | {torch_names} | {keras_names} | {_cell(entry.output_layer)} | "
                         f"{_cell(entry.target)} |")
        lines.append("")
    return "\n".join(lines)


def family_page(catalog, explain, family: str) -> str:
    title = catalog.FAMILIES[family]
    lines = [f"# {title}", ""]
    for entry in catalog.ENTRIES:
        if entry.family != family:
            continue
        data = explain.explain_data(entry, OUT / "img")
        lines += [f'## {entry.title} {{ #{entry.key} }}', "", entry.summary, "", "```math", entry.formula, "```", "",
                  "| at a glance | |", "|---|---|",
                  f"| losskit | {', '.join(f'`{c}`' for c in entry.covers)} |",
                  f"| torch | {', '.join(f'`{t}`' for t in entry.torch) or '-'} |",
                  f"| Keras | {', '.join(f'`{k}`' for k in entry.keras) or '-'} |",
                  f"| also called | {', '.join(f'`{a}`' for a in entry.aliases) or '-'} |",
                  f"| for | {_cell(', '.join(entry.problems))} |",
                  f"| input | {_cell(entry.prediction)} |",
                  f"| target | {_cell(entry.target)} |",
                  f"| output layer | {_cell(entry.output_layer)} |", ""]
        lines += ["**Properties**", ""] + [f"- {k}: {v}" for k, v in entry.properties.items()] + [""]
        lines += ["**Options**", ""] + [f"- `{k}`: {v}" for k, v in entry.options.items()] + [""]
        lines += ["**Example** (computed when this page was built)", "", "```python",
                  "import torch", "import losskit.functional as F  # K = losskit.keras, info = losskit.info", "",
                  catalog.session(data["example"]["code"]), _number(data["example"]["value"]), "```", ""]
        for mistake in data["mistakes"]:
            lines += [f'!!! warning "Common mistake: {mistake["title"]}"', "", f"    {mistake['why']}", "",
                      "    ```python"] + [f"    {line}" for line in mistake["code"].splitlines()] + ["    ```", ""]
            lines += ["    | | |", "    |---|---|"] + [
                f"    | {_cell(str(k))} | {_cell(_number(v))} |" for k, v in mistake["numbers"].items()] + [""]
            for warning in mistake["warnings"]:
                lines += [f"    losskit warns: *{_cell(warning)}*", ""]
        if entry.torch_vs_keras:
            lines += [f"**torch and Keras.** {entry.torch_vs_keras}", ""]
        if data["plot"]:
            lines += [f"![{entry.title}: the loss and its gradient](../img/{entry.key}.png)", ""]
    return "\n".join(lines)


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


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from losskit import catalog
    from losskit.cli import explain

    warnings.simplefilter("ignore")
    if OUT.exists():
        shutil.rmtree(OUT)
    shutil.copytree(PAGES, OUT)
    (OUT / "choosing.md").write_text(choosing_page(catalog))
    (OUT / "losses").mkdir()
    for family in catalog.FAMILIES:
        (OUT / "losses" / f"{family}.md").write_text(family_page(catalog, explain, family))
    (OUT / "errors.md").write_text(errors_page(catalog))
    charts = ROOT / "benchmarks" / "results" / "charts"
    shutil.copytree(charts, OUT / "img" / "bench")
    performance = OUT / "performance.md"
    performance.write_text(performance.read_text() + "\n" + catalog_speed_section())
    print(f"documentation sources in {OUT}: {sum(1 for _ in OUT.rglob('*.md'))} pages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
