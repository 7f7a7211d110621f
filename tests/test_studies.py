"""``longreach study``: the extension and sparse studies' smallest settings through the CLI, resuming,
bad input, and the SSA self-ensemble evaluation they use."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from longreach.launchers import cli


def _study(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["study", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _check_report(out: Path, titles: list[str], n_findings: int) -> dict:
    md = (out / "study.md").read_text()
    body = json.loads((out / "study.json").read_text())
    for t in titles:
        assert f"## {t}" in md
    assert "## Published effects" in md and md.count("\n| ") >= n_findings
    assert [t["title"] for t in body["tables"]] == titles
    assert len(body["findings"]) == n_findings
    for f in body["findings"]:
        assert f["published"] and f["ours"] and f["reproduced"] in (True, False, None)
    for p in body["plots"]:
        assert (out / p).stat().st_size > 0
    # the timing a reader needs to judge a wall time on a shared machine: wall, CPU, threads, load
    clock = body["clock"]
    assert clock["wall_s"] > 0 and clock["cpu_s"] > 0 and clock["threads"] == 1 and clock["cpus"] >= 1
    assert clock["load_1min_start"] >= 0 and clock["load_1min_end"] >= 0 and body["seconds"] == clock["wall_s"]
    assert 0 <= clock["stalled_s"] <= clock["wall_s"] and clock["workers"] >= 1
    assert f"Wall time: {clock['wall_s']:.0f} s (CPU {clock['cpu_s']:.0f} s" in md and "1-minute load average" in md
    return body


def _rerun_resumes(capsys, name: str, out: Path) -> None:
    """A second run reads every step back (same files, untouched) instead of recomputing it."""
    steps = sorted(out.glob("steps/*.json"))
    stamps = {p.name: p.stat().st_mtime_ns for p in steps}
    rc, stdout, _ = _study(capsys, name, "--quick", "--out", str(out), "--threads", "1")
    assert rc == 0
    body = json.loads((out / "study.json").read_text())
    assert sorted(body["resumed"]) == sorted(p.stem for p in steps)
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("steps/*.json"))} == stamps
    assert "done in an earlier run" in stdout


def test_extension_quick_through_the_cli_resumes_and_two_workers_match_one(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ext"
    rc, stdout, err = _study(capsys, "extension", "--quick", "--out", str(out), "--threads", "1",
                             "--workers", "2")
    assert rc == 0, err
    assert "pretrain ..." in stdout and "finetune-sinklora-sf ... (queued for 2 worker processes)" in stdout
    body = _check_report(out, ["Perplexity on held-out text and passkey accuracy (full-attention evaluation)",
                               "Passkey accuracy by depth of the key"], 6)
    rows = body["data"]["rows"]
    assert set(rows) == {"base (no fine-tune, no scaling)", "PI, no fine-tune", "YaRN (published beta 32), no fine-tune",
                         "YaRN (beta for L), no fine-tune", "LongLoRA (LoRA + S2)", "SinkLoRA (LoRA + SF + 4 sinks)",
                         "full fine-tune (full attention)"}
    for r in rows.values():  # ppl at L, 2L (= 4L here: factor 2 in the quick setting)
        assert list(r["ppl"]) == ["128", "256"] and all(math.isfinite(v) and v > 1 for v in r["ppl"].values())
        assert set(r["passkey"]) == {"128", "256"} and all(len(v) == 5 for v in r["passkey"].values())
        assert math.isfinite(r["copy_nll"]) and r["copy_nll"] >= 0
    # the fine-tuning mix holds passkey tasks (longer than the pre-training ones)
    data = body["data"]["data"]
    assert data["finetune_passkey_docs"] == 2  # one per fine-tuning sequence: 2 steps x 1
    # the data step's record of how far back the keys lie (pre-training tasks of 250 characters: inside L)
    assert data["finetune_key_distance"]["tasks"] == 2 and data["pretrain_key_distance"]["tasks"] > 0
    assert 0 < data["pretrain_key_distance"]["max"] < 128 and data["pretrain_key_distance"]["beyond_L"] == 0.0
    assert body["data"]["trainable_fraction"]["full fine-tune (full attention)"] == 1.0
    assert 0 < body["data"]["trainable_fraction"]["LongLoRA (LoRA + S2)"] < 1
    # each fine-tuned export (what the evaluation loads) carries the recipe's extended RoPE (PI, factor 2 here)
    for run in ("longlora_s2", "sinklora_sf", "full_full"):
        conf = json.loads((out / run / "export" / "config.json").read_text())
        rope = conf.get("rope_parameters") or conf.get("rope_scaling")
        assert (rope["rope_type"], rope["factor"]) == ("linear", 2.0)
    assert body["clock"]["workers"] == 2 and "2 worker processes" in (out / "study.md").read_text()
    _rerun_resumes(capsys, "extension", out)
    assert json.loads((out / "study.json").read_text())["clock"]["workers"] == 1  # every step read back
    # the same study run here, step after step: every number as the two worker processes computed it
    one = tmp_path / "ext1"
    rc, stdout, err = _study(capsys, "extension", "--quick", "--out", str(one), "--threads", "1",
                             "--workers", "1")
    assert rc == 0, err
    assert "worker processes" not in stdout
    body1 = json.loads((one / "study.json").read_text())
    assert body1["data"]["rows"] == rows and body1["findings"] == body["findings"]
    for f in sorted((out / "steps").glob("finetune-*.json")):
        a, b = json.loads(f.read_text()), json.loads((one / "steps" / f.name).read_text())
        assert a["last_loss"] == b["last_loss"] and a["trainable_fraction"] == b["trainable_fraction"]


def test_extension_arm_refits_one_arm_from_a_run_folder(tmp_path: Path, capsys) -> None:
    """``python -m longreach.studies.extension_arm``: with no change it reproduces the study's LongLoRA arm from the
    run folder (fine-tuning loss and every evaluation number); with LoRA on the MLP and full attention it trains
    more weights and records what it ran; the run folder is only read; a folder of another study is one error."""
    from longreach.studies import extension_arm

    run = tmp_path / "ext"
    rc, _, err = _study(capsys, "extension", "--quick", "--out", str(run), "--threads", "1", "--workers", "1")
    assert rc == 0, err
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    body = json.loads((run / "study.json").read_text())
    assert extension_arm.main([str(run), str(tmp_path / "same")]) == 0
    same = json.loads((tmp_path / "same" / "arm.json").read_text())
    step = json.loads((run / "steps" / "finetune-longlora-s2.json").read_text())
    assert same["last_loss"] == step["last_loss"] and same["attention"] == "s2" and not same["mlp"]
    row = body["data"]["rows"]["LongLoRA (LoRA + S2)"]
    assert same["ppl"] == row["ppl"] and same["passkey"] == row["passkey"] and same["copy_nll"] == row["copy_nll"]
    assert extension_arm.main([str(run), str(tmp_path / "wide"), "--mlp", "--attention", "full", "--steps", "2"]) == 0
    wide = json.loads((tmp_path / "wide" / "arm.json").read_text())
    assert (wide["attention"], wide["mlp"], wide["steps"]) == ("full", True, 2)
    assert wide["trainable_fraction"] > same["trainable_fraction"] and 0 <= wide["far"] <= 1
    assert "keys farther than L" in capsys.readouterr().out
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert extension_arm.main([str(tmp_path / "wide"), str(tmp_path / "x")]) == 2
    assert "not a finished extension study run folder" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_mixtures_two_workers_match_one(tmp_path: Path, capsys) -> None:
    """The mixtures study's chains (each seed's BAM chain, each scratch arm) in two worker processes give every
    number one process gives, step after step (only the timings differ)."""
    runs = {}
    for workers in ("2", "1"):
        out = tmp_path / f"w{workers}"
        rc, stdout, err = _study(capsys, "mixtures", "--quick", "--out", str(out), "--threads", "1",
                                 "--workers", workers)
        assert rc == 0, err
        assert ("(queued for 2 worker processes)" in stdout) == (workers == "2")
        body = json.loads((out / "study.json").read_text())
        assert body["clock"]["workers"] == int(workers)
        runs[workers] = {k: {f: v for f, v in r.items() if f not in ("seconds", "tokens_per_s")}
                         for k, r in body["data"]["runs"].items()}
    assert runs["2"] == runs["1"] and {"dense", "seed", "bam", "ffn_only", "dense_cont"} <= set(runs["1"])


def test_sparse_quick_through_the_cli_and_resume(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sparse"
    rc, _, err = _study(capsys, "sparse", "--quick", "--out", str(out), "--threads", "1")
    assert rc == 0, err
    body = _check_report(out, ["Equal steps (3 x 1 x 128 tokens), same data and initial weights"], 4)
    assert body["clock"]["workers"] == 1  # its steps run in this process whatever --workers says
    assert [r[0] for r in body["tables"][0]["rows"]] == ["full attention", "S2 (LongLoRA)", "SF (SinkLoRA)", "SSA",
                                                         "PowerAttention"]
    ev = body["data"]["evals"]
    assert math.isfinite(ev["ssa"]["ppl_ensemble"]) and all(math.isfinite(e["ppl_full"]) for e in ev.values())
    # same initial weights and batches: full attention's own pattern is its full-attention evaluation
    assert ev["full"]["ppl_own"] == pytest.approx(ev["full"]["ppl_full"], rel=1e-5)
    assert all(v["median"] > 0 for v in body["data"]["tokens_per_s"].values())
    _rerun_resumes(capsys, "sparse", out)


@pytest.mark.parametrize("workers", [1, 2])
def test_study_steps_run_chains_resume_and_stop_at_a_failure(tmp_path: Path, workers: int) -> None:
    """``ctx.steps``: each chain follows ``then`` from its result, every result lands in ``steps/KEY.json``
    (the same in worker processes as here), a rerun reads finished steps back, and a failing step raises
    after the finished ones are kept."""
    from longreach.studies.base import Step, StudyContext

    def chains(bad: bool) -> list[Step]:
        return [Step(key="root", fn=math.sqrt, args=(16.0,),
                     then=lambda v: Step(key="root2", fn=math.sqrt, args=(v,))),
                Step(key="power", fn=math.pow, args=(2.0, 10.0)),
                Step(key="bad", fn=math.sqrt, args=(-1.0 if bad else 1.0,))]

    lines: list[str] = []
    ctx = StudyContext(tmp_path, workers=workers, log=lines.append)
    with pytest.raises(ValueError, match="math domain error"):
        ctx.steps(chains(bad=True))
    assert not (tmp_path / "steps" / "bad.json").exists() and ctx.pooled == (workers > 1)
    ctx = StudyContext(tmp_path, workers=workers, log=lines.append)
    assert ctx.steps(chains(bad=False)) == {"root": 4.0, "root2": 2.0, "power": 1024.0, "bad": 1.0}
    assert {p.stem: json.loads(p.read_text()) for p in (tmp_path / "steps").glob("*.json")} == {
        "root": 4.0, "root2": 2.0, "power": 1024.0, "bad": 1.0}
    assert "bad" not in ctx.resumed and set(ctx.resumed) <= {"root", "root2", "power"}
    again = StudyContext(tmp_path, workers=workers, log=lines.append)
    assert again.steps(chains(bad=False))["root2"] == 2.0
    assert sorted(again.resumed) == ["bad", "power", "root", "root2"]
    assert not again.pooled  # nothing left to run


def test_stall_meter_counts_the_seconds_a_process_is_stopped() -> None:
    """The report's "held still" seconds: a process stopped (SIGSTOP) for 2 s adds them."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import time; from longreach.studies.runner import StallMeter; "
            "m = StallMeter(tick=0.1, slack=0.3); time.sleep(0.5); print(m.seconds, flush=True); "
            "time.sleep(3); print(m.close(), flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        before = float(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(2.0)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert float(out) - before >= 1.5


