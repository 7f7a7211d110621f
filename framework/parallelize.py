"""Apply parallelism to a model written for one device, in a fixed order (torchtitan's recipe).

1. **Attention seam first**: every module with an ``inner_attention`` gets the configured inner attention
   (local, or context-parallel through ``longreach.parallel.cp_attention``), and every module with a
   ``parallelize_context(cp_group, parallel_cfg)`` hook (linear-attention layers, custom layers) is
   called to swap its own seam. This must come before the wrappers below: they copy or hide the module
   tree, and a wrapper applied first would checkpoint / replicate the old callable.
   Then **sequence tiling** (``model.sequence_tile``): each block's MLP (or MoE experts) and norms run
   over token tiles recomputed in backward (:func:`apply_sequence_tiling`), inside the block so that the
   checkpoint below recomputes the tiled block.
2. **Activation checkpointing** wraps each decoder block, so recomputation in backward reruns the
   already-swapped (possibly context-parallel) attention. With ``model.checkpoint_offload`` the block
   inputs it keeps wait in pinned host memory (:class:`CheckpointOffload`).
3. **DDP last**, over the whole dp × cp group: parameters are replicated on every cp rank too, so their
   gradients are reduced across both. Gradients are *summed* (not averaged): the trainer divides each
   rank's summed token loss by the global count of non-ignored tokens, so the sum over ranks of the local
   gradients is exactly the gradient of the global mean loss, whatever the token counts per rank.

**Expert parallelism** (MoE layers with ``model.moe.expert_parallel`` under cp > 1) happens in step 1,
before any wrapper and before the trainer builds its optimizer: ``longreach.mixtures.shard_experts`` over
the **cp** group keeps only this rank's ``E / cp`` experts (parameters and, later, optimizer state). The
expert parameters are left out of DDP (``_set_params_and_buffers_to_ignore_for_model``); the ranks that
hold the *same* experts are the ranks with the same cp coordinate, i.e. the **dp** dimension of the mesh,
and :func:`reduce_expert_gradients` SUM-reduces expert gradients over that group (every dp replica's tokens
reach its own copy of the expert through the all-to-all, so the sum is the exact gradient).
:func:`clip_grad_norm` then adds each expert's squared norm once (a sum over the cp group) to the
replicated parameters' one. For checkpoints, expert weights and their optimizer state appear in
``state_dict()`` as DTensors sharded ``Shard(0)`` over the cp mesh dimension (:func:`expert_optimizer_hooks`
does it for the optimizer), so torch.distributed.checkpoint writes each rank's experts under the one
global key and can load them on another layout (another cp size, or no expert parallelism at all).
Under FSDP2 (``engine.kind=native`` with ``engine.options.fsdp``) the experts are split the same way: the
cp dimension is the expert mesh dimension, ``fully_shard`` leaves the expert parameters out of its
sharding (``ignored_params``) and FSDP2-shards the rest over dp × cp, and the engine SUM-reduces expert
gradients over the dp dimension before clipping (:mod:`longreach.engines.native`); checkpoints hold the
same ``Shard(0)`` DTensors, so they load on any other layout. Under DeepSpeed ZeRO 1/2 in fp32
(:func:`longreach.engines.deepspeed.splits_experts`) they are split too: DeepSpeed shards the dense part
and the engine steps the experts beside it (:class:`longreach.engines.deepspeed.DeepSpeedEngine`).
Otherwise (other ZeRO stages or precisions, accelerate) experts stay in the layer's own
*replicated-parameter* mode: each rank computes only its experts but holds all of them.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longreach.attention import ContextParallelAttention, LocalAttention, pattern_masks
from longreach.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["CheckpointOffload", "ExpertShards", "apply_activation_checkpointing", "apply_sequence_tiling",
           "build_inner_attention", "clip_grad_norm", "cp_group", "decoder_layers", "dp_cp_group",
           "expert_optimizer_hooks", "expert_shards", "parallelize", "reduce_expert_gradients", "unwrap"]

_SHARDS_ATTR = "_longreach_expert_shards"


def cp_group(mesh: Any) -> dist.ProcessGroup | None:
    """The context-parallel process group of ``mesh`` (None without a mesh or with cp = 1)."""
    if mesh is None:
        return None
    sub = mesh["cp"]  # a mesh dimension, or the flattened (cp_ring, cp_ulysses) of the hybrid strategy
    return None if sub.size() == 1 else sub.get_group()


def dp_cp_group(mesh: Any) -> dist.ProcessGroup | None:
    """The group that replicates parameters: all of dp × cp (None: single process)."""
    if mesh is None or not dist.is_initialized():
        return None
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    return mesh._flatten("dp_cp").get_group()


def _sum_allreduce_hook(group, bucket):  # no annotations: DDP checks them against the real classes
    """DDP comm hook: all-reduce SUM of the bucket (DDP's default divides by the group size)."""
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def build_inner_attention(attention: Any, *, seq_len: int, group: dist.ProcessGroup | None = None,
                          strategy: str = "ring", layout: str = "zigzag", ulysses_degree: int | None = None,
                          backend: str = "auto") -> LocalAttention:
    """The inner attention of softmax layers: the one place a pattern becomes a local or cp callable.

    Used by :func:`parallelize` for our models and by the HF patch (``longreach.hf.patch``), so both
    run the same :class:`LocalAttention` / :class:`ContextParallelAttention` on the same masks.

    Args:
        attention: the ``attention:`` section (:class:`~longreach.attention.AttentionConfig`).
        seq_len: global training sequence length (S2/SF default group size N/4).
        group: the context-parallel group (None: one rank, local attention).
        strategy, layout, ulysses_degree: context parallelism (``parallel:`` section), used with a group.
        backend: local backend inside the cp strategy (``auto``: ``attention.backend``).
    """
    mask, train_mask = pattern_masks(attention, seq_len)
    if group is None:
        return LocalAttention(attention.backend, train_mask=train_mask, mask=mask)
    return ContextParallelAttention(strategy=strategy, layout=layout, group=group, ulysses_degree=ulysses_degree,
                                    backend=backend if backend != "auto" else attention.backend,
                                    train_mask=train_mask, mask=mask)


def _inner_attention(job_cfg: Any, mesh: Any) -> LocalAttention:
    par = job_cfg.parallel
    return build_inner_attention(job_cfg.attention, seq_len=job_cfg.train.seq_len, group=cp_group(mesh),
                                 strategy=par.strategy, layout=par.layout, ulysses_degree=par.ulysses_degree)


def parallelize(model: nn.Module, job_cfg: Any, mesh: Any, *, data_parallel: bool = True) -> nn.Module:
    """Swap attention, apply activation checkpointing, wrap in DDP — in that order (module docstring).

    Args:
        model: a model built for one device (``longreach.models.build_model``), already on its device.
        job_cfg: the :class:`~longreach.job.JobConfig` (reads ``attention``, ``parallel``, ``train``).
        mesh: DeviceMesh with dims ("dp", "cp"), or None for a single process.
        data_parallel: apply step 3 (DDP); False when an engine (``longreach.engines``: FSDP2,
            DeepSpeed, accelerate) wraps the model afterwards.

    Returns:
        The model to train: the same module, or a ``DistributedDataParallel`` around it. Use
        :func:`unwrap` to reach the model's own attributes (``output_weight``, ``aux_loss``).
    """
    group = cp_group(mesh)
    # 1. the attention seam, and expert parallelism (real sharding only under our DDP; see module docstring)
    splits = data_parallel or _engine_splits_experts(job_cfg)
    ep_layers = _expert_parallel_layers(model) if group is not None and splits else []
    if ep_layers:
        _shard_experts(model, mesh, group)
    swapped = hooked = 0
    for module in model.modules():
        hook = getattr(module, "parallelize_context", None)
        if any(module is m for m in ep_layers):
            continue  # already sharded for real; its hook would ask for the replicated-parameter mode
        if callable(hook):
            hook(group, job_cfg.parallel)
            hooked += 1
        elif hasattr(module, "inner_attention"):
            module.inner_attention = _inner_attention(job_cfg, mesh)
            swapped += 1
    log.info("parallelize: %d attention seams -> %s%s", swapped,
             "local" if group is None else f"cp={dist.get_world_size(group)} {job_cfg.parallel.strategy}/"
             f"{job_cfg.parallel.layout}", f", {hooked} modules through parallelize_context" if hooked else "")
    # 1b. sequence tiling of the token-wise parts (MLP or MoE experts, norms): inside each block, so the
    #     checkpoint of step 2 recomputes the tiled block
    # HF fine-tuning jobs have no model section: their train section holds sequence_tile / checkpoint_offload
    section = "model" if getattr(job_cfg, "model", None) is not None else "train"
    memory_cfg = getattr(job_cfg, section)
    apply_sequence_tiling(model, getattr(memory_cfg, "sequence_tile", 0))
    # 2. activation checkpointing, per decoder block (its inputs optionally offloaded to host memory)
    offload = bool(getattr(memory_cfg, "checkpoint_offload", False))
    if offload and not job_cfg.train.activation_checkpointing:
        raise UserError(f"{section}.checkpoint_offload moves the checkpointed block inputs to host memory: it "
                        "needs train.activation_checkpointing=true")
    if job_cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model, offload=CheckpointOffload() if offload else None)
    shards = expert_shards(model)
    if shards is not None:  # names after activation checkpointing: DDP and checkpoints see these FQNs
        from longreach.mixtures import expert_parameter_names

        shards.names = expert_parameter_names(model)
    # 3. data parallel over dp × cp (expert parameters excluded: they are not replicated over it)
    replicas = dp_cp_group(mesh)
    if not data_parallel or replicas is None or dist.get_world_size(replicas) == 1:
        return model
    if shards is not None:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, shards.names)
    dev = next(model.parameters()).device
    ddp = nn.parallel.DistributedDataParallel(
        model, process_group=replicas, device_ids=[dev.index] if dev.type == "cuda" else None)
    ddp.register_comm_hook(replicas, _sum_allreduce_hook)
    return ddp


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
    from longreach.models.base import tile_experts, tile_sequence

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
        import weakref

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
        from torch.utils.checkpoint import checkpoint

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
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    layers = decoder_layers(model)
    if layers is None:
        raise ValueError("train.activation_checkpointing needs a model with a `layers` ModuleList")
    kw: dict[str, Any] = {"checkpoint_fn": offload.checkpoint} if offload is not None else {}
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kw)
    model.checkpoint_offload = offload  # the bench reads its byte counts


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------- experts
@dataclasses.dataclass(kw_only=True, slots=True)
class ExpertShards:
    """Expert parallelism applied by :func:`parallelize` (kept on the unwrapped model)."""

    ep_mesh: Any
    """1-D DeviceMesh the experts are split over: the mesh's cp dimension (rank r holds experts r·E/P …)."""
    replicas: dist.ProcessGroup | None
    """Ranks holding the same experts: the mesh's dp dimension; None when dp = 1 (nothing to reduce)."""
    params: list[nn.Parameter]
    """This rank's expert parameters (``[E / P, …]`` each)."""
    names: list[str]
    """Their fully qualified names in the (activation-checkpointed) model, as DDP and checkpoints see them."""
    dtensor_state: bool = True
    """``state_dict()`` gives expert weights as ``Shard(0)`` DTensors (False: this rank's plain tensors, for
    a checkpoint format that is not DCP's — DeepSpeed's own files)."""


