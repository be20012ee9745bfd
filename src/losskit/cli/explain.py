"""`losskit explain`: which loss for which problem, and one loss explained with live numbers.

Everything printed comes from :mod:`losskit.catalog`; every number is computed by losskit
as the command runs (the worked example, each mistake, the curves), by calling the
catalog's functions; the code shown beside a number is that function's body
(:func:`losskit.catalog.snippet`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..catalog import ENTRIES, FAMILIES, Curve, Entry, Mistake, by_family, lookup, run, session, snippet, suggest


def choosing_rows() -> list[dict[str, str]]:
    """One row per loss: problem, names in losskit, torch and Keras, output layer, target."""
    rows = []
    for family, entries in by_family().items():
        for entry in entries:
            rows.append({
                "family": FAMILIES[family],
                "loss": entry.title,
                "problems": ", ".join(entry.problems),
                "losskit": ", ".join(entry.covers),
                "torch": ", ".join(entry.torch) or "-",
                "keras": ", ".join(entry.keras) or "-",
                "output layer": entry.output_layer,
                "target": entry.target,
            })
    return rows


def print_table(console) -> None:
    from rich.table import Table

    for family, entries in by_family().items():
        table = Table(title=FAMILIES[family], title_justify="left", show_lines=False, expand=True)
        for column, ratio in (("loss", 2), ("for", 2), ("losskit", 3), ("torch", 2), ("keras", 2),
                              ("output layer", 2), ("target", 2)):
            table.add_column(column, ratio=ratio, overflow="fold")
        for row in choosing_rows():
            if row["family"] == FAMILIES[family]:
                table.add_row(row["loss"], row["problems"], row["losskit"], row["torch"], row["keras"],
                              row["output layer"], row["target"])
        console.print(table)
    console.print("[bold]losskit explain NAME[/] explains one (any name or alias: bce, huber, "
                  "sparse_categorical_crossentropy, ...).")


def curve_points(curve: Curve, points: int = 201) -> list[dict[str, Any]]:
    """Loss and gradient along the curve, per variant: [{'options', 'x', 'loss', 'grad'}]."""
    import torch

    out = []
    for options in curve.variants:
        x = torch.linspace(*curve.x_range, points, dtype=torch.float64, requires_grad=True)
        loss = run(curve.loss, x, **options)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        out.append({"options": options, "x": x.detach().tolist(), "loss": loss.detach().tolist(),
                    "grad": grad.tolist()})
    return out


def _label(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "default"


def draw_curve(entry: Entry, curves: list[dict[str, Any]], out_dir: Path) -> Path:
    """PNG: the loss and its gradient against the prediction, one line per option value."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=100)
    loss_ax, grad_ax = fig.subplots(1, 2)
    for curve in curves:
        loss_ax.plot(curve["x"], curve["loss"], label=_label(curve["options"]))
        grad_ax.plot(curve["x"], curve["grad"], label=_label(curve["options"]))
    loss_ax.set(title=f"{entry.title}: loss", xlabel=entry.curve.x_label, ylabel="loss")
    grad_ax.set(title="gradient", xlabel=entry.curve.x_label, ylabel=f"d loss / d {entry.curve.x_symbol}")
    for ax in (loss_ax, grad_ax):
        ax.grid(alpha=0.3)
        ax.axhline(0, color="black", linewidth=0.6)
    if len(curves) > 1:
        loss_ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{entry.key}.png"
    fig.savefig(path)
    return path


def terminal_plot(entry: Entry, curves: list[dict[str, Any]], width: int, color: bool) -> str:
    """The loss curves drawn in the terminal (plotext, braille dots)."""
    import plotext

    plotext.clf()
    plotext.plotsize(min(width, 72), 14)
    for curve in curves:
        plotext.plot(curve["x"], curve["loss"], label=_label(curve["options"]) if len(curves) > 1 else "",
                     marker="braille")
    plotext.title(f"loss against {entry.curve.x_label}")
    plotext.theme("clear")
    text = plotext.build()
    return text if color else plotext.uncolorize(text)


