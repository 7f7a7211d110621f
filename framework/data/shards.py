"""Token shards: the tokenized corpus as memory-mapped ``.bin`` files plus a JSON index.

A shard folder holds ``shard_00000.bin`` … (flat token ids, uint16 when the vocabulary fits, else
uint32) and ``index.json`` (dtype, special ids, and per shard the document offsets). Each document is
stored as ``[bos] + ids + [eos]`` and never split across shards. A folder is written under a temporary
name and renamed into place in one step, so a reader never sees a partial folder and an existing folder
is never overwritten. The reader maps shards with ``np.memmap`` and never loads them whole.

Opening a folder validates it (:func:`validate_shards`: index consistency, file sizes, dtype, every
id below the vocabulary size — one streaming pass over the tokens), so a truncated or overwritten
shard is one error naming the file, never a crash steps later; :func:`build_shards` rebuilds a cached
folder that fails it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import shutil
import uuid
from pathlib import Path

import numpy as np

from longreach.data.config import DataConfig
from longreach.data.corpus import corpus_bytes, corpus_content_hash, iter_documents
from longreach.data.stream import build_token_shards, tokenizer_spec
from longreach.data.tokenizer import cache_root, local_rank
from longreach.errors import UserError

__all__ = ["TokenShards", "build_shards", "shards_key", "stream_shards", "validate_shards", "write_shards"]

log = logging.getLogger(__name__)

_FORMAT = "longreach-shards-v1"
_INDEX = "index.json"
_BATCH_DOCS = 256
# Streamed builds live in their own folder: caches of the in-memory builder (``shards/``) never clash.
_CACHE_DIR = "shards-v2"
_AUTO_WORKERS_BYTES = 8 << 20
_SCAN_TOKENS = 1 << 24  # ids checked against the vocabulary this many at a time


class TokenShards:
    """Read-only view of a shard folder (memory-mapped; documents addressed by global index).

    Attributes:
        doc_shard, doc_start, doc_len: ``[N]`` int64 — shard, offset in it and length of each document.
        num_tokens: total tokens (bos/eos included).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_file = self.folder / _INDEX
        if not index_file.is_file():
            raise UserError(f"{self.folder} is not a token shard folder (no {_INDEX})")
        try:
            self.index = json.loads(index_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{index_file}: unreadable shard index ({exc})") from None
        if not isinstance(self.index, dict) or self.index.get("format") != _FORMAT:
            got = self.index.get("format") if isinstance(self.index, dict) else self.index
            raise UserError(f"{index_file}: unknown shard format {got!r}")
        validate_shards(self.folder, self.index)
        self.dtype = np.dtype(self.index["dtype"])
        self.bos_id: int = self.index["bos_id"]
        self.eos_id: int = self.index["eos_id"]
        shard_ids, starts, lens = [], [], []
        for s, shard in enumerate(self.index["shards"]):
            off = np.asarray(shard["doc_offsets"], dtype=np.int64)  # [n_docs + 1]
            shard_ids.append(np.full(len(off) - 1, s, dtype=np.int64))
            starts.append(off[:-1])
            lens.append(np.diff(off))
        self.doc_shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int64)  # [N]
        self.doc_start = np.concatenate(starts) if starts else np.zeros(0, np.int64)  # [N]
        self.doc_len = np.concatenate(lens) if lens else np.zeros(0, np.int64)  # [N]
        self.num_tokens = int(self.doc_len.sum())
        self._maps: dict[int, np.memmap] = {}

    @property
    def num_documents(self) -> int:
        return int(self.doc_len.shape[0])

    def _map(self, shard: int) -> np.memmap:
        m = self._maps.get(shard)
        if m is None:
            info = self.index["shards"][shard]
            m = np.memmap(self.folder / info["file"], dtype=self.dtype, mode="r", shape=(info["tokens"],))
            self._maps[shard] = m
        return m

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (a read-only memmap view, ``[len]``)."""
        s = int(self.doc_shard[i])
        a = int(self.doc_start[i])
        return self._map(s)[a:a + int(self.doc_len[i])]

    def __repr__(self) -> str:
        return f"TokenShards({str(self.folder)!r}, documents={self.num_documents}, tokens={self.num_tokens})"


def validate_shards(folder: Path, index: dict) -> None:
    """Check a shard folder against its index: fields, dtype, each file's size, document offsets
    (from 0, non-decreasing, ending at the shard's token count), totals, and every id < ``vocab_size``.

    Raises:
        UserError: one line naming the index or the shard file and what is wrong.
    """
    index_file = folder / _INDEX
    try:
        dtype = np.dtype(index["dtype"])
        vocab = int(index["vocab_size"])
        # documents framed without bos / eos (fine-tuning corpora) record None for them
        special = tuple(int(index[k]) for k in ("bos_id", "eos_id") if index[k] is not None)
        shards = list(index["shards"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{index_file}: damaged shard index ({type(exc).__name__}: {exc})") from None
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise UserError(f"{index_file}: shard dtype {dtype} is not uint16 or uint32")
    if vocab < 1 or vocab > np.iinfo(dtype).max + 1 or any(not 0 <= t < vocab for t in special):
        raise UserError(f"{index_file}: vocab_size {vocab} / bos, eos {special} do not fit the dtype {dtype}")
    total_tokens = total_docs = 0
    for shard in shards:
        try:
            file, tokens = folder / str(shard["file"]), int(shard["tokens"])
            off = np.asarray(shard["doc_offsets"], dtype=np.int64)  # [n_docs + 1]
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{index_file}: damaged shard entry ({type(exc).__name__}: {exc})") from None
        if not file.is_file():
            raise UserError(f"{file}: token shard missing (listed in {index_file})")
        size, expected = file.stat().st_size, tokens * dtype.itemsize
        if size != expected:
            raise UserError(f"{file}: token shard has {size} bytes, the index says {tokens} {dtype} tokens "
                            f"({expected} bytes): truncated or overwritten")
        if off.ndim != 1 or off.size < 1 or off[0] != 0 or off[-1] != tokens or np.any(np.diff(off) < 0):
            raise UserError(f"{index_file}: document offsets of {file.name} are inconsistent with its {tokens} tokens")
        data = np.memmap(file, dtype=dtype, mode="r", shape=(tokens,)) if tokens else np.zeros(0, dtype)
        for a in range(0, tokens, _SCAN_TOKENS):
            hi = int(data[a:a + _SCAN_TOKENS].max())
            if hi >= vocab:
                pos = a + int(np.argmax(data[a:a + _SCAN_TOKENS] >= vocab))
                raise UserError(f"{file}: token id {int(data[pos])} at position {pos} is not below the vocabulary "
                                f"size {vocab}: damaged shard")
        del data
        total_tokens += tokens
        total_docs += off.size - 1
    for key, actual in (("num_tokens", total_tokens), ("num_documents", total_docs)):
        if key in index and int(index[key]) != actual:
            raise UserError(f"{index_file}: {key} is {index[key]} but the shards hold {actual}")


def shards_key(corpus_fp: str, tokenizer_fp: str, shard_tokens: int) -> str:
    blob = f"{_FORMAT}|{corpus_fp}|{tokenizer_fp}|{shard_tokens}"
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def write_shards(docs: list[str] | list[list[int]], tokenizer, folder: str | Path, *, shard_tokens: int) -> TokenShards:
    """Tokenize ``docs`` into a new shard folder at ``folder`` (atomically; never overwrites).

    Args:
        docs: texts (tokenized with ``tokenizer``) or lists of token ids (taken as they are).
        tokenizer: provides ``encode_batch``, ``bos_id``, ``eos_id``, ``vocab_size``.
        folder: the final folder; if it already exists (another rank won the race) it is used as is.
        shard_tokens: tokens per shard file (a longer document gets a shard of its own).

    Returns:
        The reader of the folder.

    Raises:
        UserError: the corpus tokenizes to 0 tokens.
    """
    folder = Path(folder)
    if (folder / _INDEX).is_file():
        return TokenShards(folder)
    if folder.exists():
        raise UserError(f"{folder} exists but is not a complete shard folder; remove it by hand to rebuild")
    folder.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shards: list[dict] = []
        buf: list[np.ndarray] = []
        offsets = [0]
        content_tokens = 0

        def flush() -> None:
            name = f"shard_{len(shards):05d}.bin"
            data = np.concatenate(buf) if buf else np.zeros(0, dtype)  # [tokens]
            with open(tmp / name, "wb") as fh:
                fh.write(data.astype(dtype, copy=False).tobytes())
                fh.flush()
                os.fsync(fh.fileno())
            shards.append({"file": name, "tokens": int(data.shape[0]), "doc_offsets": list(offsets)})
            buf.clear()
            offsets[:] = [0]

        for b in range(0, len(docs), _BATCH_DOCS):
            chunk = docs[b:b + _BATCH_DOCS]
            ids = tokenizer.encode_batch(chunk) if chunk and isinstance(chunk[0], str) else chunk
            for seq in ids:
                if len(seq) == 0:
                    continue
                content_tokens += len(seq)
                arr = np.empty(len(seq) + 2, dtype=np.int64)  # [len + 2]
                arr[0] = tokenizer.bos_id
                arr[1:-1] = seq
                arr[-1] = tokenizer.eos_id
                if offsets[-1] > 0 and offsets[-1] + arr.shape[0] > shard_tokens:
                    flush()
                buf.append(arr)
                offsets.append(offsets[-1] + arr.shape[0])
        if content_tokens == 0:
            raise UserError("data: the corpus is empty (0 tokens after tokenization)")
        if offsets[-1] > 0:
            flush()
        index = {"format": _FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                 "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                 "num_tokens": int(sum(s["tokens"] for s in shards)),
                 "num_documents": int(sum(len(s["doc_offsets"]) - 1 for s in shards)), "shards": shards}
        (tmp / _INDEX).write_text(json.dumps(index))
        try:
            os.rename(tmp, folder)  # atomic; fails if another process put a folder there first
        except OSError:
            if not (folder / _INDEX).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenShards(folder)


def build_shards(cfg: DataConfig, tokenizer, cache_dir: str | Path | None = None) -> TokenShards:
    """The token shards of ``cfg``'s corpus with ``tokenizer``: cached under ``<cache>/shards-v2/<hash>``.

    The corpus is tokenized once per (corpus content, tokenizer file, shard size), streaming, by worker
    processes (:mod:`longreach.data.stream`); local rank 0 builds (one process per host, under a lock),
    the other local ranks wait for the index. Every document is framed as ``[bos] + ids + [eos]``.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root(cfg.cache_dir)
    wait = local_rank() != 0
    folder = stream_shards(cfg, tokenizer, root, bos=True, eos=True, wait=wait)
    try:
        return TokenShards(folder)
    except UserError as exc:  # a cached folder damaged since it was built: rebuild it, never trust it
        if wait:
            return _wait_for_valid(folder, exc)
        log.warning("%s; rebuilding the cached token shards", exc)
        bad = folder.parent / f".{folder.name}.bad-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(folder, bad)  # out of the way at once, so no reader picks it up again
        shutil.rmtree(bad, ignore_errors=True)
        return TokenShards(stream_shards(cfg, tokenizer, root, bos=True, eos=True))


def stream_shards(cfg: DataConfig, tokenizer, root: Path, *, bos: bool, eos: bool, wait: bool = False,
                  trust_remote_code: bool = False) -> Path:
    """Build (or find) the shard folder of ``cfg``'s documents with ``tokenizer`` under ``root/shards-v2``.

    Args:
        cfg: the corpus (source, paths, text field) and ``shard_tokens``, ``tokenize_workers``.
        tokenizer: a longreach ``Tokenizer`` or an HF tokenizer loaded from a local folder.
        root: the cache folder.
        bos, eos: frame each document with the tokenizer's bos / eos.
        wait: only wait for another process's build (non-zero local ranks).
        trust_remote_code: for an HF tokenizer reloaded in the worker processes.

    Returns:
        The complete shard folder.
    """
    spec = tokenizer_spec(tokenizer, bos=bos, eos=eos, trust_remote_code=trust_remote_code)
    key = shards_key(corpus_content_hash(cfg, root), spec.fingerprint(), cfg.shard_tokens)
    size = corpus_bytes(cfg)
    workers = cfg.tokenize_workers
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if size is not None and size > _AUTO_WORKERS_BYTES else 0
    what = ", ".join(cfg.paths) if cfg.source == "files" else f"the {cfg.source} corpus"
    return build_token_shards(lambda: iter_documents(cfg), spec, root / _CACHE_DIR / key, shard_tokens=cfg.shard_tokens,
                              workers=workers, total_bytes=size, what=what, wait=wait)


def _wait_for_valid(folder: Path, first: UserError, timeout: float = 1800.0) -> TokenShards:
    """Other local ranks: wait while local rank 0 rebuilds a cached shard folder that failed validation."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if (folder / _INDEX).is_file():
            try:
                return TokenShards(folder)
            except UserError:
                continue
    raise UserError(f"{first}; local rank 0 did not rebuild it within {timeout:.0f} s")
