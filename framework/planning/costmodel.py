"""Analytic cost model of context-parallel attention and of a whole training step, and its calibration.

Conventions (the same ones ``longreach bench sweep`` measures with):

* **Attention FLOPs.** Forward = ``4 · B · S² · H · D · density`` (two matmuls, QKᵀ and PV, of
  ``2·S²·H·D`` FLOPs each, scaled by the share of (query, key) pairs the mask allows; H counts query
  heads, so GQA does not reduce it). Backward = ``2.5 ×`` forward (FlashAttention's convention: it
  recomputes QKᵀ, so five matmuls against the forward's two); forward+backward = ``3.5 ×`` forward.
* **Dense FLOPs.** ``2 ×`` the matmul parameters per token forward (q/k/v/o projections, gated or plain
  FFN, LM head), ``×3`` for forward+backward, plus one more forward per layer with activation
  checkpointing (recompute).
* **Communication.** A message of ``b`` bytes on a link costs ``latency + b / (bandwidth · efficiency)``.
  A group of ranks that fits in one node (ranks are packed node by node) uses the intra-node link;
  a wider group crosses the inter-node network. Strided groups (hybrid's ring) span ``size × stride``
  ranks. Collectives over N ranks spread over nodes are taken as hierarchical: the intra-node phase
  moves ``(g−1)/g`` of the buffer over NVLink, the inter-node phase ``(nodes−1)/nodes`` of a 1/g slice
  over each GPU's own NIC.
* **Overlap.** Ring steps overlap the next K/V transfer with the current block:
  ``step = max(c, m) + (1 − overlap) · min(c, m)``. Ulysses' all-to-alls sit between the projections
  and the kernel and do not overlap. All-gather overlaps its single gather with the local diagonal
  block only (what ``longreach.parallel.cp.allgather`` does); its backward re-gathers and
  reduce-scatters. LASP-2 all-gathers one d×e state per head and layer (not overlapped, tiny).
* **Balance.** Causal work per rank: contiguous layout puts ``(2P−1)/P²`` of the work on the last rank
  (ring steps are synchronous, so the step time follows the busiest rank); zigzag and stripe give
  every rank ``1/P``. Non-causal masks (windows, documents, full) are taken as balanced.

Everything here is plain arithmetic on floats (no torch), so ``longreach plan`` answers in milliseconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .hardware import DeviceProfile

__all__ = [
    "ATTN_BWD_FACTOR",
    "AttentionCost",
    "MEMORY_PARTS",
    "MODELS",
    "MemoryOptions",
    "ModelShape",
    "StepCost",
    "attention_cost",
    "attention_flops",
    "causal_density",
    "collective_time",
    "memory_per_rank",
    "run_memory",
    "step_cost",
]

ATTN_BWD_FACTOR = 2.5
"""Backward attention FLOPs per forward FLOP (FlashAttention's count); fwd+bwd = 1 + this."""

SOFTMAX_STRATEGIES = ("none", "ring", "ulysses", "hybrid", "allgather")
LINEAR_STRATEGIES = ("none", "lasp2")


def causal_density(seq_len: int) -> float:
    """Share of the S×S pairs a causal mask allows: (S+1)/(2S)."""
    return (seq_len + 1) / (2 * seq_len)


def attention_flops(*, batch: int, seq_len: int, heads: int, head_dim: int, density: float) -> float:
    """Forward softmax-attention FLOPs of one layer: ``4·B·S²·H·D·density``."""
    return 4.0 * batch * seq_len * seq_len * heads * head_dim * density


@dataclass(kw_only=True, slots=True)
class ModelShape:
    name: str = "custom"
    """Label printed in plans."""
    layers: int
    """Transformer blocks."""
    hidden: int
    """Model width."""
    heads: int
    """Query heads."""
    kv_heads: int | None = None
    """Key/value heads (GQA); None = ``heads``."""
    head_dim: int | None = None
    """Per-head width; None = ``hidden // heads``."""
    ffn: int
    """FFN inner width."""
    vocab: int
    """Vocabulary size."""
    gated_ffn: bool = True
    """SwiGLU/SGLU (three FFN matrices) rather than two."""
    attention: str = field(default="softmax", metadata={"choices": ("softmax", "linear")})
    """``softmax`` (ring/Ulysses/hybrid/all-gather) or ``linear`` (lightning attention, LASP-2)."""
    tied_embeddings: bool = False
    """Input embedding shared with the LM head."""

    def __post_init__(self) -> None:
        if self.kv_heads is None:
            self.kv_heads = self.heads
        if self.head_dim is None:
            if self.hidden % self.heads:
                raise ValueError(f"model.hidden ({self.hidden}) must divide by model.heads ({self.heads}) "
                                 "or give model.head_dim")
            self.head_dim = self.hidden // self.heads
        for f in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab"):
            if getattr(self, f) < 1:
                raise ValueError(f"model.{f} must be >= 1, got {getattr(self, f)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"model.heads ({self.heads}) must be a multiple of model.kv_heads ({self.kv_heads})")
        if self.attention not in ("softmax", "linear"):
            raise ValueError(f"model.attention must be 'softmax' or 'linear', got {self.attention!r}")

    def layer_matmul_params(self) -> int:
        """Matmul parameters of one block (projections and FFN; norms are negligible)."""
        h, d = self.hidden, self.head_dim
        attn = h * (self.heads * d + 2 * self.kv_heads * d) + self.heads * d * h  # type: ignore[operator]
        if self.attention == "linear":  # TNL token mixer: q, k, v, u and the output projection
            attn = 4 * h * self.heads * d + self.heads * d * h  # type: ignore[operator]
        return attn + (3 if self.gated_ffn else 2) * h * self.ffn

    def params(self) -> int:
        """All parameters (blocks, embedding, LM head)."""
        emb = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * (self.layer_matmul_params() + 2 * self.hidden) + emb + self.hidden

    def dense_flops_per_token(self) -> float:
        """Forward matmul FLOPs per token over all blocks plus the LM head (attention scores excluded)."""
        return 2.0 * (self.layers * self.layer_matmul_params() + self.vocab * self.hidden)

    def saved_bytes_per_token(self, dtype_bytes: int = 2, *, tiled: bool = False) -> dict[str, float]:
        """Bytes one block keeps for backward per token, by component, without checkpointing.

        MEASURED, not assumed: these are the exact counts ``longreach bench memory`` takes with
        ``saved_tensors_hooks`` on our Llama block (``tests/test_plan.py`` re-measures them on several
        shapes, bf16 and fp32, and requires equality). With ``e`` = element bytes:

        * attention: its input, the rotated q and k, v and the output ``e·(h + 2·H·d + 2·Hkv·d)``, plus
          the fp32 log-sum-exp ``4·H`` (RoPE tables are per model: :meth:`model_saved_bytes_per_token`);
        * MLP: its input and four ``ffn``-wide tensors (gate, up, SiLU, product) ``e·(h + 4·ffn)``
          (``e·(h + 2·ffn)`` ungated); sequence-tiled: its input only, ``e·h``;
        * norms, two per block: input, float32 copy, rsqrt ``(e + 4)·h + 4`` each; tiled: ``e·h`` each.
        """
        h, e = self.hidden, dtype_bytes
        qd, kvd = self.heads * self.head_dim, self.kv_heads * self.head_dim  # type: ignore[operator]
        attn = e * (h + 2 * qd + 2 * kvd) + 4 * self.heads
        if tiled:
            return {"attention": attn, "mlp": e * h, "norms": 2 * e * h}
        return {"attention": attn, "mlp": e * (h + (4 if self.gated_ffn else 2) * self.ffn),
                "norms": 2 * ((e + 4) * h + 4)}

    def model_saved_bytes_per_token(self, dtype_bytes: int = 2, *, tiled: bool = False) -> dict[str, float]:
        """Bytes kept per token once per model (measured like :meth:`saved_bytes_per_token`): the float32
        RoPE cos/sin tables ``4·d``, the token ids ``8``, and the final norm and loss input — with
        tiling one checkpointed region that keeps only the last hidden state ``e·h``."""
        h, e = self.hidden, dtype_bytes
        out = {"rope": 4.0 * self.head_dim, "embedding": 8.0}  # type: ignore[operator]
        if tiled:
            out["loss"] = e * h
        else:
            out.update(norms=(e + 4) * h + 4, loss=e * h + 4)
        return out


MODELS: dict[str, ModelShape] = {
    "llama2_7b": ModelShape(name="Llama-2-7B", layers=32, hidden=4096, heads=32, kv_heads=32, ffn=11008, vocab=32000),
    "llama2_13b": ModelShape(name="Llama-2-13B", layers=40, hidden=5120, heads=40, kv_heads=40, ffn=13824,
                             vocab=32000),
    "llama2_70b": ModelShape(name="Llama-2-70B", layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672,
                             vocab=32000),
    "llama3_8b": ModelShape(name="Llama-3-8B", layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336,
                            vocab=128256),
    "tnl_7b": ModelShape(name="TransNormerLLM-7B", layers=30, hidden=4096, heads=32, ffn=11008, vocab=64000,
                         attention="linear"),
}


# ------------------------------------------------------------------------------------------------
# links
# ------------------------------------------------------------------------------------------------
def _link(profile: DeviceProfile, span: int) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) of a group whose members span ``span`` consecutive ranks."""
    if span <= profile.gpus_per_node:
        return profile.intra_bw * profile.link_efficiency, profile.latency_intra
    return profile.inter_bw * profile.link_efficiency, profile.latency_inter


def _msg(profile: DeviceProfile, nbytes: float, span: int) -> float:
    bw, lat = _link(profile, span)
    return lat + nbytes / bw


def _all_to_all(profile: DeviceProfile, nbytes_local: float, size: int) -> float:
    """Even all-to-all of a rank's ``nbytes_local`` over ``size`` consecutive ranks (one call)."""
    if size <= 1:
        return 0.0
    g = profile.gpus_per_node
    sent = nbytes_local * (size - 1) / size
    if size <= g:
        return profile.latency_intra + sent / (profile.intra_bw * profile.link_efficiency)
    # peers outside this rank's node receive (size − g)/(size − 1) of what it sends, over its own NIC
    inter = sent * (size - g) / (size - 1)
    intra = sent - inter
    return profile.latency_inter + max(intra / (profile.intra_bw * profile.link_efficiency),
                                       inter / (profile.inter_bw * profile.link_efficiency))


def collective_time(profile: DeviceProfile, nbytes: float, size: int, *, latency_steps: int | None = None) -> float:
    """Reduce-scatter or all-gather of a ``nbytes`` buffer over ``size`` ranks packed by node (hierarchical)."""
    if size <= 1:
        return 0.0
    g = min(size, profile.gpus_per_node)
    nodes = math.ceil(size / profile.gpus_per_node)
    t = (g - 1) / g * nbytes / (profile.intra_bw * profile.link_efficiency)
    t += (nodes - 1) / nodes * nbytes / g / (profile.inter_bw * profile.link_efficiency) if nodes > 1 else 0.0
    steps = latency_steps if latency_steps is not None else (g - 1) + (nodes - 1)
    return t + steps * (profile.latency_inter if nodes > 1 else profile.latency_intra)


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------
@dataclass(kw_only=True, slots=True)
class AttentionCost:
    """Predicted cost of one context-parallel attention call (one layer), max over ranks."""

    fwd_s: float
    """Forward seconds."""
    bwd_s: float
    """Backward seconds."""
    compute_fwd_s: float
    """Forward kernel seconds on the busiest rank (no communication)."""
    comm_fwd_s: float
    """Forward communication seconds if nothing overlapped."""
    bytes_fwd: float
    """Bytes sent per rank in the forward."""
    bytes_bwd: float
    """Bytes sent per rank in the backward."""
    imbalance: float
    """Busiest rank's attention work over the mean."""
    buffer_bytes: float
    """Transient communication buffers per rank for one layer (forward+backward peak)."""


def _busiest_share(layout: str, size: int, causal: bool) -> float:
    """Share of the total attention work on the busiest of ``size`` ranks."""
    if size <= 1:
        return 1.0
    if causal and layout == "contiguous":
        return (2 * size - 1) / size ** 2
    return 1.0 / size


def _ring(c_first: float, c_step: float, m: float, steps: int, overlap: float) -> float:
    step = max(c_step, m) + (1.0 - overlap) * min(c_step, m)
    return c_first + steps * step


def attention_cost(
    *,
    strategy: str,
    layout: str,
    world: int,
    seq_len: int,
    batch: int = 1,
    heads: int,
    kv_heads: int,
    head_dim: int,
    density: float | None = None,
    causal: bool = True,
    dtype_bytes: int = 2,
    profile: DeviceProfile,
    ulysses_degree: int | None = None,
    linear: bool = False,
) -> AttentionCost:
    """Predict one attention layer under context parallelism (forward and backward).

    Args:
        strategy: ``none`` (one rank), ``ring``, ``ulysses``, ``hybrid``, ``allgather`` or ``lasp2``.
        layout: ``contiguous``, ``zigzag`` or ``stripe`` (decides the causal balance).
        world: context-parallel ranks P.
        seq_len, batch, heads, kv_heads, head_dim: the global attention shape ``[B, S, H, D]``.
        density: allowed share of the S×S pairs (None: causal density if ``causal`` else 1).
        causal: the mask is causal-shaped (triangle), which makes contiguous layouts unbalanced.
        dtype_bytes: element size of q/k/v.
        profile: device profile (FLOP/s, links, overlap).
        ulysses_degree: hybrid's Ulysses group size U (ring over P/U).
        linear: lightning (linear) attention instead of softmax (use with ``lasp2`` or ``none``).

    Returns:
        :class:`AttentionCost` (seconds, bytes and balance; max over ranks).
    """
    p, s, b, h, hkv, d = world, seq_len, batch, heads, kv_heads, head_dim
    if p < 1 or s < 1:
        raise ValueError(f"attention_cost: world ({p}) and seq_len ({s}) must be >= 1")
    if density is None:
        density = causal_density(s) if causal else 1.0
    f_fwd = profile.kernel_flops
    if profile.concurrency is not None and p > profile.concurrency:
        f_fwd *= profile.concurrency / p  # ranks sharing a host's cores
    f_bwd = f_fwd * profile.bwd_efficiency
    ov = profile.call_overhead
    n = s // p
    q_bytes = b * n * h * d * dtype_bytes
    kv_bytes = 2 * b * n * hkv * d * dtype_bytes  # local K and V
    out_bytes = q_bytes

    if linear or strategy == "lasp2":
        # lightning attention, blocks of 64: intra-block (masked) scores ≈ 64·(D+E) FLOPs per token and
        # head, inter-block q·KV and the KV update 4·D·E
        flops = b * s * h * (64 * 2 * d + 4 * d * d)
        c = flops / p / f_fwd + ov
        state = b * h * d * d * 4  # fp32 state per head
        comm = (p - 1) * _msg(profile, state, p) if p > 1 else 0.0
        return AttentionCost(fwd_s=c + comm, bwd_s=2 * c / profile.bwd_efficiency + comm, compute_fwd_s=c,
                             comm_fwd_s=comm, bytes_fwd=(p - 1) * state, bytes_bwd=(p - 1) * state, imbalance=1.0,
                             buffer_bytes=p * state * 2)

    total = attention_flops(batch=b, seq_len=s, heads=h, head_dim=d, density=density)
    share = _busiest_share(layout, p, causal)
    imbalance = share * p
    if strategy == "none" or p == 1:
        c = total / f_fwd + ov
        cb = ATTN_BWD_FACTOR * total / f_bwd + ov
        return AttentionCost(fwd_s=c, bwd_s=cb, compute_fwd_s=c, comm_fwd_s=0.0, bytes_fwd=0.0, bytes_bwd=0.0,
                             imbalance=1.0, buffer_bytes=0.0)

    if strategy == "ring":
        w_first = total / p ** 2  # each rank's diagonal block
        w_step = (share * total - w_first) / (p - 1)
        m = _msg(profile, kv_bytes, p)
        mb = _msg(profile, 2 * kv_bytes, p)  # K/V and dK/dV travel together in the backward
        fwd = _ring(w_first / f_fwd + ov, w_step / f_fwd + ov, m, p - 1, profile.overlap)
        bwd = _ring(ATTN_BWD_FACTOR * w_first / f_bwd + ov, ATTN_BWD_FACTOR * w_step / f_bwd + ov, mb, p - 1,
                    profile.overlap) + _msg(profile, kv_bytes, p)  # dK/dV's last hop home
        return AttentionCost(fwd_s=fwd, bwd_s=bwd, compute_fwd_s=share * total / f_fwd + p * ov,
                             comm_fwd_s=(p - 1) * m, bytes_fwd=(p - 1) * kv_bytes, bytes_bwd=(p - 1) * 2 * kv_bytes + kv_bytes,
                             imbalance=imbalance, buffer_bytes=2 * kv_bytes + 2 * kv_bytes * max(1, 4 // dtype_bytes))

    if strategy in ("ulysses", "hybrid"):
        u = p if strategy == "ulysses" else int(ulysses_degree or 0)
        if u < 1 or p % u:
            raise ValueError(f"attention_cost: hybrid needs ulysses_degree dividing {p}, got {ulysses_degree}")
        r = p // u
        rep = u / hkv if u > hkv else 1.0
        a2a_q = _all_to_all(profile, q_bytes, u)
        a2a_kv = _all_to_all(profile, kv_bytes / 2 * rep, u)
        a2a = a2a_q + 2 * a2a_kv + a2a_q  # q, k, v in; out back
        bytes_a2a = (u - 1) / u * (q_bytes + rep * kv_bytes + out_bytes) if u > 1 else 0.0
        if r == 1:
            c = total / p / f_fwd + ov
            cb = ATTN_BWD_FACTOR * total / p / f_bwd + ov
            fwd, bwd = a2a + c, a2a + cb
            comm, bytes_ring, ring_buf = a2a, 0.0, 0.0
        else:
            # ring over R strided groups; after the all-to-all each rank holds U·n tokens × Hkv/U heads
            rshare = _busiest_share(layout, r, causal)
            w_first = total / u / r ** 2
            w_step = (rshare * total / u - w_first) / (r - 1)
            ring_kv = kv_bytes * rep
            m = _msg(profile, ring_kv, r * u)
            mb = _msg(profile, 2 * ring_kv, r * u)
            fwd = a2a + _ring(w_first / f_fwd + ov, w_step / f_fwd + ov, m, r - 1, profile.overlap)
            bwd = a2a + _ring(ATTN_BWD_FACTOR * w_first / f_bwd + ov, ATTN_BWD_FACTOR * w_step / f_bwd + ov, mb,
                              r - 1, profile.overlap) + m
            comm = a2a + (r - 1) * m
            bytes_ring = (r - 1) * ring_kv
            ring_buf = 4 * ring_kv
            imbalance = rshare * r
        c_fwd = total / p * imbalance / f_fwd
        # after the all-to-all: q, k, v, out of the whole sequence on H/U heads — as many bytes as the
        # local ones — and their gradients in the backward
        buf = 2 * (q_bytes + rep * kv_bytes + out_bytes) + ring_buf
        return AttentionCost(fwd_s=fwd, bwd_s=bwd, compute_fwd_s=c_fwd, comm_fwd_s=comm, bytes_fwd=bytes_a2a + bytes_ring,
                             bytes_bwd=bytes_a2a + 2 * bytes_ring, imbalance=imbalance, buffer_bytes=buf)

    if strategy == "allgather":
        gather = (p - 1) * _msg(profile, kv_bytes, p)
        w_first = total / p ** 2
        w_rest = share * total - w_first
        fwd = max(w_first / f_fwd + ov, gather) + w_rest / f_fwd + (p - 1) * ov
        bwd = gather + ATTN_BWD_FACTOR * share * total / f_bwd + p * ov + gather  # re-gather + reduce-scatter
        return AttentionCost(fwd_s=fwd, bwd_s=bwd, compute_fwd_s=share * total / f_fwd + p * ov, comm_fwd_s=gather,
                             bytes_fwd=(p - 1) * kv_bytes, bytes_bwd=2 * (p - 1) * kv_bytes, imbalance=imbalance,
                             buffer_bytes=p * kv_bytes * (1 + max(1, 4 // dtype_bytes)))

    raise ValueError(f"attention_cost: unknown strategy {strategy!r}; choose from "
                     f"{', '.join(SOFTMAX_STRATEGIES + LINEAR_STRATEGIES[1:])}")


# ------------------------------------------------------------------------------------------------
# a whole training step
# ------------------------------------------------------------------------------------------------
@dataclass(kw_only=True, slots=True)
class MemoryOptions:
    """What a configuration keeps, recomputes, tiles and offloads (one memory model for plan and --validate)."""

    checkpointing: bool = True
    """Activation checkpointing per block: only block inputs are kept between forward and backward."""
    offload: bool = False
    """Checkpointed block inputs in host memory (``model.checkpoint_offload``); two in flight on the device."""
    tiled: bool = False
    """Sequence-tiled MLP/norms and the final norm + loss region (``model.sequence_tile``)."""
    tile_tokens: int = 8192
    """Tokens per tile when ``tiled``."""
    optimizer_offload: bool = False
    """Adam state (fp32 master, m, v) in host memory (``engine.cpu_offload``)."""
    loss_chunk: int = 4096
    """Tokens per logits chunk of the loss."""

    @property
    def label(self) -> str:
        parts = [p for p, on in (("ckpt", self.checkpointing), ("offload", self.offload), ("tiled", self.tiled),
                                 ("opt→host", self.optimizer_offload)) if on]
        return "+".join(parts) or "none"


@dataclass(kw_only=True, slots=True)
class StepCost:
    """Predicted training step of ``gpus`` devices, each data-parallel replica holding one sequence."""

    strategy: str
    """Context-parallel strategy (``none`` = pure data parallelism)."""
    layout: str
    """Sequence layout."""
    cp: int
    """Context-parallel degree."""
    ulysses_degree: int | None
    """Hybrid/Ulysses group size."""
    dp: int
    """Data-parallel replicas (sequences per step)."""
    checkpointing: bool
    """Full activation checkpointing per block."""
    step_s: float
    """Seconds per optimizer step."""
    tokens_per_s: float
    """Tokens per second over the whole job."""
    mfu: float | None
    """Model FLOPs (no recompute) per second over the job's peak."""
    memory_bytes: float
    """Peak bytes per device."""
    fits: bool
    """memory_bytes ≤ the device's memory."""
    breakdown: dict[str, float]
    """Seconds (attention, dense, exposed comm) and bytes (states, activations, buffers) behind the totals."""
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    """What is checkpointed, tiled and offloaded."""

    @property
    def label(self) -> str:
        if self.strategy == "ring":
            return "zigzag ring" if self.layout == "zigzag" else "ring"
        if self.strategy == "hybrid":
            return f"hybrid U{self.ulysses_degree}×R{self.cp // (self.ulysses_degree or 1)}"
        return self.strategy


def _states_bytes(params: float, zero: int, shards: int, layer_params: float, *,
                  optimizer_offload: bool = False) -> float:
    """Weights (bf16) + grads (bf16) + Adam (fp32 master, m, v) = 16 B/param, sharded per ZeRO stage;
    with ``optimizer_offload`` the 12 B/param of Adam live in host memory."""
    opt = 0.0 if optimizer_offload else 12.0
    if zero == 0:
        return (4 + opt) * params
    if zero == 1:
        return 4 * params + opt * params / shards
    if zero == 2:
        return 2 * params + (2 + opt) * params / shards
    return (4 + opt) * params / shards + 2 * 2 * layer_params  # ZeRO-3/FSDP: two gathered blocks in flight


def memory_per_rank(model: ModelShape, *, tokens: float, opts: MemoryOptions, zero: int, shards: int,
                    attention_buffers: float = 0.0, dtype_bytes: int = 2, params: float | None = None,
                    frozen_params: float = 0.0, stream_bytes: int | None = None,
                    separate_final_norm: bool = False) -> dict[str, float]:
    """Peak bytes per rank of one training step, by part, and the host bytes it offloads.

    The saved-for-backward terms are the measured ones (:meth:`ModelShape.saved_bytes_per_token`). The
    peak is the resident part (states, kept block inputs, per-model tensors) plus the largest of the
    backward phases, which do not coexist: the loss (a logits chunk and its gradient, fp32), the MLP of
    one recomputed block (the block's saved tensors, the ``[tile, ffn]`` working set) and its attention
    (its saved q/k/v/out, their gradients with an fp32 dq accumulator, the strategy's communication
    buffers). Without checkpointing every block's saved tensors are resident instead. Two flowing
    hidden-state gradients are always counted. Then 5% fragmentation and 1.5 GB of context/NCCL.

    Args:
        tokens: tokens per rank (sequence / cp × micro-batch).
        opts: :class:`MemoryOptions`.
        zero: ZeRO stage (FSDP = 3) of the 16 B/param states, sharded over ``shards`` ranks.
        attention_buffers: the strategy's transient communication buffers (:class:`AttentionCost`).
        params: the trained parameter count (default :meth:`ModelShape.params`; a dry run counts the
            model, a LoRA fine-tune passes its adapters).
        frozen_params: parameters kept as frozen bf16 copies (2 B/param, sharded only by ZeRO-3/FSDP): the
            base model of a LoRA fine-tune.
        stream_bytes: bytes per element of the residual stream (default ``dtype_bytes``). bf16 compute
            beside fp32 trainable embeddings makes it 4 (measured in tests/test_hf_memory.py): every
            hidden state kept for backward — block inputs (on the device or offloaded), the final
            norm's and the loss's inputs, the two flowing gradients — is counted at this width.
        separate_final_norm: the sequence-tiled final norm keeps its input beside the loss's (an HF
            decoder's final norm is not one checkpointed region with the loss, as in longreach's models).

    Returns:
        bytes by part (``states``, ``checkpoints``, ``per_model``, ``phase_*``, ``activation_bytes``,
        ``total``) and ``host`` (offloaded checkpoints and optimizer state per rank).
    """
    n, e, h, L = tokens, dtype_bytes, model.hidden, model.layers
    stream = e if stream_bytes is None else stream_bytes
    params = float(model.params()) if params is None else params
    layer_params = float(model.layer_matmul_params())
    states = _states_bytes(params, zero, shards, layer_params, optimizer_offload=opts.optimizer_offload)
    states += 2.0 * frozen_params / (shards if zero >= 3 else 1)
    block = model.saved_bytes_per_token(e, tiled=opts.tiled)
    per_model = n * sum(model.model_saved_bytes_per_token(e, tiled=opts.tiled).values())
    flowing = 2 * n * e * h  # gradient of the hidden state in and out of a block
    # a wider residual stream: the final norm's and loss's inputs and the two flowing gradients, each
    # (stream − e) bytes more per element; a separate tiled final norm keeps one more hidden state
    wide = n * h * ((stream - e) * 4 + (stream if opts.tiled and separate_final_norm else 0))
    qd, kvd = model.heads * model.head_dim, model.kv_heads * model.head_dim  # type: ignore[operator]
    tile = min(n, opts.tile_tokens) if opts.tiled else n
    ffn_work = tile * e * (4 if model.gated_ffn else 2) * model.ffn * 2  # recomputed tile and its gradients
    attn_work = n * (e * (qd + 2 * kvd) + 4 * qd)  # dq, dk, dv and an fp32 dq accumulator
    if opts.checkpointing:
        ckpt = n * stream * h * (2 if opts.offload else L)
        acts = ckpt + n * sum(block.values())  # kept inputs + one block recomputed
        phases = {"phase_loss": min(n, opts.loss_chunk) * model.vocab * 4 * 2,
                  "phase_mlp": n * sum(block.values()) + ffn_work,
                  "phase_attention": n * block["attention"] + attn_work + attention_buffers}
    else:
        ckpt = 0.0
        acts = L * n * sum(block.values())
        phases = {"phase_loss": min(n, opts.loss_chunk) * model.vocab * 4 * 2, "phase_mlp": ffn_work,
                  "phase_attention": attn_work + attention_buffers}
    resident = states + (ckpt if opts.checkpointing else acts) + per_model + flowing + wide
    total = (resident + max(phases.values())) * 1.05 + 1.5e9
    host = (n * stream * h * L if opts.checkpointing and opts.offload else 0.0)
    host += 12.0 * params / max(shards if zero >= 1 else 1, 1) if opts.optimizer_offload else 0.0
    return {"states": states, "checkpoints": ckpt, "per_model": per_model + flowing + wide, **phases,
            "activation_bytes": acts, "total": total, "host": host}


MEMORY_PARTS = ("states", "checkpoints", "per_model", "phase_loss", "phase_mlp", "phase_attention", "total", "host")
"""The parts of :func:`memory_per_rank` a run's memory report shows."""


def run_memory(model: ModelShape, *, seq_len: int, micro_batch: int, cp: int, strategy: str, layout: str,
               ulysses_degree: int | None, opts: MemoryOptions, zero: int, shards: int, profile: DeviceProfile,
               dtype_bytes: int = 2, params: float | None = None, frozen_params: float = 0.0,
               stream_bytes: int | None = None, separate_final_norm: bool = False) -> dict[str, float]:
    """Peak bytes per rank of one configured run (what ``longreach launch --validate`` reports).

    :func:`memory_per_rank` for ``micro_batch × seq_len / cp`` tokens per rank, with the communication
    buffers of ``strategy`` over ``cp`` ranks (LASP-2 for linear attention) from :func:`attention_cost`.

    Returns:
        bytes per rank by part, :data:`MEMORY_PARTS`.
    """
    linear = model.attention == "linear"
    buffers = 0.0
    if cp > 1:
        buffers = attention_cost(strategy="lasp2" if linear else strategy, layout=layout, world=cp, seq_len=seq_len,
                                 batch=micro_batch, heads=model.heads, kv_heads=model.kv_heads,
                                 head_dim=model.head_dim, dtype_bytes=dtype_bytes, profile=profile,  # type: ignore[arg-type]
                                 ulysses_degree=ulysses_degree or None, linear=linear).buffer_bytes
    mem = memory_per_rank(model, tokens=micro_batch * seq_len // cp, opts=opts, zero=zero, shards=shards,
                          attention_buffers=buffers, dtype_bytes=dtype_bytes, params=params,
                          frozen_params=frozen_params, stream_bytes=stream_bytes,
                          separate_final_norm=separate_final_norm)
    return {k: mem[k] for k in MEMORY_PARTS}


def step_cost(
    model: ModelShape,
    profile: DeviceProfile,
    *,
    gpus: int,
    seq_len: int,
    strategy: str,
    cp: int,
    layout: str = "zigzag",
    ulysses_degree: int | None = None,
    checkpointing: bool = True,
    zero: int = 3,
    dtype_bytes: int = 2,
    memory: MemoryOptions | None = None,
) -> StepCost:
    """Predict one training step (forward+backward+optimizer) of ``model`` on ``gpus`` devices.

    Each of the ``dp = gpus / cp`` replicas processes one sequence of ``seq_len`` tokens split over
    ``cp`` ranks. Parameters and optimizer state are sharded over all ``gpus`` ranks by ZeRO stage
    ``zero`` (parameters are replicated across cp, so the gradient group is dp × cp); their
    collectives overlap with compute except when they take longer than it.

    ``memory`` (default: ``MemoryOptions(checkpointing=checkpointing)``) says what is checkpointed,
    tiled and offloaded; tiling costs one more MLP forward per block, offload costs the host copies
    where they outlast a block's compute.

    Returns:
        :class:`StepCost`.
    """
    opts = memory if memory is not None else MemoryOptions(checkpointing=checkpointing)
    checkpointing = opts.checkpointing
    if gpus % cp:
        raise ValueError(f"step_cost: cp ({cp}) must divide gpus ({gpus})")
    dp = gpus // cp
    n = seq_len / cp
    linear = model.attention == "linear"
    attn = attention_cost(strategy=strategy if cp > 1 else "none", layout=layout, world=cp, seq_len=seq_len,
                          heads=model.heads, kv_heads=model.kv_heads, head_dim=model.head_dim,  # type: ignore[arg-type]
                          causal=True, dtype_bytes=dtype_bytes, profile=profile, ulysses_degree=ulysses_degree,
                          linear=linear)
    dense_flops = profile.dense_flops
    layer_dense_fwd = n * 2.0 * model.layer_matmul_params() / dense_flops
    recompute = 1.0 if checkpointing else 0.0
    attn_s = model.layers * (attn.fwd_s * (1 + recompute) + attn.bwd_s)
    dense_s = model.layers * layer_dense_fwd * (3 + recompute) + 3 * n * 2.0 * model.vocab * model.hidden / dense_flops
    if opts.tiled:  # each MLP tile is recomputed once more; final norm + loss region once more
        mlp_fwd = n * 2.0 * (3 if model.gated_ffn else 2) * model.hidden * model.ffn / dense_flops
        dense_s += model.layers * mlp_fwd + n * 2.0 * model.vocab * model.hidden / dense_flops
    offload_s = 0.0
    if checkpointing and opts.offload:  # out in forward, back in backward, overlapped with each block
        copy = n * model.hidden * dtype_bytes / profile.host_bw
        block = (attn_s + dense_s) / model.layers / 2
        offload_s = 2 * model.layers * max(0.0, copy - block)
    if opts.optimizer_offload:  # gradients out, parameters back, Adam on the host
        offload_s += 2 * 2 * model.params() / gpus / profile.host_bw + model.params() / gpus / profile.host_adam
    compute = attn_s + dense_s + offload_s
    params = float(model.params())
    n_coll = 3 if zero == 3 else 2  # ZeRO-3: gather (fwd), gather (bwd), reduce-scatter; else RS + gather
    fsdp = n_coll * collective_time(profile, 2 * params, gpus) if gpus > 1 else 0.0
    exposed = max(fsdp - compute, fsdp / model.layers / n_coll if gpus > 1 else 0.0)
    step = compute + exposed
    tokens = dp * seq_len
    if linear:
        attn_model_flops = 0.0
    else:
        attn_model_flops = model.layers * (1 + ATTN_BWD_FACTOR) * attention_flops(
            batch=1, seq_len=seq_len, heads=model.heads, head_dim=model.head_dim, density=causal_density(seq_len))  # type: ignore[arg-type]
    model_flops = dp * (3 * model.dense_flops_per_token() * seq_len + attn_model_flops)
    mfu = model_flops / (step * gpus * profile.peak_flops) if profile.peak_flops else None
    # memory per device: the one model (also behind `longreach launch --validate`)
    mem = memory_per_rank(model, tokens=n, opts=opts, zero=zero, shards=gpus, attention_buffers=attn.buffer_bytes,
                          dtype_bytes=dtype_bytes)
    fits = mem["total"] <= profile.memory_bytes and mem["host"] <= profile.host_memory_bytes
    return StepCost(strategy=strategy if cp > 1 else "none", layout=layout, cp=cp, ulysses_degree=ulysses_degree,
                    dp=dp, checkpointing=checkpointing, step_s=step, tokens_per_s=tokens / step, mfu=mfu,
                    memory_bytes=mem["total"], fits=fits, memory=opts,
                    breakdown={"attention_s": attn_s, "dense_s": dense_s, "fsdp_comm_s": fsdp,
                               "exposed_comm_s": exposed, "attn_comm_fwd_s": attn.comm_fwd_s, "offload_s": offload_s,
                               "states_bytes": mem["states"], "activation_bytes": mem["activation_bytes"],
                               "buffer_bytes": attn.buffer_bytes, "imbalance": attn.imbalance,
                               **{f"mem_{k}": v for k, v in mem.items()}})
