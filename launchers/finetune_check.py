"""``longreach launch --dry-run --validate finetune CONFIG --world-size N``: check a fine-tune job for N ranks.

What :mod:`longreach.launchers.dryrun` does for ``train`` configs, for ``longreach finetune`` ones: the
config is loaded strictly (``hf``/``recipe``/``data`` sections included), the degrees are checked
against N (dp × cp, Ulysses heads), the HF model is built from ``hf.path``'s ``config.json`` on the meta
device (no weights read, no memory) to count its parameters and the trainable share of the recipe
(LoRA adapters estimated from the target modules), and memory per rank is estimated. Without a local
``hf.path`` (a cluster path), the model is not built and the report says so.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from longreach.errors import UserError
from longreach.launchers.dryrun import DryRunReport, estimate_memory

__all__ = ["validate_finetune"]


def validate_finetune(config: str, world_size: int, overrides: list[str] | tuple[str, ...] = ()) -> DryRunReport:
    """Validate a fine-tune ``config`` for ``world_size`` ranks without loading weights.

    Raises:
        UserError: a config error, degrees that do not fit ``world_size``, an unreadable ``hf.path``.
    """
    from longreach.config import load_config
    from longreach.engines import as_engine_config
    from longreach.hf.cli import FinetuneConfig
    from longreach.parallel.mesh import ParallelDims

    if world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {world_size}")
    cfg = load_config(FinetuneConfig, config, list(overrides))
    par = cfg.parallel
    if world_size % par.cp:
        raise UserError(f"parallel.cp={par.cp} does not divide --world-size {world_size}")
    dp = par.dp if par.dp != -1 else world_size // par.cp
    try:
        ParallelDims(world_size=world_size, dp=dp, cp=par.cp,
                     ulysses_degree=par.ulysses_degree if par.strategy == "hybrid" else None)
    except ValueError as e:
        raise UserError(str(e)) from None
    engine = as_engine_config(cfg.engine)
    notes: list[str] = [f"recipe {cfg.recipe.method}: target length {cfg.recipe.target_len}, "
                        f"attention pattern {cfg.attention.pattern}"]
    params = trainable = 0
    model_shape = SimpleNamespace(dim=1, n_layers=1, vocab_size=1, ffn_hidden=1)
    folder = Path(cfg.hf.path)
    if (folder / "config.json").is_file():
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            hf_cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                                trust_remote_code=cfg.hf.trust_remote_code)
        except Exception as e:  # noqa: BLE001 - any failure reading the user's config.json
            raise UserError(f"hf.path: {folder}/config.json cannot be read ({type(e).__name__}: {e})") from None
        heads = int(hf_cfg.num_attention_heads)
        if par.strategy in ("ulysses", "hybrid"):
            u = par.cp if par.strategy == "ulysses" else (par.ulysses_degree or 1)
            if heads % u:
                raise UserError(f"parallel.strategy={par.strategy} splits the {heads} heads of {folder} over {u} "
                                "ranks: they must divide evenly")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_cfg)
        params = sum(p.numel() for p in model.parameters())
        trainable = _trainable_estimate(model, cfg.recipe)
        model_shape = SimpleNamespace(dim=hf_cfg.hidden_size, n_layers=hf_cfg.num_hidden_layers,
                                      vocab_size=hf_cfg.vocab_size, ffn_hidden=getattr(hf_cfg, "intermediate_size", None))
        notes.append(f"hf.path {folder}: {hf_cfg.model_type}, built on the meta device; "
                     f"{trainable / 1e6:.2f}M trainable under the recipe")
    else:
        notes.append(f"hf.path {folder or '(unset)'} is not a local HF folder here: the model was not built "
                     "(parameters and memory unknown)")
    shaped = SimpleNamespace(model=model_shape, train=cfg.train, parallel=par)
    mem = estimate_memory(params=params, params_per_rank=params, cfg=shaped, engine=engine, n_shards=world_size)
    if params and trainable < params:  # frozen weights need no gradients or optimizer state
        share = trainable / params
        mem["grads"] *= share
        mem["optimizer"] *= share
        mem["total"] = sum(v for k, v in mem.items() if k != "total")
    return DryRunReport(world_size=world_size, dp=dp, cp=par.cp, mesh=f"(dp={dp}, cp={par.cp}) (not built)",
                        engine=engine.kind, params=params, params_per_rank=params,
                        tokens_per_rank=cfg.train.micro_batch_size * cfg.recipe.target_len // par.cp,
                        memory=mem if params else {}, notes=notes)


def _trainable_estimate(model: torch.nn.Module, recipe: Any) -> int:
    """Parameters a recipe trains: everything for full fine-tuning; else LoRA's r·(in + out) per target
    Linear plus the extra trainable modules (embeddings, norms) it names."""
    if recipe.method == "full":
        return sum(p.numel() for p in model.parameters())
    rank = int(recipe.lora_r)
    targets, extra = tuple(recipe.lora_targets), tuple(recipe.trainable)
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets:
            total += rank * (module.in_features + module.out_features)
    total += sum(p.numel() for n, p in model.named_parameters() if any(key in n for key in extra))
    return total
