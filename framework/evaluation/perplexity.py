"""Perplexity with LongLoRA's protocol: independent windows of the target length at a fixed stride.

ppl = exp(mean over windows of the mean next-token loss inside the window) (LongLoRA's
protocol; windows start every 256 tokens by default). Each window is an independent sequence (no
context carried over); under context parallelism it is sharded with the model's patch layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from longreach.data.shards import TokenShards
from longreach.errors import UserError
from longreach.evaluation.common import TextCodec, cp_group_of
from longreach.hf.patch import causal_lm_loss, sharded_batch


@dataclass
class PerplexityResult:
    length: int
    stride: int
    windows: int
    mean_loss: float
    ppl: float


def window_starts(num_tokens: int, window: int, stride: int, max_windows: int | None = None) -> list[int]:
    """Start offsets 0, stride, 2·stride, … of every full window of ``window`` tokens."""
    if window < 2 or stride < 1:
        raise UserError(f"perplexity needs window >= 2 and stride >= 1 (got {window}, {stride})")
    if num_tokens < window:
        raise UserError(f"the evaluation tokens ({num_tokens}) are fewer than one window of {window}")
    starts = list(range(0, num_tokens - window + 1, stride))
    return starts[:max_windows] if max_windows else starts


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor | np.ndarray, *, length: int, stride: int = 256,
               max_windows: int | None = None, chunk_size: int = 1024) -> PerplexityResult:
    """Perplexity of ``model`` on ``tokens`` with windows of ``length`` tokens.

    Args:
        model: an HF causal LM (patched with longreach attention; context-parallel when the patch says so).
        tokens: ``[N]`` token ids (identical on every context-parallel rank).
        length: window length (the evaluated context).
        stride: offset between window starts (LongLoRA: 256).
        max_windows: evaluate only the first windows (None: all).
        chunk_size: tokens per logits chunk of the loss.

    Returns:
        The windows' count, the mean over windows of the mean token loss, and its exp.
    """
    model.eval()
    fn, group, size = cp_group_of(model)
    toks = torch.as_tensor(np.asarray(tokens), dtype=torch.long).reshape(-1)  # [N]
    device = next(model.parameters()).device
    losses = []
    for start in window_starts(toks.numel(), length, stride, max_windows):
        ids = toks[start:start + length][None].to(device)  # [1, length]
        loss, _ = causal_lm_loss(model, sharded_batch(ids, fn=fn), group=group, chunk_size=chunk_size)
        if size > 1:  # each rank holds its share of the window's mean
            dist.all_reduce(loss, group=group)
        losses.append(float(loss))
    mean = float(np.mean(losses))
    return PerplexityResult(length=length, stride=stride, windows=len(losses), mean_loss=mean, ppl=math.exp(mean))


def load_tokens(path: str | Path, tokenizer=None) -> np.ndarray:
    """Evaluation tokens from a file: ``.npy`` (1-D ids), a longreach token-shard folder, or text
    (``.txt``/``.md``, tokenized with ``tokenizer``)."""
    p = Path(path)
    if p.is_dir():
        shards = TokenShards(p)
        return np.concatenate([np.asarray(shards.document(i)) for i in range(shards.num_documents)])
    if not p.is_file():
        raise UserError(f"evaluation tokens: {p} does not exist")
    if p.suffix == ".npy":
        arr = np.load(p)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise UserError(f"{p}: expected a 1-D integer array of token ids, got {arr.dtype} {arr.shape}")
        return arr
    if p.suffix in (".txt", ".md"):
        if tokenizer is None:
            raise UserError(f"{p}: a text file needs the model's tokenizer (none found next to the checkpoint)")

        return np.asarray(TextCodec(tokenizer).encode(p.read_text()), dtype=np.int64)
    raise UserError(f"{p}: unknown token file type (use .npy, .txt/.md or a token-shard folder)")
