"""Spawn N gloo ranks on this machine and collect what each returns (tests and benchmarks).

Code that spawned ranks run lives in importable modules, never in test files themselves: the tests'
rank workers in ``tests/workers`` (imported as ``workers.*``), the benchmarks' in
``longreach.bench.*_ranks``. The parent holds the rendezvous store on a port the OS picks (never a fixed
port) and hands it to the children, so there is no port race. A rank that raises sends its traceback back; the parent
then stops the other ranks instead of letting them hang in a collective.

    from longreach.testing import run_ranks
    results = run_ranks(my_module.worker, world_size=4, args=(cfg,))   # worker(rank, world_size, *args)
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        # The fork server imports torch once; each rank then forks from it cheaply and safely
        # (no OpenMP pool has been started in the server).
        ctx.set_forkserver_preload(["torch", "torch.distributed", "longreach.testing"])
        _CTX = ctx
    return _CTX


class RankError(RuntimeError):
    """A spawned rank failed; the message holds its traceback."""


def _rank_main(fn, rank, world_size, port, args, kwargs, results, threads, env) -> None:
    os.environ.update(env)
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
         "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    code = 0
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False, timeout=timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=120))
        out = fn(rank, world_size, *args, **kwargs)
        # Plain pickle stores tensors by value. The queue's own pickler would send them as shared
        # memory handles, which die with this process when it leaves through os._exit.
        results.put((rank, "ok", pickle.dumps(out)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, "error", traceback.format_exc()))
        code = 1
    results.close()
    results.join_thread()  # the queue's feeder thread must flush before os._exit
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo ranks sometimes abort in static destructors at exit: leave without running them
    os._exit(code)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout: float = 300.0,
    threads: int = 1,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    ``fn`` must be importable (a module-level function). Returns the per-rank results in rank
    order. Raises :class:`RankError` with the failing rank's traceback, or on timeout.
    """
    import torch.distributed as dist

    ctx = _context()
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))
    port = store.port
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, kwargs or {}, results, threads, env or {}),
                    daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RankError(
                    f"ranks timed out after {timeout:.0f}s; finished: {sorted(got)} of {world_size}"
                )
            try:
                rank, status, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got]
                if dead and not errors:
                    # a rank died without reporting (killed, segfault): give the queue a moment, then fail
                    try:
                        rank, status, payload = results.get(timeout=2.0)
                    except queue.Empty:
                        raise RankError(f"rank(s) {dead} exited with codes "
                                        f"{[procs[r].exitcode for r in dead]} without reporting") from None
                else:
                    continue
            if status == "ok":
                got[rank] = pickle.loads(payload)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                # collect the other ranks' reports briefly: the root cause is often another rank's
                grace = time.monotonic() + 3.0
                while len(got) + len(errors) < world_size and time.monotonic() < grace:
                    try:
                        rank, status, payload = results.get(timeout=0.5)
                    except queue.Empty:
                        continue
                    if status != "ok":
                        errors.append(f"--- rank {rank} ---\n{payload}")
                break
        if errors:
            raise RankError("a spawned rank failed:\n" + "\n".join(errors))
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        del store
    return [got[r] for r in range(world_size)]
