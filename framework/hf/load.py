"""Load a local HuggingFace causal-LM checkpoint for long-context fine-tuning.

Weights are read once, straight into the target dtype (safetensors memory-mapped by transformers; no
float32 copy of a bf16 checkpoint is made first): bf16 on GPU, fp32 on CPU unless told otherwise.
``trust_remote_code`` stays off unless asked for: only the families whose attention dispatches
through transformers' registry (Llama, Mistral, Qwen2) are accepted by default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from longreach.errors import UserError

FAMILIES = ("llama", "mistral", "qwen2")


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on an accelerator, fp32 on CPU."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def load_hf(path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
            trust_remote_code: bool = False, allow_other_families: bool = False,
            with_tokenizer: bool = True) -> tuple[Any, Any]:
    """Load ``path`` (a local folder with ``config.json`` and weights).

    Args:
        path: checkpoint folder (no hub download: the folder must exist).
        dtype: weight dtype (default :func:`default_dtype`).
        device: where the weights go (default cuda when available, else cpu).
        trust_remote_code: let transformers run code shipped with the checkpoint (off by default).
        allow_other_families: accept model types beyond Llama/Mistral/Qwen2.
        with_tokenizer: also load the tokenizer when the folder has one.

    Returns:
        ``(model, tokenizer or None)``; the model is in eval mode on ``device``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a HuggingFace checkpoint folder (no config.json)")
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code, local_files_only=True)
    if config.model_type not in FAMILIES and not allow_other_families:
        raise UserError(f"{folder}: model_type {config.model_type!r} is not one of {', '.join(FAMILIES)} "
                        "(set allow_other_families to try it)")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(dev)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), config=config, dtype=dtype, device_map={"": dev}, trust_remote_code=trust_remote_code,
        local_files_only=True, attn_implementation="sdpa",
    )
    tokenizer = None
    if with_tokenizer and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code, local_files_only=True)
    return model.eval(), tokenizer
