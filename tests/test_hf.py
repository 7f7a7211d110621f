"""HF integration: RoPE config round trip, attention patch, conversion, recipes, CP fine-tune + export."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from longreach.errors import ConfigError, UserError  # noqa: E402
from longreach.hf.patch import AttentionPatch, patch_attention, unpatch_attention  # noqa: E402
from longreach.hf.rope import RopeScaling, apply_rope_scaling, interpolation_factor, read_rope  # noqa: E402
from workers.hf import tiny_llama_config  # noqa: E402


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3", "static_ntk"])
def test_rope_config_round_trip(tmp_path, kind):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    cfg = tiny_llama_config()
    params = apply_rope_scaling(cfg, RopeScaling(type=kind), target_len=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    back = AutoConfig.from_pretrained(tmp_path)
    got = read_rope(back)
    assert got["rope_type"] == ("default" if kind == "static_ntk" else kind)
    if kind == "static_ntk":
        d = 8
        assert math.isclose(got["rope_theta"], 10000.0 * 4.0 ** (d / (d - 2)), rel_tol=1e-9)
    else:
        assert got["factor"] == 4.0 and got["rope_theta"] == 10000.0
    if kind in ("yarn", "llama3"):
        assert got["original_max_position_embeddings"] == 16
    assert back.max_position_embeddings == (16 if kind == "dynamic" else 64)
    # the reloaded model's frequencies are the scaled ones (linear: θ/s)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    inv = model.model.rotary_emb.inv_freq
    base = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    if kind == "linear":
        torch.testing.assert_close(inv, base / 4)
    assert params["rope_type"] == got["rope_type"]


def test_rope_errors():
    assert interpolation_factor(32768, 4096) == 8.0 and interpolation_factor(100, 16) == 7.0
    with pytest.raises(ConfigError, match="rope.type"):
        RopeScaling(type="ntk-by-parts")
    cfg = tiny_llama_config()
    apply_rope_scaling(cfg, RopeScaling(type="linear"), target_len=64)
    with pytest.raises(ConfigError, match="already scaled"):
        apply_rope_scaling(cfg, RopeScaling(type="yarn"), target_len=128)


@pytest.mark.parametrize("params", [
    dict(factor=8.0, original=4096, theta=10000.0, head_dim=128),
    dict(factor=4.0, original=2048, theta=500000.0, head_dim=64, beta_fast=16.0, beta_slow=2.0),
    dict(factor=16.0, original=8192, theta=1e6, head_dim=96, truncate=False),
    dict(factor=2.0, original=16, theta=10000.0, head_dim=8, attention_factor=1.3),
    dict(factor=32.0, original=4096, theta=10000.0, head_dim=128, mscale=0.707, mscale_all_dim=1.0),
])
def test_yarn_frequencies_equal_transformers(params):
    """Our YaRN frequencies and cos/sin factor equal transformers' own YaRN init function."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from longreach.models.rope import rope_frequencies

    p = dict(params)
    factor, original, theta, head_dim = p.pop("factor"), p.pop("original"), p.pop("theta"), p.pop("head_dim")
    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original, **p}
    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                      max_position_embeddings=int(original * factor), rope_parameters={"rope_theta": theta, **scaling})
    want, want_att = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    got, att = rope_frequencies(head_dim, theta, scaling, max_seq_len=original)
    torch.testing.assert_close(got.float(), want, rtol=2e-6, atol=0)  # transformers computes in float32
    assert att == pytest.approx(want_att, rel=1e-12)
    base = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    assert torch.equal(got[:1], base[:1]) and torch.allclose(got[-1:], base[-1:] / factor)  # both ends of the ramp


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3", "static_ntk"])
def test_rope_target_not_longer_is_an_error(kind):
    cfg = tiny_llama_config()  # context 16
    for target in (8, 16):
        with pytest.raises(ConfigError, match=rf"recipe.target_len={target} is not longer than the original "
                                              r"context 16 \(the checkpoint's max_position_embeddings\)"):
            apply_rope_scaling(cfg, RopeScaling(type=kind), target_len=target)
    with pytest.raises(ConfigError, match="rope.original_max_position_embeddings"):
        apply_rope_scaling(cfg, RopeScaling(type=kind, original_max_position_embeddings=32), target_len=24)
    assert read_rope(cfg)["rope_type"] == "default" and cfg.max_position_embeddings == 16  # nothing written
    assert apply_rope_scaling(cfg, RopeScaling(type="none"), target_len=8)["rope_type"] == "default"


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_patched_full_equals_unpatched(family):
    """Forward and every gradient of the patched model equal transformers' own sdpa attention."""
    from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(tiny_llama_config()).double()
    else:  # sliding window 8 < sequence 24: honoured through the module's sliding_window
        model = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=64, sliding_window=8)).double()
    ids = torch.randint(0, 97, (2, 24))
    model.set_attn_implementation("sdpa")
    ref = model(ids).logits
    ref.square().mean().backward()
    ref_g = _grads(model)
    model.zero_grad(set_to_none=True)
    patch_attention(model, AttentionPatch(backend="reference"))
    out = model(ids).logits
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, ref_g[n], atol=1e-10, rtol=1e-8, msg=n)
    # generation with a KV cache (Sq < Sk) goes through the same function
    unpatch_attention(model)
    a = model.generate(ids[:1, :6], attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=5, do_sample=False)
    patch_attention(model, AttentionPatch(backend="reference"))
    b = model.generate(ids[:1, :6], attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def _s2_mask_4d(n: int, heads: int, g: int, sinks: int | None) -> torch.Tensor:
    """Independent S2 (varlen) / SF mask (LongLoRA §3.2, SinkLoRA) as an additive [1, H, N, N] mask."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    causal = j <= i
    plain = causal & (i // g == j // g)
    shifted = causal & ((i + g // 2) // g == (j + g // 2) // g)
    allowed = torch.stack([plain if h < heads // 2 else shifted for h in range(heads)])  # [H, N, N]
    if sinks:
        allowed = allowed | (causal & (j < sinks))[None]
    add = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    return add[None]


@pytest.mark.parametrize("pattern", ["s2", "sf"])
def test_training_patterns_match_explicit_mask(pattern):
    """S2/SF in training mode equal eager attention with an explicit per-head mask; eval is full causal."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).double().train()
    ids = torch.randint(0, 97, (1, 32))
    model.set_attn_implementation("eager")
    ref = model(ids, attention_mask=_s2_mask_4d(32, 4, 8, 4 if pattern == "sf" else None)).logits
    causal_ref = model.eval()(ids).logits
    model.train()
    patch_attention(model, AttentionPatch(pattern=pattern, backend="reference"))
    out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out, causal_ref, atol=1e-4)
    torch.testing.assert_close(model.eval()(ids).logits, causal_ref, atol=1e-6, rtol=1e-6)


