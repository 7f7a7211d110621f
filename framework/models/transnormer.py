"""TransNormerLLM: a decoder of lightning-attention (linear) layers, optionally hybrid with softmax layers.

Written for one device (Qin et al., "TransNormerLLM", 2023; Lightning Attention-2):

* pre-norm blocks ``x + mixer(SRMSNorm(x))`` then ``x + SGLU(SRMSNorm(x))``, where SimpleRMSNorm has no
  weight: ``x / sqrt(mean(x²) + 1e−6)``;
* token mixer: ``q, k, v, u = chunk4(x W)``, SiLU on q and k, optional learnable LRPE on q and k,
  ``O = lightning_attention(q, k, v, decay)`` (no softmax, no 1/√d), ``out_proj(u ⊙ SRMSNorm(O))``;
* channel mixer SGLU ``l3(l1(x) ⊙ l2(x))`` (no activation);
* decay of head h in layer l of L: ``2^(−8(h+1)/H) · (1 − l/(L−1) + 1e−5)`` (ALiBi slopes, interleaved
  for H not a power of two; the factor is 1 + 1e−5 for L = 1), the released TNL code's schedule;
* hybrid stacks: layers listed in ``model.extra.softmax_layers`` (or every ``softmax_every``-th layer)
  are Llama softmax-attention layers (``model.attention_type``, RoPE) with the ``inner_attention`` seam.

The forward contract is :class:`~longreach.models.llama.Llama`'s: ``model(input_ids, position_ids, ctx)``
→ hidden ``[B, S_local, dim]``, or ``(loss_sum, n_tokens)`` with ``labels``; ``output_weight()`` for the
chunked loss. Linear layers call one seam, ``self.linear_attention(q, k, v, decay, cu_seqlens=…)``; sequence
parallelism (LASP) is applied from outside by ``parallelize_context(cp_group, parallel_cfg)``, which
swaps that callable for :func:`longreach.parallel.linear_cp_attention` on the cp group.

``model.extra`` keys: ``softmax_every`` (int, 0 = none), ``softmax_layers`` (list of layer ids),
``lrpe`` (bool, default false), ``linear_backend`` (lightning backend, default auto),
``linear_chunk_size`` (block length, default 64). Packed documents (``ctx.cu_seqlens``, the global offsets
the trainer gives every layer): softmax layers attend within documents, and linear layers restart their
state at each document (single rank and LASP alike), so no layer mixes packed documents.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

import torch
from torch import nn

from longreach.attention import AttentionContext
from longreach.kernels.lightning import BACKENDS as LIGHTNING_BACKENDS
from longreach.kernels.lightning import lightning_attention
from longreach.parallel import linear_cp_attention

from .base import DecoderLM
from .config import ModelConfig
from .registry import ATTENTION_TYPES, lookup, register_model
from .rope import RotaryEmbedding

__all__ = ["TNL_EXTRA_KEYS", "LightningSeam", "LinearTokenMixer", "LaspSeam", "SGLU", "SimpleRMSNorm",
           "TransNormerLLM", "alibi_slopes", "is_softmax_layer", "tnl_decay"]

TNL_EXTRA_KEYS = ("softmax_every", "softmax_layers", "lrpe", "linear_backend", "linear_chunk_size")


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi slopes 2^(−8(h+1)/H); for H not a power of two, the nearest lower power's slopes
    followed by every other slope of the next power (Press et al.'s interleaved construction)."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if n_heads & (n_heads - 1) == 0:
        return power_of_two(n_heads)
    m = 1 << (n_heads.bit_length() - 1)
    return power_of_two(m) + power_of_two(2 * m)[0::2][: n_heads - m]


def tnl_decay(n_heads: int, layer: int, n_layers: int) -> torch.Tensor:
    """Decay rates ``[H]`` (float32) of linear layer ``layer`` of ``n_layers``."""
    depth = 1.0 - layer / (n_layers - 1) if n_layers > 1 else 1.0
    return torch.tensor(alibi_slopes(n_heads), dtype=torch.float32) * (depth + 1e-5)


def _extra(cfg: ModelConfig) -> dict[str, Any]:
    # other plug-ins (e.g. MoH softmax layers) read their own keys from extra: reject only near misses of ours
    for key in sorted(set(cfg.extra) - set(TNL_EXTRA_KEYS)):
        close = difflib.get_close_matches(key, TNL_EXTRA_KEYS, n=1, cutoff=0.75)
        if close:
            raise ValueError(f"model.extra.{key} is not a transnormer option; did you mean {close[0]!r}?")
    ex = {"softmax_every": 0, "softmax_layers": [], "lrpe": False, "linear_backend": "auto",
          "linear_chunk_size": 64}
    ex.update({k: cfg.extra[k] for k in TNL_EXTRA_KEYS if k in cfg.extra})
    if int(ex["softmax_every"]) < 0:
        raise ValueError(f"model.extra.softmax_every must be >= 0, got {ex['softmax_every']}")
    bad = [i for i in ex["softmax_layers"] if not 0 <= int(i) < cfg.n_layers]
    if bad:
        raise ValueError(f"model.extra.softmax_layers holds {bad}, outside 0..{cfg.n_layers - 1}")
    if ex["linear_backend"] not in ("auto", *LIGHTNING_BACKENDS):
        raise ValueError(f"model.extra.linear_backend must be auto or one of {', '.join(LIGHTNING_BACKENDS)}; "
                         f"got {ex['linear_backend']!r}")
    if int(ex["linear_chunk_size"]) < 1:
        raise ValueError(f"model.extra.linear_chunk_size must be >= 1, got {ex['linear_chunk_size']}")
    return ex


def is_softmax_layer(cfg: ModelConfig, layer: int) -> bool:
    """Whether layer ``layer`` of a transnormer config is a softmax-attention layer."""
    ex = _extra(cfg)
    every = int(ex["softmax_every"])
    return layer in {int(i) for i in ex["softmax_layers"]} or (every > 0 and (layer + 1) % every == 0)


class SimpleRMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps)`` without a weight, computed in float32 at least."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # [..., dim]
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Lrpe(nn.Module):
    """Learnable relative positional encoding (TNL's LRPE, cos/sin type): ``x → [x cos(θ t), x sin(θ t)]``.

    ``q_t · k_s`` then depends on ``cos(θ (t − s))`` only, so it needs global positions under context
    parallelism (``position_ids`` carry them). Doubles the head dimension of q and k.
    """

    def __init__(self, n_heads: int, head_dim: int) -> None:
        super().__init__()
        base = 10000.0 ** (-2.0 / head_dim * torch.arange(head_dim, dtype=torch.float32))  # [D]
        self.theta = nn.Parameter(base.repeat(n_heads, 1))  # [H, D]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        angle = position_ids.to(self.theta.dtype)[:, :, None, None] * self.theta  # [B, S, H, D]
        return torch.cat([x * angle.cos().to(x.dtype), x * angle.sin().to(x.dtype)], dim=-1)  # [B, S, H, 2D]


class LightningSeam:
    """Single-rank linear attention: ``lightning_attention`` on one backend."""

    def __init__(self, backend: str = "auto", chunk_size: int | None = None) -> None:
        self.backend, self.chunk_size = backend, chunk_size

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, *,
                 cu_seqlens: Any = None) -> torch.Tensor:
        return lightning_attention(q, k, v, decay, backend=self.backend, chunk_size=self.chunk_size,
                                   cu_seqlens=cu_seqlens)


class LaspSeam:
    """Context-parallel linear attention: LASP-1/2 over ``group`` with ``layout``."""

    def __init__(self, *, variant: str, layout: str, group: Any = None) -> None:
        self.variant, self.layout, self.group = variant, layout, group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, *,
                 cu_seqlens: Any = None) -> torch.Tensor:
        return linear_cp_attention(q, k, v, decay, variant=self.variant, layout=self.layout, group=self.group,
                                   cu_seqlens=cu_seqlens)


class LinearTokenMixer(nn.Module):
    """TNL's gated linear attention layer ending in the ``linear_attention(q, k, v, decay, cu_seqlens=…)`` seam."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        ex = _extra(cfg)
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.qkvu_proj = nn.Linear(cfg.dim, 4 * inner, bias=False)
        self.lrpe = Lrpe(cfg.n_heads, cfg.head_dim) if ex["lrpe"] else None
        self.norm = SimpleRMSNorm()
        self.out_proj = nn.Linear(inner, cfg.dim, bias=False)
        self.register_buffer("decay", tnl_decay(cfg.n_heads, layer_idx, cfg.n_layers), persistent=False)
        self.linear_attention: Callable[..., torch.Tensor] = LightningSeam(ex["linear_backend"],
                                                                           int(ex["linear_chunk_size"]))

    def parallelize_context(self, cp_group: Any, parallel_cfg: Any) -> None:
        """Hook for ``parallelize``: run this layer's attention with LASP over ``cp_group``.

        ``cp_group=None`` means no context parallelism (cp = 1): the local seam stays.
        """
        if cp_group is None:
            return
        self.linear_attention = LaspSeam(variant=parallel_cfg.linear_variant, layout=parallel_cfg.layout,
                                         group=cp_group)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: Any = None) -> torch.Tensor:
        """``x [B, S_local, dim]`` → ``[B, S_local, dim]``; ``cu_seqlens``: global offsets of packed
        documents (``ctx.cu_seqlens``), None for one document."""
        b, s, _ = x.shape
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)  # 4 × [B, S, H·D]
        shape = (b, s, self.n_heads, self.head_dim)
        q = nn.functional.silu(q).view(shape)  # [B, S, H, D]
        k = nn.functional.silu(k).view(shape)
        v = v.reshape(shape)
        if self.lrpe is not None:
            q, k = self.lrpe(q, position_ids), self.lrpe(k, position_ids)  # [B, S, H, 2D]
        out = self.linear_attention(q, k, v, self.decay, cu_seqlens=cu_seqlens)  # [B, S, H, D]
        out = self.norm(out.reshape(b, s, -1))  # [B, S, H·D]
        return self.out_proj(u * out)  # [B, S, dim]


