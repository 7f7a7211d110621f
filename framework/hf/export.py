"""Export a fine-tuned HF model: merge LoRA into the base weights, save a plain checkpoint + tokenizer.

The exported folder loads with transformers alone (``AutoModelForCausalLM.from_pretrained``): stock
attention implementation, the RoPE scaling the model was fine-tuned with in ``rope_parameters``, no
peft adapters, no longreach code.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from longreach.errors import UserError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain HF model with LoRA merged in (the model itself when it is not a peft model).

    The peft wrapper is consumed: its base model's LoRA layers are replaced by merged Linear layers.
    """
    merge = getattr(model, "merge_and_unload", None)
    if callable(merge):
        model = merge()
    return model


def copy_tokenizer_files(src: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer files found in ``src`` (a checkpoint folder) into ``out_dir``."""
    src, out = Path(src), Path(out_dir)
    copied = []
    for name in TOKENIZER_FILES:
        f = src / name
        if f.is_file() and f.resolve() != (out / name).resolve():
            shutil.copyfile(f, out / name)
            copied.append(name)
    return copied


def export_hf(model: torch.nn.Module, out_dir: str | Path, *, tokenizer: Any = None,
              tokenizer_dir: str | Path | None = None, sp_model_file: str | Path | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """Merge LoRA and save ``model`` as a plain HF checkpoint plus tokenizer files.

    Args:
        model: an HF causal LM, possibly peft-wrapped and patched with longreach attention.
        out_dir: destination folder (created).
        tokenizer: an HF tokenizer to save alongside (optional).
        tokenizer_dir: a folder whose tokenizer files are copied (e.g. the source checkpoint).
        sp_model_file: a sentencepiece model to wrap as ``LlamaTokenizer`` (longreach-trained models).
        dtype: cast the weights before saving (default: keep).

    Returns:
        The output folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = merged_model(model)
    # the registry name of our attention must not leak into the saved config
    impl = getattr(hf.config, "_attn_implementation", None)
    if impl is not None and str(impl).startswith("longreach_"):
        hf.set_attn_implementation("sdpa")
        if hasattr(hf, "_longreach_attention"):
            object.__delattr__(hf, "_longreach_attention")
    if dtype is not None:
        hf = hf.to(dtype)
    hf.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    elif sp_model_file is not None:
        from longreach.hf.convert import save_tokenizer

        save_tokenizer(sp_model_file, out)
    elif tokenizer_dir is not None:
        if not Path(tokenizer_dir).is_dir():
            raise UserError(f"tokenizer folder {tokenizer_dir} does not exist")
        copy_tokenizer_files(tokenizer_dir, out)
    return out
