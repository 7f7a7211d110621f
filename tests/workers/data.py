"""Ranks of the data-pipeline tests: concurrent tokenizer/shard building and context-parallel batch sharding."""
from __future__ import annotations

from typing import Any

import torch

from longreach.data import DataConfig, build_train_data, load_or_train_tokenizer, shard_batch

LAYOUTS = ("contiguous", "zigzag", "stripe")


def build_and_shard(rank: int, world_size: int, cache_dir: str, seq_len: int) -> dict[str, Any]:
    """Every rank builds the tokenizer and shards in one cache (local rank 0 writes, the others wait),
    reads the same global batch, and shards it under each layout over WORLD."""
    cfg = DataConfig(source="synthetic", cache_dir=cache_dir, vocab_size=400, synthetic_documents=40,
                     shard_tokens=3000, task_chars=600)
    tok = load_or_train_tokenizer(cfg)
    batches = build_train_data(cfg, tok, seq_len=seq_len, micro_batch_size=1, dp_rank=0, dp_size=1, seed=5)
    batch = next(batches)
    sharded = {}
    for layout in LAYOUTS:
        part = shard_batch(batch, layout)
        sharded[layout] = {k: _plain(part[k]) for k in ("input_ids", "labels", "position_ids", "positions", "cu_seqlens")}
    return {"tokenizer": str(tok.path), "fingerprint": tok.fingerprint(),
            "batch": {k: _plain(v) for k, v in batch.items()}, "sharded": sharded, "shards": str(batches.shards.folder)}


def _plain(x: Any) -> Any:
    # Tensors sent through a multiprocessing queue travel as shared-memory handles that the receiver
    # opens from the (by then exited) sender; numpy arrays are pickled by value.
    return x.numpy().copy() if isinstance(x, torch.Tensor) else x