def test_patch_refuses_padding_and_bad_group():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config())
    patch_attention(model, AttentionPatch(pattern="s2", backend="reference"))
    ids = torch.randint(0, 97, (1, 12))
    with pytest.raises(UserError, match="padding"):
        model(ids, attention_mask=torch.tensor([[0] * 2 + [1] * 10]))
    with pytest.raises(ConfigError, match="group_fraction"):
        model.train()(torch.randint(0, 97, (1, 9)))
    with pytest.raises(ConfigError, match="attention.strategy"):
        AttentionPatch(strategy="rings")


def test_softcap_reference_path():
    """Tanh-capped logits (Gemma-2 style) on the local path equal a direct computation."""
    from longreach.hf.patch import softcap_attention
    from longreach.kernels import masks as M

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 6, 4, 8, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    placed = M.causal().place(torch.arange(6), torch.arange(6), seq_len=6, num_heads=4)
    out = softcap_attention(q, k, v, mask=placed, scale=0.3, softcap=2.0)
    kx, vx = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kx) * 0.3
    s = (torch.tanh(s / 2.0) * 2.0).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vx)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 2.0}, {"type": "ntk", "factor": 4.0},
                                     {"type": "llama3", "factor": 4.0}, {"type": "yarn", "factor": 4.0}])