def test_study_list_and_bad_input(tmp_path: Path, capsys) -> None:
    rc, stdout, _ = _study(capsys, "--list")
    assert rc == 0 and "extension" in stdout and "sparse" in stdout
    rc, _, err = _study(capsys, "extensoin")
    assert rc == 2 and "unknown study 'extensoin'" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("seq_len: 128\npretrain_step: 5\n")
    rc, _, err = _study(capsys, "extension", "--config", str(bad), "--out", str(tmp_path / "o"))
    assert rc == 2 and "pretrain_step" in err and str(bad) in err and not (tmp_path / "o").exists()
    rc, _, err = _study(capsys, "sparse", "--quick", "--steps=many", "--out", str(tmp_path / "o"))
    assert rc == 2 and "steps" in err and not (tmp_path / "o").exists()
    rc, _, err = _study(capsys, "sparse", "--config", str(tmp_path / "missing.yaml"))
    assert rc == 2 and "missing.yaml" in err
    rc, _, err = _study(capsys, "extension", "--quick", "--workers", "0", "--out", str(tmp_path / "o"))
    assert rc == 2 and "--workers must be >= 1, got 0" in err and not (tmp_path / "o").exists()
    # a non-empty folder that is not a study run is never touched, even with --force
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    for extra in ([], ["--force"]):
        rc, _, err = _study(capsys, "sparse", "--quick", "--out", str(other), *extra)
        assert rc == 2 and "not a study run folder" in err
    assert [p.name for p in other.iterdir()] == ["notes.txt"] and (other / "notes.txt").read_text() == "keep"


