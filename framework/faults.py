"""Faults: non-finite losses, hung collectives, and fault injection for the restart tests.

* :func:`check_finite` — every rank learns at once whether *any* rank's loss is NaN/inf (one MIN
  all-reduce of a flag), so all ranks skip the same step or stop together; no rank is left alone in
  the next collective.
* :class:`FaultPolicy` — what the trainer calls once per step (``longreach.trainer.train_step``, after
  the last micro-batch's forward): returns True to apply the step, False to skip it (``on_nonfinite:
  skip``, up to ``max_skips`` in a row), or raises :class:`NonFiniteLossError` with a clear message
  (``on_nonfinite: stop``; a :class:`~longreach.errors.UserError`, so the CLI prints one line).
* :func:`timed_collective` / :class:`CollectiveWatchdog` — a collective that does not finish within
  ``collective_timeout_s`` fails with :class:`CollectiveTimeoutError` naming the rank and the
  operation; the watchdog thread is the backstop for a wait that cannot be interrupted (it reports
  the rank and operation, dumps stacks, and exits the process so torchrun can restart the job).
* :class:`RunFolderLock` — one job per run folder: rank 0 holds ``<run>/.longreach.lock`` (host, pid,
  process start time); a second job gets one line naming the holder; a lock whose process is gone
  (same host: pid dead, or reused by another process) is stale and taken over with a warning.
* :func:`exit_with_parent` — a worker ends when its launcher (the torchrun agent) dies, even by
  SIGKILL: a thread notices the parent changing and sends SIGTERM.
* :func:`install_signal_handlers` — SIGTERM/SIGINT become :class:`Interrupted` (exit 143/130 with one
  line per rank from the CLI), so ``finally`` blocks (lock release, pending checkpoint) run.
* Fault injection for tests: the environment variable ``LONGREACH_FAULT_INJECT`` (or
  ``FaultConfig.inject``) holds ``kind@step=N[,rank=R]`` items separated by ``;``. Kinds: ``kill``
  (SIGKILL this rank at the start of step N), ``kill_in_save`` (SIGKILL while the checkpoint of step N
  is half written), ``nan`` (treat step N's loss as NaN), ``hang`` (sleep in step N). Injection only
  fires on the first attempt of a torchrun job (``TORCHELASTIC_RESTART_COUNT`` 0), so a restarted
  job runs clean.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from longreach.errors import ConfigError, JobError, UserError
from longreach.procs import pid_alive

__all__ = [
    "FaultConfig", "FaultPolicy", "NonFiniteLossError", "CollectiveTimeoutError", "CollectiveWatchdog",
    "check_finite", "timed_collective", "parse_injections", "maybe_inject", "init_distributed", "INJECT_ENV",
    "Interrupted", "RunFolderLock", "exit_with_parent", "install_signal_handlers",
]

log = logging.getLogger(__name__)

INJECT_ENV = "LONGREACH_FAULT_INJECT"
_KINDS = ("kill", "kill_in_save", "nan", "hang")


@dataclass(kw_only=True, slots=True)
class FaultConfig:
    on_nonfinite: str = "skip"
    """What to do when the loss is NaN/inf on any rank: ``skip`` the optimizer step, or ``stop`` the run."""
    max_skips: int = 10
    """With ``skip``: stop after this many consecutive non-finite steps (the run is diverging)."""
    collective_timeout_s: float = 600.0
    """A collective that takes longer fails naming the rank and operation (also the process-group timeout)."""
    watchdog: bool = True
    """Run the watchdog thread that kills a rank stuck in a collective past twice the timeout."""
    inject: str | None = None
    """Fault injection spec for tests (same syntax as the ``LONGREACH_FAULT_INJECT`` variable)."""

    def __post_init__(self) -> None:
        if self.on_nonfinite not in ("skip", "stop"):
            raise ConfigError(f"faults.on_nonfinite must be 'skip' or 'stop', got {self.on_nonfinite!r}")
        if self.max_skips < 1:
            raise ConfigError(f"faults.max_skips must be >= 1, got {self.max_skips}")
        if not self.collective_timeout_s > 0:
            raise ConfigError(f"faults.collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        if self.inject:
            parse_injections(self.inject, source="faults.inject")


class NonFiniteLossError(UserError, RuntimeError):
    """The loss was NaN/inf and the policy says stop (or too many steps in a row were skipped).

    A :class:`UserError`: the CLI prints it as one line and exits non-zero (the message names the step
    and the setting), raised on every rank at once.
    """


class CollectiveTimeoutError(JobError, RuntimeError):
    """A collective did not complete within the configured timeout (the CLI prints it as one line, exit 1)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ------------------------------------------------------------------------------------------------ NaN


