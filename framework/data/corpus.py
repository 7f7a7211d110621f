"""The documents of a data config: embedded (stdlib docstrings + tasks), synthetic, or the user's files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from longreach.data.config import DataConfig
from longreach.data.harvest import harvest_docstrings, harvest_fingerprint
from longreach.data.synthetic import synthetic_documents, task_documents
from longreach.errors import UserError

__all__ = ["corpus_documents", "corpus_fingerprint", "list_files"]

_TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".text")
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
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES)
            if not found:
                raise UserError(f"data.paths: folder {p} holds no {', '.join(_TEXT_SUFFIXES)} file")
            files.extend(found)
        else:
            files.append(p)
    return files


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open("r", encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UserError(f"{path}:{lineno}: each line must be a JSON object with a string 'text' field")
            if row["text"]:
                docs.append(row["text"])
    return docs


def _file_documents(paths: list[str]) -> list[str]:
    docs: list[str] = []
    for f in list_files(paths):
        try:
            if f.suffix.lower() == ".jsonl":
                docs.extend(_read_jsonl(f))
            else:
                text = f.read_text(encoding="utf-8")
                if text.strip():
                    docs.append(text)
        except UnicodeDecodeError as exc:
            raise UserError(f"{f}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise UserError(f"{f}: cannot read ({exc.strerror})") from None
    return docs


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
        docs = _file_documents(cfg.paths)
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