def test_run_folder_of_another_config_is_refused_and_force_starts_over(tmp_path: Path) -> None:
    from longreach.studies.runner import MARKER, prepare_out

    out = tmp_path / "run"
    prepare_out(out, {"study": "sparse", "quick": True, "config": {"steps": 3}}, force=False)
    (out / "steps").mkdir()
    (out / "steps" / "data.json").write_text("{}")
    prepare_out(out, {"study": "sparse", "quick": True, "config": {"steps": 3}}, force=False)  # resume
    assert (out / "steps" / "data.json").is_file()
    from longreach.errors import UserError

    with pytest.raises(UserError, match="another config"):
        prepare_out(out, {"study": "sparse", "quick": True, "config": {"steps": 4}}, force=False)
    with pytest.raises(UserError, match="another study"):
        prepare_out(out, {"study": "extension", "quick": True, "config": {}}, force=False)
    assert (out / "steps" / "data.json").is_file()  # nothing lost by the refusals
    prepare_out(out, {"study": "sparse", "quick": True, "config": {"steps": 4}}, force=True)
    assert not (out / "steps").exists() and json.loads((out / MARKER).read_text())["config"] == {"steps": 4}


def test_ssa_eval_ensemble_averages_distinct_subsampled_passes() -> None:
    """NativeLM's loss with ``attention.eval_ensemble = n`` is −log of the mean probability of n passes,
    each with its own SSA sample (pairwise different, and different from dense attention)."""
    from longreach.attention import AttentionConfig, AttentionContext
    from longreach.evaluation.native import NativeLM
    from longreach.evaluation.runner import _ssa_ensemble
    from longreach.models import ModelConfig, build_model
    from longreach.ssa import ENSEMBLE_FIRST_STEP

    torch.manual_seed(0)
    n = 3
    att = AttentionConfig(pattern="ssa", backend="reference", ssa_ratio=0.25, ssa_window=1, ssa_block=8,
                          eval_ensemble=n)
    model = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=96)).double()
    lm = NativeLM.build(model, world=1, attention=att)
    assert lm.ensemble == n
    ids = torch.randint(0, 64, (1, 96))
    with torch.no_grad():
        probs = [torch.softmax(model(ids, None, AttentionContext(training=True, step=ENSEMBLE_FIRST_STEP + i))
                               @ model.output_weight().t(), dim=-1) for i in range(n)]  # n x [1, S, V]
        dense = torch.softmax(model(ids, None, AttentionContext(training=False)) @ model.output_weight().t(), -1)
    for i in range(n):
        assert not torch.allclose(probs[i], dense, atol=1e-6)
        for j in range(i):
            assert not torch.allclose(probs[i], probs[j], atol=1e-6), (i, j)
    mean = torch.stack(probs).mean(0)[0, :-1]  # [S-1, V]
    ref = -mean.gather(-1, ids[0, 1:, None]).log().mean()
    assert lm.loss(ids) == pytest.approx(float(ref), rel=1e-6)
    lm.ensemble = 1  # one dense pass: the plain loss (the seams' SSA masks are training-only)
    dense_ref = -dense[0, :-1].gather(-1, ids[0, 1:, None]).log().mean()
    assert lm.loss(ids) == pytest.approx(float(dense_ref), rel=1e-6)
    # `longreach eval` reads it from a checkpoint's job config; other patterns or n = 1 leave evaluation dense
    src = SimpleNamespace(config={"attention": {"pattern": "ssa", "eval_ensemble": 4}}, describe=lambda: "run")
    assert _ssa_ensemble(src).eval_ensemble == 4
    for section in ({"pattern": "ssa", "eval_ensemble": 1}, {"pattern": "s2", "eval_ensemble": 4}, None):
        assert _ssa_ensemble(SimpleNamespace(config={"attention": section}, describe=lambda: "run")) is None