def check_finite(loss: torch.Tensor | float, group: Any = None) -> bool:
    """True iff the loss is finite on every rank of ``group`` (one all-reduce; same answer everywhere).

    Args:
        loss: this rank's loss (any shape; a tensor with any non-finite element counts as non-finite).
        group: process group (default WORLD); without torch.distributed just checks locally.
    Returns:
        Whether all ranks' losses are finite.
    """
    if isinstance(loss, torch.Tensor):
        local_ok = bool(torch.isfinite(loss.detach()).all())
        device = loss.device
    else:
        local_ok = math.isfinite(float(loss))
        device = torch.device("cpu")
    if not (dist.is_available() and dist.is_initialized()):
        return local_ok
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    elif dist.get_backend(group) == "gloo":
        device = torch.device("cpu")
    flag = torch.tensor([1.0 if local_ok else 0.0], device=device)  # [1]
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item() > 0.5)


class FaultPolicy:
    """The trainer's NaN/inf policy; call :meth:`check` once per optimizer step, before ``optimizer.step``.

    Args:
        cfg: the ``faults:`` config section.
        group: the group whose ranks share a loss (dp × cp: the whole job; default WORLD).
    """

    def __init__(self, cfg: FaultConfig | None = None, group: Any = None) -> None:
        self.cfg = cfg or FaultConfig()
        self.group = group
        self.skipped: list[int] = []
        self._consecutive = 0
        self._inject = parse_injections(self.cfg.inject or os.environ.get(INJECT_ENV, ""),
                                        source="faults.inject" if self.cfg.inject else INJECT_ENV)

    def check(self, loss: torch.Tensor | float, step: int) -> bool:
        """True: apply this step. False: skip it (zero the grads, do not step). Raises to stop.

        Raises:
            NonFiniteLossError: ``on_nonfinite: stop``, or ``max_skips`` consecutive skips.
        """
        if _should_fire(self._inject, "nan", step):
            loss = torch.tensor(float("nan"))
        if check_finite(loss, self.group):
            self._consecutive = 0
            return True
        self._consecutive += 1
        value = float(loss.detach().float().sum()) if isinstance(loss, torch.Tensor) else float(loss)
        if self.cfg.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (this rank: {value}); stopping because "
                f"faults.on_nonfinite=stop. Lower train.lr, check the data, or set faults.on_nonfinite=skip")
        self.skipped.append(step)
        if self._consecutive >= self.cfg.max_skips:
            raise NonFiniteLossError(
                f"non-finite loss for {self._consecutive} consecutive steps (last: step {step}); the run is "
                f"diverging, stopping (faults.max_skips={self.cfg.max_skips})")
        log.warning("non-finite loss at step %d on some rank (this rank: %s): skipping the optimizer step "
                    "(%d skipped so far)", step, value, len(self.skipped))
        return False

    __call__ = check

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped), "consecutive": self._consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = list(state.get("skipped", []))
        self._consecutive = int(state.get("consecutive", 0))


# ------------------------------------------------------------------------------------------ timeouts