def test_convert_both_ways(tmp_path, scaling):
    from transformers import AutoModelForCausalLM

    from longreach.hf.convert import from_hf, save_hf
    from longreach.models import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, rope_scaling=scaling)
    ours = build_model(cfg).double().eval()
    ids = torch.randint(0, 61, (2, 40))
    save_hf(ours, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    with torch.no_grad():
        ref = ours(ids) @ ours.output_weight().t()
        torch.testing.assert_close(hf(ids).logits, ref, atol=1e-6, rtol=1e-6)  # HF forms RoPE in float32
        back = from_hf(hf)
        torch.testing.assert_close(back(ids) @ back.output_weight().t(), ref, atol=1e-6, rtol=1e-6)


def test_tokenizer_export_ids_equal_sentencepiece(tmp_path):
    """A tokenizer trained by longreach's data pipeline exports to HF files with identical ids."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from longreach.data.tokenizer import train_tokenizer
    from longreach.hf.convert import save_tokenizer

    text = ["The grass is green. The sky is blue. The pass key is 4821. Remember it.",
            "def attention(q, k, v):\n    return softmax(q @ k.T) @ v  # long context, 2048 tokens"] * 20
    train_tokenizer(text, 300, tmp_path / "sp.model")
    save_tokenizer(tmp_path / "sp.model", tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    # (text starting with spaces is a known difference: HF adds no dummy prefix before a leading space)
    for s in ["The pass key is 31415.", "softmax(q @ k.T)  é ü 42", text[1], "\n\n  x", "a   b\n c"]:
        assert tok(s, add_special_tokens=False).input_ids == sp.encode(s), s
        assert tok.decode(sp.encode(s)) == sp.decode(sp.encode(s))
    assert (tmp_path / "hf" / "tokenizer.model").is_file()
    assert tok.eos_token_id == sp.eos_id() and tok.bos_token_id == sp.bos_id()


def test_recipe_trainable_parameters():
    from transformers import LlamaForCausalLM

    from longreach.hf.recipes import RecipeConfig, apply_recipe

    model, fn = apply_recipe(LlamaForCausalLM(tiny_llama_config()),
                             RecipeConfig(method="longlora", target_len=64))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n and "q_proj" in n for n in names)
    assert any("embed_tokens" in n for n in names) and any("norm" in n for n in names)
    assert not any("lm_head" in n for n in names)
    assert not any(("gate_proj" in n or "up_proj" in n) and "lora" not in n for n in names)
    assert fn.config.pattern == "s2" and model.config.rope_parameters["rope_type"] == "linear"
    assert RecipeConfig(method="sinklora", target_len=64).pattern == "sf"


def test_finetune_config_sections(tmp_path):
    """A finetune YAML loads into the trainer's sections; the recipe picks the pattern; bad input is refused."""
    from longreach.configio import load_config
    from longreach.hf.config import FinetuneConfig

    f = tmp_path / "ft.yaml"
    f.write_text("hf: {path: x}\nrecipe: {method: sinklora, target_len: 64}\ntrain: {steps: 3}\n")
    with pytest.raises(ConfigError, match="train.steps"):  # steps live in run:, as for a train job
        load_config(FinetuneConfig, f)
    f.write_text("hf: {path: x}\nrecipe: {method: sinklora, target_len: 64}\nrun: {steps: 3}\n"
                 "train: {grad_accum: 2}\nparallel: {cp: 2}\n")
    cfg = load_config(FinetuneConfig, f, ["--attention.sinks=2"])
    assert cfg.attention.pattern == "sf" and cfg.attention.sinks == 2 and cfg.train.seq_len == 64
    assert cfg.train.lr == 2e-5 and cfg.train.schedule == "constant" and cfg.train.weight_decay == 0.0
    assert cfg.run.steps == 3 and cfg.train.grad_accum == 2
    with pytest.raises(ConfigError, match="sinklora"):
        load_config(FinetuneConfig, f, ["--attention.pattern=s2"])
    with pytest.raises(ConfigError, match="recipe.target_len"):
        load_config(FinetuneConfig, f, ["--train.seq_len=32"])
    with pytest.raises(ConfigError, match="divide by 4"):
        load_config(FinetuneConfig, f, ["--recipe.target_len=66"])
    with pytest.raises(ConfigError, match="attention.window must be >= 1"):  # checked once auto is resolved
        load_config(FinetuneConfig, f, ["--attention.window=0"])
    with pytest.raises(ConfigError, match="engine.options.mixed_precision.? was removed; use train.precision"):
        load_config(FinetuneConfig, f, ["--engine.kind=deepspeed", "--engine.options={mixed_precision: bf16}"])


def test_load_hf_errors(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from longreach.hf.load import load_hf

    with pytest.raises(UserError, match="config.json"):
        load_hf(tmp_path / "missing")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="model_type 'gpt2'"):
        load_hf(tmp_path / "gpt2")


@pytest.mark.slow
def test_cp_equivalence_and_finetune_export(tmp_path):
    """2 gloo ranks, one group: (a) patched attention under ring/Ulysses CP equals one rank (loss, logits,
    gradients; full, S2, SF); the patched full model equals the unpatched one. (b) fine-tune a saved tiny
    Llama at 4x its context with S2 and SF under ring CP through the shared trainer, export, reload with
    transformers alone. (c) the S2 run interrupted at step 2 of 4 and resumed from its checkpoint gives
    bit-identical losses to the uninterrupted run."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    from longreach.testing import run_ranks
    from workers.hf import hf_matrix

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 97, 64 * 16))
    outs = {"s2": str(tmp_path / "s2"), "sf": str(tmp_path / "sf")}
    res = run_ranks(hf_matrix, 2, timeout=600, args=(
        dict(strategies=["ring", "ulysses"], layouts=["zigzag", "contiguous"], seq_len=32, backend="cpu"),
        dict(checkpoint=str(tmp_path / "base"), out_dirs=outs, tokens_path=str(tmp_path / "tokens.npy"),
             target_len=64, steps=4, backend="cpu", resume_dir=str(tmp_path / "resumed"))))
    assert res[0]["cp_failures"] == [] and res[1]["cp_failures"] == []
    # (c) resume: the second call started from the step-2 checkpoint and matches the uninterrupted run exactly
    resumed, straight = res[0]["finetune"]["resumed"], res[0]["finetune"]["s2"]["losses"]
    assert resumed["ended"] == [2, 4] and resumed["checkpoint"].endswith("step-00000004")
    assert len(straight) == 4 and resumed["losses"] == straight  # steps 1-2 before, 3-4 after the resume
    assert resumed["first_loss"] == straight[2]  # the second call's first step was step 3
    assert (tmp_path / "s2" / "checkpoints" / "step-00000002").is_dir()
    assert (tmp_path / "resumed" / "export" / "config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    for name, out in outs.items():
        got = res[0]["finetune"][name]
        assert got["losses"] == res[1]["finetune"][name]["losses"] and all(np.isfinite(got["losses"]))
        cfg = AutoConfig.from_pretrained(f"{out}/export")
        assert cfg.rope_parameters["rope_type"] == "linear" and cfg.rope_parameters["factor"] == 4.0
        assert cfg.max_position_embeddings == 64
        exported = AutoModelForCausalLM.from_pretrained(f"{out}/export").eval()
        sd = exported.state_dict()
        assert not torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
        assert not torch.equal(sd["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
        assert torch.equal(sd["lm_head.weight"], base["lm_head.weight"])  # LongLoRA never trains lm_head
        assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
        with torch.no_grad():
            logits = exported(torch.as_tensor(got["probe_ids"])).logits
        torch.testing.assert_close(logits, torch.as_tensor(got["probe_logits"]), atol=2e-5, rtol=1e-4)


def test_finetune_activation_checkpointing_matches(tmp_path):
    """One rank through the shared trainer: activation-checkpointed decoder blocks give the same losses and
    the same exported weights as plain ones (float64), and the export carries no wrapper names."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from longreach.hf.config import FinetuneConfig, FTAttention, FTData, FTRun, FTTrain, HFSource
    from longreach.hf.train import finetune
    from longreach.hf.recipes import RecipeConfig
    from longreach.parallel.config import ParallelConfig

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 97, 64 * 4))
    runs = {}
    for ac in (False, True):
        cfg = FinetuneConfig(hf=HFSource(path=str(tmp_path / "base"), dtype="float64"),
                             recipe=RecipeConfig(target_len=64), attention=FTAttention(backend="cpu"),
                             parallel=ParallelConfig(cp=1), data=FTData(source="tokens", tokens_path=str(tmp_path / "tokens.npy")),
                             run=FTRun(out_dir=str(tmp_path / f"ac{int(ac)}"), steps=2),
                             train=FTTrain(lr=5e-3, warmup_steps=1, activation_checkpointing=ac))
        runs[ac] = finetune(cfg)
    assert runs[True]["losses"] == runs[False]["losses"] and len(runs[True]["losses"]) == 2
    plain, wrapped = (AutoModelForCausalLM.from_pretrained(runs[ac]["export"]).state_dict() for ac in (False, True))
    assert sorted(plain) == sorted(wrapped)
    for name, w in plain.items():
        assert torch.equal(w, wrapped[name]), name