def test_extension_pack_keeps_every_task_whole_inside_one_window() -> None:
    from longreach.studies.extension import _pack

    rng = np.random.default_rng(0)
    tasks = [np.concatenate([[1], rng.integers(10, 100, int(n)), [2]]) for n in rng.integers(3, 30, 40)]
    tasks.append(np.arange(200, 260))  # longer than a window: left out
    text = np.arange(1000, 1037)
    width = 32
    packed = _pack(tasks, text, width)
    assert len(packed) % width == 0
    windows = packed.reshape(-1, width).tolist()
    found = []
    for w in windows:  # each window: whole tasks from its first token, then running text
        i = 0
        while i < width and w[i] == 1:
            j = w.index(2, i)
            found.append(w[i:j + 1])
            i = j + 1
        assert all(t >= 1000 for t in w[i:])
    assert found == [t.tolist() for t in tasks[:-1]]
    fill = [t for w in windows for t in w if t >= 1000]
    assert fill == [1000 + k % 37 for k in range(len(fill))]  # the text read on cyclically, nothing skipped


def test_extension_key_distances_count_tokens_from_the_key_to_the_answer() -> None:
    """The data step's diagnosis of the task mixes: tokens between a passkey document's key and its answer, for
    passkey documents only, and the share of keys farther back than L."""
    from longreach.data.synthetic import passkey_prompt
    from longreach.studies.extension import _distance_summary, _key_distances

    class Words:  # one token per whitespace-separated word
        def encode(self, text: str) -> list[int]:
            return [0] * len(text.split())

    filler_words = len("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.".split())
    docs = [passkey_prompt(6, d, 123).text for d in (0.0, 0.5, 1.0)] + ["Remember the following facts. The x is 1."]
    dist = _key_distances(Words(), docs)
    # after "The pass key is": "123. Remember it. 123 is the pass key." (8 words), the filler after the key,
    # then "What is the pass key? The pass key is" (9 words)
    assert dist.tolist() == [8 + 6 * filler_words + 9, 8 + 3 * filler_words + 9, 8 + 9]
    summary = _distance_summary(dist, 30)
    assert summary["tasks"] == 3 and summary["max"] == int(dist.max()) and summary["quartiles"][1] == int(dist[1])
    assert summary["beyond_L"] == 2 / 3
    assert _distance_summary(dist[:0], 30)["tasks"] == 0


