"""`losskit bench posttrain` runs end to end, and its providers compute the same loss (no timing asserted)."""

from __future__ import annotations

import csv
import math

import liger_kernel.chunked_loss  # noqa: F401  the oracle of the Liger providers: imported plainly
import pytest
import torch

from losskit.cli import bench_posttrain
from losskit.cli.bench import CSV_FIELDS
from losskit.cli.bench_posttrain import PROBLEMS, Setup, agreement, headline, worker
from losskit.cli.main import build_parser, main

TINY = Setup(tokens=64, hidden=16, vocab=96, seq=16, reps=1, tuned_chunk=8)


@pytest.mark.parametrize("problem", PROBLEMS)
def test_every_provider_computes_the_logits_loss_and_gradients(problem, tmp_path):
    # The oracle is the "logits" provider: log_softmax of the materialised logits, in float32.
    results, grads = {}, {}
    for provider in ("logits", "liger eager", "losskit", "losskit chunk=8"):
        path = tmp_path / f"{provider}.pt"
        spec = {"problem": problem, "provider": provider, "setup": {**TINY.__dict__, "providers": list(TINY.providers)},
                "reps": 1, "grads_to": str(path)}
        results[provider] = worker(spec)
        grads[provider] = torch.load(path)
    want = results["logits"]["loss"]
    for provider, result in results.items():
        assert math.isclose(result["loss"], want, rel_tol=1e-5, abs_tol=1e-6), provider
        assert result["peak_extra_bytes"] >= 0 and len(result["times"]) == 1
        for name in ("x", "w"):
            torch.testing.assert_close(grads[provider][name], grads["logits"][name], rtol=1e-4, atol=1e-6)


def test_the_worker_process_reports_one_json_line(tmp_path):
    spec = {"problem": "grpo", "provider": "losskit", "setup": {**TINY.__dict__, "providers": list(TINY.providers)},
            "reps": 2, "grads_to": str(tmp_path / "grads.pt")}
    result = bench_posttrain._run_worker(spec, timeout=300)
    assert isinstance(result, dict), result
    assert len(result["times"]) == 2 and result["peak_extra_bytes"] >= 0 and result["hwm_reset"] in (True, False)
    assert set(torch.load(tmp_path / "grads.pt")) == {"x", "w"}


def test_run_writes_rows_headline_and_charts(tmp_path, capsys, monkeypatch):
    # The workers in this process (the subprocess path is the test above): the plumbing only.
    monkeypatch.setattr(bench_posttrain, "_run_worker", lambda spec, timeout: worker(spec))
    setup = Setup(tokens=64, hidden=16, vocab=96, seq=16, reps=2, tuned_chunk=8, providers=("logits", "losskit"))
    assert bench_posttrain.run(tmp_path, quick=True, progress=False, setup=setup) == 0
    with (tmp_path / "posttrain-quick.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == CSV_FIELDS
    seen = {(r["op"], r["provider"], r["metric"]) for r in rows}
    for problem in PROBLEMS:
        for provider in ("logits", "losskit", "losskit chunk=8"):
            for metric in ("time", "peak_extra_memory", "loss", "grad_max_abs_diff_vs_logits"):
                assert (problem, provider, metric) in seen
    assert all(r["shape"] == "64x16x96" for r in rows)
    losses = {(r["op"], r["provider"]): float(r["p50"]) for r in rows if r["metric"] == "loss"}
    for problem in PROBLEMS:
        assert math.isclose(losses[(problem, "losskit")], losses[(problem, "logits")], rel_tol=1e-5)
    out = capsys.readouterr().out
    assert "dpo losskit:" in out and "grpo losskit chunk=8:" in out
    for metric in ("time", "peak_extra_memory"):
        assert (tmp_path / "quick-charts" / f"posttrain_{metric}.png").read_bytes()[:4] == b"\x89PNG"


def _result(loss: float, mib: float, seconds: float) -> dict:
    return {"loss": loss, "peak_extra_bytes": mib * 2**20, "times": [seconds] * 3, "grad_max_diff": 0.0}


def test_agreement_names_a_provider_whose_loss_differs():
    results = {"dpo": {"logits": _result(0.5, 10, 1), "liger": _result(0.5, 5, 1), "losskit": _result(0.51, 1, 1)}}
    assert agreement(results) == ["dpo: losskit's loss 0.51 differs from the logits' 0.5"]
    results["dpo"]["losskit"] = _result(0.5 + 1e-7, 1, 1)
    assert agreement(results) == []


def test_headline_checks_the_issue_targets():
    setup = Setup(tokens=1024, hidden=8, vocab=1024, seq=8)  # logits: 4 MiB
    results = {"grpo": {"logits": _result(0.1, 12, 1.0), "liger": _result(0.1, 2, 1.0),
                        "losskit": _result(0.1, 1, 1.1), "losskit chunk=4": _result(0.1, 3, 1.3)}}
    lines = headline(setup, results)
    ours = next(line for line in lines if line.startswith("grpo losskit:"))
    assert "1 MiB = 0.25x the logits (met)" in ours and "vs liger 2 MiB (met)" in ours and "= 1.10x (met)" in ours
    tuned = next(line for line in lines if line.startswith("grpo losskit chunk=4:"))
    assert "(MISSED)" in tuned.split(";")[0] and "vs liger 2 MiB (MISSED)" in tuned and "= 1.30x (MISSED)" in tuned


def test_main_dispatches_posttrain(monkeypatch, tmp_path):
    assert build_parser().parse_args(["bench", "posttrain", "--quick"]).op == "posttrain"
    calls = []
    monkeypatch.setattr(bench_posttrain, "run", lambda out, quick, progress: calls.append((out, quick, progress)) or 0)
    assert main(["bench", "posttrain", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert calls == [(tmp_path, True, False)]