def timed_collective(op: str, fn: Callable[..., Any], *args: Any, timeout_s: float,
                     **kwargs: Any) -> Any:
    """Run ``fn(*args, async_op=True, **kwargs)`` and wait at most ``timeout_s`` for it.

    Args:
        op: a name for the operation used in the error (e.g. ``"all_reduce(grad norm)"``).
        fn: a ``torch.distributed`` collective accepting ``async_op``.
        timeout_s: seconds to wait.
    Returns:
        The work's result (``None`` for in-place collectives).
    Raises:
        CollectiveTimeoutError: naming this rank, the operation and the timeout.
    """
    start = time.monotonic()
    work = fn(*args, async_op=True, **kwargs)
    try:
        ok = work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as e:
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            raise CollectiveTimeoutError(
                f"rank {_rank()}: collective {op} did not complete within {timeout_s:g}s "
                f"(waited {time.monotonic() - start:.1f}s); another rank is probably dead or stuck "
                f"(raise faults.collective_timeout_s if this step is legitimately slow)") from None
        raise
    if ok is False:
        raise CollectiveTimeoutError(f"rank {_rank()}: collective {op} did not complete within {timeout_s:g}s")
    return None


class CollectiveWatchdog:
    """A daemon thread that reports (rank, operation) when a guarded region overruns, then exits.

    Waits inside C++ collectives cannot be interrupted from Python; the watchdog is the backstop: at
    ``timeout_s`` it logs ``rank R: collective OP has not finished after Ts`` and dumps all thread
    stacks to stderr; ``exit_after_s`` later it ends the process with exit code 124 so torchrun's
    restart (``--max-restarts``) brings the job back from the last checkpoint.

        wd = CollectiveWatchdog(timeout_s=600)
        with wd.guard("all_reduce(loss)"):
            dist.all_reduce(t)
    """

    def __init__(self, timeout_s: float, *, exit_after_s: float | None = None,
                 on_timeout: Callable[[str], None] | None = None) -> None:
        self.timeout_s = float(timeout_s)
        self.exit_after_s = self.timeout_s if exit_after_s is None else float(exit_after_s)
        self.on_timeout = on_timeout
        self._lock = threading.Lock()
        self._op: str | None = None
        self._deadline = 0.0
        self._reported = False
        self.reports: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="longreach-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def guard(self, op: str) -> Iterator[None]:
        with self._lock:
            self._op, self._deadline, self._reported = op, time.monotonic() + self.timeout_s, False
        try:
            yield
        finally:
            with self._lock:
                self._op = None

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, max(0.05, self.timeout_s / 10))):
            with self._lock:
                op, deadline, reported = self._op, self._deadline, self._reported
            if op is None:
                continue
            now = time.monotonic()
            if now >= deadline and not reported:
                msg = (f"rank {_rank()}: collective {op} has not finished after {self.timeout_s:g}s "
                       f"(another rank is probably dead or stuck)")
                with self._lock:
                    self._reported = True
                self.reports.append(msg)
                log.error(msg)
                print(f"longreach: error: {msg}", file=sys.stderr, flush=True)
                if self.on_timeout is not None:
                    self.on_timeout(msg)
                else:
                    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            elif reported and self.on_timeout is None and now >= deadline + self.exit_after_s:
                os._exit(124)

    def close(self) -> None:
        self._stop.set()


# ------------------------------------------------------------------------------------- restart-safe init


