"""The ``longreach`` command line: one entry point, subcommands imported lazily.

``longreach <cmd> …`` imports the module named in :data:`COMMANDS` only when that command runs (so
``longreach --help`` starts in well under a second and a missing optional part only breaks its own
command) and calls its ``main(argv) -> int``. A :class:`~longreach.errors.UserError` becomes one line
``longreach: error: …`` on stderr and exit status 2; Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from longreach import __version__
from longreach.configio import load_config, resolve_config_path, to_dict
from longreach.errors import JobError, UserError

# command -> ("module:function", one-line help). "bench" has its own sub-commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("longreach.launchers.cli:train_main", "train a model from a YAML config (+ --section.key=value overrides)"),
    "demo": ("longreach.launchers.cli:demo_main", "run configs/demo.yaml on 2 CPU processes with torchrun into runs/demo/"),
    "finetune": ("longreach.hf.cli:finetune_main", "fine-tune a HuggingFace model to a longer context (LoRA / full)"),
    "eval": ("longreach.evaluation.cli:main", "evaluate a checkpoint: perplexity, passkey retrieval, long-context tasks"),
    "export": ("longreach.export:main", "export a run / checkpoint to an HF folder or model.safetensors + config.yaml"),
    "generate": ("longreach.generate:main", "greedy text generation from a run, checkpoint, export or HF folder"),
    "upcycle": ("longreach.mixtures.upcycle:main", "turn a dense checkpoint into a mixture (MoE / MoH) checkpoint"),
    "launch": ("longreach.launchers.launch:main", "start a job: torchrun single/multi-node, Slurm, DeepSpeed, accelerate"),
    "report": ("longreach.bench.report:main", "turn benchmark results into tables and plots"),
    "plan": ("longreach.planning.plan:main", "plan parallel degrees and memory for a model and sequence length"),
    "study": ("longreach.studies.runner:main", "run an evidence study (published effect vs ours) into runs/study-NAME"),
}
BENCH: dict[str, tuple[str, str]] = {
    "cp": ("longreach.bench.cp:main", "context-parallel strategies: communication, work balance, time"),
    "kernels": ("longreach.bench.kernels:main", "local attention kernels and masks: FLOPs skipped, time"),
    "mixtures": ("longreach.bench.mixtures:main", "MoE / MoH / SQA / BAM MoA layers vs dense of equal active size"),
    "gpu": ("longreach.bench.gpu_check:main", "one-GPU check: gpu tests, 1B Llama tokens/s and MFU, mask kernels (--dry: CPU)"),
    "sweep": ("longreach.bench.sweep:main", "sweep sequence lengths / configs and record results"),
    "memory": ("longreach.bench.memory:main", "saved bytes per token per layer; peak memory per rank against S"),
}

_EXIT_USER = 2
_EXIT_INTERRUPT = 130


def _top_help() -> str:
    width = max(len(c) for c in (*COMMANDS, *(f"bench {b}" for b in BENCH)))
    lines = ["usage: longreach <command> [options]   (longreach <command> --help for its options)", "",
             "distributed long-context training for PyTorch", "", "commands:"]
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {text}")
    for name, (_, text) in BENCH.items():
        lines.append(f"  {'bench ' + name:<{width}}  {text}")
    return "\n".join(lines) + "\n"


def _bench_help() -> str:
    lines = ["usage: longreach bench {" + ",".join(BENCH) + "} [options]", "", "benchmarks:"]
    for name, (_, text) in BENCH.items():
        lines.append(f"  {name:<8}  {text}")
    return "\n".join(lines) + "\n"


def _resolve(target: str, command: str) -> Callable[[list[str]], int]:
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # only "the command's own module is absent" is a user-facing message; other import errors are bugs
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UserError(f"'longreach {command}' is not available in this installation "
                            f"({module_name} is not part of this installation)") from None
        raise
    func = getattr(module, func_name, None)
    if func is None:
        raise UserError(f"'longreach {command}' is not available in this installation "
                        f"({module_name} has no {func_name})")
    return func


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_top_help())
        return 0 if argv else _EXIT_USER
    if argv[0] == "--version":
        print(f"longreach {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        if not rest or rest[0] in ("-h", "--help"):
            sys.stdout.write(_bench_help())
            return 0 if rest else _EXIT_USER
        sub = rest[0]
        if sub not in BENCH:
            raise UserError(f"unknown benchmark {sub!r}; choose one of {', '.join(BENCH)}")
        return int(_resolve(BENCH[sub][0], f"bench {sub}")(rest[1:]) or 0)
    if cmd not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(cmd, [*COMMANDS, "bench"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; commands: {', '.join([*COMMANDS, 'bench'])}"
        raise UserError(f"unknown command {cmd!r}{hint}")
    return int(_resolve(COMMANDS[cmd][0], cmd)(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``longreach`` script.

    Args:
        argv: arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a user error, 130 on Ctrl-C.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except UserError as exc:
        sys.stderr.write(f"longreach: error: {exc}\n")
        return _EXIT_USER
    except JobError as exc:
        if _stop_signal() is not None:  # a peer stopped by the same signal broke our collective
            return _interrupted(_stop_signal())
        sys.stderr.write(f"longreach: error: {exc}\n")
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGINT through longreach.faults.Interrupted
        return _interrupted(getattr(exc, "signum", _EXIT_INTERRUPT - 128))
    except Exception:
        try:
            signum = _stop_signal(grace_s=2.0)
        except KeyboardInterrupt as exc:  # the stop signal arrived during the grace period
            signum = getattr(exc, "signum", _EXIT_INTERRUPT - 128)
        if signum is not None:
            return _interrupted(signum)
        raise


def _stop_signal(grace_s: float = 0.0) -> int | None:
    """The SIGINT/SIGTERM this rank received, if its handlers are installed (``longreach.faults``).

    With ``grace_s`` (a failure under torchrun), wait that long for one: when the agent stops the ranks one
    after another, a rank blocked in a collective sees its stopped peer's closed connection before its
    own signal arrives.
    """
    faults = sys.modules.get("longreach.faults")  # imported only by commands that install the handlers
    if faults is None:
        return None
    deadline = time.monotonic() + (grace_s if "RANK" in os.environ else 0.0)
    while faults.received_signal() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return faults.received_signal()


def _interrupted(signum: int) -> int:
    who = f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""
    sys.stderr.write(f"longreach: {who}interrupted by {'SIGTERM' if signum == 15 else 'SIGINT'}\n")
    if "RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        # a torchrun worker whose peers are stopping too: the process-group destructors at interpreter exit
        # can wait on a peer that is already gone (until the agent SIGKILLs us), so leave now; the run
        # folder's lock and partial checkpoints were handled by the finally blocks that already ran
        _leave(128 + signum)
    return 128 + signum


def _leave(code: int) -> None:
    """End a torchrun worker now with ``code``: logs and streams flushed, no interpreter teardown. The
    destructors of communication threads at teardown can abort the process ("terminate called without
    an active exception", exit -6) after its command succeeded, and the agent then stops the other ranks
    and fails the job; every command has closed its files and process groups by the time it returns.
    Used after success and on a stop signal; a rank that failed otherwise exits normally, so the agent
    reports the peer whose failure broke it (a SIGKILLed rank) rather than this rank's exit 1."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ------------------------------------------------------------------------------------------ train
def split_overrides(extra: list[str], prog: str) -> list[str]:
    """``--section.key=value`` / ``--section.key value`` items; anything else is a usage error."""
    out: list[str] = []
    i = 0
    while i < len(extra):
        item = extra[i]
        key = item[2:].split("=", 1)[0] if item.startswith("--") else ""
        if not key or "." not in key:
            raise UserError(f"{prog}: unrecognised argument {item!r} (overrides look like --section.key=value)")
        if "=" in item:
            out.append(item)
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out.append(f"{item}={extra[i + 1]}")
            i += 2
        else:
            raise UserError(f"{prog}: override {item!r} has no value (write {item}=VALUE)")
    return out


def train_main(argv: list[str]) -> int:
    """``longreach train CONFIG [--section.key=value …]`` — load the job config and train."""
    parser = argparse.ArgumentParser(
        prog="longreach train",
        description="Train a model from a YAML job config. Any config field can be overridden as "
                    "--section.key=value (e.g. --train.lr=3e-4 --parallel.cp=2). Run it under torchrun "
                    "(or 'longreach launch') for several processes.",
        epilog="CONFIG is a YAML file or the name of a packaged recipe (e.g. 'demo').")
    parser.add_argument("config", help="YAML config file, or a packaged recipe name")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit without training")
    args, extra = parser.parse_known_args(argv)
    overrides = split_overrides(extra, "longreach train")
    from longreach.job import JobConfig

    cfg = load_config(JobConfig, args.config, overrides)
    if args.print_config:
        import yaml

        sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from longreach.faults import exit_with_parent, install_signal_handlers
    from longreach.trainer import train

    install_signal_handlers()  # SIGTERM/SIGINT unwind (lock released) and exit 143/130 with one line
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        exit_with_parent()  # under torchrun: end with the agent, never train unsupervised
    summary = train(cfg)
    if summary and os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: summary.get(k) for k in ("run_dir", "metrics", "checkpoint") if k in summary}))
    return 0