def expert_shards(model: nn.Module) -> ExpertShards | None:
    """The expert sharding :func:`parallelize` applied to ``model`` (DDP or not), or None."""
    return getattr(unwrap(model), _SHARDS_ATTR, None)


def _engine_splits_experts(job_cfg: Any) -> bool:
    """Whether the configured engine keeps split experts out of its own sharding (FSDP2, DeepSpeed ZeRO 1/2)."""
    section = getattr(job_cfg, "engine", None)
    if section is None:
        return False
    from longreach.engines import as_engine_config

    ecfg = as_engine_config(section)
    if ecfg.kind == "deepspeed":
        from longreach.engines.deepspeed import splits_experts

        return splits_experts(ecfg)
    return ecfg.kind == "native" and ecfg.fsdp


def _expert_parallel_layers(model: nn.Module) -> list[nn.Module]:
    """MoE layers configured for expert parallelism (``model.moe.expert_parallel``)."""
    layers = [m for m in model.modules() if callable(getattr(m, "shard_experts", None))
              and getattr(getattr(m, "cfg", None), "expert_parallel", False)]
    if not layers:
        return []
    from longreach.mixtures import MoEFFN

    return [m for m in layers if isinstance(m, MoEFFN)]


def _shard_experts(model: nn.Module, mesh: Any, group: dist.ProcessGroup) -> None:
    """Keep only this rank's experts (over the cp group); record the groups and install checkpoint hooks."""
    from longreach.mixtures import MoEFFN, expert_parameter_names, shard_experts

    moe = [m for m in model.modules() if isinstance(m, MoEFFN)]
    if not all(m.cfg.expert_parallel for m in moe):
        raise UserError("model.moe.expert_parallel must be set for every MoE layer or for none")
    cp = dist.get_world_size(group)
    bad = sorted({m.cfg.num_experts for m in moe if m.cfg.num_experts % cp})
    if bad:
        raise UserError(f"model.moe.experts={bad[0]} does not divide by parallel.cp={cp}, which "
                        "model.moe.expert_parallel splits the experts over; use a multiple of parallel.cp")
    shard_experts(model, group)
    params = [p for p in model.parameters() if _is_expert(p)]  # same order on every rank
    dp_dim = mesh["dp"]
    shards = ExpertShards(ep_mesh=mesh["cp"], replicas=dp_dim.get_group() if dp_dim.size() > 1 else None,
                          params=params, names=expert_parameter_names(model))
    setattr(model, _SHARDS_ATTR, shards)
    owners = {id(p) for p in params}
    for module in model.modules():
        if any(id(p) in owners for p in module.parameters(recurse=False)):
            module.register_state_dict_post_hook(_experts_to_dtensor(shards))
            module.register_load_state_dict_pre_hook(_experts_from_dtensor)
    n = sum(p.numel() for p in params)
    log.info("parallelize: %d MoE layers split their experts over cp=%d (%d expert parameters on this rank); "
             "expert gradients reduced over dp=%d", len(moe), cp, n, dp_dim.size())


