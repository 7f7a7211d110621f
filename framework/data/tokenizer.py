"""A sentencepiece tokenizer, trained by the framework on the corpus and cached.

Training is byte-pair encoding with byte fallback (any text round-trips, unknown characters become
UTF-8 byte pieces), digits split one per piece by default (``DataConfig.split_digits``: pass keys and
MQAR values are learnable digit by digit), identity normalisation and whitespace kept as is. Ids:
unk 0, bos 1, eos 2, pad 3.

The cache key is a hash of (corpus spec, vocabulary size, digit splitting, training recipe). Concurrent ranks are safe:
local rank 0 trains into a temporary file and renames it into place atomically; the other ranks wait
for the file.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from longreach.data.config import DataConfig
from longreach.data.corpus import corpus_fingerprint, iter_documents
from longreach.errors import UserError

__all__ = ["Tokenizer", "cache_root", "load_or_train_tokenizer", "train_tokenizer", "wait_for_file"]

_RECIPE = "spm-bpe-v1"
_MAX_SENTENCES = 200_000


def cache_root(cfg_cache_dir: str | None = None) -> Path:
    """The cache folder: the config field, else ``$LONGREACH_CACHE``, else ``~/.cache/longreach``."""
    if cfg_cache_dir:
        root, what = Path(cfg_cache_dir).expanduser(), f"data.cache_dir={cfg_cache_dir}"
    elif os.environ.get("LONGREACH_CACHE"):
        root, what = Path(os.environ["LONGREACH_CACHE"]).expanduser(), f"LONGREACH_CACHE={os.environ['LONGREACH_CACHE']}"
    else:
        root, what = Path.home() / ".cache" / "longreach", "the cache folder"
    if root.exists() and not root.is_dir():
        raise UserError(f"{what}: {root} is a file, not a folder; point it at a folder for tokenizers and shards")
    return root


def local_rank() -> int:
    """Rank of this process on its node (torchrun's LOCAL_RANK; 0 without one)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def wait_for_file(path: Path, *, what: str, timeout: float = 1800.0, poll: float = 0.2) -> None:
    """Block until ``path`` exists (another local rank is writing it atomically)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise UserError(f"timed out after {timeout:.0f} s waiting for local rank 0 to write {what} at {path}")
        time.sleep(poll)


class Tokenizer:
    """A sentencepiece model with bos/eos/pad ids.

    Args:
        model_file: path to a sentencepiece ``.model``.
    """

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece as spm

        self.path = Path(model_file)
        if not self.path.is_file():
            raise UserError(f"tokenizer model not found: {self.path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as exc:
            raise UserError(f"cannot load tokenizer model {self.path}: {exc}") from None
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        pad = self.sp.pad_id()
        self.pad_id: int = pad if pad >= 0 else self.eos_id

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no bos/eos added)."""
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; bos/eos/pad ids are dropped."""
        specials = {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in specials])

    def fingerprint(self) -> str:
        """sha256 of the model file (what token shards made with this tokenizer depend on)."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _sentences(texts: Iterable[str]) -> list[str]:
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if len(lines) > _MAX_SENTENCES:  # deterministic subsample (sentencepiece's own shuffle is seeded by time)
        step = len(lines) / _MAX_SENTENCES
        lines = [lines[int(i * step)] for i in range(_MAX_SENTENCES)]
    return lines


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path, *, split_digits: bool = True) -> Tokenizer:
    """Train a byte-fallback BPE sentencepiece model on ``texts`` and write it to ``path`` atomically.

    Args:
        texts: documents (split into lines for training; at most 200k lines are used).
        vocab_size: number of pieces (>= 300: 256 byte pieces + 4 specials + merges).
        path: where the ``.model`` goes (its folder is created).
        split_digits: every digit its own piece (no multi-digit pieces are learned).

    Returns:
        The loaded tokenizer.
    """
    import sentencepiece as spm

    lines = _sentences(texts)
    if not lines:
        raise UserError("cannot train a tokenizer on an empty corpus")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=split_digits, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, input_sentence_size=_MAX_SENTENCES,
            shuffle_input_sentence=False, character_coverage=0.9995, hard_vocab_limit=False,
            minloglevel=2)
    except RuntimeError as exc:
        raise UserError(f"data.vocab_size={vocab_size}: sentencepiece could not train the tokenizer: {exc}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Tokenizer(path)


def tokenizer_key(cfg: DataConfig) -> str:
    """Cache key of the tokenizer that ``cfg`` trains: hash of (corpus spec, vocab size, digit splitting, recipe)."""
    blob = f"{_RECIPE}|{cfg.vocab_size}|split_digits={int(cfg.split_digits)}|{corpus_fingerprint(cfg)}"
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_or_train_tokenizer(cfg: DataConfig, cache_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer of ``cfg``: ``cfg.tokenizer`` if given, else the cached one (trained once).

    Args:
        cfg: the data config (its corpus spec, ``vocab_size`` and ``split_digits`` key the cache).
        cache_dir: cache folder (default: :func:`cache_root` of ``cfg.cache_dir``).

    Returns:
        The tokenizer. Local rank 0 trains when the cache misses; other local ranks wait for its file.
    """
    if cfg.tokenizer is not None:
        path = Path(cfg.tokenizer).expanduser()
        if not path.is_file():
            raise UserError(f"data.tokenizer: tokenizer model not found: {path}")
        return Tokenizer(path)
    root = Path(cache_dir) if cache_dir is not None else cache_root(cfg.cache_dir)
    path = root / "tokenizers" / f"{tokenizer_key(cfg)}.model"
    if path.is_file():
        return Tokenizer(path)
    if local_rank() != 0:
        wait_for_file(path, what="the tokenizer")
        return Tokenizer(path)

    lines = sample_lines(lambda: iter_documents(cfg))
    if not lines:
        where = ", ".join(cfg.paths) if cfg.source == "files" else f"source {cfg.source!r}"
        raise UserError(f"data: the corpus is empty (0 tokens) — {where}")
    return train_tokenizer(lines, cfg.vocab_size, path, split_digits=cfg.split_digits)


def sample_lines(documents: Callable[[], Iterable[str]], limit: int = _MAX_SENTENCES) -> list[str]:
    """The non-blank lines of the documents, every ``n/limit``-th one when there are more than ``limit``
    (the same lines :func:`train_tokenizer` would pick), in two streaming passes: memory holds the sample,
    never the corpus."""
    def lines() -> Iterator[str]:
        return (line for text in documents() for line in text.split("\n") if line.strip())

    count = sum(1 for _ in lines())
    if count <= limit:
        return list(lines())
    step = count / limit
    wanted = iter(int(i * step) for i in range(limit))
    out: list[str] = []
    nxt = next(wanted)
    for i, line in enumerate(lines()):
        if i == nxt:
            out.append(line)
            nxt = next(wanted, -1)
            if nxt < 0:
                break
    return out
