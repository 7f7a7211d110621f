"""The data of ``longreach finetune``: the corpus tokenized with the checkpoint's tokenizer, cut into
``recipe.target_len`` windows, labels shifted on the global sequence; the position is checkpointed.

    tokens = tokenize_corpus(cfg.data, tokenizer)                      # [N], memory-mapped
    batches = TokenWindows(tokens, 4096, batch=1, dp_rank=0, dp_size=1, seed=0)
    next(batches)  # {"input_ids": [1, 4096], "labels": [1, 4096]}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from longreach.data.config import DataConfig
from longreach.data.shards import TokenShards, stream_shards
from longreach.data.stream import TokenStream
from longreach.data.tokenizer import cache_root, local_rank
from longreach.errors import UserError
from longreach.hf.config import FTData
from longreach.hf.patch import shift_labels

__all__ = ["TokenWindows", "tokenize_corpus"]


def _token_file(path: str) -> Any:
    """``data.tokens_path``: a token-shard folder (memory-mapped) or a 1-D integer ``.npy`` (loaded)."""
    p = Path(path)
    if p.is_dir():
        return TokenStream(TokenShards(p))
    if not p.is_file():
        raise UserError(f"data.tokens_path: {p} does not exist")
    if p.suffix != ".npy":
        raise UserError(f"data.tokens_path: {p} is neither a .npy of token ids nor a token-shard folder")
    arr = np.load(p)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"data.tokens_path: {p} must be a 1-D integer array of token ids, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64, copy=False)


def tokenize_corpus(data: FTData, tokenizer: Any, *, trust_remote_code: bool = False) -> Any:
    """All fine-tuning tokens as one flat sequence, each document followed by the tokenizer's eos.

    Text sources go through the shared streaming path (:func:`longreach.data.shards.stream_shards`):
    tokenized once per (corpus content, tokenizer files) by worker processes into cached, memory-mapped
    shards, which every rank, restart and run reuses; local rank 0 builds, the other local ranks wait.

    Returns:
        A :class:`~longreach.data.stream.TokenStream` (``len``, ``[a:b]`` → int64 ``[b − a]``; nothing
        loaded), or for ``source: tokens`` a ``.npy``'s ``[N]`` int64 array or a shard folder's stream.
    """
    if data.source == "tokens":
        return _token_file(data.tokens_path)
    dcfg = DataConfig(source=data.source, paths=list(data.paths), synthetic_documents=data.synthetic_documents,
                      passkey_fraction=data.passkey_fraction, recall_fraction=0.0, task_chars=data.task_chars,
                      seed=data.seed, tokenizer=None, vocab_size=1024, text_field=data.text_field,
                      tokenize_workers=data.tokenize_workers)
    folder = stream_shards(dcfg, tokenizer, cache_root(None), bos=False, eos=True, wait=local_rank() != 0,
                           trust_remote_code=trust_remote_code)
    return TokenStream(TokenShards(folder))


class TokenWindows:
    """This dp rank's fine-tuning batches: disjoint ``seq_len`` windows, reshuffled each epoch.

    Yields ``{"input_ids": [batch, seq_len], "labels": [batch, seq_len]}`` with labels shifted on the global
    sequence (the last position ignored). Its position (epoch, batch index) is its ``state_dict``, which
    the trainer checkpoints per rank, so a resumed run draws exactly the batches it would have drawn.

    Only the windows this rank draws are read (``tokens`` may be a memory-mapped
    :class:`~longreach.data.stream.TokenStream`).

    Args:
        tokens: ``[N]`` the whole token stream (anything with ``len`` and ``[a:b]`` slicing).
        seq_len: tokens per window (``recipe.target_len``).
        batch: windows per micro-batch (``train.micro_batch_size``).
        dp_rank, dp_size: this rank's data-parallel coordinates (each epoch's order is split over dp).
        seed: seed of the order (epoch e uses ``default_rng([seed, e])``).

    Raises:
        UserError: fewer windows than one micro-batch per dp rank.
    """

    def __init__(self, tokens: Any, seq_len: int, *, batch: int, dp_rank: int, dp_size: int,
                 seed: int) -> None:
        n = len(tokens) // seq_len
        if n < batch * dp_size:
            raise UserError(f"the fine-tuning data has {len(tokens)} tokens: fewer than {batch * dp_size} sequences "
                            f"of {seq_len} (train.micro_batch_size × dp); add data or shorten recipe.target_len")
        self.tokens, self.num_windows, self.seq_len = tokens, n, seq_len
        self.batch, self.dp_rank, self.dp_size, self.seed = batch, dp_rank, dp_size, seed
        self.epoch = 0
        self.index = 0  # batches drawn in this epoch

    def _mine(self) -> np.ndarray:
        n = self.num_windows
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        per = n // self.dp_size
        return order[self.dp_rank * per:(self.dp_rank + 1) * per]

    def __iter__(self) -> "TokenWindows":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        mine = self._mine()
        start = self.index * self.batch
        if start + self.batch > len(mine):
            self.epoch, self.index, start = self.epoch + 1, 0, 0
            mine = self._mine()
        self.index += 1
        s = self.seq_len
        ids = torch.stack([torch.as_tensor(np.asarray(self.tokens[w * s:(w + 1) * s], dtype=np.int64))
                           for w in mine[start:start + self.batch].tolist()])  # [batch, seq_len]
        return {"input_ids": ids, "labels": shift_labels(ids)}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