def explain_data(entry: Entry, out_dir: Path | None) -> dict[str, Any]:
    """Everything `explain NAME` shows, as data, computed now."""
    example_value = run(entry.example)
    data: dict[str, Any] = {
        "key": entry.key, "title": entry.title, "family": FAMILIES[entry.family], "summary": entry.summary,
        "problems": list(entry.problems), "losskit": list(entry.covers), "torch": list(entry.torch),
        "keras": list(entry.keras), "aliases": list(entry.aliases), "prediction": entry.prediction,
        "target": entry.target, "output_layer": entry.output_layer, "formula": entry.formula_text,
        "formula_latex": entry.formula, "properties": entry.properties, "options": entry.options,
        "example": {"code": snippet(entry.example), "value": _number(example_value)},
        "mistakes": [_mistake(m) for m in entry.mistakes],
        "torch_vs_keras": entry.torch_vs_keras, "plot": None,
    }
    if entry.curve is not None and out_dir is not None:
        data["plot"] = str(draw_curve(entry, curve_points(entry.curve), out_dir))
    return data


def _mistake(mistake: Mistake) -> dict[str, Any]:
    warned: list[str] = []
    numbers = run(mistake.demo, warned=warned)
    return {"title": mistake.title, "why": mistake.why, "code": snippet(mistake.demo),
            "numbers": {k: _number(v) for k, v in numbers.items()}, "warnings": warned}


def _number(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def print_entry(console, entry: Entry, data: dict[str, Any], terminal: bool) -> None:
    from rich.markup import escape

    console.rule(f"[bold]{entry.title}[/]")
    console.print(escape(entry.summary))
    console.print(f"\n[bold]Formula[/]  {escape(entry.formula_text)}")
    console.print(f"[bold]Names[/]    losskit: {', '.join(entry.covers)}")
    console.print(f"         torch: {', '.join(entry.torch) or '-'};  Keras: {', '.join(entry.keras) or '-'}")
    console.print(f"[bold]For[/]      {', '.join(entry.problems)}")
    console.print(f"[bold]Input[/]    {escape(entry.prediction)}   (output layer: {escape(entry.output_layer)})")
    console.print(f"[bold]Target[/]   {escape(entry.target)}")
    console.print("\n[bold]Properties[/]")
    for name, value in entry.properties.items():
        console.print(f"  {name}: {escape(value)}")
    console.print("\n[bold]Options[/]")
    for name, value in entry.options.items():
        console.print(f"  {name}: {escape(value)}")
    console.print("\n[bold]Worked example[/] (computed now)")
    for line in session(data["example"]["code"]).splitlines():
        console.print(f"  {escape(line)}")
    console.print(f"  {data['example']['value']!r}")
    for mistake in data["mistakes"]:
        console.print(f"\n[bold red]Common mistake:[/] {escape(mistake['title'])}")
        console.print(f"  {escape(mistake['why'])}")
        for label, value in mistake["numbers"].items():
            console.print(f"    {label}: {value:.4f}" if isinstance(value, float) else f"    {label}: {escape(str(value))}")
        for warning in mistake["warnings"]:
            console.print(f"    [yellow]losskit warns:[/] {escape(warning)}")
    if entry.torch_vs_keras:
        console.print(f"\n[bold]torch and Keras[/]  {escape(entry.torch_vs_keras)}")
    if entry.curve is not None:
        if terminal:
            console.print()
            print(terminal_plot(entry, curve_points(entry.curve, 121), console.width, console.is_terminal))
        if data["plot"]:
            console.print(f"\nPlot of the loss and its gradient: {data['plot']}")


def run_explain(name: str | None, out_dir: Path, as_json: bool, terminal_plots: bool = True) -> int:
    from rich.console import Console

    console = Console(highlight=False, width=max(100, shutil.get_terminal_size().columns))
    if name is None:
        if as_json:
            print(json.dumps(choosing_rows(), indent=2))
        else:
            print_table(console)
        return 0
    entry = lookup(name)
    if entry is None:
        close = suggest(name)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `losskit explain` lists them all."
        print(f"losskit explain: no loss called {name!r}{hint}")
        return 2
    data = explain_data(entry, out_dir)
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print_entry(console, entry, data, terminal_plots and shutil.get_terminal_size().columns >= 60)
    return 0


__all__ = ["ENTRIES", "choosing_rows", "curve_points", "explain_data", "run_explain"]
