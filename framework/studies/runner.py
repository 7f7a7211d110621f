"""``longreach study NAME``: run one evidence study into a resumable run folder.

    longreach study --list
    longreach study NAME [--config PATH] [--out DIR] [--quick] [--threads N] [--workers N] [--force]
                         [--key=value …]

The recipe ``configs/study_NAME.yaml`` (or ``--config``) loads strictly into the study's config
dataclass; ``--key=value`` overrides any of its fields, ``--quick`` first shrinks it to the study's
smallest setting (what the tests run: the config's ``quick()`` when it has one, and ``ctx.quick``). The run folder (default ``runs/study-NAME``) receives:

* ``study-run.json`` — which study, size and config the folder holds (a rerun with another config is
  refused instead of mixing results; ``--force`` starts over);
* ``steps/*.json`` — each finished step (a rerun continues after the last one);
* ``study.md`` (tables, published-vs-ours findings, plots), ``study.json`` and the PNG plots.

``--workers N`` (default: 2, or 1 on a single core) runs a study's independent chains of steps in N
processes of one torch thread each (the extension study's recipes and evaluations; the mixtures study's
arms, one chain per BAM seed); results are the same as with ``--workers 1``, and the CPU time reported
counts the workers.

Progress lines go to stdout. A bad name, config or ``--out`` is one ``longreach: error:`` line and exit
status 2, with nothing in the folder changed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from longreach.errors import UserError
from longreach.studies import MODULES, get_study
from longreach.studies.base import Study, StudyContext, StudyResult, as_json, markdown

__all__ = ["MARKER", "StallMeter", "clock_note", "load_study_config", "main", "prepare_out", "run_study"]

MARKER = "study-run.json"
"""The file that makes a folder a study run folder."""


def _config_api() -> tuple[Any, Any, Any, Any]:
    """(load_config, apply_overrides, resolve_config_path, to_dict) of the strict config loader."""
    from longreach.configio import apply_overrides, load_config, resolve_config_path, to_dict

    return load_config, apply_overrides, resolve_config_path, to_dict


def _study(name: str) -> Study:
    try:
        return get_study(name)
    except ModuleNotFoundError as e:
        if e.name != MODULES[name]:
            raise
        raise UserError(f"study {name!r} is not available in this installation ({e.name} is missing)") from None
    except KeyError:
        raise UserError(f"unknown study {name!r}; choose one of {', '.join(MODULES)} "
                        "(longreach study --list)") from None


def load_study_config(study: Study, config: str | None, overrides: list[str], *, quick: bool) -> Any:
    """The study's config: the recipe (default ``study_NAME``), shrunk by ``quick()`` when asked, then the
    overrides (each ``--field=value``, ``--field value`` or ``--section.field=value``; anything else is a
    ConfigError).

    Raises:
        ConfigError: a missing recipe, an unknown or mistyped key (naming the file or override).
    """
    load_config, apply_overrides, resolve_config_path, _ = _config_api()
    path = resolve_config_path(config or f"study_{study.name}")
    cfg = load_config(study.config, path)
    if quick and callable(getattr(cfg, "quick", None)):  # else the study reads ``ctx.quick`` itself
        cfg = cfg.quick()
    return apply_overrides(cfg, overrides)


def prepare_out(out: Path, marker: dict[str, Any], *, force: bool) -> None:
    """Make ``out`` the run folder of ``marker`` (its study, size and config).

    An empty or missing folder is taken; a study run folder of the same study and config is resumed;
    ``force`` clears a study run folder (and only one). Anything else is refused.

    Raises:
        UserError: ``out`` is a file, a non-empty folder without ``study-run.json``, or (without ``force``)
            the run folder of another study or config.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    entries = list(out.iterdir()) if out.is_dir() else []
    if entries:
        mark = out / MARKER
        if not mark.is_file():
            raise UserError(f"--out {out} is a non-empty folder that is not a study run folder (no {MARKER}); "
                            "choose an empty or new folder")
        try:
            old = json.loads(mark.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{mark} is unreadable ({e}); remove the folder or choose another --out") from None
        if force:
            shutil.rmtree(out)
        elif old != marker:
            what = "study" if old.get("study") != marker["study"] else "config or size (--quick)"
            raise UserError(f"--out {out} holds a run of another {what} ({old.get('study')}); pass --force to "
                            "start it over, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True))
    tmp.replace(out / MARKER)


def run_study(name: str, cfg: Any, out: Path, *, quick: bool = False, force: bool = False, workers: int = 1
              ) -> StudyResult:
    """Run study ``name`` with config ``cfg`` into ``out`` (resuming its finished steps; ``workers`` processes
    for its independent steps) and write the report files ``study.md`` and ``study.json``."""
    study = _study(name)
    _, _, _, to_dict = _config_api()
    marker = {"study": name, "quick": bool(quick), "config": json.loads(json.dumps(to_dict(cfg), default=str))}
    prepare_out(out, marker, force=force)
    ctx = StudyContext(out, quick=quick, workers=workers)
    ctx.log(f"study {name} into {out}" + (" (quick)" if quick else ""))
    start, stalls = _clock(), StallMeter()
    try:
        result = study.run(cfg, ctx)
    finally:
        stalled = stalls.close()
    clock = _elapsed(start, _clock(), workers if ctx.pooled else 1, stalled)
    body = as_json(result)
    body.update(study=name, quick=bool(quick), config=marker["config"], seconds=clock["wall_s"],
                cpu_seconds=clock["cpu_s"], clock=clock, resumed=ctx.resumed)
    (out / "study.json").write_text(json.dumps(body, indent=1, default=float))
    detail = clock_note(clock) + (f"; steps read back from an earlier run: {', '.join(ctx.resumed)}"
                                  if ctx.resumed else "")
    (out / "study.md").write_text(markdown(name, result, clock["wall_s"], detail=detail))
    ctx.log(f"wrote {out / 'study.md'} and study.json ({clock['wall_s']:.0f} s wall, {clock['cpu_s']:.0f} s CPU"
            + (f", {len(ctx.resumed)} steps read back" if ctx.resumed else "") + ")")
    return result


class StallMeter:
    """Wall seconds this process was held still although it had work: stopped (SIGSTOP, as another job's
    timing run on a shared machine does) or starved of CPU. A ticker thread wakes every ``tick`` seconds;
    each gap longer than ``tick + slack`` counts beyond ``tick`` (the monotonic clock runs on while a process
    is stopped)."""

    def __init__(self, tick: float = 0.5, slack: float = 1.0) -> None:
        self.seconds = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._tick, args=(tick, slack), daemon=True,
                                        name="stall-meter")
        self._thread.start()

    def _tick(self, tick: float, slack: float) -> None:
        last = time.monotonic()
        while not self._done.wait(tick):
            now = time.monotonic()
            if now - last > tick + slack:
                self.seconds += now - last - tick
            last = now

    def close(self) -> float:
        """Stop the ticker; the seconds held still."""
        self._done.set()
        self._thread.join()
        return self.seconds


def _clock() -> dict[str, float]:
    """Wall clock, this process's CPU time (every thread), its finished children's, and the 1-minute load."""
    t = os.times()
    return {"wall": time.perf_counter(), "cpu": t.user + t.system, "children": t.children_user + t.children_system,
            "load": os.getloadavg()[0]}


def _elapsed(start: dict[str, float], end: dict[str, float], workers: int = 1, stalled: float = 0.0
             ) -> dict[str, Any]:
    """``study.json``'s ``clock``: what a reader needs to judge a wall time measured on a shared machine.

    Returns:
        ``{"wall_s", "cpu_s" (this process, all threads), "children_cpu_s" (worker processes included),
        "threads" (torch's), "workers", "cpus" (cores the OS reports), "load_1min_start", "load_1min_end",
        "stalled_s" (:class:`StallMeter`)}``.
    """
    return {"wall_s": end["wall"] - start["wall"], "cpu_s": end["cpu"] - start["cpu"],
            "children_cpu_s": end["children"] - start["children"], "threads": _torch_threads(),
            "workers": workers,
            "cpus": os.cpu_count() or 0, "load_1min_start": start["load"], "load_1min_end": end["load"],
            "stalled_s": stalled}


def clock_note(clock: dict[str, Any]) -> str:
    """The report's timing detail, e.g. "CPU 512 s + 300 s in child processes, 1 threads, 2 worker processes,
    2 cores; 1-minute load average 0.9 at start, 2.1 at end; held still 95 s of the wall time (stopped or
    starved)" (a load above the cores, or time held still, means other work shared the machine)."""
    children = f" + {clock['children_cpu_s']:.0f} s in child processes" if clock.get("children_cpu_s", 0) >= 1 else ""
    workers = f", {clock['workers']} worker processes" if clock.get("workers", 1) > 1 else ""
    stalled = (f"; held still {clock['stalled_s']:.0f} s of the wall time (stopped or starved)"
               if clock.get("stalled_s", 0) >= 1 else "")
    return (f"CPU {clock['cpu_s']:.0f} s{children}, {clock['threads']} threads{workers}, {clock['cpus']} "
            f"cores; 1-minute load average {clock['load_1min_start']:.1f} at start, "
            f"{clock['load_1min_end']:.1f} at end{stalled}")


def _torch_threads() -> int:
    """torch's CPU threads (what the study's timings ran on)."""
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    """``longreach study`` entry point."""
    p = argparse.ArgumentParser(
        prog="longreach study",
        description="Run one evidence study (a method's published effect at small scale) into a resumable "
                    "run folder: study.md (tables, findings, plots), study.json, progress on stdout.",
        epilog="Any field of the study's config can be overridden as --field=value.")
    p.add_argument("name", nargs="?", help="study name (see --list)")
    p.add_argument("--list", action="store_true", help="list the studies and exit")
    p.add_argument("--config", default=None, help="YAML recipe (default: the packaged study_NAME)")
    p.add_argument("--out", default=None, help="run folder (default: runs/study-NAME)")
    p.add_argument("--quick", action="store_true", help="the smallest setting (a few steps of everything)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes (one torch thread each) for a study's independent steps (default: 2, or "
                        "1 on a single core)")
    p.add_argument("--force", action="store_true", help="start the run folder over instead of resuming")
    args, extra = p.parse_known_args(argv)
    if args.list:
        for name in MODULES:
            try:
                text = _study(name).description
            except UserError:  # its module is not installed
                text = "(not available in this installation)"
            print(f"{name:<10}  {text}")
        return 0
    if not args.name:
        raise UserError("longreach study: name a study (longreach study --list shows them)")
    workers = min(2, os.cpu_count() or 1) if args.workers is None else args.workers
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    study = _study(args.name)
    cfg = load_study_config(study, args.config, extra, quick=args.quick)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    run_study(args.name, cfg, Path(args.out or f"runs/study-{args.name}"), quick=args.quick, force=args.force,
              workers=workers)
    return 0
