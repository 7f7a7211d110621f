"""torchrun command lines: single node (``--standalone``) and multi-node (c10d rendezvous).

Commands are argument lists; :func:`shlex.join` is for display only. User values are never pasted
into a shell string.

``python -m longreach.launchers.torchrun …`` takes torchrun's own arguments and runs its agent, but ends
the way a longreach command does: SIGINT/SIGTERM give exit 130/143 and one line (the agent passes the
signal to every rank, each of which prints its own line), a failed or timed-out rendezvous and a failed
rank one line each, never the agent's traceback. ``longreach launch`` starts torchrun through it.
"""
from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from longreach.errors import ConfigError

__all__ = ["TorchrunSpec", "main", "torchrun_command", "train_args"]


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
    master_port: int | None = None
    """Single node: the agent's store port on 127.0.0.1 (None: ``--standalone`` picks a free one)."""
    rdzv_timeout_s: int = 300
    """Multi-node: seconds the c10d rendezvous waits for every node (joining and each store read)."""

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be >= 1, got {self.nnodes}")
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ConfigError(f"--master-port must be in 1..65535, got {self.master_port}")
        if self.rdzv_timeout_s < 1:
            raise ConfigError(f"--rdzv-timeout must be >= 1 second, got {self.rdzv_timeout_s}")
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
    if spec.nnodes == 1 and not spec.rdzv_endpoint and spec.master_port is not None:
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(spec.master_port)]
    elif spec.nnodes == 1 and not spec.rdzv_endpoint:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(spec.rdzv_endpoint), "--rdzv-id", spec.rdzv_id,
                "--rdzv-conf", f"join_timeout={spec.rdzv_timeout_s},read_timeout={spec.rdzv_timeout_s}"]
        if spec.node_rank is not None:
            cmd += ["--node-rank", str(spec.node_rank)]
    if spec.log_ranks is not None:
        cmd += ["--local-ranks-filter", spec.log_ranks]
    if program and program[0] == "-m":
        cmd += ["--module", *program[1:]]
    else:
        cmd += list(program)
    return cmd


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0][:240] if lines else type(e).__name__


def _join_timeout(rdzv_conf: str) -> float:
    for item in (rdzv_conf or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "join_timeout":
            return float(value)
    return 600.0  # torchrun's default


def _bound_rendezvous(endpoint: str, timeout_s: float) -> None:
    """End the agent with one line when a rendezvous round does not finish within ``timeout_s``.

    torchrun's own timeouts do not cover every wait: with the endpoint's port held by a program that is
    not a c10d store, creating the store waits forever. The first round is timed from this call (store
    creation included); later rounds (restarts) from their start. Adapter over
    ``SimpleElasticAgent._rendezvous`` (torch 2.x), the one call every rendezvous round goes through.
    """
    import os
    import threading

    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent

    original = SimpleElasticAgent._rendezvous

    def give_up() -> None:
        sys.stderr.write(f"longreach: error: rendezvous at {endpoint} did not complete within {timeout_s:g}s; check "
                         "that every node was started with the same --rdzv-endpoint and --rdzv-id and that no other "
                         "program holds that port\n")
        sys.stderr.flush()
        os._exit(1)

    def arm() -> threading.Timer:
        timer = threading.Timer(timeout_s, give_up)
        timer.daemon = True
        timer.start()
        return timer

    first = [arm()]  # from now: creating the rendezvous store is part of the wait

    def bounded(self: Any, worker_group: Any) -> Any:
        timer = first.pop() if first else arm()
        try:
            return original(self, worker_group)
        finally:
            timer.cancel()

    SimpleElasticAgent._rendezvous = bounded


def main(argv: list[str] | None = None) -> int:
    """Run torchrun's agent with ``argv`` (torchrun's arguments); returns the exit status.

    Returns:
        0 on success; 128 + signal number when stopped by SIGINT/SIGTERM; 1 when a rank failed or the
        rendezvous failed or timed out (with one ``longreach: error:`` line saying which).
    """
    import torch.distributed.run as tdr
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    args = tdr.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.standalone and args.rdzv_backend == "c10d":
        _bound_rendezvous(args.rdzv_endpoint, _join_timeout(args.rdzv_conf) + 10.0)
    try:
        tdr.run(args)
    except SignalException as e:
        sig = signal.Signals(int(e.sigval))
        sys.stderr.write(f"longreach: torchrun agent stopped by {sig.name}; its ranks were told to stop\n")
        return 128 + int(sig)
    except KeyboardInterrupt:
        sys.stderr.write("longreach: torchrun agent interrupted by SIGINT\n")
        return 130
    except ChildFailedError as e:
        failed = ", ".join(f"rank {r} exit status {f.exitcode}" for r, f in sorted(e.failures.items()))
        sys.stderr.write(f"longreach: error: the job failed ({failed}); see the rank messages above\n")
        return 1
    except RendezvousError as e:
        where = getattr(args, "rdzv_endpoint", "") or "the local rendezvous"
        sys.stderr.write(f"longreach: error: rendezvous at {where} failed ({type(e).__name__}: {_first_line(e)}); "
                         "check that every node uses the same --rdzv-endpoint and --rdzv-id and that the port is "
                         "not taken by another program\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
