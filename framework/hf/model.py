"""An HF causal LM behind longreach's model interface, so the shared trainer fine-tunes it.

:class:`HFCausalLM` wraps a (patched, possibly peft-wrapped) transformers causal LM and offers what the
trainer and ``parallelize`` expect of our own models:

* ``forward(input_ids, position_ids, ctx, labels=, loss_chunk_size=)`` → ``(loss_sum, n_tokens)`` with
  our chunked cross-entropy on the decoder's hidden states and the ``lm_head`` weight (labels shifted on
  the global sequence before sharding, by the caller); without labels, the hidden states;
* ``output_weight()`` (``[V, hidden]``) and ``aux_loss`` (always None);
* ``inner_attention``: the seam ``parallelize`` swaps. Assigning it installs the given
  :class:`~longreach.attention.LocalAttention` / :class:`~longreach.attention.ContextParallelAttention`
  into the function registered with transformers' ``AttentionInterface`` (:mod:`longreach.hf.patch`);
  the trainer's :class:`~longreach.attention.AttentionContext` (step, global length, positions) reaches
  every attention layer as the ``longreach_ctx`` keyword that transformers forwards;
* ``layers``: the decoder blocks, which ``train.activation_checkpointing`` wraps.

:func:`build_hf_model` is the trainer's model builder for ``longreach finetune``: load the local
checkpoint, apply the recipe (RoPE scaling, LoRA / SinkLoRA / full, trainable embeddings and norms),
patch attention, wrap.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from longreach.attention import AttentionContext
from longreach.hf.load import default_dtype, load_hf
from longreach.hf.patch import AttentionPatch, HFAttention, base_model, prime_dynamic_rope
from longreach.hf.recipes import apply_recipe
from longreach.loss import chunked_cross_entropy

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class HFCausalLM(nn.Module):
    """A transformers causal LM with longreach's model interface (module docstring).

    Args:
        model: the HF causal LM or a peft ``PeftModel`` around one, already patched.
        attention: its registered :class:`HFAttention`.
    """

    def __init__(self, model: nn.Module, attention: HFAttention) -> None:
        super().__init__()
        self.model = model
        self.attention = attention
        self.aux_loss: torch.Tensor | None = None

    # --- the parallelize seam --------------------------------------------------------------------
    @property
    def inner_attention(self) -> Any:
        return self.attention.inner

    @inner_attention.setter
    def inner_attention(self, fn: Any) -> None:
        self.attention.set_inner(fn)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks (``parallelize`` wraps them for activation checkpointing)."""
        return self.hf.get_decoder().layers

    # --- model interface -------------------------------------------------------------------------
    @property
    def hf(self) -> nn.Module:
        """The HF ``PreTrainedModel`` (under the peft wrapper for LoRA recipes)."""
        return base_model(self.model)

    def output_weight(self) -> torch.Tensor:
        """The output projection ``[V, hidden]`` (``lm_head``)."""
        return self.hf.get_output_embeddings().weight

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                ctx: AttentionContext | None = None, *, labels: torch.Tensor | None = None,
                loss_chunk_size: int = 1024) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Hidden states, or the summed token loss.

        Args:
            input_ids: ``[B, S_local]`` this rank's tokens (in the cp layout's order).
            position_ids: ``[B, S_local]`` their global RoPE positions (None: 0..S_local-1).
            ctx: the attention context (global length, positions of the local tokens, step).
            labels: ``[B, S_local]`` next-token labels shifted on the global sequence (-100 ignored).
            loss_chunk_size: tokens per logits chunk of the loss.

        Returns:
            ``[B, S_local, hidden]`` without labels; else ``(loss_sum, n_tokens)``: this rank's summed
            token loss (float32 scalar) and its count of labelled tokens.
        """
        if ctx is not None and self.attention.config.parallel and ctx.positions is not None:
            prime_dynamic_rope(self.model, int(ctx.seq_len), ctx.positions)
        kwargs = {} if ctx is None else {"longreach_ctx": ctx}
        # no KV cache in training: it would only cost memory, and a recomputed (activation-checkpointed)
        # block would append its keys to it a second time
        hidden = self.hf.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                       **kwargs).last_hidden_state  # [B, S_local, hidden]
        if labels is None:
            return hidden
        return chunked_cross_entropy(hidden, self.output_weight(), labels, chunk_size=loss_chunk_size,
                                     ignore_index=IGNORE_INDEX)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``hf.dtype``: ``auto`` (bf16 on an accelerator, fp32 on CPU) or a torch dtype name."""
    return default_dtype(device) if name == "auto" else getattr(torch, name)


def build_hf_model(cfg: Any, device: torch.device) -> HFCausalLM:
    """The trainer's model builder for a fine-tuning job (``longreach.hf.config.FinetuneConfig``).

    Loads ``cfg.hf.path`` once in ``cfg.hf.dtype`` on ``device``, applies ``cfg.recipe`` and patches
    attention (local until ``parallelize`` installs the configured inner attention). Call it after
    seeding: LoRA initialisation draws from torch's generator, identically on every rank.
    """
    model, _ = load_hf(cfg.hf.path, dtype=resolve_dtype(cfg.hf.dtype, device), device=device,
                       trust_remote_code=cfg.hf.trust_remote_code, with_tokenizer=False)
    att = cfg.attention
    # what the patch reports (evaluation helpers read it); parallelize installs the inner attention itself
    pattern, variant = {"s2": ("s2", "varlen"), "s2_roll": ("s2", "roll"), "sf": ("sf", "varlen")}.get(
        att.pattern, ("full", "varlen"))
    patch = AttentionPatch(pattern=pattern, s2_variant=variant, sinks=att.sinks, backend=att.backend)
    model, attention = apply_recipe(model, cfg.recipe, attention=patch)
    keep_master_weights(model, pure_bf16=getattr(cfg.hf, "pure_bf16", False))
    model.train()
    return HFCausalLM(model, attention)


def keep_master_weights(model: nn.Module, *, pure_bf16: bool = False) -> list[str]:
    """Upcast trainable bf16/fp16 parameters to fp32 in place (the master weights; frozen ones stay).

    The optimizer then keeps fp32 state and applies updates in fp32; compute stays in bf16 under
    autocast or the engine's mixed precision. Parameters are converted in place (``.data``), so tied
    weights stay tied.

    Args:
        model: the model after the recipe marked its trainable parameters.
        pure_bf16: keep them as they are (``hf.pure_bf16``): logged as a warning.

    Returns:
        The names of the low-precision trainable parameters (upcast unless ``pure_bf16``).
    """
    low = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    if pure_bf16:
        if low:
            log.warning("hf.pure_bf16: %d trainable parameters (%s, ...) and their optimizer state stay in %s: "
                        "updates below ~1/256 of a weight are lost (at lr 2e-5 norm weights do not move)",
                        len(low), low[0][0], low[0][1].dtype)
        return [n for n, _ in low]
    for _, p in low:
        p.data = p.data.float()
    return [n for n, _ in low]
