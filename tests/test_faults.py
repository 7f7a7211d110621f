"""Faults: SIGKILL of one rank mid-run and mid-save under torchrun --max-restarts 1 resumes with
bit-identical losses and no skipped step; NaN/inf agreed across ranks (skip / stop); a collective that
hangs fails naming the rank and the operation; the watchdog reports a stuck region."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longreach.errors import ConfigError
from longreach.faults import (CollectiveWatchdog, FaultConfig, FaultPolicy, NonFiniteLossError, check_finite,
                              parse_injections)
from longreach.testing import run_ranks
from longreach.workers import faults as w

STEPS, SAVE_EVERY = 8, 3
TINY = f"""\
run: {{name: tiny, seed: 0, steps: {STEPS}, log_every: 1, save_every: {SAVE_EVERY}}}
model: {{arch: llama, vocab_size: 320, dim: 32, n_layers: 2, n_heads: 2, n_kv_heads: 1, max_seq_len: 64}}
data: {{source: synthetic, vocab_size: 320, synthetic_documents: 40, task_chars: 400, seed: 0}}
train: {{lr: 1.0e-2, warmup_steps: 2, seq_len: 64}}
parallel: {{dp: -1, cp: 1}}
checkpoint: {{keep_last: 2}}
"""


def _torchrun_trainer(tmp: Path, name: str, inject: str) -> subprocess.Popen:
    """``longreach train`` on 2 ranks under torchrun --max-restarts 1; the trainer itself fires the injection."""
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1", LONGREACH_FAULT_INJECT=inject,
               LONGREACH_CACHE=str(tmp / "cache"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.2", "-m", "longreach.launchers.cli", "train",
           str(tmp / "tiny.yaml"), f"--run.out_dir={tmp / name}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def test_sigkill_restart_resume_bit_identical_and_nan_and_timeout(tmp_path):
    """The real trainer, killed (SIGKILL, rank 1) after a checkpoint and during a save, restarted by
    torchrun, equals an uninterrupted run bit for bit; every step is logged exactly once."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    jobs = {"reference": _torchrun_trainer(tmp_path, "reference", ""),
            "after_ckpt": _torchrun_trainer(tmp_path, "after_ckpt", "kill@step=5,rank=1"),
            "in_save": _torchrun_trainer(tmp_path, "in_save", "kill_in_save@step=6,rank=1")}
    # meanwhile, in this process: NaN agreement and the collective timeout on 2 gloo ranks
    res = run_ranks(w.faults_matrix_worker, 2, args=(str(tmp_path / "loop"), 2, 0))
    outs = {k: p.communicate(timeout=280)[0] for k, p in jobs.items()}
    for name, p in jobs.items():
        assert p.returncode == 0, (name, outs[name][-3000:])
    assert "exitcode: -9" not in outs["reference"]
    ref = _metrics(tmp_path / "reference")
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for name in ("after_ckpt", "in_save"):
        out = outs[name]
        assert "exitcode: -9" in out, (name, out[-2000:])  # rank 1 really was SIGKILLed
        assert "resumed from" in out and "step-00000003" in out, (name, out[-2000:])
        recs = _metrics(tmp_path / name)
        # every step exactly once: nothing after the last checkpoint silently skipped or duplicated
        assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), (name, recs)
        assert [r["loss"] for r in recs] == [r["loss"] for r in ref], name  # bit for bit
        assert [r["grad_norm"] for r in recs] == [r["grad_norm"] for r in ref], name
        ckdir = tmp_path / name / "checkpoints"
        assert not list(ckdir.glob("*.tmp")), name  # the half-written save was cleaned
        assert sorted(p.name for p in ckdir.iterdir()) == ["step-00000006", "step-00000008"], name

    # the 2-rank checkpoint resumes on 1 rank through the real CLI (resharded by DCP)
    one = subprocess.run([sys.executable, "-m", "longreach.launchers.cli", "train", str(tmp_path / "tiny.yaml"),
                          f"--run.out_dir={tmp_path / 'one'}",
                          f"--checkpoint.load_path={tmp_path / 'reference' / 'checkpoints' / 'step-00000006'}"],
                         env=dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1",
                                  LONGREACH_CACHE=str(tmp_path / "cache")), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "written by 2 ranks, now 1" in one.stderr
    one_recs = _metrics(tmp_path / "one")
    assert [r["step"] for r in one_recs] == [7, 8] and all(math.isfinite(r["loss"]) for r in one_recs)

    # NaN on rank 1 only at step 2: both ranks skip it; the clean run does not
    for r in res:
        assert r["check_finite_mixed"] is False and r["check_finite_ok"] is True
        assert [x["skipped"] for x in r["nan"]] == [False, True, False, False]
        assert not any(x["skipped"] for x in r["clean"])
        assert r["nan"][0]["loss"] == r["clean"][0]["loss"]
        assert r["nan"][2]["loss"] != r["clean"][2]["loss"]  # the step really was not applied
        assert "non-finite loss at step 7" in r["stop"] and "faults.on_nonfinite=stop" in r["stop"]
    assert res[0]["timeout"].startswith("rank 0: collective all_reduce(loss) did not complete within 1s")


def test_policy_single_process():
    pol = FaultPolicy(FaultConfig(on_nonfinite="skip", max_skips=2))
    assert pol.check(torch.tensor(1.0), 1)
    assert not pol.check(torch.tensor(float("nan")), 2)
    assert pol.check(torch.tensor([1.0, 2.0]), 3)
    assert not pol.check(float("inf"), 4)
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps"):
        pol.check(torch.tensor(float("-inf")), 5)
    assert pol.skipped == [2, 4, 5]
    assert check_finite(torch.tensor([1.0, float("nan")])) is False
    pol2 = FaultPolicy(FaultConfig(inject="nan@step=3"))
    assert pol2.check(torch.tensor(1.0), 2) and not pol2.check(torch.tensor(1.0), 3)


@pytest.mark.parametrize("spec,msg", [("boom@step=1", "unknown fault kind"), ("kill@rank=1", "step=N"),
                                      ("kill@step=x", "integer"), ("kill@when=3", "bad field")])
def test_bad_injection_spec(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_injections(spec)


def test_fault_config_checks():
    with pytest.raises(ConfigError, match="faults.on_nonfinite"):
        FaultConfig(on_nonfinite="ignore")
    with pytest.raises(ConfigError, match="faults.collective_timeout_s"):
        FaultConfig(collective_timeout_s=0)


def test_watchdog_names_the_operation():
    seen: list[str] = []
    wd = CollectiveWatchdog(0.2, on_timeout=seen.append)
    with wd.guard("all_gather(kv chunk 3)"):
        time.sleep(0.8)
    with wd.guard("quick"):
        pass
    time.sleep(0.3)
    wd.close()
    assert len(seen) == 1 and "rank 0: collective all_gather(kv chunk 3) has not finished after 0.2s" in seen[0]
