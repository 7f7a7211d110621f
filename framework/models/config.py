"""The ``model:`` section of a job config: one typed dataclass for every architecture.

The mixture layers' options are typed sub-sections of it (``model.moe``, ``model.moh``, ``model.sqa``,
``model.moa``), overridable as ``--model.moe.top_k=2``; ``longreach.mixtures`` turns them into its
layer configs when a model is built. They are declared here, beside :class:`ModelConfig`, because the
mixtures package imports the model registry (declaring them there would make the two import each other).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from longreach.errors import ConfigError

ROPE_TYPES = ("linear", "ntk", "dynamic", "yarn", "llama3")
MOE_ROUTINGS = ("token", "attention", "similarity")
MOH_VARIANTS = ("router", "qnorm")
MOH_EXECUTIONS = ("routed", "masked")

__all__ = ["MOE_ROUTINGS", "MOH_EXECUTIONS", "MOH_VARIANTS", "MoAOptions", "MoEOptions", "MoHOptions",
           "ModelConfig", "ROPE_TYPES", "SQAOptions"]


@dataclass(kw_only=True, slots=True)
class MoEOptions:
    """``model.moe``: the mixture-of-experts feed-forward (``model.ffn_type: moe``)."""

    experts: int = 8
    """Number of experts E."""
    top_k: int = 2
    """Experts per token."""
    hidden: int | None = None
    """Hidden size of each SwiGLU expert; None = ``model.ffn_hidden``."""
    capacity_factor: float | None = None
    """Assignments per expert capped at ceil(c·N·k/E) of the N local tokens; None = never drop."""
    balance_coef: float = 0.01
    """Coefficient of the load-balancing loss."""
    z_coef: float = 1e-3
    """Coefficient of the router z-loss."""
    routing: str = field(default="token", metadata={"choices": MOE_ROUTINGS})
    """token (standard gate), attention (P = A·softmax(W_r X)) or similarity (P = S·softmax(W_r X))."""
    tau: float = 1.0
    """Temperature of similarity-aware routing."""
    similarity_heads: int | None = None
    """Heads of similarity-aware routing; None = ``model.n_heads`` (1 when it does not divide dim)."""
    routing_grad: bool = True
    """Attention-/similarity-aware routing: let gradients flow through the mixing matrix."""
    expert_parallel: bool = False
    """Under context parallelism, split the experts over the cp group (all-to-all token exchange)."""

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise ConfigError(f"model.moe.experts must be >= 1, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise ConfigError(f"model.moe.top_k must be in 1..model.moe.experts={self.experts}, got {self.top_k}")
        if self.routing not in MOE_ROUTINGS:
            raise ConfigError(f"model.moe.routing must be one of {', '.join(MOE_ROUTINGS)}; got {self.routing!r}")
        _at_least(self, "moe", hidden=1, similarity_heads=1)
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"model.moe.capacity_factor must be > 0 or null, got {self.capacity_factor}")
        if self.tau <= 0 or self.balance_coef < 0 or self.z_coef < 0:
            raise ConfigError("model.moe.tau must be > 0 and model.moe.balance_coef, z_coef >= 0; got "
                              f"{self.tau}, {self.balance_coef}, {self.z_coef}")


@dataclass(kw_only=True, slots=True)
class MoHOptions:
    """``model.moh``: mixture-of-heads attention (``model.attention_type: moh``)."""

    shared: int | None = None
    """Always-active heads (the first ones); None = half of ``model.n_heads``."""
    top_k: int | None = None
    """Routed heads active per token; None = half of the routed heads, rounded up."""
    variant: str = field(default="router", metadata={"choices": MOH_VARIANTS})
    """router (trainable gates) or qnorm (parameter-free, query-norm scores)."""
    balance_coef: float = 0.01
    """Coefficient of the routed heads' load-balance loss (variant router)."""
    execution: str = field(default="routed", metadata={"choices": MOH_EXECUTIONS})
    """routed (compute only the routed (token, head) pairs) or masked (every head, unrouted ones zeroed)."""

    def __post_init__(self) -> None:
        _at_least(self, "moh", shared=0, top_k=0, balance_coef=0)


@dataclass(kw_only=True, slots=True)
class SQAOptions:
    """``model.sqa``: sparse query attention (``model.attention_type: sqa``)."""

    q_heads: int | None = None
    """Query heads; None = half of ``model.n_heads``."""
    kv_heads: int | None = None
    """Key/value heads; None = min(``model.n_kv_heads``, q_heads)."""

    def __post_init__(self) -> None:
        _at_least(self, "sqa", q_heads=1, kv_heads=1)


