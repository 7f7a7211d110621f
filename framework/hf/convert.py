"""Convert both ways between longreach's Llama (``longreach.models.llama``) and HF ``LlamaForCausalLM``.

Our parameter names are HF Llama's without the ``model.`` prefix and both rotate pairs (j, j + d/2),
so weights map one to one. RoPE: our ``rope_theta``/``rope_scaling`` ↔ HF ``rope_parameters``
(``ntk`` — static NTK, ours only — is written as an unscaled RoPE with the baked base b·s^{d/(d−2)}).
Tokenizer: the sentencepiece ``tokenizer.model`` is copied and wrapped as a ``LlamaTokenizer`` whose
token ids equal sentencepiece's.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from longreach.errors import UserError
from longreach.hf.rope import read_rope, rebuild_rotary
from longreach.models import ModelConfig, build_model
from longreach.models.rope import RotaryEmbedding

TOKENIZER_FILE = "tokenizer.model"


def _rope_parameters(cfg: Any) -> dict[str, Any]:
    """HF ``rope_parameters`` for a :class:`longreach.models.ModelConfig`."""
    scaling = dict(cfg.rope_scaling or {})
    kind = str(scaling.pop("type", scaling.pop("rope_type", "default")))
    params: dict[str, Any] = {"rope_theta": float(cfg.rope_theta), "rope_type": "default"}
    if kind == "default":
        return params
    factor = float(scaling.get("factor", 1.0))
    if kind == "ntk":
        d = cfg.head_dim
        params["rope_theta"] = float(cfg.rope_theta) * factor ** (d / (d - 2))
        return params
    params.update(scaling)
    params["rope_type"] = kind
    params["factor"] = factor
    if kind in ("yarn", "llama3"):
        params.setdefault("original_max_position_embeddings", int(cfg.max_seq_len))
    if kind == "llama3":  # our defaults, explicit (transformers requires them)
        params.setdefault("low_freq_factor", 1.0)
        params.setdefault("high_freq_factor", 4.0)
    return params


def hf_config_from(cfg: Any, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                   pad_token_id: int | None = None) -> Any:
    """A ``LlamaConfig`` equivalent to a longreach ``ModelConfig``.

    Raises:
        UserError: for architectures HF Llama cannot express (parallel blocks, MoE/MoH layers).
    """
    from transformers import LlamaConfig

    if cfg.arch != "llama" or cfg.attention_type != "mha" or cfg.ffn_type != "swiglu" or cfg.parallel_block:
        raise UserError(
            f"only plain Llama models convert to HF LlamaForCausalLM (got arch={cfg.arch}, "
            f"attention_type={cfg.attention_type}, ffn_type={cfg.ffn_type}, parallel_block={cfg.parallel_block})"
        )
    max_pos = int(cfg.max_seq_len)
    kind = (cfg.rope_scaling or {}).get("type", (cfg.rope_scaling or {}).get("rope_type", "default"))
    if kind in ("linear", "yarn", "llama3", "ntk"):
        max_pos = int(round(cfg.max_seq_len * float(cfg.rope_scaling.get("factor", 1.0))))
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=max_pos, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, rope_parameters=_rope_parameters(cfg), attention_bias=False,
        mlp_bias=False, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        initializer_range=cfg.init_std,
    )


def model_config_from(hf_config: Any) -> ModelConfig:
    """A longreach ``ModelConfig`` equivalent to an HF Llama-family config."""
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise UserError("HF checkpoints with attention/MLP biases (e.g. Qwen2) do not convert to longreach's Llama")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act={hf_config.hidden_act!r}: longreach's Llama uses SwiGLU (silu)")
    rope = read_rope(hf_config)
    kind = rope.pop("rope_type")
    theta = float(rope.pop("rope_theta"))
    max_seq = int(hf_config.max_position_embeddings)
    scaling: dict[str, Any] | None = None
    if kind != "default":
        if kind not in ("linear", "dynamic", "yarn", "llama3"):
            raise UserError(f"rope_type={kind!r} has no longreach equivalent")
        scaling = {"type": kind, **{k: v for k, v in rope.items() if k != "partial_rotary_factor"}}
        if kind in ("linear",):
            max_seq = int(round(max_seq / float(rope.get("factor", 1.0))))
        elif kind in ("yarn", "llama3"):
            max_seq = int(rope.get("original_max_position_embeddings", max_seq))
    return ModelConfig(
        arch="llama", vocab_size=hf_config.vocab_size, dim=hf_config.hidden_size, n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads, n_kv_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        ffn_hidden=hf_config.intermediate_size, norm_eps=float(hf_config.rms_norm_eps), rope_theta=theta,
        rope_scaling=scaling, max_seq_len=max_seq, tie_embeddings=bool(hf_config.tie_word_embeddings),
        init_std=float(getattr(hf_config, "initializer_range", 0.02)),
    )


def to_hf_state_dict(state: dict[str, torch.Tensor], *, tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """Our parameter names → HF ``LlamaForCausalLM`` names (tensors shared, not copied)."""
    out = {}
    for name, t in state.items():
        if name.startswith("lm_head."):
            out[name] = t
        else:
            out[f"model.{name}"] = t
    if tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` names → ours (rotary buffers dropped)."""
    out = {}
    for name, t in state.items():
        if "rotary_emb" in name:
            continue
        out[name.removeprefix("model.")] = t
    return out


