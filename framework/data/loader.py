"""Packing documents into fixed-length sequences, per data-parallel rank, resumable.

The training documents of an epoch are concatenated in a seeded random order into one token stream.
Sample ``g`` covers stream tokens ``[g·S, g·S + S + 1)``: inputs are the first ``S``, labels the last
``S`` — shifted on the GLOBAL sequence before any context-parallel sharding, so the label of the last
position is the real next token, and every stream token is an input exactly once per epoch (no token
lost or duplicated; only the tail that does not fill a whole global batch is dropped).

Document boundaries are kept: a sample's ``cu_seqlens`` are the offsets where documents (or the
part of a document that falls in the sample) begin, and ``position_ids`` restart at 0 at each of them.
Step ``k`` of an epoch gives data-parallel rank ``r`` the samples ``k·dp·B + r·B + [0, B)``, so ranks
read disjoint slices. ``state_dict()`` records (epoch, samples consumed); a resumed loader continues
exactly where it stopped.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from longreach.data.config import DataConfig
from longreach.data.shards import TokenShards, build_shards
from longreach.errors import UserError

__all__ = ["TokenBatches", "build_train_data", "build_val_data", "split_documents"]


def split_documents(num_documents: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) document ids: a seeded random ``val_fraction`` held out (at least one when > 0)."""
    if num_documents <= 1 or val_fraction <= 0:
        return np.arange(num_documents, dtype=np.int64), np.zeros(0, dtype=np.int64)
    n_val = min(max(1, int(round(num_documents * val_fraction))), num_documents - 1)
    perm = np.random.default_rng([seed, 0x7A1]).permutation(num_documents)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class TokenBatches:
    """Iterator of packed batches for one data-parallel rank.

    Each item is a dict: ``input_ids``, ``labels``, ``position_ids`` (LongTensor ``[B, S]``) and
    ``cu_seqlens`` (LongTensor ``[n+1]`` document offsets of the sample when B = 1, a list of B such
    tensors when B > 1). Labels are never -100 here: every label is the real next token of the stream.

    Args:
        shards: the token shards.
        documents: ids of the documents this split uses.
        seq_len, micro_batch_size, dp_rank, dp_size: sample shape and this rank's slice.
        seed: seed of the per-epoch document order.
        shuffle: False keeps ``documents`` in order every epoch (validation).
        epochs: stop after this many epochs (None: never stop).
    """

    def __init__(self, shards: TokenShards, documents: np.ndarray, *, seq_len: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool = True, epochs: int | None = None,
                 name: str = "train") -> None:
        if seq_len < 1:
            raise UserError(f"seq_len must be >= 1, got {seq_len}")
        if micro_batch_size < 1:
            raise UserError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise UserError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        self.shards = shards
        self.documents = np.asarray(documents, dtype=np.int64)  # [N_split]
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.epochs = epochs
        self.name = name
        self.num_tokens = int(self.shards.doc_len[self.documents].sum()) if self.documents.size else 0
        self.samples_per_epoch = max(0, (self.num_tokens - 1) // seq_len)
        per_step = micro_batch_size * dp_size
        self.steps_per_epoch = self.samples_per_epoch // per_step
        if self.steps_per_epoch == 0 and epochs is None:
            raise UserError(
                f"data: the {name} split has {self.num_tokens} tokens, too few for one step of "
                f"{dp_size} data-parallel rank(s) x micro_batch_size {micro_batch_size} x seq_len {seq_len} "
                f"(needs {per_step * seq_len + 1}); use more data or a shorter sequence")
        self.epoch = 0
        self.sample = 0  # global samples consumed in this epoch (a multiple of dp_size * B)
        self._order_epoch = -1
        self._ends = np.zeros(0, dtype=np.int64)
        self._order = self.documents

    # ------------------------------------------------------------------ position
    def state_dict(self) -> dict[str, Any]:
        """Where the loader is: enough to continue exactly (saved with a checkpoint)."""
        return {"epoch": self.epoch, "sample": self.sample, "seed": self.seed, "seq_len": self.seq_len,
                "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`, possibly of another dp size)."""
        for key in ("seq_len", "seed", "num_tokens"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(f"data: cannot resume the {self.name} loader: checkpoint has {key}={state[key]}, "
                                f"this run has {getattr(self, key)}")
        self.epoch = int(state["epoch"])
        per_step = self.micro_batch_size * self.dp_size
        self.sample = (int(state["sample"]) // per_step) * per_step

    def __len__(self) -> int:
        """Steps per epoch."""
        return self.steps_per_epoch

    # ------------------------------------------------------------------ packing
    def _prepare_epoch(self) -> None:
        if self._order_epoch == self.epoch:
            return
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = self.documents[rng.permutation(self.documents.shape[0])]
        else:
            self._order = self.documents
        self._ends = np.cumsum(self.shards.doc_len[self._order])  # [N] stream end of each document
        self._order_epoch = self.epoch

    def _sample(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Stream tokens ``[g·S, g·S + S + 1)`` and the sample offsets where documents begin."""
        s = self.seq_len
        a, b = g * s, g * s + s + 1
        tokens = np.empty(s + 1, dtype=np.int64)  # [S + 1]
        j = int(np.searchsorted(self._ends, a, side="right"))
        starts = [0]
        pos = a
        while pos < b:
            doc = int(self._order[j])
            doc_begin = int(self._ends[j] - self.shards.doc_len[doc])
            lo = pos - doc_begin
            hi = min(int(self.shards.doc_len[doc]), b - doc_begin)
            tokens[pos - a:pos - a + hi - lo] = self.shards.document(doc)[lo:hi]
            if doc_begin > a and doc_begin - a < s:
                starts.append(doc_begin - a)
            pos += hi - lo
            j += 1
        starts.append(s)
        return tokens, np.asarray(starts, dtype=np.int64)

    def _item(self, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, cu = self._sample(g)
        seg = np.diff(cu)  # [n] segment lengths
        pos = np.arange(self.seq_len, dtype=np.int64) - np.repeat(cu[:-1], seg)  # [S] restart per document
        return (torch.from_numpy(tokens[:-1].copy()), torch.from_numpy(tokens[1:].copy()),
                torch.from_numpy(pos), torch.from_numpy(cu))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        per_step = self.micro_batch_size * self.dp_size
        if self.sample + per_step > self.samples_per_epoch:
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                raise StopIteration
            self.epoch += 1
            self.sample = 0
            if self.steps_per_epoch == 0:
                raise StopIteration
        self._prepare_epoch()
        first = self.sample + self.dp_rank * self.micro_batch_size
        items = [self._item(first + b) for b in range(self.micro_batch_size)]
        self.sample += per_step
        cu = [it[3] for it in items]
        return {
            "input_ids": torch.stack([it[0] for it in items]),  # [B, S]
            "labels": torch.stack([it[1] for it in items]),  # [B, S]
            "position_ids": torch.stack([it[2] for it in items]),  # [B, S]
            "cu_seqlens": cu[0] if self.micro_batch_size == 1 else cu,  # [n+1] | list of B
        }


def _shards(cfg: DataConfig, tokenizer) -> tuple[TokenShards, np.ndarray, np.ndarray]:
    shards = build_shards(cfg, tokenizer)
    train, val = split_documents(shards.num_documents, cfg.val_fraction, cfg.seed)
    return shards, train, val


def build_train_data(cfg: DataConfig, tokenizer, *, seq_len: int, micro_batch_size: int, dp_rank: int,
                     dp_size: int, seed: int) -> TokenBatches:
    """The training batches of one data-parallel rank (endless; reshuffled every epoch).

    Args:
        cfg: the data config (corpus, cache, validation split).
        tokenizer: a :class:`~longreach.data.tokenizer.Tokenizer` (from ``load_or_train_tokenizer``).
        seq_len: tokens per sample (global: before context-parallel sharding).
        micro_batch_size: samples per batch on this rank.
        dp_rank, dp_size: this rank's data-parallel index and the data-parallel degree.
        seed: seed of the document order (the same on every rank).

    Returns:
        An iterator of ``{"input_ids", "labels", "position_ids": Long[B, S], "cu_seqlens"}`` with
        ``state_dict()`` / ``load_state_dict()``.
    """
    shards, train, _ = _shards(cfg, tokenizer)
    return TokenBatches(shards, train, seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                        dp_size=dp_size, seed=seed, shuffle=True, epochs=None, name="train")


def build_val_data(cfg: DataConfig, tokenizer, *, seq_len: int, micro_batch_size: int, dp_rank: int,
                   dp_size: int) -> TokenBatches:
    """The validation batches of one data-parallel rank: one pass in a fixed order (may be empty)."""
    shards, _, val = _shards(cfg, tokenizer)
    return TokenBatches(shards, val, seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                        dp_size=dp_size, seed=cfg.seed, shuffle=False, epochs=1, name="validation")
