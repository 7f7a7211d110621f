"""Mixture layers: MoE FFN (expert parallelism, attention-/similarity-aware routing), MoH and SQA
attention, BAM's soft Mixture-of-Attention and upcycling.

Importing this package registers, in ``longreach.models``:

* ``ffn_type="moe"`` — :class:`~longreach.mixtures.moe.MoEFFN`;
* ``attention_type="moh"`` / ``"sqa"`` / ``"moa"`` — MoH, SQA and BAM's MoA attention.

Their options come from ``model.extra`` with one flat prefix per type (overridable as
``--model.extra.moe_top_k=2``); see :data:`EXTRA_KEYS`. An unknown key with a known prefix is an error
naming the nearest valid key.
"""
from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from longreach.errors import ConfigError
from longreach.models import register_attention, register_ffn
from longreach.models.config import ModelConfig

from .bam import MoAConfig, MoAttention, bam_model_config, upcycle_state_dicts
from .moe import MoEConfig, MoEFFN, expert_parameter_names, is_expert_parameter
from .moh import MoHConfig, MoHAttention, moh_from_dense
from .routing import RoutingTap  # noqa: F401  (re-exported)
from .sqa import SQAConfig, SQAttention

__all__ = [
    "EXTRA_KEYS", "MoAConfig", "MoAttention", "MoEConfig", "MoEFFN", "MoHAttention", "MoHConfig", "SQAConfig",
    "SQAttention", "bam_model_config", "convert_to_moh", "expert_parameter_names", "is_expert_parameter",
    "link_attention_routing", "moh_from_dense", "shard_experts", "upcycle_state_dicts",
]

#: ``model.extra`` keys read by each mixture type, with their defaults (None: derived from the model).
EXTRA_KEYS: dict[str, dict[str, Any]] = {
    "moe": {"moe_experts": 8, "moe_top_k": 2, "moe_hidden": None, "moe_capacity_factor": None,
            "moe_balance_coef": 0.01, "moe_z_coef": 1e-3, "moe_routing": "token", "moe_tau": 1.0,
            "moe_similarity_heads": None, "moe_routing_grad": True, "moe_expert_parallel": False},
    "moh": {"moh_shared": None, "moh_top_k": None, "moh_variant": "router", "moh_balance_coef": 0.01,
            "moh_execution": "routed"},
    "sqa": {"sqa_q_heads": None, "sqa_kv_heads": None},
    "moa": {"moa_experts": 2, "moa_share_kv": False},
}


def _options(cfg: ModelConfig, kind: str) -> dict[str, Any]:
    known = EXTRA_KEYS[kind]
    for key in cfg.extra:
        if key.startswith(kind + "_") and key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid: {', '.join(known)}"
            raise ConfigError(f"model.extra.{key} is not a {kind} option{hint}")
    return {k: cfg.extra.get(k, v) for k, v in known.items()}


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"model.extra.{key} must be true or false, got {value!r}")


def moe_config(cfg: ModelConfig) -> MoEConfig:
    o = _options(cfg, "moe")
    cf = o["moe_capacity_factor"]
    return MoEConfig(dim=cfg.dim, hidden=int(o["moe_hidden"] or cfg.ffn_hidden), num_experts=int(o["moe_experts"]),
                     top_k=int(o["moe_top_k"]), capacity_factor=None if cf is None else float(cf),
                     balance_coef=float(o["moe_balance_coef"]), z_coef=float(o["moe_z_coef"]),
                     routing=str(o["moe_routing"]), similarity_tau=float(o["moe_tau"]), init_std=cfg.init_std,
                     similarity_heads=int(o["moe_similarity_heads"] or (cfg.n_heads if cfg.dim % cfg.n_heads == 0 else 1)),
                     routing_grad=_as_bool(o["moe_routing_grad"], "moe_routing_grad"),
                     expert_parallel=bool(o["moe_expert_parallel"]),
                     router_init_std=cfg.init_std)


