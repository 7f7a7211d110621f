"""Streaming, shared tokenization: worker processes, content-hash cache, resume, locks, file formats."""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from longreach.data import DataConfig, TokenShards, build_shards, load_or_train_tokenizer, write_shards
from longreach.data import stream as S
from longreach.data.corpus import corpus_documents, iter_documents
from longreach.data.shards import stream_shards
from longreach.data.synthetic import synthetic_documents
from longreach.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl + txt corpus of 120 generated documents and a tokenizer trained on it."""
    root = tmp_path_factory.mktemp("corpus")
    docs = synthetic_documents(120, seed=3, passkey_fraction=0.2, recall_fraction=0.2, max_chars=900)
    (root / "data").mkdir()
    with (root / "data" / "a.jsonl").open("w") as fh:
        for d in docs[:100]:
            fh.write(json.dumps({"body": d, "id": 1}) + "\n")
    for i, d in enumerate(docs[100:]):
        (root / "data" / f"b{i:02d}.txt").write_text(d)
    cfg = DataConfig(source="files", paths=[str(root / "data")], text_field="body", cache_dir=str(root / "cache"),
                     vocab_size=400, shard_tokens=3000, tokenize_workers=0)
    tok = load_or_train_tokenizer(cfg)
    return cfg, tok, docs


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_workers_equal_in_process_and_the_list_writer(corpus, tmp_path) -> None:
    """2 worker processes, in-process tokenization and the in-memory writer give byte-identical shards;
    the documents come out in corpus order (jsonl lines by text_field, then the text files)."""
    cfg, tok, docs = corpus
    assert list(iter_documents(cfg)) == docs == corpus_documents(cfg)
    ref = write_shards(docs, tok, tmp_path / "ref", shard_tokens=cfg.shard_tokens)
    built = {}
    for workers in (0, 2):
        c = DataConfig(**{**{f: getattr(cfg, f) for f in ("source", "paths", "text_field", "vocab_size",
                                                          "shard_tokens")},
                          "cache_dir": str(tmp_path / f"w{workers}"), "tokenize_workers": workers})
        built[workers] = build_shards(c, tok)
    assert built[0].folder.parent.name == "shards-v2" and len(built[0].index["shards"]) > 2
    assert _folder_bytes(built[0].folder) == _folder_bytes(built[2].folder)
    for s, info in enumerate(ref.index["shards"]):
        assert info["doc_offsets"] == built[2].index["shards"][s]["doc_offsets"]
        assert np.array_equal(ref._map(s), built[2]._map(s))
    for i in (0, 57, 119):
        assert built[2].document(i).tolist() == [tok.bos_id, *tok.encode(docs[i]), tok.eos_id]


def test_second_build_reuses_and_content_keys_the_cache(corpus, tmp_path, monkeypatch) -> None:
    cfg, tok, _ = corpus
    first = build_shards(cfg, tok)

    def no_build(*a, **k):
        raise AssertionError("the cached shards must be reused")

    monkeypatch.setattr(S, "_build", no_build)
    assert build_shards(cfg, tok).folder == first.folder
    assert stream_shards(cfg, tok, Path(cfg.cache_dir), bos=True, eos=True, wait=True) == first.folder
    monkeypatch.undo()
    # touching a file (new mtime, same bytes) keeps the key; changing its bytes makes a new one
    txt = sorted(Path(cfg.paths[0]).glob("*.txt"))[0]
    os.utime(txt, ns=(1, 1))
    assert build_shards(cfg, tok).folder == first.folder
    txt.write_text(txt.read_text() + " changed")
    try:
        assert build_shards(cfg, tok).folder != first.folder
    finally:
        txt.write_text(txt.read_text().removesuffix(" changed"))


class _Interrupt(Exception):
    pass


def test_interrupted_build_resumes_after_its_last_shard(corpus, tmp_path, caplog, monkeypatch) -> None:
    cfg, tok, docs = corpus
    monkeypatch.setattr(S, "_BATCH_DOCS", 4)  # small batches: shards complete before the interruption
    spec = S.tokenizer_spec(tok, bos=True, eos=True)
    straight = S.build_token_shards(lambda: iter(docs), spec, tmp_path / "straight", shard_tokens=3000, workers=0)

    def dying():
        for i, d in enumerate(docs):
            if i == 70:
                raise _Interrupt
            yield d

    folder = tmp_path / "k"
    with pytest.raises(_Interrupt):
        S.build_token_shards(dying, spec, folder, shard_tokens=3000, workers=0)
    partial = tmp_path / "k.partial"
    progress = json.loads((partial / "progress.json").read_text())
    assert not folder.exists() and not (tmp_path / "k.lock").exists()  # the lock is released
    assert 0 < progress["docs_done"] < 70 and len(progress["shards"]) >= 2
    seen = []

    def counting():
        for d in docs:
            seen.append(d)
            yield d

    with caplog.at_level(logging.INFO, logger="longreach.data.stream"):
        S.build_token_shards(counting, spec, folder, shard_tokens=3000, workers=0)
    assert f"after {progress['docs_done']} documents" in caplog.text
    assert _folder_bytes(folder) == _folder_bytes(straight) and not partial.exists()


def test_locks_stale_and_live(corpus, tmp_path, caplog) -> None:
    cfg, tok, docs = corpus
    spec = S.tokenizer_spec(tok, bos=True, eos=True)
    dead = mp.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    (tmp_path / "a.lock").write_text(f"{socket.gethostname()} {dead.pid}")
    with caplog.at_level(logging.WARNING, logger="longreach.data.stream"):
        S.build_token_shards(lambda: iter(docs[:5]), spec, tmp_path / "a", shard_tokens=3000, workers=0)
    assert "stale lock" in caplog.text and TokenShards(tmp_path / "a").num_documents == 5
    (tmp_path / "b.lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # a live builder
    with pytest.raises(UserError, match=r"waiting for another process to tokenize .*/b\.lock; remove the lock"):
        S.build_token_shards(lambda: iter(docs[:5]), spec, tmp_path / "b", shard_tokens=3000, workers=0, timeout=0.5)


def test_token_stream_reads_across_shards(corpus) -> None:
    cfg, tok, _ = corpus
    shards = build_shards(cfg, tok)
    flat = np.concatenate([np.asarray(shards._map(s), dtype=np.int64) for s in range(len(shards.index["shards"]))])
    ts = S.TokenStream(shards)
    assert len(ts) == flat.size == shards.num_tokens
    bound = int(ts.starts[1])
    for a, b in [(0, 10), (bound - 5, bound + 7), (0, len(ts)), (len(ts) - 3, len(ts)), (7, 7)]:
        assert np.array_equal(ts[a:b], flat[a:b]), (a, b)


def test_file_format_errors(tmp_path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"other": "b"}\n')
    for path, match in [("x.parquet", r"x.parquet: reading .parquet files needs pyarrow|x.parquet: not a readable"),
                        ("ds", r"ds: reading a saved HuggingFace dataset needs datasets, which is not installed|ds: not a dataset"),
                        ("bad.jsonl", r"bad.jsonl:2: .* string 'text' field \(data.text_field\)")]:
        cfg = DataConfig(source="files", paths=[str(tmp_path / path)], cache_dir=str(tmp_path / "c"))
        with pytest.raises(UserError, match=match):
            list(iter_documents(cfg))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("   \n")
    cfg = DataConfig(source="files", paths=[str(tmp_path / "empty")], cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match="the corpus is empty"):
        load_or_train_tokenizer(cfg)
    with pytest.raises(ValueError, match="data.tokenize_workers"):
        DataConfig(tokenize_workers=-1)


def test_waiting_ranks_never_build(corpus, tmp_path) -> None:
    """A non-zero local rank only waits for the index (here: times out, naming the lock); it builds nothing."""
    cfg, tok, docs = corpus
    spec = S.tokenizer_spec(tok, bos=True, eos=True)
    with pytest.raises(UserError, match="timed out after .* waiting for another process"):
        S.build_token_shards(lambda: iter(docs), spec, tmp_path / "w", shard_tokens=3000, workers=0, wait=True,
                             timeout=0.3)
    assert list(tmp_path.iterdir()) == []
