"""The catalog every surface reads, and `losskit explain` built on it."""

from __future__ import annotations

import ast
import inspect
import json
import math
import warnings

import pytest
import torch

import losskit.functional as F
import losskit.info as info
import losskit.keras as K
from cases import public_losses
import losskit.catalog as catalog
from losskit.catalog import ENTRIES, FAMILIES, covered, lookup, run, session, snippet, suggest
from losskit.catalog.errors import ERRORS
from losskit.cli.explain import curve_points
from losskit.cli.main import main


def test_every_public_loss_has_a_catalog_entry():
    assert public_losses() - covered() == set(), "public losses missing from losskit.catalog"
    assert covered() - public_losses() == set(), "catalog names that are not public losses"


def test_every_loss_has_a_functional_and_a_module_form():
    for entry in ENTRIES:
        # Not losses but what losses are built from: no Module form, as torch's pairwise_distance.
        building_blocks = {"functional.pairwise_distance", "functional.linear_log_probs",
                           "functional.linear_log_probs_and_entropy"}
        functional = [c for c in entry.covers if c.startswith("functional.") and c not in building_blocks]
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
    value = run(entry.example)
    assert isinstance(value, torch.Tensor) and torch.isfinite(value).all(), f"{entry.key}: {value}"
    for mistake in entry.mistakes:
        numbers = run(mistake.demo)
        assert isinstance(numbers, dict) and len(numbers) >= 2, mistake.title
    if entry.curve is not None:
        for curve in curve_points(entry.curve, points=41):
            assert all(math.isfinite(v) for v in curve["loss"] + curve["grad"]), (entry.key, curve["options"])


def _functions(entry):
    """(what, function) for the entry's example, each mistake and its curve."""
    yield "example", entry.example
    for mistake in entry.mistakes:
        yield f"mistake {mistake.title!r}", mistake.demo
    if entry.curve is not None:
        yield "curve", entry.curve.loss


def _run_snippet(code: str, namespace: dict):
    """Run shown code as a reader would paste it: every statement, then the value of the
    last line (an expression)."""
    tree = ast.parse(code)
    assert isinstance(tree.body[-1], ast.Expr), f"the shown code does not end with an expression:\n{code}"
    last = ast.Expression(tree.body.pop().value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mistakes' own warnings; explain shows them
        exec(compile(tree, "<snippet>", "exec"), namespace)  # noqa: S102 - the catalog's own code, in a test
        return eval(compile(last, "<snippet>", "eval"), namespace)  # noqa: S307


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.key)
def test_examples_mistakes_and_curves_are_functions_whose_shown_code_runs_as_pasted(entry):
    for what, fn in _functions(entry):
        assert inspect.isfunction(fn), f"{entry.key} {what}: {fn!r} is not a function"
        assert fn.__module__ in {m.__name__ for m in catalog._MODULES[entry.family]}, (entry.key, what, fn.__module__)
        source = inspect.getsource(fn)
        assert source.startswith(f"def {fn.__name__}("), (entry.key, what)
        code = snippet(fn)
        assert code and not code.startswith(("def ", " ")) and "return " not in code.splitlines()[-1], code
        # Pasted after the imports the docs show, the snippet gives what calling the function gives.
        namespace = {"torch": torch, "F": F, "K": K, "info": info}
        if what == "curve":
            x = torch.linspace(*entry.curve.x_range, 7, dtype=torch.float64)
            options = entry.curve.variants[-1]
            parameters = inspect.signature(fn).parameters
            namespace.update({name: p.default for name, p in parameters.items() if p.default is not p.empty})
            namespace.update(x=x, options=options, **{k: v for k, v in options.items() if k in parameters})
            torch.testing.assert_close(_run_snippet(code, namespace), run(fn, x, **options))
        elif what == "example":
            torch.testing.assert_close(_run_snippet(code, namespace), run(fn))
            assert session(code).startswith(">>> ")
        else:
            assert _run_snippet(code, namespace) == pytest.approx(run(fn), nan_ok=True)


def test_the_snippet_of_a_function():
    def example():
        """A docstring is not shown."""
        x = torch.tensor([1.0, 2.0])  # a comment stays
        return {'a': x.sum().item(),
                'b': x.prod().item()}

    assert snippet(example) == ("x = torch.tensor([1.0, 2.0])  # a comment stays\n"
                                "{'a': x.sum().item(),\n"
                                " 'b': x.prod().item()}")
    assert session(snippet(example)) == (">>> x = torch.tensor([1.0, 2.0])  # a comment stays\n"
                                         ">>> {'a': x.sum().item(),\n"
                                         "...  'b': x.prod().item()}")