def _bf16_finetune(tmp_path, monkeypatch, name: str, **hf_kw) -> tuple[dict, dict]:
    """Fine-tune the bf16 tiny Llama in ``tmp_path/base`` for 2 steps at lr 2e-5 on one rank; returns the
    trained HF parameters (as float32) and the trainer summary."""
    import longreach.hf.train as hf_train
    from longreach.hf.config import FinetuneConfig, FTAttention, FTData, FTRun, FTTrain, HFSource
    from longreach.hf.recipes import RecipeConfig
    from longreach.hf.train import finetune
    from longreach.parallel.config import ParallelConfig

    built = []
    real = hf_train.build_hf_model
    monkeypatch.setattr(hf_train, "build_hf_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    cfg = FinetuneConfig(hf=HFSource(path=str(tmp_path / "base"), dtype="bfloat16", **hf_kw),
                         recipe=RecipeConfig(target_len=64), attention=FTAttention(backend="cpu"),
                         parallel=ParallelConfig(cp=1),
                         data=FTData(source="tokens", tokens_path=str(tmp_path / "tokens.npy")),
                         run=FTRun(out_dir=str(tmp_path / name), steps=2), train=FTTrain(lr=2e-5, warmup_steps=0))
    summary = finetune(cfg)
    assert cfg.train.precision == "bf16"  # bf16 weights compute in bf16
    params = {n: p.detach().float().clone() for n, p in built[-1].hf.named_parameters()}
    return params, summary


