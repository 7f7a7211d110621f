"""RoPE scaling written into a HuggingFace config the way the installed transformers reads it.

transformers 5.x keeps every RoPE setting under ``config.rope_parameters`` (``rope_theta`` inside);
4.x used ``rope_scaling`` plus a top-level ``rope_theta``. We write the 5.x form (and the 4.x form when
the installed transformers has no ``rope_parameters``), so an exported model loads with plain
``AutoModelForCausalLM.from_pretrained`` and extends its context the same way it was fine-tuned.

Types (transformers' ``rope_type`` names where they exist):

* ``linear`` — position interpolation, positions m/s (LongLoRA).
* ``dynamic`` — dynamic NTK, base b·((s·L_cur/L) − (s−1))^{d/(d−2)} for L_cur > L.
* ``yarn`` — NTK-by-parts blend with attention factor 0.1·ln s + 1.
* ``llama3`` — Llama-3.1's frequency-band scaling.
* ``static_ntk`` — ours: b′ = b·s^{d/(d−2)} baked into ``rope_theta`` (no transformers type needed).
* ``none`` — leave RoPE as it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from longreach.errors import ConfigError

ROPE_TYPES = ("none", "linear", "dynamic", "yarn", "llama3", "static_ntk")


@dataclass(kw_only=True, slots=True)
class RopeScaling:
    """How to stretch RoPE from the checkpoint's context to the target context."""

    type: str = "linear"
    """One of ``none``, ``linear``, ``dynamic``, ``yarn``, ``llama3``, ``static_ntk``."""
    factor: float | None = None
    """Scale s; None: ceil(target / original) (LongLoRA's position-interpolation factor)."""
    original_max_position_embeddings: int | None = None
    """Pre-training context L; None: the checkpoint's ``max_position_embeddings``."""
    attention_factor: float | None = None
    """YaRN only: multiplier of cos/sin; None lets transformers use 0.1·ln s + 1."""
    beta_fast: float | None = None
    """YaRN only: rotations above which frequencies are kept (transformers default 32)."""
    beta_slow: float | None = None
    """YaRN only: rotations below which frequencies are interpolated (transformers default 1)."""
    low_freq_factor: float = 1.0
    """llama3 only: low-frequency boundary factor (Llama-3.1 uses 1)."""
    high_freq_factor: float = 4.0
    """llama3 only: high-frequency boundary factor (Llama-3.1 uses 4)."""

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ConfigError(f"rope.type={self.type!r} is not one of {', '.join(ROPE_TYPES)}")
        if self.factor is not None and float(self.factor) < 1.0:
            raise ConfigError(f"rope.factor must be >= 1 (got {self.factor})")
        if self.original_max_position_embeddings is not None and self.original_max_position_embeddings < 1:
            raise ConfigError("rope.original_max_position_embeddings must be positive")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError("rope.high_freq_factor must be greater than rope.low_freq_factor")


def interpolation_factor(target_len: int, original_len: int) -> float:
    """LongLoRA's position-interpolation factor ceil(L′/L) (at least 1)."""
    return float(max(1, math.ceil(target_len / original_len)))


def static_ntk_theta(theta: float, factor: float, rotary_dim: int) -> float:
    """Static NTK-aware base b′ = b·s^{d/(d−2)}."""
    if rotary_dim <= 2:
        raise ConfigError(f"static NTK needs a rotary dimension > 2 (got {rotary_dim})")
    return float(theta) * float(factor) ** (rotary_dim / (rotary_dim - 2))


