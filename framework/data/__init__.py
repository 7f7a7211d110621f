"""Tokenizer and data pipeline: corpus → sentencepiece → memory-mapped token shards → packed batches.

    tok = load_or_train_tokenizer(cfg.data)
    batches = build_train_data(cfg.data, tok, seq_len=4096, micro_batch_size=1, dp_rank=r, dp_size=dp, seed=0)
    batch = shard_batch(next(batches), layout="zigzag", group=cp_group)
"""
from longreach.data.config import DataConfig
from longreach.data.loader import TokenBatches, build_train_data, build_val_data, split_documents
from longreach.data.sharding import shard_batch
from longreach.data.shards import TokenShards, build_shards, write_shards
from longreach.data.tokenizer import Tokenizer, cache_root, load_or_train_tokenizer, train_tokenizer

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
