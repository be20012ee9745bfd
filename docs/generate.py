"""Build the documentation sources in build/docs from docs/pages and losskit.catalog.

    python docs/generate.py        (make docs runs it, then mkdocs build --strict)

Hand-written pages are copied; the choosing table, one page per family of losses (each
loss with its formula, inputs, options, the worked example and its mistakes computed now,
and the plot of its loss and gradient), the error messages and the benchmark charts are
generated, so that the site says what the code does today.
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
                  f">>> {entry.example}", _number(data["example"]["value"]), "```", ""]
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


ERROR_CALLS = [
    ("A class index out of range", "F.cross_entropy(torch.randn(3, 5), torch.tensor([0, 7, 2]))"),
    ("Probabilities expected, logits given", "F.binary_cross_entropy(torch.tensor([0.2, 1.7]), torch.tensor([0.0, 1.0]))"),
    ("Shapes that do not fit", "F.nll_loss(torch.randn(4, 3).log_softmax(1), torch.tensor([0, 1, 2]))"),
    ("An integer target for probabilities", "F.cross_entropy(torch.randn(2, 3), torch.tensor([[0, 1, 0], [1, 0, 0]]))"),
    ("A negative variance", "F.gaussian_nll_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -0.5]))"),
    ("A CTC label outside the classes", "F.ctc_loss(torch.randn(5, 1, 3).log_softmax(2), torch.tensor([[1, 3]]), [5], [2])"),
    ("A distribution that does not sum to 1", "info.entropy(torch.tensor([0.5, 0.2]))"),
]


def errors_page(catalog) -> str:
    text = (PAGES / "errors.md").read_text()
    rows = ["| bad input | what losskit says |", "|---|---|"]
    for title, code in ERROR_CALLS:
        try:
            catalog.run_code(code)
        except Exception as error:  # noqa: BLE001 - the message is what is shown
            rows.append(f"| {title}: `{code}` | `{type(error).__name__}: {_cell(str(error))}` |")
        else:
            raise AssertionError(f"{code} did not raise")
    return text.replace("{{ error_table }}", "\n".join(rows))


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
    print(f"documentation sources in {OUT}: {sum(1 for _ in OUT.rglob('*.md'))} pages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
