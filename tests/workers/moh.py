"""Spawned-rank workers for the MoH tests: routed-only heads under context parallelism over gloo."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from longreach.attention import AttentionContext, ContextParallelAttention, LocalAttention
from longreach.mixtures import routed
from longreach.mixtures.moh import MoHAttention, MoHConfig
from longreach.models.rope import RotaryEmbedding
from longreach.parallel import sequence_positions, shard_sequence
from longreach.parallel.comm import CommRecorder


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        return float("inf")
    return (got - want).abs().max().item() / max(1.0, want.abs().max().item()) if want.numel() else 0.0


def _layer(case: dict[str, Any], seed: int, dim: int, execution: str) -> MoHAttention:
    torch.manual_seed(seed)
    cfg = MoHConfig(dim=dim, n_heads=8, n_kv_heads=case.get("kv_heads", 2), head_dim=6, n_shared=case.get("shared", 4),
                    top_k=2, variant=case.get("variant", "router"), execution=execution)
    layer = MoHAttention(cfg).double()
    for r in (layer.router_shared, layer.router_routed, layer.router_mix):
        if r is not None:
            torch.nn.init.normal_(r.weight, std=1.0)
    layer.inner_attention = LocalAttention(case.get("backend", "reference"))
    return layer


def routed_under_cp(rank: int, world_size: int, cases: list[dict[str, Any]]) -> tuple[list[str], list[list]]:
    """MoH with routed execution on this rank's shard (``ContextParallelAttention``) against one rank.

    Each case: ``strategy``, ``layout``, optional ``ulysses_degree``, ``variant``, ``docs`` (packed
    documents), ``kv_heads``, ``shared``, ``backend``, ``small`` (tiny windows and coarse blocks, so every level of the
    block plan runs under the ring). The same seeded layer runs on the full sequence on every rank, masked
    (every head computed) and routed, and on the shard with routed execution; output, input gradient and the
    rank-summed parameter gradients must agree (float64; reference backend unless ``backend``).

    Returns:
        (failures, per case the p2p operations ``(kind, bytes)`` the sharded call posted, and the number of
        all-gather calls it made).
    """
    failures: list[str] = []
    comms: list[list] = []
    saved = routed.WINDOW, routed.COARSE_ROWS
    for i, case in enumerate(cases):
        tag = f"P={world_size} {case}"
        routed.WINDOW, routed.COARSE_ROWS = (2, 3) if case.get("small") else saved
        b, s, dim = 2, 12 * world_size, 24
        x = torch.randn(b, s, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        target = torch.randn(b, s, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + i))
        pos = torch.arange(s).view(1, s).expand(b, s)
        cos, sin = RotaryEmbedding(6, 10000.0, None, 4 * s)(pos, s, dtype=torch.float64)
        cu = torch.tensor([0, 3, s // 2 + 1, s]) if case.get("docs") else None
        refs = {}
        for execution in ("masked", "routed"):
            layer = _layer(case, 7 + i, dim, execution)
            x_ref = x.clone().requires_grad_(True)
            y = layer(x_ref, cos, sin, AttentionContext(cu_seqlens=cu))
            (y * target).sum().backward()
            refs[execution] = (layer, y.detach(), x_ref.grad)
        cp = _layer(case, 7 + i, dim, "routed")  # the same seeded weights
        layout = case["layout"]
        cp.inner_attention = ContextParallelAttention(strategy=case["strategy"], layout=layout,
                                                      ulysses_degree=case.get("ulysses_degree"),
                                                      backend=case.get("backend", "reference"))
        sh = lambda t: shard_sequence(t, layout=layout)  # noqa: E731
        ctx = AttentionContext(seq_len=s, positions=sequence_positions(s, layout=layout), cu_seqlens=cu)
        x_loc = sh(x).requires_grad_(True)
        with CommRecorder() as rec:
            y = cp(x_loc, sh(cos), sh(sin), ctx)
            (y * sh(target)).sum().backward()
        comms.append([[(kind, nbytes) for kind, _, _, nbytes in rec.p2p_ops], rec.calls.get("all_gather", 0)])
        for execution, (ref, y_ref, dx_ref) in refs.items():
            checks = [("out", y, sh(y_ref)), ("dx", x_loc.grad, sh(dx_ref))]
            for (name, p), p_ref in zip(cp.named_parameters(), ref.parameters()):
                g = p.grad.clone()
                dist.all_reduce(g)
                checks.append((f"d{name}", g, p_ref.grad))
            for name, got, want in checks:
                err = _err(got, want)
                if not err <= 1e-9:
                    failures.append(f"{tag} vs single-rank {execution}: {name} max rel error {err:.3e}")
    routed.WINDOW, routed.COARSE_ROWS = saved
    return failures, comms
