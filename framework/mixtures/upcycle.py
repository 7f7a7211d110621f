"""``longreach upcycle``: build a BAM mixture checkpoint from N dense parallel-block Llama checkpoints.

    longreach upcycle --seeds run_a run_b run_c --out bam_run [--share-kv] [--top-k 2]

A seed is any model source (a ``longreach train`` run folder — its latest complete step —, a
``step-N`` checkpoint, an export with ``model.safetensors`` + ``config.yaml``, an HF Llama folder), a
state-dict file (``.safetensors``, or a torch file read with ``weights_only=True``) or a folder holding
``model.pt``. The model config is read from ``--model-config``
(a YAML file with a ``model:`` section or the bare fields) or from ``config.yaml`` beside each seed;
every seed must agree. The output folder receives ``model.safetensors`` and ``config.yaml``
(``model:`` section of the mixture: ``attention_type: moa``, ``ffn_type: moe``, ``parallel_block: true``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from longreach.configio import from_dict, read_yaml, to_dict
from longreach.errors import ConfigError, UserError
from longreach.models.config import ModelConfig
from longreach.models import build_model
from longreach.sources import load_tokenizer, read_state_dict, resolve_source

from .bam import upcycle_state_dicts

STATE_NAMES = ("model.safetensors", "model.pt", "model.pth", "pytorch_model.bin")


def _state_file(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"seed checkpoint {path} does not exist")
    if path.is_dir():
        for name in STATE_NAMES:
            if (path / name).is_file():
                return path / name
        raise UserError(f"seed folder {path} holds none of {', '.join(STATE_NAMES)}")
    return path


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A model state dict from a safetensors or torch (``weights_only``) file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure is the user's file
        raise UserError(f"cannot read seed checkpoint {path}: {type(e).__name__}: {e}") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"seed checkpoint {path} is not a model state dict (name -> tensor)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_model_config(path: Path) -> ModelConfig:
    """A ModelConfig from a YAML file (``model:`` section or bare fields), loaded strictly (unknown keys,
    wrong types and malformed YAML are a :class:`~longreach.errors.ConfigError` naming the file)."""
    if not path.is_file():
        raise ConfigError(f"model config {path} does not exist")
    data = read_yaml(path)
    section = data["model"] if isinstance(data.get("model"), dict) else data
    return from_dict(ModelConfig, section, source=str(path))


def _seed_config(seed: Path) -> Path | None:
    folder = seed if seed.is_dir() else seed.parent
    cand = folder / "config.yaml"
    return cand if cand.is_file() else None


def save_mixture(out_dir: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], *, meta: dict[str, Any]) -> Path:
    import yaml
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
    (out_dir / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(cfg), "upcycle": meta}, sort_keys=False))
    return out_dir / "model.safetensors"


def _is_state_file(seed: Path) -> bool:
    """A state-dict file, or a folder holding only one (no export ``config.yaml`` / model source)."""
    return seed.is_file() or (seed.is_dir() and not (seed / "config.yaml").is_file()
                              and any((seed / n).is_file() for n in STATE_NAMES[1:]))


def _seed_info(seed: Path) -> tuple[ModelConfig | None, str]:
    """(model config or None, what is read) of one seed: a state file, a folder holding one, or any model
    source (run folder → latest step, ``step-N``, export, HF Llama folder: :mod:`longreach.sources`)."""
    if not seed.exists():
        raise UserError(f"seed checkpoint {seed} does not exist")
    if _is_state_file(seed):
        cfg_path = _seed_config(seed)
        return (load_model_config(cfg_path) if cfg_path is not None else None), str(_state_file(seed))
    src = resolve_source(seed)
    return src.model_config(), str(src.path)


def _load_seed(seed: Path) -> dict[str, torch.Tensor]:
    if _is_state_file(seed):
        return load_state(_state_file(seed))
    return {k.removeprefix("module."): v for k, v in read_state_dict(resolve_source(seed)).items()}


def upcycle(seeds: list[Path], out_dir: Path, *, model_config: Path | None = None, share_kv: bool = False,
            top_k: int = 1, capacity_factor: float | None = None, seed: int = 0) -> Path:
    """Read the seeds, build the mixture, write it; returns the written state file. Raises UserError.

    A seed is a state file, a folder holding one, or any model source (a run folder, a ``step-N``
    checkpoint, an export or an HF Llama folder).
    """
    found = [_seed_info(Path(p)) for p in seeds]  # every path checked before any weights are read
    files = [name for _, name in found]
    if model_config is not None:
        dense = load_model_config(model_config)
    else:
        if found[0][0] is None:
            raise UserError(f"no config.yaml beside {seeds[0]}; pass --model-config")
        dense = found[0][0]
        for p, (c, _) in zip(seeds[1:], found[1:]):
            if c is not None and c != dense:
                raise UserError(f"{p}: model config differs from {seeds[0]}'s (seeds must share one architecture)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out {out_dir} exists and is not empty; choose another folder")
    states = [_load_seed(Path(p)) for p in seeds]
    cfg, state = upcycle_state_dicts(states, dense, share_kv=share_kv, top_k=top_k, capacity_factor=capacity_factor,
                                     names=[str(f) for f in files], seed=seed)
    model = build_model(cfg)  # the mixture must load into our model exactly
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{files[0]}: parameters do not match the model config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    written = save_mixture(out_dir, cfg, state, meta={"seeds": [str(f) for f in files], "share_kv": share_kv,
                                                      "top_k": top_k, "router_seed": seed})
    _copy_tokenizer(Path(seeds[0]), out_dir)
    return written


def _copy_tokenizer(seed: Path, out_dir: Path) -> None:
    """The first seed's sentencepiece model beside the mixture, so eval/generate can tokenize for it."""
    import shutil

    if _is_state_file(seed):
        return
    tok = load_tokenizer(resolve_source(seed))
    if tok is not None and hasattr(tok, "sp"):
        shutil.copyfile(tok.path, out_dir / "tokenizer.model")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="longreach upcycle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", required=True, type=Path, help="dense seed checkpoints (files or folders)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--model-config", type=Path, default=None, help="YAML with the seeds' model settings")
    parser.add_argument("--share-kv", action="store_true", help="share K/V across attention experts (their average)")
    parser.add_argument("--top-k", type=int, default=1, help="FFN experts per token (default 1)")
    parser.add_argument("--capacity-factor", type=float, default=None, help="MoE capacity factor (default: none)")
    parser.add_argument("--router-seed", type=int, default=0, help="seed of the random router initialisation")
    args = parser.parse_args(argv)
    path = upcycle(args.seeds, args.out, model_config=args.model_config, share_kv=args.share_kv, top_k=args.top_k,
                   capacity_factor=args.capacity_factor, seed=args.router_seed)
    print(f"wrote {path} ({len(args.seeds)} experts{', shared K/V' if args.share_kv else ''}, top-{args.top_k})")
    return 0
