"""BAM ("Branch-Attend-Mix") upcycling: N dense parallel-block seeds → one mixture model.

The mixture is our Llama with ``parallel_block=True`` (y = x + MoA(n x) + MoE(n x)),
``attention_type="moa"`` and ``ffn_type="moe"``:

* FFN experts ← the seeds' SwiGLU FFNs, top-k routed (:class:`longreach.mixtures.moe.MoEFFN`);
* attention = a *soft* Mixture-of-Attention (:class:`MoAttention`): every token uses all N attention
  experts, weighted by ``softmax(W_a x)``; with ``share_kv`` the experts share one K/V projection
  initialised as the average of the seeds' (K/V cost of one layer);
* every other parameter (embeddings, norms, output head) is the seeds' average; routers are random.

The N experts run in ONE inner-attention call (their heads concatenated; with shared K/V the query
heads are ordered so that the grouped-query mapping sends every expert's group to the shared K/V
head), so masks and context parallelism apply unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from longreach.attention import AttentionContext, LocalAttention
from longreach.errors import ConfigError, UserError
from longreach.models.config import MoAOptions, MoEOptions, ModelConfig
from longreach.models.rope import apply_rotary

from .moe import StackedLinear
from .routing import at_least_f32, RoutingTap

__all__ = ["MoAConfig", "MoAttention", "StackedLinear", "bam_model_config", "upcycle_state_dicts"]


@dataclass(kw_only=True, slots=True)
class MoAConfig:
    dim: int
    """Model width."""
    n_heads: int
    """Query heads per attention expert."""
    n_kv_heads: int
    """Key/value heads per expert (or of the shared K/V)."""
    head_dim: int
    """Per-head size."""
    n_experts: int
    """Attention experts N (the number of seeds)."""
    share_kv: bool = False
    """One K/V projection shared by every expert."""

    def __post_init__(self) -> None:
        if self.n_experts < 1:
            raise ConfigError(f"moa.experts must be >= 1, got {self.n_experts}")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ConfigError(f"moa: n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")


class MoAttention(nn.Module):
    """Soft mixture of N attention experts; ``forward(x, cos, sin, ctx) -> [B, S, dim]``.

    ``router_weights`` ``[B, S, N]`` is kept after each forward (detached) for inspection.
    """

    def __init__(self, cfg: MoAConfig, *, layer_idx: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        n, h, hkv, d = cfg.n_experts, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = h, hkv, d
        nkv = 1 if cfg.share_kv else n
        self.q_proj = nn.Linear(cfg.dim, n * h * d, bias=False)  # rows: expert-major
        self.k_proj = nn.Linear(cfg.dim, nkv * hkv * d, bias=False)
        self.v_proj = nn.Linear(cfg.dim, nkv * hkv * d, bias=False)
        self.o_proj = StackedLinear(n, h * d, cfg.dim)  # [N, dim, H*D]
        self.router = nn.Linear(cfg.dim, n, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.inner_attention = LocalAttention("auto")
        self.routing_tap: RoutingTap | None = None
        self.router_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, s, _ = x.shape
        n, h, hkv, d = self.cfg.n_experts, self.n_heads, self.n_kv_heads, self.head_dim
        g = h // hkv
        q = apply_rotary(self.q_proj(x).view(b, s, n * h, d), cos, sin)  # [B, S, N*H, D]
        k = apply_rotary(self.k_proj(x).view(b, s, -1, d), cos, sin)  # [B, S, Nkv*Hkv, D]
        v = self.v_proj(x).view(b, s, -1, d)  # [B, S, Nkv*Hkv, D]
        if self.cfg.share_kv and n > 1:
            # order heads (kv head, expert, group member) so head j uses kv head j // (N*g)
            q = q.view(b, s, n, hkv, g, d).permute(0, 1, 3, 2, 4, 5).reshape(b, s, hkv * n * g, d)
        lctx = ctx.for_layer(self.layer_idx)
        if self.routing_tap is not None:
            self.routing_tap.record(q, k, lctx, self.inner_attention)
        out = self.inner_attention(q, k, v, lctx)  # [B, S, N*H, D] in q's head order
        if self.cfg.share_kv and n > 1:
            out = out.view(b, s, hkv, n, g, d).permute(0, 1, 3, 2, 4, 5)  # [B, S, N, Hkv, g, D]
        out = out.reshape(b, s, n, h * d)  # [B, S, N, H*D]
        r = at_least_f32(self.router(x)).softmax(-1)  # [B, S, N]
        self.router_weights = r.detach()
        # Σ_e r_e · o_e(out_e): weight before the projection (one einsum, no loop over experts)
        return torch.einsum("bsnf,ndf->bsd", out * r.to(out.dtype)[..., None], self.o_proj.weight)  # [B, S, dim]


def bam_model_config(dense: ModelConfig, n_experts: int, *, share_kv: bool = False, top_k: int = 1,
                     capacity_factor: float | None = None) -> ModelConfig:
    """The mixture model's config: the dense one with MoA attention, MoE FFN and a parallel block."""
    if dense.arch != "llama":
        raise UserError(f"BAM upcycling needs llama seeds; model.arch is {dense.arch!r}")
    if not 1 <= top_k <= n_experts:
        raise UserError(f"--top-k must be in 1..{n_experts} (the number of seeds), got {top_k}")
    return replace(dense, parallel_block=True, attention_type="moa", ffn_type="moe",
                   moa=MoAOptions(experts=n_experts, share_kv=share_kv),
                   moe=MoEOptions(experts=n_experts, top_k=top_k, hidden=dense.ffn_hidden,
                                  capacity_factor=capacity_factor))


