"""Mixture layers: MoE FFN (expert parallelism, attention-/similarity-aware routing), MoH and SQA
attention, BAM's soft Mixture-of-Attention and upcycling.

Importing this package registers, in ``longreach.models``:

* ``ffn_type="moe"`` — :class:`~longreach.mixtures.moe.MoEFFN`;
* ``attention_type="moh"`` / ``"sqa"`` / ``"moa"`` — MoH, SQA and BAM's MoA attention.

Their options are the typed ``model.moe`` / ``model.moh`` / ``model.sqa`` / ``model.moa`` sections
(:class:`~longreach.models.config.MoEOptions` …, overridable as ``--model.moe.top_k=2``), turned into the
layers' own configs here. An attention-/similarity-routed MoE FFN is attached to its block's attention by
the block when it is built (``bind_attention``); importing this package changes nothing else.
"""
from __future__ import annotations

from torch import nn

from longreach.models import register_attention, register_ffn
from longreach.models.config import MoAOptions, MoEOptions, MoHOptions, ModelConfig, SQAOptions

from .bam import MoAConfig, MoAttention, bam_model_config, upcycle_state_dicts
from .moe import MoEConfig, MoEFFN, expert_parameter_names, is_expert_parameter
from .moh import MoHConfig, MoHAttention, moh_from_dense
from .routing import RoutingTap
from .sqa import SQAConfig, SQAttention

__all__ = [
    "MoAConfig", "MoAttention", "MoEConfig", "MoEFFN", "MoHAttention", "MoHConfig", "RoutingTap", "SQAConfig",
    "SQAttention",
    "bam_model_config", "convert_to_moh", "expert_parameter_names", "is_expert_parameter", "moa_config",
    "moe_config", "moh_config", "moh_from_dense", "shard_experts", "sqa_config", "upcycle_state_dicts",
]


def moe_config(cfg: ModelConfig) -> MoEConfig:
    """The MoE layer config of a model: ``model.moe`` with the model's width and defaults filled in."""
    o = cfg.moe or MoEOptions()
    heads = o.similarity_heads or (cfg.n_heads if cfg.dim % cfg.n_heads == 0 else 1)
    return MoEConfig(dim=cfg.dim, hidden=o.hidden or cfg.ffn_hidden, num_experts=o.experts, top_k=o.top_k,
                     capacity_factor=o.capacity_factor, balance_coef=o.balance_coef, z_coef=o.z_coef,
                     routing=o.routing, similarity_tau=o.tau, init_std=cfg.init_std, similarity_heads=heads,
                     routing_grad=o.routing_grad, expert_parallel=o.expert_parallel, router_init_std=cfg.init_std)


def moh_config(cfg: ModelConfig) -> MoHConfig:
    """The MoH layer config: ``model.moh`` (shared heads default to half, top-k to half the routed ones)."""
    o = cfg.moh or MoHOptions()
    shared = cfg.n_heads // 2 if o.shared is None else o.shared
    routed = cfg.n_heads - shared
    top_k = (routed + 1) // 2 if o.top_k is None else o.top_k
    return MoHConfig(dim=cfg.dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                     n_shared=shared, top_k=top_k, variant=o.variant, balance_coef=o.balance_coef,
                     execution=o.execution)


def sqa_config(cfg: ModelConfig) -> SQAConfig:
    """The SQA layer config: ``model.sqa`` (query heads default to half the model's)."""
    o = cfg.sqa or SQAOptions()
    hq = cfg.n_heads // 2 if o.q_heads is None else o.q_heads
    hkv = min(cfg.n_kv_heads, hq) if o.kv_heads is None else o.kv_heads
    return SQAConfig(dim=cfg.dim, n_q_heads=hq, n_kv_heads=hkv, head_dim=cfg.head_dim)


def moa_config(cfg: ModelConfig) -> MoAConfig:
    """The MoA layer config: ``model.moa``."""
    o = cfg.moa or MoAOptions()
    return MoAConfig(dim=cfg.dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                     n_experts=o.experts, share_kv=o.share_kv)


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