def test_mistakes_show_the_difference_they_describe():
    ce = lookup("cross_entropy")
    softmax_first = run(ce.mistakes[0].demo)
    assert softmax_first["loss (softmax first)"] > 10 * softmax_first["loss (logits)"]
    assert softmax_first["|grad| (softmax first)"] < softmax_first["|grad| (logits)"]
    extra_sigmoid = run(lookup("bce_with_logits").mistakes[0].demo)
    assert extra_sigmoid["|grad| (extra sigmoid)"] < extra_sigmoid["|grad| (right)"] / 2
    kl = run(lookup("kl").mistakes[0].demo)
    assert kl["batchmean"] == pytest.approx(2 * kl["mean"])


def test_the_integer_one_hot_mistake_shows_losskits_error_and_the_right_calls():
    x, indices = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([1])
    numbers = run(lookup("cross_entropy").mistakes[1].demo)
    assert numbers["one_hot(...), int64"].startswith("TypeError: cross_entropy:")
    assert "floating-point" in numbers["one_hot(...), int64"]
    expected = torch.nn.functional.cross_entropy(x, indices).item()
    assert numbers["indices [1]"] == pytest.approx(expected)
    assert numbers["one_hot(...).float()"] == pytest.approx(expected)


def test_the_logits_in_bceloss_mistake_passes_logits_and_shows_the_error():
    x, y = torch.tensor([20.0, -20.0]), torch.tensor([0.0, 1.0])
    numbers = run(lookup("bce").mistakes[0].demo)
    error = numbers["bce(x), logits in BCELoss"]
    assert error.startswith("ValueError: binary_cross_entropy:") and "binary_cross_entropy_with_logits" in error
    with pytest.raises(RuntimeError):  # torch refuses logits too
        torch.nn.functional.binary_cross_entropy(x, y)
    assert numbers["bce(sigmoid(x)), saturated"] == pytest.approx(
        torch.nn.functional.binary_cross_entropy(torch.sigmoid(x), y).item())
    assert numbers["bce_with_logits(x), right"] == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(x, y).item())
    assert numbers["bce(sigmoid(x)), saturated"] > 2 * numbers["bce_with_logits(x), right"]


def test_the_js_divergence_entry_states_the_jump_at_the_ends():
    entry = lookup("jsd")
    assert "discontinuous" in entry.summary and "forward KL (0)" not in entry.summary
    assert r"\beta = 0" in entry.formula and r"\beta = 1" in entry.formula
    numbers = run(entry.mistakes[0].demo)
    student = torch.tensor([[2.0, 0.0, -1.0]]).log_softmax(1)
    teacher = torch.tensor([[0.0, 1.0, 2.0]]).log_softmax(1)
    forward = torch.nn.functional.kl_div(student, teacher, reduction="batchmean", log_target=True).item()
    reverse = torch.nn.functional.kl_div(teacher, student, reduction="batchmean", log_target=True).item()
    assert numbers["beta = 0: forward KL(p || q)"] == pytest.approx(forward, rel=1e-5)
    assert numbers["beta = 1: reverse KL(q || p)"] == pytest.approx(reverse, rel=1e-5)
    # Near the ends the mixture formula is about beta KL(p || q) and (1 - beta) KL(q || p): it tends to 0.
    assert numbers["beta = 0.001"] == pytest.approx(0.001 * forward, rel=0.01)
    assert numbers["beta = 0.999"] == pytest.approx(0.001 * reverse, rel=0.01)


@pytest.mark.parametrize("title, call", ERRORS, ids=[title for title, _ in ERRORS])
def test_each_bad_call_of_the_error_table_raises_a_message(title, call):
    assert inspect.isfunction(call) and snippet(call).startswith(("F.", "info."))
    with pytest.raises((ValueError, TypeError, IndexError, RuntimeError)) as raised:
        run(call)
    assert len(str(raised.value)) > 20, title


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
    expected = run(lookup("huber").example).item()
    assert "Huber loss" in out and "delta" in out and f"{expected}" in out
    png = tmp_path / "huber.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_explain_json_and_a_misspelling(capsys, tmp_path):
    assert main(["explain", "bce", "--json", "--out", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["key"] == "bce" and data["mistakes"][0]["numbers"]
    assert data["example"]["value"] == pytest.approx(run(lookup("bce").example).item())
    assert data["example"]["code"] == snippet(lookup("bce").example)
    assert data["mistakes"][0]["code"] == snippet(lookup("bce").mistakes[0].demo)
    assert data["plot"] == str(tmp_path / "bce.png")
    assert main(["explain", "huberr"]) == 2
    assert "did you mean huber" in capsys.readouterr().out


@pytest.mark.parametrize("command, module, extra", [
    (["tour"], "sklearn", "tour"),
    (["bench", "--quick"], "tqdm", "bench"),
])
def test_a_command_without_its_extra_says_what_to_install(command, module, extra, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, module, None)  # as if not installed
    assert main(command) == 1
    out = capsys.readouterr().out.strip()
    assert out.endswith(f"pip install 'losskit[{extra}]'") and len(out.splitlines()) == 1
