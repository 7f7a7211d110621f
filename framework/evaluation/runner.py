"""Open any model source for evaluation or generation, on one rank or under context parallelism.

:func:`open_model` is what ``longreach eval`` and ``longreach generate`` share: it resolves the source
(:mod:`longreach.sources`), joins the launched ranks, and gives one interface over the two model
families — an HF folder runs through transformers with longreach attention patched in
(:mod:`longreach.hf.patch`), everything longreach wrote (run folder, ``step-N``, export) runs as our own
model (:class:`~longreach.evaluation.native.NativeLM`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from longreach.attention import AttentionConfig
from longreach.configio import from_dict
from longreach.errors import UserError
from longreach.evaluation.common import greedy_decode
from longreach.evaluation.native import NativeLM, native_perplexity
from longreach.evaluation.perplexity import perplexity
from longreach.hf.load import load_hf
from longreach.hf.patch import AttentionPatch, patch_attention
from longreach.parallel.config import STRATEGIES
from longreach.sources import load_model, load_tokenizer, resolve_source
from longreach.trainer import setup_distributed


@dataclass
class OpenModel:
    """A model ready to evaluate: ``hf`` (a patched transformers model) or ``native`` (a NativeLM)."""

    source: Any
    tokenizer: Any
    rank: int
    world: int
    owned: bool
    hf: Any = None
    native: Any = None
    notes: list[str] = field(default_factory=list)

    def max_positions(self) -> int:
        """The longest context the model was built for (HF ``max_position_embeddings``, ours ``max_seq_len``
        times a RoPE scaling factor)."""
        if self.hf is not None:
            return int(self.hf.config.max_position_embeddings)
        cfg = self.native.model.cfg if hasattr(self.native.model, "cfg") else self.source.model_config()
        factor = float((cfg.rope_scaling or {}).get("factor", 1.0))
        return int(round(cfg.max_seq_len * max(factor, 1.0)))

    def decode(self, ids: list[int], n_new: int, *, pad_id: int = 0, decode: str = "full") -> list[int]:
        """Greedy continuation (identical on every rank)."""
        if self.hf is not None:
            if decode == "recurrent":
                raise UserError("recurrent decoding is for TransNormerLLM sources; this is an HF model")

            return greedy_decode(self.hf, ids, n_new, pad_id=pad_id)
        return self.native.generate(ids, n_new, decode=decode)

    def perplexity(self, tokens: np.ndarray, *, length: int, stride: int, max_windows: int | None) -> Any:
        if self.hf is not None:
            return perplexity(self.hf, tokens, length=length, stride=stride, max_windows=max_windows)

        return native_perplexity(self.native, tokens, length=length, stride=stride, max_windows=max_windows)

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def open_model(source: str, *, strategy: str = "none", layout: str = "zigzag", ulysses_degree: int | None = None,
               backend: str = "auto", dtype: str = "auto", linear_variant: str = "lasp2") -> OpenModel:
    """Resolve ``source``, join the launched ranks, load and (under cp) parallelize the model.

    Args:
        source: run folder, ``step-N`` checkpoint, export or HF folder.
        strategy: context-parallel strategy over all launched ranks (``none`` on one rank).
        layout, ulysses_degree, backend, linear_variant: context parallelism and the local kernel.
        dtype: ``auto`` (HF: bf16 on GPU, fp32 on CPU; ours: the source's), or a torch dtype name.

    Raises:
        UserError: an unreadable source, or several ranks with ``strategy`` none.
    """
    src = resolve_source(source)
    rank, world, device, owned = setup_distributed()
    if world > 1 and strategy == "none":
        raise UserError(f"{world} ranks were launched but --strategy is none: choose one of {', '.join(STRATEGIES)}")
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    opened = OpenModel(source=src, tokenizer=None, rank=rank, world=world, owned=owned)
    if src.is_hf:
        model, tokenizer = load_hf(src.path, dtype=torch_dtype, device=device)
        patch_attention(model, AttentionPatch(pattern="full", strategy=strategy, layout=layout,
                                              ulysses_degree=ulysses_degree, backend=backend))
        opened.hf, opened.tokenizer = model, tokenizer
    else:
        model = load_model(src, device=device, dtype=torch_dtype)
        attention = _ssa_ensemble(src)
        opened.native = NativeLM.build(model, world=world, strategy=strategy if strategy != "none" else "ring",
                                       layout=layout, ulysses_degree=ulysses_degree, linear_variant=linear_variant,
                                       attention=attention)
        if attention is not None:
            opened.notes.append(f"SSA self-ensemble evaluation: {attention.eval_ensemble} subsampled passes "
                                "(attention.eval_ensemble)")
        opened.tokenizer = load_tokenizer(src)
    if rank == 0:
        print(f"loaded {src.describe()}" + (f" on {world} ranks ({strategy}, {layout})" if world > 1 else "")
              + "".join(f"; {n}" for n in opened.notes), flush=True)
    return opened


def _ssa_ensemble(src: Any) -> Any:
    """The source's ``attention:`` section when it asks for SSA self-ensemble evaluation, else None."""
    section = (src.config or {}).get("attention")
    if not isinstance(section, dict) or section.get("pattern") != "ssa" or int(section.get("eval_ensemble", 1)) <= 1:
        return None
    return from_dict(AttentionConfig, section, source=f"{src.describe()}: attention")
