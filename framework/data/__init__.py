"""Tokenizer and data pipeline: corpus → sentencepiece → memory-mapped token shards → packed batches.

    tok = load_or_train_tokenizer(cfg.data)
    batches = build_train_data(cfg.data, tok, seq_len=4096, micro_batch_size=1, dp_rank=r, dp_size=dp, seed=0)
    batch = shard_batch(next(batches), layout="zigzag", group=cp_group)
"""
from typing import Any

from longreach.data.config import DataConfig
from longreach.data.shards import TokenShards, build_shards, write_shards
from longreach.data.tokenizer import Tokenizer, cache_root, load_or_train_tokenizer, train_tokenizer

# The torch-backed parts load on first use: tokenizer worker processes (longreach.data.stream) import
# this package and must not pay for torch (seconds and ~250 MB each).
_LAZY = {"TokenBatches": "loader", "build_train_data": "loader", "build_val_data": "loader",
         "split_documents": "loader", "shard_batch": "cp_batch"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"longreach.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'longreach.data' has no attribute {name!r}")

__all__ = [
    "DataConfig",
    "TokenBatches",
    "TokenShards",
    "Tokenizer",
    "build_shards",
    "build_train_data",
    "build_val_data",
    "cache_root",
    "load_or_train_tokenizer",
    "shard_batch",
    "split_documents",
    "train_tokenizer",
    "write_shards",
]
