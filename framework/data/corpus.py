"""The documents of a data config: embedded (stdlib docstrings + tasks), synthetic, or the user's files.

Files are read as a stream (:func:`iter_documents`), one document at a time: text files (one document per
file), ``.jsonl`` (one per line, its ``text_field``), ``.parquet`` (one per row; needs pyarrow) and
HuggingFace ``datasets`` saved with ``save_to_disk`` (a folder with ``dataset_info.json``/``state.json``;
one per row; needs datasets). :func:`corpus_content_hash` keys token shards by what the files hold.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from longreach.data.config import DataConfig
from longreach.data.harvest import harvest_docstrings, harvest_fingerprint
from longreach.data.synthetic import synthetic_documents, task_documents
from longreach.errors import UserError

__all__ = ["corpus_content_hash", "corpus_documents", "corpus_fingerprint", "iter_documents", "list_files"]

_TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".text", ".parquet")
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_FORMAT = "corpus-v1"


def list_files(paths: list[str]) -> list[Path]:
    """The files behind ``data.paths`` (folders expanded to their text/jsonl files, sorted).

    Raises:
        UserError: a path does not exist, or a folder holds no text/jsonl file.
    """
    files: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise UserError(f"data.paths: {p} does not exist")
        if p.is_dir() and _is_hf_dataset(p):
            files.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES)
            if not found:
                raise UserError(f"data.paths: folder {p} holds no {', '.join(_TEXT_SUFFIXES)} file")
            files.extend(found)
        else:
            files.append(p)
    return files


def _is_hf_dataset(folder: Path) -> bool:
    return any((folder / m).is_file() for m in _DATASET_MARKERS)


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    with path.open("r", encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise UserError(f"{path}:{lineno}: each line must be a JSON object with a string {field!r} field "
                                "(data.text_field)")
            if row[field]:
                yield row[field]


def _column_texts(rows: Iterable[Any], where: str, field: str) -> Iterator[str]:
    for i, text in enumerate(rows):
        if text is None:
            continue
        if not isinstance(text, str):
            raise UserError(f"{where}: row {i}: column {field!r} (data.text_field) holds {type(text).__name__}, not text")
        if text:
            yield text


def _optional_import(module: str, path: Path, what: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{path}: reading {what} needs {package}, which is not installed (pip install {package})") from None


def _iter_parquet(path: Path, field: str) -> Iterator[str]:
    pq = _optional_import("pyarrow.parquet", path, ".parquet files", "pyarrow")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    if field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no column {field!r} (data.text_field); columns: {', '.join(pf.schema_arrow.names)}")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        yield from _column_texts(batch.column(0).to_pylist(), str(path), field)


def _iter_hf_dataset(folder: Path, field: str) -> Iterator[str]:
    datasets = _optional_import("datasets", folder, "a saved HuggingFace dataset", "datasets")
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types
        raise UserError(f"{folder}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"{folder}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                            "list one split's folder in data.paths")
        ds = ds["train"]
    if field not in ds.column_names:
        raise UserError(f"{folder}: no column {field!r} (data.text_field); columns: {', '.join(ds.column_names)}")
    for batch in ds.iter(batch_size=1024):
        yield from _column_texts(batch[field], str(folder), field)


def _iter_file(f: Path, field: str) -> Iterator[str]:
    try:
        if f.is_dir():
            yield from _iter_hf_dataset(f, field)
        elif f.suffix.lower() == ".jsonl":
            yield from _iter_jsonl(f, field)
        elif f.suffix.lower() == ".parquet":
            yield from _iter_parquet(f, field)
        else:
            text = f.read_text(encoding="utf-8")
            if text.strip():
                yield text
    except UnicodeDecodeError as exc:
        raise UserError(f"{f}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{f}: cannot read ({exc.strerror})") from None


def _file_documents(paths: list[str], field: str = "text") -> list[str]:
    return [d for f in list_files(paths) for d in _iter_file(f, field)]


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """The documents of :func:`corpus_documents`, one at a time (files are streamed, never all in memory).

    Raises:
        UserError: as :func:`corpus_documents` (an empty corpus is found by the consumer).
    """
    if cfg.source != "files":
        yield from corpus_documents(cfg)
        return
    for f in list_files(cfg.paths):
        yield from _iter_file(f, cfg.text_field)


def corpus_bytes(cfg: DataConfig) -> int | None:
    """Size of the files behind ``cfg`` (for progress and the worker-count choice); None for generated sources."""
    if cfg.source != "files":
        return None
    total = 0
    for f in list_files(cfg.paths):
        files = [x for x in f.rglob("*") if x.is_file()] if f.is_dir() else [f]
        total += sum(x.stat().st_size for x in files)
    return total


def corpus_content_hash(cfg: DataConfig, cache: Path | None = None) -> str:
    """Hash of the corpus *content*: generated sources by their spec, files by their bytes.

    A file's sha256 is memoised under ``cache/file-hashes`` by (path, size, mtime), so a restart does not
    re-read a large corpus just to find its shards.
    """
    if cfg.source != "files":
        return corpus_fingerprint(cfg)
    h = hashlib.sha256(f"{_FORMAT}|files|{cfg.text_field}".encode())
    for f in list_files(cfg.paths):
        files = sorted(x for x in f.rglob("*") if x.is_file()) if f.is_dir() else [f]
        for x in files:
            h.update(_file_hash(x, cache).encode())
    return h.hexdigest()


def _file_hash(path: Path, cache: Path | None) -> str:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache / "file-hashes" / key if cache is not None else None
    if memo is not None and memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    out = digest.hexdigest()
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(out)
        os.replace(tmp, memo)
    return out


def corpus_documents(cfg: DataConfig) -> list[str]:
    """Every document of ``cfg`` in a deterministic order (before the validation split).

    * ``embedded``: harvested standard-library docstrings (one document per module), followed by
      generated tasks making up ``passkey_fraction`` + ``recall_fraction`` of all documents.
    * ``synthetic``: ``synthetic_documents`` generated documents (passkey, MQAR, plain sentences).
    * ``files``: the files of ``paths`` (one document per text file, per jsonl line).

    Raises:
        UserError: a missing path, an unreadable jsonl line (file:line), or an empty corpus.
    """
    if cfg.source == "synthetic":
        docs = synthetic_documents(cfg.synthetic_documents, seed=cfg.seed, passkey_fraction=cfg.passkey_fraction,
                                   recall_fraction=cfg.recall_fraction, max_chars=cfg.task_chars)
    elif cfg.source == "embedded":
        harvested = list(harvest_docstrings(cfg.harvest_chars))
        share = cfg.passkey_fraction + cfg.recall_fraction
        n_tasks = int(round(len(harvested) * share / (1.0 - share))) if share > 0 else 0
        docs = harvested + task_documents(n_tasks, seed=cfg.seed, passkey_fraction=cfg.passkey_fraction,
                                          recall_fraction=cfg.recall_fraction, max_chars=cfg.task_chars)
    else:
        docs = _file_documents(cfg.paths, cfg.text_field)
    if not any(d.strip() for d in docs):
        where = ", ".join(cfg.paths) if cfg.source == "files" else f"source {cfg.source!r}"
        raise UserError(f"data: the corpus is empty (0 tokens) — {where}")
    return docs


def corpus_fingerprint(cfg: DataConfig) -> str:
    """Hash of everything the documents depend on (without reading them: file sizes and mtimes)."""
    spec: dict = {"format": _FORMAT, "source": cfg.source, "seed": cfg.seed}
    if cfg.source in ("embedded", "synthetic"):
        spec.update(passkey=cfg.passkey_fraction, recall=cfg.recall_fraction, task_chars=cfg.task_chars)
    if cfg.source == "synthetic":
        spec["count"] = cfg.synthetic_documents
    elif cfg.source == "embedded":
        spec.update(harvest=harvest_fingerprint(), harvest_chars=cfg.harvest_chars)
    else:
        files = []
        for f in list_files(cfg.paths):
            st = f.stat()
            files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        spec["files"] = files
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
