"""accelerate: a config file (``accelerate launch --config_file``) and the launch command."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__all__ = ["accelerate_config", "accelerate_command"]


def accelerate_config(*, num_machines: int = 1, num_processes: int = 1, machine_rank: int = 0,
                      main_process_ip: str | None = None, main_process_port: int = 29500,
                      mixed_precision: str = "no", cpu: bool | None = None) -> dict[str, Any]:
    """The accelerate YAML config as a dict (``num_processes`` counts all ranks of all machines)."""
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    conf: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": ("MULTI_CPU" if cpu else "MULTI_GPU") if num_processes > 1 else "NO",
        "num_machines": num_machines, "num_processes": num_processes, "machine_rank": machine_rank,
        "mixed_precision": mixed_precision, "use_cpu": bool(cpu), "rdzv_backend": "static",
        "same_network": True, "main_training_function": "main", "downcast_bf16": "no",
    }
    if num_machines > 1:
        conf["main_process_ip"] = main_process_ip
        conf["main_process_port"] = main_process_port
    return conf


def accelerate_command(program: list[str], *, config_file: str | Path, python: str = sys.executable) -> list[str]:
    """``python -m accelerate.commands.launch --config_file F …`` running ``program``."""
    cmd = [python, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    if program and program[0] == "-m":
        cmd += ["-m", *program[1:]]
    else:
        cmd += list(program)
    return cmd