def test_bf16_finetune_keeps_fp32_master_weights(tmp_path, monkeypatch, caplog):
    """A bf16 checkpoint fine-tuned at lr 2e-5 moves its norms and embeddings (fp32 master weights and
    optimizer state, bf16 compute); with hf.pure_bf16 the norms stay bit-identical, with a warning."""
    import logging

    from transformers import LlamaForCausalLM

    from longreach.hf.model import keep_master_weights

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    base = {n: p.float() for n, p in LlamaForCausalLM.from_pretrained(tmp_path / "base").named_parameters()}
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 97, 64 * 4))
    master, summary = _bf16_finetune(tmp_path, monkeypatch, "master")
    assert "no fp32 master weights" not in caplog.text
    assert all(np.isfinite(summary["losses"])) and len(summary["losses"]) == 2
    norms = [n for n in base if "norm" in n]
    assert len(norms) == 5
    for n in norms:  # every norm weight moved by about lr per step (Adam), far below bf16's spacing at 1.0
        delta = (master[n] - base[n]).abs()
        assert bool((delta > 0).all()) and 1e-5 < float(delta.max()) < 1e-4, (n, delta)
    emb = "model.embed_tokens.weight"
    moved_rows = int(((master[emb] - base[emb]).abs().amax(dim=1) > 1e-5).sum())
    assert moved_rows > 97 // 2  # the rows of the tokens the 2 steps saw (128 tokens of 97 kinds)
    frozen = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(master[frozen], base[frozen])
    with caplog.at_level(logging.WARNING, logger="longreach.hf.model"):
        pure, _ = _bf16_finetune(tmp_path, monkeypatch, "pure", pure_bf16=True)
    assert "hf.pure_bf16" in caplog.text and "no fp32 master weights" in caplog.text  # builder and optimizer
    for n in norms:
        assert torch.equal(pure[n], base[n]), n  # the bug master weights fix: updates rounded away
    # pure bf16 embeddings move only where |w| is small enough for a 2e-5 step to round to a new value
    changed_master, changed_pure = (int(((w[emb] - base[emb]) != 0).sum()) for w in (master, pure))
    assert changed_pure < changed_master // 2, (changed_pure, changed_master)
    # tied weights stay tied when upcast
    tied = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).to(torch.bfloat16)
    tied.model.embed_tokens.weight.requires_grad_(True)
    for n, p in tied.named_parameters():
        p.requires_grad_("embed" in n)
    assert keep_master_weights(tied) == ["model.embed_tokens.weight"]
    assert tied.lm_head.weight is tied.model.embed_tokens.weight and tied.lm_head.weight.dtype == torch.float32


