"""Open any model source: run folder, ``step-N`` checkpoint, export or HF folder (ARCHITECTURE.md §4).

    src = resolve_source("runs/demo")        # ModelSource(kind="run", path=runs/demo/checkpoints/step-…)
    print(src.describe())                    # "run folder runs/demo → step 100 (…/step-00000100)"
    state = read_state_dict(src)             # {name: full tensor}, our parameter names
    model = load_model(src)                  # longreach model with those weights, eval mode

Every command that reads a model (``export``, ``eval``, ``generate``, ``upcycle``, ``train
--checkpoint.init_from``) goes through :func:`resolve_source`, so each accepts what any other writes:

* ``run``: a ``longreach train`` run folder → its latest complete ``step-N`` (a ``longreach finetune``
  run folder → its ``export`` folder, an HF checkpoint);
* ``step``: one ``step-XXXXXXXX`` checkpoint (DCP; or DeepSpeed's own format under ``deepspeed-*``);
* ``export``: ``model.safetensors`` + ``config.yaml`` (``longreach export --format safetensors``,
  ``longreach upcycle``), with ``tokenizer.model`` beside them when known;
* ``hf``: an HF folder (``config.json`` + weights).

A DCP checkpoint is read by this one process alone (``no_dist``: no process group, no collective, so
no other rank waits on a timeout): DCP stores every tensor under its global name and global shape, so
FSDP2 shards and expert-parallel experts (DTensors ``Shard(0)`` over cp) come back as full tensors in
one state dict. DeepSpeed ZeRO 1–3 checkpoints are consolidated with DeepSpeed's ``zero_to_fp32``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longreach.checkpoint import find_checkpoint, read_meta
from longreach.configio import from_dict, to_dict
from longreach.data.config import DataConfig
from longreach.data.tokenizer import Tokenizer, load_or_train_tokenizer
from longreach.errors import UserError
from longreach.hf.convert import from_hf_state_dict, model_config_from
from longreach.models import build_model
from longreach.models.config import ModelConfig

__all__ = ["ModelSource", "init_weights", "load_model", "load_weights_into", "load_tokenizer", "read_state_dict", "resolve_source",
           "source_dtype"]

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"


@dataclass(kw_only=True, slots=True)
class ModelSource:
    """A resolved model source.

    Attributes:
        kind: ``run``, ``step``, ``export`` or ``hf`` (what the user named).
        given: the path the user gave.
        path: the folder the weights are read from (the chosen ``step-N`` for a run folder).
        config: the job config stored with a checkpoint (``run``/``step``), or the export's
            ``config.yaml`` contents; None for HF folders.
        step: the training step of a checkpoint, else None.
    """

    kind: str
    given: Path
    path: Path
    config: dict[str, Any] | None = None
    step: int | None = None

    def describe(self) -> str:
        """One line saying what was loaded, e.g. ``run folder runs/x → step 20 (runs/x/checkpoints/step-…)``."""
        if self.kind == "run":
            what = f"step {self.step} ({self.path})" if self.step is not None else f"{self.path}"
            return f"run folder {self.given} → {what}"
        if self.kind == "step":
            return f"checkpoint {self.path} (step {self.step})"
        if self.kind == "export":
            return f"export {self.path} ({EXPORT_WEIGHTS} + {EXPORT_CONFIG})"
        return f"HuggingFace folder {self.path}"

    @property
    def is_hf(self) -> bool:
        return (self.path / "config.json").is_file() and not (self.path / EXPORT_CONFIG).is_file()

    def model_config(self) -> Any:
        """The :class:`~longreach.models.ModelConfig` of the source (an HF Llama folder is converted)."""
        if self.is_hf:
            from transformers import AutoConfig

            return model_config_from(AutoConfig.from_pretrained(str(self.path), local_files_only=True))
        section = (self.config or {}).get("model")
        if not isinstance(section, dict):
            raise UserError(f"{self.path}: no model settings in its config (expected a 'model:' section)")
        try:
            return from_dict(ModelConfig, section, source=str(self.path / EXPORT_CONFIG))
        except (TypeError, ValueError) as e:
            raise UserError(f"{self.path}: {e}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping")
    return data


def resolve_source(path: str | Path) -> ModelSource:
    """Say what ``path`` is and where its weights are.

    Raises:
        UserError: the path does not exist or is none of the four kinds (naming what was looked for).
    """
    given = Path(path).expanduser()
    if not given.exists():
        raise UserError(f"model source {given} does not exist")
    if given.is_file():
        raise UserError(f"model source {given} is a file; give its folder (a run folder, a step-N checkpoint, "
                        f"an export with {EXPORT_WEIGHTS} + {EXPORT_CONFIG}, or an HF folder)")
    if (given / EXPORT_WEIGHTS).is_file() and (given / EXPORT_CONFIG).is_file():
        return ModelSource(kind="export", given=given, path=given, config=_read_yaml(given / EXPORT_CONFIG))
    if (given / "config.json").is_file():
        return ModelSource(kind="hf", given=given, path=given)
    if (given / "meta.json").is_file():
        meta = read_meta(given)
        return ModelSource(kind="step", given=given, path=given, config=meta.get("config"), step=int(meta["step"]))
    if (given / "checkpoints").is_dir() or given.name == "checkpoints":
        ckpt = find_checkpoint(given)
        meta = read_meta(ckpt)
        config = meta.get("config")
        if isinstance(config, dict) and "hf" in config:  # a fine-tune run: its export is the model
            export = given / "export"
            if (export / "config.json").is_file():
                return ModelSource(kind="run", given=given, path=export)
            raise UserError(f"{given} is a fine-tune run without an export yet (no {export}/config.json); "
                            "let the run finish, or export it")
        return ModelSource(kind="run", given=given, path=ckpt, config=config, step=int(meta["step"]))
    if (given / "export" / "config.json").is_file():
        return ModelSource(kind="run", given=given, path=given / "export")
    raise UserError(f"{given} is not a model source: expected a run folder (checkpoints/step-N), a step-N "
                    f"checkpoint (meta.json), an export ({EXPORT_WEIGHTS} + {EXPORT_CONFIG}) or an HF folder "
                    "(config.json)")


# ------------------------------------------------------------------------------------------- weights
def _read_dcp(src: ModelSource, cfg: Any) -> dict[str, torch.Tensor]:
    """Full tensors of the checkpoint's model, read by this process alone."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    folder = src.path / "model"
    try:
        saved = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - any failure reading the metadata is a damaged checkpoint
        raise UserError(f"checkpoint {src.path}: model metadata unreadable ({type(e).__name__})") from None
    prefix = "model."
    with torch.device("meta"):
        shapes = build_model(cfg).state_dict()
    state = {k: torch.empty(v.shape, dtype=saved[prefix + k].properties.dtype) if prefix + k in saved else None
             for k, v in shapes.items()}
    missing = [k for k, v in state.items() if v is None]
    if missing:
        raise UserError(f"checkpoint {src.path} holds no {missing[0]} (trainable-only or another model?)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load({"model": state}, checkpoint_id=str(folder), no_dist=True)
    return state


def _read_deepspeed(src: ModelSource) -> dict[str, torch.Tensor]:
    """A DeepSpeed (ZeRO 1–3) checkpoint consolidated into full fp32 tensors."""
    folders = sorted(src.path.glob("deepspeed-*"))
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise UserError(f"checkpoint {src.path} was written by DeepSpeed; install deepspeed to read it") from None
    state = get_fp32_state_dict_from_zero_checkpoint(str(folders[0]), tag="ds")
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_state_dict(src: ModelSource) -> dict[str, torch.Tensor]:
    """The source's full model state dict under longreach's parameter names (CPU tensors).

    Raises:
        UserError: unreadable files, or an HF folder that is not a Llama-family model.
    """
    if src.path.joinpath("meta.json").is_file():
        if (src.path / "model").is_dir():
            return _read_dcp(src, src.model_config())
        if any(src.path.glob("deepspeed-*")):
            return _read_deepspeed(src)
        raise UserError(f"checkpoint {src.path} holds no model weights (no model/ or deepspeed-* folder)")
    if src.is_hf:
        from safetensors.torch import load_file

        files = sorted(src.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{src.path}: no *.safetensors weights")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return from_hf_state_dict(state)
    from safetensors.torch import load_file

    try:
        return load_file(str(src.path / EXPORT_WEIGHTS))
    except Exception as e:  # noqa: BLE001 - a damaged export file is the user's
        raise UserError(f"cannot read {src.path / EXPORT_WEIGHTS}: {type(e).__name__}: {e}") from None


def source_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype the source's weights are stored in (float32 when it has none)."""
    for t in state.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad:
        detail = (f"{len(missing)} missing (e.g. {missing[:2]})" if missing else "") + \
                 (f" {len(unexpected)} unexpected (e.g. {unexpected[:2]})" if unexpected else "") + \
                 (f" shape of {bad[0]}: {list(state[bad[0]].shape)} there, {list(own[bad[0]].shape)} here"
                  if bad else "")
        raise UserError(f"{what}: its weights do not fit this model: {detail.strip()}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k])


def load_model(src: ModelSource, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
               ) -> nn.Module:
    """A longreach model (``longreach.models``) with the source's weights, in eval mode.

    Args:
        src: the resolved source (an HF folder must hold a Llama-family model).
        device: where the model goes.
        dtype: weight dtype (default: the source's).
    """
    cfg = src.model_config()
    state = read_state_dict(src)
    with torch.device("cpu"):
        model = build_model(cfg)
    load_weights_into(model, state, src.describe())
    return model.to(device=device, dtype=dtype or source_dtype(state)).eval()


def init_weights(model: nn.Module, path: str | Path) -> ModelSource:
    """``checkpoint.init_from``: copy the weights of ``path`` (any source) into ``model``; nothing else.

    Every rank reads the source itself (no collective). The optimizer, schedule, data position and step
    start fresh; this is not a resume.

    Raises:
        UserError: the source is unreadable or its parameters' names or shapes differ from ``model``'s.
    """
    try:
        src = resolve_source(path)
        state = read_state_dict(src)
        load_weights_into(model, state, f"checkpoint.init_from={path} ({src.describe()})")
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith("checkpoint.init_from") else f"checkpoint.init_from: {msg}") from None
    return src


def load_tokenizer(src: ModelSource) -> Any:
    """The source's tokenizer: a longreach sentencepiece ``Tokenizer`` (run, step, export) or an HF one.

    Returns None when the source names none (an export without ``tokenizer.model``).
    """
    if src.is_hf:
        if not any((src.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(src.path), local_files_only=True)

    if (src.path / TOKENIZER_FILE).is_file():
        return Tokenizer(src.path / TOKENIZER_FILE)
    data = (src.config or {}).get("data")
    if not isinstance(data, dict):
        return None

    return load_or_train_tokenizer(from_dict(DataConfig, data, source=f"{src.path}/meta.json"))


def write_export_config(out: Path, cfg: Any, *, source: ModelSource | None = None, dtype: torch.dtype | None = None,
                        extra: dict[str, Any] | None = None) -> Path:
    """``config.yaml`` of an export: the ``model:`` section, plus where it came from."""
    import yaml

    meta: dict[str, Any] = dict(extra or {})
    if source is not None:
        meta.update({"from": str(source.given), "kind": source.kind, "step": source.step})
    if dtype is not None:
        meta["dtype"] = str(dtype).removeprefix("torch.")
    data = {"model": to_dict(cfg), "export": meta}
    if source is not None and isinstance((source.config or {}).get("data"), dict):
        data["data"] = source.config["data"]
    (out / EXPORT_CONFIG).write_text(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))
    return out / EXPORT_CONFIG
