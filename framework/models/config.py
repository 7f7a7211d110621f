"""The ``model:`` section of a job config: one typed dataclass for every architecture."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    arch: str = "llama"
    """Architecture name in ``longreach.models.MODELS`` (llama; transnormer registered by its module)."""
    vocab_size: int = 32000
    """Vocabulary size (the tokenizer's, set by the trainer when the tokenizer is built)."""
    dim: int = 512
    """Hidden size."""
    n_layers: int = 8
    """Number of decoder blocks."""
    n_heads: int = 8
    """Query heads."""
    n_kv_heads: int | None = None
    """Key/value heads (GQA/MQA); None = n_heads. Must divide n_heads."""
    head_dim: int | None = None
    """Per-head size; None = dim // n_heads."""
    ffn_hidden: int | None = None
    """SwiGLU hidden size; None = 8/3·dim rounded up to a multiple of 64."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base b (θ_i = b^(−2i/d))."""
    rope_scaling: dict[str, Any] | None = None
    """Position extension: {"type"|"rope_type": linear|ntk|dynamic|yarn|llama3, "factor": s, ...}."""
    max_seq_len: int = 2048
    """Training context length L (the "original" length for dynamic/yarn/llama3 scaling unless given)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    parallel_block: bool = False
    """y = x + attn(n(x)) + ffn(n(x)) (one shared norm) instead of the sequential pre-norm block."""
    attention_type: str = "mha"
    """Attention layer kind in ``longreach.models.ATTENTION_TYPES`` (mha; moh/sqa from mixtures)."""
    ffn_type: str = "swiglu"
    """Feed-forward kind in ``longreach.models.FFN_TYPES`` (swiglu; moe from mixtures)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Per-type options (e.g. MoE experts/top-k, MoH shared/routed heads)."""
    sequence_tile: int = 0
    """Tokens per tile of the MLP (or MoE experts) and the RMSNorms, each tile recomputed in backward so
    the ``[S, ffn]`` intermediate never exists whole (0: off). Applied by ``longreach.model_setup``."""
    checkpoint_offload: bool = False
    """With ``train.activation_checkpointing``: keep each block's checkpointed input in (pinned) host
    memory between forward and backward, brought back ahead of use on a side stream (CUDA)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"model.n_kv_heads={self.n_kv_heads} must be >= 1 and divide model.n_heads={self.n_heads}"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads != 0:
                raise ValueError(
                    f"model.dim={self.dim} does not divide by model.n_heads={self.n_heads}; set model.head_dim"
                )
            self.head_dim = self.dim // self.n_heads
        if self.head_dim < 2 or self.head_dim % 2 != 0:
            raise ValueError(f"model.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * ((int(8 * self.dim / 3) + 63) // 64)
        if self.ffn_hidden < 1:
            raise ValueError(f"model.ffn_hidden must be >= 1, got {self.ffn_hidden}")
        if self.sequence_tile < 0:
            raise ValueError(f"model.sequence_tile must be >= 0 (0: no tiling), got {self.sequence_tile}")
        if self.norm_eps <= 0:
            raise ValueError(f"model.norm_eps must be > 0, got {self.norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ValueError(f"model.rope_scaling must be a mapping or null, got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ROPE_TYPES and kind != "default":
                raise ValueError(f"model.rope_scaling.type must be one of {', '.join(ROPE_TYPES)}; got {kind!r}")
            if kind != "default" and float(self.rope_scaling.get("factor", 0)) <= 0:
                raise ValueError("model.rope_scaling.factor must be > 0")
