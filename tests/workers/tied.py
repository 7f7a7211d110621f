"""Workers for the tied-parameter checkpoint tests: a tiny LM whose head shares the embedding's weight.

:func:`build` and :func:`train_steps` serve the single-process test; :func:`fsdp_resume` runs the same
save → fresh model → load → continue sequence on FSDP2-sharded ranks under ``run_ranks``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard

from longreach.checkpoint import CheckpointConfig, CheckpointManager

VOCAB = 11


class TiedLM(nn.Module):
    """Embedding → linear → LM head whose weight *is* the embedding's (tied, as in small LMs)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids ``[B, S]`` → mean cross-entropy of predicting each id itself (a scalar)."""
        logits = self.head(torch.tanh(self.mid(self.emb(ids))))  # [B, S, V]
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


def batches() -> torch.Tensor:
    """Four fixed steps of token ids, ``[4, B=2, S=5]``."""
    return torch.randint(0, VOCAB, (4, 2, 5), generator=torch.Generator().manual_seed(0))


def build(seed: int, *, trainable_only: bool, fsdp: bool = False) -> tuple[TiedLM, torch.optim.Optimizer]:
    """A :class:`TiedLM` whose tied embedding is drawn from ``seed``; ``mid`` is the same in every build
    and frozen under ``trainable_only`` (the "base" a lean checkpoint leaves out). AdamW over the trainable
    parameters."""
    torch.manual_seed(0)
    model = TiedLM()
    model.mid.requires_grad_(not trainable_only)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.emb.weight.normal_()
    if fsdp:
        fully_shard(model)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train_steps(model: TiedLM, opt: torch.optim.Optimizer, steps: torch.Tensor) -> list[float]:
    """One optimizer step per ``[B, S]`` batch of ``steps``; returns the losses."""
    losses = []
    for ids in steps:
        loss = model(ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def fsdp_resume(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    """Per ``trainable_only`` (False, True): train 2 steps FSDP2-sharded, save, train 2 more (the reference);
    a fresh sharded model loads the checkpoint and trains the same 2 steps.

    Returns:
        ``{trainable_only: {"ref": losses, "got": losses, "tied": the fresh model's tie holds,
        "saved": the checkpoint's model tensor names}}``.
    """
    ids = batches()
    out: dict[str, Any] = {}
    for trainable_only in (False, True):
        cfg = CheckpointConfig(trainable_only=trainable_only)
        run = Path(out_dir) / f"lean{int(trainable_only)}"
        model, opt = build(0, trainable_only=trainable_only, fsdp=True)
        train_steps(model, opt, ids[:2])
        path = CheckpointManager(cfg, run, config_hash="t").save(2, {"model": model, "optimizer": opt})
        ref = train_steps(model, opt, ids[2:])
        fresh, fresh_opt = build(1, trainable_only=trainable_only, fsdp=True)
        CheckpointManager(cfg, run, config_hash="t").load({"model": fresh, "optimizer": fresh_opt}, path=path)
        saved = dcp.FileSystemReader(str(path / "model")).read_metadata().state_dict_metadata
        out[trainable_only] = {"ref": ref, "got": train_steps(fresh, fresh_opt, ids[2:]),
                               "tied": fresh.head.weight is fresh.emb.weight,
                               "saved": sorted(k for k in saved if k.startswith("model."))}
    return out
