"""Studies "mixtures" and "linear": the smallest setting end to end, resuming, and the pieces they rest on
(FFN-only upcycling, equal-parameter model pairs)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from longreach.studies import StudyContext, get_study
from longreach.studies.base import as_json, markdown


@pytest.fixture
def one_thread():
    """One torch thread (the studies' tiny matrices gain nothing from more), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _numbers(result) -> list[float]:
    return [c for t in result.tables for row in t.rows for c in row if isinstance(c, float)]


def _run(name: str, out: Path, lines: list[str]):
    study = get_study(name)
    ctx = StudyContext(out, quick=True, log=lines.append)
    return study.run(study.config(), ctx), ctx


def _check(name: str, result, out: Path, ctx: StudyContext, step_keys: set[str]) -> None:
    assert ctx.resumed == []
    numbers = _numbers(result)
    assert numbers and all(math.isfinite(x) for x in numbers), numbers
    assert all(t.rows and all(len(r) == len(t.columns) for r in t.rows) for t in result.tables)
    for f in result.findings:
        assert f.claim and f.published and f.ours and f.reproduced in (True, False, None)
    assert {p.stem for p in (out / "steps").glob("*.json")} == step_keys
    for p in result.plots:
        assert (out / p).stat().st_size > 0
    md = markdown(name, result, 1.0)
    assert md.count("| ") > 10 and json.dumps(as_json(result), default=float)


def _resume_without_training(module, name: str, out: Path, monkeypatch, step_keys: set[str]):
    def no_training(*args, **kwargs):
        raise AssertionError("a finished step was recomputed")

    monkeypatch.setattr(module, "train_lm", no_training)
    again, ctx = _run(name, out, [])
    assert set(ctx.resumed) == step_keys
    return again


def test_mixtures_quick_runs_and_resumes(tmp_path, monkeypatch, one_thread, capsys):
    import longreach.studies.mixtures as mixtures

    out = tmp_path / "mixtures"
    mixes: dict[str, dict[str, float]] = {}
    train_lm = mixtures.train_lm

    def recording(model, corpus, spec, *, log, name):
        mixes[name] = spec.mix
        return train_lm(model, corpus, spec, log=log, name=name)

    monkeypatch.setattr(mixtures, "train_lm", recording)
    result, ctx = _run("mixtures", out, lines := [])
    keys = {"dense", "moe", "moh", "seed", "branch_docs", "branch_tasks", "flops_bam", "flops_ffn_only", "bam",
            "ffn_only", "dense_cont"}
    _check("mixtures", result, out, ctx, keys)
    assert {p.name for p in (out / "weights").iterdir()} == {"seed.pt", "branch_docs.pt", "branch_tasks.pt"}
    runs = result.data["runs"]
    # equal compute: FFN-only and dense continuation got the FLOPs of the branches + BAM's mixture stage
    f = result.data["flops_per_step"]
    bam_budget = runs["bam"]["tokens"] // (2 * 32) * f["bam"]
    assert abs(runs["ffn_only"]["tokens"] // (2 * 32) * f["ffn_only"] - bam_budget) <= f["ffn_only"]
    assert f["bam"] > f["seed"]  # two attention experts per token
    # training progress: each step's lines on stdout (a step may run in a worker process), after its start line
    assert "moe: step 3/3" in capsys.readouterr().out and any(line.endswith("moe ...") for line in lines)
    # each branch keeps a share of the other domain in its batches; every other arm trains on the 50/50 mix
    other = mixtures.MixturesStudyConfig().branch_other
    assert 0 < other < 0.5
    assert mixes.pop("branch_docs") == {"docs": 1 - other, "tasks": other}
    assert mixes.pop("branch_tasks") == {"tasks": 1 - other, "docs": other}
    assert all(m == {"docs": 0.5, "tasks": 0.5} for m in mixes.values())
    assert set(mixes) == {"dense", "moe", "moh", "seed", "bam", "ffn_only", "dense_cont"}
    again = _resume_without_training(mixtures, "mixtures", out, monkeypatch, keys)
    assert _numbers(again) == _numbers(result)


def test_linear_quick_runs_and_resumes(tmp_path, monkeypatch, one_thread):
    import longreach.studies.linear as linear

    out = tmp_path / "linear"
    result, ctx = _run("linear", out, [])
    keys = {"train_llama", "train_transnormer", "throughput"}
    _check("linear", result, out, ctx, keys)
    timing = result.data["timing"]
    assert timing["lengths"] == [64, 128]
    assert all(len(rounds) == 1 for m in timing["seconds"].values() for rounds in m["wall"])
    speed = result.tables[1]
    assert [r[0] for r in speed.rows] == [64, 128]
    again = _resume_without_training(linear, "linear", out, monkeypatch, keys)
    assert _numbers(again) == _numbers(result)


def test_ffn_only_upcycling_of_identical_branches_computes_the_seed():
    """Branch-Train-MiX from two copies of one seed: averaged attention, identical top-1 experts (gate 1
    after renormalisation) — the mixture's logits equal the seed's."""
    from longreach.mixtures import upcycle_state_dicts
    from longreach.studies.mixtures import MixturesStudyConfig, build_arm, ffn_only_state_dict

    cfg = MixturesStudyConfig().quick()
    seed_cfg, seed = build_arm(cfg, "seed", 300)
    for p in seed.parameters():  # away from the init so averaging mistakes would show
        torch.nn.init.normal_(p, std=0.1)
    _, bam_state = upcycle_state_dicts([seed.state_dict(), seed.state_dict()], seed_cfg, top_k=1)
    _, mix = build_arm(cfg, "ffn_only", 300)
    mix.load_state_dict(ffn_only_state_dict(bam_state, 2))
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mix(ids), seed(ids), rtol=1e-5, atol=1e-5)


def test_linear_pair_has_equal_parameters_and_mixtures_config_errors_name_the_setting():
    from longreach.studies.linear import LinearStudyConfig, build_pair
    from longreach.studies.lm import param_count
    from longreach.studies.mixtures import MixturesStudyConfig

    cfg = LinearStudyConfig()
    pair = build_pair(cfg, 512, max_seq_len=64)
    llama, tnl = (param_count(pair[m]) for m in ("llama", "transnormer"))
    assert type(pair["transnormer"]).__name__ == "TransNormerLLM"
    assert cfg.tnl_lrpe and all(layer.token_mixer.lrpe is not None for layer in pair["transnormer"].layers)
    assert abs(llama - tnl) <= 3 * cfg.dim * cfg.n_layers / 2, (llama, tnl)  # within half an FFN unit
    with pytest.raises(ValueError, match="ffn_hidden=383 must divide by moe_top_k=2"):
        MixturesStudyConfig(ffn_hidden=383)
    with pytest.raises(ValueError, match="mixtures.branch_other must be in"):
        MixturesStudyConfig(branch_other=1.0)
    with pytest.raises(ValueError, match="n_heads must be a power of two"):
        LinearStudyConfig(n_heads=6)


def test_lead_from_is_the_step_after_which_the_first_run_stays_ahead():
    from longreach.studies.lm import lead_from

    def record(losses):  # one domain; evaluations at steps 0, 10, 20, ...
        return {"curve": [[10 * i, 0, None, {"docs": v}] for i, v in enumerate(losses)]}

    dense = record([6.0, 4.0, 3.0, 2.5, 2.2])
    assert lead_from(record([6.0, 4.5, 2.9, 2.6, 2.1]), dense) == 40  # ahead at 20, behind at 30: from 40 on
    assert lead_from(record([6.0, 3.9, 2.9, 2.4, 2.1]), dense) == 10
    assert lead_from(record([6.0, 3.9, 2.9, 2.4, 2.3]), dense) is None  # ends behind
