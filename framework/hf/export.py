"""Export a fine-tuned HF model: merge LoRA into the base weights, save a plain checkpoint + tokenizer.

The exported folder loads with transformers alone (``AutoModelForCausalLM.from_pretrained``): stock
attention implementation, the RoPE scaling the model was fine-tuned with in ``rope_parameters``, no
peft adapters, no longreach code.

At the end of a multi-rank job: :func:`gather_full_parameters` (every rank) turns FSDP2 shards and
DeepSpeed ZeRO-3 partitions into full weights, then :func:`run_on_rank0` lets rank 0 merge and write
while the other ranks wait on a separate gloo group with a long timeout — the job's collective timeout
(sized for a training step) must not fire while ~13 GB are written. :func:`export_hf` prints its
progress (merging, writing, bytes) and keeps the dtype of the source checkpoint unless told otherwise
(:func:`checkpoint_dtype`).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

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


def _say(text: str) -> None:
    print(f"longreach export: {text}", file=sys.stderr, flush=True)


def checkpoint_dtype(path: str | Path) -> torch.dtype | None:
    """The weight dtype an HF checkpoint folder declares (``config.json`` ``dtype``/``torch_dtype``), or None."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    value = getattr(torch, str(name), None) if name else None
    return value if isinstance(value, torch.dtype) else None


def gather_full_parameters(model: torch.nn.Module) -> int:
    """Replace sharded parameters by full local copies (collective over the ranks sharing them).

    FSDP2 ``DTensor`` parameters are gathered with ``full_tensor()``; DeepSpeed ZeRO-3 partitions (``ds_id``)
    with ``deepspeed.zero.GatheredParameters``. DDP and ZeRO ≤ 2 keep full parameters: nothing to do. Every
    rank must call it (same module order everywhere). The model is for export afterwards, not training.

    Returns:
        The number of parameters replaced.
    """
    from torch.distributed.tensor import DTensor

    n = 0
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if isinstance(p, DTensor):
                full = p.full_tensor()
            elif hasattr(p, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.data.detach().clone()
            else:
                continue
            setattr(module, name, torch.nn.Parameter(full, requires_grad=p.requires_grad))
            n += 1
    return n


def run_on_rank0(fn: Callable[[], Any], *, timeout_s: float = 24 * 3600.0) -> Any:
    """Run ``fn`` on rank 0 while every other rank waits (without the job's collective timeout firing).

    The wait is a barrier on a new gloo group whose timeout is ``timeout_s``; a failure on rank 0 reaches
    every rank as the same :class:`UserError` (no rank is left waiting).

    Returns:
        ``fn()`` on rank 0, None elsewhere (and the value when not distributed).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    result, error = None, None
    try:
        if dist.get_rank() == 0:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - reported on every rank below
                error = f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)
        box = [error]
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] is not None:
            raise UserError(f"export on rank 0 failed: {box[0]}")
        return result
    finally:
        dist.destroy_process_group(group)


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
        dtype: cast the weights before saving (default: keep; fine-tuning passes the source checkpoint's,
            :func:`checkpoint_dtype`).

    Returns:
        The output folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if callable(getattr(model, "merge_and_unload", None)):
        _say("merging LoRA adapters into the base weights")
    hf = merged_model(model)
    # the registry name of our attention must not leak into the saved config
    impl = getattr(hf.config, "_attn_implementation", None)
    if impl is not None and str(impl).startswith("longreach_"):
        hf.set_attn_implementation("sdpa")
        if hasattr(hf, "_longreach_attention"):
            object.__delattr__(hf, "_longreach_attention")
    # cast a copy of the weights, not the module: the caller's fp32 master weights stay as they are
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             for k, v in hf.state_dict().items()}
    n_bytes = sum(v.numel() * v.element_size() for v in state.values())
    saved_dtype = dtype or next(hf.parameters()).dtype
    _say(f"writing {len(state)} tensors, {n_bytes / 2**20:,.1f} MiB "
         f"({str(saved_dtype).removeprefix('torch.')}) to {out}")
    hf.save_pretrained(str(out), state_dict=state)
    if dtype is not None:
        hf.config.dtype = dtype  # the config.json written above names the saved dtype
        hf.config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    elif sp_model_file is not None:
        from longreach.hf.convert import save_tokenizer

        save_tokenizer(sp_model_file, out)
    elif tokenizer_dir is not None:
        if not Path(tokenizer_dir).is_dir():
            raise UserError(f"tokenizer folder {tokenizer_dir} does not exist")
        copy_tokenizer_files(tokenizer_dir, out)
    written = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    _say(f"wrote {out} ({written / 2**20:,.1f} MiB) in {time.monotonic() - t0:.1f} s")
    return out
