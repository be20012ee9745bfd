"""`losskit explain`: which loss for which problem, and one loss explained with live numbers.

Everything printed comes from :mod:`losskit.catalog`; every number is computed by losskit
as the command runs (the worked example, each mistake, the curves), by calling the
catalog's functions; the code shown beside a number is that function's body
(:func:`losskit.catalog.snippet`).

The text is laid out here, for the terminal's width (``COLUMNS`` or the terminal's own):
no line is wider, fields wrap under themselves, and a name is never split inside a word
while the terminal is at least :data:`MIN_WIDTH` columns. The choosing list is a table
where its names fit on one line each, and one block per loss below that. It needs only the
base install: matplotlib adds the PNG of the loss and its gradient, plotext the plot drawn
in the terminal (``pip install 'losskit[explain]'``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..catalog import ENTRIES, FAMILIES, Curve, Entry, Mistake, by_family, lookup, run, session, snippet, suggest

MIN_WIDTH = 40  # narrower terminals are laid out as if this wide
PLOT_MIN_WIDTH = 50  # the terminal plot needs this many columns
# Without colour, each option value of a terminal plot is drawn with its own character.
MARKERS = ("*", "o", "+", "x", "#", "@")
INSTALL_HINT = "pip install 'losskit[explain]'"


# ---- text layout -----------------------------------------------------------------------------
def terminal_width() -> int:
    """The terminal's width in columns (``COLUMNS`` first, 80 when unknown)."""
    return max(MIN_WIDTH, shutil.get_terminal_size((80, 24)).columns)


def _pieces(word: str, room: int) -> list[str]:
    """A word cut to fit ``room`` columns: after '_', '.', '/', ',', '(' or '=' where it can,
    mid-word only if a piece between those is itself too long."""
    if len(word) <= room:
        return [word]
    parts = re.findall(r"[^_./,(=]*[_./,(=]|[^_./,(=]+$", word)
    out, current = [], ""
    for part in parts:
        while len(part) > room:  # no break point inside: cut it
            if current:
                out.append(current)
                current = ""
            out.append(part[:room])
            part = part[room:]
        if len(current) + len(part) > room:
            out.append(current)
            current = ""
        current += part
    if current:
        out.append(current)
    return out


def wrap(text: str, width: int, first: str = "", rest: str | None = None) -> list[str]:
    """``text`` in lines of at most ``width`` columns: the first begins with ``first``, the
    others with ``rest`` (a hanging indent; ``first``'s width in spaces by default)."""
    rest = " " * len(first) if rest is None else rest
    lines: list[str] = []
    line, prefix = first, first
    for word in text.split():
        room = width - len(rest)
        for piece in _pieces(word, max(1, room)):
            if len(line) > len(prefix) and len(line) + 1 + len(piece) > width:
                lines.append(line)
                line = prefix = rest
            if len(line) > len(prefix):
                line += " "
            if len(line) + len(piece) > width:  # a first-line prefix too wide for the piece
                lines.append(line.rstrip())
                line = prefix = rest
            line += piece
    lines.append(line)
    return [ln.rstrip() for ln in lines]


