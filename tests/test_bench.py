"""The benchmark harness runs end to end and records what it measured (no timing asserted)."""

from __future__ import annotations

import csv

import pytest

from losskit.cli.bench import CSV_FIELDS, Case, headline, plan, worker
from losskit.cli.charts import draw
from losskit.cli.main import main


def test_worker_measures_every_mode_and_memory():
    result = worker({"op": "lce", "shape": [8, 4, 32], "provider": "losskit", "modes": ["forward", "backward", "full"],
                     "reps": 2})
    assert {mode: len(values) for mode, values in result["times"].items()} == {"forward": 2, "backward": 2, "full": 2}
    assert all(v > 0 for values in result["times"].values() for v in values)
    assert result["peak_extra_bytes"] >= 0


def test_plan_covers_the_headline_shapes_and_sweeps():
    full = plan("all", quick=False)
    assert Case("ce", (8192, 32768), ("torch", "torch.compile", "losskit"), ("forward", "backward", "full")) in full
    assert any(c.op == "lce" and c.shape == (2048, 512, 65536) and "torch chunked" in c.providers for c in full)
    classes = {c.shape[-1] for c in full if c.op == "ce"}
    assert min(classes) == 4096 and max(classes) == 262144
    assert all(c.op == "bce" for c in plan("bce", quick=True))


