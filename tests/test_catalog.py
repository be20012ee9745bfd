"""The catalog every surface reads, and `losskit explain` built on it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cases import public_losses
from losskit.catalog import ENTRIES, FAMILIES, covered, lookup, run_code, suggest
from losskit.cli.explain import curve_points
from losskit.cli.main import main


def test_every_public_loss_has_a_catalog_entry():
    assert public_losses() - covered() == set(), "public losses missing from losskit.catalog"
    assert covered() - public_losses() == set(), "catalog names that are not public losses"


def test_every_loss_has_a_functional_and_a_module_form():
    for entry in ENTRIES:
        functional = [c for c in entry.covers if c.startswith("functional.") and c != "functional.pairwise_distance"]
        modules = [c for c in entry.covers if c.startswith("nn.")]
        assert len(functional) == len(modules), f"{entry.key}: {functional} but {modules}"


def test_names_find_one_entry_each_case_insensitively():
    seen: dict[str, str] = {}
    for entry in ENTRIES:
        for name in set(n.lower() for n in entry.names):
            assert seen.setdefault(name, entry.key) == entry.key, f"{name!r} names {seen[name]} and {entry.key}"
    assert lookup("BCE").key == "bce"
    assert lookup("sparse_categorical_crossentropy").key == "cross_entropy"
    assert lookup("CrossEntropyLoss").key == "cross_entropy"
    assert lookup(" Huber ").key == "huber"
    assert lookup("crossentropy") is None
    assert "cross_entropy" in suggest("crossentropy")


def test_entries_are_complete():
    for entry in ENTRIES:
        assert entry.family in FAMILIES
        for field in ("title", "summary", "prediction", "target", "output_layer", "formula", "formula_text"):
            assert getattr(entry, field), f"{entry.key}: no {field}"
        assert set(entry.properties) == {"convex", "bounded", "robust to outliers"}, entry.key
        assert entry.options and entry.problems, entry.key


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.key)
def test_examples_mistakes_and_curves_run_and_are_finite(entry):
    value = run_code(entry.example)
    assert isinstance(value, torch.Tensor) and torch.isfinite(value).all(), f"{entry.key}: {value}"
    for mistake in entry.mistakes:
        numbers = run_code(mistake.code)
        assert isinstance(numbers, dict) and len(numbers) >= 2, mistake.title
    if entry.curve is not None:
        for curve in curve_points(entry.curve, points=41):
            assert all(math.isfinite(v) for v in curve["loss"] + curve["grad"]), (entry.key, curve["options"])


def test_mistakes_show_the_difference_they_describe():
    ce = lookup("cross_entropy")
    softmax_first = run_code(ce.mistakes[0].code)
    assert softmax_first["loss (softmax first)"] > 10 * softmax_first["loss (logits)"]
    assert softmax_first["|grad| (softmax first)"] < softmax_first["|grad| (logits)"]
    extra_sigmoid = run_code(lookup("bce_with_logits").mistakes[0].code)
    assert extra_sigmoid["|grad| (extra sigmoid)"] < extra_sigmoid["|grad| (right)"] / 2
    kl = run_code(lookup("kl").mistakes[0].code)
    assert kl["batchmean"] == pytest.approx(2 * kl["mean"])


def test_explain_without_a_name_prints_the_choosing_table(capsys):
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    for family in FAMILIES.values():
        assert family in out
    assert main(["explain", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["loss"] for row in rows] == [e.title for family in FAMILIES for e in ENTRIES if e.family == family]
    assert all(row["output layer"] and row["target"] and row["losskit"] for row in rows)


def test_explain_a_loss_prints_live_numbers_and_writes_its_plot(capsys, tmp_path):
    assert main(["explain", "HuberLoss", "--out", str(tmp_path), "--no-terminal-plot"]) == 0
    out = capsys.readouterr().out
    expected = run_code(lookup("huber").example).item()
    assert "Huber loss" in out and "delta" in out and f"{expected}" in out
    png = tmp_path / "huber.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_explain_json_and_a_misspelling(capsys, tmp_path):
    assert main(["explain", "bce", "--json", "--out", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["key"] == "bce" and data["mistakes"][0]["numbers"]
    assert data["example"]["value"] == pytest.approx(run_code(lookup("bce").example).item())
    assert data["plot"] == str(tmp_path / "bce.png")
    assert main(["explain", "huberr"]) == 2
    assert "did you mean huber" in capsys.readouterr().out


@pytest.mark.parametrize("command, module, extra", [
    (["explain"], "plotext", "explain"),
    (["tour"], "sklearn", "tour"),
    (["bench", "--quick"], "tqdm", "bench"),
])
def test_a_command_without_its_extra_says_what_to_install(command, module, extra, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, module, None)  # as if not installed
    assert main(command) == 1
    out = capsys.readouterr().out.strip()
    assert out.endswith(f"pip install 'losskit[{extra}]'") and len(out.splitlines()) == 1
