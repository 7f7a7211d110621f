"""Faults: SIGKILL of one rank mid-run and mid-save under torchrun --max-restarts 1 resumes with
bit-identical losses and no skipped step; NaN/inf agreed across ranks (skip / stop); a collective that
hangs fails naming the rank and the operation; the watchdog reports a stuck region."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longreach.errors import ConfigError
from longreach.faults import (INJECT_ENV, CollectiveWatchdog, FaultConfig, FaultPolicy, NonFiniteLossError,
                              check_finite, parse_injections)
from longreach.testing import run_ranks
from workers import faults as w

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


# ------------------------------------------------------------------ reliability scenarios through the CLI
def _cli(tmp: Path, *args: str, launcher: str = "cli", limit_bytes: int | None = None,
         env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen:
    """``longreach …`` (or ``python -m torch.distributed.run …`` with launcher="torchrun") in ``tmp``."""
    prefix = ["-m", "longreach.launchers.cli"] if launcher == "cli" else \
        ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "longreach.launchers.cli"]

    def limit() -> None:  # a "full disk": no file may grow past limit_bytes (EFBIG; Python ignores SIGXFSZ)
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen([sys.executable, *prefix, *args], cwd=tmp, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=limit if limit_bytes else None,
                            env={**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1",
                                 "LONGREACH_CACHE": str(tmp / "cache"), **(env or {})}, **popen)


def _done(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out + err


def _errors(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if "longreach: error:" in ln]


def _wait_for(cond, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _flip_byte(ckpt: Path) -> None:
    f = next((ckpt / "model").glob("*.distcp"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the checksum notices
    f.write_bytes(bytes(data))


def _interrupt_job(tmp: Path, name: str, sig: int) -> tuple[int, str, Path]:
    """``longreach launch`` on 2 ranks, stopped like a terminal (SIGINT to the process group) or a scheduler
    (SIGTERM to the launcher) once it trains."""
    import signal

    p = _cli(tmp, "launch", "tiny.yaml", "--nproc-per-node", "2", "--log-ranks", "all", f"--run.out_dir={name}",
             "--run.steps=100000", "--run.save_every=2", start_new_session=True)
    run = tmp / name
    _wait_for(lambda: (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3,
              f"{name} to train")
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    rc, out = _done(p)
    return rc, out, run


def test_reliability_scenarios_through_the_cli(tmp_path):
    """Issue cases through the real command line: non-finite weights never saved, moved/copied run
    folders continue, one job per folder (even after the torchrun agent is SIGKILLed), a damaged newest
    checkpoint falls back loudly, a full disk leaves no partial folder, signals give 130/143 and one line per
    rank, damaged cached shards are rebuilt."""
    import signal
    import shutil as sh
    from concurrent.futures import ThreadPoolExecutor

    from longreach.checkpoint import verify_checkpoint

    (tmp_path / "tiny.yaml").write_text(TINY.replace("steps: 8", "steps: 4").replace("save_every: 3", "save_every: 2"))
    rc, out = _done(_cli(tmp_path, "train", "tiny.yaml", "--run.out_dir=a"))  # builds the cache too
    assert rc == 0, out[-3000:]
    a = tmp_path / "a"
    ref = _metrics(a)

    def orphaned_workers() -> dict:
        """Two jobs in one folder are refused; the workers of a SIGKILLed agent stop; the folder is free again."""
        p = _cli(tmp_path, "train", "tiny.yaml", "--run.out_dir=orph", "--run.steps=100000", launcher="torchrun",
                 start_new_session=True)
        lock = tmp_path / "orph" / ".longreach.lock"
        _wait_for(lambda: (tmp_path / "orph" / "metrics.jsonl").is_file(), "orph to train")
        second = _done(_cli(tmp_path, "train", "tiny.yaml", "--run.out_dir=orph", "--run.steps=100000"))
        holder = json.loads(lock.read_text())["pid"]
        os.killpg(p.pid, signal.SIGKILL)  # the agent and its process group
        p.communicate()
        t0 = time.monotonic()
        _wait_for(lambda: not _alive(holder), "the orphaned rank 0 to stop", timeout=60)
        gone_after = time.monotonic() - t0
        again = _done(_cli(tmp_path, "train", "tiny.yaml", "--run.out_dir=orph", "--run.steps=6"))
        return {"second": second, "gone_after": gone_after, "again": again}

    with ThreadPoolExecutor(3) as ex:
        # non-finite weights (lr 1e30 makes them inf/NaN at step 1): stopped at the save, nothing saved
        nonfinite = ex.submit(lambda: _done(_cli(tmp_path, "train", "tiny.yaml", "--run.out_dir=nf",
                                                 "--train.lr=1e30")))
        orphans = ex.submit(orphaned_workers)
        sigint = ex.submit(_interrupt_job, tmp_path, "sigint", signal.SIGINT)
        # a copied run folder continues (its own path is not "a different config")
        sh.copytree(a, tmp_path / "b")
        copied = ex.submit(lambda: _done(_cli(tmp_path, "train", "tiny.yaml", "--run.out_dir=b", "--run.steps=6")))
        # a damaged newest checkpoint: moved aside, the previous one resumed, loudly
        sh.copytree(a, tmp_path / "dmg")
        _flip_byte(tmp_path / "dmg" / "checkpoints" / "step-00000004")
        damaged = ex.submit(lambda: _done(_cli(tmp_path, "train", "tiny.yaml", "--run.out_dir=dmg")))
        # overwrite moves the old run aside
        sh.copytree(a, tmp_path / "ow")
        overwrite = ex.submit(lambda: _done(_cli(tmp_path, "train", "tiny.yaml", "--run.out_dir=ow",
                                                 "--train.lr=0.02", "--run.overwrite=true")))
        # a full disk during a save (files cannot grow past 64 KiB): one line, no partial folder
        sh.copytree(a, tmp_path / "full")
        full = ex.submit(lambda: _done(_cli(tmp_path, "train", "tiny.yaml", "--run.out_dir=full", "--run.steps=6",
                                            limit_bytes=64 << 10)))
        # a truncated and an overwritten cached token shard are rebuilt
        sh.copytree(tmp_path / "cache", tmp_path / "cache2")
        shard = next((tmp_path / "cache2").rglob("shard_00000.bin"))
        shard.write_bytes(shard.read_bytes()[:1000])
        shards = ex.submit(lambda: _done(_cli(tmp_path, "train", "tiny.yaml", "--run.out_dir=sh", "--run.steps=1",
                                              env={"LONGREACH_CACHE": str(tmp_path / "cache2")})))
        sigterm = ex.submit(_interrupt_job, tmp_path, "sigterm", signal.SIGTERM)
        # rank 1 stalls at step 3: rank 0's error names itself, the step and the operation
        stall = ex.submit(lambda: _done(_cli(tmp_path, "launch", "tiny.yaml", "--nproc-per-node", "2", "--log-ranks",
                                             "all", "--run.out_dir=stall", "--run.steps=6",
                                             "--faults.collective_timeout_s=5",
                                             env={INJECT_ENV: "hang@step=3,rank=1,seconds=60"})))
        results = {k: f.result() for k, f in dict(nonfinite=nonfinite, orphans=orphans, sigint=sigint, copied=copied,
                                                  damaged=damaged, overwrite=overwrite, full=full, shards=shards,
                                                  sigterm=sigterm, stall=stall).items()}

    rc, out = results["nonfinite"]
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    assert _errors(out) == [_errors(out)[0]] and re.search(
        r"step 2: non-finite values in .*; not saving checkpoint step-00000002 \(the last complete checkpoint is "
        r"none yet\); the run diverged", _errors(out)[0]), out[-2000:]
    assert not list((tmp_path / "nf" / "checkpoints").glob("*")) and not (tmp_path / "nf" / ".longreach.lock").exists()

    o = results["orphans"]
    rc, out = o["second"]
    assert rc == 2 and re.search(r"run folder orph is in use by another job: pid \d+", _errors(out)[0]), out[-2000:]
    assert o["gone_after"] < 60  # the rank noticed its agent was gone (it would otherwise train for hours)
    rc, out = o["again"]  # at once: the folder is free (its lock released, or stale and taken over)
    assert rc == 0 and "resumed from orph/checkpoints/step-" in out, out[-3000:]
    assert not list((tmp_path / "orph").rglob("*.tmp")) and not (tmp_path / "orph" / ".longreach.lock").exists()

    for name, code, sig in (("sigint", 130, "SIGINT"), ("sigterm", 143, "SIGTERM")):
        rc, out, run = results[name]
        assert rc == code and "Traceback" not in out, (name, out[-3000:])
        lines = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("longreach:")]
        assert sorted(lines) == sorted([f"longreach: rank 0: interrupted by {sig}", f"longreach: rank 1: interrupted by "
                                        f"{sig}", f"longreach: torchrun agent stopped by {sig}; its ranks were told to "
                                        "stop"]), (name, lines)
        assert not (run / ".longreach.lock").exists() and not list(run.rglob("*.tmp")), name
        for ck in (run / "checkpoints").iterdir():
            verify_checkpoint(ck)  # whatever was saved before the signal is complete

    rc, out = results["copied"]
    assert rc == 0 and "resumed from b/checkpoints/step-00000004" in out, out[-3000:]
    assert [r["step"] for r in _metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    assert _metrics(a) == ref and sorted(p.name for p in (a / "checkpoints").iterdir()) == ["step-00000002",
                                                                                           "step-00000004"]

    rc, out = results["damaged"]
    assert rc == 0, out[-3000:]
    assert re.search(r"step-00000004: model/.*\.distcp fails its sha256 check \(damaged checkpoint\); moved it aside "
                     r"to step-00000004\.damaged and resuming from the previous complete checkpoint step-00000002", out)
    assert [r["loss"] for r in _metrics(tmp_path / "dmg")] == [r["loss"] for r in ref]  # steps 3-4 redone, bit for bit
    assert sorted(p.name for p in (tmp_path / "dmg" / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000004", "step-00000004.damaged"]

    rc, out = results["overwrite"]
    assert rc == 0 and "run.overwrite: moved the previous run in ow" in out, out[-3000:]
    aside, = tmp_path.glob("ow.replaced-*")
    assert _metrics(aside) == ref and sorted(p.name for p in (aside / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000004"]

    rc, out = results["full"]
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    assert re.search(r"cannot write checkpoint full/checkpoints/step-00000006\.tmp \(.*File too large.*\); about \d+ "
                     r"bytes needed, \d+ free; the partial folder was removed \(the last complete checkpoint, "
                     r"step-00000004, is intact\)", _errors(out)[0]), out[-2000:]
    ck = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000002", "step-00000004"]
    verify_checkpoint(ck / "step-00000004")

    rc, out = results["stall"]
    assert rc == 1 and "Traceback" not in out, out[-3000:]
    errs = _errors(out)
    assert any(re.search(r"rank 0: step 3: a collective in the train step \(forward/backward/optimizer\) failed after "
                         r"waiting up to faults.collective_timeout_s=5s: Timed out", e) for e in errs), errs
    assert re.search(r"the job failed \(rank 0 exit status 1, rank 1 exit status \d+\)", errs[-1]), errs
    assert all("rank 0: " in e or "the job failed" in e for e in errs), errs  # every line names its rank

    rc, out = results["shards"]
    assert rc == 0 and re.search(r"shard_00000\.bin: token shard has 1000 bytes, the index says \d+ uint16 tokens .*"
                                 r"truncated or overwritten; rebuilding the cached token shards", out), out[-3000:]


class _IdTokenizer:
    vocab_size, bos_id, eos_id = 50, 1, 2


@pytest.mark.parametrize("damage,match", [
    ("truncate", r"shard_00000\.bin: token shard has 10 bytes, the index says 14 uint16 tokens \(28 bytes\)"),
    ("big_id", r"shard_00001\.bin: token id 60000 at position 3 is not below the vocabulary size 50"),
    ("offsets", r"index\.json: document offsets of shard_00000\.bin are inconsistent with its 14 tokens"),
    ("dtype", r"index\.json: shard dtype int64 is not uint16 or uint32"),
    ("totals", r"index\.json: num_documents is 7 but the shards hold 4"),
    ("missing", r"shard_00001\.bin: token shard missing"),
])
def test_token_shards_validated_on_open(tmp_path, damage, match):
    from longreach.data.shards import TokenShards, write_shards
    from longreach.errors import UserError

    folder = tmp_path / "s"
    write_shards([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [20, 21], [30, 31, 32]], _IdTokenizer(), folder,
                 shard_tokens=14)
    assert TokenShards(folder).num_documents == 4  # intact: opens
    index = json.loads((folder / "index.json").read_text())
    if damage == "truncate":
        (folder / "shard_00000.bin").write_bytes((folder / "shard_00000.bin").read_bytes()[:10])
    elif damage == "big_id":
        raw = bytearray((folder / "shard_00001.bin").read_bytes())
        raw[6:8] = (60000).to_bytes(2, "little")
        (folder / "shard_00001.bin").write_bytes(bytes(raw))
    elif damage == "missing":
        (folder / "shard_00001.bin").unlink()
    else:
        if damage == "offsets":
            index["shards"][0]["doc_offsets"][-1] = 13
        elif damage == "dtype":
            index["dtype"] = "int64"
        else:
            index["num_documents"] = 7
        (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=match):
        TokenShards(folder)


def test_run_folder_lock_holder_stale_and_foreign(tmp_path):
    from longreach.errors import UserError
    from longreach.faults import RunFolderLock

    first = RunFolderLock(tmp_path / "run")
    first.acquire()
    holder = json.loads(first.path.read_text())
    assert holder["pid"] == os.getpid() and holder["proc_start"]
    with pytest.raises(UserError, match=rf"run folder .*run is in use by another job: pid {os.getpid()} on host "):
        RunFolderLock(tmp_path / "run").acquire()  # a live process holds it (this one)
    # the holder's pid now belongs to another process (same pid, other start time): stale
    first.path.write_text(json.dumps({**holder, "proc_start": "other-boot:1"}))
    second = RunFolderLock(tmp_path / "run")
    second.acquire()
    assert second.held and json.loads(second.path.read_text())["proc_start"] == holder["proc_start"]
    second.release()
    assert not second.path.exists()
    # a dead pid: stale; another host's lock: never taken over from here
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    second.path.write_text(json.dumps({**holder, "pid": int(dead.stdout)}))
    RunFolderLock(tmp_path / "run").acquire()
    second.path.write_text(json.dumps({**holder, "host": "elsewhere", "pid": 1}))
    with pytest.raises(UserError, match="pid 1 on host elsewhere"):
        RunFolderLock(tmp_path / "run").acquire()
    second.release()  # not ours: left alone
    assert json.loads(second.path.read_text())["host"] == "elsewhere"