def test_lean_finetune_checkpoint_and_changed_base(tmp_path):
    """A LoRA fine-tune's checkpoint holds the trainable parameters and their optimizer state only (not the
    frozen base); a resume against changed base files is one clear error, with nothing of the run lost."""
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import LlamaForCausalLM

    from longreach.hf.config import FinetuneConfig, FTAttention, FTData, FTRun, FTTrain, HFSource
    from longreach.hf.train import base_files_hash, finetune
    from longreach.hf.recipes import RecipeConfig
    from longreach.parallel.config import ParallelConfig

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 97, 64 * 4))

    def job(steps: int, base_hash: str = "") -> FinetuneConfig:
        return FinetuneConfig(hf=HFSource(path=str(tmp_path / "base"), base_hash=base_hash),
                              recipe=RecipeConfig(target_len=64), attention=FTAttention(backend="cpu"),
                              parallel=ParallelConfig(cp=1),
                              data=FTData(source="tokens", tokens_path=str(tmp_path / "tokens.npy")),
                              run=FTRun(out_dir=str(tmp_path / "run"), steps=steps, save_every=1),
                              train=FTTrain(lr=1e-3, warmup_steps=0))

    cfg = job(2)
    summary = finetune(cfg)
    assert cfg.hf.base_hash == base_files_hash(tmp_path / "base") and len(cfg.hf.base_hash) == 64
    saved = FileSystemReader(f"{summary['checkpoint']}/model").read_metadata().state_dict_metadata
    names = {k.split(".", 1)[1] for k in saved if k.startswith("model.")}
    trainable = {n for n in names if "lora_" in n or "embed" in n or "norm" in n}
    assert names == trainable and len(trainable) == 2 * 2 * 4 + 1 + 5  # LoRA A, B on q k v o of 2 layers
    assert any(k.startswith("optim.state.") for k in saved)
    # changed base files: refused at the start, naming hf.path; the run's checkpoints and metrics stay
    LlamaForCausalLM(tiny_llama_config(rms_norm_eps=1e-5)).save_pretrained(tmp_path / "base")
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(UserError, match=r"hf.path: the base checkpoint .*base changed since the checkpoints in"):
        finetune(job(3))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2
    with pytest.raises(UserError, match="hf.base_hash: the files in hf.path=.* not the pinned 0123"):
        finetune(job(3, base_hash="0123" * 16))