def _layer_keys(sd: dict[str, torch.Tensor]) -> int:
    ids = {int(k.split(".")[1]) for k in sd if k.startswith("layers.")}
    return max(ids) + 1 if ids else 0


@torch.no_grad()
def upcycle_state_dicts(
    seeds: list[dict[str, torch.Tensor]], dense: ModelConfig, *, share_kv: bool = False, top_k: int = 1,
    capacity_factor: float | None = None, names: list[str] | None = None, seed: int = 0,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Build the BAM mixture's state dict from N dense Llama state dicts.

    Args:
        seeds: N state dicts of the same parallel-block Llama architecture (``dense``).
        dense: their model config.
        share_kv: share one K/V projection across attention experts (the seeds' average).
        top_k: FFN experts per token.
        capacity_factor: MoE capacity factor (None: no dropping).
        names: labels of the seeds for error messages (file names).
        seed: RNG seed of the random router initialisation.

    Returns:
        ``(mixture ModelConfig, state dict)`` loadable with ``build_model(cfg).load_state_dict``.
    """
    names = names or [f"seed {i}" for i in range(len(seeds))]
    if len(seeds) < 1:
        raise UserError("upcycling needs at least one seed checkpoint")
    if not dense.parallel_block:
        raise UserError("BAM seeds must be parallel-block models (model.parallel_block: true)")
    if dense.attention_type != "mha" or dense.ffn_type != "swiglu":
        raise UserError(f"BAM seeds must be dense (attention_type mha, ffn_type swiglu); got "
                        f"{dense.attention_type}/{dense.ffn_type}")
    ref = seeds[0]
    for name, sd in zip(names[1:], seeds[1:]):
        if set(sd) != set(ref):
            diff = sorted(set(sd) ^ set(ref))[:3]
            raise UserError(f"{name}: parameter names differ from {names[0]} (e.g. {diff})")
        for key, t in sd.items():
            if t.shape != ref[key].shape:
                raise UserError(f"{name}: '{key}' has shape {tuple(t.shape)}, {names[0]} has {tuple(ref[key].shape)}")
    n = len(seeds)
    mix_cfg = bam_model_config(dense, n, share_kv=share_kv, top_k=top_k, capacity_factor=capacity_factor)
    n_layers = _layer_keys(ref)
    if n_layers != dense.n_layers:
        raise UserError(f"{names[0]}: has {n_layers} layers, model config says {dense.n_layers}")
    for key, t in ref.items():  # check shapes against the config before any work
        if key.endswith("q_proj.weight") and t.shape != (dense.n_heads * dense.head_dim, dense.dim):
            raise UserError(f"{names[0]}: '{key}' has shape {tuple(t.shape)}, which does not fit the model config")

    def stack(key: str) -> torch.Tensor:
        return torch.stack([sd[key] for sd in seeds])  # [N, ...]

    out: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)
    for key in ref:
        parts = key.split(".")
        if len(parts) >= 4 and parts[0] == "layers" and parts[2] in ("self_attn", "mlp"):
            continue  # mapped below
        out[key] = at_least_f32(stack(key)).mean(0).to(ref[key].dtype)  # embeddings, norms, head: averaged
    for i in range(n_layers):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        out[a + "q_proj.weight"] = torch.cat([sd[a + "q_proj.weight"] for sd in seeds])  # [N*H*D, dim]
        for kv in ("k_proj.weight", "v_proj.weight"):
            if share_kv:
                out[a + kv] = at_least_f32(stack(a + kv)).mean(0).to(ref[a + kv].dtype)
            else:
                out[a + kv] = torch.cat([sd[a + kv] for sd in seeds])  # [N*Hkv*D, dim]
        out[a + "o_proj.weight"] = stack(a + "o_proj.weight")  # [N, dim, H*D]
        w = ref[a + "q_proj.weight"]
        out[a + "router.weight"] = (torch.randn(n, dense.dim, generator=gen) * dense.init_std).to(w.dtype)
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[m + f"experts.{name}.weight"] = stack(m + f"{name}.weight")  # [N, out, in]
        out[m + "router.weight"] = (torch.randn(n, dense.dim, generator=gen) * dense.init_std).to(w.dtype)
    return mix_cfg, out
