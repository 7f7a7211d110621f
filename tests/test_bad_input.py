"""Bad input through the real command line: each case gives ONE line ``longreach: error: …``, a
non-zero exit, no traceback — and nothing already written (run folders, checkpoints) is modified.

The table (case -> message) is printed with ``pytest -s`` for the closing note of issue 8.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

TINY = """\
run:
  name: tiny
  seed: 0
  steps: 4
  log_every: 1
  save_every: 2
model:
  arch: llama
  vocab_size: 320
  dim: 32
  n_layers: 2
  n_heads: 2
  n_kv_heads: 1
  max_seq_len: 64
data:
  source: synthetic
  vocab_size: 320
  synthetic_documents: 40
  task_chars: 400
  seed: 0
train:
  lr: 1.0e-2
  warmup_steps: 2
  seq_len: 64
parallel:
  dp: -1
  cp: 1
checkpoint:
  keep_last: 2
"""

# (case, argv after `longreach`, regex the single error line must match)
CASES: list[tuple[str, list[str], str]] = [
    ("malformed YAML", ["train", "malformed.yaml"], r"malformed\.yaml:\d+: malformed YAML"),
    ("misspelt section", ["train", "tiny.yaml", "--trian.lr=1"], r"unknown config key 'trian'; did you mean 'train'"),
    ("wrong type", ["train", "tiny.yaml", "--train.lr=fast"], r"train\.lr expects float, got 'fast'"),
    ("missing config file", ["train", "nope.yaml"], r"config file not found: nope\.yaml"),
    ("missing data file", ["train", "tiny.yaml", "--data.source=files", "--data.paths=[/nonexistent/c.txt]",
                           "--run.out_dir=o_data"], r"data\.paths: /nonexistent/c\.txt does not exist"),
    ("impossible parallel degrees", ["train", "tiny.yaml", "--parallel.cp=2"],
     r"parallel\.cp=2 does not divide WORLD_SIZE \(1\)"),
    ("unknown strategy", ["train", "tiny.yaml", "--parallel.strategy=spiral"], r"parallel\.strategy must be one of"),
    ("sequence not divisible", ["train", "tiny.yaml", "--parallel.cp=2", "--train.seq_len=62"],
     r"train\.seq_len=62 does not divide by 4"),
    ("unknown engine", ["train", "tiny.yaml", "--engine.kind=megatron"], r"engine\.kind must be one of"),
    ("negative steps", ["train", "tiny.yaml", "--run.steps=-1"], r"run\.steps must be >= 0"),
    ("override without value", ["train", "tiny.yaml", "--train.lr"], r"override '--train\.lr' has no value"),
    ("bad keep_last", ["train", "tiny.yaml", "--checkpoint.keep_last=-1"], r"checkpoint\.keep_last must be"),
    ("corrupted tokenizer file", ["train", "tiny.yaml", "--data.tokenizer=garbage.model", "--run.out_dir=o_tok"],
     r"tokenizer model garbage\.model"),
    ("missing tokenizer file", ["train", "tiny.yaml", "--data.tokenizer=missing.model", "--run.out_dir=o_tok2"],
     r"data\.tokenizer: .*missing\.model"),
    ("every checkpoint damaged", ["train", "tiny.yaml", "--run.out_dir=corrupt"],
     r"no intact checkpoint in corrupt/checkpoints: checkpoint corrupt/checkpoints/step-00000004: meta\.json is "
     r"corrupted .*; checkpoint corrupt/checkpoints/step-00000002: model/.*\.distcp fails its sha256 check"),
    ("damaged checkpoint.load_path (same-size edit)",
     ["train", "tiny.yaml", "--run.out_dir=o_new5", "--checkpoint.load_path=corrupt/checkpoints/step-00000002"],
     r"checkpoint\.load_path: checkpoint corrupt/checkpoints/step-00000002: model/.*\.distcp fails its sha256 check"),
    ("infinite learning rate", ["train", "tiny.yaml", "--train.lr=inf", "--run.steps=4"],
     r"train\.lr expects a finite float, got 'inf'"),
    ("NaN learning rate", ["train", "tiny.yaml", "--train.lr=nan"], r"train\.lr expects a finite float, got 'nan'"),
    ("overflowing learning rate", ["train", "tiny.yaml", "--train.lr=1e38"],
     r"train\.lr=1e\+38 is not a usable learning rate \(at most 1e30\)"),
    ("float for an integer", ["train", "tiny.yaml", "--run.steps=1e30"],
     r"run\.steps expects int, got '1e30' \(a float"),
    ("float for an integer in YAML", ["train", "tiny.yaml", "--train.seq_len=64.0"],
     r"train\.seq_len expects int, got 64\.0 \(a float"),
    ("non-finite timeout", ["train", "tiny.yaml", "--faults.collective_timeout_s=.inf"],
     r"faults\.collective_timeout_s expects a finite float"),
    ("YAML alias bomb", ["train", "bomb.yaml", "--print-config"],
     r"bomb\.yaml: YAML expands to more than 100000 values through aliases"),
    ("unknown run.overwrite", ["train", "tiny.yaml", "--run.overwrite=maybe"],
     r"run\.overwrite must be true/false \(move aside\), or delete; got 'maybe'"),
    ("second job in a run folder", ["train", "tiny.yaml", "--run.out_dir=locked"],
     r"run folder locked is in use by another job: pid \d+ on host .* \(lock locked/\.longreach\.lock"),
    ("LONGREACH_CACHE is a file", ["train", "tiny.yaml", "--run.out_dir=o_cache"],
     r"LONGREACH_CACHE=afile: afile is a file, not a folder"),
    ("busy --master-port", ["launch", "tiny.yaml", "--nproc-per-node", "2", "--master-port", "{busy_port}",
                            "--run.out_dir=o_port"], r"--master-port \d+ is in use by another program"),
    ("rendezvous endpoint held by another program",
     ["launch", "tiny.yaml", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "127.0.0.1:{busy_port}",
      "--rdzv-timeout", "3", "--run.out_dir=o_rdzv"], r"rendezvous at 127\.0\.0\.1:\d+ did not complete within 13s"),
    ("--master-port out of range", ["launch", "tiny.yaml", "--master-port", "70000", "--run.out_dir=o_port2"],
     r"--master-port must be in 1\.\.65535, got 70000"),
    ("unbounded rendezvous", ["launch", "tiny.yaml", "--nnodes", "2", "--rdzv-endpoint", "n0:29400",
                              "--rdzv-timeout", "0"], r"--rdzv-timeout must be >= 1 second"),
    ("missing checkpoint.load_path", ["train", "tiny.yaml", "--run.out_dir=o_new1", "--checkpoint.load_path=nowhere"],
     r"checkpoint\.load_path: checkpoint nowhere does not exist"),
    ("checkpoint of another config", ["train", "tiny.yaml", "--run.out_dir=o_new2", "--checkpoint.load_path=base",
                                      "--model.dim=48"], r"checkpoint base/checkpoints/step-00000004 was written "
                                                         r"with a different config: model\.dim: 32 -> 48"),
    ("checkpoint of another model shape (forced)",
     ["train", "tiny.yaml", "--run.out_dir=o_new3", "--checkpoint.load_path=base", "--model.dim=48",
      "--checkpoint.ignore_config_mismatch=true"],
     r"checkpoint base/checkpoints/step-00000004 holds a different model shape: embed_tokens\.weight"),
    ("tokenizer/vocabulary mismatch with checkpoint",
     ["train", "tiny.yaml", "--run.out_dir=o_new4", "--checkpoint.load_path=base", "--data.vocab_size=400",
      "--model.vocab_size=400", "--checkpoint.ignore_config_mismatch=true"],
     r"checkpoint base/checkpoints/step-00000004 holds a different model shape: .*320"),
    ("existing run, different config", ["train", "tiny.yaml", "--run.out_dir=base", "--train.lr=0.5"],
     r"run folder base holds a run with a different config"),
    ("multi-node without rendezvous", ["launch", "tiny.yaml", "--nnodes", "2"], r"needs --rdzv-endpoint"),
    ("malformed hostfile", ["launch", "tiny.yaml", "--launcher", "deepspeed", "--hostfile", "hosts"],
     r"--hostfile hosts:2: expected 'HOSTNAME slots=N'"),
    ("validate: degrees vs world size", ["launch", "--dry-run", "--validate", "tiny.yaml", "--world-size", "3",
                                         "--parallel.cp=2"], r"--world-size 3: parallel\.cp=2 does not divide WORLD_SIZE \(3\)"),
    ("unknown engine option", ["launch", "--dry-run", "--validate", "tiny.yaml", "--world-size", "2",
                               "--engine.options={zero_stag: 2}"], r"'engine\.options\.zero_stag'; did you mean 'engine\.options\.zero_stage'"),
]


# cases that need their own environment
ENVS: dict[str, dict[str, str]] = {"LONGREACH_CACHE is a file": {"LONGREACH_CACHE": "afile"}}


def _env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1", LONGREACH_CACHE=str(tmp / "cache"))


def _longreach(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longreach.launchers.cli", *args], cwd=cwd,
                          env={**_env(cwd), **(env or {})}, capture_output=True, text=True, timeout=240)


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "cache" not in p.relative_to(root).parts}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad_input")
    (d / "tiny.yaml").write_text(TINY)
    (d / "malformed.yaml").write_text("run:\n  name: x\n  steps: [1, 2\n")
    (d / "garbage.model").write_text("not a sentencepiece model")
    (d / "hosts").write_text("node0 slots=2\nnode1 two\n")
    # two real runs (in parallel): one intact, one whose latest checkpoint gets corrupted
    with ThreadPoolExecutor(2) as ex:
        runs = list(ex.map(lambda name: _longreach(["train", "tiny.yaml", f"--run.out_dir={name}"], d),
                           ["base", "corrupt"]))
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    (d / "corrupt" / "checkpoints" / "step-00000004" / "meta.json").write_text("{not json")
    f = next((d / "corrupt" / "checkpoints" / "step-00000002" / "model").glob("*.distcp"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40  # same size, one bit: only the checksum can tell
    f.write_bytes(bytes(data))
    anchors = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    anchors += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    (d / "bomb.yaml").write_text("\n".join(anchors) + "\n")
    (d / "afile").write_text("a file where a folder belongs")
    return d


@pytest.fixture(scope="module")
def held(workdir):
    """A live process (this one) holding the lock of run folder ``locked``, and a port held by a listener."""
    import socket

    from longreach.faults import RunFolderLock

    lock = RunFolderLock(workdir / "locked")
    lock.acquire()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]
    lock.release()


def test_bad_inputs_one_line_error_nothing_overwritten(workdir, held):
    before = _snapshot(workdir)
    cases = [(name, [a.replace("{busy_port}", str(held)) for a in argv], pattern) for name, argv, pattern in CASES]
    with ThreadPoolExecutor(3) as ex:
        results = list(ex.map(lambda c: _longreach(c[1], workdir, ENVS.get(c[0])), cases))
    after = _snapshot(workdir)
    import re

    failures, table = [], []
    for (name, argv, pattern), res in zip(cases, results):
        errs = [ln for ln in res.stderr.splitlines() if ln.startswith("longreach: error:")]
        line = errs[0] if errs else res.stderr.strip().splitlines()[-1:] or ["<no output>"]
        table.append(f"| {name} | `longreach {' '.join(argv)}` | {line if isinstance(line, str) else line[0]} |")
        if res.returncode == 0:
            failures.append(f"{name}: exit 0")
        if "Traceback" in res.stderr or "Traceback" in res.stdout:
            failures.append(f"{name}: traceback printed:\n{res.stderr[-1500:]}")
        if len(errs) != 1:
            failures.append(f"{name}: expected exactly one error line, got {errs}\n{res.stderr[-1500:]}")
        elif not re.search(pattern, errs[0]):
            failures.append(f"{name}: {errs[0]!r} does not match {pattern!r}")
    changed = [k for k in before if after.get(k) != before[k]]
    print("\n| case | command | message |\n|---|---|---|\n" + "\n".join(table))
    assert not changed, f"files modified by failing commands: {changed}"
    assert not failures, "\n".join(failures)
    assert len(CASES) >= 39
    leftovers = [p for p in workdir.rglob("*") if p.name.endswith((".tmp", ".damaged")) or p.name == ".longreach.lock"
                 and p.parent.name != "locked"]
    assert not leftovers, leftovers  # no partial checkpoint, nothing moved aside, no lock left by a failed run
