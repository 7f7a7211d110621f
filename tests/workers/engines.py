"""Rank workers for tests/test_engines.py: the same tiny run on every engine, losses compared."""
from __future__ import annotations

import traceback
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from longreach.engines import EngineConfig, as_engine_config, build_engine
from longreach.engines.deepspeed import ulysses_attention
from longreach.kernels import attention, masks


class ResidualMLP(nn.Module):
    """``x [B, 8]`` → linear to ``dim`` → residual ``blocks`` → one output per row ``[B]``.

    ``blocks`` should be a generator: its modules are created after the input layer, so parameters are
    initialised in registration order (inp, layers, out).
    """

    def __init__(self, dim: int, blocks: Iterable[nn.Module]) -> None:
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.layers = nn.ModuleList(blocks)
        self.out = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 8]
        h = self.inp(x)  # [B, dim]
        for blk in self.layers:
            h = h + blk(h)
        return self.out(h).squeeze(-1)  # [B]


class TinyNet(ResidualMLP):
    """A small residual MLP stack with ``layers`` (so FSDP2 shards per block)."""

    def __init__(self, dim: int = 16, n_layers: int = 3) -> None:
        super().__init__(dim, (nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                             nn.Linear(2 * dim, dim)) for _ in range(n_layers)))


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def batch(step: int, rank: int, world: int, global_batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (same on every world size), this rank's slice."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(global_batch, 8, generator=g)  # [G, 8]
    y = torch.sin(x.sum(-1))  # [G]
    per = global_batch // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def run_engine(spec: dict[str, Any], steps: int = 4) -> list[float]:
    """Train TinyNet for ``steps`` steps on the engine in ``spec``; return the global mean loss per step."""
    cfg = as_engine_config(spec)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    eng = build_engine(cfg, model, lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0),
                       grad_clip=1.0)
    losses = []
    for step in range(steps):
        x, y = batch(step, rank, world)
        with eng.forward_context():
            pred = eng.model(x)
        loss = ((pred.float() - y) ** 2).mean()
        eng.backward(loss)
        eng.clip_grad_norm(1.0)
        eng.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(float(t) / world)
    eng.close()
    return losses


SPECS: dict[str, dict[str, Any]] = {
    "ddp": {"kind": "native"},
    "ddp_act_offload": {"kind": "native", "activation_offload": True},
    "fsdp2": {"kind": "native", "fsdp": True},
    "fsdp2_keep": {"kind": "native", "fsdp": True, "reshard_after_forward": False},
    "accelerate": {"kind": "accelerate"},
    "zero1": {"kind": "deepspeed", "zero_stage": 1},
    "zero2": {"kind": "deepspeed", "zero_stage": 2},
    "zero3": {"kind": "deepspeed", "zero_stage": 3},
}


def engines_worker(rank: int, world_size: int, names: list[str], steps: int = 4) -> dict[str, Any]:
    """Run each named engine in turn; return {name: losses or 'error: ...'}."""
    out: dict[str, Any] = {}
    for name in names:
        try:
            out[name] = run_engine(SPECS[name], steps)
        except Exception:  # noqa: BLE001 - report every engine's failure, not just the first
            out[name] = "error: " + traceback.format_exc()
        dist.barrier()
    return out


def single_process_reference(steps: int = 4, world: int = 2) -> list[float]:
    """Plain single-process training on the concatenated global batch (the oracle)."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for step in range(steps):
        parts = [batch(step, r, world) for r in range(world)]
        per_rank = []
        opt.zero_grad()
        # mean over ranks of per-rank means == DDP's averaged gradient
        for x, y in parts:
            loss = ((model(x) - y) ** 2).mean() / world
            loss.backward()
            per_rank.append(float(loss.detach()) * world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(sum(per_rank) / world)
    return losses


ULYSSES_SHAPE = (1, 8, 4, 8)
"""``[B, S, H, D]`` of the DeepSpeed-Ulysses check."""


def _ulysses_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(*ULYSSES_SHAPE, generator=g, dtype=torch.float64) for _ in range(3))  # [B, S, H, D]


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Any = None) -> torch.Tensor:
    return attention(q, k, v, mask=masks.causal(), backend="reference")


def ulysses_reference() -> dict[str, torch.Tensor]:
    """Full causal attention on one process (the oracle): ``{"out", "dq", "dk", "dv"}``, each ``[B, S, H, D]``,
    for a loss of ``out.sum()``."""
    q, k, v = (t.requires_grad_() for t in _ulysses_inputs())
    out = _causal(q, k, v)
    out.sum().backward()
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def ulysses_shard(rank: int, world: int) -> dict[str, torch.Tensor]:
    """DeepSpeed-Ulysses (``ulysses_attention``) on this rank's contiguous shard of the sequence:
    ``{"out", "dq", "dk", "dv"}``, each ``[B, S/P, H, D]``, for a loss of ``out.sum()`` over all ranks."""
    per = ULYSSES_SHAPE[1] // world
    ql, kl, vl = (t[:, rank * per:(rank + 1) * per].clone().requires_grad_() for t in _ulysses_inputs())
    out = ulysses_attention(_causal)(ql, kl, vl, None)  # [B, S/P, H, D]
    out.sum().backward()
    return {"out": out.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}


def engines_and_ulysses_worker(rank: int, world_size: int, names: list[str], steps: int = 4) -> dict[str, Any]:
    """:func:`engines_worker`, plus ``"ulysses"``: :func:`ulysses_shard` (or its error)."""
    out = engines_worker(rank, world_size, names, steps)
    try:
        out["ulysses"] = ulysses_shard(rank, world_size)
    except Exception:  # noqa: BLE001
        out["ulysses"] = "error: " + traceback.format_exc()
    return out