def test_extension_long_passkeys_spread_keys_and_keep_half_within_reach() -> None:
    """The fine-tuning passkey tasks: half to all of the longest length; even ones with the key anywhere, odd
    ones with at most ``near`` filler repeats between key and question."""
    from longreach.data.synthetic import FILLER
    from longreach.studies.extension import _long_passkeys

    docs = _long_passkeys(400, 18 * (len(FILLER) + 1), 2, np.random.default_rng(0))
    fillers = [d.count(FILLER) for d in docs]
    after = [d.split("is the pass key.")[1].count(FILLER) for d in docs]  # repeats between key and question
    assert len(docs) == 400 and min(fillers) == 9 and max(fillers) == 18
    assert max(after[1::2]) == 2 and min(after[1::2]) == 0
    assert max(after[0::2]) >= 15 and np.mean([a / f for a, f in zip(after[0::2], fillers[0::2])]) == pytest.approx(0.5, abs=0.06)
    assert len({d.split("The pass key is ")[1].split(".")[0] for d in docs}) > 390  # fresh keys


def test_extension_copy_loss_scores_the_second_occurrence_of_the_key() -> None:
    """The digit-copy loss reads the logits that predict the key's second occurrence: ~0 for a model that puts
    all its mass on the true next token, ln V for a uniform one, and high for one that is right only elsewhere."""
    from longreach.studies.extension import ExtensionConfig, _copy_nll

    class Chars:  # one token per character (digits one token each), a longreach-style tokenizer
        sp = None

        def encode(self, text: str) -> list[int]:
            return [ord(c) for c in text]

        def decode(self, ids: list[int]) -> str:
            return "".join(chr(i) for i in ids)

    class Oracle(torch.nn.Module):  # logits [1, S, 128]: 30 on the token that follows (what a copy would give)
        def __init__(self, right: bool) -> None:
            super().__init__()
            self.right = right

        def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
            nxt = torch.roll(input_ids[0], -1 if self.right else -2)  # [S]
            return SimpleNamespace(logits=30.0 * torch.nn.functional.one_hot(nxt, 128).float()[None])

    cfg = ExtensionConfig(seq_len=600, seeds=3)
    assert _copy_nll(Oracle(True), Chars(), cfg) < 1e-6
    assert _copy_nll(Oracle(False), Chars(), cfg) > 20
    uniform = SimpleNamespace(logits=None)

    def flat(input_ids: torch.Tensor) -> SimpleNamespace:
        uniform.logits = torch.zeros(1, input_ids.shape[1], 128)
        return uniform
    assert _copy_nll(flat, Chars(), cfg) == pytest.approx(math.log(128))