def moh_config(cfg: ModelConfig) -> MoHConfig:
    o = _options(cfg, "moh")
    shared = cfg.n_heads // 2 if o["moh_shared"] is None else int(o["moh_shared"])
    routed = cfg.n_heads - shared
    top_k = (routed + 1) // 2 if o["moh_top_k"] is None else int(o["moh_top_k"])
    return MoHConfig(dim=cfg.dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                     n_shared=shared, top_k=top_k, variant=str(o["moh_variant"]),
                     balance_coef=float(o["moh_balance_coef"]), execution=str(o["moh_execution"]))


def sqa_config(cfg: ModelConfig) -> SQAConfig:
    o = _options(cfg, "sqa")
    hq = cfg.n_heads // 2 if o["sqa_q_heads"] is None else int(o["sqa_q_heads"])
    hkv = min(cfg.n_kv_heads, hq) if o["sqa_kv_heads"] is None else int(o["sqa_kv_heads"])
    return SQAConfig(dim=cfg.dim, n_q_heads=hq, n_kv_heads=hkv, head_dim=cfg.head_dim)


def moa_config(cfg: ModelConfig) -> MoAConfig:
    o = _options(cfg, "moa")
    return MoAConfig(dim=cfg.dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                     n_experts=int(o["moa_experts"]), share_kv=bool(o["moa_share_kv"]))


@register_ffn("moe")
def build_moe(cfg: ModelConfig, layer_idx: int) -> MoEFFN:
    return MoEFFN(moe_config(cfg), layer_idx=layer_idx)


@register_attention("moh")
def build_moh(cfg: ModelConfig, layer_idx: int) -> MoHAttention:
    return MoHAttention(moh_config(cfg), layer_idx=layer_idx)


@register_attention("sqa")
def build_sqa(cfg: ModelConfig, layer_idx: int) -> SQAttention:
    return SQAttention(sqa_config(cfg), layer_idx=layer_idx)


@register_attention("moa")
def build_moa(cfg: ModelConfig, layer_idx: int) -> MoAttention:
    return MoAttention(moa_config(cfg), layer_idx=layer_idx)


# --- wiring helpers ----------------------------------------------------------------------------
def link_attention_routing(model: nn.Module) -> int:
    """Give every attention-/similarity-routed MoE FFN the q, k and inner attention of its block.

    Blocks are modules with ``self_attn`` and ``mlp`` children. Runs automatically for models built
    through the registry (see :func:`_on_register`); calling it again is harmless. Returns the number
    of FFNs linked.
    """
    linked = 0
    for block in model.modules():
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if isinstance(mlp, MoEFFN) and mlp.cfg.routing != "token" and isinstance(attn, nn.Module):
            mlp.bind_attention(attn)
            linked += 1
    return linked


def _on_register(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    # Blocks build self_attn before mlp: when a routed MoE FFN is attached next to an attention
    # layer, link them, so models built from a config need no extra call.
    if name == "mlp" and isinstance(submodule, MoEFFN) and submodule.cfg.routing != "token":
        attn = module._modules.get("self_attn")
        if attn is not None:
            submodule.bind_attention(attn)


nn.modules.module.register_module_module_registration_hook(_on_register)


def shard_experts(model: nn.Module, group) -> list[str]:
    """Shard every MoE layer's experts over ``group`` (expert parallelism); returns the expert
    parameter names (exclude them from data-parallel averaging over that group)."""
    for m in model.modules():
        if isinstance(m, MoEFFN):
            m.shard_experts(group)
    return expert_parameter_names(model)


def convert_to_moh(model: nn.Module, *, n_shared: int, top_k: int, variant: str = "qnorm") -> int:
    """Replace every block's dense ``self_attn`` by MoH with the same weights (continue-tuning).

    Returns the number of layers converted.
    """
    count = 0
    for block in model.modules():
        attn = getattr(block, "self_attn", None)
        if isinstance(attn, nn.Module) and not isinstance(attn, (MoHAttention, MoAttention)) and hasattr(attn, "q_proj"):
            block.self_attn = moh_from_dense(attn, n_shared=n_shared, top_k=top_k, variant=variant)
            count += 1
    return count
