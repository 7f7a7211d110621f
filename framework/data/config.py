"""The ``data:`` section of a job config."""
from __future__ import annotations

from dataclasses import dataclass, field

from longreach.errors import ConfigError

SOURCES = ("embedded", "synthetic", "files")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    source: str = field(default="embedded", metadata={"choices": SOURCES})
    """Where documents come from: ``embedded`` (docstrings of the installed Python standard library,
    harvested with ``ast``, mixed with generated long-range tasks), ``synthetic`` (generated only:
    bit-identical on every machine) or ``files`` (``paths``)."""
    paths: list[str] = field(default_factory=list)
    """For ``source: files``: text files (one document per file), ``.jsonl`` files (one document per
    line, in its ``text_field``), ``.parquet`` files (one per row; needs pyarrow), HF ``datasets`` folders
    written by ``save_to_disk`` (one per row; needs datasets) or folders (every ``.txt``/``.md``/``.jsonl``/
    ``.parquet`` below them, sorted)."""
    text_field: str = "text"
    """The jsonl field / parquet or dataset column that holds each document's text."""
    tokenize_workers: int | None = None
    """Processes that tokenize the corpus into shards (0: in this process); None: one per core (up to 8)
    for file corpora over 8 MB, else 0."""
    vocab_size: int = 1024
    """Vocabulary size of the trained sentencepiece tokenizer (ignored when ``tokenizer`` is given)."""
    tokenizer: str | None = None
    """Path to an existing sentencepiece ``.model``; None trains one on the corpus and caches it."""
    split_digits: bool = True
    """Train the tokenizer with every digit its own piece (sentencepiece ``split_digits``): a 5-digit pass
    key is 5 tokens a model copies one by one, never a multi-digit piece. Part of the tokenizer cache key."""
    cache_dir: str | None = None
    """Cache folder for tokenizers and token shards; None: ``$LONGREACH_CACHE`` or ``~/.cache/longreach``."""
    shard_tokens: int = 1 << 22
    """Tokens per shard file (documents are never split across shards)."""
    passkey_fraction: float = 0.1
    """Share of documents (embedded and synthetic sources) that are passkey-retrieval tasks."""
    recall_fraction: float = 0.1
    """Share of documents (embedded and synthetic sources) that are multi-query associative recall."""
    task_chars: int = 3000
    """Longest generated task document, in characters (lengths are drawn uniformly up to it)."""
    synthetic_documents: int = 600
    """Number of documents of ``source: synthetic``."""
    harvest_chars: int = 3_000_000
    """Cap on the characters of standard-library docstrings harvested for ``source: embedded``."""
    seed: int = 0
    """Seed of generated documents and of the validation split."""
    val_fraction: float = 0.02
    """Share of documents held out for validation (at least one when > 0)."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"data.source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        if self.source == "files" and not self.paths:
            raise ConfigError("data.source is 'files' but data.paths is empty; list text/jsonl files or folders")
        if self.vocab_size < 300 and self.tokenizer is None:
            raise ConfigError(f"data.vocab_size must be >= 300 (256 byte-fallback pieces + specials), got {self.vocab_size}")
        if self.vocab_size > 1 << 20:
            raise ConfigError(f"data.vocab_size is too large: {self.vocab_size}")
        if self.tokenize_workers is not None and self.tokenize_workers < 0:
            raise ConfigError(f"data.tokenize_workers must be >= 0 (or null for automatic), got {self.tokenize_workers}")
        if self.shard_tokens < 1:
            raise ConfigError(f"data.shard_tokens must be >= 1, got {self.shard_tokens}")
        for name in ("passkey_fraction", "recall_fraction", "val_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"data.{name} must be in [0, 1), got {v}")
        if self.passkey_fraction + self.recall_fraction >= 1.0:
            raise ConfigError("data.passkey_fraction + data.recall_fraction must be < 1")
        if self.task_chars < 200:
            raise ConfigError(f"data.task_chars must be >= 200, got {self.task_chars}")
        if self.synthetic_documents < 1:
            raise ConfigError(f"data.synthetic_documents must be >= 1, got {self.synthetic_documents}")
        if self.harvest_chars < 10_000:
            raise ConfigError(f"data.harvest_chars must be >= 10000, got {self.harvest_chars}")