def test_lean_checkpoint_of_tied_embeddings_holds_them_once_and_resumes_exactly(tmp_path):
    """A tied-embedding Llama's lean fine-tune checkpoint holds the shared embedding once (no lm_head entry:
    its model tensors are exactly the trainable parameters' elements); a run stopped after step 1 and
    resumed from that checkpoint gives the uninterrupted run's losses and exported weights bit for bit."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from transformers import LlamaForCausalLM

    from longreach.hf.config import FinetuneConfig, FTAttention, FTData, FTRun, FTTrain, HFSource
    from longreach.hf.train import finetune
    from longreach.hf.recipes import RecipeConfig
    from longreach.parallel.config import ParallelConfig

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    assert base.lm_head.weight is base.model.embed_tokens.weight
    base.save_pretrained(tmp_path / "base")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(1).integers(0, 97, 64 * 4))
    runs = {}
    for out, steps in (("straight", 3), ("resumed", 1), ("resumed", 3)):
        runs[out] = finetune(FinetuneConfig(
            hf=HFSource(path=str(tmp_path / "base")), recipe=RecipeConfig(target_len=64),
            attention=FTAttention(backend="cpu"), parallel=ParallelConfig(cp=1), train=FTTrain(lr=1e-3),
            data=FTData(source="tokens", tokens_path=str(tmp_path / "tokens.npy")),
            run=FTRun(out_dir=str(tmp_path / out), steps=steps, save_every=1)))
    assert len(runs["straight"]["losses"]) == 3 and runs["resumed"]["losses"] == runs["straight"]["losses"]
    assert runs["resumed"]["first_loss"] == runs["straight"]["losses"][1]  # the second call began at step 2
    exported = {k: load_file(f"{tmp_path / k}/export/model.safetensors") for k in runs}
    assert sorted(exported["straight"]) == sorted(exported["resumed"])
    for name, t in exported["straight"].items():
        assert torch.equal(t, exported["resumed"][name]), name
    assert not torch.equal(exported["straight"]["model.embed_tokens.weight"], base.model.embed_tokens.weight)

    ckpt = tmp_path / "straight" / "checkpoints" / "step-00000002"
    saved = FileSystemReader(f"{ckpt}/model").read_metadata().state_dict_metadata
    model_keys = [k for k, m in saved.items()
                  if k.startswith("model.") and isinstance(m, TensorStorageMetadata)]
    assert not any("lm_head" in k for k in saved), [k for k in saved if "lm_head" in k]
    assert sum("embed_tokens" in k for k in model_keys) == 1
    n_trainable = runs["straight"]["trainable"]["trainable"]  # tied parameters counted once
    n_saved = sum(math.prod(saved[k].size) for k in model_keys)
    assert n_saved == n_trainable, (n_saved, n_trainable)


def test_finetune_corpus_streams_through_shared_shards(tmp_run_dir, monkeypatch):
    """Fine-tuning text is tokenized by the shared streaming path with the checkpoint's HF tokenizer (in
    worker processes, cached) into the same stream as encoding each document and appending eos; windows
    are read from the memory-mapped shards, only the ones this rank draws."""
    from transformers import AutoTokenizer

    import longreach.data.stream as stream
    from longreach.data.corpus import corpus_documents
    from longreach.data.config import DataConfig
    from longreach.data.tokenizer import train_tokenizer
    from longreach.hf.config import FTData
    from longreach.hf.data import TokenWindows, tokenize_corpus
    from longreach.hf.convert import save_tokenizer

    data = FTData(source="synthetic", synthetic_documents=30, task_chars=600, tokenize_workers=1)
    docs = corpus_documents(DataConfig(source="synthetic", synthetic_documents=30, task_chars=600,
                                       passkey_fraction=data.passkey_fraction, recall_fraction=0.0, seed=0))
    train_tokenizer(docs, 320, tmp_run_dir / "sp.model")
    save_tokenizer(tmp_run_dir / "sp.model", tmp_run_dir / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_run_dir / "hf")
    tokens = tokenize_corpus(data, tok)
    want = np.concatenate([tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id] for d in docs])
    assert isinstance(tokens, stream.TokenStream) and np.array_equal(tokens[0:len(tokens)], want)
    assert tokens.shards.folder.parent == tmp_run_dir / "cache" / "shards-v2"
    monkeypatch.setattr(stream, "_build", lambda *a, **k: pytest.fail("the cached shards must be reused"))
    again = tokenize_corpus(FTData(source="synthetic", synthetic_documents=30, task_chars=600, tokenize_workers=0), tok)
    assert again.shards.folder == tokens.shards.folder
    win = TokenWindows(again, 64, batch=2, dp_rank=1, dp_size=2, seed=0)
    ids = next(win)["input_ids"]  # [2, 64]
    order = np.random.default_rng([0, 0]).permutation(len(want) // 64)
    mine = order[len(order) // 2:][:2]
    assert torch.equal(ids, torch.as_tensor(np.stack([want[w * 64:(w + 1) * 64] for w in mine])))


def test_finetune_cli_refuses_target_not_longer(tmp_path, capsys):
    """``longreach finetune`` with recipe.target_len ≤ the checkpoint's context: exit 2, one line naming the
    settings, no run folder written."""
    from transformers import LlamaForCausalLM

    from longreach.hf.cli import finetune_main

    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    capsys.readouterr()
    rc = finetune_main(["longlora_tiny_cpu", f"--hf.path={tmp_path / 'base'}", "--recipe.target_len=16",
                        "--parallel.cp=1", f"--run.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "recipe.target_len=16 is not longer than the original context 16" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bf16_master_weights_on_every_engine(tmp_path):
    """2 gloo ranks (dp 2): a bf16 checkpoint fine-tuned for 2 steps at lr 2e-5 moves every norm weight under
    DDP, FSDP2 (MixedPrecisionPolicy), accelerate and DeepSpeed ZeRO-0/2 in bf16 (DeepSpeed's fp32 masters
    are handed back to the module at the end); frozen weights stay as loaded."""
    from transformers import LlamaForCausalLM

    from longreach.testing import run_ranks
    from workers.hf import bf16_engines

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    base = {n: p.detach().float().numpy() for n, p in LlamaForCausalLM.from_pretrained(tmp_path / "base").named_parameters()}
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 97, 64 * 8))
    engines = {"ddp": {"kind": "native"}, "fsdp2": {"kind": "native", "options": {"fsdp": True}},
               "accelerate": {"kind": "accelerate"}, "zero0": {"kind": "deepspeed", "options": {"zero_stage": 0}},
               "zero2": {"kind": "deepspeed", "options": {"zero_stage": 2}}}
    res = run_ranks(bf16_engines, 2, timeout=900, args=(str(tmp_path / "base"), str(tmp_path / "tokens.npy"),
                                                         str(tmp_path / "runs"), engines))
    failures = []
    norms = [n for n in base if "norm" in n]
    for name in engines:
        got = res[0][name]
        if isinstance(got, str):
            failures.append(f"{name}: {got[-1500:]}")
            continue
        for n in norms:
            delta = np.abs(got[n] - base[n])
            if not ((delta > 0).all() and delta.max() < 1e-4):
                failures.append(f"{name}: {n} moved {int((delta > 0).sum())}/{delta.size}, max {delta.max():.3g}")
        frozen = "model.layers.0.mlp.up_proj.weight"
        if not np.array_equal(got[frozen], base[frozen]):
            failures.append(f"{name}: frozen {frozen} changed")
    assert not failures, "\n".join(failures)
    ddp, fsdp = res[0]["ddp"], res[0]["fsdp2"]
    for n in norms:  # the same fp32 master-weight update, replicated or sharded
        np.testing.assert_allclose(fsdp[n], ddp[n], rtol=0, atol=2e-6)


@pytest.mark.slow
def test_deepspeed_lean_checkpoint_resumes_exactly(tmp_path):
    """2 gloo ranks, DeepSpeed ZeRO-2 bf16: the lean checkpoint's module state holds no frozen weight, and a
    run resumed from it at step 2 gives the uninterrupted run's losses bit for bit."""
    from transformers import LlamaForCausalLM

    from longreach.testing import run_ranks
    from workers.hf import deepspeed_lean_resume

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 97, 64 * 8))
    res = run_ranks(deepspeed_lean_resume, 2, timeout=900, args=(str(tmp_path / "base"), str(tmp_path / "tokens.npy"),
                                                                 str(tmp_path / "runs"), True))
    assert len(res[0]["straight"]) == 3 and res[0]["resumed"] == res[0]["straight"] == res[1]["resumed"]
    state = torch.load(f"{res[0]['checkpoint']}/deepspeed-engine/ds/mp_rank_00_model_states.pt", weights_only=False)
    names = set(state["module"])
    assert any("lora_A" in n for n in names) and any("embed_tokens" in n for n in names)
    assert not any("up_proj.base_layer" in n or n.endswith("up_proj.weight") or "lm_head" in n for n in names), names
