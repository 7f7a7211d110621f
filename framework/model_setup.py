"""Prepare a model written for one device for a parallel job: small ``apply_*`` steps in a fixed order.

:func:`parallelize` runs them in this order (torchtitan's ``parallelize.py`` recipe); the order matters
because every later step copies or hides the module tree the earlier ones changed:

1. :func:`~longreach.mixtures.expert_parallel.apply_expert_parallel` — MoE layers with
   ``model.moe.expert_parallel`` under cp > 1 keep only this rank's ``E / cp`` experts (an engine that
   cannot reduce split experts itself, :meth:`~longreach.engines.EngineConfig.splits_experts`, is a
   ConfigError); before the optimizer exists, so it only ever holds this rank's experts.
2. :func:`apply_attention_seam` — every module with an ``inner_attention`` gets the configured inner
   attention (local, or context-parallel through ``longreach.parallel.cp_attention``), and every module
   with a ``parallelize_context(cp_group, parallel_cfg)`` hook (linear-attention layers, MoE layers left
   in their replicated-parameter mode) swaps its own seam; the layers split in step 1 are skipped.
3. :func:`apply_sequence_tiling` (``model.sequence_tile``) — each block's MLP (or MoE experts) and norms
   run over token tiles recomputed in backward; inside the block, so step 4 recomputes the tiled block.
4. :func:`apply_activation_checkpointing` — each decoder block is recomputed in backward, rerunning the
   already-swapped (possibly context-parallel) attention; with ``model.checkpoint_offload`` the block
   inputs it keeps wait in pinned host memory (:class:`CheckpointOffload`).

Data parallelism is not applied here: the engine (``longreach.engines``: DDP, FSDP2, DeepSpeed,
accelerate) wraps the returned model, over the whole dp × cp group.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.checkpoint import checkpoint

from longreach.attention import ContextParallelAttention, LocalAttention, pattern_masks
from longreach.engines.base import as_engine_config
from longreach.errors import UserError
from longreach.mixtures.expert_parallel import apply_expert_parallel, expert_parallel_layers, rename_expert_parameters
from longreach.models.base import tile_experts, tile_sequence
from longreach.parallel.comm import CPGroup
from longreach.parallel.mesh import ParallelDims

log = logging.getLogger(__name__)

__all__ = ["CheckpointOffload", "apply_activation_checkpointing", "apply_attention_seam", "apply_sequence_tiling",
           "build_inner_attention", "cp_group", "decoder_layers", "dp_cp_group", "parallelize"]


def cp_group(mesh: Any) -> dist.ProcessGroup | None:
    """The context-parallel process group of ``mesh`` (None without a mesh or with cp = 1)."""
    return ParallelDims.get_group(mesh, "cp")


def dp_cp_group(mesh: Any) -> dist.ProcessGroup | None:
    """The group that replicates parameters: all of dp × cp (None: single process)."""
    return ParallelDims.get_group(mesh, "dp_cp")


def build_inner_attention(attention: Any, *, seq_len: int, group: dist.ProcessGroup | CPGroup | None = None,
                          strategy: str = "ring", layout: str = "zigzag", ulysses_degree: int | None = None,
                          backend: str = "auto") -> LocalAttention:
    """The inner attention of softmax layers: the one place a pattern becomes a local or cp callable.

    Used by :func:`parallelize` for our models and by the HF patch (``longreach.hf.patch``), so both
    run the same :class:`LocalAttention` / :class:`ContextParallelAttention` on the same masks.

    Args:
        attention: the ``attention:`` section (:class:`~longreach.attention.AttentionConfig`).
        seq_len: global training sequence length (S2/SF default group size N/4).
        group: the context-parallel group, or its :class:`~longreach.parallel.comm.CPGroup` with the hybrid
            strategy's Ulysses sub-group (None: one rank, local attention).
        strategy, layout, ulysses_degree: context parallelism (``parallel:`` section), used with a group.
        backend: local backend inside the cp strategy (``auto``: ``attention.backend``).
    """
    mask, train_mask = pattern_masks(attention, seq_len)
    if group is None:
        return LocalAttention(attention.backend, train_mask=train_mask, mask=mask)
    return ContextParallelAttention(strategy=strategy, layout=layout, group=group, ulysses_degree=ulysses_degree,
                                    backend=backend if backend != "auto" else attention.backend,
                                    train_mask=train_mask, mask=mask)


def apply_attention_seam(model: nn.Module, job_cfg: Any, mesh: Any, *, skip: Sequence[nn.Module] = ()) -> None:
    """Step 2: install the configured inner attention in every seam (``skip``: MoE layers already split)."""
    group = cp_group(mesh)
    par = job_cfg.parallel
    inner = build_inner_attention(job_cfg.attention, seq_len=job_cfg.train.seq_len,
                                  group=ParallelDims.cp_groups(mesh), strategy=par.strategy, layout=par.layout,
                                  ulysses_degree=par.ulysses_degree)
    swapped = hooked = 0
    for module in model.modules():
        hook = getattr(module, "parallelize_context", None)
        if any(module is m for m in skip):
            continue  # already sharded for real; its hook would ask for the replicated-parameter mode
        if callable(hook):
            hook(group, par)
            hooked += 1
        elif hasattr(module, "inner_attention"):
            module.inner_attention = inner
            swapped += 1
    log.info("parallelize: %d attention seams -> %s%s", swapped,
             "local" if group is None else f"cp={dist.get_world_size(group)} {par.strategy}/{par.layout}",
             f", {hooked} modules through parallelize_context" if hooked else "")


def parallelize(model: nn.Module, job_cfg: Any, mesh: Any) -> nn.Module:
    """Apply expert parallelism, the attention seam, sequence tiling and activation checkpointing, in order.

    Args:
        model: a model built for one device (``longreach.models.build_model``), already on its device.
        job_cfg: the :class:`~longreach.job.JobConfig` (reads ``attention``, ``parallel``, ``train``, the
            memory settings of ``model`` — or of ``train`` for HF fine-tuning configs — and ``engine``).
        mesh: DeviceMesh with dims ("dp", "cp") (:class:`~longreach.parallel.mesh.ParallelDims`), or None
            for a single process.

    Returns:
        The same module, changed in place; the engine (``longreach.engines.build_engine``) wraps it for
        data parallelism.
    """
    group = cp_group(mesh)
    engine = as_engine_config(getattr(job_cfg, "engine", None) or "native")
    train = getattr(job_cfg, "train", None)
    engine = engine.with_precision(getattr(train, "precision", None) or "fp32")  # the engine computes in it
    split = group is not None and bool(expert_parallel_layers(model))
    if split:  # never hold every expert on every rank silently
        engine.require_expert_split()
    ep_layers = apply_expert_parallel(model, mesh, group) if split else []  # 1
    apply_attention_seam(model, job_cfg, mesh, skip=ep_layers)  # 2
    # HF fine-tuning jobs have no model section: their train section holds sequence_tile / checkpoint_offload
    section = "model" if getattr(job_cfg, "model", None) is not None else "train"
    memory_cfg = getattr(job_cfg, section)
    apply_sequence_tiling(model, getattr(memory_cfg, "sequence_tile", 0))  # 3
    offload = bool(getattr(memory_cfg, "checkpoint_offload", False))
    if offload and not job_cfg.train.activation_checkpointing:
        raise UserError(f"{section}.checkpoint_offload moves the checkpointed block inputs to host memory: it "
                        "needs train.activation_checkpointing=true")
    if job_cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model, offload=CheckpointOffload() if offload else None)  # 4
    rename_expert_parameters(model)  # after checkpointing: the names DDP and checkpoints see
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder blocks: ``model.layers`` (longreach models) or ``model.model.layers`` (HF causal LMs)."""
    for owner in (model, getattr(model, "model", None)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    return None


def apply_sequence_tiling(model: nn.Module, tile_tokens: int) -> int:
    """Tile every block's MLP (or its MoE experts) and RMSNorms over ``tile_tokens``-token tiles.

    Blocks are found as :func:`decoder_layers`; inside each, ``mlp`` is tiled along the sequence
    (:func:`longreach.models.base.tile_sequence`), except a mixture of experts (an ``mlp`` with an
    ``experts`` submodule), whose router keeps the whole sequence and whose experts are tiled over rows
    (:func:`~longreach.models.base.tile_experts`); ``input_layernorm`` / ``post_attention_layernorm``
    are tiled too, and so is the final ``norm`` (which our decoders then checkpoint together with the
    loss). HF Llama-style decoders use the same names (their final norm is the decoder's, found through
    ``model.hf.get_decoder()``). Returns the number of modules tiled.
    """
    if tile_tokens <= 0:
        return 0
    layers = decoder_layers(model)
    if layers is None:
        raise UserError("model.sequence_tile needs a model with a `layers` ModuleList of decoder blocks")
    n = 0
    for block in layers:
        block = getattr(block, "_checkpoint_wrapped_module", block)
        mlp = getattr(block, "mlp", None)
        experts = getattr(mlp, "experts", None)
        if isinstance(experts, nn.Module):
            tile_experts(experts, tile_tokens)
            n += 1
        elif isinstance(mlp, nn.Module):
            tile_sequence(mlp, tile_tokens)
            n += 1
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(block, name, None)
            if isinstance(norm, nn.Module):
                tile_sequence(norm, tile_tokens)
                n += 1
    hf_decoder = getattr(getattr(model, "hf", None), "get_decoder", None)  # an HF model (longreach.hf.model)
    owners = (model, getattr(model, "model", None), hf_decoder() if callable(hf_decoder) else None)
    final = next((m for m in (getattr(o, "norm", None) for o in owners) if isinstance(m, nn.Module)), None)
    if final is not None:  # the model checkpoints it together with the loss (DecoderLM._finish)
        tile_sequence(final, tile_tokens)
        n += 1
    log.info("parallelize: %d MLP/expert/norm modules run over %d-token tiles (recomputed in backward)", n,
             tile_tokens)
    return n


class CheckpointOffload:
    """Checkpointed block inputs kept in host memory between forward and backward.

    Used as the ``checkpoint_fn`` of each block's checkpoint wrapper: the block runs under non-reentrant
    checkpointing inside a ``saved_tensors_hooks`` pair that sees only what the checkpoint itself saves —
    the block's inputs (the recomputed interior has its own hooks). Inputs that require grad (the hidden
    state; not the shared, constant RoPE tables) are copied to pinned host memory on a side stream and
    the device copy is released; in backward, unpacking block i's input first starts the copy back of
    block i−1's (the next one autograd needs) on the side stream, so it overlaps block i's recompute.
    On CPU the "host" copy is a plain copy: the path, its exactness and its byte counts are the same.

    Attributes:
        bytes_offloaded: bytes moved to host since construction (forward).
        bytes_restored: bytes brought back (backward).
        prefetched: restores that were started ahead of their use.
    """

    def __init__(self) -> None:
        self.bytes_offloaded = 0
        self.bytes_restored = 0
        self.prefetched = 0
        self.observer: Any = None
        """Called with each saved input that stays on the device (a saved-bytes meter sets it)."""
        self._last: Any = None  # weak reference to the newest packed input (the chain for prefetching)
        self._stream: Any = None

    def _side_stream(self, device: torch.device) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _pack(self, t: torch.Tensor) -> Any:
        if not t.requires_grad or isinstance(t, nn.Parameter) or t.numel() == 0:
            if self.observer is not None:
                self.observer(t)
            return t
        entry = _Offloaded(device=t.device, prev=self._last)
        if t.is_cuda:
            side = self._side_stream(t.device)
            side.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(side):
                entry.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                entry.host.copy_(t, non_blocking=True)
                entry.ready = torch.cuda.Event()
                entry.ready.record(side)
            t.record_stream(side)  # the allocator must not reuse t's memory before the copy ends
        else:
            entry.host = t.detach().clone()
        self.bytes_offloaded += t.numel() * t.element_size()
        self._last = weakref.ref(entry)
        return entry

    def _fetch(self, entry: "_Offloaded") -> None:
        """Start bringing ``entry`` back to its device (side stream on CUDA)."""
        if entry.back is not None or entry.host is None:
            return
        if entry.device.type == "cuda":
            side = self._side_stream(entry.device)
            with torch.cuda.stream(side):
                if entry.ready is not None:
                    side.wait_event(entry.ready)
                entry.back = entry.host.to(entry.device, non_blocking=True)
                entry.ready = torch.cuda.Event()
                entry.ready.record(side)
        else:
            entry.back = entry.host.clone()
        self.bytes_restored += entry.back.numel() * entry.back.element_size()

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Offloaded):
            return packed
        if packed.back is not None:
            self.prefetched += 1
        self._fetch(packed)
        prev = packed.prev() if packed.prev is not None else None
        if prev is not None:
            self._fetch(prev)  # overlaps this block's recompute and backward
        out = packed.back
        if packed.device.type == "cuda":
            torch.cuda.current_stream(packed.device).wait_event(packed.ready)
            out.record_stream(torch.cuda.current_stream(packed.device))
        packed.host = packed.back = None  # unpacked once per backward (non-reentrant checkpoint)
        return out

    def checkpoint(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)`` with the inputs offloaded."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)


@dataclasses.dataclass(slots=True, eq=False, weakref_slot=True)
class _Offloaded:
    """One offloaded tensor: its host copy, the copy brought back, and the previous entry (weakly)."""

    device: torch.device
    prev: Any = None
    host: torch.Tensor | None = None
    back: torch.Tensor | None = None
    ready: Any = None


def apply_activation_checkpointing(model: nn.Module, *, offload: CheckpointOffload | None = None) -> None:
    """Wrap each decoder block in non-reentrant activation checkpointing (inputs offloaded with ``offload``)."""
    layers = decoder_layers(model)
    if layers is None:
        raise ValueError("train.activation_checkpointing needs a model with a `layers` ModuleList")
    kw: dict[str, Any] = {"checkpoint_fn": offload.checkpoint} if offload is not None else {}
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kw)
    model.checkpoint_offload = offload  # the bench reads its byte counts
