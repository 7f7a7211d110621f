"""``longreach launch``: exact torchrun / Slurm / DeepSpeed / accelerate commands (argument lists, no
shell pasting), and the fake-backend meta-device validation of a cluster config."""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from longreach.errors import ConfigError, UserError
from longreach.launchers import launch
from longreach.launchers.deepspeed_launcher import deepspeed_command, read_hostfile
from longreach.launchers.slurm import SlurmSpec, sbatch_script
from longreach.launchers.torchrun import TorchrunSpec, torchrun_command, train_args

PY = sys.executable


def _run(argv, capsys):
    rc = launch.main(argv)
    return rc, capsys.readouterr().out


def test_single_node_torchrun_dry_run(capsys):
    rc, out = _run(["demo", "--nproc-per-node", "2", "--max-restarts", "1", "--dry-run", "--train.lr=1e-3"], capsys)
    assert rc == 0
    cmd = shlex.split(out.strip().splitlines()[-1])
    assert cmd[:3] == [PY, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and cmd[cmd.index("--max-restarts") + 1] == "1"
    assert "--standalone" in cmd
    i = cmd.index("--module")
    assert cmd[i + 1:i + 3] == ["longreach.launchers.cli", "train"]
    assert cmd[i + 3].endswith("demo.yaml") and cmd[-1] == "--train.lr=1e-3"


def test_multi_node_torchrun_command():
    spec = TorchrunSpec(nnodes=4, nproc_per_node=8, node_rank=2, rdzv_endpoint="node0:29400", rdzv_id="job7",
                        max_restarts=3)
    cmd = torchrun_command(spec, train_args("c.yaml", ["--run.steps=5"]))
    assert "--standalone" not in cmd
    for flag, val in (("--nnodes", "4"), ("--rdzv-backend", "c10d"), ("--rdzv-endpoint", "node0:29400"),
                      ("--rdzv-id", "job7"), ("--node-rank", "2"), ("--max-restarts", "3")):
        assert cmd[cmd.index(flag) + 1] == val, flag
    assert spec.world_size == 32
    with pytest.raises(ConfigError, match="--rdzv-endpoint"):
        TorchrunSpec(nnodes=2, nproc_per_node=1)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        TorchrunSpec(nnodes=2, rdzv_endpoint="node0")
    with pytest.raises(ConfigError, match="--node-rank"):
        TorchrunSpec(nnodes=2, rdzv_endpoint="n:1", node_rank=2)


def test_user_input_is_never_shell_pasted(tmp_path):
    evil = "--run.name=x; rm -rf ~ $(reboot) `id`"
    script = sbatch_script(SlurmSpec(nodes=2, gpus_per_node=4), train_args("my config.yaml", [evil]), python="python")
    line = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    words = shlex.split(line)
    assert evil in words and "my config.yaml" in words  # each survived as ONE word, unexpanded
    assert '"${HEAD_NODE}:${RDZV_PORT}"' in line and '"${SLURM_JOB_ID}"' in line
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=4" in script
    with pytest.raises(ConfigError, match="--partition"):
        SlurmSpec(partition="gpu\n#SBATCH --exclusive")
    with pytest.raises(ConfigError, match="--time"):
        SlurmSpec(time="forever")


def test_slurm_writes_script_and_refuses_to_clobber(tmp_path, capsys, monkeypatch):
    out = tmp_path / "job.sbatch"
    rc, text = _run(["demo", "--launcher", "slurm", "--nnodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                     "--output", str(out), "--dry-run"], capsys)
    assert rc == 0 and not out.exists()  # dry run writes nothing
    assert text.strip().splitlines()[-1] == shlex.join(["sbatch", str(out)])
    out.write_text("precious")
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="exists with different contents"):
        launch.main(["demo", "--launcher", "slurm", "--output", str(out)])
    assert out.read_text() == "precious"


def test_deepspeed_hostfile(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("# cluster\nnode0 slots=8\nnode1 slots=8\n")
    assert read_hostfile(hf) == [("node0", 8), ("node1", 8)]
    cmd = deepspeed_command(train_args("c.yaml"), hostfile=str(hf), num_nodes=2)
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert cmd[cmd.index("--hostfile") + 1] == str(hf) and cmd[cmd.index("--module") + 1] == "longreach.launchers.cli"
    hf.write_text("node0 slots=8\nnode1 eight\n")
    with pytest.raises(ConfigError, match=r"hosts:2: expected 'HOSTNAME slots=N'"):
        read_hostfile(hf)
    with pytest.raises(ConfigError, match="does not exist"):
        read_hostfile(tmp_path / "missing")


def test_accelerate_config_dry_run(capsys):
    rc, out = _run(["demo", "--launcher", "accelerate", "--nproc-per-node", "2", "--dry-run"], capsys)
    assert rc == 0
    assert "num_processes: 2" in out and "distributed_type: MULTI_CPU" in out
    cmd = shlex.split(out.strip().splitlines()[-1])
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[cmd.index("--config_file") + 1]


def test_launch_validates_config_before_starting(capsys):
    with pytest.raises(ConfigError, match="trian"):
        launch.main(["demo", "--trian.lr=1"])
    with pytest.raises(UserError, match="needs --world-size"):
        launch.main(["--dry-run", "--validate", "demo"])


def test_meta_device_validation_subprocess():
    """Fake process group + meta device: mesh, parallelized model and memory for 8 and 16 ranks."""
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1")
    script = ("from longreach.launchers import launch; import sys;"
              "sys.exit(launch.main(['--dry-run','--validate','demo','--world-size','16','--parallel.dp=-1',"
              "'--engine.options={fsdp: true}']))")
    out = subprocess.run([PY, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "world size 16: dp 8 × cp 2" in text and "DeviceMesh((dp=8, cp=2)" in text
    assert "FSDP2 fully_shard over 16 ranks" in text
    total = float(text.split("parameters: ")[1].split("M total")[0])
    per_rank = float(text.split("M total, ")[1].split("M per rank")[0])
    assert per_rank == pytest.approx(total / 16, rel=0.05)
    bad = subprocess.run([PY, "-m", "longreach.launchers.cli", "launch", "--dry-run", "--validate", "demo",
                          "--world-size", "3"], env=env, capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "longreach: error: --world-size 3: dp * cp != WORLD_SIZE (1 * 2 != 3); set parallel.dp=-1 to use every rank"]


# --------------------------------------------------------------------------- any command, every recipe
def _header_commands() -> list[tuple[str, list[str]]]:
    """(recipe, words) of every ``#   longreach …`` line in the recipes' header comments (trailing
    ``  (…)`` / ``  # …`` remarks dropped)."""
    import re

    from longreach.configio import _packaged_configs

    found = []
    for name, path in sorted(_packaged_configs().items()):
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            m = re.match(r"^#\s{3}(longreach .*)$", line)
            if m:
                found.append((name, shlex.split(re.split(r"\s{2,}[#(]", m.group(1))[0])))
    return found


HEADERS = _header_commands()


def _as_dry_run(words: list[str]) -> tuple[str, list[str]]:
    """The dry run of a header command: (entry point, argv). ``longreach demo`` is its launch."""
    rest = words[1:]
    if rest[0] == "launch":
        return "launch", (rest[1:] if "--dry-run" in rest else ["--dry-run", *rest[1:]])
    if rest[0] == "demo":
        return "launch", ["--dry-run", "--nproc-per-node", "2", "demo", *rest[1:]]
    if "--print-config" in rest:
        return "cli", rest
    return "launch", ["--dry-run", *rest]


def test_every_recipe_has_a_header_command():
    from longreach.configio import _packaged_configs

    # study recipes (configs/study_*.yaml) are run by `longreach study NAME` (tests/test_studies*.py)
    assert {name for name, _ in HEADERS} == {n for n in _packaged_configs() if not n.startswith("study_")}


@pytest.mark.parametrize("recipe,words", HEADERS, ids=[f"{n}:{i}" for i, (n, _) in enumerate(HEADERS)])
def test_recipe_header_command_dry_runs(recipe, words, capsys, tmp_path, monkeypatch):
    """Each header command, as written, passes the launcher's strict checks and prints what it would run."""
    from longreach.launchers.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    entry, argv = _as_dry_run(words)
    rc = launch.main(argv) if entry == "launch" else cli_main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    if "--validate" in argv:
        assert "world size" in out
    elif entry == "launch":
        last = out.strip().splitlines()[-1]
        assert shlex.split(last)[0] == "sbatch" or "longreach.launchers.cli" in last, last
        command = next((w for w in argv if w in launch.LAUNCHABLE), "train")
        assert f"longreach.launchers.cli {command} " in out, out[-800:]


@pytest.mark.parametrize("launcher", ["torchrun", "slurm", "deepspeed", "accelerate"])
def test_launch_any_command_in_every_mode(launcher, capsys, tmp_path):
    """train, finetune, eval, generate, export and bench run through every launcher mode with their
    own arguments, unchanged and in order."""
    jobs = [["finetune", "longlora_tiny_cpu", "--hf.path=runs/pre/hf"],
            ["eval", "runs/pre", "--strategy", "ring", "--ppl-lengths", "512", "--tokens", "v.npy", "--out", "ev"],
            ["generate", "runs/tnl", "--prompt", "a b", "--decode", "recurrent"],
            ["export", "runs/pre", "--out", "runs/pre/hf", "--format", "hf"],
            ["bench", "cp", "--world-sizes", "2"], ["demo", "--run.steps=1"]]
    opts = ["--launcher", launcher, "--nproc", "2", "--output", str(tmp_path / "f")]
    for job in jobs:
        rc = launch.main([*opts, "--dry-run", *job])
        out = capsys.readouterr().out
        assert rc == 0
        text = out.replace("'", "").replace('"', "")
        expect = ["longreach.launchers.cli", *(job if job[0] != "demo" else ["train"])]
        if job[0] in ("finetune", "demo"):  # the config is passed resolved to its file
            expect = [w for w in expect if w not in ("longlora_tiny_cpu", "demo")]
        pos = 0
        for word in expect:
            pos = text.find(word, pos)
            assert pos >= 0, (word, job, out[-800:])
    with pytest.raises(UserError, match="name the benchmark"):
        launch.main(["--dry-run", "bench"])
    with pytest.raises(UserError, match="disagree"):
        launch.main(["--dry-run", "--command", "eval", "train", "demo"])
    with pytest.raises(ConfigError, match="hf.path"):
        launch.main(["--dry-run", "finetune", "longlora_tiny_cpu", "--hf.pth=x"])


def test_validate_understands_finetune_configs(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from workers.hf import tiny_llama_config

    hf_cfg = tiny_llama_config(vocab_size=300, max_position_embeddings=256)
    hf_cfg.save_pretrained(tmp_path / "hf")
    n_params = sum(p.numel() for p in LlamaForCausalLM(hf_cfg).parameters())
    assert launch.main(["--dry-run", "--validate", "finetune", "longlora_tiny_cpu", "--world-size", "2",
                        f"--hf.path={tmp_path / 'hf'}"]) == 0
    out = capsys.readouterr().out
    assert "world size 2: dp 1 × cp 2" in out and "recipe longlora" in out
    assert f"parameters: {n_params / 1e6:.2f}M total" in out
    with pytest.raises(UserError, match=r"--world-size 3: dp \* cp != WORLD_SIZE \(1 \* 2 != 3\)"):
        launch.main(["--dry-run", "--validate", "finetune", "longlora_tiny_cpu", "--world-size", "3",
                     f"--hf.path={tmp_path / 'hf'}"])
    with pytest.raises(UserError, match=r"dp \* cp != WORLD_SIZE"):
        launch.main(["--dry-run", "--validate", "finetune", "longlora_tiny_cpu", "--world-size", "4",
                     f"--hf.path={tmp_path / 'hf'}"])
    with pytest.raises(UserError, match="checks train and finetune"):
        launch.main(["--dry-run", "--validate", "eval", "runs/x", "--world-size", "2"])


# CPU recipes whose header command no journey test runs (tests/test_journeys.py runs demo, bam_seed_tiny_cpu,
# tnl_tiny_cpu, moe_tiny_cpu and longlora_tiny_cpu exactly as their headers launch them)
STEP_RECIPES = ["bam_tiny_cpu", "moh_tiny_cpu", "sinklora_tiny_cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", STEP_RECIPES)
def test_cpu_recipe_header_command_runs_a_step(recipe, tmp_path):
    """The recipe's first header command, as written, trains one step on 2 CPU processes."""
    words = next(w for name, w in HEADERS if name == recipe)
    assert words[:2] == ["longreach", "launch"]
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1", LONGREACH_CACHE=str(tmp_path / "cache"))
    if "--hf.path=runs/pre/hf" in words:  # the HF folder the header names: a tiny Llama with a tokenizer
        from transformers import LlamaForCausalLM

        from longreach.data.synthetic import FILLER
        from longreach.data.tokenizer import train_tokenizer
        from longreach.hf.convert import save_tokenizer
        from workers.hf import tiny_llama_config

        train_tokenizer([FILLER, "The pass key is 12345. Remember it."] * 40, 300, tmp_path / "sp.model")
        LlamaForCausalLM(tiny_llama_config(vocab_size=300, max_position_embeddings=256)).save_pretrained(
            tmp_path / "runs/pre/hf")
        save_tokenizer(tmp_path / "sp.model", tmp_path / "runs/pre/hf")
    extra = ["--run.steps=1", "--run.save_every=0", "--run.out_dir=out"]
    out = subprocess.run([str(Path(PY).with_name("longreach")), *words[1:], *extra], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and math.isfinite(rows[0]["loss"])
