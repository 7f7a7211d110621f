"""``longreach study mixtures`` and ``linear`` with several seeds: one run of each compared arm per seed, a
per-seed table, and the claims judged on the mean and on the seeds paired."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from longreach.studies import StudyContext, get_study


def _run_one_thread(name: str, cfg, out):
    """Run study ``name`` with ``cfg`` into ``out`` on one torch thread (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return get_study(name).run(cfg, StudyContext(out, log=lambda msg: None))
    finally:
        torch.set_num_threads(before)


def test_mixtures_scratch_seeds_train_each_arm_per_seed(tmp_path) -> None:
    import longreach.studies.mixtures as mixtures

    cfg = dataclasses.replace(mixtures.MixturesStudyConfig().quick(), scratch_seeds=2)
    result = _run_one_thread("mixtures", cfg, tmp_path / "m")
    steps = {p.stem for p in (tmp_path / "m" / "steps").glob("*.json")}
    assert {"dense", "moe", "moh", "dense-s1", "moe-s1", "moh-s1"} <= steps
    table = next(t for t in result.tables if t.title.startswith("(a, b) mean held-out loss per seed"))
    (s0, s1, mean) = table.rows
    assert (s0[0], s1[0], mean[0]) == (cfg.seed, cfg.seed + 1, "mean")
    assert s0[1] != s1[1]  # another seed: other initial weights and batches
    for c in range(1, len(mean)):
        assert mean[c] == pytest.approx((s0[c] + s1[c]) / 2)
    assert s0[4] == pytest.approx(s0[2] - s0[1]) and s1[5] == pytest.approx(s1[3] - s1[1])
    moe = next(f for f in result.findings if f.claim.startswith("MoE beats dense"))
    assert "mean of 2 seeds, below dense in" in moe.ours and "(seed 0)" in moe.ours
    assert result.tables[0].title.endswith("(seed 0 of 2)")


@pytest.mark.parametrize(("arm", "dense", "ok", "text"), [
    ([1.0], [1.1], True, ""),
    ([1.0, 1.2, 1.0], [1.1, 1.1, 1.1], True, "below dense in 2 of 3 (per seed -0.100, +0.100, -0.100)"),
    ([1.0, 1.5, 1.2], [1.1, 1.1, 1.1], False, "below dense in 1 of 3"),  # one seed below, the mean above
    ([1.2, 0.8], [1.1, 1.1], False, "below dense in 1 of 2"),  # the mean below, but no majority of seeds
])
def test_paired_seeds_need_the_mean_and_most_seeds(arm, dense, ok, text) -> None:
    from longreach.studies.lm import paired_seeds

    got, reproduced = paired_seeds(arm, dense, "dense")
    assert reproduced is ok and text in got


def test_linear_train_seeds_train_both_models_per_seed(tmp_path) -> None:
    import longreach.studies.linear as linear

    cfg = dataclasses.replace(linear.LinearStudyConfig().quick(), train_seeds=2)
    result = _run_one_thread("linear", cfg, tmp_path / "l")
    steps = {p.stem for p in (tmp_path / "l" / "steps").glob("*.json")}
    assert {"train_llama", "train_transnormer", "train_llama-s1", "train_transnormer-s1"} <= steps
    table = next(t for t in result.tables if t.title == "Held-out mean loss per seed")
    (s0, s1, mean) = table.rows
    assert s0[1] != s1[1] and mean[3] == pytest.approx((s0[3] + s1[3]) / 2)
    assert s1[3] == pytest.approx(s1[2] - s1[1])
    tnl = next(f for f in result.findings if f.claim.startswith("TransNormerLLM"))
    assert f"TNL {(s0[2] + s1[2]) / 2:.3f} vs Llama {(s0[1] + s1[1]) / 2:.3f}; mean of 2 seeds" in tnl.ours


def test_mixtures_bam_seeds_repeat_part_c_per_seed_and_seed_0_is_the_one_seed_run(tmp_path) -> None:
    import longreach.studies.mixtures as mixtures
    from longreach.studies.lm import mean_loss

    base = mixtures.MixturesStudyConfig().quick()
    two = _run_one_thread("mixtures", dataclasses.replace(base, bam_seeds=2), tmp_path / "two")
    # one seed, the dense continuation charged only BAM's mixture stage (the branches' FLOPs not counted)
    one = _run_one_thread("mixtures", dataclasses.replace(base, dense_budget="mixture"), tmp_path / "one")
    arms = ("seed", "branch_docs", "branch_tasks", "bam", "ffn_only", "dense_cont")
    steps = {p.stem for p in (tmp_path / "two" / "steps").glob("*.json")}
    assert {a + sfx for a in arms for sfx in ("", "-s1")} <= steps
    weights = {p.name for p in (tmp_path / "two" / "weights").iterdir()}
    assert {"seed-s1.pt", "branch_docs-s1.pt", "branch_tasks-s1.pt"} <= weights
    runs, runs1 = two.data["runs"], one.data["runs"]
    for arm in arms[:-1]:  # seed 0 is the one-seed run; seed 1 trains other weights on other batches
        assert runs[arm]["curve"] == runs1[arm]["curve"]
        assert runs[arm + "-s1"]["val"] != runs[arm]["val"]
    f = two.data["flops_per_step"]
    batch_tokens = base.batch * base.seq_len
    branch_flops, mix_flops = 2 * base.branch_steps * f["seed"], base.mix_steps * f["bam"]
    assert runs["dense_cont-s1"]["tokens"] // batch_tokens == round((branch_flops + mix_flops) / f["seed"])
    assert runs1["dense_cont"]["tokens"] // batch_tokens == round(mix_flops / f["seed"])
    table = next(t for t in two.tables if t.title.startswith("(c) mean held-out loss per seed"))
    (s0, s1, mean) = table.rows
    for row, sfx in ((s0, ""), (s1, "-s1")):
        assert row[1:4] == [mean_loss(runs[a + sfx]["val"]) for a in ("bam", "ffn_only", "dense_cont")]
        assert row[4] == pytest.approx(row[1] - row[2]) and row[5] == pytest.approx(row[1] - row[3])
    assert mean[1:] == pytest.approx([(a + b) / 2 for a, b in zip(s0[1:], s1[1:])])
    where = next(t for t in two.tables if t.title.startswith("(c) where BAM's loss comes from"))
    seed_docs, branch_docs = runs["seed"]["val"]["docs"], runs["branch_docs"]["val"]["docs"]
    kept = (seed_docs - runs["bam"]["curve"][0][3]["docs"]) / (seed_docs - branch_docs)
    assert where.rows[0][3] == pytest.approx(kept) if seed_docs > branch_docs else where.rows[0][3] != where.rows[0][3]
    bam = next(f for f in two.findings if f.claim.startswith("BAM beats dense"))
    assert "mean of 2 seeds, below dense continuation in" in bam.ours and "(mean of 2 seeds)" in bam.why
    one_why = next(f.why for f in one.findings if f.claim.startswith("BAM beats dense"))
    assert "BAM's mixture-stage FLOPs only" in one_why
    with pytest.raises(ValueError, match="mixtures.dense_budget must be after_seed or mixture"):
        mixtures.MixturesStudyConfig(dense_budget="seed")
