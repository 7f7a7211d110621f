"""Long-context fine-tuning recipes for HF checkpoints: LongLoRA, SinkLoRA and full fine-tuning.

* **LongLoRA** (Chen et al., 2023): peft LoRA (r=8, α=16, dropout 0 on q, k, v, o by default),
  plus every parameter whose name contains "embed" or "norm" trains (never ``lm_head``); position
  interpolation (linear RoPE, factor ceil(L′/L)); S2-Attn during training, full attention at inference.
* **SinkLoRA**: the same LoRA, with SF-Attn (shifted groups reassembled, no wrap) plus 4 causal sink tokens.
* **full**: every parameter trains (LongLoRA's full fine-tune), S2-Attn by default.

``apply_recipe`` rewrites the model's RoPE config (so the exported checkpoint carries it), wraps the
model with peft and patches its attention through transformers' registry. The training-time attention
pattern itself is the job's ``attention:`` section (``longreach finetune``: :mod:`longreach.hf.config`);
:attr:`RecipeConfig.pattern` is the method's default for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from longreach.errors import ConfigError
from longreach.hf.patch import AttentionPatch, HFAttention, patch_attention
from longreach.hf.rope import RopeScaling, apply_rope_scaling, rebuild_rotary

METHODS = ("longlora", "sinklora", "full")
_DEFAULT_PATTERN = {"longlora": "s2", "sinklora": "sf", "full": "s2"}


#: The modules LoRA adapts by default: the attention projections (LongLoRA, SinkLoRA).
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(kw_only=True, slots=True)
class RecipeConfig:
    """How a checkpoint is extended (the ``recipe:`` section of a fine-tuning config)."""

    method: str = "longlora"
    """``longlora`` (LoRA + S2-Attn), ``sinklora`` (LoRA + SF-Attn with sinks) or ``full`` (all weights)."""
    target_len: int = 32768
    """Context length to fine-tune at (tokens per training sequence)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (update = α/r · BA)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    """Module names LoRA adapts."""
    trainable: list[str] = field(default_factory=lambda: ["embed", "norm"])
    """Substrings of parameter names that also train in full (LongLoRA: embeddings and norms; never lm_head)."""
    rope: RopeScaling = field(default_factory=RopeScaling)
    """RoPE extension written into the config (default: linear position interpolation)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"recipe.method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.target_len < 2:
            raise ConfigError(f"recipe.target_len must be >= 2 (got {self.target_len})")
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise ConfigError(f"recipe.lora_r must be >= 1 and recipe.lora_alpha > 0 (got {self.lora_r}, {self.lora_alpha})")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"recipe.lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.method != "full" and not self.lora_targets:
            raise ConfigError("recipe.lora_targets is empty: LoRA needs at least one module name")

    @property
    def pattern(self) -> str:
        """The method's training-time attention pattern: s2 (longlora, full) or sf (sinklora)."""
        return _DEFAULT_PATTERN[self.method]


def mark_trainable(model: torch.nn.Module, substrings: list[str]) -> list[str]:
    """Make parameters whose name contains any of ``substrings`` trainable (lm_head never).

    Returns:
        The names made trainable.
    """
    names = []
    for name, p in model.named_parameters():
        if "lm_head" in name or "lora_" in name:
            continue
        if any(s in name for s in substrings):
            p.requires_grad_(True)
            names.append(name)
    return names


def apply_recipe(model: torch.nn.Module, recipe: RecipeConfig, *, attention: AttentionPatch | None = None,
                 group: dist.ProcessGroup | None = None) -> tuple[torch.nn.Module, HFAttention]:
    """Prepare an HF causal LM for long-context fine-tuning.

    Args:
        model: a transformers causal LM (Llama / Mistral / Qwen2 family).
        recipe: the recipe.
        attention: the attention patch (default: the method's pattern on one rank). The trainer later
            replaces its inner attention through ``parallelize`` (:class:`~longreach.hf.model.HFCausalLM`).
        group: context-parallel group for the attention patch (default WORLD when parallel).

    Returns:
        ``(model, attention)``: the model to train (a peft ``PeftModel`` for LoRA recipes) and its
        registered attention function (set ``attention.step`` each step).
    """
    apply_rope_scaling(model.config, recipe.rope, target_len=recipe.target_len)
    rebuild_rotary(model, device=next(model.parameters()).device)
    if recipe.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                          target_modules=list(recipe.lora_targets), bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        mark_trainable(model, list(recipe.trainable))
    fn = patch_attention(model, attention or AttentionPatch(pattern=recipe.pattern), group=group)
    return model, fn


def trainable_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Counts of trainable and total parameters."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": train, "total": total, "fraction": train / max(total, 1)}