@dataclass(kw_only=True, slots=True)
class MoAOptions:
    """``model.moa``: BAM's soft mixture of attention experts (``model.attention_type: moa``)."""

    experts: int = 2
    """Attention experts (the number of upcycled seeds)."""
    share_kv: bool = False
    """One K/V projection shared by every expert."""

    def __post_init__(self) -> None:
        _at_least(self, "moa", experts=1)


def _at_least(options: Any, section: str, **bounds: int) -> None:
    """``model.<section>.<name> >= bound`` for each given option that is set (None: derived later)."""
    for name, bound in bounds.items():
        value = getattr(options, name)
        if value is not None and value < bound:
            raise ConfigError(f"model.{section}.{name} must be >= {bound}, got {value}")


#: mixture sub-section → (its options class, the model setting that selects it, the value that does)
MIXTURE_SECTIONS: dict[str, tuple[type, str, str]] = {
    "moe": (MoEOptions, "ffn_type", "moe"),
    "moh": (MoHOptions, "attention_type", "moh"),
    "sqa": (SQAOptions, "attention_type", "sqa"),
    "moa": (MoAOptions, "attention_type", "moa"),
}


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
    """Options of architectures registered by plug-ins (e.g. the transnormer's ``softmax_every``)."""
    moe: MoEOptions | None = None
    """Mixture-of-experts options (``ffn_type: moe``; defaults when that is set and this is not)."""
    moh: MoHOptions | None = None
    """Mixture-of-heads options (``attention_type: moh``)."""
    sqa: SQAOptions | None = None
    """Sparse query attention options (``attention_type: sqa``)."""
    moa: MoAOptions | None = None
    """BAM mixture-of-attention options (``attention_type: moa``)."""
    sequence_tile: int = 0
    """Tokens per tile of the MLP (or MoE experts) and the RMSNorms, each tile recomputed in backward so
    the ``[S, ffn]`` intermediate never exists whole (0: off). Applied by ``longreach.model_setup``."""
    checkpoint_offload: bool = False
    """With ``train.activation_checkpointing``: keep each block's checkpointed input in (pinned) host
    memory between forward and backward, brought back ahead of use on a side stream (CUDA)."""

    def __post_init__(self) -> None:
        self._check_mixtures()
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} must be >= 1 and divide model.n_heads={self.n_heads}"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads != 0:
                raise ConfigError(
                    f"model.dim={self.dim} does not divide by model.n_heads={self.n_heads}; set model.head_dim"
                )
            self.head_dim = self.dim // self.n_heads
        if self.head_dim < 2 or self.head_dim % 2 != 0:
            raise ConfigError(f"model.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * ((int(8 * self.dim / 3) + 63) // 64)
        if self.ffn_hidden < 1:
            raise ConfigError(f"model.ffn_hidden must be >= 1, got {self.ffn_hidden}")
        if self.sequence_tile < 0:
            raise ConfigError(f"model.sequence_tile must be >= 0 (0: no tiling), got {self.sequence_tile}")
        if self.norm_eps <= 0:
            raise ConfigError(f"model.norm_eps must be > 0, got {self.norm_eps}")
        if self.rope_theta <= 0:
            raise ConfigError(f"model.rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ConfigError(f"model.rope_scaling must be a mapping or null, got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ROPE_TYPES and kind != "default":
                raise ConfigError(f"model.rope_scaling.type must be one of {', '.join(ROPE_TYPES)}; got {kind!r}")
            if kind != "default" and float(self.rope_scaling.get("factor", 0)) <= 0:
                raise ConfigError("model.rope_scaling.factor must be > 0")

    def _check_mixtures(self) -> None:
        """Old ``model.extra.moe_*`` keys name their new spelling; a mixture sub-section is filled with its
        defaults when its layer type is chosen, and refused when it is not (its options would be ignored)."""
        for key in self.extra:
            kind, _, option = str(key).partition("_")
            if kind in MIXTURE_SECTIONS:
                names = [f.name for f in dataclasses.fields(MIXTURE_SECTIONS[kind][0])]
                new = f"model.{kind}.{option}" if option in names else f"the model.{kind} section ({', '.join(names)})"
                raise ConfigError(f"model.extra.{key} is no longer read: mixture options moved to {new}")
        for kind, (options, setting, value) in MIXTURE_SECTIONS.items():
            chosen = getattr(self, setting) == value
            if chosen and getattr(self, kind) is None:
                setattr(self, kind, options())
            elif not chosen and getattr(self, kind) is not None:
                raise ConfigError(f"model.{kind} is set but model.{setting} is {getattr(self, setting)!r}: "
                                  f"set model.{setting}: {value} to use it, or remove model.{kind}")