def to_hf(model: torch.nn.Module, **token_ids: int | None) -> Any:
    """An HF ``LlamaForCausalLM`` with our model's weights (same dtype and device).

    Args:
        model: a ``longreach.models.llama.Llama``.
        token_ids: ``bos_token_id``/``eos_token_id``/``pad_token_id`` for the HF config.
    """
    from transformers import LlamaForCausalLM

    cfg = model.cfg
    hf_cfg = hf_config_from(cfg, **token_ids)
    p = next(model.parameters())
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    state = to_hf_state_dict(model.state_dict(), tie_embeddings=cfg.tie_embeddings)
    hf.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        hf.tie_weights()
    # rotary buffers are not weights: rebuild them on the real device
    rebuild_rotary(hf, device=p.device)
    missing = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if missing:
        raise RuntimeError(f"conversion left HF parameters unset: {missing[:5]}")
    return hf.to(p.dtype).eval()


def from_hf(hf_model: Any) -> torch.nn.Module:
    """A longreach ``Llama`` with an HF Llama-family model's weights (peft adapters must be merged first)."""
    cfg = model_config_from(hf_model.config)
    p = next(hf_model.parameters())
    with torch.device("meta"):
        model = build_model(cfg)
    state = from_hf_state_dict(hf_model.state_dict())
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_embeddings and m.startswith("lm_head"))]
    if missing or unexpected:
        raise UserError(f"HF checkpoint does not match longreach's Llama: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}")
    # our RoPE tables are plain (float64) attributes, not weights: rebuild them off the meta device
    model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
    return model.to(device=p.device, dtype=p.dtype)


# ------------------------------------------------------------------------------------------------
# Tokenizer files
# ------------------------------------------------------------------------------------------------


PROBES = ("The pass key is 31415. Remember it.", "def f(x):\n    return x  # 2048 tokens", "two  spaces é ü\n\n  x")


def save_tokenizer(sp_model_file: str | Path, out_dir: str | Path) -> Any:
    """Write ``tokenizer.model`` plus the HF tokenizer files of a ``LlamaTokenizer`` into ``out_dir``.

    transformers builds the fast tokenizer from the sentencepiece model itself (protobuf needed); the
    result is checked on probe strings against sentencepiece and a mismatch is logged. Known
    difference: text that *starts* with spaces (HF's Metaspace adds no dummy prefix before a leading space).

    Returns:
        The HF tokenizer (ids equal sentencepiece's with ``add_special_tokens=False``).
    """
    import json
    import logging

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    src = Path(sp_model_file)
    if not src.is_file():
        raise UserError(f"sentencepiece model {src} does not exist")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dst = out / TOKENIZER_FILE
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    sp = spm.SentencePieceProcessor(model_file=str(dst))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    special = {"bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
               "pad_token": piece(sp.pad_id())}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "legacy": False,
              "model_max_length": 1 << 30, **{k: v for k, v in special.items() if v is not None}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out / "tokenizer.json").unlink(missing_ok=True)  # rebuilt from tokenizer.model below
    tok = LlamaTokenizer.from_pretrained(str(out))
    tok.save_pretrained(str(out))
    bad = [p for p in PROBES if tok(p, add_special_tokens=False).input_ids != sp.encode(p)]
    if bad:
        logging.getLogger(__name__).warning(
            "exported tokenizer differs from sentencepiece on %d probe string(s), e.g. %r (the sentencepiece "
            "normaliser may collapse whitespace, which the HF tokenizer does not)", len(bad), bad[0])
    return tok


def save_hf(model: torch.nn.Module, out_dir: str | Path, *, sp_model_file: str | Path | None = None,
            dtype: torch.dtype | None = None) -> Path:
    """Convert a longreach Llama and save it (plus tokenizer files) as a plain HF checkpoint."""
    out = Path(out_dir)
    ids: dict[str, int | None] = {}
    if sp_model_file is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
        ids = {"bos_token_id": sp.bos_id() if sp.bos_id() >= 0 else None,
               "eos_token_id": sp.eos_id() if sp.eos_id() >= 0 else None,
               "pad_token_id": sp.pad_id() if sp.pad_id() >= 0 else None}
    hf = to_hf(model, **ids)
    if dtype is not None:
        hf = hf.to(dtype)
    hf.save_pretrained(str(out))
    if sp_model_file is not None:
        save_tokenizer(sp_model_file, out)
    return out