def wrap_code(code: str, width: int, indent: str = "  ") -> list[str]:
    """Code lines as written (their spacing kept); one too long for the terminal breaks at a
    space and continues on the next lines, indented four more."""
    out = []
    for line in code.splitlines():
        line = (indent + line).rstrip()
        lead = indent + " " * (len(line) - len(indent) - len(line[len(indent):].lstrip()))
        # The continuation's indent stays within half the width, so that every line carries
        # some of the code (a deep indent in a narrow terminal would otherwise never shrink).
        lead = lead[: width // 2]
        line = lead + line.lstrip()
        more = (lead + "    ")[: width // 2]
        while len(line) > width:
            cut = line.rfind(" ", len(lead) + 1, width + 1)
            if cut <= len(lead) or not line[:cut].strip():
                cut = width  # no space to break at: cut the word
            out.append(line[:cut].rstrip())
            line, lead = more + line[cut:].lstrip(), more
        out.append(line)
    return out


class Page:
    """Lines for a terminal ``width`` columns wide, in colour or not (ANSI styles)."""

    STYLES = {"bold": "1", "red": "1;31", "yellow": "33", "dim": "2", "title": "1;4"}

    def __init__(self, width: int, color: bool) -> None:
        self.width = max(MIN_WIDTH, width)
        self.color = color
        self.lines: list[str] = []

    def style(self, text: str, style: str | None) -> str:
        if not (self.color and style and text):
            return text
        return f"\x1b[{self.STYLES[style]}m{text}\x1b[0m"

    def add(self, text: str = "", style: str | None = None) -> None:
        for line in wrap(text, self.width) if text else [""]:
            self.lines.append(self.style(line, style))

    def field(self, label: str, text: str, label_width: int = 10, indent: str = "") -> None:
        """``label`` then ``text`` wrapped beside it, continuation lines under the text."""
        head = f"{indent}{label:<{label_width - 1}} "
        if len(head) > self.width // 2 or _longest_word(text) > self.width - len(head):
            # a long label, or a name that would not fit beside it: the text goes under the label
            self.lines.append(self.style(head.rstrip(), "bold"))
            head = indent + "  "
        lines = wrap(text, self.width, head, " " * len(head))
        lines[0] = self.style(lines[0][: len(head)], "bold") + lines[0][len(head):]
        self.lines += lines

    def code(self, code: str, indent: str = "  ") -> None:
        self.lines += wrap_code(code, self.width, indent)

    def rule(self, title: str) -> None:
        text = f"── {title} "
        self.lines.append(self.style(text + "─" * max(0, self.width - len(text)), "bold")
                          if len(text) <= self.width else self.style(title, "bold"))
        if len(text) > self.width:
            self.lines[-1:] = [self.style(line, "bold") for line in wrap(title, self.width)]

    def text(self) -> str:
        return "\n".join(self.lines)


def visible_width(line: str) -> int:
    """Columns a printed line takes (ANSI styles take none)."""
    return len(re.sub(r"\x1b\[[0-9;]*m", "", line))


def _color_wanted(stream) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


# ---- the choosing list -----------------------------------------------------------------------
def _short(name: str) -> str:
    """A losskit name as imported: cross_entropy, CrossEntropyLoss, keras.Huber, info.entropy."""
    module, _, short = name.partition(".")
    return name if module in ("keras", "info") else short


def choosing_rows() -> list[dict[str, str]]:
    """One row per loss: problem, names in losskit, torch and Keras, output layer, target."""
    rows = []
    for family, entries in by_family().items():
        for entry in entries:
            rows.append({
                "family": FAMILIES[family],
                "key": entry.key,
                "loss": entry.title,
                "problems": ", ".join(entry.problems),
                "losskit": ", ".join(entry.covers),
                "torch": ", ".join(entry.torch) or "-",
                "keras": ", ".join(entry.keras) or "-",
                "output layer": entry.output_layer,
                "target": entry.target,
            })
    return rows


def _names(row: dict[str, str]) -> list[str]:
    """The names cell: losskit's names as imported, then torch's and Keras' (one line each)."""
    out = [", ".join(_short(n) for n in row["losskit"].split(", "))]
    if row["torch"] != "-":
        out.append("torch: " + ", ".join(t.split(".")[-1] for t in row["torch"].split(", ")))
    if row["keras"] != "-":
        out.append("Keras: " + ", ".join(k.removeprefix("keras.losses.") for k in row["keras"].split(", ")))
    return out


TABLE_COLUMNS = (  # (heading, row -> paragraphs, share of the width left once every column has its minimum)
    ("loss", lambda r: [r["loss"]], 2),
    ("names", _names, 4),
    ("output layer", lambda r: [r["output layer"]], 2),
    ("target", lambda r: [r["target"]], 3),
)
GAP = "  "


def _longest_word(text: str) -> int:
    return max((len(word) for word in text.split()), default=0)


def table_widths(rows: Sequence[dict[str, str]], width: int) -> list[int] | None:
    """Column widths that fit ``width`` with every name whole, or None (then: stacked)."""
    minimum = [max(len(heading), 12, *(_longest_word(" ".join(cell(r))) for r in rows))
               for heading, cell, _ in TABLE_COLUMNS]
    spare = width - len(GAP) * (len(TABLE_COLUMNS) - 1) - sum(minimum)
    if spare < 0 or width < 100:
        return None
    shares = [share for _, _, share in TABLE_COLUMNS]
    widths = [m + spare * s // sum(shares) for m, s in zip(minimum, shares)]
    widths[-1] += width - len(GAP) * (len(TABLE_COLUMNS) - 1) - sum(widths)
    return widths


def choosing_page(width: int, color: bool) -> Page:
    page = Page(width, color)
    rows = choosing_rows()
    widths = table_widths(rows, page.width)
    for family, title in FAMILIES.items():
        family_rows = [r for r in rows if r["family"] == title]
        if not family_rows:
            continue
        page.add()
        page.rule(title)
        if widths is None:
            for row in family_rows:
                page.add()
                page.add(row["loss"], "bold")
                page.field("for", row["problems"], indent="  ")
                for part in _names(row):
                    name, sep, names = part.partition(": ")
                    page.field(name if sep else "losskit", names if sep else part, indent="  ")
                page.field("output", row["output layer"], indent="  ")
                page.field("target", row["target"], indent="  ")
            continue
        page.lines.append(page.style(GAP.join(f"{h:<{w}}" for (h, _, _), w in zip(TABLE_COLUMNS, widths)).rstrip(),
                                     "bold"))
        for row in family_rows:
            cells = [[line for text in cell(row) for line in wrap(text, w, "", "  " if text.startswith(("torch:", "Keras:")) else "")]
                     for (_, cell, _), w in zip(TABLE_COLUMNS, widths)]
            for i in range(max(map(len, cells))):
                page.lines.append(GAP.join(f"{(c[i] if i < len(c) else ''):<{w}}"
                                           for c, w in zip(cells, widths)).rstrip())
            page.lines.append("")
    page.add()
    page.add("losskit explain NAME explains one loss (any name or alias: bce, huber, "
             "sparse_categorical_crossentropy, lce, ...).")
    return page


# ---- curves and plots ------------------------------------------------------------------------
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
    """PNG: the loss and its gradient against the prediction, one line per option value,
    each with its own colour and dash pattern."""
    from matplotlib.figure import Figure

    styles = ("-", "--", "-.", ":")
    fig = Figure(figsize=(9, 3.6), dpi=100)
    loss_ax, grad_ax = fig.subplots(1, 2)
    for i, curve in enumerate(curves):
        style = styles[i % len(styles)]
        loss_ax.plot(curve["x"], curve["loss"], style, label=_label(curve["options"]))
        grad_ax.plot(curve["x"], curve["grad"], style, label=_label(curve["options"]))
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


def terminal_plot(entry: Entry, curves: list[dict[str, Any]], width: int, color: bool) -> list[str]:
    """The loss curves drawn in the terminal (plotext), at most ``width`` columns wide: in
    colour, braille dots; without, one character per option value, named in the legend."""
    import plotext

    plotext.clf()
    plotext.plotsize(min(width, 72), 14)
    for i, curve in enumerate(curves):
        marker = "braille" if color else MARKERS[i % len(MARKERS)]
        plotext.plot(curve["x"], curve["loss"], label=_label(curve["options"]) if len(curves) > 1 else "",
                     marker=marker)
    plotext.title(f"loss against {entry.curve.x_label}")
    plotext.theme("clear")
    text = plotext.build()
    lines = (text if color else plotext.uncolorize(text)).rstrip("\n").splitlines()
    return [line.rstrip() if visible_width(line) <= width else line[:width] for line in lines]


def _available(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module blocked in sys.modules
        return False


# ---- one loss --------------------------------------------------------------------------------
def explain_data(entry: Entry, out_dir: Path | None) -> dict[str, Any]:
    """Everything `explain NAME` shows, as data, computed now. The PNG is drawn when
    ``out_dir`` is given and matplotlib is installed (``plot`` is None otherwise)."""
    example_value = run(entry.example)
    data: dict[str, Any] = {
        "key": entry.key, "title": entry.title, "family": FAMILIES[entry.family], "summary": entry.summary,
        "notes": list(entry.notes), "links": [list(link) for link in entry.links],
        "problems": list(entry.problems), "losskit": list(entry.covers), "torch": list(entry.torch),
        "keras": list(entry.keras), "aliases": list(entry.aliases), "prediction": entry.prediction,
        "target": entry.target, "output_layer": entry.output_layer, "formula": entry.formula_text,
        "formula_latex": entry.formula, "properties": entry.properties, "options": entry.options,
        "example": {"code": snippet(entry.example), "value": _number(example_value)},
        "mistakes": [_mistake(m) for m in entry.mistakes],
        "torch_vs_keras": entry.torch_vs_keras, "plot": None,
    }
    if entry.curve is not None and out_dir is not None and _available("matplotlib"):
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


def _shown(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def entry_page(entry: Entry, data: dict[str, Any], width: int, color: bool, terminal_plots: bool) -> Page:
    page = Page(width, color)
    page.rule(entry.title)
    page.add(entry.summary)
    for note in entry.notes:
        page.add()
        page.add(note.replace("`", ""))
    page.add()
    page.field("formula", entry.formula_text)
    page.field("losskit", ", ".join(entry.covers))
    page.field("torch", ", ".join(entry.torch) or "-")
    page.field("Keras", ", ".join(entry.keras) or "-")
    page.field("for", ", ".join(entry.problems))
    page.field("input", entry.prediction)
    page.field("target", entry.target)
    page.field("output", f"{entry.output_layer} (what the model's last layer gives)")
    page.add()
    page.add("Properties", "bold")
    for name, value in entry.properties.items():
        page.lines += wrap(f"{name}: {value}", page.width, "  ", "      ")
    page.add()
    page.add("Options", "bold")
    for name, value in entry.options.items():
        page.lines += wrap(f"{name}: {value}", page.width, "  ", "      ")
    page.add()
    page.add("Worked example (computed now)", "bold")
    page.code(session(data["example"]["code"]))
    page.code(repr(data["example"]["value"]))
    for mistake in data["mistakes"]:
        page.add()
        page.lines += [page.style(line, "red") for line in wrap(f"Common mistake: {mistake['title']}", page.width)]
        page.lines += wrap(mistake["why"], page.width, "  ")
        page.lines.append(page.style("  The code, then what it gives:", "dim"))
        page.code(mistake["code"], "    ")
        for label, value in mistake["numbers"].items():
            page.lines += wrap(f"{label}: {_shown(value)}", page.width, "    => ", "       ")
        for warning in mistake["warnings"]:
            page.lines += wrap(f"losskit warns: {warning}", page.width, "    ", "      ")
    if entry.torch_vs_keras:
        page.add()
        page.field("torch and Keras", entry.torch_vs_keras)
    if entry.links:
        page.add()
        page.add("In the documentation (make docs builds it in build/site)", "bold")
        for text, target in entry.links:
            page.lines += wrap(f"{text}: {target}", page.width, "  ", "    ")
    if entry.curve is not None:
        if terminal_plots and page.width >= PLOT_MIN_WIDTH and _available("plotext"):
            page.add()
            page.lines += terminal_plot(entry, curve_points(entry.curve, 121), page.width, color)
        if data["plot"]:
            page.add()
            page.lines += wrap(f"Plot of the loss and its gradient: {data['plot']}", page.width)
        elif not (_available("matplotlib") and _available("plotext")):
            page.add()
            page.add(f"Plots of the loss and its gradient: {INSTALL_HINT}")
    return page


def run_explain(name: str | None, out_dir: Path | None, as_json: bool, terminal_plots: bool = True,
                width: int | None = None, color: bool | None = None) -> int:
    """Print the choosing list (``name`` None) or one loss; 0, or 2 for an unknown name.
    ``width`` and ``color`` default to the terminal's."""
    width = terminal_width() if width is None else width
    color = _color_wanted(sys.stdout) if color is None else color
    if name is None:
        if as_json:
            print(json.dumps(choosing_rows(), indent=2))
        else:
            print(choosing_page(width, color).text())
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
        print(entry_page(entry, data, width, color, terminal_plots).text())
    return 0


__all__ = ["ENTRIES", "MIN_WIDTH", "choosing_rows", "curve_points", "explain_data", "run_explain", "visible_width",
           "wrap"]