# ------------------------------------------------------------------------------------------- demo
def _read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and "." not in p.name)
    return found[-1] if found else None


def demo_main(argv: list[str]) -> int:
    """``longreach demo`` — the demo recipe on 2 CPU processes through torchrun, into ``runs/demo/``."""
    parser = argparse.ArgumentParser(
        prog="longreach demo",
        description="Train the tiny demo model (configs/demo.yaml) with 2 CPU processes (gloo) through "
                    "torchrun, into runs/demo/, then print where the metrics and checkpoint are.")
    parser.add_argument("--config", default="demo", help="config file or packaged recipe (default: demo)")
    parser.add_argument("--nproc", type=int, default=2, help="processes (default: 2)")
    parser.add_argument("--out-dir", default="runs/demo", help="run folder (default: runs/demo)")
    args, extra = parser.parse_known_args(argv)
    overrides = split_overrides(extra, "longreach demo")
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    from longreach.job import JobConfig

    config = resolve_config_path(args.config)
    out_dir = Path(args.out_dir)
    # a bad config or override stops here with one message, before torchrun starts any process
    load_config(JobConfig, config, [*overrides, f"--run.out_dir={out_dir}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "--local-ranks-filter", "0", "-m", "longreach.launchers.cli", "train", str(config),
           f"--run.out_dir={out_dir}", *overrides]
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print("longreach demo: " + " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(f"longreach: error: the demo run failed (torchrun exit status {proc.returncode}); "
                         "see the messages above\n")
        return proc.returncode if proc.returncode > 0 else 1
    metrics_file = out_dir / "metrics.jsonl"
    rows = [r for r in _read_metrics(metrics_file) if "loss" in r]
    ckpt = _latest_checkpoint(out_dir)
    print(f"metrics:    {metrics_file}")
    print(f"checkpoint: {ckpt if ckpt is not None else '(none written)'}")
    print(f"config:     {out_dir / 'config.yaml'}")
    if rows:
        first, last = rows[0], rows[-1]
        tps = [r["tokens_per_s"] for r in rows[1:] if isinstance(r.get("tokens_per_s"), (int, float))]
        mean_tps = sum(tps) / len(tps) if tps else float("nan")
        print(f"loss:       {first['loss']:.4f} (step {first.get('step')}) -> {last['loss']:.4f} "
              f"(step {last.get('step')})")
        print(f"tokens/s:   {mean_tps:,.0f} (mean over steps after the first, all ranks)")
    else:
        print("no metrics were recorded")
    return 0


if __name__ == "__main__":  # torchrun -m longreach.launchers.cli train …
    status = main()
    if status == 0 and "RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        _leave(status)  # a failing rank keeps the teardown: the agent must see its peer's failure first
    sys.exit(status)
