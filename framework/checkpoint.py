"""Fault-tolerant checkpoints: torch.distributed.checkpoint (DCP), atomic rename, keep-last-N, resharding.

Layout of a run folder::

    <run_dir>/checkpoints/step-00000100/        complete checkpoint (only ever created by a rename)
        meta.json                               step, config hash, world size, saved keys, config
        model/                                  DCP folder: model + optimizer (flattened FQN keys)
        common.pt                               rank 0's replicated state (scheduler, trainer dict, ...)
        rank-00000.pt ...                       per-rank state: data loader position and RNG states
    <run_dir>/checkpoints/step-00000200.tmp/    a save in progress (or killed mid-way): ignored, cleaned

Why this shape:

* Model and optimizer go through DCP with ``get_state_dict``/``set_state_dict`` (flattened optimizer
  keys), so a checkpoint written by N ranks under one parallel layout loads on M ranks under another
  (DDP replicas are de-duplicated; FSDP2 DTensor shards are resharded by DCP's planner).
* A tied parameter (an LM head sharing the embedding's weight) is written once, under its first name;
  on load the tie restores its other names. Checkpoints that hold both names still load.
* Everything is written into ``step-XXXXXXXX.tmp`` and renamed to ``step-XXXXXXXX`` by rank 0 only
  after a barrier proves every rank finished writing. A crash (SIGKILL) mid-save leaves a ``.tmp``
  folder that :meth:`CheckpointManager.latest` never returns and the next save removes: the last good
  checkpoint is never touched.
* Non-tensor state is stored with ``torch.save`` and read back with ``torch.load(weights_only=True)``
  only (numpy values are converted to plain Python/torch values first, so no unsafe unpickling).
* Every check that can fail on one rank (a corrupt file) is agreed on by all ranks before any
  collective load starts, so a bad checkpoint gives one :class:`~longreach.errors.UserError` on every
  rank instead of a hang.
* Nothing non-finite is saved: before writing, all ranks agree that every parameter and optimizer
  state tensor is finite (:class:`NonFiniteStateError` otherwise, and nothing is written).
* Integrity: ``meta.json`` lists every file of the checkpoint with its size and sha256 (``files``);
  resuming verifies them. A damaged newest checkpoint is moved aside to ``step-XXXXXXXX.damaged`` and the
  previous complete one is used, with a warning naming both; an explicitly given damaged checkpoint is
  an error.
* Disk: the expected size (the previous checkpoint's, else this rank's state bytes) is checked against
  free space before writing; any write failure removes the ``.tmp`` folder and names it, the bytes
  needed and the bytes free.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from longreach.errors import UserError
from longreach.faults import maybe_inject

__all__ = ["CheckpointConfig", "CheckpointManager", "NonFiniteStateError", "find_checkpoint", "read_meta",
           "verify_checkpoint"]

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d{8,})$")
_META = "meta.json"
_DCP_DIR = "model"
_COMMON = "common.pt"
_RNG_KEY = "_rng"
_DAMAGED = ".damaged"
# Config sections that may change between a save and a resume without invalidating the checkpoint:
# DCP reshards across world sizes and parallel layouts; run length/logging/checkpoint policy and the
# engine wrapper do not change the model or the data order.
_RESHARDABLE = ("parallel", "checkpoint", "engine", "faults", "run.steps", "run.log_every",
                "run.save_every", "run.overwrite", "run.out_dir", "run.name", "data.cache_dir",
                "attention.backend")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    resume: bool = True
    """Resume from the latest complete checkpoint in the run folder, if there is one."""
    keep_last: int = 3
    """How many complete checkpoints to keep (older ones are deleted after each save); 0 keeps all."""
    load_path: str | None = None
    """Explicit checkpoint folder (``.../step-XXXXXXXX``, or a run/checkpoints folder: its latest) to
    start from when the run folder has none of its own."""
    init_from: str | None = None
    """Initial weights only (not a resume): a run folder, a ``step-N`` checkpoint, an export
    (``model.safetensors`` + ``config.yaml``) or an HF Llama folder. The optimizer, LR schedule, data
    position and step start fresh; once the run folder has a checkpoint of its own, resuming wins."""
    async_save: bool = False
    """Write model/optimizer in a background thread (``dcp.async_save``); the checkpoint is renamed
    into place at the next save, load or :meth:`CheckpointManager.close`."""
    ignore_config_mismatch: bool = False
    """Resume even if the checkpoint was written under a different config (force; logged loudly)."""
    load_optimizer: bool = True
    """Restore the optimizer state (turn off to start a fresh optimizer from pretrained weights)."""
    trainable_only: bool = False
    """Save and restore only parameters with ``requires_grad`` (and buffers): a LoRA fine-tune's
    checkpoint then holds the adapters, not the frozen base weights, which come from the model builder
    (the base model) on resume. Frozen parameters keep whatever the builder loaded. Under DeepSpeed its
    ``exclude_frozen_parameters`` (and a non-strict module load)."""

    def __post_init__(self) -> None:
        if self.init_from and self.load_path:
            raise ValueError("checkpoint.init_from (weights only) and checkpoint.load_path (a full training state) "
                             "exclude each other; set one")
        if not isinstance(self.keep_last, int) or self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last must be an integer >= 0 (0 keeps all), got {self.keep_last!r}")


# --------------------------------------------------------------------------------------------------
# helpers


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _is_dist(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank(group: Any) -> int:
    return dist.get_rank(group) if _is_dist(group) else 0


def _world(group: Any) -> int:
    return dist.get_world_size(group) if _is_dist(group) else 1


def _barrier(group: Any) -> None:
    if _is_dist(group):
        dist.barrier(group=group)


def _all_agree(ok: bool, message: str, group: Any, *, error: type[UserError] = UserError) -> None:
    """Raise the same ``error`` on every rank if any rank saw a problem (no rank left in a collective)."""
    if _is_dist(group):
        msgs: list[Any] = [None] * _world(group)
        dist.all_gather_object(msgs, None if ok else message, group=group)
        bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
        if bad:
            r, m = bad[0]
            raise error(m if len(bad) == len(msgs) else f"{m} (seen on rank {r})")
    elif not ok:
        raise error(message)


def _broadcast(obj: Any, group: Any) -> Any:
    if not _is_dist(group):
        return obj
    box = [obj]
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _to_safe(obj: Any) -> Any:
    """Convert numpy values to plain Python/torch values so ``torch.load(weights_only=True)`` reads them."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return type(obj)((k, _to_safe(v)) for k, v in obj.items()) if type(obj) is not dict else {
            k: _to_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_safe(v) for v in obj)
    return obj


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _safe_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path.parent}: missing file {path.name} (incomplete or corrupted checkpoint)") from None
    except Exception as e:  # noqa: BLE001 - any unpickling/zip failure means a damaged file
        raise UserError(f"checkpoint {path.parent}: cannot read {path.name}: corrupted checkpoint "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def read_meta(path: Path) -> dict[str, Any]:
    """Read ``meta.json`` of a checkpoint folder; a missing or unreadable one is a :class:`UserError`."""
    f = Path(path) / _META
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise UserError(f"checkpoint {path}: not a longreach checkpoint (no {_META})") from None
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {path}: {_META} is corrupted ({e})") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise UserError(f"checkpoint {path}: {_META} is corrupted (no step)")
    return meta


class NonFiniteStateError(UserError):
    """Parameters or optimizer state hold NaN/inf at a save: the run stops, nothing is written."""


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, list[Any]]:
    """``{relative path: [size, sha256]}`` of every file under ``folder`` except ``meta.json``."""
    return {str(f.relative_to(folder)): [f.stat().st_size, _file_digest(f)]
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != _META}


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Read ``meta.json`` and check every listed file's size and sha256; returns the meta.

    Checkpoints written before ``files`` was recorded are accepted as they are.

    Raises:
        UserError: naming the checkpoint and the first missing, resized or altered file.
    """
    path = Path(path)
    meta = read_meta(path)
    files = meta.get("files")
    if not isinstance(files, dict):
        return meta
    for rel, (size, digest) in files.items():
        f = path / rel
        if not f.is_file():
            raise UserError(f"checkpoint {path}: missing file {rel} (incomplete or damaged checkpoint)")
        actual = f.stat().st_size
        if actual != size:
            raise UserError(f"checkpoint {path}: {rel} has {actual} bytes, {size} were written (damaged checkpoint)")
        if _file_digest(f) != digest:
            raise UserError(f"checkpoint {path}: {rel} fails its sha256 check (damaged checkpoint)")
    return meta


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _local_tensors(objs: list[Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, this rank's local tensor) of every parameter/buffer and optimizer state tensor in ``objs``."""
    for obj in objs:
        if isinstance(obj, nn.Module):
            items = [*obj.named_parameters(), *obj.named_buffers()]
        elif isinstance(obj, torch.optim.Optimizer):
            items = [(f"optimizer state {k}", v) for st in obj.state.values() for k, v in st.items()]
        else:
            continue
        for name, t in items:
            if isinstance(t, torch.Tensor):
                yield name, (t.to_local() if hasattr(t, "to_local") else t)


