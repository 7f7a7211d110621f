"""Streaming, shared tokenization: documents → worker processes → memory-mapped token shards.

One pass over the corpus, never holding it in memory: the parent process reads documents in batches of
about 1 MB, worker processes tokenize them (at most two batches per worker in flight, so memory stays
flat whatever the corpus size), and the parent appends the ids to the current shard file in order.
The result is an ordinary shard folder (:class:`~longreach.data.shards.TokenShards` reads it).

A build is done once per (corpus content, tokenizer, layout) key and shared: one process holds
``<key>.lock`` (host and pid) while it writes ``<key>.partial/``; everyone else waits for
``<key>/index.json``. A finished shard is fsynced and recorded in ``<key>.partial/progress.json``
with the number of source documents it consumed, so an interrupted build (Ctrl-C, a killed job: its
lock names a dead pid on this host and is taken over) resumes after its last complete shard instead of
starting again. The folder is renamed into place only when complete.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from longreach.data.tokenizer import Tokenizer
from longreach.errors import UserError
from longreach.procs import pid_alive

__all__ = ["TokenStream", "TokenizerSpec", "build_token_shards", "tokenizer_spec"]

log = logging.getLogger(__name__)

_FORMAT = "longreach-shards-v1"  # the folder format TokenShards reads
_BATCH_BYTES = 1 << 20
_BATCH_DOCS = 4096
_PROGRESS = "progress.json"
_INDEX = "index.json"
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                       "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt")


@dataclass(frozen=True, slots=True)
class TokenizerSpec:
    """What a worker process needs to load the tokenizer (picklable), and how documents are framed.

    Attributes:
        kind: ``spm`` (a longreach sentencepiece ``.model``) or ``hf`` (a transformers tokenizer folder).
        path: the model file or folder.
        trust_remote_code: ``hf`` only.
        prefix, suffix: ids written before and after every document (bos/eos).
        vocab_size: size of the id space (chooses uint16 or uint32 shards).
    """

    kind: str
    path: str
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    vocab_size: int
    trust_remote_code: bool = False

    def fingerprint(self) -> str:
        """sha256 of the tokenizer files and the framing (what the shards depend on)."""
        h = hashlib.sha256(f"{self.kind}|{self.prefix}|{self.suffix}|{self.trust_remote_code}".encode())
        files = [Path(self.path)] if self.kind == "spm" else [Path(self.path) / f for f in _HF_TOKENIZER_FILES]
        for f in files:
            if f.is_file():
                h.update(f.name.encode() + b"\0" + f.read_bytes())
        return h.hexdigest()


def tokenizer_spec(tokenizer: Any, *, bos: bool, eos: bool, trust_remote_code: bool = False) -> TokenizerSpec:
    """The spec of a longreach :class:`~longreach.data.tokenizer.Tokenizer` or an HF tokenizer.

    Args:
        tokenizer: the loaded tokenizer (an HF one must come from a local folder: ``name_or_path``).
        bos, eos: frame each document with the tokenizer's bos / eos id (skipped when it has none).
    """
    if hasattr(tokenizer, "sp"):
        bos_id, eos_id = tokenizer.bos_id, tokenizer.eos_id
        kind, path, vocab = "spm", str(tokenizer.path), int(tokenizer.vocab_size)
    else:
        bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        kind, path, vocab = "hf", str(tokenizer.name_or_path), int(len(tokenizer))
        if not Path(path).is_dir():
            raise UserError(f"the tokenizer must come from a local folder to tokenize in worker processes (got {path!r})")
    prefix = (int(bos_id),) if bos and bos_id is not None and bos_id >= 0 else ()
    suffix = (int(eos_id),) if eos and eos_id is not None and eos_id >= 0 else ()
    return TokenizerSpec(kind=kind, path=path, prefix=prefix, suffix=suffix, vocab_size=vocab,
                         trust_remote_code=trust_remote_code)


# ------------------------------------------------------------------------------------------ workers
_WORKER_ENCODE: Callable[[list[str]], list[list[int]]] | None = None


def _load_encoder(spec: TokenizerSpec) -> Callable[[list[str]], list[list[int]]]:
    if spec.kind == "spm":
        return Tokenizer(spec.path).encode_batch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code, local_files_only=True)
    return lambda texts: tok(list(texts), add_special_tokens=False)["input_ids"]


def _init_worker(spec: TokenizerSpec) -> None:
    global _WORKER_ENCODE
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per core already
    _WORKER_ENCODE = _load_encoder(spec)


def _encode(encode: Callable[[list[str]], list[list[int]]], texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    ids = encode(texts)
    lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))  # [n_docs]
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))  # [tokens]
    return lens, flat, sum(len(t.encode("utf-8")) for t in texts)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    assert _WORKER_ENCODE is not None
    return _encode(_WORKER_ENCODE, texts)


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= _BATCH_BYTES or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(docs: Iterator[str], spec: TokenizerSpec, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """``(lengths [n], ids [sum], text bytes)`` per batch, in corpus order; at most 2 batches per worker
    in flight (a plain ``Pool.imap`` would read the whole corpus ahead into its task queue)."""
    if workers <= 0:
        encode = _load_encoder(spec)
        for batch in _batches(docs):
            yield _encode(encode, batch)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the parent may hold a process group's threads, which fork would copy in an undefined state
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(spec,)) as pool:
        pending: deque = deque()
        for batch in _batches(docs):
            pending.append(pool.submit(_worker_encode, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ------------------------------------------------------------------------------------------ locking
def _try_lock(lock: Path) -> bool:
    """Take ``lock`` (O_EXCL); a lock left by a dead process of this host is removed first."""
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                host, pid = lock.read_text().split()
            except (OSError, ValueError):
                return False  # being written right now
            if host == socket.gethostname() and not pid_alive(int(pid)):
                log.warning("token shards: removing the stale lock %s of dead process %s", lock, pid)
                lock.unlink(missing_ok=True)
                continue
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        return True
    return False


# ------------------------------------------------------------------------------------------ builder
class _ShardWriter:
    """Appends framed documents to shard files of ``partial``; records each finished shard in progress.json."""

    def __init__(self, partial: Path, spec: TokenizerSpec, shard_tokens: int, meta: dict[str, Any]) -> None:
        self.partial, self.shard_tokens, self.meta = partial, shard_tokens, meta
        self.dtype = np.dtype(np.uint16 if spec.vocab_size <= 1 << 16 else np.uint32)
        self.prefix = np.asarray(spec.prefix, dtype=np.int64)
        self.suffix = np.asarray(spec.suffix, dtype=np.int64)
        self.shards: list[dict[str, Any]] = []
        self.docs_done = 0  # source documents consumed by the finished shards and the open one
        self.content_tokens = 0
        progress = partial / _PROGRESS
        if progress.is_file():
            state = json.loads(progress.read_text())
            if state.get("meta") == meta:
                self.shards, self.docs_done = state["shards"], int(state["docs_done"])
                self.content_tokens = int(state["content_tokens"])
        keep = {s["file"] for s in self.shards}
        for f in partial.glob("shard_*.bin"):
            if f.name not in keep:
                f.unlink()  # a shard the interrupted build had not finished
        self.resumed_docs = self.docs_done
        self._open()

    def _open(self) -> None:
        self.name = f"shard_{len(self.shards):05d}.bin"
        self.fh = open(self.partial / self.name, "wb")
        self.offsets = [0]

    def _close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.shards.append({"file": self.name, "tokens": self.offsets[-1], "doc_offsets": self.offsets})
        state = {"meta": self.meta, "shards": self.shards, "docs_done": self.docs_done,
                 "content_tokens": self.content_tokens}
        tmp = self.partial / (_PROGRESS + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.partial / _PROGRESS)

    def add(self, lens: np.ndarray, flat: np.ndarray) -> None:
        """Append one encoded batch: ``lens [n]`` document lengths, ``flat [sum(lens)]`` their ids."""
        start = 0
        for length in lens.tolist():
            ids = flat[start:start + length]  # [length]
            start += length
            if length:
                total = length + self.prefix.size + self.suffix.size
                if self.offsets[-1] > 0 and self.offsets[-1] + total > self.shard_tokens:
                    self._close()  # before this document: a resumed build restarts exactly here
                    self._open()
                self.fh.write(np.concatenate([self.prefix, ids, self.suffix]).astype(self.dtype).tobytes())
                self.offsets.append(self.offsets[-1] + total)
                self.content_tokens += length
            self.docs_done += 1

    def finish(self) -> dict[str, Any]:
        if self.offsets[-1] > 0:
            self._close()
        else:
            self.fh.close()
            (self.partial / self.name).unlink()
        return {"format": _FORMAT, "dtype": self.dtype.name, **self.meta,
                "num_tokens": int(sum(s["tokens"] for s in self.shards)),
                "num_documents": int(sum(len(s["doc_offsets"]) - 1 for s in self.shards)), "shards": self.shards}


def build_token_shards(documents: Callable[[], Iterable[str]], spec: TokenizerSpec, folder: str | Path, *,
                       shard_tokens: int, workers: int, total_bytes: int | None = None, what: str = "corpus",
                       wait: bool = False, timeout: float = 86400.0) -> Path:
    """Tokenize a document stream into the shard folder ``folder`` once; reuse it when it exists.

    Args:
        documents: returns a fresh iterator of the documents, in a deterministic order.
        spec: the tokenizer (loaded in each worker) and the document framing.
        folder: the final folder (its name is the cache key of corpus + tokenizer + layout).
        shard_tokens: tokens per shard file (a longer document gets a shard of its own).
        workers: tokenizer processes (0: tokenize in this process).
        total_bytes: corpus size for the progress bar (None: unknown).
        what: names the corpus in progress lines and errors.
        wait: only wait for another process to build it (non-zero local ranks).
        timeout: seconds to wait for another process's build.

    Returns:
        ``folder``, complete.

    Raises:
        UserError: the corpus tokenizes to 0 tokens, or the wait timed out (naming the lock file).
    """
    folder = Path(folder)
    index = folder / _INDEX
    lock = folder.with_name(folder.name + ".lock")
    partial = folder.with_name(folder.name + ".partial")
    deadline = time.monotonic() + timeout
    folder.parent.mkdir(parents=True, exist_ok=True)
    while not index.is_file():
        if not wait and _try_lock(lock):
            try:
                if not index.is_file():
                    _build(documents, spec, folder, partial, shard_tokens=shard_tokens, workers=workers,
                           total_bytes=total_bytes, what=what)
            finally:
                lock.unlink(missing_ok=True)
            break
        if time.monotonic() > deadline:
            raise UserError(f"timed out after {timeout:.0f} s waiting for another process to tokenize {what} into "
                            f"{folder} (its lock: {lock}; remove the lock if that process is gone)")
        time.sleep(0.2)
    return folder


def _build(documents: Callable[[], Iterable[str]], spec: TokenizerSpec, folder: Path, partial: Path, *,
           shard_tokens: int, workers: int, total_bytes: int | None, what: str) -> None:
    from tqdm.auto import tqdm

    partial.mkdir(exist_ok=True)
    meta = {"vocab_size": spec.vocab_size, "bos_id": spec.prefix[0] if spec.prefix else None,
            "eos_id": spec.suffix[0] if spec.suffix else None, "shard_tokens": shard_tokens}
    writer = _ShardWriter(partial, spec, shard_tokens, meta)
    docs = iter(documents())
    if writer.resumed_docs:
        log.info("token shards: resuming the interrupted build of %s after %d documents (%d shards kept)", what,
                 writer.resumed_docs, len(writer.shards))
        for _ in itertools.islice(docs, writer.resumed_docs):
            pass
    t0 = time.perf_counter()
    done_bytes = 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=f"tokenizing {what}",
               disable=not sys.stderr.isatty(), leave=False)
    last_log = t0
    try:
        for lens, flat, nbytes in _encoded(docs, spec, workers):
            writer.add(lens, flat)
            done_bytes += nbytes
            bar.update(nbytes)
            bar.set_postfix(tokens=f"{writer.content_tokens / 1e6:.1f}M", refresh=False)
            now = time.perf_counter()
            if now - last_log > 10:
                log.info("tokenizing %s: %.1f MB (%.1f MB/s), %.1fM tokens", what, done_bytes / 1e6,
                         done_bytes / 1e6 / (now - t0), writer.content_tokens / 1e6)
                last_log = now
        idx = writer.finish()
    finally:
        bar.close()
        if not writer.fh.closed:
            writer.fh.close()
    if writer.content_tokens == 0:
        raise UserError(f"data: the corpus is empty (0 tokens after tokenization) — {what}")
    (partial / _PROGRESS).unlink(missing_ok=True)
    (partial / _INDEX).write_text(json.dumps(idx))
    os.rename(partial, folder)
    dt = time.perf_counter() - t0
    log.info("tokenized %s: %.1f MB in %.1f s (%.1f MB/s, %d worker(s)), %d tokens in %d shard(s) -> %s", what,
             done_bytes / 1e6, dt, done_bytes / 1e6 / max(dt, 1e-9), workers, writer.content_tokens,
             len(idx["shards"]), folder)


class TokenStream:
    """The documents of a shard folder as one flat, memory-mapped token sequence (nothing loaded).

    ``stream[a:b]`` reads tokens ``a … b−1`` (int64 ``[b − a]``) from the shard files they lie in.
    """

    def __init__(self, shards: Any) -> None:
        self.shards = shards
        sizes = [int(s["tokens"]) for s in shards.index["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [n_shards + 1]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b, _ = sl.indices(len(self))
        parts = []
        s = int(np.searchsorted(self.starts, a, side="right")) - 1
        while a < b:
            end = min(b, int(self.starts[s + 1]))
            parts.append(np.asarray(self.shards._map(s)[a - self.starts[s]:end - self.starts[s]], dtype=np.int64))
            a, s = end, s + 1
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
