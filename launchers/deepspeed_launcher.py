"""DeepSpeed's launcher: a hostfile (``host slots=N`` lines) and the ``deepspeed`` command."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from longreach.errors import ConfigError

__all__ = ["read_hostfile", "deepspeed_command"]

_LINE = re.compile(r"^([A-Za-z0-9_.:-]+)\s+slots=(\d+)\s*$")


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """Parse a DeepSpeed hostfile; errors name the file and line."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"--hostfile {p} does not exist") from None
    except OSError as e:
        raise ConfigError(f"--hostfile {p}: cannot read it ({e.strerror})") from None
    hosts: list[tuple[str, int]] = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m or int(m.group(2)) < 1:
            raise ConfigError(f"--hostfile {p}:{i}: expected 'HOSTNAME slots=N', got {line!r}")
        hosts.append((m.group(1), int(m.group(2))))
    if not hosts:
        raise ConfigError(f"--hostfile {p} lists no hosts")
    return hosts


def deepspeed_command(program: list[str], *, hostfile: str | None = None, num_nodes: int | None = None,
                      num_gpus: int | None = None, master_addr: str | None = None, master_port: int = 29500,
                      python: str = sys.executable) -> list[str]:
    """``python -m deepspeed.launcher.runner …`` (the ``deepspeed`` command) for ``program``."""
    cmd = [python, "-m", "deepspeed.launcher.runner", "--master_port", str(master_port)]
    if hostfile:
        read_hostfile(hostfile)
        cmd += ["--hostfile", str(hostfile)]
    if num_nodes:
        cmd += ["--num_nodes", str(num_nodes)]
    if num_gpus:
        cmd += ["--num_gpus", str(num_gpus)]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    if program and program[0] == "-m":
        cmd += ["--module", *program[1:]]
    else:
        cmd += list(program)
    return cmd
