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
from workers.hf import tiny_llama_config  # noqa: E402


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
    from workers.hf import eval_cp

    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 300, 37)]
    res = run_ranks(eval_cp, 2, args=(str(tiny / "ckpt"), str(tiny / "tokens.npy"), 64, prompt, 3))
    model, _ = load_hf(tiny / "ckpt", dtype=torch.float64, with_tokenizer=False)
    patch_attention(model, AttentionPatch(backend="cpu"))
    ref = perplexity(model, np.load(tiny / "tokens.npy"), length=64, stride=32)
    for r in res:
        assert r["windows"] == ref.windows and math.isclose(r["ppl"], ref.ppl, rel_tol=1e-9)
        assert r["decoded"] == greedy_decode(model, prompt, 3)


# ------------------------------------------------------------------------------ longreach's own models
TNL = dict(arch="transnormer", vocab_size=53, dim=32, n_layers=2, n_heads=2, ffn_hidden=48, max_seq_len=64,
           extra={"linear_chunk_size": 8})
SMALL_LLAMA = dict(vocab_size=53, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64)


def _native(kind: dict, dtype=torch.float64):
    from longreach.models import ModelConfig, build_model

    torch.manual_seed(3)
    return build_model(ModelConfig(**kind)).to(dtype).eval()


def test_recurrent_decoding_equals_full_forward():
    """TransNormerLLM: recurrent decoding (chunked prefill + one-token state updates) gives the full
    forward's logits at every step, hence the same greedy tokens, on an odd prompt length."""
    from longreach.evaluation.native import NativeLM, supports_recurrent

    lm = NativeLM(_native(TNL))
    assert supports_recurrent(lm.model)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 53, 19)]
    rec, rec_logits = lm.generate(prompt, 6, decode="recurrent", return_logits=True)
    full, full_logits = lm.generate(prompt, 6, decode="full", return_logits=True)
    assert rec == full
    for a, b in zip(rec_logits, full_logits):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    seams = [layer.token_mixer.linear_attention for layer in lm.model.layers]
    assert all(type(s).__name__ == "LightningSeam" for s in seams)  # the model's own seam is restored
    with pytest.raises(UserError, match="recurrent"):
        NativeLM(_native(SMALL_LLAMA)).generate(prompt, 2, decode="recurrent")


def native_cp_worker(rank: int, world: int, kind: dict, tokens: list[int], prompt: list[int]) -> dict:
    """Worker: perplexity and greedy tokens of a native model under cp=2 (zigzag; ring or LASP-2)."""
    from longreach.evaluation.native import NativeLM, native_perplexity

    lm = NativeLM.build(_native(kind), world=world, strategy="ring", layout="zigzag")
    res = native_perplexity(lm, np.asarray(tokens), length=32, stride=16)
    return {"ppl": res.ppl, "windows": res.windows, "decoded": lm.generate(prompt, 3)}


@pytest.mark.parametrize("kind", [SMALL_LLAMA, TNL], ids=["llama-ring", "tnl-lasp2"])
def test_native_eval_under_context_parallelism_equals_one_rank(kind):
    from longreach.evaluation.native import NativeLM, native_perplexity
    from longreach.testing import run_ranks

    tokens = [int(t) for t in np.random.default_rng(1).integers(0, 53, 80)]
    prompt = tokens[:13]  # odd length: padded to the layout's multiple
    res = run_ranks(native_cp_worker, 2, args=(kind, tokens, prompt))
    lm = NativeLM(_native(kind))
    ref = native_perplexity(lm, np.asarray(tokens), length=32, stride=16)
    for r in res:
        assert r["windows"] == ref.windows == 4 and math.isclose(r["ppl"], ref.ppl, rel_tol=1e-9), (r, ref)
        assert r["decoded"] == lm.generate(prompt, 3)
    # the perplexity itself: exp of the mean next-token cross entropy of each window (float64 reference)
    model = lm.model
    losses = []
    for s in (0, 16, 32, 48):
        ids = torch.tensor([tokens[s:s + 32]])
        with torch.no_grad():
            logits = model(ids) @ model.output_weight().t()  # [1, 32, V]
        losses.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])))
    assert math.isclose(ref.ppl, math.exp(np.mean(losses)), rel_tol=1e-9)


def test_eval_of_an_export_and_lengths_beyond_positions(tmp_path, capsys):
    """``longreach eval`` on an export (model.safetensors + config.yaml): lengths beyond the model's
    positions are refused without ``--beyond-positions``."""
    from safetensors.torch import save_file

    from longreach.configio import to_dict
    from longreach.evaluation.cli import main
    from longreach.models import ModelConfig

    model = _native(SMALL_LLAMA, torch.float32)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(ModelConfig(**SMALL_LLAMA))}))
    np.save(tmp_path / "t.npy", np.random.default_rng(2).integers(0, 53, 200))
    args = [str(tmp_path), "--tokens", str(tmp_path / "t.npy"), "--ppl-lengths", "32,96", "--stride", "64"]
    assert main(args) == 2
    assert "--beyond-positions" in capsys.readouterr().err
    assert main([*args, "--beyond-positions", "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"loaded export {tmp_path}")
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert [p["length"] for p in res["perplexity"]] == [32, 96] and res["loaded"].startswith("export")
