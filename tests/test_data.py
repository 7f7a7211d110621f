"""Tokenizer, harvest, synthetic tasks, token shards, packing, loader resume, batch sharding."""
from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from longreach.data import (DataConfig, TokenBatches, TokenShards, build_shards, build_train_data, build_val_data,
                            load_or_train_tokenizer, shard_batch, train_tokenizer, write_shards)
from longreach.data import tokenizer as tokmod
from longreach.data.corpus import corpus_documents
from longreach.data.harvest import clean_docstring, harvest_docstrings
from longreach.data.synthetic import (FILLER, make_passkey, make_recall, passkey_prompt, synthetic_documents)
from longreach.errors import UserError


def _cfg(cache: Path, **kw) -> DataConfig:
    base = dict(source="synthetic", cache_dir=str(cache), vocab_size=400, synthetic_documents=60,
                shard_tokens=4000, task_chars=800)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = _cfg(cache)
    tok = load_or_train_tokenizer(cfg)
    shards = build_shards(cfg, tok)
    return cfg, tok, shards


# ------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trip_and_ids(built) -> None:
    _, tok, _ = built
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert 300 <= tok.vocab_size <= 400
    for text in ["The pass key is 48213. Remember it.", "  two  spaces\nnew line\ttab ",
                 "unicode: übermäßig 中文 🙂 ∑", ""]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # digits are split one per piece, so pass keys are learnable token by token
    assert len(tok.encode("12345")) >= 5
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "hi"


def test_tokenizer_cache(tmp_run_dir: Path, monkeypatch) -> None:
    cfg = _cfg(tmp_run_dir / "c", synthetic_documents=20)
    tok = load_or_train_tokenizer(cfg)
    assert tok.path.parent == tmp_run_dir / "c" / "tokenizers"
    mtime = tok.path.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("the cached tokenizer must be reused")

    monkeypatch.setattr(tokmod, "train_tokenizer", no_training)
    again = load_or_train_tokenizer(cfg)
    assert again.path == tok.path and again.path.stat().st_mtime_ns == mtime
    monkeypatch.undo()
    # a different vocabulary or corpus is a different cache entry
    other = load_or_train_tokenizer(_cfg(tmp_run_dir / "c", synthetic_documents=20, vocab_size=350))
    assert other.path != tok.path
    other2 = load_or_train_tokenizer(_cfg(tmp_run_dir / "c", synthetic_documents=21))
    assert other2.path != tok.path
    # no cache_dir in the config: $LONGREACH_CACHE (set by the fixture) is used
    env_tok = load_or_train_tokenizer(_cfg(tmp_run_dir / "x", synthetic_documents=20, cache_dir=None))
    assert env_tok.path.is_relative_to(tmp_run_dir / "cache")
    # an explicit model file is used as is; a missing one is a clear error
    assert load_or_train_tokenizer(_cfg(tmp_run_dir, tokenizer=str(tok.path))).path == tok.path
    with pytest.raises(UserError, match="data.tokenizer: .*missing.model"):
        load_or_train_tokenizer(_cfg(tmp_run_dir, tokenizer=str(tmp_run_dir / "missing.model")))
    assert not [p for p in (tmp_run_dir / "c" / "tokenizers").iterdir() if not p.name.endswith(".model")]


