"""What longreach's decoders share: output weight, weight init, default positions and the loss head."""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
from torch import nn

from longreach.attention import AttentionContext
from longreach.loss import chunked_cross_entropy


class DecoderLM(nn.Module):
    """Base of the decoder language models (``embed_tokens``, optional ``lm_head``, ``cfg``).

    Subclasses set :attr:`residual_out` (suffixes of the residual output projections), ``rotary`` (a
    :class:`~longreach.models.rope.RotaryEmbedding`, or None without softmax attention) and implement
    :meth:`_blocks`, the layer stack; :meth:`forward` is shared.
    """

    #: parameter-name suffixes of residual output projections, scaled by 1/sqrt(2·n_layers) at init (GPT-2)
    residual_out: tuple[str, ...] = ()
    #: parameter-name suffixes left as constructed
    init_skip: tuple[str, ...] = ()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) matrices; residual output projections scaled by 1/sqrt(2·n_layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2 or (self.init_skip and name.endswith(self.init_skip)):
                continue
            scale = 1.0 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(self.residual_out) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def output_weight(self) -> torch.Tensor:
        """The ``[V, dim]`` output projection (the embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        ctx: AttentionContext | None = None,
        *,
        labels: torch.Tensor | None = None,
        loss_chunk_size: int = 1024,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder.

        Args:
            input_ids: ``[B, S_local]`` token ids (this rank's part of the sequence).
            position_ids: ``[B, S_local]`` positions RoPE (and LRPE) rotate by; None = ``ctx.positions``
                or 0..S-1.
            ctx: attention context (global length, global positions of the local tokens, documents, step).
            labels: ``[B, S_local]`` next-token targets already shifted on the global sequence
                (−100 = ignored). Given, the forward returns the chunked loss instead of the hidden states.
            loss_chunk_size: tokens per logits chunk of the loss.

        Returns:
            hidden ``[B, S_local, dim]``, or ``(loss_sum, n_tokens)`` (scalar float32 sum of token losses and
            the local count of non-ignored labels) when ``labels`` is given. ``self.aux_loss`` holds the sum
            of the layers' auxiliary losses (None if none).
        """
        ctx, position_ids = self._begin(input_ids, position_ids, ctx)
        s = input_ids.shape[1]
        h = self.embed_tokens(input_ids)  # [B, S, dim]
        rope = None
        if self.rotary is not None:
            rope = self.rotary(position_ids, ctx.seq_len if ctx.seq_len is not None else s,
                               dtype=torch.promote_types(h.dtype, torch.float32))  # cos, sin [B, S, hd/2]
        h, norm = self._blocks(h, position_ids, rope, ctx)  # [B, S, dim]
        return self._finish(h, labels, loss_chunk_size, norm=norm)

    def _blocks(self, h: torch.Tensor, position_ids: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None, ctx: AttentionContext
                ) -> tuple[torch.Tensor, nn.Module | None]:
        """The layer stack on the embeddings ``h [B, S, dim]``: ``(h, final norm)``, the norm None when
        already applied (else it runs inside the loss region, see :meth:`_finish`)."""
        raise NotImplementedError

    @staticmethod
    def _begin(input_ids: torch.Tensor, position_ids: torch.Tensor | None, ctx: AttentionContext | None
               ) -> tuple[AttentionContext, torch.Tensor]:
        """The context (default: one rank, no documents) and the position ids (default ``ctx.positions``)."""
        b, s = input_ids.shape
        ctx = ctx if ctx is not None else AttentionContext()
        if position_ids is None:
            pos = ctx.positions if ctx.positions is not None else torch.arange(s)
            position_ids = pos.to(input_ids.device).view(1, s).expand(b, s)
        return ctx, position_ids

    def _finish(self, h: torch.Tensor, labels: torch.Tensor | None, loss_chunk_size: int,
                norm: nn.Module | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Collect the layers' auxiliary losses; return ``norm(h)`` or the chunked loss of it.

        ``norm`` None: ``h`` is already normalised. When the final norm runs over sequence tiles
        (``model.sequence_tile``), norm and loss are one checkpointed region: only the last hidden state
        is kept for backward (not also the normalised copy the loss would save), at the price of one
        more pass of the chunked logits in backward.
        """
        self.aux_loss = collect_aux_loss(self)
        if labels is None:
            return norm(h) if norm is not None else h

        weight = self.output_weight()
        if norm is None:
            return chunked_cross_entropy(h, weight, labels, chunk_size=loss_chunk_size)
        if not getattr(norm, "sequence_tile", 0):
            return chunked_cross_entropy(norm(h), weight, labels, chunk_size=loss_chunk_size)
        return _checkpointed(lambda x: chunked_cross_entropy(norm(x), weight, labels, chunk_size=loss_chunk_size), h)


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the ``aux_loss`` tensors the model's submodules left after their forward (None if none)."""
    total = None
    for m in model.modules():
        if m is model:
            continue
        aux = getattr(m, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            total = aux if total is None else total + aux
    return total


# ------------------------------------------------------------------------------------ sequence tiling
def _checkpointed(fn, *args: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False)


def _tiled_forward(forward: Callable[..., torch.Tensor], tile: int, dim: int,
                   x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``forward(x)`` computed tile by tile along ``dim``, each tile recomputed in backward.

    Each tile runs under non-reentrant checkpointing, so it keeps only its input (a view of ``x``) for
    backward; the tile's intermediates (e.g. the ``[B, tile, ffn]`` SwiGLU product) live only while
    that tile runs, forward or backward. ``torch.split`` makes one backward node that concatenates
    the tiles' input gradients once.
    """
    if x.shape[dim] <= tile and not torch.is_grad_enabled():
        return forward(x, *args, **kwargs)
    step = (lambda t: forward(t, *args, **kwargs)) if args or kwargs else forward
    outs = [_checkpointed(step, t) for t in torch.split(x, tile, dim=dim)]
    return torch.cat(outs, dim=dim)


def _tiled_rows_forward(forward: Callable[..., torch.Tensor], tile: int, x: torch.Tensor, counts: list[int],
                        *args: Any) -> torch.Tensor:
    """Grouped-expert ``forward(x [M, D], counts, *args)`` over row tiles of at most ``tile`` rows.

    Row ``m`` belongs to the segment ``e`` with ``sum(counts[:e]) <= m < sum(counts[:e+1])``; a tile
    gets the counts of the segments' rows that fall in it, so every row meets the same expert.
    """
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + int(c))
    outs = []
    for start in range(0, x.shape[0], tile):
        stop = min(start + tile, x.shape[0])
        part = [max(0, min(stop, hi) - max(start, lo)) for lo, hi in zip(bounds[:-1], bounds[1:])]
        outs.append(_checkpointed(lambda t, part=part: forward(t, part, *args), x[start:stop]))
    if not outs:
        return forward(x, counts, *args)
    return torch.cat(outs)  # [M, D]


def tile_sequence(module: nn.Module, tile_tokens: int, *, dim: int = 1) -> nn.Module:
    """Make a token-wise module (MLP, norm) run over sequence tiles, recomputing each tile in backward.

    The module is patched in place (its ``forward`` is replaced on the instance), so parameter names,
    state dicts and hooks are unchanged. Its first argument ``x [B, S, ...]`` is split along ``dim``
    into tiles of ``tile_tokens``; outputs, losses and gradients equal the untiled module's, while its
    intermediates (``[B, tile, ffn]`` instead of ``[B, S, ffn]`` for a SwiGLU MLP) never exist whole.
    Works for any module that treats tokens independently (not for a router whose balance term needs
    the whole sequence: tile its experts with :func:`tile_experts`).

    Returns:
        ``module`` itself.
    """
    if tile_tokens < 1:
        raise ValueError(f"tile_tokens must be >= 1, got {tile_tokens}")
    forward = type(module).forward.__get__(module)
    module.forward = functools.partial(_tiled_forward, forward, tile_tokens, dim)  # type: ignore[method-assign]
    module.sequence_tile = tile_tokens
    return module


def tile_experts(experts: nn.Module, tile_tokens: int) -> nn.Module:
    """Tile a grouped-expert module ``forward(x [M, D], counts, *args) -> [M, D]`` over rows of ``x``.

    The hook for mixtures of experts: routing (and its balance loss) still sees the whole sequence;
    only the experts' ``[rows, ffn]`` intermediates are computed ``tile_tokens`` rows at a time and
    recomputed in backward. Patched in place like :func:`tile_sequence`.
    """
    if tile_tokens < 1:
        raise ValueError(f"tile_tokens must be >= 1, got {tile_tokens}")
    forward = type(experts).forward.__get__(experts)
    experts.forward = functools.partial(_tiled_rows_forward, forward, tile_tokens)  # type: ignore[method-assign]
    experts.sequence_tile = tile_tokens
    return experts