def _first_nonfinite(objs: list[Any]) -> str | None:
    """Name of the first floating tensor holding NaN/inf (None: all finite); one pass, no copies kept."""
    for name, t in _local_tensors(objs):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all()):
            return name
    return None


def _complete_steps(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / _META).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a user-given checkpoint path: a ``step-*`` folder, a ``checkpoints`` folder or a run folder.

    Raises:
        UserError: the path does not exist or holds no complete checkpoint.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist")
    if (p / _META).is_file():
        return p
    for root in (p, p / "checkpoints"):
        steps = _complete_steps(root)
        if steps:
            return steps[-1][1]
    raise UserError(f"checkpoint {p}: no complete checkpoint found (expected {_META} or step-XXXXXXXX folders)")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved config dicts, as ``key: old -> new``."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def _reshardable(line: str) -> bool:
    key = line.split(":", 1)[0]
    return any(key == p or key.startswith(p + ".") for p in _RESHARDABLE)


def _is_deepspeed_engine(obj: Any) -> bool:
    return hasattr(obj, "save_checkpoint") and hasattr(obj, "load_checkpoint") and hasattr(obj, "module")


# --------------------------------------------------------------------------------------------------


def _unless_stopping(e: BaseException) -> BaseException:
    """``e`` as a write error, unless this rank received SIGINT/SIGTERM (``longreach.faults``): then the
    failure is the stop — DCP wraps the interrupt it caught into its own exception, and treating it as
    a write error would start a collective that a stopping peer never joins — and it is re-raised as
    ``Interrupted`` (the caller removes the partial folder)."""
    faults = sys.modules.get("longreach.faults")  # loaded by the commands that install the handlers
    signum = faults.received_signal() if faults is not None else None
    if signum is not None:
        raise faults.Interrupted(signum) from e
    return e


