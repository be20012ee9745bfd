"""`losskit explain` laid out for the terminal it runs in: no line wider than the terminal,
names never split inside a word, a stacked list on narrow terminals, plots told apart
without colour, and a plain-text explanation from the base install."""

from __future__ import annotations

import re
import sys

import pytest

from losskit.catalog import ENTRIES, lookup, run, snippet
from losskit.cli.explain import MARKERS, MIN_WIDTH, choosing_rows, run_explain, visible_width, wrap


def _explain(capsys, name, width, color=False, plots=True, out_dir=None):
    assert run_explain(name, out_dir, as_json=False, terminal_plots=plots, width=width, color=color) == 0
    return capsys.readouterr().out


def _too_wide(text: str, width: int) -> list[str]:
    return [line for line in text.splitlines() if visible_width(line) > width]


def _names(entry) -> set[str]:
    """Every name of an entry as the choosing list prints it."""
    short = {c if c.split(".")[0] in ("keras", "info") else c.split(".", 1)[1] for c in entry.covers}
    return short | {t.split(".")[-1] for t in entry.torch} | {k.removeprefix("keras.losses.") for k in entry.keras}


@pytest.mark.parametrize("width", [MIN_WIDTH, 50, 60, 80, 99, 100, 120, 160, 240])
def test_the_choosing_list_fits_the_terminal_and_keeps_every_name_whole(capsys, width):
    text = _explain(capsys, None, width)
    assert not _too_wide(text, width)
    if width < 50:
        return  # below 50 columns the longest names (36 characters) may be cut after a '_'
    words = set(re.findall(r"[^\s,;]+", text))
    for entry in ENTRIES:
        assert entry.title.split()[0] in text
        for name in _names(entry):
            # Each name is one word of the output (a name with spaces, 'BinaryCrossentropy(from_logits=True)'
            # excepted, whose parts are).
            assert all(part in words for part in name.split()), (width, entry.key, name)


def test_the_choosing_list_is_a_table_on_wide_terminals_and_stacked_below_100_columns(capsys):
    header = re.compile(r"^loss +names +output layer +target$", re.M)
    assert header.search(_explain(capsys, None, 160))
    narrow = _explain(capsys, None, 80)
    assert not header.search(narrow)
    # Stacked: each loss's fields start at the same column, continuation lines under the text.
    block = narrow.split("Cross-entropy (softmax)", 1)[1].split("\n\n", 1)[0]
    labels = re.findall(r"^  (\S+) +(\S)", block, re.M)
    assert [label for label, _ in labels] == ["for", "losskit", "torch", "Keras", "output", "target"]
    for line in block.splitlines()[1:]:
        assert line.startswith("  "), line  # nothing restarts at column 0


@pytest.mark.parametrize("width", [MIN_WIDTH, 60, 80, 120])
@pytest.mark.parametrize("color", [False, True])
def test_every_loss_explained_fits_the_terminal(capsys, width, color):
    for entry in ENTRIES:
        text = _explain(capsys, entry.key, width, color=color)
        assert not _too_wide(text, width), (entry.key, width, _too_wide(text, width)[:3])
        if width >= 80:
            assert entry.title in text
        if color:
            assert "\x1b[" in text
        fields = re.sub(r"\x1b\[[0-9;]*m", "", text).split("\nformula", 1)[1].split("\nProperties", 1)[0].splitlines()[1:]
        for line in fields:  # a field's wrapped lines stay under its text
            assert line.startswith((" ", "losskit", "torch", "Keras", "for", "input", "target", "output")) or not line, (
                entry.key, line)


def test_the_terminal_width_is_read_from_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "70")
    assert run_explain("huber", None, as_json=False, color=False) == 0
    text = capsys.readouterr().out
    assert not _too_wide(text, 70) and max(visible_width(line) for line in text.splitlines()) == 70


def test_a_mistake_shows_the_code_before_its_numbers(capsys):
    text = _explain(capsys, "bce", 100)
    mistake = lookup("bce").mistakes[0]
    code_line = snippet(mistake.demo).splitlines()[0].strip()
    numbers = run(mistake.demo)
    first_number = text.index(f"=> {next(iter(numbers))}: ")
    assert mistake.title in text and text.index(code_line[:40]) < first_number


def test_without_colour_each_option_value_has_its_own_marker(capsys):
    text = _explain(capsys, "huber", 100, color=False)
    entry = lookup("huber")
    for i, options in enumerate(entry.curve.variants):
        label = ", ".join(f"{k}={v}" for k, v in options.items())
        assert re.search(rf"{re.escape(MARKERS[i] * 2)} {re.escape(label)}", text), label
    plot = text.split("loss against", 1)[1]
    for marker in MARKERS[: len(entry.curve.variants)]:
        assert plot.count(marker) > 10  # drawn, not only named in the legend


def test_the_base_install_explains_in_plain_text(capsys, monkeypatch, tmp_path):
    for module in ("rich", "matplotlib", "plotext"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    text = _explain(capsys, "bce", 80, out_dir=tmp_path)
    assert f"{run(lookup('bce').example).item()}" in text
    assert "Common mistake: Logits passed to BCELoss" in text
    assert "pip install 'losskit[explain]'" in text and not list(tmp_path.iterdir())
    assert not _too_wide(text, 80)
    table = _explain(capsys, None, 120)
    assert all(row["loss"].split()[0] in table for row in choosing_rows())


@pytest.mark.parametrize("width", [10, 25, 33])
def test_wrap_never_exceeds_the_width(width):
    text = ("functional.binary_cross_entropy_with_logits keras.losses.BinaryCrossentropy(from_logits=True) a b "
            "an_identifier_much_longer_than_any_terminal_line_would_allow_at_all")
    for first, rest in (("", ""), ("  label  ", "         ")):
        lines = wrap(text, width, first, rest)
        assert all(len(line) <= width for line in lines), lines
        assert "".join("".join(lines).split()) == "".join((first + text).split())
