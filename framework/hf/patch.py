"""Run a HuggingFace causal LM on longreach attention through transformers' registries.

No model class is monkey-patched. :func:`patch_attention` registers one attention function with
``AttentionInterface`` (and a mask function with ``AttentionMaskInterface``, so transformers builds no
dense mask of its own) under a name unique to the patch, then switches the model to it with
``set_attn_implementation``. The function receives HF's ``[B, H, S, D]`` tensors, transposes them to
our ``[B, S, H, D]`` and calls the model seam's inner attention — the same
:class:`~longreach.attention.LocalAttention` / :class:`~longreach.attention.ContextParallelAttention`
that ``parallelize`` installs in our own models, built from the same pattern table
(:func:`longreach.attention.pattern_masks`) — with the model's own ``scaling``, ``sliding_window`` and
``softcap``. The trainer installs that inner attention through :class:`longreach.hf.model.HFCausalLM`;
standalone users (evaluation) describe it with an :class:`AttentionPatch`.

Under context parallelism every rank holds ``S/P`` tokens in the layout's order. The caller shards
tokens, *global* position ids and globally shifted labels with the same layout
(:func:`sharded_batch`), and :func:`causal_lm_loss` computes our chunked cross-entropy on the hidden
states and the ``lm_head`` weight, normalised by the global count of labelled tokens.

Training-time patterns (S2-Attn, SF-Attn) apply only while the attention module is in training mode;
evaluation and generation use full causal attention (LongLoRA, Chen et al., 2023, §3.2).
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from longreach.attention import AttentionContext, base_mask
from longreach.data.cp_batch import shard_batch
from longreach.errors import ConfigError, UserError
from longreach.kernels import attention as local_attention
from longreach.loss import chunked_cross_entropy, global_token_count
from longreach.parallel.config import STRATEGIES as CP_STRATEGIES
from longreach.kernels import masks as M

PATTERNS = ("full", "s2", "sf")
STRATEGIES = ("none", *CP_STRATEGIES)
IGNORE_INDEX = -100
_COUNTER = itertools.count()


@dataclass(kw_only=True, slots=True)
class AttentionPatch:
    """Which attention an HF model runs once patched."""

    pattern: str = "full"
    """Training-time pattern: ``full`` (causal), ``s2`` (LongLoRA S2-Attn) or ``sf`` (SinkLoRA SF-Attn);
    ``auto`` only inside a recipe, which resolves it from its method."""
    group_fraction: float = 0.25
    """S2/SF group size as a fraction of the (global) sequence length: G = N·fraction (LongLoRA: 1/4)."""
    s2_variant: str = "varlen"
    """S2-Attn shifted-head path: ``varlen`` (no wrap) or ``roll`` (LongLoRA's no-flash path, wraps)."""
    sinks: int = 4
    """SF-Attn: number of global sink tokens every query sees (causal sinks)."""
    strategy: str = "none"
    """Context parallelism: ``none`` (one rank), ``ring``, ``ulysses``, ``hybrid`` or ``allgather``."""
    layout: str = "zigzag"
    """Sequence layout of the shards: ``contiguous``, ``zigzag`` or ``stripe``."""
    ulysses_degree: int | None = None
    """Hybrid only: Ulysses group size U."""
    backend: str = "auto"
    """Local attention backend (``auto``, ``cpu``, ``reference``, ``triton``, ``flash`` …)."""

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS + ("auto",):
            raise ConfigError(f"attention.pattern={self.pattern!r} is not one of {', '.join(PATTERNS)}")
        if not 0.0 < self.group_fraction <= 1.0:
            raise ConfigError(f"attention.group_fraction must be in (0, 1] (got {self.group_fraction})")
        if self.s2_variant not in ("varlen", "roll"):
            raise ConfigError(f"attention.s2_variant={self.s2_variant!r} is not 'varlen' or 'roll'")
        if self.sinks < 0:
            raise ConfigError(f"attention.sinks must be >= 0 (got {self.sinks})")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"attention.strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        from longreach.parallel.layouts import LAYOUTS

        if self.layout not in LAYOUTS:
            raise ConfigError(f"attention.layout={self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.strategy == "hybrid" and not self.ulysses_degree:
            raise ConfigError("attention.strategy='hybrid' needs attention.ulysses_degree")

    @property
    def parallel(self) -> bool:
        return self.strategy != "none"

    def group_size(self, seq_len: int) -> int:
        """S2/SF group size G for a global sequence of ``seq_len`` tokens (raises if it does not divide)."""
        g = int(round(seq_len * self.group_fraction))
        if g < 2 or seq_len % g != 0 or g % 2 != 0:
            raise ConfigError(
                f"attention.group_fraction={self.group_fraction} gives group size {g} for sequence length "
                f"{seq_len}: S2/SF need an even group size that divides the sequence length"
            )
        return g

    def attention_config(self, seq_len: int | None) -> Any:
        """This patch as the job's ``attention:`` section for a global length (None: evaluation only).

        The training pattern is resolved by :func:`longreach.attention.pattern_masks` — the one table
        shared with our own models.
        """
        from longreach.attention import AttentionConfig

        if self.pattern == "auto":
            raise ConfigError("attention.pattern is 'auto' outside a recipe: choose full, s2 or sf")
        if seq_len is None or self.pattern == "full":
            return AttentionConfig(pattern="full", backend=self.backend)
        pattern = "s2_roll" if self.pattern == "s2" and self.s2_variant == "roll" else self.pattern
        return AttentionConfig(pattern=pattern, group_size=self.group_size(seq_len), sinks=self.sinks,
                               backend=self.backend)

    def train_mask(self, seq_len: int) -> M.Mask | None:
        """The training-time pattern for a global length (None: plain causal)."""
        from longreach.attention import pattern_masks

        return pattern_masks(self.attention_config(seq_len), seq_len)[1]


class HFAttention:
    """The attention function registered with transformers for one patched model.

    It adapts HF's attention-function contract to longreach's model seam: q, k, v go to ``[B, S, H, D]``
    and into an *inner attention* — :class:`~longreach.attention.LocalAttention` or
    :class:`~longreach.attention.ContextParallelAttention`, exactly what ``parallelize`` installs in our
    own models — with an :class:`~longreach.attention.AttentionContext` for the layer.

    Where the inner attention comes from:

    * set from outside (``inner``): the trainer's ``parallelize`` step assigns it through
      :class:`~longreach.hf.model.HFCausalLM` ``.inner_attention``; the context (step, global length,
      positions) arrives per forward as the ``longreach_ctx`` keyword, which transformers forwards
      to attention functions (so activation-checkpoint recomputation sees the same context);
    * otherwise built from :attr:`config` (an :class:`AttentionPatch`) per global length, through
      :func:`longreach.model_setup.build_inner_attention` (evaluation, ``patch_attention`` users).

    Attributes:
        config: the :class:`AttentionPatch` in force (strategy/layout read by the evaluation helpers).
        group: the context-parallel process group (None: WORLD when ``config.parallel``).
        step: training step for random masks when no context is passed.
        name: the key under which the function is registered.
        inner: the inner attention set from outside, or None.
    """

    def __init__(self, config: AttentionPatch, group: dist.ProcessGroup | None = None) -> None:
        self.config = config
        self.group = group
        self.step = 0
        self.name = f"longreach_{next(_COUNTER)}"
        self.inner: Any = None
        self._built: dict[Any, Any] = {}
        self._windowed: dict[Any, tuple[Any, Any]] = {}

    # --- helpers -------------------------------------------------------------------------------
    def cp_size(self) -> int:
        if not self.config.parallel:
            return 1
        from longreach.parallel.layouts import group_rank_size

        return group_rank_size(self.group)[1]

    def set_inner(self, inner: Any) -> None:
        """Install an inner attention from outside (``parallelize``); its group becomes the patch's."""
        from longreach.attention import ContextParallelAttention

        self.inner = inner
        self._windowed.clear()
        if isinstance(inner, ContextParallelAttention):
            self.group = inner.group
            self.config = replace(self.config, strategy=inner.strategy, layout=inner.layout,
                                  ulysses_degree=inner.ulysses_degree, backend=inner.backend)
        elif inner is not None:
            self.config = replace(self.config, strategy="none", backend=inner.backend)

    def _from_config(self, seq_len: int | None) -> Any:
        """The inner attention of :attr:`config` (``seq_len`` None: evaluation, no training pattern)."""
        if seq_len not in self._built:
            from longreach.model_setup import build_inner_attention

            c = self.config
            group = (self.group if self.group is not None else dist.group.WORLD) if c.parallel else None
            self._built[seq_len] = build_inner_attention(
                c.attention_config(seq_len), seq_len=seq_len or 1, group=group, strategy=c.strategy,
                layout=c.layout, ulysses_degree=c.ulysses_degree, backend=c.backend)
        return self._built[seq_len]

    def _inner_for(self, training: bool, seq_len: int, sliding_window: int | None) -> Any:
        base = self.inner if self.inner is not None else self._from_config(seq_len if training else None)
        if sliding_window is None:
            return base
        key = (id(base), int(sliding_window))
        hit = self._windowed.get(key)
        if hit is None or hit[0] is not base:
            windowed = copy.copy(base)  # the model's own window always applies, intersected with the pattern
            window = M.sliding_window(int(sliding_window))
            windowed.mask = window if base.mask is None else base.mask & window
            hit = self._windowed[key] = (base, windowed)
        return hit[1]

    def _context(self, module: torch.nn.Module, ctx: AttentionContext | None, seq_local: int,
                 scaling: float | None) -> AttentionContext:
        training = bool(module.training) and (ctx is None or ctx.training)
        layer = int(getattr(module, "layer_idx", 0) or 0)
        if ctx is None:
            ctx = AttentionContext(step=self.step, seq_len=seq_local * self.cp_size())
        return replace(ctx, layer=layer, training=training, scale=scaling)

    # --- the registered function ---------------------------------------------------------------
    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """HF attention-function contract.

        Args:
            module: the HF attention module (reads ``training`` and ``layer_idx``).
            query: ``[B, H, Sq, D]``; key, value: ``[B, Hkv, Sk, D]`` (HF layout, K/V not expanded).
            attention_mask: ignored: our mask function makes transformers pass None (padding is refused there).
            dropout: must be 0 (our kernels have no attention dropout).
            scaling: the module's softmax scale.
            sliding_window: the module's window (Mistral, Qwen2), None for none.
            softcap: tanh logit cap (Gemma-2); single-rank only.
            kwargs: ``longreach_ctx`` (an :class:`AttentionContext`) when the trainer runs the model.

        Returns:
            ``(out [B, Sq, H, D], None)`` — HF reshapes ``out`` to ``[B, Sq, H·D]``.
        """
        if dropout and module.training:
            raise ConfigError(
                f"attention dropout {dropout} is not supported by longreach attention; set the model config's "
                "attention_dropout to 0"
            )
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool and not bool(attention_mask.all()):
            raise UserError("longreach attention does not take padding masks; pack sequences instead of padding")
        q = query.transpose(1, 2)  # [B, Sq, H, D]
        k = key.transpose(1, 2)  # [B, Sk, Hkv, D]
        v = value.transpose(1, 2)  # [B, Sk, Hkv, D]
        q, k, v = _common_dtype(q, k, v)
        parallel = self.config.parallel
        if q.shape[1] != k.shape[1]:
            if parallel:
                raise UserError("KV-cache decoding is not supported under context parallelism (no cache across shards)")
            return self._decode(q, k, v, scaling, sliding_window, softcap), None
        ctx = self._context(module, kwargs.get("longreach_ctx"), q.shape[1], scaling)
        inner = self._inner_for(ctx.training, int(ctx.seq_len), sliding_window)
        if softcap is not None:
            if parallel:
                raise UserError("attention softcap (e.g. Gemma-2) is not supported under context parallelism; run "
                                "with attention.strategy=none")
            s = q.shape[1]
            pos = (ctx.positions if ctx.positions is not None else torch.arange(s)).cpu()
            placed = base_mask(ctx, inner.extra_mask(ctx)).place(pos, pos, seq_len=int(ctx.seq_len),
                                                                 num_heads=q.shape[2])
            return softcap_attention(q, k, v, mask=placed, scale=scaling, softcap=float(softcap)), None
        return inner(q, k, v, ctx), None

    def _decode(self, q, k, v, scaling, sliding_window, softcap) -> torch.Tensor:
        """Decoding with a cache (Sq < Sk) is inference: full causal (∩ the model's window), one rank."""
        sq, sk, h = q.shape[1], k.shape[1], q.shape[2]
        mask = M.causal() if sliding_window is None else M.causal() & M.sliding_window(int(sliding_window))
        # queries are the last Sq of the Sk keys
        placed = mask.place(torch.arange(sk - sq, sk), torch.arange(sk), seq_len=sk, num_heads=h)
        if softcap is not None:
            return softcap_attention(q, k, v, mask=placed, scale=scaling, softcap=float(softcap))
        return local_attention(q, k, v, mask=placed, scale=scaling, backend=self.config.backend)


def _common_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in one dtype: autocast's (as sdpa would run under it), else the widest of the three.

    A bf16 model whose trainable norms are fp32 master weights (``hf.model.keep_master_weights``) hands
    over fp32 q, k (rotated with fp32 cos/sin) and a bf16 v.
    """
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: M.PlacedMask,
                      scale: float | None, softcap: float) -> torch.Tensor:
    """Reference attention with tanh logit capping (Gemma-2), materialised scores.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, Hkv, D]``; mask: placed on the local positions.

    Returns:
        out ``[B, Sq, H, D]`` (rows with no allowed key are 0).
    """
    h, hkv = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kx = k.repeat_interleave(h // hkv, dim=2)  # [B, Sk, H, D]
    vx = v.repeat_interleave(h // hkv, dim=2)  # [B, Sk, H, D]
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), kx.to(acc)) * scale  # [B, H, Sq, Sk]
    s = torch.tanh(s / softcap) * softcap
    allowed = mask.dense(h)[None]  # [1, Hm, Sq, Sk]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    return torch.einsum("bhqk,bkhd->bqhd", p, vx.to(acc)).to(q.dtype)  # [B, Sq, H, D]


def _no_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """Mask function registered with ``AttentionMaskInterface``: our attention builds its own masks.

    A padding mask with zeros is refused here, before any attention runs.
    """
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.bool().all()):
        raise UserError("longreach attention does not take padding masks; pack sequences instead of padding")
    return None


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The HF ``PreTrainedModel`` under a peft wrapper (the model itself otherwise)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def patch_attention(model: torch.nn.Module, config: AttentionPatch | None = None, *,
                    group: dist.ProcessGroup | None = None) -> HFAttention:
    """Route every attention layer of an HF model through longreach attention.

    Args:
        model: a transformers causal LM (or a peft wrapper around one).
        config: the attention to run (default: full causal, one rank).
        group: context-parallel group (default WORLD when ``config.strategy`` is not ``none``).

    Returns:
        The registered :class:`HFAttention` (also stored as ``model._longreach_attention``); set its
        ``step`` each training step when the pattern is random.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = config or AttentionPatch()
    fn = HFAttention(config, group)
    AttentionInterface.register(fn.name, fn)
    AttentionMaskInterface.register(fn.name, _no_mask)
    hf = base_model(model)
    hf.set_attn_implementation(fn.name)
    if hf.config._attn_implementation != fn.name:  # pragma: no cover - a model outside the registry
        raise UserError(f"{type(hf).__name__} does not dispatch attention through AttentionInterface")
    object.__setattr__(hf, "_longreach_attention", fn)
    return fn


def unpatch_attention(model: torch.nn.Module, implementation: str = "sdpa") -> None:
    """Switch the model back to a stock transformers attention implementation."""
    hf = base_model(model)
    hf.set_attn_implementation(implementation)
    if hasattr(hf, "_longreach_attention"):
        object.__delattr__(hf, "_longreach_attention")


def patched(model: torch.nn.Module) -> HFAttention | None:
    """The :class:`HFAttention` a model was patched with, or None."""
    return getattr(base_model(model), "_longreach_attention", None)


# ------------------------------------------------------------------------------------------------
# Sharded batches and the loss
# ------------------------------------------------------------------------------------------------


def shift_labels(input_ids: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token labels on the *global* sequence: ``labels[:, t] = input_ids[:, t+1]``, last = ignore.

    Shift before sharding: HF's in-model shift pairs the wrong tokens across zigzag shards.
    """
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


@dataclass
class ShardedBatch:
    """This rank's tokens, global positions and shifted labels (``[B, S_local]`` each)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    seq_len: int
    positions: torch.Tensor = field(repr=False)


def sharded_batch(input_ids: torch.Tensor, *, fn: HFAttention | None, labels: torch.Tensor | None = None
                  ) -> ShardedBatch:
    """Shift labels globally, then shard tokens, labels and positions with the patch's layout
    (:func:`longreach.data.shard_batch`, the one batch-sharding function).

    Args:
        input_ids: ``[B, S]`` the full sequence (identical on every context-parallel rank).
        fn: the model's patch (None or a single-rank patch: nothing is sharded).
        labels: ``[B, S]`` already-shifted labels (default: :func:`shift_labels`).
    """
    b, s = input_ids.shape
    labels = shift_labels(input_ids) if labels is None else labels
    parallel = fn is not None and fn.config.parallel
    part = shard_batch({"input_ids": input_ids, "labels": labels}, fn.config.layout if parallel else "contiguous",
                       fn.group if parallel else None, context_parallel=parallel)  # [B, S/P] each
    pos = part["positions"].to(input_ids.device)  # [S/P] global positions of this rank's tokens
    return ShardedBatch(part["input_ids"], pos[None].expand(b, -1), part["labels"], s, pos)


def prime_dynamic_rope(model: torch.nn.Module, seq_len: int, local_positions: torch.Tensor) -> None:
    """Make every rank use the *global* length for dynamic NTK (transformers reads max(position_ids)).

    Without this each rank would pick its own base from the positions it holds.
    """
    for module in base_model(model).modules():
        rope_type = getattr(module, "rope_type", None)
        if not isinstance(rope_type, str) or "dynamic" not in rope_type or not hasattr(module, "inv_freq"):
            continue
        original = int(getattr(module, "original_max_seq_len", seq_len))
        if seq_len > original and int(local_positions.max()) + 1 < original:
            raise UserError(
                f"dynamic NTK RoPE under context parallelism: a rank holds only positions < {original}, so it "
                "would reset to the unscaled base; use layout zigzag/stripe, fewer ranks, or rope.type linear/yarn"
            )
        x = module.inv_freq.new_zeros(1, 1, 1)
        module(x, torch.tensor([[seq_len - 1]], device=x.device))


def causal_lm_loss(model: torch.nn.Module, batch: ShardedBatch, *, group: dist.ProcessGroup | None = None,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss over the global sequence, computed on this rank's shard.

    Args:
        model: a (patched, possibly peft-wrapped) HF causal LM.
        batch: from :func:`sharded_batch`.
        group: the group whose label count normalises the loss (dp × cp; default WORLD when
            distributed, this rank alone otherwise).
        chunk_size: tokens per logits chunk of the loss.

    Returns:
        ``(loss, count)``: loss = this rank's summed token loss / the global count of labelled tokens
        (sum the gradients over ``group``); count = that global count (int64 tensor).
    """
    hf = base_model(model)
    fn = patched(model)
    if fn is not None and fn.config.parallel:
        prime_dynamic_rope(model, batch.seq_len, batch.positions)
    hidden = hf.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
    weight = hf.get_output_embeddings().weight  # [V, hidden]
    loss_sum, n_local = chunked_cross_entropy(hidden, weight, batch.labels, chunk_size=chunk_size,
                                              ignore_index=IGNORE_INDEX)
    count = global_token_count(n_local, group=group)
    return loss_sum / count.clamp_min(1).to(loss_sum.dtype), count