class CheckpointManager:
    """Save and restore a training state; every method is collective over ``group`` (default: WORLD).

    ``state`` maps names to objects with ``state_dict()``/``load_state_dict()``: every ``nn.Module``
    (plain, DDP, FSDP2) and ``torch.optim.Optimizer`` goes through DCP; other objects (LR scheduler,
    trainer dict, ...) are taken from rank 0; objects whose name contains ``data`` or ``loader`` (the
    data loader position) and the RNG states are saved per rank. A plain ``dict`` value is restored
    in place. A DeepSpeed engine (``save_checkpoint``/``load_checkpoint``) is delegated to DeepSpeed.

    Args:
        cfg: the ``checkpoint:`` section.
        run_dir: the run folder; checkpoints go to ``run_dir/checkpoints``.
        config_hash: hash of the resolved job config, checked on resume.
        group: process group of the whole job (default WORLD; ignored when not distributed).
        config: optional resolved config dict, stored in each checkpoint so a mismatch on resume can
            say which keys differ (falls back to ``run_dir/config.yaml`` if present).
    """

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, *, config_hash: str, group: Any = None,
                 config: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.config_hash = str(config_hash)
        self.group = group
        self.config = config
        self._pending: tuple[Any, Path, Path] | None = None  # (future, tmp, final) of an async save

    # ------------------------------------------------------------------ queries
    def latest(self) -> Path | None:
        """The newest complete checkpoint in this run folder (``.tmp`` folders are ignored), or None."""
        self.wait()
        steps = _complete_steps(self.root)
        return steps[-1][1] if steps else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write a checkpoint of ``state`` at ``step``; collective. Returns the final folder.

        See :meth:`_save`; interrupted (Ctrl-C, or SIGTERM through ``longreach.faults.Interrupted``)
        mid-save, or failing because a peer stopped mid-save (its collective breaks before this rank's own
        signal arrives), rank 0 removes the partial folder before the error goes on.
        """
        try:
            return self._save(step, state)
        except BaseException:
            if _rank(self.group) == 0:
                for partial in self.root.glob("step-*.tmp"):
                    shutil.rmtree(partial, ignore_errors=True)
            raise

    def _save(self, step: int, state: dict[str, Any]) -> Path:
        """Write a checkpoint of ``state`` at ``step``; collective. Returns the final folder.

        Nothing appears under the final name until every rank has finished writing (atomic rename).
        With ``async_save`` the model/optimizer write continues in the background and the rename
        happens at the next save/load/:meth:`close`.

        Raises:
            NonFiniteStateError: some rank's parameters or optimizer state hold NaN/inf (nothing written).
            UserError: not enough free space, or a write failed (the ``.tmp`` folder is removed) — on
                every rank.
        """
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
        self.wait()
        rank, world = _rank(self.group), _world(self.group)
        final = self.root / _step_dir_name(step)
        tmp = self.root / (final.name + ".tmp")
        modules, optims, ds_engines, per_rank, common = self._split(state)

        # never save garbage: every rank's weights and optimizer state must be finite
        bad = _first_nonfinite([*modules.values(), *optims.values()])
        _all_agree(bad is None, f"step {step}: non-finite values in {bad}; not saving checkpoint {final.name} "
                   f"(the last complete checkpoint is {self._last_name()}); the run diverged: lower train.lr or "
                   "check the data", self.group, error=NonFiniteStateError)

        need = self._expected_bytes(modules, optims)
        problem = None
        if rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob("step-*.tmp"):  # left by a crash mid-save
                    shutil.rmtree(stale, ignore_errors=True)
                free = shutil.disk_usage(self.root).free
                if free < need:
                    problem = (f"not enough free space to save checkpoint {tmp}: about {need} bytes needed, "
                               f"{free} free (the last complete checkpoint, {self._last_name()}, is intact)")
                else:
                    tmp.mkdir(parents=True)
            except OSError as e:
                problem = self._write_error(tmp, _unless_stopping(e), need)
        _all_agree(problem is None, problem or "", self.group)

        try:
            rank_payload: dict[str, Any] = {_RNG_KEY: _rng_state()}
            for name, obj in per_rank.items():
                rank_payload[name] = _to_safe(obj.state_dict())
            torch.save(rank_payload, tmp / f"rank-{rank:05d}.pt")
            if rank == 0:
                common_payload = {name: _to_safe(obj if isinstance(obj, dict) else obj.state_dict())
                                  for name, obj in common.items()}
                torch.save(common_payload, tmp / _COMMON)
                meta = {
                    "step": step, "config_hash": self.config_hash, "world_size": world,
                    "time": time.time(), "modules": sorted(modules), "optimizers": sorted(optims),
                    "deepspeed": sorted(ds_engines), "per_rank": sorted(per_rank), "common": sorted(common),
                    "torch": torch.__version__, "config": self._config_dict(),
                }
                (tmp / _META).write_text(json.dumps(meta, indent=1, default=str))
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            problem = self._write_error(tmp, _unless_stopping(e), need)
        self._agree_or_clean(problem, tmp)

        maybe_inject("kill_in_save", step)  # fault tests: die with the checkpoint half written
        try:
            for name, engine in ds_engines.items():
                engine.save_checkpoint(str(tmp / f"deepspeed-{name}"), tag="ds",
                                       exclude_frozen_parameters=self.cfg.trainable_only)
            if modules or optims:
                sd, _ = self._dcp_state(modules, optims)
                if self.cfg.async_save:
                    import torch.distributed.checkpoint as dcp

                    fut = dcp.async_save(sd, checkpoint_id=str(tmp / _DCP_DIR), process_group=self.group,
                                         no_dist=not _is_dist(self.group))
                    self._pending = (fut, tmp, final)
                    return final
                self._dcp_save(sd, tmp / _DCP_DIR)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException derives from BaseException
            problem = self._write_error(tmp, _unless_stopping(e), need)
        self._agree_or_clean(problem, tmp)
        self._finalize(tmp, final)
        return final

    def _last_name(self) -> str:
        steps = _complete_steps(self.root)
        return steps[-1][1].name if steps else "none yet"

    def _expected_bytes(self, modules: dict[str, nn.Module], optims: dict[str, torch.optim.Optimizer]) -> int:
        """Bytes a save is expected to need: the previous checkpoint's size, else this rank's state bytes."""
        steps = _complete_steps(self.root)
        if steps:
            return _folder_bytes(steps[-1][1])
        return sum(t.numel() * t.element_size() for _, t in _local_tensors([*modules.values(), *optims.values()]))

    def _write_error(self, tmp: Path, e: BaseException, need: int) -> str:
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = -1
        text = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        why = next((ln.strip() for ln in text if "Errno" in ln or "space" in ln.lower()), text[-1] if text else "")
        return (f"cannot write checkpoint {tmp} ({type(e).__name__}: {why[:200]}); about {need} bytes needed, "
                f"{free} free; the partial folder was removed (the last complete checkpoint, {self._last_name()}, "
                "is intact)")

    def _agree_or_clean(self, problem: str | None, tmp: Path) -> None:
        """Raise ``problem`` on every rank if any rank had one, after rank 0 removed the partial folder."""
        if _is_dist(self.group):
            msgs: list[Any] = [None] * _world(self.group)
            dist.all_gather_object(msgs, problem, group=self.group)
            problem = next((m for m in msgs if m is not None), None)
        if problem is None:
            return
        if _rank(self.group) == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier(self.group)
        raise UserError(problem)

    def wait(self) -> None:
        """Finish a pending async save (wait for the background write, then rename); collective."""
        if self._pending is None:
            return
        fut, tmp, final = self._pending
        self._pending = None
        problem = None
        try:
            result = fut.result()
            if hasattr(result, "upload_completion"):  # AsyncSaveResponse in newer torch
                result.upload_completion.result()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - a failed background write (e.g. a full disk)
            problem = self._write_error(tmp, e, _folder_bytes(tmp) if tmp.is_dir() else 0)
        self._agree_or_clean(problem, tmp)
        self._finalize(tmp, final)

    def close(self) -> None:
        """Finalize any pending async save. Call once at the end of training."""
        self.wait()

    def _finalize(self, tmp: Path, final: Path) -> None:
        # Every rank has finished its files when the barrier returns; only then does rank 0 publish.
        _barrier(self.group)
        problem = None
        if _rank(self.group) == 0:
            try:
                meta = read_meta(tmp)
                meta["files"] = _manifest(tmp)  # sizes + sha256, verified on resume
                part = tmp / (_META + ".part")
                part.write_text(json.dumps(meta, indent=1, default=str))
                os.replace(part, tmp / _META)
            except (OSError, UserError) as e:
                problem = self._write_error(tmp, e, _folder_bytes(tmp) if tmp.is_dir() else 0)
        self._agree_or_clean(problem, tmp)
        if _rank(self.group) == 0:
            if final.exists():  # re-saving the same step (e.g. final save == periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._fsync_dir(self.root)
            self._prune()
        _barrier(self.group)
        log.info("saved checkpoint %s", final)

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        steps = _complete_steps(self.root)
        for _, p in steps[: max(0, len(steps) - self.cfg.keep_last)]:
            shutil.rmtree(p, ignore_errors=True)

    def _config_dict(self) -> dict[str, Any] | None:
        if self.config is not None:
            return self.config
        f = self.run_dir / "config.yaml"
        if f.is_file():
            try:
                import yaml

                data = yaml.safe_load(f.read_text())
                return data if isinstance(data, dict) else None
            except Exception:  # noqa: BLE001 - the stored config is only used for error messages
                return None
        return None

    # ------------------------------------------------------------------ load
    def load(self, state: dict[str, Any], path: Path | None = None) -> int:
        """Restore ``state`` in place from ``path`` (default: the run's newest intact checkpoint if ``resume``,
        else ``load_path``); collective.

        Returns:
            The step stored in the checkpoint (0 when there is nothing to resume from).

        Raises:
            UserError: config hash mismatch (unless ``ignore_config_mismatch``), a checkpoint of a
                different model (names or shapes), or a corrupted/incomplete checkpoint — on all ranks.
        """
        self.wait()
        # rank 0 decides which checkpoint, so ranks never disagree about the filesystem
        chosen: str | None = None
        err: str | None = None
        if _rank(self.group) == 0:
            try:
                p = self._choose_verified(path)
                chosen = None if p is None else str(p)
            except UserError as e:
                err = str(e)
        chosen, err = _broadcast((chosen, err), self.group)
        if err is not None:
            raise UserError(err)
        if chosen is None:
            return 0
        ckpt = Path(chosen)

        modules, optims, ds_engines, per_rank, common = self._split(state)
        rank, world = _rank(self.group), _world(self.group)

        # ---- validate everything before any collective load
        problem: str | None = None
        meta: dict[str, Any] = {}
        rank_payload: dict[str, Any] = {}
        common_payload: dict[str, Any] = {}
        try:
            meta = read_meta(ckpt)
            self._check_config(ckpt, meta)
            saved_world = int(meta.get("world_size", 1))
            src_rank = rank if rank < saved_world else None
            rank_file = ckpt / f"rank-{(src_rank if src_rank is not None else 0):05d}.pt"
            rank_payload = _safe_load(rank_file)
            if src_rank is None:
                log.warning("checkpoint %s was written by %d ranks; rank %d has no RNG/data state of its own "
                            "and takes rank 0's data position with a fresh RNG", ckpt, saved_world, rank)
                rank_payload.pop(_RNG_KEY, None)
            common_payload = _safe_load(ckpt / _COMMON) if (ckpt / _COMMON).exists() or common else {}
            missing = [n for n in common if n not in common_payload] + \
                      [n for n in per_rank if n not in rank_payload] + \
                      [n for n in ds_engines if not (ckpt / f"deepspeed-{n}").is_dir()]
            if missing:
                raise UserError(f"checkpoint {ckpt} has no saved state for {', '.join(sorted(missing))}")
            if modules or optims:
                sd, tied = self._dcp_state(modules, optims)
                self._check_dcp_metadata(ckpt, sd)
        except UserError as e:
            problem = str(e)
        _all_agree(problem is None, problem or "", self.group)

        # ---- load
        for name, engine in ds_engines.items():
            load_path, _ = engine.load_checkpoint(str(ckpt / f"deepspeed-{name}"), tag="ds",
                                                  load_module_strict=not self.cfg.trainable_only,
                                                  load_optimizer_states=self.cfg.load_optimizer)
            if load_path is None:
                raise UserError(f"checkpoint {ckpt}: DeepSpeed could not load deepspeed-{name}")
        if modules or optims:
            self._dcp_load(sd, ckpt, modules, optims, tied=tied)
        for name, obj in common.items():
            _restore(obj, common_payload[name])
        for name, obj in per_rank.items():
            _restore(obj, rank_payload[name])
        if _RNG_KEY in rank_payload:
            _set_rng_state(rank_payload[_RNG_KEY])
        step = int(meta["step"])
        log.info("resumed from %s (step %d, written by %d ranks, now %d)", ckpt, step,
                 int(meta.get("world_size", 1)), world)
        return step

    def _choose_verified(self, path: Path | None) -> Path | None:
        """Rank 0: the checkpoint to load, its files verified against their sizes and checksums.

        The run's own checkpoints fall back, newest first, past damaged ones (each moved aside to
        ``step-XXXXXXXX.damaged`` and named in a warning) once an intact one is found; an explicit
        ``path`` or ``load_path`` must be intact itself.
        """
        if path is not None:
            p = find_checkpoint(path)
            verify_checkpoint(p)
            return p
        if self.cfg.resume:
            damaged: list[tuple[Path, str]] = []
            for _, p in reversed(_complete_steps(self.root)):
                try:
                    verify_checkpoint(p)
                except UserError as e:
                    damaged.append((p, str(e)))
                    continue
                for bad, why in damaged:
                    aside = bad.with_name(bad.name + _DAMAGED)
                    n = 1
                    while aside.exists():
                        aside, n = bad.with_name(f"{bad.name}{_DAMAGED}-{n}"), n + 1
                    os.replace(bad, aside)
                    log.warning("%s; moved it aside to %s and resuming from the previous complete checkpoint %s",
                                why, aside.name, p.name)
                return p
            if damaged:
                raise UserError(f"no intact checkpoint in {self.root}: " + "; ".join(w for _, w in damaged))
        if self.cfg.load_path:
            try:
                p = find_checkpoint(self.cfg.load_path)
                verify_checkpoint(p)
            except UserError as e:
                raise UserError(f"checkpoint.load_path: {e}") from None
            return p
        return None

    def _check_config(self, ckpt: Path, meta: dict[str, Any]) -> None:
        saved_hash = meta.get("config_hash")
        if saved_hash == self.config_hash:
            return
        old_cfg, new_cfg = meta.get("config"), self._config_dict()
        diff = config_diff(old_cfg, new_cfg) if isinstance(old_cfg, dict) and isinstance(new_cfg, dict) else None
        if diff is not None and all(_reshardable(d) for d in diff):
            if diff:
                log.info("resuming %s with changed settings that a checkpoint can absorb: %s", ckpt, "; ".join(diff))
            return
        if self.cfg.ignore_config_mismatch:
            log.warning("checkpoint %s was written with a different config (%s); resuming anyway because "
                        "checkpoint.ignore_config_mismatch is set", ckpt,
                        "; ".join(diff or []) or f"hash {saved_hash} != {self.config_hash}")
            return
        if diff:
            what = "; ".join(d for d in diff if not _reshardable(d))
            shown = what if len(what) < 300 else what[:300] + " ..."
            raise UserError(f"checkpoint {ckpt} was written with a different config: {shown} "
                            f"(set checkpoint.ignore_config_mismatch=true to resume anyway, or use a new run folder)")
        raise UserError(f"checkpoint {ckpt} was written with a different config (hash {saved_hash} != "
                        f"{self.config_hash}); set checkpoint.ignore_config_mismatch=true to resume anyway, "
                        f"or use a new run folder")

    # ------------------------------------------------------------------ DCP model/optimizer
    def _split(self, state: dict[str, Any]):
        modules: dict[str, nn.Module] = {}
        optims: dict[str, torch.optim.Optimizer] = {}
        ds_engines: dict[str, Any] = {}
        per_rank: dict[str, Any] = {}
        common: dict[str, Any] = {}
        for name, obj in state.items():
            if name == _RNG_KEY:
                raise ValueError(f"state key {_RNG_KEY!r} is reserved for the RNG states")
            if _is_deepspeed_engine(obj):
                ds_engines[name] = obj
            elif isinstance(obj, nn.Module):
                modules[name] = obj
            elif isinstance(obj, torch.optim.Optimizer):
                optims[name] = obj
            elif name == "rng" and obj is None:
                continue  # RNG is always saved; an explicit placeholder is allowed
            elif isinstance(obj, dict) or (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                if not isinstance(obj, dict) and ("data" in name or "loader" in name):
                    per_rank[name] = obj
                else:
                    common[name] = obj
            else:
                raise TypeError(f"checkpoint state {name!r}: {type(obj).__name__} has no state_dict()/load_state_dict()")
        if optims and len(modules) != 1:
            raise ValueError("checkpoint state with optimizers must hold exactly one model module, "
                             f"got {sorted(modules)}")
        return modules, optims, ds_engines, per_rank, common

    def _dcp_state(self, modules: dict[str, nn.Module], optims: dict[str, torch.optim.Optimizer]
                   ) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
        """The DCP state dict of ``modules`` and ``optims`` with every tied parameter once.

        Returns:
            ``(sd, tied)``: ``sd`` as saved and loaded (second and later names of a tied parameter left
            out), and ``tied`` — per module, ``{left-out name: kept name}`` (see :func:`_untie`).
        """
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        opts = self._sd_options()
        sd: dict[str, Any] = {}
        if optims:
            (mname, model), = modules.items()
            msd, osd = get_state_dict(model, list(optims.values()), options=opts)
            sd[mname] = msd
            sd["optim"] = osd
        else:
            for mname, model in modules.items():
                sd[mname] = get_model_state_dict(model, options=opts)
        tied = {mname: _untie(sd[mname]) for mname in modules}
        return sd, {m: t for m, t in tied.items() if t}

    def _sd_options(self) -> Any:
        """DCP state-dict options: flattened optimizer keys; with ``trainable_only`` frozen parameters are
        left out (and loading is non-strict about them: :meth:`_check_dcp_metadata` already matched the
        saved names and shapes against the trainable ones)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        if self.cfg.trainable_only:
            return StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True, strict=False)
        return StateDictOptions(flatten_optimizer_state_dict=True)

    def _dcp_save(self, sd: dict[str, Any], where: Path) -> None:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.save(sd, checkpoint_id=str(where), process_group=self.group, no_dist=not _is_dist(self.group))

    def _check_dcp_metadata(self, ckpt: Path, sd: dict[str, Any]) -> None:
        """Compare saved tensor names/shapes with the live model before loading (clear error, no traceback)."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        try:
            md = FileSystemReader(str(ckpt / _DCP_DIR)).read_metadata()
        except Exception as e:  # noqa: BLE001
            raise UserError(f"checkpoint {ckpt}: model/optimizer metadata unreadable: corrupted checkpoint "
                            f"({type(e).__name__})") from None
        saved = md.state_dict_metadata
        live = {}
        for top, sub in sd.items():
            if top == "optim" and not self.cfg.load_optimizer:
                continue
            for k, v in _flatten_sd(sub, top).items():
                live[k] = v
        missing = [k for k in live if k not in saved]
        model_missing = [k for k in missing if not k.startswith("optim.")]
        if model_missing:
            extra = [k for k in saved if not k.startswith("optim.") and k not in live]
            raise UserError(
                f"checkpoint {ckpt} holds a different model: {len(model_missing)} parameter(s) missing "
                f"(e.g. {model_missing[0].split('.', 1)[1]})"
                + (f", {len(extra)} unexpected (e.g. {extra[0].split('.', 1)[1]})" if extra else ""))
        if missing:
            raise UserError(f"checkpoint {ckpt} has no optimizer state for {missing[0].split('.', 1)[1]} "
                            "(set checkpoint.load_optimizer=false to start a fresh optimizer)")
        for k, v in live.items():
            m = saved[k]
            shape = tuple(v.shape) if hasattr(v, "shape") else None
            if isinstance(m, TensorStorageMetadata) and shape is not None and tuple(m.size) != shape:
                what = "model" if not k.startswith("optim.") else "optimizer state"
                raise UserError(f"checkpoint {ckpt} holds a different {what} shape: {k.split('.', 1)[1]} is "
                                f"{list(m.size)} in the checkpoint but {list(shape)} in this model")

    def _dcp_load(self, sd: dict[str, Any], ckpt: Path, modules: dict[str, nn.Module],
                  optims: dict[str, torch.optim.Optimizer], *, tied: dict[str, dict[str, str]]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                             set_state_dict)

        if not self.cfg.load_optimizer:
            sd = {k: v for k, v in sd.items() if k != "optim"}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*assuming the intent is to")
                dcp.load(sd, checkpoint_id=str(ckpt / _DCP_DIR), process_group=self.group,
                         no_dist=not _is_dist(self.group))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException derives from BaseException
            msg = [ln for ln in str(e).strip().splitlines() if "Error" in ln] or str(e).strip().splitlines()
            raise UserError(f"checkpoint {ckpt}: cannot read model/optimizer data: corrupted checkpoint "
                            f"({type(e).__name__}: {msg[-1][:200] if msg else ''})") from None
        for mname, aliases in tied.items():  # a tied name gets the tensor its kept name was read into
            for alias, kept in aliases.items():
                sd[mname][alias] = sd[mname][kept]
        opts = self._sd_options()
        if optims and "optim" in sd:
            (mname, model), = modules.items()
            set_state_dict(model, list(optims.values()), model_state_dict=sd[mname],
                           optim_state_dict=sd["optim"], options=opts)
        else:
            for mname, model in modules.items():
                set_model_state_dict(model, sd[mname], options=opts)


def _untie(msd: dict[str, Any]) -> dict[str, str]:
    """Remove from a model state dict, in place, every entry that is a second name of a tensor already in it.

    Tied parameters (an LM head sharing the input embedding's weight) appear under each of their names
    in ``state_dict()``, as views of one storage; DCP would write each name's bytes. Only the first name
    is kept; on load the tie itself restores the others (:meth:`CheckpointManager._dcp_load` maps them to
    the kept entry for a strict load). Entries are matched by storage address, offset, shape, stride and
    dtype of this rank's local tensor; an empty storage is never matched (every rank agrees, since the
    tie is part of the model's structure and FSDP2 shards keep a padded storage of their own).

    Returns:
        ``{removed name: kept name}``.
    """
    kept: dict[tuple[Any, ...], str] = {}
    tied: dict[str, str] = {}
    for name, value in list(msd.items()):
        if not isinstance(value, torch.Tensor):
            continue
        local = value.to_local() if hasattr(value, "to_local") else value
        storage = local.untyped_storage()
        if local.device.type == "meta" or storage.nbytes() == 0:
            continue
        key = (local.device, storage.data_ptr(), local.storage_offset(), tuple(local.shape), local.stride(),
               local.dtype)
        if key in kept:
            tied[name] = kept[key]
            del msd[name]
        else:
            kept[key] = name
    return tied


def _flatten_sd(d: Any, prefix: str) -> dict[str, Any]:
    """DCP's flattening of nested dicts: keys joined with '.'."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten_sd(v, f"{prefix}.{k}"))
    else:
        out[prefix] = d
    return out


def _restore(obj: Any, saved: Any) -> None:
    if isinstance(obj, dict):
        obj.clear()
        obj.update(saved)
    else:
        obj.load_state_dict(saved)
