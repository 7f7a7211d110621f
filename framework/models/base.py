"""What longreach's decoders share: output weight, weight init, default positions and the loss head."""
from __future__ import annotations

import math

import torch
from torch import nn

from longreach.attention import AttentionContext


class DecoderLM(nn.Module):
    """Base of the decoder language models (``embed_tokens``, optional ``lm_head``, ``cfg``).

    Subclasses set :attr:`residual_out` (suffixes of the residual output projections) and call
    :meth:`_begin` / :meth:`_finish` around their layer stack.
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

    def _finish(self, h: torch.Tensor, labels: torch.Tensor | None, loss_chunk_size: int
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Collect the layers' auxiliary losses; return ``h`` or the chunked loss of the normalised ``h``."""
        self.aux_loss = collect_aux_loss(self)
        if labels is None:
            return h
        from longreach.loss import chunked_cross_entropy

        return chunked_cross_entropy(h, self.output_weight(), labels, chunk_size=loss_chunk_size)


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
