"""The ``longreach`` command line: help on every command, exit codes for bad input, the demo's wiring."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longreach.launchers import cli

BIN = Path(sys.executable).parent / "longreach"
ALL = [[c] for c in cli.COMMANDS] + [["bench", b] for b in cli.BENCH]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONSAFEPATH="1")
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_entry_point_help_lists_every_command(tmp_path: Path) -> None:
    res = _run("--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for cmd in [*cli.COMMANDS, *(f"bench {b}" for b in cli.BENCH)]:
        assert f"  {cmd} " in res.stdout
    mod = subprocess.run([sys.executable, "-m", "longreach.launchers", "bench", "--help"], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONSAFEPATH="1"), cwd=tmp_path, timeout=120)
    assert mod.returncode == 0 and "cp" in mod.stdout and "sweep" in mod.stdout


@pytest.mark.parametrize("cmd", ALL, ids=[" ".join(c) for c in ALL])
def test_help_of_each_command(cmd: list[str], capsys) -> None:
    table = cli.BENCH if cmd[0] == "bench" else cli.COMMANDS
    module = table[cmd[-1]][0].split(":")[0]
    try:
        available = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        available = False
    try:
        code = cli.main([*cmd, "--help"])
    except SystemExit as e:  # argparse exits after printing help
        code = e.code or 0
    out = capsys.readouterr()
    if available:
        assert code == 0, out.err
        assert f"usage: longreach {' '.join(cmd)}" in out.out
    else:  # not landed yet: one clear line, not a traceback
        assert code == 2 and out.err.startswith("longreach: error: ") and "not available" in out.err
        assert out.err.count("\n") == 1


def test_bad_input_exit_codes(tmp_path: Path) -> None:
    res = _run("train", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith("longreach: error: ") and "missing.yaml" in res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1
    res = _run("trian", cwd=tmp_path)
    assert res.returncode == 2 and "did you mean 'train'" in res.stderr


def test_in_process_errors(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  seqlen: 64\n")
    cases = [
        (["train", str(bad)], "did you mean 'train.seq_len'"),
        (["train", "demo", "--train.seqlen=64"], "did you mean 'train.seq_len'"),
        (["train", "demo", "stray"], "unrecognised argument 'stray'"),
        (["train", "demo", "--train.lr"], "has no value"),
        (["bench", "nope"], "unknown benchmark 'nope'"),
        (["demo", "--nproc", "0"], "--nproc must be >= 1"),
        (["demo", "--model.dimm=3"], "did you mean 'model.dim'"),  # checked before torchrun starts
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("longreach: error: ") and message in err, (argv, err)
    assert cli.main([]) == 2 and "usage: longreach" in capsys.readouterr().out


def test_keyboard_interrupt_exits_130(monkeypatch) -> None:
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_resolve", lambda target, command: interrupted)
    assert cli.main(["eval"]) == 130


def test_train_print_config(capsys) -> None:
    import yaml

    assert cli.main(["train", "demo", "--train.lr=2e-3", "--run.steps", "7", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["lr"] == 2e-3 and cfg["run"]["steps"] == 7 and cfg["parallel"]["cp"] == 2


def test_demo_runs_torchrun_and_reports(monkeypatch, tmp_path: Path, capsys) -> None:
    seen = {}
    out_dir = tmp_path / "runs" / "demo"

    def fake_run(cmd, env, check):
        seen["cmd"], seen["env"] = cmd, env
        (out_dir / "checkpoints" / "step-00000100").mkdir(parents=True)
        (out_dir / "checkpoints" / "step-00000150.tmp").mkdir()
        rows = [{"step": 1, "loss": 6.9, "tokens_per_s": 100.0}, {"step": 2, "loss": 5.0, "tokens_per_s": 300.0},
                {"step": 3, "loss": 4.25, "tokens_per_s": 500.0}]
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    assert cli.main(["demo", "--out-dir", str(out_dir), "--run.steps=3"]) == 0
    cmd = seen["cmd"]
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and "--standalone" in cmd
    i = cmd.index("-m", 3)
    assert cmd[i + 1:i + 3] == ["longreach.launchers.cli", "train"] and cmd[i + 3].endswith("demo.yaml")
    assert f"--run.out_dir={out_dir}" in cmd and cmd[-1] == "--run.steps=3"
    assert seen["env"]["PYTHONSAFEPATH"] == "1"
    out = capsys.readouterr().out
    assert f"metrics:    {out_dir / 'metrics.jsonl'}" in out
    assert "step-00000100" in out and ".tmp" not in out
    assert "6.9000 (step 1) -> 4.2500 (step 3)" in out and "400" in out

    monkeypatch.setattr(cli.subprocess, "run", lambda cmd, env, check: subprocess.CompletedProcess(cmd, 3))
    assert cli.main(["demo", "--out-dir", str(tmp_path / "other")]) == 3
    assert "demo run failed" in capsys.readouterr().err
