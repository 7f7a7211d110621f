"""Faults: SIGKILL of one rank mid-run and mid-save under torchrun --max-restarts 1 resumes with
bit-identical losses and no skipped step; NaN/inf agreed across ranks (skip / stop); a collective that
hangs fails naming the rank and the operation; the watchdog reports a stuck region."""
from __future__ import annotations

import json
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


def _torchrun(run_dir: Path, inject: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1", LONGREACH_FAULT_INJECT=inject)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.2", "-m", "longreach.workers.faults", str(run_dir),
           "--steps", str(STEPS), "--save-every", str(SAVE_EVERY)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def test_sigkill_restart_resume_bit_identical_and_nan_and_timeout(tmp_path):
    # both torchrun jobs run while the reference spawn runs: most of their time is restart latency
    killed = {"after_ckpt": _torchrun(tmp_path / "after_ckpt", "kill@step=5,rank=1"),
              "in_save": _torchrun(tmp_path / "in_save", "kill_in_save@step=6,rank=1")}
    res = run_ranks(w.faults_matrix_worker, 2, args=(str(tmp_path), STEPS, SAVE_EVERY))
    outs = {k: p.communicate(timeout=280)[0] for k, p in killed.items()}
    ref = res[0]["ref"]
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for name, p in killed.items():
        assert p.returncode == 0, (name, outs[name][-3000:])
        assert "exitcode: -9" in outs[name] or "Signals.SIGKILL" in outs[name], (name, outs[name][-2000:])
        recs = _metrics(tmp_path / name)
        # every step exactly once, nothing after the last checkpoint silently skipped
        assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), (name, recs)
        assert not any(r["skipped"] for r in recs)
        # steps after the last complete checkpoint (3) were redone by the restarted job
        assert [r["restart"] for r in recs] == [0, 0, 0] + [1] * (STEPS - 3), (name, recs)
        assert [r["loss"] for r in recs] == [r["loss"] for r in ref], name  # bit for bit
        ckdir = tmp_path / name / "checkpoints"
        assert not list(ckdir.glob("*.tmp")), name  # the half-written save was cleaned
        assert (ckdir / "step-00000006").is_dir()

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
