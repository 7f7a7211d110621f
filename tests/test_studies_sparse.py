"""``longreach study sparse`` with several seeds: every pattern trained once per seed, means over seeds in the
table, SinkLoRA's SF-vs-S2 claim judged on the seeds paired."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from longreach.launchers import cli


def test_sparse_quick_with_two_seeds_reports_means_and_resumes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sparse"
    args = ["study", "sparse", "--quick", "--seeds=2", "--out", str(out), "--threads", "1"]
    assert cli.main(args) == 0, capsys.readouterr().err
    body = json.loads((out / "study.json").read_text())
    table = body["tables"][0]
    assert table["title"].endswith("same data and initial weights, mean of 2 seeds")
    per_seed, mean = body["data"]["evals_per_seed"], body["data"]["evals"]
    assert len(per_seed) == 2
    for p in ("full", "s2", "sf", "ssa", "power"):
        assert (out / "models" / f"{p}.pt").exists() and (out / "models" / f"{p}-s1.pt").exists()
        assert mean[p]["ppl_full"] == pytest.approx(np.mean([ev[p]["ppl_full"] for ev in per_seed]))
    # a different seed is a different run: other initial weights and batches
    assert per_seed[0]["full"]["ppl_full"] != per_seed[1]["full"]["ppl_full"]
    row = next(r for r in table["rows"] if r[0] == "S2 (LongLoRA)")
    lo, hi = (float(x) for x in row[3].split("-"))
    assert lo <= row[1] <= hi
    sf = next(f for f in body["findings"] if f["claim"].startswith("SF-Attn"))
    assert "mean of 2 seeds" in sf["ours"] and "of 2 seeds (per seed" in sf["ours"]
    capsys.readouterr()
    assert cli.main(args) == 0
    assert {"train", "train-s1", "eval-sf-s1"} <= set(json.loads((out / "study.json").read_text())["resumed"])


def _evals(sf: float, s2: float) -> dict[str, dict[str, float]]:
    return {"sf": {"ppl_full": sf}, "s2": {"ppl_full": s2}}


@pytest.mark.parametrize(("pairs", "reproduced", "why"), [
    ([(9.0, 10.0), (9.5, 10.0), (10.2, 10.0)], True, "in 2 of 3 seeds only"),  # below in the mean and most seeds
    ([(9.0, 10.0), (9.5, 10.0)], True, ""),  # below in every seed
    ([(9.0, 10.0), (11.5, 10.0), (10.2, 10.0)], False, "the seeds disagree (1 of 3 below)"),
    ([(10.5, 10.0), (10.1, 10.0)], False, "S2 is below SF in every seed"),
    ([(10.5, 10.0)], False, "with one seed"),
])
def test_sf_vs_s2_is_judged_on_paired_seeds(pairs, reproduced, why) -> None:
    from longreach.studies.sparse import SparseConfig, _mean_evals, _sf_vs_s2

    runs = [({}, _evals(sf, s2)) for sf, s2 in pairs]
    f = _sf_vs_s2(SparseConfig(seeds=len(pairs)), _mean_evals(runs), [ev for _, ev in runs])
    assert f.reproduced is reproduced and why in f.why