def test_extension_findings_follow_the_numbers() -> None:
    """The retrieval-at-4L, perplexity-order and YaRN findings read their direction from the rows: a table where
    the fine-tuned recipes find keys deep in 4L (and the base does not) reproduces the effect, one where they
    only find keys next to the question does not, and says why."""
    from longreach.studies.extension import BASELINES, LORA_MEASURED, RECIPES, ExtensionConfig, _findings, _rope

    cfg = ExtensionConfig()
    longlora, sinklora, full = RECIPES

    def row(ppl4: float, pk_l: float, pk_4: list[float]) -> dict:  # digit-copy loss: near 0 where L retrieves
        return {"ppl": {"128": 12.0, "256": 13.0, "512": ppl4}, "passkey": {"128": [pk_l] * 5, "512": pk_4},
                "copy_nll": 2.2 * (1 - pk_l)}

    near = [0.0, 0.0, 0.0, 0.0, 1.0]  # only the key next to the question (depth 1)
    rows = {"base (no fine-tune, no scaling)": row(40.0, 0.9, [0.0, 0.0, 0.0, 0.0, 0.6]),
            "PI, no fine-tune": row(30.0, 0.0, [0.0] * 5),
            "YaRN (published beta 32), no fine-tune": row(14.0, 0.0, [0.0] * 5),
            "YaRN (beta for L), no fine-tune": row(14.5, 0.8, near),
            longlora: row(14.2, 0.8, near), sinklora: row(14.1, 0.8, near), full: row(13.9, 0.9, near)}
    assert set(rows) == {"base (no fine-tune, no scaling)", *BASELINES, *RECIPES}
    def finding(text: str):
        return next(f for f in _findings(cfg, rows) if text in f.claim)

    retrieval = finding("retrieve at 4L")
    assert retrieval.reproduced is False and "within ~L of the question" in retrieval.why
    assert finding("full fine-tune <= SinkLoRA").reproduced is True
    assert finding("recovers more").reproduced is True  # ppl @4L: SinkLoRA 14.1 < LongLoRA 14.2
    assert finding("YaRN extends better").reproduced is True
    deep = [0.6, 0.8, 0.7, 0.9, 1.0]
    rows.update({longlora: row(14.2, 0.8, deep), sinklora: row(14.1, 0.8, deep), full: row(13.9, 0.9, deep)})
    retrieval = finding("retrieve at 4L")
    assert retrieval.reproduced is True and "PI without training: passkey @128 0.00 (base 0.90)" in retrieval.why
    assert f"{cfg.finetune_steps} fine-tuning steps (passkey tasks)" in retrieval.why
    assert "base 0.22, PI untrained 2.20, LongLoRA 0.44, SinkLoRA 0.44, full 0.22" in retrieval.why
    mix = {"tasks": 2100, "quartiles": [40, 120, 260], "max": 470, "beyond_L": 0.42}
    with_mix = next(f for f in _findings(cfg, rows, mix) if "retrieve at 4L" in f.claim)
    assert "2100 passkey tasks, 42% with the key farther back than L" in with_mix.why
    rows[longlora] = row(14.2, 0.1, [0.0] * 5)  # only some recipes reach deep keys: named, with their numbers
    partial = finding("retrieve at 4L")
    assert partial.reproduced is False
    assert partial.why.startswith("SinkLoRA (LoRA + SF + 4 sinks) (0.75), full fine-tune (full attention) (0.75) reach")
    assert "LongLoRA (LoRA + S2) (0.00, passkey @128 0.10) do not" in partial.why
    assert partial.why.endswith("the LoRA recipes' failure " + LORA_MEASURED)  # the rank sweep, when a LoRA arm fails
    yarn_cfg = ExtensionConfig(finetune_rope="yarn")  # measured under PI only: not quoted for YaRN fine-tuning
    assert LORA_MEASURED not in next(f for f in _findings(yarn_cfg, rows) if "retrieve at 4L" in f.claim).why
    rows[sinklora] = row(14.3, 0.8, deep)  # SinkLoRA behind LongLoRA: the order is not reproduced
    assert finding("full fine-tune <= SinkLoRA").reproduced is False
    # the RoPE of each arm: PI, YaRN with the study's betas, YaRN with transformers' published defaults
    assert (_rope(cfg, "linear").type, _rope(cfg, "linear").factor) == ("linear", 4.0)
    yarn = _rope(cfg, "yarn")
    assert (yarn.type, yarn.beta_fast, yarn.beta_slow, yarn.attention_factor) == ("yarn", 2.0, 1.0, 1.0)
    paper = _rope(cfg, "yarn-published")
    assert (paper.type, paper.beta_fast, paper.attention_factor) == ("yarn", None, None)
    with pytest.raises(ValueError, match="finetune_rope"):
        ExtensionConfig(finetune_rope="ntk")


def test_extension_lora_rank_reaches_the_recipe_with_alpha_twice_the_rank(tmp_path: Path, monkeypatch) -> None:
    import longreach.studies.extension as ext

    jobs = []
    api = ext._finetune_api()

    def finetune(job):  # the job the study would run, kept instead of trained
        jobs.append(job)
        return {"trainable": {"fraction": 0.25}, "losses": [2.0, 1.0]}

    monkeypatch.setattr(ext, "_finetune_api", lambda: {**api, "finetune": finetune})
    for rank in (8, 32):
        got = ext._finetune(ext.ExtensionConfig(lora_rank=rank), tmp_path, "longlora", "s2")
        assert got == {"trainable_fraction": 0.25, "export": str(tmp_path / "longlora_s2" / "export"),
                       "last_loss": 1.5}
    assert [(j.recipe.lora_r, j.recipe.lora_alpha) for j in jobs] == [(8, 16), (32, 64)]
    assert ext.ExtensionConfig().lora_rank == 8  # LongLoRA's r 8, alpha 16
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        ext.ExtensionConfig(lora_rank=0)
