"""English text harvested at run time from the docstrings of the installed Python standard library.

Source files are *parsed* with :mod:`ast`, never imported (some standard-library modules have side
effects on import: ``antigravity`` opens a browser, ``this`` prints). One document per source file:
its module docstring followed by its class and function docstrings, cleaned of doctest lines and
reStructuredText roles. Files are visited in sorted order, so the result is deterministic for one
Python installation (it differs between Python versions: bit-identical tests use generated data).
"""
from __future__ import annotations

import ast
import re
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

__all__ = ["clean_docstring", "harvest_docstrings", "stdlib_dir"]

# Folders of the standard library that hold tests, vendored third-party code or tool scripts.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3",
              "turtledemo", "ensurepip", "venv", "pydoc_data", "encodings", "config-3", "Tools"}
_ROLE = re.compile(r":[a-zA-Z]+(?::[a-zA-Z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`name` -> name
_LITERAL = re.compile(r"``([^`]*)``")
_WS = re.compile(r"[ \t]+")


def stdlib_dir() -> Path:
    """Folder of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def clean_docstring(doc: str) -> str:
    """Docstring → plain English paragraphs: no doctest lines, reST roles unwrapped, whitespace folded.

    Returns:
        The cleaned text ('' when nothing prose-like is left).
    """
    paragraphs: list[str] = []
    current: list[str] = []
    in_doctest = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>") or stripped.startswith("..."):
            in_doctest = True
            continue
        if in_doctest:
            if not stripped:
                in_doctest = False
            continue
        if not stripped:
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        if stripped.startswith(".. ") or set(stripped) <= set("=-~^*#+"):
            continue
        current.append(stripped)
    if current:
        paragraphs.append(" ".join(current))
    out = []
    for p in paragraphs:
        p = _ROLE.sub(r"\1", p)
        p = _LITERAL.sub(r"\1", p)
        p = _WS.sub(" ", p).strip()
        if len(p) < 20:
            continue
        letters = sum(ch.isalpha() or ch == " " for ch in p)
        if letters < 0.75 * len(p) or not p.isascii():
            continue
        out.append(p)
    return "\n".join(out)


def _file_document(path: Path) -> str:
    try:
        source = path.read_bytes()
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError, RecursionError):
        return ""
    parts: list[str] = []
    seen: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        text = clean_docstring(doc)
        if len(text) < 40 or text in seen:
            continue
        seen.add(text)
        parts.append(text)
    return "\n\n".join(parts)


def _source_files(root: Path) -> list[Path]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        if any(part in _SKIP_DIRS or part.startswith("test") or part.startswith("config-") for part in rel[:-1]):
            continue
        if rel[-1].startswith("test_") or rel[-1] in ("antigravity.py", "this.py"):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@lru_cache(maxsize=4)
def harvest_docstrings(max_chars: int = 3_000_000, root: str | None = None) -> tuple[str, ...]:
    """Documents (one per standard-library source file) of cleaned docstrings, up to ``max_chars``.

    Args:
        max_chars: stop once this many characters are collected (the last document is cut at a
            paragraph boundary so the total stays within the cap).
        root: folder to harvest (default: the running interpreter's standard library).

    Returns:
        Tuple of documents in sorted file order; empty only if nothing could be parsed.
    """
    base = Path(root) if root is not None else stdlib_dir()
    docs: list[str] = []
    total = 0
    for path in _source_files(base):
        text = _file_document(path)
        if not text:
            continue
        if total + len(text) > max_chars:
            keep: list[str] = []
            size = total
            for para in text.split("\n"):
                if size + len(para) + 1 > max_chars:
                    break
                keep.append(para)
                size += len(para) + 1
            if keep:
                docs.append("\n".join(keep))
            break
        docs.append(text)
        total += len(text) + 1
    return tuple(docs)


def harvest_fingerprint() -> str:
    """What the harvested text depends on: Python version and standard-library location."""
    return f"python-{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}:{stdlib_dir()}"