class SGLU(nn.Module):
    """Simple gated linear unit ``l3(l1(x) ⊙ l2(x))``, no activation."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.l1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.l2 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.l3 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(self.l1(x) * self.l2(x))  # [B, S, dim]


class TNLBlock(nn.Module):
    """Pre-norm block: a linear token mixer (or a softmax attention layer) and an SGLU channel mixer."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.softmax = is_softmax_layer(cfg, layer_idx)
        self.token_norm = SimpleRMSNorm()
        if self.softmax:
            self.self_attn = lookup(ATTENTION_TYPES, cfg.attention_type, "model.attention_type")(cfg, layer_idx)
        else:
            self.token_mixer = LinearTokenMixer(cfg, layer_idx)
        self.channel_norm = SimpleRMSNorm()
        self.channel_mixer = SGLU(cfg)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                ctx: AttentionContext) -> torch.Tensor:
        h = self.token_norm(x)  # [B, S, dim]
        if self.softmax:
            assert rope is not None
            x = x + self.self_attn(h, rope[0], rope[1], ctx)
        else:
            x = x + self.token_mixer(h, position_ids, ctx.cu_seqlens)
        return x + self.channel_mixer(self.channel_norm(x))


class TransNormerLLM(DecoderLM):
    """TransNormerLLM decoder (see the module docstring)."""

    residual_out = ("out_proj.weight", "l3.weight", "o_proj.weight", "down_proj.weight")
    init_skip = ("lrpe.theta",)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        _extra(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TNLBlock(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = SimpleRMSNorm()
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        has_softmax = any(layer.softmax for layer in self.layers)
        self.rotary = (RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
                       if has_softmax else None)
        self.aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    def _blocks(self, h: torch.Tensor, position_ids: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None, ctx: AttentionContext
                ) -> tuple[torch.Tensor, nn.Module | None]:
        for layer in self.layers:
            h = layer(h, position_ids, rope, ctx)  # [B, S, dim]
        return self.final_norm(h), None


@register_model("transnormer")
def build_transnormer(cfg: ModelConfig) -> TransNormerLLM:
    return TransNormerLLM(cfg)
