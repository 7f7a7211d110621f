"""torchrun command lines: single node (``--standalone``) and multi-node (c10d rendezvous).

Commands are argument lists; :func:`shlex.join` is for display only. User values are never pasted
into a shell string.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from longreach.errors import ConfigError

__all__ = ["TorchrunSpec", "torchrun_command", "train_args"]


def train_args(config: str, overrides: list[str] | tuple[str, ...] = (), command: str = "train") -> list[str]:
    """The per-rank program: ``-m longreach.launchers.cli <command> CONFIG [overrides]``."""
    return ["-m", "longreach.launchers.cli", command, config, *overrides]


@dataclass(kw_only=True, slots=True)
class TorchrunSpec:
    nnodes: int = 1
    """Number of nodes (1: single node, standalone rendezvous)."""
    nproc_per_node: int = 1
    """Ranks per node (GPUs per node; CPU processes on a CPU host)."""
    node_rank: int | None = None
    """This node's rank (static assignment); None lets the c10d rendezvous assign it."""
    rdzv_endpoint: str | None = None
    """host:port of the c10d rendezvous (multi-node; the first node)."""
    rdzv_id: str = "longreach"
    """Rendezvous id shared by all nodes of one job (e.g. the Slurm job id)."""
    max_restarts: int = 0
    """Restart the whole job this many times when a rank dies (it resumes from the last checkpoint)."""
    log_ranks: str | None = "0"
    """``--local-ranks-filter``: which local ranks' output is shown (None: all)."""
    python: str = field(default_factory=lambda: sys.executable)
    """Python interpreter running ``torch.distributed.run``."""

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be >= 1, got {self.nnodes}")
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1:
            if not self.rdzv_endpoint:
                raise ConfigError("multi-node launch (--nnodes > 1) needs --rdzv-endpoint HOST:PORT (the first node)")
            host, sep, port = self.rdzv_endpoint.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"--rdzv-endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def torchrun_command(spec: TorchrunSpec, program: list[str]) -> list[str]:
    """``python -m torch.distributed.run …`` running ``program`` (``-m module args`` or ``script args``).

    Args:
        spec: nodes, ranks per node, rendezvous, restarts.
        program: what each rank runs (e.g. :func:`train_args`).
    Returns:
        The argument list.
    """
    cmd = [spec.python, "-m", "torch.distributed.run", "--nnodes", str(spec.nnodes),
           "--nproc-per-node", str(spec.nproc_per_node), "--max-restarts", str(spec.max_restarts)]
    if spec.nnodes == 1 and not spec.rdzv_endpoint:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(spec.rdzv_endpoint), "--rdzv-id", spec.rdzv_id]
        if spec.node_rank is not None:
            cmd += ["--node-rank", str(spec.node_rank)]
    if spec.log_ranks is not None:
        cmd += ["--local-ranks-filter", spec.log_ranks]
    if program and program[0] == "-m":
        cmd += ["--module", *program[1:]]
    else:
        cmd += list(program)
    return cmd