def read_rope(config: Any) -> dict[str, Any]:
    """The checkpoint's RoPE settings as one flat dict with ``rope_type`` and ``rope_theta`` (4.x or 5.x)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers 4.x
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", 10000.0)
    return params


def _rotary_dim(config: Any, params: dict[str, Any]) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * float(params.get("partial_rotary_factor", 1.0) or 1.0))


def rope_parameters_for(config: Any, scaling: RopeScaling, *, target_len: int) -> tuple[dict[str, Any], int]:
    """The ``rope_parameters`` dict and ``max_position_embeddings`` that extend ``config`` to ``target_len``.

    Args:
        config: a HuggingFace ``PretrainedConfig`` with unscaled RoPE (rope_type ``default``).
        scaling: the scaling recipe.
        target_len: the context the fine-tuned model is meant for (tokens).

    Returns:
        ``(rope_parameters, max_position_embeddings)``; nothing is modified.

    Raises:
        ConfigError: the checkpoint's RoPE is already scaled, or ``target_len`` is not longer than the
            original context (a scaling of factor ≤ 1 would be written silently).
    """
    current = read_rope(config)
    if scaling.type == "none":
        return current, max(int(config.max_position_embeddings), int(target_len))
    if current["rope_type"] != "default":
        raise ConfigError(
            f"the checkpoint's RoPE is already scaled (rope_type={current['rope_type']!r}); set rope.type: none "
            "to keep it, or start from an unscaled checkpoint"
        )
    original = int(scaling.original_max_position_embeddings or config.max_position_embeddings)
    if target_len <= original:
        source = ("rope.original_max_position_embeddings" if scaling.original_max_position_embeddings
                  else "the checkpoint's max_position_embeddings")
        raise ConfigError(
            f"recipe.target_len={target_len} is not longer than the original context {original} ({source}): "
            f"rope.type={scaling.type!r} would extend nothing; raise recipe.target_len, or set rope.type: none "
            "to fine-tune at this length without RoPE scaling")
    factor = float(scaling.factor) if scaling.factor is not None else interpolation_factor(target_len, original)
    theta = float(current["rope_theta"])
    out: dict[str, Any] = {"rope_theta": theta}
    if "partial_rotary_factor" in current:
        out["partial_rotary_factor"] = current["partial_rotary_factor"]
    new_max = max(int(round(original * factor)), int(target_len))
    if scaling.type == "linear":
        out.update(rope_type="linear", factor=factor)
    elif scaling.type == "dynamic":
        # transformers' dynamic NTK measures L_cur against max_position_embeddings: keep it at L.
        out.update(rope_type="dynamic", factor=factor)
        new_max = original
    elif scaling.type == "yarn":
        out.update(rope_type="yarn", factor=factor, original_max_position_embeddings=original)
        for key in ("attention_factor", "beta_fast", "beta_slow"):
            value = getattr(scaling, key)
            if value is not None:
                out[key] = float(value)
        new_max = int(round(original * factor))  # transformers checks max/original == factor
    elif scaling.type == "llama3":
        out.update(rope_type="llama3", factor=factor, original_max_position_embeddings=original,
                   low_freq_factor=float(scaling.low_freq_factor), high_freq_factor=float(scaling.high_freq_factor))
    else:  # static_ntk
        out.update(rope_type="default", rope_theta=static_ntk_theta(theta, factor, _rotary_dim(config, current)))
    return out, new_max


def apply_rope_scaling(config: Any, scaling: RopeScaling, *, target_len: int) -> dict[str, Any]:
    """Write the scaled RoPE into ``config`` in place (5.x ``rope_parameters``; 4.x ``rope_scaling``).

    Returns:
        The ``rope_parameters`` written.
    """
    params, new_max = rope_parameters_for(config, scaling, target_len=target_len)
    config.max_position_embeddings = new_max
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = dict(params)
        if hasattr(config, "standardize_rope_params"):
            config.standardize_rope_params()
        if hasattr(config, "validate_rope"):
            config.validate_rope()
    else:  # transformers 4.x layout
        config.rope_theta = params["rope_theta"]
        rest = {k: v for k, v in params.items() if k != "rope_theta"}
        config.rope_scaling = None if rest.get("rope_type") == "default" else rest
    return params


def rebuild_rotary(model: Any, device: Any = None) -> None:
    """Recreate the model's rotary embedding modules from its (updated) config.

    The rotary embedding caches its inverse frequencies at construction; after
    :func:`apply_rope_scaling` on a live model this makes the running model match the saved config.
    """
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            dev = device if device is not None else next((b.device for b in module.buffers()), None)
            new = type(module)(module.config)
            if dev is not None:
                new = new.to(dev)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
