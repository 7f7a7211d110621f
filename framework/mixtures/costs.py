"""Parameter and FLOP accounting of dense and mixture models (hardware-independent figures).

* parameters: all of them;
* active parameters per token: what one token's forward multiplies by — top-k of E FFN experts (plus
  the router), all attention experts of a soft MoA, every projection of MoH except the o_proj columns
  of inactive routed heads;
* attention FLOPs per token at sequence length S (causal: (S+1)/2 keys on average): projections
  (2 · active projection parameters) and the score + value products (4 · active heads · d · keys).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .bam import MoAttention
from .moe import MoEFFN
from .moh import MoHAttention
from .sqa import SQAttention

__all__ = ["ModelCosts", "model_costs"]


@dataclass(kw_only=True, slots=True)
class ModelCosts:
    params: int
    """All parameters."""
    active_params: int
    """Parameters one token's forward uses (embeddings counted once)."""
    attn_proj_flops: float
    """Attention projection FLOPs per token (all layers)."""
    attn_core_flops: float
    """Attention score + value FLOPs per token at the given length (all layers)."""
    active_heads: float
    """Query heads computed per token per layer (average over layers)."""


def _attn(m: nn.Module) -> tuple[int, int, float]:
    """(parameters, active parameters, active query heads) of one attention layer."""
    total = sum(p.numel() for p in m.parameters())
    if isinstance(m, MoHAttention):
        c = m.cfg
        active_heads = c.n_shared + c.top_k
        inactive_o = (c.n_heads - active_heads) * c.head_dim * c.dim
        return total, total - inactive_o, float(active_heads)
    if isinstance(m, MoAttention):
        return total, total, float(m.cfg.n_experts * m.cfg.n_heads)
    if isinstance(m, SQAttention):
        return total, total, float(m.cfg.n_q_heads)
    return total, total, float(getattr(m, "n_heads"))


def model_costs(model: nn.Module, seq_len: int) -> ModelCosts:
    """Costs of a built Llama-style model (blocks with ``self_attn`` and ``mlp``) at ``seq_len`` (causal)."""
    params = sum(p.numel() for p in model.parameters())
    active = params
    proj = core = heads = 0.0
    n_blocks = 0
    keys = (seq_len + 1) / 2
    for block in model.modules():
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if not isinstance(attn, nn.Module):
            continue
        n_blocks += 1
        total, act, h = _attn(attn)
        active -= total - act
        router = sum(p.numel() for n, p in attn.named_parameters() if "router" in n)
        proj += 2.0 * (act - router)
        core += 4.0 * h * attn.head_dim * keys
        heads += h
        if isinstance(mlp, MoEFFN):
            expert = sum(p.numel() for p in mlp.experts.parameters())
            active -= expert - expert * mlp.cfg.top_k // mlp.cfg.num_experts
    return ModelCosts(params=params, active_params=int(active), attn_proj_flops=proj, attn_core_flops=core,
                      active_heads=heads / max(n_blocks, 1))
