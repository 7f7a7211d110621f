"""Mixture-of-Experts feed-forward layer with optional expert parallelism (Switch / GShard style).

Routing: router logits ``W_r x`` (float32) → softmax → (optionally mixed across tokens by the
attention-aware or similarity-aware rule, :mod:`longreach.mixtures.routing`) → top-k, renormalised.
A capacity factor c caps each expert at ``ceil(c · N · k / E)`` assignments of the N local tokens;
first choices are served before second choices, earlier tokens before later ones, and what does not
fit is dropped (the token keeps its residual path) and counted in :attr:`MoEFFN.stats`.

Experts are SwiGLU FFNs stored stacked (``experts.gate_proj/up_proj.weight [E, F, D]``,
``experts.down_proj.weight [E, D, F]``). The grouped
computation sorts (token, expert) assignments by expert and runs each expert on its contiguous
segment — a Python loop over experts, never over tokens.

Expert parallelism (:meth:`MoEFFN.shard_experts`): the experts are split over a process group; sorted
assignments travel to the rank that holds their expert and back through
:mod:`longreach.parallel.expert` (all-to-all with variable split sizes, explicit autograd). The
router is replicated; expert parameters are marked (:func:`is_expert_parameter`) because they differ
between ranks of the EP group and must not be averaged over it.

Auxiliary loss (``aux_loss`` after each forward): ``balance_coef · E·Σ fᵢPᵢ + z_coef · z-loss``,
computed over the local tokens of this rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from longreach.errors import ConfigError
from longreach.models.config import MOE_ROUTINGS
from longreach.models.rope import apply_rotary
from longreach.parallel.expert import combine_tokens, dispatch_tokens

from .routing import at_least_f32, RoutingTap, attention_mix, balance_loss, similarity_mix, top_k_gates, z_loss

__all__ = ["MoEConfig", "MoEFFN", "StackedLinear", "SwiGLUExperts", "is_expert_parameter", "expert_parameter_names", "ROUTINGS"]

ROUTINGS = MOE_ROUTINGS
_EXPERT_ATTR = "_longreach_expert_parallel"


@dataclass(kw_only=True, slots=True)
class MoEConfig:
    dim: int
    """Model width D."""
    hidden: int
    """Hidden size F of each SwiGLU expert."""
    num_experts: int = 8
    """Number of experts E."""
    top_k: int = 2
    """Experts per token."""
    capacity_factor: float | None = None
    """Assignments per expert capped at ceil(c·N·k/E) of the N local tokens; None = never drop."""
    balance_coef: float = 0.01
    """Coefficient of the load-balancing loss E·Σ fᵢPᵢ."""
    z_coef: float = 1e-3
    """Coefficient of the router z-loss."""
    routing: str = "token"
    """token (standard gate), attention (P = A·softmax(W_r X)) or similarity (P = S·softmax(W_r X))."""
    similarity_tau: float = 1.0
    """Temperature τ of similarity-aware routing."""
    similarity_heads: int = 1
    """Heads of similarity-aware routing: S is the mean of per-head causal row-softmaxes over ``dim /
    similarity_heads`` features each (several heads let Ulysses split them over the cp group)."""
    routing_grad: bool = True
    """Attention-/similarity-aware routing: let gradients flow through the mixing matrix (A into the
    preceding layer's q and k; S into x and W_s), as plain autograd of P = A·softmax(W_r X) gives (the
    method's formulation). False treats A as a constant (gradients reach only the router)."""
    expert_parallel: bool = False
    """Under context parallelism, split the experts over the cp group (all-to-all token exchange)."""
    router_init_std: float = 0.02
    """Std of the router initialisation (0: zero logits, uniform gates)."""
    init_std: float = 0.02
    """Std of the expert weight initialisation."""

    def __post_init__(self) -> None:
        if self.dim < 1 or self.hidden < 1:
            raise ConfigError(f"moe.dim and moe.hidden must be >= 1, got {self.dim}, {self.hidden}")
        if self.num_experts < 1:
            raise ConfigError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"moe.top_k must be in 1..num_experts={self.num_experts}, got {self.top_k}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"moe.capacity_factor must be > 0 or null, got {self.capacity_factor}")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"moe.routing must be one of {', '.join(ROUTINGS)}; got {self.routing!r}")
        if self.similarity_tau <= 0:
            raise ConfigError(f"moe.similarity_tau must be > 0, got {self.similarity_tau}")
        if self.similarity_heads < 1 or (self.routing == "similarity" and self.dim % self.similarity_heads):
            raise ConfigError(f"moe.similarity_heads={self.similarity_heads} must be >= 1 and divide dim={self.dim}")
        if self.balance_coef < 0 or self.z_coef < 0 or self.router_init_std < 0 or self.init_std < 0:
            raise ConfigError("moe.balance_coef, z_coef, router_init_std and init_std must be >= 0")


def is_expert_parameter(p: torch.Tensor) -> bool:
    """True for expert weights sharded over an expert-parallel group (not replicated across it)."""
    return bool(getattr(p, _EXPERT_ATTR, False))


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of expert-parallel parameters (for DDP's ignore list)."""
    return [n for n, p in model.named_parameters() if is_expert_parameter(p)]


class StackedLinear(nn.Module):
    """N bias-free linear maps, ``weight [N, out, in]`` (nn.Linear's convention per expert)."""

    def __init__(self, n: int, in_features: int, out_features: int, *, std: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))
        nn.init.normal_(self.weight, std=std)


class SwiGLUExperts(nn.Module):
    """E SwiGLU FFNs ``down(silu(gate x) · up x)`` with stacked weights (HF Llama names per expert)."""

    def __init__(self, n: int, dim: int, hidden: int, *, std: float = 0.02) -> None:
        super().__init__()
        self.gate_proj = StackedLinear(n, dim, hidden, std=std)  # [E, F, D]
        self.up_proj = StackedLinear(n, dim, hidden, std=std)  # [E, F, D]
        self.down_proj = StackedLinear(n, hidden, dim, std=std)  # [E, D, F]

    def forward(self, x: torch.Tensor, counts: list[int], offset: int = 0) -> torch.Tensor:
        """Run expert ``offset + e`` on the e-th contiguous segment of ``x`` ``[M, D]`` (``counts[e]`` rows)."""
        w1, w3, w2 = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        outs = []
        if w1.dtype != x.dtype:
            # split experts are left out of FSDP2's mixed-precision casts: compute in the activations' dtype
            # (the fp32 weights stay the master copy; autograd casts the gradients back)
            w1, w3, w2 = w1.to(x.dtype), w3.to(x.dtype), w2.to(x.dtype)
        for e, seg in enumerate(torch.split(x, counts)):  # loop over experts, never over tokens
            h = F.silu(F.linear(seg, w1[offset + e])) * F.linear(seg, w3[offset + e])  # [n_e, F]
            outs.append(F.linear(h, w2[offset + e]))  # [n_e, D]
        if not outs:
            return x.new_zeros((0, w2.shape[1]))
        return torch.cat(outs)  # [M, D]


class MoEFFN(nn.Module):
    """Top-k routed SwiGLU mixture of experts.

    ``forward(x [B, S, D]) -> [B, S, D]``; after it, ``aux_loss`` (scalar tensor) and ``stats``
    (``tokens_per_expert`` [E] choices made by the local tokens, ``kept_per_expert`` [E],
    ``dropped`` assignments, ``assignments`` = N·k, and with EP ``received_per_local_expert``).
    """

    def __init__(self, cfg: MoEConfig, *, layer_idx: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        e, d, f = cfg.num_experts, cfg.dim, cfg.hidden
        self.router = nn.Linear(d, e, bias=False)
        self.experts = SwiGLUExperts(e, d, f, std=cfg.init_std)
        self.sim_proj = nn.Linear(d, d, bias=False) if cfg.routing == "similarity" else None
        self.ep_group: dist.ProcessGroup | None = None
        self.ep_size = 1
        self.ep_rank = 0
        self.ep_replicated = False
        self.routing_tap: RoutingTap | None = None
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor | int] = {}
        self.reset_parameters()

    @property
    def num_local_experts(self) -> int:
        return self.cfg.num_experts // self.ep_size

    def reset_parameters(self) -> None:
        for lin in (self.experts.gate_proj, self.experts.up_proj, self.experts.down_proj):
            nn.init.normal_(lin.weight, std=self.cfg.init_std)
        if self.cfg.router_init_std > 0:
            nn.init.normal_(self.router.weight, std=self.cfg.router_init_std)
        else:
            nn.init.zeros_(self.router.weight)
        if self.sim_proj is not None:
            nn.init.eye_(self.sim_proj.weight)

    @torch.no_grad()
    def shard_experts(self, group: dist.ProcessGroup | None, *, replicate_params: bool = False) -> None:
        """Compute only this rank's ``E / P`` experts; later forwards exchange tokens over ``group``.

        Every rank must hold the same full expert weights when this is called (same seed or a
        broadcast): rank r owns experts ``r·E/P … (r+1)·E/P − 1``. Call before building the optimizer.

        ``replicate_params=False`` keeps only the owned experts' weights (marked expert-parallel: the
        data-parallel wrapper must not reduce them over ``group``). ``replicate_params=True`` keeps every
        expert's weights but computes only the owned ones, so the other experts' gradients are zero on
        this rank and a SUM all-reduce over ``group`` (the trainer's DDP) yields every expert's exact
        gradient — expert-parallel compute and communication, replicated parameter memory.
        """
        p, r = dist.get_world_size(group), dist.get_rank(group)
        e = self.cfg.num_experts
        if self.ep_size != 1:
            raise RuntimeError("MoEFFN.shard_experts called twice")
        if e % p != 0:
            raise ValueError(f"moe.num_experts={e} must divide by the expert-parallel group size {p}")
        self.ep_group, self.ep_size, self.ep_rank, self.ep_replicated = group, p, r, replicate_params
        if replicate_params:
            return
        el = e // p
        for lin in (self.experts.gate_proj, self.experts.up_proj, self.experts.down_proj):
            full = lin.weight
            part = nn.Parameter(full.detach()[r * el:(r + 1) * el].clone(), requires_grad=full.requires_grad)
            setattr(part, _EXPERT_ATTR, True)
            lin.weight = part

    def parallelize_context(self, cp_group: dist.ProcessGroup | None, parallel_cfg: object) -> None:
        """``parallelize`` hook: with ``expert_parallel``, experts are split over the cp group.

        Parameters stay replicated (``replicate_params=True``) so the trainer's SUM all-reduce over
        dp × cp gives exact expert gradients without an ignore list.
        """
        if self.cfg.expert_parallel and cp_group is not None and dist.get_world_size(cp_group) > 1:
            self.shard_experts(cp_group, replicate_params=True)

    # --- routing ---------------------------------------------------------------------------
    def bind_attention(self, attn: nn.Module) -> None:
        """Read the preceding attention layer's q, k (post-RoPE), context and inner attention.

        A decoder block calls it once, when it builds its feed-forward next to its attention; with
        ``routing="token"`` it does nothing.
        Our attention layers (MoH, SQA, MoA) record them on a :class:`RoutingTap`; any other layer
        with ``q_proj``/``k_proj``, ``n_heads``, ``n_kv_heads``, ``head_dim`` (the Llama ``mha``) gets a
        forward hook that recomputes q, k from its input (with gradient unless ``routing_grad`` is off,
        so routing's gradient reaches q_proj and k_proj as it does through our own layers' taps).
        """
        if self.cfg.routing == "token":
            return  # token routing reads nothing of the attention layer
        tap = RoutingTap()
        self.routing_tap = tap
        if hasattr(attn, "routing_tap"):
            attn.routing_tap = tap
            return
        for name in ("q_proj", "k_proj", "n_heads", "n_kv_heads", "head_dim", "inner_attention"):
            if not hasattr(attn, name):
                raise TypeError(f"moe routing={self.cfg.routing!r}: attention layer {type(attn).__name__} has no "
                                f"'{name}' to read q, k from")
        old = getattr(attn, "_longreach_routing_hook", None)
        if old is not None:
            old.remove()

        def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x, cos, sin, ctx = args[:4]
            b, s, _ = x.shape
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.routing_grad):
                q = apply_rotary(mod.q_proj(x).view(b, s, mod.n_heads, mod.head_dim), cos, sin)  # [B, S, H, D]
                k = apply_rotary(mod.k_proj(x).view(b, s, mod.n_kv_heads, mod.head_dim), cos, sin)  # [B, S, Hkv, D]
            tap.record(q, k, ctx.for_layer(getattr(mod, "layer_idx", ctx.layer)), mod.inner_attention)

        attn._longreach_routing_hook = attn.register_forward_hook(hook)

    def _route_probs(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        probs = logits.softmax(-1)  # [N, E] float32
        if self.cfg.routing == "token":
            return probs
        tap = self.routing_tap
        ctx = tap.ctx if tap is not None and tap.ready else None
        inner = tap.inner if tap is not None and tap.ready else None
        p3 = probs.view(b, s, -1)  # [B, S, E]
        if self.cfg.routing == "attention":
            if tap is None or not tap.ready:
                raise RuntimeError(
                    f"MoE layer {self.layer_idx}: routing='attention' needs the preceding attention layer's q, k; "
                    "a block built from a config binds them (MoEFFN.bind_attention(attn) for a hand-built one)")
            q, k = (tap.q, tap.k) if self.cfg.routing_grad else (tap.q.detach(), tap.k.detach())
            mixed = attention_mix(p3, q, k, inner=inner, ctx=ctx)  # [B, S, E]
        else:
            xs, xp = (x, self.sim_proj(x)) if self.cfg.routing_grad else (x.detach(), self.sim_proj(x).detach())
            mixed = similarity_mix(p3, xs, xp, tau=self.cfg.similarity_tau, heads=self.cfg.similarity_heads,
                                   inner=inner, ctx=ctx)
        if tap is not None:
            tap.clear()
        return mixed.reshape(b * s, -1)

    def _capacity(self, n: int) -> int | None:
        cf = self.cfg.capacity_factor
        if cf is None:
            return None
        return max(1, math.ceil(cf * n * self.cfg.top_k / self.cfg.num_experts))

    # --- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[B, S, D]`` (S local under context parallelism). Returns ``[B, S, D]``."""
        b, s, d = x.shape
        e, k = self.cfg.num_experts, self.cfg.top_k
        n = b * s
        xf = x.reshape(n, d)  # [N, D]
        logits = at_least_f32(self.router(xf))  # [N, E]
        probs = self._route_probs(x, logits)  # [N, E]
        gates, experts = top_k_gates(probs, k)  # [N, k], [N, k]

        # assignment order: all first choices (token order), then all second choices, ...
        flat_expert = experts.t().reshape(-1)  # [k*N]
        flat_token = torch.arange(n, device=x.device).repeat(k)  # [k*N]
        flat_gate = gates.t().reshape(-1)  # [k*N]
        order = torch.argsort(flat_expert, stable=True)  # [k*N] expert-major, priority kept inside
        sorted_expert = flat_expert[order]
        chosen = torch.bincount(flat_expert, minlength=e)  # [E]
        cap = self._capacity(n)
        if cap is not None:
            starts = torch.cumsum(chosen, 0) - chosen  # [E]
            slot = torch.arange(order.numel(), device=x.device) - starts[sorted_expert]  # [k*N]
            keep = slot < cap
            order, sorted_expert = order[keep], sorted_expert[keep]
        kept = torch.bincount(sorted_expert, minlength=e)  # [E]
        tok = flat_token[order]  # [A]
        x_sorted = xf[tok]  # [A, D]

        if self.ep_size == 1:
            y_sorted = self.experts(x_sorted, kept.tolist())  # [A, D]
            received = None
        else:
            send_counts = kept.view(self.ep_size, self.num_local_experts)  # [P, E_local]
            x_local, plan = dispatch_tokens(x_sorted, send_counts, group=self.ep_group)  # [M, D]
            offset = self.ep_rank * self.num_local_experts if self.ep_replicated else 0
            y_local = self.experts(x_local, plan.expert_counts, offset)  # [M, D]
            y_sorted = combine_tokens(y_local, plan, group=self.ep_group)  # [A, D]
            received = torch.tensor(plan.expert_counts)

        y_sorted = y_sorted * flat_gate[order].to(y_sorted.dtype)[:, None]  # [A, D]
        out = torch.zeros_like(xf).index_add(0, tok, y_sorted.to(xf.dtype))  # [N, D]

        aux = self.cfg.balance_coef * balance_loss(probs, experts) + self.cfg.z_coef * z_loss(logits)
        self.aux_loss = aux
        self.stats = {"tokens_per_expert": chosen.detach().cpu(), "kept_per_expert": kept.detach().cpu(),
                      "dropped": int(flat_expert.numel() - order.numel()), "assignments": int(flat_expert.numel())}
        if received is not None:
            self.stats["received_per_local_expert"] = received
        return out.view(b, s, d)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"dim={c.dim}, hidden={c.hidden}, experts={c.num_experts} (local {self.num_local_experts}), "
                f"top_k={c.top_k}, routing={c.routing}, capacity_factor={c.capacity_factor}")
