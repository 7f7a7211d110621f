"""``longreach launch``: start a job through torchrun, Slurm, DeepSpeed or accelerate.

    longreach launch configs/demo.yaml --nproc-per-node 2                      # one node, torchrun
    longreach launch --nproc 2 finetune longlora_tiny_cpu --hf.path=runs/tiny/hf   # any command …
    longreach launch --nproc 2 eval runs/demo --strategy ring --passkey-lengths 512  # … with its arguments
    longreach launch CONFIG --nnodes 4 --nproc-per-node 8 --rdzv-endpoint n0:29500 --max-restarts 3
    longreach launch CONFIG --launcher slurm --nnodes 4 --gpus-per-node 8 --output job.sbatch
    longreach launch CONFIG --launcher deepspeed --hostfile hosts.txt
    longreach launch CONFIG --launcher accelerate --nproc-per-node 2 --output accelerate.yaml
    longreach launch CONFIG --dry-run ...                                      # print, run nothing
    longreach launch --dry-run --validate CONFIG --world-size 64               # meta-device check

Commands are argument lists handed to ``subprocess`` (no shell); ``--dry-run`` prints them with
:func:`shlex.join` for display. The config and overrides are loaded (strictly) before anything is
started or written, so a typo fails here with one line, not on 64 ranks.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from longreach.errors import UserError
from longreach.launchers.accelerate_launcher import accelerate_command, accelerate_config
from longreach.launchers.cli import split_overrides
from longreach.launchers.deepspeed_launcher import deepspeed_command
from longreach.launchers.slurm import SlurmSpec, sbatch_script
from longreach.launchers.torchrun import TorchrunSpec, torchrun_command, train_args

__all__ = ["main", "build_plan", "split_command"]

# commands every launcher mode can start on each rank ("bench" takes its benchmark name next)
LAUNCHABLE = ("train", "finetune", "eval", "generate", "export", "upcycle", "bench", "report", "plan")
_CONFIG_COMMANDS = ("train", "finetune")  # CONFIG + --section.key=value overrides, loaded strictly here

_DEFAULT_PORT = 29500


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longreach launch", allow_abbrev=False,
                                usage="longreach launch [launcher options] [COMMAND] CONFIG_OR_SOURCE [args …]",
                                description="start a longreach job (torchrun single/multi-node, Slurm, DeepSpeed, "
                                "accelerate) running any command: " + ", ".join(LAUNCHABLE) + " (default train)",
                                epilog="train/finetune: any --section.key=value after CONFIG overrides the config; "
                                       "other commands receive their arguments unchanged "
                                       "(e.g. longreach launch --nproc-per-node 2 eval runs/x --strategy ring "
                                       "--ppl-lengths 512 --tokens val.npy)")
    p.add_argument("--launcher", choices=("torchrun", "slurm", "deepspeed", "accelerate"), default="torchrun")
    p.add_argument("--command", default=None, choices=LAUNCHABLE,
                   help="the longreach command each rank runs (default train; or name it before CONFIG)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--nproc-per-node", "--nproc", type=int, default=1, help="ranks per node (default 1)")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (static); default: rendezvous")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous (multi-node)")
    p.add_argument("--rdzv-id", default="longreach", help="rendezvous id shared by the job's nodes")
    p.add_argument("--max-restarts", type=int, default=0, help="restart the job this often when a rank dies")
    p.add_argument("--log-ranks", default="0", help="local ranks whose output is shown ('all' for every rank)")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile ('host slots=N' lines)")
    p.add_argument("--master-addr", default=None, help="DeepSpeed/accelerate: address of the first node")
    p.add_argument("--master-port", type=int, default=None,
                   help="port on the first node (torchrun single node: default a free port; DeepSpeed/accelerate: "
                        "default 29500)")
    p.add_argument("--rdzv-timeout", type=int, default=300,
                   help="seconds a multi-node torchrun rendezvous waits for every node before failing (default 300)")
    p.add_argument("--output", default=None, help="where to write the Slurm script / accelerate config")
    p.add_argument("--job-name", default="longreach", help="Slurm job name")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--account", default=None, help="Slurm account")
    p.add_argument("--time", default="24:00:00", help="Slurm time limit [D-]HH:MM:SS")
    p.add_argument("--gpus-per-node", type=int, default=0, help="Slurm GPUs per node (= ranks per node)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="Slurm CPU cores per node task")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"), help="accelerate config")
    p.add_argument("--dry-run", action="store_true", help="print the commands/files, start nothing")
    p.add_argument("--validate", action="store_true",
                   help="with --dry-run: build mesh and model on the meta device for --world-size ranks")
    p.add_argument("--world-size", type=int, default=None, help="ranks to validate for (--validate)")
    p.add_argument("--hardware", default="h100_sxm",
                   help="device profile --validate checks memory against (h100_sxm, h200, a100_80g, cpu_gloo)")
    return p


def build_plan(args: argparse.Namespace, overrides: list[str]) -> tuple[list[list[str]], dict[str, str]]:
    """The commands to run and the files to write (path -> text) for ``args``; runs nothing."""
    program = getattr(args, "program", None) or train_args(str(args.config), overrides, args.command or "train")
    files: dict[str, str] = {}
    if args.launcher == "torchrun":
        spec = TorchrunSpec(nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, node_rank=args.node_rank,
                            rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                            max_restarts=args.max_restarts, log_ranks=None if args.log_ranks == "all" else args.log_ranks,
                            master_port=args.master_port, rdzv_timeout_s=args.rdzv_timeout)
        return [torchrun_command(spec, program)], files
    if args.launcher == "slurm":
        spec = SlurmSpec(job_name=args.job_name, nodes=args.nnodes, gpus_per_node=args.gpus_per_node,
                         procs_per_node=args.nproc_per_node, cpus_per_task=args.cpus_per_task, time=args.time,
                         partition=args.partition, account=args.account, max_restarts=max(args.max_restarts, 0),
                         port=args.master_port or _DEFAULT_PORT)
        out = args.output or f"{args.job_name}.sbatch"
        files[out] = sbatch_script(spec, program, python=sys.executable)
        return [["sbatch", out]], files
    if args.launcher == "deepspeed":
        if args.nnodes > 1 and not args.hostfile:
            raise UserError("--launcher deepspeed with --nnodes > 1 needs --hostfile")
        return [deepspeed_command(program, hostfile=args.hostfile, num_nodes=args.nnodes if args.hostfile else None,
                                  num_gpus=args.nproc_per_node if not args.hostfile else None,
                                  master_addr=args.master_addr, master_port=args.master_port or _DEFAULT_PORT)], files
    if args.nnodes > 1 and not args.master_addr:
        raise UserError("--launcher accelerate with --nnodes > 1 needs --master-addr")
    conf = accelerate_config(num_machines=args.nnodes, num_processes=args.nnodes * args.nproc_per_node,
                             machine_rank=args.node_rank or 0, main_process_ip=args.master_addr,
                             main_process_port=args.master_port or _DEFAULT_PORT,
                             mixed_precision=args.mixed_precision)
    out = args.output or "accelerate_config.yaml"
    files[out] = yaml.safe_dump(conf, sort_keys=True)
    return [accelerate_command(program, config_file=out)], files


def split_command(rest: list[str], default: str | None) -> tuple[list[str], list[str]]:
    """``rest`` (what follows the launcher options) → (command words, its arguments).

    ``["finetune", "cfg", "--hf.path=x"]`` → (["finetune"], ["cfg", "--hf.path=x"]); ``["bench", "cp", …]``
    → (["bench", "cp"], […]); without a command word, ``default`` (train) runs.
    """
    if rest and rest[0] in LAUNCHABLE:
        if default is not None and default != rest[0]:
            raise UserError(f"--command {default} and the command word {rest[0]!r} disagree; give one")
        if rest[0] == "bench":
            if len(rest) < 2 or rest[1].startswith("-"):
                raise UserError("longreach launch bench: name the benchmark (cp, kernels, sweep)")
            return rest[:2], rest[2:]
        return rest[:1], rest[1:]
    return [default or "train"], rest


def main(argv: list[str]) -> int:
    """Entry point of ``longreach launch``; returns the launched command's exit status."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    words, cmd_args = split_command(rest, args.command)
    args.command = words[0]
    if args.validate:
        if not args.dry_run:
            raise UserError("--validate is a dry run: add --dry-run")
        if args.world_size is None:
            raise UserError("--validate needs --world-size N")
        if args.command not in _CONFIG_COMMANDS:
            raise UserError(f"--validate checks train and finetune configs, not '{args.command}'")
    if args.command in _CONFIG_COMMANDS and (not cmd_args or cmd_args[0].startswith("-")):
        raise UserError(f"longreach launch {args.command}: a CONFIG is required")
    for name in ("nnodes", "nproc_per_node", "max_restarts"):
        v = getattr(args, name)
        if v < (0 if name == "max_restarts" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be >= {0 if name == 'max_restarts' else 1}, got {v}")

    overrides: list[str] = []
    if args.command in _CONFIG_COMMANDS:
        from longreach.configio import load_config, resolve_config_path

        overrides = split_overrides(cmd_args[1:], "longreach launch")
        config_path = resolve_config_path(cmd_args[0])
        args.config = str(config_path)
        if args.validate:
            # one validator for train and finetune configs (it recognises an HF recipe by its hf section)
            from longreach.launchers.dryrun import validate_config

            report = validate_config(str(config_path), args.world_size, overrides, hardware=args.hardware)
            print("\n".join(report.lines()))
            if not report.fits:
                raise UserError(f"{args.config}: the estimated memory per rank does not fit {args.hardware} "
                                "(breakdown above); shard the states (engine.options.fsdp / engine.options.zero_stage=3), "
                                "raise parallel.cp, or set model.sequence_tile / model.checkpoint_offload / "
                                "engine.options.cpu_offload")
            return 0
        if args.command == "finetune":
            from longreach.hf.config import FinetuneConfig as config_cls
        else:
            from longreach.job import JobConfig as config_cls
        # strict load now: a typo fails here, before any process starts
        load_config(config_cls, config_path, overrides)
        args.program = train_args(str(config_path), overrides, args.command)
    else:
        args.config = cmd_args[0] if cmd_args else None
        args.program = ["-m", "longreach.launchers.cli", *words, *cmd_args]
    commands, files = build_plan(args, overrides)
    env = dict(os.environ, PYTHONSAFEPATH="1")
    if args.dry_run:
        for path, text in files.items():
            print(f"# --- would write {path} ---")
            print(text.rstrip("\n"))
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    for path, text in files.items():
        p = Path(path)
        if p.exists() and p.read_text() != text:
            raise UserError(f"--output {p} exists with different contents; remove it or pick another path")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        print(f"wrote {p}", file=sys.stderr)
    if args.launcher == "torchrun" and args.master_port is not None and args.nnodes == 1:
        _check_port_free(args.master_port)
    for cmd in commands:
        if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
            raise UserError(f"{cmd[0]} not found on PATH (the {args.launcher} launcher needs it)")
        print(shlex.join(cmd), file=sys.stderr)
        if cmd[1:3] == ["-m", "torch.distributed.run"]:  # the same agent, ending with one line per signal/failure
            cmd = [cmd[0], "-m", "longreach.launchers.torchrun", *cmd[3:]]
        rc = _run_forwarding_signals(cmd, env)
        if rc != 0:
            return rc
    return 0


def _check_port_free(port: int) -> None:
    """A single-node torchrun store port taken by another program fails here with one line."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise UserError(f"--master-port {port} is in use by another program ({e.strerror}); pick another port "
                            "or leave --master-port out to use a free one") from None


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd``; SIGTERM sent to this launcher is passed on, SIGINT (Ctrl-C reaches the whole terminal
    process group, the child included) is not sent twice; the child's exit status is returned."""
    import signal

    proc = subprocess.Popen(cmd, env=env)

    def forward(signum: int, frame: object) -> None:
        if signum == signal.SIGTERM and proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
