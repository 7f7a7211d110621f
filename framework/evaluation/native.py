"""Evaluation and decoding of longreach's own models (Llama, TransNormerLLM, MoE/MoH/BAM mixtures).

:class:`NativeLM` runs a model built by :func:`longreach.sources.load_model` on one rank, or under
context parallelism over every launched rank: ``parallelize`` swaps the attention seam exactly as in
training (ring / Ulysses / hybrid / all-gather for softmax layers, LASP for lightning layers), each
evaluated sequence is right-padded to the layout's multiple (causal: padding never reaches real tokens)
and sharded with the trainer's own :func:`~longreach.trainer.prepare_batch`.

Decoding is greedy. ``full`` recomputes the whole sequence per token (works under context parallelism);
``recurrent`` (TransNormerLLM without softmax layers, one rank) prefills with the chunked lightning kernel
(``return_state=True``) and then feeds one token at a time through
:func:`longreach.kernels.lightning.recurrent.decode_step`, carrying each layer's ``[B, H, D, E]`` state
— its tokens equal the full forward's.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from longreach.errors import UserError
from longreach.evaluation.perplexity import PerplexityResult, window_starts
from longreach.job import JobConfig, TrainConfig
from longreach.kernels import lightning_attention
from longreach.kernels.lightning.recurrent import decode_step
from longreach.parallel import pad_to_layout
from longreach.parallel.config import ParallelConfig
from longreach.parallel.layouts import layout_multiple
from longreach.engines import unwrap
from longreach.model_setup import build_inner_attention, cp_group, parallelize
from longreach.trainer import Batch, build_mesh, prepare_batch

IGNORE_INDEX = -100


class RecurrentSeam:
    """A lightning layer's ``linear_attention`` seam that keeps its state across calls.

    The first call (the prompt) runs the chunked kernel and keeps the final state; every later call
    takes one token and advances the state with the recurrent kernel.
    """

    def __init__(self, backend: str = "auto", chunk_size: int | None = None) -> None:
        self.backend, self.chunk_size = backend, chunk_size
        self.state: torch.Tensor | None = None  # [B, H, D, E]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                 cu_seqlens: object = None) -> torch.Tensor:
        """``cu_seqlens``: packed-document offsets of the prompt (the state kept is its last document's)."""
        if self.state is None:
            out, self.state = lightning_attention(q, k, v, decay, backend=self.backend, chunk_size=self.chunk_size,
                                                  initial_state=None, return_state=True,
                                                  cu_seqlens=cu_seqlens)  # [B, S, H, E]
            return out
        out, self.state = decode_step(q, k, v, decay, self.state)  # q [B, 1, H, D] -> [B, 1, H, E]
        return out


def supports_recurrent(model: nn.Module) -> bool:
    """True for a TransNormerLLM whose every token mixer is a lightning layer (no KV cache needed)."""
    layers = getattr(model, "layers", [])
    return bool(layers) and all(hasattr(layer, "token_mixer") and not getattr(layer, "softmax", False)
                                for layer in layers)


class NativeLM:
    """A longreach model prepared for evaluation (eval mode, no gradients).

    Args:
        model: the single-device model (``longreach.sources.load_model``).
        group: the context-parallel group (None: one rank).
        layout: sequence layout under context parallelism.
    """

    def __init__(self, model: nn.Module, *, group: dist.ProcessGroup | None = None, layout: str = "zigzag",
                 ensemble: int = 1) -> None:
        self.model, self.group, self.layout = model.eval(), group, layout
        self.size = dist.get_world_size(group) if group is not None else 1
        self.device = next(model.parameters()).device
        self.ensemble = ensemble
        """SSA self-ensemble passes of :meth:`loss` (1: one dense pass; the seams must hold SSA masks)."""

    @classmethod
    def build(cls, model: nn.Module, *, world: int, strategy: str = "ring", layout: str = "zigzag",
              ulysses_degree: int | None = None, linear_variant: str = "lasp2", attention: Any = None) -> "NativeLM":
        """Parallelize ``model`` over all ``world`` ranks (context parallelism only; ``world`` 1: as is).

        ``attention``: the job's ``attention:`` section when its SSA self-ensemble evaluation is wanted
        (``pattern: ssa``, ``eval_ensemble > 1``): the seams then get its masks and :meth:`loss` averages
        ``eval_ensemble`` subsampled passes.
        """
        ensemble = attention.eval_ensemble if attention is not None and attention.pattern == "ssa" else 1
        if world == 1:
            if ensemble > 1:
                for m in model.modules():
                    if hasattr(m, "inner_attention"):
                        m.inner_attention = build_inner_attention(attention, seq_len=model.cfg.max_seq_len)
            return cls(model, layout=layout, ensemble=ensemble)

        try:
            par = ParallelConfig(dp=1, cp=world, strategy=strategy, layout=layout, ulysses_degree=ulysses_degree,
                                 linear_variant=linear_variant)
        except ValueError as e:
            raise UserError(str(e)) from None
        job = JobConfig(model=model.cfg, parallel=par, train=TrainConfig(seq_len=layout_multiple(layout, world)),
                        **({"attention": attention} if ensemble > 1 else {}))
        mesh, _, _ = build_mesh(par, world, next(model.parameters()).device)
        model = parallelize(model, job, mesh)
        return cls(model, group=cp_group(mesh), layout=layout, ensemble=ensemble)

    def _shard(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[Any, ...]:
        """``ids [1, S]`` → this rank's (ids, positions, labels, ctx); padded to the layout multiple."""
        lab = labels if labels is not None else torch.full_like(ids, IGNORE_INDEX)
        if self.size > 1:
            ids = pad_to_layout(ids, layout=self.layout, world_size=self.size, dim=1, value=0)
            lab = pad_to_layout(lab, layout=self.layout, world_size=self.size, dim=1, value=IGNORE_INDEX)
        x, pos, lab_local, ctx = prepare_batch(Batch(input_ids=ids, labels=lab), layout=self.layout,
                                               group=self.group, step=0, device=self.device)
        return x, pos, lab_local, dataclasses.replace(ctx, training=False)

    @torch.no_grad()
    def loss(self, ids: torch.Tensor) -> float:
        """Mean next-token loss of ``ids [1, S]`` (one window; identical on every rank)."""
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)  # [1, S]
        x, pos, lab, ctx = self._shard(ids, labels)
        if self.ensemble > 1:  # SSA self-ensemble: mean probability of passes with fresh samples
            from longreach.ssa import ensemble_nll

            train_ctx = dataclasses.replace(ctx, training=True)
            loss_sum, n = ensemble_nll(lambda step: self.model(x, pos, dataclasses.replace(train_ctx, step=step)),
                                       unwrap(self.model).output_weight(), lab, self.ensemble)
        else:
            loss_sum, n = self.model(x, pos, ctx, labels=lab)
        tot = torch.stack([loss_sum.double().reshape(()), torch.as_tensor(n, dtype=torch.float64).reshape(())])
        if self.size > 1:
            dist.all_reduce(tot, group=self.group)
        return float(tot[0] / tot[1])

    @torch.no_grad()
    def last_logits(self, ids: list[int]) -> torch.Tensor:
        """``[V]`` logits after ``ids`` (full forward; under cp the rank holding the last token shares them)."""
        n = len(ids)
        x, pos, _, ctx = self._shard(torch.tensor([ids], dtype=torch.long))
        hidden = self.model(x, pos, ctx)  # [1, S_local, dim]
        weight = unwrap(self.model).output_weight()  # [V, dim]
        logits = torch.zeros(weight.shape[0], dtype=torch.float32, device=self.device)
        where = (ctx.positions == n - 1).nonzero()
        if where.numel():
            logits = (hidden[0, int(where[0, 0])] @ weight.t()).float()  # [V]
        if self.size > 1:
            dist.all_reduce(logits, group=self.group)  # one rank holds the token, the others add zeros
        return logits

    @torch.no_grad()
    def generate(self, ids: list[int], n_new: int, *, decode: str = "full", return_logits: bool = False
                 ) -> list[int] | tuple[list[int], list[torch.Tensor]]:
        """Greedy continuation of ``ids``.

        Args:
            ids: prompt token ids (at least one).
            n_new: tokens to generate.
            decode: ``full`` (recompute per token) or ``recurrent`` (lightning state carried, one rank).
            return_logits: also return the ``[V]`` logits of every step.
        """
        if not ids:
            raise UserError("the prompt is empty: give at least one token")
        if decode == "recurrent":
            return self._generate_recurrent(ids, n_new, return_logits)
        seq, steps = list(ids), []
        for _ in range(n_new):
            logits = self.last_logits(seq)
            steps.append(logits)
            seq.append(int(logits.argmax()))
        return (seq[len(ids):], steps) if return_logits else seq[len(ids):]

    def _generate_recurrent(self, ids: list[int], n_new: int, return_logits: bool
                            ) -> list[int] | tuple[list[int], list[torch.Tensor]]:
        model = unwrap(self.model)
        if self.size > 1 or not supports_recurrent(model):
            raise UserError("recurrent decoding needs a TransNormerLLM without softmax layers on one rank; "
                            "use --decode full")
        mixers = [layer.token_mixer for layer in model.layers]
        saved = [m.linear_attention for m in mixers]
        try:
            for m, seam in zip(mixers, saved):
                m.linear_attention = RecurrentSeam(getattr(seam, "backend", "auto"), getattr(seam, "chunk_size", None))
            weight = model.output_weight()  # [V, dim]
            x = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, n]
            pos = torch.arange(len(ids), device=self.device)[None]  # [1, n]
            out, steps = [], []
            for _ in range(n_new):
                hidden = model(x, pos)  # [1, s, dim]: the prompt, then one token per call
                logits = (hidden[0, -1] @ weight.t()).float()  # [V]
                steps.append(logits)
                out.append(int(logits.argmax()))
                x = torch.tensor([[out[-1]]], dtype=torch.long, device=self.device)  # [1, 1]
                pos = pos[:, -1:] + 1
            return (out, steps) if return_logits else out
        finally:
            for m, seam in zip(mixers, saved):
                m.linear_attention = seam


def native_perplexity(lm: NativeLM, tokens: np.ndarray, *, length: int, stride: int = 256,
                      max_windows: int | None = None) -> Any:
    """LongLoRA's windowed perplexity (:func:`longreach.evaluation.perplexity.perplexity`) of a NativeLM."""
    toks = torch.as_tensor(np.asarray(tokens), dtype=torch.long).reshape(-1)  # [N]
    losses = [lm.loss(toks[s:s + length][None]) for s in window_starts(toks.numel(), length, stride, max_windows)]
    mean = float(np.mean(losses))
    return PerplexityResult(length=length, stride=stride, windows=len(losses), mean_loss=mean, ppl=math.exp(mean))