def test_quick_bench_end_to_end(tmp_path, capsys):
    assert main(["bench", "ce", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    with (tmp_path / "quick.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == CSV_FIELDS
    seen = {(r["provider"], r["mode"], r["metric"]) for r in rows}
    for provider in ("torch", "losskit"):
        for mode in ("forward", "backward", "full"):
            assert (provider, mode, "time") in seen
        assert (provider, "full", "peak_extra_memory") in seen
    assert all(float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) for r in rows)
    assert "ce 256x4096 time: losskit" in capsys.readouterr().out
    assert (tmp_path / "quick-charts" / "ce_time.png").read_bytes()[:4] == b"\x89PNG"


def test_headline_and_charts_from_rows(tmp_path):
    common = {"op": "ce", "mode": "full", "shape": "4x8", "device": "cpu", "torch": "2.13.0", "timestamp": "t"}
    rows = [
        {**common, "provider": "torch", "metric": "time", "unit": "s", "p20": 1.8, "p50": 2.0, "p80": 2.2},
        {**common, "provider": "losskit", "metric": "time", "unit": "s", "p20": 0.4, "p50": 0.5, "p80": 0.6},
    ]
    assert headline(rows) == ["ce 4x8 time: losskit 0.5 s vs torch 2 s = 0.25x"]
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    assert [p.name for p in draw(path, tmp_path / "charts")] == ["ce_time.png"]


def test_cuda_plan_has_the_llm_shapes_in_bfloat16_and_every_alternative():
    cases = plan("all", quick=False, device="cuda")
    assert all(c.device == "cuda" and c.dtype == "bfloat16" for c in cases)
    ce = next(c for c in cases if c.op == "ce" and c.shape == (8192, 131072))
    assert set(ce.providers) == {"torch", "torch.compile", "liger", "losskit"} and ce.modes == ("forward", "backward", "full")
    lce = next(c for c in cases if c.op == "lce" and c.shape == (8192, 4096, 131072))
    assert {"torch chunked", "liger", "cce"} <= set(lce.providers)
    assert {c.shape[-1] for c in cases if c.op == "lce"} >= {32768, 262144}  # the vocabulary sweep


def test_cuda_bench_without_a_gpu_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert main(["bench", "--device", "cuda"]) == 1
    assert "no CUDA device here" in capsys.readouterr().out


def test_a_missing_alternative_is_skipped_with_a_note(monkeypatch):
    import sys

    import pytest

    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(SystemExit, match="Liger-Kernel is not installed"):
        worker({"op": "ce", "shape": [4, 8], "provider": "liger", "modes": ["full"], "reps": 1})


# -- losskit bench catalog -------------------------------------------------------------------


def _public_loss_functions() -> set[str]:
    """Every function the catalog covers ('functional.x', 'keras.x', 'info.x'); the classes
    (nn.X, keras.X) call these, so timing the functions times them."""
    from losskit.catalog import ENTRIES

    return {name for entry in ENTRIES for name in entry.covers if name.rpartition(".")[2][:1].islower()}


def test_catalog_plan_covers_every_public_loss():
    from losskit.cli.bench_catalog import BENCHES, plan

    full = plan(quick=False)
    planned = {name for cell in full for name in cell.bench.names}
    assert _public_loss_functions() <= planned, "add the new loss to BENCHES in losskit/cli/bench_catalog.py"
    seen = {(cell.bench.name, cell.size, cell.dtype) for cell in full}
    assert seen == {(b.name, size, dtype) for b in BENCHES for size in ("small", "large")
                    for dtype in ("float32", "bfloat16")}
    compiled = {cell.bench.name for cell in full if "losskit.compile" in cell.providers}
    assert {"functional.cross_entropy", "functional.mse_loss", "functional.huber_loss",
            "functional.binary_cross_entropy_with_logits"} <= compiled
    assert all(cell.providers[:2] == ("torch", "losskit") for cell in full)


def test_catalog_references_compute_the_same_loss():
    """Each reference (torch's twin, or the written-out definition) gives losskit's value on
    the bench's own small float32 inputs: the bench compares like with like."""
    import torch

    from losskit.cli.bench_catalog import INPUTS, _callable, plan

    for cell in plan(quick=True):
        if cell.dtype != "float32":
            continue
        _, args = INPUTS[cell.bench.inputs].make(cell.shape, torch.float32, torch.Generator().manual_seed(0))
        values = {p: _callable(cell, p)(*args).detach() for p in cell.providers if not p.endswith("compile")}
        for provider, value in values.items():
            torch.testing.assert_close(value, values["torch"], rtol=1e-5, atol=1e-5, msg=f"{cell.bench.name} {provider}")


def test_register_adds_a_loss_in_one_entry():
    import torch

    from losskit.cli.bench_catalog import BENCHES, Bench, plan, register

    def dpo(chosen, rejected, ref_chosen, ref_rejected, beta=0.1):  # a loss not in the catalog yet
        return -torch.nn.functional.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()

    bench = Bench("example.written_out_dpo", "dpo", "sequence_log_probs", dpo)
    try:
        register(bench)
        assert {c.bench.name for c in plan(benches=[bench])} == {bench.name}
        assert bench in BENCHES
        with pytest.raises(ValueError, match="already registered"):
            register(bench)
    finally:
        BENCHES.remove(bench)


def test_quick_catalog_bench_end_to_end(tmp_path, capsys):
    from losskit.cli.bench_catalog import CSV_FIELDS as CATALOG_FIELDS
    from losskit.cli.bench_catalog import plan

    assert main(["bench", "catalog", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    with (tmp_path / "catalog-quick.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == CATALOG_FIELDS
    written = {(r["kernel"], r["size"], r["dtype"], r["provider"]) for r in rows}
    assert written == {(c.bench.name, c.size, c.dtype, p) for c in plan(quick=True) for p in c.providers}
    measured = {(r["mode"], r["metric"]) for r in rows}
    assert measured == {("forward", "time"), ("full", "time"), ("full", "cpu_time")}
    assert len(rows) == len(measured) * len(written)
    timed = [r for r in rows if r["p50"]]
    assert timed and all(float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) for r in timed)
    assert all(r["ratio_to_torch"] == "1" for r in timed if r["provider"] == "torch")
    assert all(r["note"].startswith(("skipped", "failed")) for r in rows if not r["p50"])
    assert "| loss | size | dtype |" in capsys.readouterr().out
    assert (tmp_path / "charts" / "catalog_quick_float32.png").read_bytes()[:4] == b"\x89PNG"


def test_catalog_only_replaces_the_rows_of_the_named_losses(tmp_path):
    from losskit.cli.bench_catalog import CSV_FIELDS as CATALOG_FIELDS

    path = tmp_path / "catalog-quick.csv"
    stale = {field: "" for field in CATALOG_FIELDS}
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CATALOG_FIELDS)
        writer.writeheader()
        writer.writerow({**stale, "kernel": "functional.huber_loss", "provider": "torch", "note": "stale"})
        writer.writerow({**stale, "kernel": "functional.not_measured_again", "provider": "torch", "note": "kept"})
    assert main(["bench", "catalog", "--quick", "--only", "huber_loss", "--out", str(tmp_path), "--no-progress"]) == 0
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["kernel"] for r in rows} == {"functional.huber_loss", "functional.not_measured_again"}
    assert [r["note"] for r in rows if r["kernel"] == "functional.not_measured_again"] == ["kept"]
    assert all(r["note"] != "stale" and r["p50"] for r in rows if r["kernel"] == "functional.huber_loss")
    assert not (tmp_path / "catalog-quick-part.csv").exists()
    assert main(["bench", "catalog", "--quick", "--only", "no_such_loss", "--out", str(tmp_path)]) == 1
