"""Pieces shared by the evaluations: the context-parallel group of a patch, last-token prediction."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from longreach.hf.patch import HFAttention, base_model, patched, prime_dynamic_rope, sharded_batch
from longreach.parallel import pad_to_layout


def cp_group_of(model: torch.nn.Module) -> tuple[HFAttention | None, dist.ProcessGroup | None, int]:
    """(patch, its context-parallel group, group size); size 1 when the model runs on one rank."""
    fn = patched(model)
    if fn is None or not fn.config.parallel:
        return fn, None, 1
    return fn, fn.group, fn.cp_size()


@torch.no_grad()
def next_token(model: torch.nn.Module, ids: list[int], *, pad_id: int = 0) -> int:
    """Greedy next token after ``ids`` (full recomputation, no cache; works under context parallelism).

    Under context parallelism the sequence is right-padded to the layout's multiple (causal attention:
    padding never reaches real tokens), the rank holding the last real token forms its logits, and the
    argmax is shared with an all-reduce.
    """
    fn, group, size = cp_group_of(model)
    hf = base_model(model)
    n = len(ids)
    x = torch.tensor([ids], dtype=torch.long, device=next(hf.parameters()).device)  # [1, n]
    if size > 1:
        x = pad_to_layout(x, layout=fn.config.layout, world_size=size, dim=1, value=pad_id)  # [1, n']
    batch = sharded_batch(x, fn=fn)
    if size > 1:
        prime_dynamic_rope(model, batch.seq_len, batch.positions)
    hidden = hf.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
    where = (batch.positions == n - 1).nonzero()
    token = torch.tensor([-1], dtype=torch.long)
    if where.numel():
        h = hidden[0, int(where[0, 0])]  # [D]
        token[0] = int(hf.get_output_embeddings()(h).argmax())
    if size > 1:
        dist.all_reduce(token, op=dist.ReduceOp.MAX, group=group)
    return int(token[0])


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, ids: list[int], n_new: int, *, pad_id: int = 0) -> list[int]:
    """``n_new`` greedily decoded tokens after ``ids``.

    One rank: transformers' ``generate`` with its KV cache (our attention handles Sq < Sk). Context
    parallelism: full recomputation per token (a cache is not sharded).
    """
    fn, _, size = cp_group_of(model)
    if size == 1:
        hf = base_model(model)
        x = torch.tensor([ids], dtype=torch.long, device=next(hf.parameters()).device)
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, pad_token_id=pad_id, eos_token_id=None)
        return [int(t) for t in out[0, len(ids):]]
    seq = list(ids)
    for _ in range(n_new):
        seq.append(next_token(model, seq, pad_id=pad_id))
    return seq[len(ids):]


class TextCodec:
    """Uniform encode/decode over a longreach ``Tokenizer`` or an HF tokenizer (no specials added)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.hf = not hasattr(tokenizer, "sp")

    def encode(self, text: str) -> list[int]:
        if self.hf:
            return list(self.tok.encode(text, add_special_tokens=False))
        return list(self.tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        if self.hf:
            return self.tok.decode(ids, skip_special_tokens=True)
        return self.tok.decode(ids)

    @property
    def pad_id(self) -> int:
        pid = getattr(self.tok, "pad_token_id" if self.hf else "pad_id", None)
        if pid is None and self.hf:
            pid = self.tok.eos_token_id
        return int(pid) if pid is not None else 0