def init_distributed(backend: str | None = None, *, timeout_s: float = 600.0) -> None:
    """``init_process_group`` from torchrun's environment, safe across ``--max-restarts`` restarts.

    torchrun keeps one rendezvous store for the whole job, and the default ``env://`` init reuses it
    without an attempt prefix: after a restart gloo can read the *dead* attempt's rank addresses and
    fail (``connectFullMesh failed … Connection refused``) or hang connecting to a recycled port. We
    namespace the process group's keys by ``TORCHELASTIC_RESTART_COUNT``. ``timeout_s`` is the process
    group's collective timeout (a hung collective then fails instead of waiting forever).

    Args:
        backend: ``gloo``/``nccl``; default nccl with CUDA, else gloo.
        timeout_s: collective timeout in seconds.
    """
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UserError(f"distributed launch: environment variable(s) {', '.join(missing)} not set; start "
                        "several processes with torchrun or `longreach launch`")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, world_size=world, is_master=(not agent_store and rank == 0),
                          timeout=timedelta(seconds=max(60.0, timeout_s)), wait_for_workers=False)
    store = dist.PrefixStore(f"longreach/attempt-{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


# ----------------------------------------------------------------------------------------- injection


@dataclass(frozen=True, slots=True)
class Injection:
    kind: str
    step: int
    rank: int | None = None
    seconds: float = 3600.0


def parse_injections(spec: str, *, source: str = INJECT_ENV) -> list[Injection]:
    """Parse ``kind@step=N[,rank=R][,seconds=S]`` items separated by ``;``.

    Raises:
        ConfigError: naming ``source`` and the bad item.
    """
    out: list[Injection] = []
    for item in filter(None, (s.strip() for s in (spec or "").split(";"))):
        kind, _, rest = item.partition("@")
        kind = kind.strip()
        if kind not in _KINDS:
            raise ConfigError(f"{source}: unknown fault kind {kind!r} in {item!r} (one of {', '.join(_KINDS)})")
        fields: dict[str, str] = {}
        for kv in filter(None, rest.split(",")):
            k, eq, v = kv.partition("=")
            if not eq or k.strip() not in ("step", "rank", "seconds"):
                raise ConfigError(f"{source}: bad field {kv!r} in {item!r} (expected step=N, rank=R, seconds=S)")
            fields[k.strip()] = v.strip()
        try:
            out.append(Injection(kind=kind, step=int(fields["step"]),
                                 rank=int(fields["rank"]) if "rank" in fields else None,
                                 seconds=float(fields.get("seconds", 3600.0))))
        except (KeyError, ValueError):
            raise ConfigError(f"{source}: {item!r} needs an integer step=N (and integer rank=R)") from None
    return out


def _first_attempt() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0


def _should_fire(injections: list[Injection], kind: str, step: int) -> bool:
    if not injections or not _first_attempt():
        return False
    r = _rank()
    return any(i.kind == kind and i.step == step and (i.rank is None or i.rank == r) for i in injections)


_ENV_CACHE: tuple[str, list[Injection]] | None = None


def maybe_inject(kind: str, step: int, spec: str | None = None) -> None:
    """Fire an injected fault of ``kind`` at ``step`` if the spec (default: the env var) asks for it.

    ``kill``/``kill_in_save`` send SIGKILL to this process (no cleanup, like a node dying); ``hang``
    sleeps. ``nan`` is handled by :class:`FaultPolicy`.
    """
    global _ENV_CACHE
    if spec is None:
        raw = os.environ.get(INJECT_ENV, "")
        if not raw:
            return
        if _ENV_CACHE is None or _ENV_CACHE[0] != raw:
            _ENV_CACHE = (raw, parse_injections(raw))
        injections = _ENV_CACHE[1]
    else:
        injections = parse_injections(spec, source="faults.inject")
    if not _should_fire(injections, kind, step):
        return
    if kind in ("kill", "kill_in_save"):
        log.error("fault injection: SIGKILL rank %d at step %d (%s)", _rank(), step, kind)
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        secs = next(i.seconds for i in injections if i.kind == "hang" and i.step == step)
        log.error("fault injection: rank %d hangs for %gs at step %d", _rank(), secs, step)
        time.sleep(secs)


# ------------------------------------------------------------------------------------ run-folder lock


def _proc_start(pid: int) -> str | None:
    """A stable identity of process ``pid``: boot id + start time in ticks (None if it does not exist)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22: starttime


class RunFolderLock:
    """``<run_dir>/.longreach.lock``, created exclusively by rank 0 of the job training in ``run_dir``.

    Args:
        run_dir: the run folder (created if missing).

    Raises (from :meth:`acquire`):
        UserError: another live job holds the lock (the message names host, pid and start time).
    """

    NAME = ".longreach.lock"

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / self.NAME
        self.held = False
        self._me = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                    "started": datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[:8]}

    def _holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a process killed while creating it
        return data if isinstance(data, dict) else {}

    def _stale(self, holder: dict[str, Any]) -> bool:
        if not holder:
            return True
        if holder.get("host") != self._me["host"]:
            return False  # another machine's process: cannot be checked from here
        pid = int(holder.get("pid", -1))
        if pid <= 0 or not pid_alive(pid):
            return True
        start = _proc_start(pid)
        return holder.get("proc_start") is not None and start is not None and start != holder["proc_start"]

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                if not self._stale(holder):
                    raise UserError(
                        f"run folder {self.path.parent} is in use by another job: pid {holder.get('pid')} on host "
                        f"{holder.get('host')} since {holder.get('started')} (lock {self.path}; delete it only if "
                        "that job is gone)") from None
                log.warning("taking over the stale lock %s of pid %s on %s (started %s), which is no longer running",
                            self.path, holder.get("pid"), holder.get("host"), holder.get("started"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self._me))
            self.held = True
            return
        raise UserError(f"run folder {self.path.parent}: could not take the lock {self.path} (another job raced "
                        "for it); try again")

    def release(self) -> None:
        """Remove the lock if this process holds it (idempotent)."""
        if self.held and (self._holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


# ----------------------------------------------------------------------------------- signals, parent death


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived: unwinds like Ctrl-C (``finally`` blocks run); the CLI exits 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_RECEIVED: list[int] = []  # the stop signal this process received (set by the handler below)


def received_signal() -> int | None:
    """The SIGINT/SIGTERM this process received, if any.

    A signal that arrives while the main thread waits inside a collective is handled only when the call
    returns, and a peer that already stopped makes that call fail first: the CLI reports such a failure
    as the interrupt it is, not as the collective's error.
    """
    return _RECEIVED[0] if _RECEIVED else None


def install_signal_handlers() -> None:
    """SIGTERM and SIGINT raise :class:`Interrupted` in the main thread (no-op outside it)."""
    if threading.current_thread() is not threading.main_thread():
        return

    first: list[float] = []

    def handler(signum: int, _frame: Any) -> None:
        if first:
            if time.monotonic() - first[0] < 2.0:
                return  # the same stop delivered twice (terminal + launcher): still unwinding
            signal.signal(signum, signal.SIG_DFL)  # asked again later: end at once
            os.kill(os.getpid(), signum)
            return
        first.append(time.monotonic())
        _RECEIVED.append(signum)
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def exit_with_parent(sig: int = signal.SIGTERM, poll_s: float = 1.0, grace_s: float = 10.0) -> None:
    """End this process with ``sig`` when its parent (the torchrun agent) dies, even by SIGKILL.

    A daemon thread polls the parent pid (the agent's heartbeat, in effect): when the parent is gone
    the process is re-parented and ``getppid`` changes. Linux's ``PR_SET_PDEATHSIG`` is not used: it
    fires when the *thread* that started the child exits, which a launcher's worker threads may do.
    If ``sig``'s handler cannot run within ``grace_s`` (the main thread is stuck in a collective), the
    process exits with status 128 + ``sig``.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        msg = f"rank {_rank()}: the launcher (pid {parent}) is gone; stopping this rank"
        log.error(msg)
        print(f"longreach: error: {msg}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), sig)
        time.sleep(grace_s)
        os._exit(128 + int(sig))

    threading.Thread(target=watch, name="longreach-parent-watch", daemon=True).start()
