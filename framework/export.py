"""``longreach export SOURCE --out DIR``: one self-contained model folder from any model source.

    longreach export runs/pre --out runs/pre/hf --format hf            # plain LlamaForCausalLM + tokenizer
    longreach export runs/bam --out runs/bam/export                     # model.safetensors + config.yaml
    longreach export runs/pre/checkpoints/step-00000020 --out x --dtype bfloat16

``--format hf`` (the default for plain Llama models) writes a ``LlamaForCausalLM`` folder that
transformers loads alone: ``config.json``, ``model.safetensors`` and the sentencepiece model converted
to an HF ``LlamaTokenizer`` (ids equal sentencepiece's). ``--format safetensors`` (the default for every
other architecture: TransNormerLLM, MoE, MoH, BAM, parallel blocks) writes ``model.safetensors`` +
``config.yaml`` (+ ``tokenizer.model``), which ``eval``, ``generate``, ``upcycle`` and ``train
--checkpoint.init_from`` read.

Sharded state is gathered into one file: a DCP checkpoint is read by this one process (FSDP2 shards and
expert-parallel experts come back whole, see :mod:`longreach.sources`), a DeepSpeed ZeRO checkpoint is
consolidated with DeepSpeed's ``zero_to_fp32``. The dtype defaults to the source's (``--dtype`` casts).
The export is written into ``DIR.tmp`` and renamed into place, so a failure never leaves half a folder;
a non-empty ``DIR`` is refused unless ``--force``. Started on several ranks, only rank 0 exports and the
others return at once (no collective, so no collective timeout can fire while rank 0 writes).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from longreach.errors import UserError
from longreach.hf.convert import save_hf
from longreach.hf.export import copy_tokenizer_files
from longreach.models import build_model
from longreach.sources import (load_tokenizer, load_weights_into, read_state_dict, resolve_source,
                               source_dtype, write_export_config)

__all__ = ["export", "main"]

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _say(text: str) -> None:
    print(f"longreach export: {text}", file=sys.stderr, flush=True)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _is_plain_llama(cfg: Any) -> bool:
    return cfg.arch == "llama" and cfg.attention_type == "mha" and cfg.ffn_type == "swiglu" and not cfg.parallel_block


def _tokenizer_file(src: Any) -> Path | None:
    if src.is_hf:  # its tokenizer files are copied as they are
        return None
    tok = load_tokenizer(src)
    return Path(tok.path) if tok is not None and hasattr(tok, "sp") else None


def export(source: str | Path, out: str | Path, *, fmt: str = "auto", dtype: str = "auto", force: bool = False
           ) -> Path:
    """Export ``source`` (any model source) to ``out``; returns the folder.

    Args:
        source: run folder, ``step-N`` checkpoint, export or HF folder.
        out: destination folder (must be absent or empty unless ``force``).
        fmt: ``hf``, ``safetensors`` or ``auto`` (hf for plain Llama models, else safetensors).
        dtype: weight dtype, or ``auto`` (the source's).
        force: replace a non-empty ``out``.

    Raises:
        UserError: an unreadable source, a non-empty ``out`` without ``force``, ``--format hf`` for an
            architecture HF Llama cannot express, an unknown dtype.
    """
    if fmt not in ("auto", "hf", "safetensors"):
        raise UserError(f"--format {fmt!r}: choose hf, safetensors or auto")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    dest = Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not force:
        raise UserError(f"--out {dest} exists and is not empty; pass --force to replace it, or choose another folder")
    t0 = time.monotonic()
    src = resolve_source(source)
    _say(f"reading {src.describe()}")
    cfg = src.model_config()
    if fmt == "auto":
        fmt = "hf" if _is_plain_llama(cfg) else "safetensors"
    if fmt == "hf" and not _is_plain_llama(cfg):
        raise UserError(f"--format hf writes LlamaForCausalLM, which cannot express arch={cfg.arch}, "
                        f"attention_type={cfg.attention_type}, ffn_type={cfg.ffn_type}, parallel_block="
                        f"{cfg.parallel_block}; use --format safetensors")
    state = read_state_dict(src)
    src_dtype = source_dtype(state)
    target = src_dtype if dtype == "auto" else getattr(torch, dtype)
    n_bytes = sum(t.numel() * t.element_size() for t in state.values())
    _say(f"gathered {len(state)} tensors, {_mb(n_bytes)} ({str(src_dtype).removeprefix('torch.')}) "
         f"in {time.monotonic() - t0:.1f} s")
    with torch.device("cpu"):
        model = build_model(cfg)
    load_weights_into(model, state, src.describe())
    del state
    model = model.to(target).eval()
    tok_file = _tokenizer_file(src)

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _say(f"writing {fmt} ({str(target).removeprefix('torch.')}) to {dest}")
        if fmt == "hf":
            save_hf(model, tmp, sp_model_file=tok_file, dtype=target)
            if src.is_hf:  # an HF source keeps its own tokenizer files
                copy_tokenizer_files(src.path, tmp)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
            write_export_config(tmp, cfg, source=src, dtype=target)
            if tok_file is not None:
                shutil.copyfile(tok_file, tmp / "tokenizer.model")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    has_tok = tok_file is not None or (fmt == "hf" and src.is_hf and (dest / "tokenizer_config.json").is_file())
    _say(f"wrote {dest}: {', '.join(sorted(f.name for f in dest.iterdir()))} ({_mb(written)}) "
         f"in {time.monotonic() - t0:.1f} s" + ("" if has_tok else "; no tokenizer was found for this source"))
    return dest


def main(argv: list[str] | None = None) -> int:
    """``longreach export SOURCE --out DIR [--format hf|safetensors] [--dtype …] [--force]``."""
    p = argparse.ArgumentParser(prog="longreach export", description=__doc__.split("\n\n")[0],
                                epilog="SOURCE: a run folder (its latest complete step), a step-N checkpoint, "
                                       "an export or an HF folder")
    p.add_argument("source", help="run folder, step-N checkpoint, export or HF folder")
    p.add_argument("--out", required=True, help="destination folder (absent or empty, or --force)")
    p.add_argument("--format", dest="fmt", default="auto", choices=("auto", "hf", "safetensors"),
                   help="hf: LlamaForCausalLM folder (plain Llama only); safetensors: model.safetensors + "
                        "config.yaml; auto (default): hf when the model is plain Llama")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="weight dtype (default: the source's)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    args = p.parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one writer; the others finish at once (nothing collective to time out)
    export(args.source, args.out, fmt=args.fmt, dtype=args.dtype, force=args.force)
    return 0