def test_split_digits_option(tmp_run_dir: Path) -> None:
    # numbers that repeat a lot: BPE merges them into multi-digit pieces unless digits are split
    texts = [f"Year {y} and code 12345, then 2024 again and 987 items." for y in range(1900, 2100)] * 5
    split = train_tokenizer(texts, 320, tmp_run_dir / "split.model")
    merged = train_tokenizer(texts, 320, tmp_run_dir / "merged.model", split_digits=False)
    for tok in (split, merged):
        assert tok.decode(tok.encode("code 12345 in 2024")) == "code 12345 in 2024"
    pieces = lambda tok: [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    multi = lambda tok: [p for p in pieces(tok) if not p.startswith("<") and sum(c.isdigit() for c in p) > 1]
    assert multi(split) == [] and len(split.encode("12345")) >= 5
    assert multi(merged) and len(merged.encode("12345")) < 5
    # the option keys the tokenizer cache and reaches the trainer
    on = load_or_train_tokenizer(_cfg(tmp_run_dir / "d", synthetic_documents=20))
    off = load_or_train_tokenizer(_cfg(tmp_run_dir / "d", synthetic_documents=20, split_digits=False))
    assert on.path != off.path
    assert tokmod.tokenizer_key(_cfg(tmp_run_dir, split_digits=False)) != tokmod.tokenizer_key(_cfg(tmp_run_dir))
    assert not multi(on)


def test_other_local_ranks_wait(tmp_run_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = _cfg(tmp_run_dir / "w", synthetic_documents=20)
    monkeypatch.setattr(tokmod, "wait_for_file",
                        lambda path, *, what, **k: tokmod.__dict__["_wait_short"](path, what))
    monkeypatch.setattr(tokmod, "_wait_short", lambda path, what: (_ for _ in ()).throw(
        UserError(f"timed out waiting for local rank 0 to write {what} at {path}")), raising=False)
    with pytest.raises(UserError, match="local rank 0 .*tokenizer"):
        load_or_train_tokenizer(cfg)
    assert not (tmp_run_dir / "w" / "tokenizers").exists()  # rank 1 never trains
    with pytest.raises(UserError, match="timed out"):
        tokmod.wait_for_file(tmp_run_dir / "never", what="x", timeout=0.3, poll=0.05)


# ------------------------------------------------------------------------------------------- harvest
def test_harvest_parses_without_importing(tmp_path: Path) -> None:
    marker = tmp_path / "imported.flag"
    pkg = tmp_path / "lib"
    (pkg / "tests").mkdir(parents=True)
    (pkg / "side.py").write_text(
        f'"""Rivers carry water from the mountains down to the sea, shaping valleys."""\n'
        f"open({str(marker)!r}, 'w').write('x')\nraise SystemExit('imported!')\n"
        "class Boat:\n    '''A boat floats on the water and carries people across the river.\n\n"
        "    >>> Boat()\n    <Boat>\n\n    See :func:`sail` for the details of sailing.'''\n")
    (pkg / "broken.py").write_text('"""A broken module that cannot be parsed at all by ast."""\ndef (:\n')
    (pkg / "tests" / "test_x.py").write_text('"""Tests are skipped entirely by the harvester here."""\n')
    docs = harvest_docstrings.__wrapped__(100_000, str(pkg))
    assert not marker.exists()
    assert len(docs) == 1
    doc = docs[0]
    assert "Rivers carry water" in doc and "A boat floats" in doc and "See sail for the details" in doc
    assert ">>>" not in doc and "<Boat>" not in doc and "Tests are skipped" not in doc


def test_harvest_stdlib_is_english_deterministic_and_capped() -> None:
    harvest_docstrings.__wrapped__(10_000)  # warm-up: sysconfig loads its data module once
    before = set(sys.modules)
    docs = harvest_docstrings.__wrapped__(30_000)
    assert set(sys.modules) == before  # nothing of the standard library was imported
    text = "\n".join(docs)
    assert 10_000 < len(text) <= 30_000
    words = re.findall(r"[a-z]+", text.lower())
    common = Counter(words)
    assert common["the"] > 50 and common["of"] > 10
    assert docs == harvest_docstrings.__wrapped__(30_000)


def test_clean_docstring() -> None:
    doc = "Return the :class:`~pathlib.Path` of ``x``.\n\n>>> f(1)\n2\n\n.. note:: ignore\n\n=====\nShort"
    assert clean_docstring(doc) == "Return the pathlib.Path of x."


# ----------------------------------------------------------------------------------------- synthetic
def test_passkey_structure() -> None:
    s = passkey_prompt(10, 0.3, 4321)
    needle = "The pass key is 4321. Remember it. 4321 is the pass key."
    assert s.text.count(needle) == 1 and s.text.count(FILLER) == 10
    assert s.prompt.endswith("What is the pass key? The pass key is") and s.answer == "4321"
    assert s.text == s.prompt + " 4321."
    before = s.text.split(needle)[0]
    assert before.count(FILLER) == 3  # depth 0.3 of 10 repeats
    rng1, rng2 = np.random.default_rng(7), np.random.default_rng(7)
    a, b = make_passkey(rng1, 2000), make_passkey(rng2, 2000)
    assert a == b and 1 <= int(a.answer) <= 50000 and 0.0 <= a.depth <= 1.0
    keys = {make_passkey(rng1, 2000).answer for _ in range(20)}
    assert len(keys) > 10


def test_recall_structure() -> None:
    r = make_recall(np.random.default_rng(3), 1500)
    facts, questions = r.text.split("Now answer the questions.")
    values = dict(r.pairs)
    assert len(values) == len(r.pairs) >= 2  # distinct keys
    for k, v in r.pairs:
        assert f"The {k} is {v}." in facts
    asked = re.findall(r"What is the ([a-z]+ [a-z]+)\? The \1 is (\d+)\.", questions)
    assert [q for q, _ in asked] == list(r.queries)
    assert all(values[q] == int(v) for q, v in asked)


def test_synthetic_documents_mix_and_seed() -> None:
    docs = synthetic_documents(50, seed=1, passkey_fraction=0.2, recall_fraction=0.4, max_chars=600)
    assert sum("pass key" in d for d in docs) == 10
    assert sum(d.startswith("Remember the following facts.") for d in docs) == 20
    assert docs == synthetic_documents(50, seed=1, passkey_fraction=0.2, recall_fraction=0.4, max_chars=600)
    assert docs != synthetic_documents(50, seed=2, passkey_fraction=0.2, recall_fraction=0.4, max_chars=600)


# ---------------------------------------------------------------------------------------------- shards
def test_shards_index_memmap_and_content(built) -> None:
    cfg, tok, shards = built
    index = json.loads((shards.folder / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["num_documents"] == shards.num_documents == 60
    docs = corpus_documents(cfg)
    total = 0
    for s, info in enumerate(index["shards"]):
        f = shards.folder / info["file"]
        assert f.stat().st_size == 2 * info["tokens"]
        assert info["doc_offsets"][0] == 0 and info["doc_offsets"][-1] == info["tokens"]
        n_docs = len(info["doc_offsets"]) - 1
        assert info["tokens"] <= cfg.shard_tokens or n_docs == 1
        total += info["tokens"]
    assert len(index["shards"]) > 1 and total == shards.num_tokens == index["num_tokens"]
    for i, text in enumerate(docs):
        d = shards.document(i)
        assert isinstance(d, np.memmap)
        assert d.tolist() == [tok.bos_id, *tok.encode(text), tok.eos_id]


def test_shards_atomic_and_never_overwritten(built, tmp_path: Path) -> None:
    cfg, tok, shards = built
    # a complete folder is reused as is
    mtime = (shards.folder / "index.json").stat().st_mtime_ns
    again = build_shards(cfg, tok)
    assert again.folder == shards.folder and (shards.folder / "index.json").stat().st_mtime_ns == mtime
    # an incomplete folder is never overwritten
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "shard_00000.bin").write_bytes(b"keep")
    with pytest.raises(UserError, match="not a complete shard folder"):
        write_shards(["some text here"], tok, partial, shard_tokens=100)
    assert (partial / "shard_00000.bin").read_bytes() == b"keep"

    # a failure mid-way leaves neither the folder nor a temporary one
    class Failing:
        vocab_size, bos_id, eos_id = tok.vocab_size, tok.bos_id, tok.eos_id
        calls = 0

        def encode_batch(self, texts):
            Failing.calls += 1
            if Failing.calls > 1:
                raise RuntimeError("disk on fire")
            return tok.encode_batch(texts)

    target = tmp_path / "fail" / "shards"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shards(["a b c"] * 600, Failing(), target, shard_tokens=100)
    assert list((tmp_path / "fail").iterdir()) == []
    with pytest.raises(UserError, match="0 tokens"):
        write_shards(["", ""], tok, tmp_path / "empty", shard_tokens=100)
    assert not (tmp_path / "empty").exists()


# --------------------------------------------------------------------------------------------- packing
def _stream(shards: TokenShards, order) -> np.ndarray:
    return np.concatenate([np.asarray(shards.document(int(i))) for i in order])


def _check_sample(input_ids: torch.Tensor, pos: torch.Tensor, cu: torch.Tensor, bos: int) -> None:
    s = input_ids.shape[0]
    assert cu[0] == 0 and cu[-1] == s and bool((cu[1:] > cu[:-1]).all())
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert pos[a:b].tolist() == list(range(b - a))
    # every document start inside the sample is a boundary, and every boundary after 0 is a document start
    starts = set((input_ids == bos).nonzero().flatten().tolist()) | {0}
    assert starts == set(cu[:-1].tolist())


def test_packing_exact_stream(built) -> None:
    _, tok, shards = built
    order = np.arange(shards.num_documents)[::-1].copy()
    seq = 100
    loader = TokenBatches(shards, order, seq_len=seq, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0,
                          shuffle=False, epochs=1)
    batches = list(loader)
    stream = _stream(shards, order)
    n = (stream.shape[0] - 1) // seq
    assert len(batches) == n == len(loader)
    inputs = torch.cat([b["input_ids"][0] for b in batches]).numpy()
    labels = torch.cat([b["labels"][0] for b in batches]).numpy()
    assert np.array_equal(inputs, stream[:n * seq])  # every token an input once, in order
    assert np.array_equal(labels, stream[1:n * seq + 1])  # labels: the next token of the global stream
    for b in batches:
        assert b["input_ids"].dtype == b["labels"].dtype == b["position_ids"].dtype == torch.long
        _check_sample(b["input_ids"][0], b["position_ids"][0], b["cu_seqlens"], tok.bos_id)


def test_packing_shuffled_no_token_lost_or_duplicated(built) -> None:
    _, tok, shards = built
    seq = 64
    loader = build_train_data(built[0], tok, seq_len=seq, micro_batch_size=2, dp_rank=0, dp_size=1, seed=11)
    per_epoch = len(loader)
    chunks = []
    for _ in range(per_epoch):
        b = next(loader)
        assert b["input_ids"].shape == (2, seq) and isinstance(b["cu_seqlens"], list)
        for r in range(2):
            _check_sample(b["input_ids"][r], b["position_ids"][r], b["cu_seqlens"][r], tok.bos_id)
            assert torch.equal(b["labels"][r][:-1], b["input_ids"][r][1:])
            chunks.append((b["input_ids"][r], b["labels"][r]))
    for (x0, y0), (x1, _) in zip(chunks, chunks[1:]):
        assert y0[-1] == x1[0]  # the last label is the real next token
    flat = torch.cat([x for x, _ in chunks]).tolist()
    # split the epoch's stream at bos: every complete piece is one training document, none twice
    docs = {tuple(shards.document(i).tolist()): i for i in loader.documents.tolist()}
    pieces = []
    cur: list[int] = []
    for t in flat:
        if t == tok.bos_id and cur:
            pieces.append(tuple(cur))
            cur = []
        cur.append(t)
    pieces.append(tuple(cur))
    assert flat[0] == tok.bos_id  # an epoch starts at a document start
    seen = [docs[p] for p in pieces[:-1]]  # every piece but the cut last one is a whole document
    assert len(seen) == len(set(seen))  # none twice
    assert any(d[:len(pieces[-1])] == pieces[-1] for d in docs)
    assert len(seen) >= len(docs) - 3  # only the tail that does not fill a batch is dropped


def test_loader_determinism_resume_and_dp_slices(built) -> None:
    cfg, tok, _ = built

    def make(**kw):
        args = dict(seq_len=48, micro_batch_size=1, dp_rank=0, dp_size=1, seed=3)
        args.update(kw)
        return build_train_data(cfg, tok, **args)

    a, b = make(), make()
    steps = len(a) + 5  # crosses an epoch boundary
    ref = [next(a)["input_ids"] for _ in range(steps)]
    assert all(torch.equal(x, next(b)["input_ids"]) for x in ref)
    c = make(seed=4)
    assert not all(torch.equal(x, next(c)["input_ids"]) for x in ref[:5])
    # resume mid-epoch and across the epoch boundary
    for stop in (3, len(ref) - 7, len(ref) - 2):
        first = make()
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint's serialisation
        resumed = make()
        resumed.load_state_dict(state)
        for i in range(stop, steps):
            assert torch.equal(next(resumed)["input_ids"], ref[i]), (stop, i)
    # dp ranks read disjoint slices: dp=2 × B=1 step k gives samples 2k and 2k+1 of the dp=1 order
    r0, r1 = make(dp_size=2, dp_rank=0), make(dp_size=2, dp_rank=1)
    for k in range(4):
        assert torch.equal(next(r0)["input_ids"], ref[2 * k]) and torch.equal(next(r1)["input_ids"], ref[2 * k + 1])
    # state of a dp=2 run resumes a dp=1 run at the same sample
    single = make()
    single.load_state_dict(r0.state_dict())
    assert torch.equal(next(single)["input_ids"], ref[8])
    with pytest.raises(UserError, match="seq_len"):
        make(seq_len=32).load_state_dict(state)


def test_validation_split(built) -> None:
    cfg, tok, shards = built
    train = build_train_data(cfg, tok, seq_len=32, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)
    val = build_val_data(cfg, tok, seq_len=32, micro_batch_size=1, dp_rank=0, dp_size=1)
    assert set(train.documents.tolist()).isdisjoint(val.documents.tolist())
    assert len(train.documents) + len(val.documents) == shards.num_documents and len(val.documents) >= 1
    assert len(list(val)) == len(val)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        corpus_documents(DataConfig(source="files", paths=[str(tmp_path / "missing.txt")]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": broken\n')
    with pytest.raises(UserError, match=rf"{re.escape(str(bad))}:3: not valid JSON"):
        corpus_documents(DataConfig(source="files", paths=[str(bad)]))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match="nofield.jsonl:1: .*'text'"):
        corpus_documents(DataConfig(source="files", paths=[str(nofield)]))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n")
    with pytest.raises(UserError, match=r"empty \(0 tokens\)"):
        corpus_documents(DataConfig(source="files", paths=[str(empty)]))
    with pytest.raises(ValueError, match="data.paths is empty"):
        DataConfig(source="files")
    with pytest.raises(ValueError, match="data.source"):
        DataConfig(source="web")


def test_files_source_and_too_small_corpus(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First document about rivers.")
    (folder / "sub" / "b.jsonl").write_text('{"text": "Second doc."}\n{"text": "Third doc."}\n')
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    cfg = DataConfig(source="files", paths=[str(folder)], cache_dir=str(tmp_path / "cache"), vocab_size=400,
                     val_fraction=0.0)
    assert corpus_documents(cfg) == ["First document about rivers.", "Second doc.", "Third doc."]
    tok = train_tokenizer(corpus_documents(_cfg(tmp_path, synthetic_documents=20)), 400, tmp_path / "t.model")
    with pytest.raises(UserError, match="too few for one step"):
        build_train_data(cfg, tok, seq_len=4096, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)


def test_shard_batch_single_process(built) -> None:
    cfg, tok, _ = built
    batch = next(build_train_data(cfg, tok, seq_len=32, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0))
    out = shard_batch(batch, "zigzag")
    assert torch.equal(out["input_ids"], batch["input_ids"]) and torch.equal(out["positions"], torch.arange(32))
    assert out["cu_seqlens"] is batch["cu_seqlens"]


def test_two_ranks_build_concurrently_and_shard(tmp_path: Path) -> None:
    from longreach.testing import run_ranks
    from workers.data import LAYOUTS, build_and_shard

    seq = 96  # divides by 2 (contiguous, stripe) and 4 (zigzag)
    res = run_ranks(build_and_shard, 2, args=(str(tmp_path / "cache"), seq), timeout=240)
    assert res[0]["tokenizer"] == res[1]["tokenizer"] and res[0]["fingerprint"] == res[1]["fingerprint"]
    assert res[0]["shards"] == res[1]["shards"]
    assert [p.name for p in (tmp_path / "cache" / "tokenizers").iterdir()] == [Path(res[0]["tokenizer"]).name]
    assert [p.suffix for p in (tmp_path / "cache" / "shards-v2").iterdir()] == [""]  # no .partial, no .lock left
    batch = res[0]["batch"]
    for key in ("input_ids", "labels", "position_ids"):
        assert np.array_equal(batch[key], res[1]["batch"][key])
    for layout in LAYOUTS:
        for key in ("input_ids", "labels", "position_ids"):
            full = np.full_like(batch[key], -7)
            for r in range(2):
                part = res[r]["sharded"][layout]
                assert part[key].shape == (1, seq // 2)
                full[:, part["positions"]] = part[key]
            assert np.array_equal(full, batch[key]), (layout, key)
        assert np.array_equal(res[1]["sharded"][layout]["cu_seqlens"], batch["cu_seqlens"])
