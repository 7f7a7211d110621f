"""Evaluation: LongLoRA-protocol perplexity, passkey retrieval, tables and heat-map, CP equals one rank."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from longreach.errors import UserError  # noqa: E402
from longreach.evaluation.passkey import (PasskeyRecord, accuracy_table, build_prompt, heatmap,  # noqa: E402
                                          markdown_table)
from longreach.evaluation.perplexity import perplexity, window_starts  # noqa: E402
from longreach.workers.hf import tiny_llama_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny Llama with longreach-trained sentencepiece tokenizer files (vocab 300)."""
    from transformers import LlamaForCausalLM

    from longreach.data.synthetic import FILLER
    from longreach.data.tokenizer import train_tokenizer
    from longreach.hf.convert import save_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    texts = [FILLER, "The pass key is 12345. Remember it. 12345 is the pass key.",
             "What is the pass key? The pass key is 987 0 1 2 3 4 5 6 7 8 9."] * 30
    train_tokenizer(texts, 300, root / "sp.model")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=300, max_position_embeddings=64)).save_pretrained(root / "ckpt")
    save_tokenizer(root / "sp.model", root / "ckpt")
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 300, 200))
    return root


def test_window_starts():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(1000, 256, 256, max_windows=2) == [0, 256]
    with pytest.raises(UserError, match="fewer than one window"):
        window_starts(10, 16, 4)


def test_perplexity_matches_transformers_loss(tiny):
    """exp(mean over windows of HF's own mean shifted loss) — an independent reference."""
    from longreach.hf.load import load_hf
    from longreach.hf.patch import AttentionPatch, patch_attention

    model, _ = load_hf(tiny / "ckpt", dtype=torch.float64, with_tokenizer=False)
    toks = torch.as_tensor(np.load(tiny / "tokens.npy"))
    with torch.no_grad():
        ref = [float(model(toks[s:s + 64][None], labels=toks[s:s + 64][None]).loss) for s in (0, 32, 64, 96, 128)]
    patch_attention(model, AttentionPatch(backend="cpu"))
    res = perplexity(model, toks.numpy(), length=64, stride=32, chunk_size=5)
    assert res.windows == 5
    assert math.isclose(res.ppl, math.exp(np.mean(ref)), rel_tol=1e-6)  # HF's loss is float32


def test_passkey_prompt_and_decode(tiny):
    from longreach.evaluation.common import TextCodec, greedy_decode
    from longreach.evaluation.passkey import passkey_retrieval
    from longreach.hf.load import load_hf
    from longreach.hf.patch import AttentionPatch, patch_attention

    model, tok = load_hf(tiny / "ckpt", dtype=torch.float64)
    codec = TextCodec(tok)
    for length in (256, 400):
        prompt, ans, answer = build_prompt(codec, length, 0.5, 31337)
        assert length // 2 < len(prompt) + len(ans) <= length
        assert codec.decode(ans).strip().rstrip(".") == answer
        assert "31337" in codec.decode(prompt)
    patch_attention(model, AttentionPatch(backend="cpu"))
    prompt = codec.encode("The grass is green. The pass key is")
    seq = list(prompt)
    with torch.no_grad():  # independent greedy loop: full recomputation, argmax of the last logits
        for _ in range(4):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert greedy_decode(model, prompt, 4) == seq[len(prompt):]
    recs = passkey_retrieval(model, tok, lengths=[256], depths=[0.0, 1.0], seeds=2)
    assert len(recs) == 4 and all(r.prompt_tokens <= 256 for r in recs)
    assert len({r.key for r in recs}) == 4  # keys differ across seeds and depths


def test_accuracy_table_markdown_heatmap(tmp_path):
    recs = [PasskeyRecord(length=n, depth=d, seed=s, key=1, prompt_tokens=n, answer="1", generated="1" if ok else "2",
                          correct=ok)
            for n, d, s, ok in [(64, 0.0, 0, True), (64, 0.0, 1, False), (64, 1.0, 0, True), (128, 0.0, 0, False),
                                (128, 1.0, 0, False)]]
    table = accuracy_table(recs)
    assert table["lengths"] == [64, 128] and table["depths"] == [0.0, 1.0]
    assert table["accuracy"] == [[0.5, 1.0], [0.0, 0.0]] and table["overall"] == 0.4
    md = markdown_table(table)
    assert "| 64 | 0.50 | 1.00 | 0.75 |" in md
    png = heatmap(table, tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_cli(tiny, tmp_path, capsys):
    from longreach.evaluation.cli import main

    out = tmp_path / "eval"
    rc = main([str(tiny / "ckpt"), "--tokens", str(tiny / "tokens.npy"), "--ppl-lengths", "64,128",
               "--stride", "64", "--passkey-lengths", "256,320", "--depths", "0,1", "--seeds", "1",
               "--rope-from-length", "linear", "--backend", "cpu", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [p["length"] for p in res["perplexity"]] == [64, 128] and res["perplexity"][1]["windows"] == 2
    assert res["passkey"]["lengths"] == [256, 320]
    assert (out / "passkey.png").is_file() and (out / "passkey.md").is_file()
    assert main([str(tiny / "ckpt"), "--ppl-lengths", "64"]) == 2
    assert "needs --tokens" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_under_context_parallelism_equals_one_rank(tiny):
    """Perplexity and greedy decoding on 2 ranks (ring, zigzag, odd prompt padded) equal one rank."""
    from longreach.evaluation.common import greedy_decode
    from longreach.hf.load import load_hf
    from longreach.hf.patch import AttentionPatch, patch_attention
    from longreach.testing import run_ranks
    from longreach.workers.hf import eval_cp

    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 300, 37)]
    res = run_ranks(eval_cp, 2, args=(str(tiny / "ckpt"), str(tiny / "tokens.npy"), 64, prompt, 3))
    model, _ = load_hf(tiny / "ckpt", dtype=torch.float64, with_tokenizer=False)
    patch_attention(model, AttentionPatch(backend="cpu"))
    ref = perplexity(model, np.load(tiny / "tokens.npy"), length=64, stride=32)
    for r in res:
        assert r["windows"] == ref.windows and math.isclose(r["ppl"], ref.ppl, rel_tol=1e-9)
        assert r["decoded"] == greedy_decode(model, prompt, 3)