def _is_expert(p: torch.Tensor) -> bool:
    from longreach.mixtures import is_expert_parameter

    return is_expert_parameter(p)


def _as_dtensor(local: torch.Tensor, ep_mesh: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Shard

    shape = (local.shape[0] * ep_mesh.size(),) + tuple(local.shape[1:])  # [E, ...] global
    return DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def _experts_to_dtensor(shards: ExpertShards):
    """Module ``state_dict`` post hook: this module's expert parameters as DTensors ``Shard(0)`` over cp."""

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        if not shards.dtensor_state:
            return
        for name, p in module.named_parameters(recurse=False):
            key = prefix + name
            if _is_expert(p) and key in state_dict and isinstance(state_dict[key], torch.Tensor):
                state_dict[key] = _as_dtensor(state_dict[key], shards.ep_mesh)

    return hook


def _experts_from_dtensor(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Module ``load_state_dict`` pre hook: the local shard of DTensor expert weights."""
    for name, p in module.named_parameters(recurse=False):
        v = state_dict.get(prefix + name)
        if _is_expert(p) and hasattr(v, "to_local"):
            state_dict[prefix + name] = v.to_local()


def expert_optimizer_hooks(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.state_dict()`` hold expert states as DTensors over cp (and load them back).

    Call after building the optimizer of a model :func:`parallelize` split experts in (no-op otherwise),
    so torch.distributed.checkpoint saves every rank's expert moments (see the module docstring).
    """
    shards = expert_shards(model)
    if shards is None:
        return
    owners = {id(p) for p in shards.params}

    def to_dtensor(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        params = [p for g in opt.param_groups for p in g["params"]]
        for idx, st in sd["state"].items():
            p = params[idx] if isinstance(idx, int) else None
            if p is None or id(p) not in owners:
                continue
            # a new dict: Optimizer.state_dict() shares the live per-parameter state dicts
            sd["state"][idx] = {k: _as_dtensor(v, shards.ep_mesh)
                                if isinstance(v, torch.Tensor) and v.shape == p.shape else v  # moments, not step
                                for k, v in st.items()}

    def to_local(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        for key, st in sd.get("state", {}).items():
            sd["state"][key] = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in st.items()}

    optimizer.register_state_dict_post_hook(to_dtensor)
    optimizer.register_load_state_dict_pre_hook(to_local)


def reduce_expert_gradients(model: nn.Module) -> None:
    """SUM all-reduce expert gradients over the ranks holding the same experts (the dp dimension).

    Collective over that group; call once per step after the last backward (DDP handled the rest). An
    expert shard that received no tokens on this rank gets a zero gradient, as its rows of a replicated
    expert weight would, so every rank joins and the optimizer steps it the same way (momentum, decay).
    """
    shards = expert_shards(model)
    if shards is None:
        return
    for p in shards.params:
        if p.grad is None and p.requires_grad:
            p.grad = torch.zeros_like(p)
    if shards.replicas is None:
        return
    grads = [p.grad for p in shards.params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # [n expert elements]
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=shards.replicas)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def clip_grad_norm(model: nn.Module, params: list[nn.Parameter], max_norm: float) -> float:
    """Clip gradients by the global norm, counting each split expert once; returns the norm before clipping.

    Without split experts this is ``torch.nn.utils.clip_grad_norm_`` (all gradients are replicated).
    With them, the squared norm of this rank's expert gradients is summed over the cp group (each expert
    lives on one cp rank; dp replicas hold equal reduced copies) and added to the replicated part.
    """
    shards = expert_shards(model)
    if shards is None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)) if params else 0.0
    owners = {id(p) for p in shards.params}
    device = shards.params[0].device
    sq = torch.zeros(2, dtype=torch.float64, device=device)  # [replicated, expert] squared norms
    for p in params:
        sq[int(id(p) in owners)] += p.grad.detach().double().pow(2).sum()
    expert_sq = sq[1:].clone()  # every rank joins, with or without expert gradients this step
    dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=shards.ep_mesh.get_group())
    total = float((sq[0] + expert_sq[0]).sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.detach().mul_(coef)
    return total
