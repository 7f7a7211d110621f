"""``longreach bench memory``: what stays alive for backward, and peak memory per rank against S.

Two measurements, both on this machine (CPU, gloo ranks through ``longreach.testing.run_ranks``):

**Saved bytes** (``--saved``, the default part). Bytes kept for backward per token per decoder layer,
counted with ``torch.autograd.graph.saved_tensors_hooks`` — exact and independent of any allocator:
every tensor autograd saves is attributed to the module running when it was saved (attention, MLP,
norms, embedding, loss, or ``checkpoint`` — a checkpointed block's own input) and counted once per
storage (views of one buffer count once; parameters are not activations and are left out). Shown per
configuration (plain, sequence-tiled MLP/norms, activation checkpointing, checkpoint offload, and
their combinations; one process and cp=2 ring/Ulysses/hybrid) beside the **floor**: one checkpointed
hidden state per token per layer (``hidden × element size``: 2·hidden bytes in bf16). Bytes moved
to host by checkpoint offload are counted by the offloader and shown apart (``host``). With
``--alst`` the same figures are taken for DeepSpeed ALST: a HuggingFace Llama of the same shape with
DeepSpeed's ``UlyssesSPAttentionHF`` attention, ``TiledMLP`` and ``TiledFusedLogitsLoss``, HF
gradient checkpointing, gloo cp=2.

**Peak against S** (``--peak``). Per strategy (``single``, ``ring``, ``ulysses``, ``hybrid``, and ``hf``:
a plain HuggingFace ``LlamaForCausalLM`` of the same shape in one process), with and without
activation checkpointing, one training step (forward + backward) per sequence length, in increasing
order, in one spawned process per rank: the peak of **live tensor bytes** (torch's ``MemTracker``: it
follows every tensor storage through a dispatch mode, so it is exact and ignores allocator caching)
and the process's **peak RSS** (``ru_maxrss``: includes the interpreter, the libraries and whatever the
CPU allocator keeps cached; monotone, hence the increasing order). A least-squares line
``peak = a + b·S`` is fitted per series, and the longest S that fits ``--budget`` is projected from it.

    longreach bench memory --dtype bfloat16
    longreach bench memory --peak --seq-lens 1k,2k,4k --strategies single,ring,ulysses,hybrid,hf --budget 8G
    longreach bench memory --alst --json memory.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import torch
from torch import nn

from longreach.errors import UserError
from longreach.job import JobConfig
from longreach.models.config import ModelConfig
from longreach.parallel.config import ParallelConfig
from longreach.planning.plan import parse_tokens
from longreach.testing import run_ranks

__all__ = ["COMPONENTS", "SavedBytesMeter", "fit_line", "main", "saved_bytes_worker", "peak_worker"]

COMPONENTS = ("checkpoint", "attention", "mlp", "norms", "rope", "embedding", "loss", "other")
"""Where saved bytes are attributed, from the module that saved them (see :func:`component_of`)."""

STRATEGIES = ("single", "ring", "ulysses", "hybrid", "hf")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def component_of(module_name: str, wrapped: bool) -> str:
    """The component a saved tensor belongs to, from the innermost running module's qualified name.

    ``wrapped``: the innermost module is a checkpoint wrapper (what it saves is its block's input).
    """
    if wrapped:
        return "checkpoint"
    parts = module_name.split(".")
    for part in reversed(parts):
        if part in ("self_attn", "attn", "attention"):
            return "attention"
        if part in ("mlp", "experts", "ffn", "feed_forward"):
            return "mlp"
        if part.endswith("norm"):
            return "norms"
        if part in ("embed_tokens", "wte"):
            return "embedding"
    if module_name in ("", "lm_head", "module") or module_name.endswith(("lm_head", "model")):
        return "loss"
    return "other"


class SavedBytesMeter:
    """Count the bytes autograd saves for backward while active, by component (unique storages).

    Use around a forward (and backward) of ``model``::

        with SavedBytesMeter(model) as meter:
            loss.backward() ...
        meter.bytes  # {"attention": ..., "mlp": ..., ...}

    Tensors saved inside a region with its own ``saved_tensors_hooks`` (the recomputed interior of a
    checkpointed block, or block inputs the checkpoint offloader moves to host) are not seen: they are
    not kept on the device between forward and backward.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.bytes: dict[str, int] = {c: 0 for c in COMPONENTS}
        self._seen: set[tuple[str, int]] = set()
        self._stack: list[tuple[str, bool]] = []
        self._handles: list[Any] = []
        self._params = {(str(p.device), p.untyped_storage().data_ptr()) for p in model.parameters()
                        if p.device.type != "meta"}
        self._hooks: Any = None
        self._offload: Any = None
        # a decoder trunk below the root (HF's LlamaModel) checkpoints its layers itself, outside their hooks
        self._trunks = {name for name, m in model.named_modules()
                        if name and isinstance(getattr(m, "layers", None), nn.ModuleList)}
        # ... or inside the block's call before its forward (HF's GradientCheckpointingLayer): the block itself
        self._blocks = {f"{name}.layers.{i}".lstrip(".") for name, m in model.named_modules()
                        if isinstance(getattr(m, "layers", None), nn.ModuleList) for i in range(len(m.layers))}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # only what the forward keeps: tensors saved while backward runs (a recompute's own) are transient
        if torch._C._current_graph_task_id() == -1 and t.device.type != "meta" and t.numel() > 0:
            st = t.untyped_storage()
            key = (str(t.device), st.data_ptr())
            if key not in self._seen and key not in self._params:
                self._seen.add(key)
                name, wrapped = self._stack[-1] if self._stack else ("", False)
                comp = component_of(name, wrapped or name in self._trunks or name in self._blocks)
                if comp == "checkpoint" and not t.requires_grad:
                    comp = "rope"  # a constant every block receives (the RoPE tables), kept once
                self.bytes[comp] += st.nbytes()
        return t

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()

    def __enter__(self) -> "SavedBytesMeter":
        for name, mod in self.model.named_modules():
            wrapped = hasattr(mod, "_checkpoint_wrapped_module")
            self._handles.append(mod.register_forward_pre_hook(
                lambda m, a, name=name, wrapped=wrapped: self._stack.append((name, wrapped))))
            self._handles.append(mod.register_forward_hook(self._leave))
        inner = getattr(self.model, "module", self.model)
        self._offload = getattr(inner, "checkpoint_offload", None)
        if self._offload is not None:  # inputs it keeps on the device are saved bytes too
            self._offload.observer = self._pack
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        if self._offload is not None:
            self._offload.observer = None
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


# ------------------------------------------------------------------------------------------ our model
@dataclasses.dataclass(kw_only=True, slots=True)
class Shape:
    """The benchmarked decoder (a tiny Llama by default)."""

    dim: int = 64
    """Hidden size."""
    layers: int = 4
    """Decoder blocks."""
    heads: int = 4
    """Query heads."""
    kv_heads: int = 2
    """Key/value heads."""
    ffn: int = 176
    """SwiGLU hidden size."""
    vocab: int = 256
    """Vocabulary."""


def _job(shape: Shape, *, seq_len: int, cp: int, strategy: str, checkpointing: bool, tile: int, offload: bool,
         loss_chunk: int) -> Any:
    model = ModelConfig(vocab_size=shape.vocab, dim=shape.dim, n_layers=shape.layers, n_heads=shape.heads,
                        n_kv_heads=shape.kv_heads, ffn_hidden=shape.ffn, max_seq_len=seq_len, sequence_tile=tile,
                        checkpoint_offload=offload)
    par = ParallelConfig(cp=cp, strategy=strategy if cp > 1 else "ring", layout="zigzag",
                         ulysses_degree=(2 if strategy == "hybrid" else None))
    cfg = JobConfig(model=model, parallel=par)
    train = dataclasses.replace(cfg.train, seq_len=seq_len, activation_checkpointing=checkpointing,
                                loss_chunk_size=loss_chunk, micro_batch_size=1)
    return dataclasses.replace(cfg, train=train)


def _batch(vocab: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (1, seq_len + 1), generator=g)
    return {"input_ids": tokens[:, :-1].clone(), "labels": tokens[:, 1:].clone()}


def _build(cfg: Any, world_size: int, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from longreach.models import build_model
    from longreach.model_setup import parallelize
    from longreach.trainer import build_mesh

    mesh = build_mesh(cfg.parallel, world_size, torch.device("cpu"))[0] if world_size > 1 else None
    torch.manual_seed(0)
    model = build_model(cfg.model).to(dtype)
    return parallelize(model, cfg, mesh), mesh


def saved_bytes_worker(rank: int, world_size: int, shape: dict[str, int], cases: list[dict[str, Any]],
                       seq_len: int, dtype: str) -> list[dict[str, Any]]:
    """Saved bytes per component for each case ({strategy, checkpointing, tile, offload}) on this rank.

    ``world_size`` 1 runs without a process group. Returns one record per case: bytes per component,
    local tokens, layers, and the offloader's host bytes.
    """
    from longreach.engines import unwrap
    from longreach.trainer import forward_backward

    out = []
    for case in cases:
        cfg = _job(Shape(**shape), seq_len=seq_len, cp=world_size, strategy=case.get("strategy", "ring"),
                   checkpointing=case.get("checkpointing", False), tile=case.get("tile", 0),
                   offload=case.get("offload", False), loss_chunk=case.get("loss_chunk", 256))
        model, mesh = _build(cfg, world_size, _DTYPES[dtype])
        with SavedBytesMeter(model) as meter:
            forward_backward(model, [_batch(shape["vocab"], seq_len)], cfg=cfg, mesh=mesh, step=0,
                             device=torch.device("cpu"))
        off = getattr(unwrap(model), "checkpoint_offload", None)
        out.append({**case, "rank": rank, "bytes": dict(meter.bytes), "tokens": seq_len // world_size,
                    "layers": shape["layers"], "host": off.bytes_offloaded if off is not None else 0,
                    "restored": off.bytes_restored if off is not None else 0})
    return out


# ------------------------------------------------------------------------------------ DeepSpeed ALST
def _hf_llama(shape: Shape, seq_len: int, dtype: torch.dtype, attn: str = "sdpa") -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.dim, intermediate_size=shape.ffn,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=seq_len,
                         attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(hf_cfg).to(dtype)


def alst_worker(rank: int, world_size: int, shape: dict[str, int], seq_len: int, dtype: str,
                loss_chunk: int) -> dict[str, Any]:
    """DeepSpeed ALST on this rank: HF Llama + ``UlyssesSPAttentionHF`` + ``TiledMLP`` + ``TiledFusedLogitsLoss``
    with HF (non-reentrant) gradient checkpointing; one forward + backward under :class:`SavedBytesMeter`."""
    import math

    import torch.distributed as dist
    import torch.nn.functional as F
    from deepspeed.runtime.sequence_parallel.ulysses_sp import (TiledFusedLogitsLoss, TiledMLP,
                                                                UlyssesSPAttentionHF)

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's comm layer over our gloo group
    sh = Shape(**shape)
    model = _hf_llama(sh, seq_len, _DTYPES[dtype])
    UlyssesSPAttentionHF.register_with_transformers(model, core_attn_implementation="sdpa",
                                                    sequence_parallel_size=world_size, micro_batch_size=1,
                                                    seq_length=seq_len, seq_length_is_variable=False)

    def tiled_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:  # DeepSpeed's documented recipe
        shards = max(1, math.ceil(x.shape[1] / x.shape[2]))
        params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]
        return TiledMLP.apply(lambda m, t: m.down_proj(m.act_fn(m.gate_proj(t)) * m.up_proj(t)), self, x, shards,
                              params)

    for layer in model.model.layers:
        layer.mlp.forward = tiled_mlp_forward.__get__(layer.mlp)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = _batch(sh.vocab, seq_len)
    n = seq_len // world_size
    sl = slice(rank * n, (rank + 1) * n)  # DeepSpeed's UlyssesSPDataLoaderAdapter: contiguous shards
    ids, labels = batch["input_ids"][:, sl], batch["labels"][:, sl]
    pos = torch.arange(seq_len)[sl].view(1, n)
    with SavedBytesMeter(model) as meter:
        hidden = model.model(input_ids=ids, position_ids=pos).last_hidden_state  # [1, n, dim]

        def loss_fn(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = head(x).float()
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), reduction="sum")

        shards = max(1, math.ceil(n / loss_chunk))
        loss = TiledFusedLogitsLoss.apply(loss_fn, model.lm_head, hidden, labels, None, shards,
                                          [model.lm_head.weight], "sum")
        loss.backward()
    dist.barrier()
    return {"rank": rank, "bytes": dict(meter.bytes), "tokens": n, "layers": sh.layers, "host": 0}


# ------------------------------------------------------------------------------------------ peak vs S
def _rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def peak_worker(rank: int, world_size: int, shape: dict[str, int], strategy: str, checkpointing: bool,
                seq_lens: list[int], dtype: str, loss_chunk: int) -> list[dict[str, Any]]:
    """One training step per sequence length (increasing): peak live tensor bytes and peak RSS on this rank."""
    import gc

    from torch.distributed._tools.mem_tracker import MemTracker

    from longreach.trainer import forward_backward

    sh = Shape(**shape)
    out = []
    for s in seq_lens:
        batch = _batch(sh.vocab, s)
        if strategy == "hf":
            model = _hf_llama(sh, s, _DTYPES[dtype])
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            tracker = MemTracker()
            tracker.track_external(model)
            with tracker:
                model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        else:
            cfg = _job(sh, seq_len=s, cp=world_size, strategy=strategy, checkpointing=checkpointing, tile=0,
                       offload=False, loss_chunk=loss_chunk)
            model, mesh = _build(cfg, world_size, _DTYPES[dtype])
            tracker = MemTracker()
            tracker.track_external(model)
            with tracker:
                forward_backward(model, [batch], cfg=cfg, mesh=mesh, step=0, device=torch.device("cpu"))
        peak = tracker.get_tracker_snapshot("peak")
        live = max(int(v.get("Total", 0)) for v in peak.values()) if peak else 0
        out.append({"rank": rank, "seq_len": s, "peak_live": live, "rss": _rss_bytes()})
        del model, tracker
        gc.collect()
    return out


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b·x``; returns ``(a, b)`` (b = 0 from a single point)."""
    n = len(xs)
    if n == 0:
        raise ValueError("fit_line needs at least one point")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    return my - b * mx, b


# ---------------------------------------------------------------------------------------- command line
def _cases(cp: int) -> list[dict[str, Any]]:
    base = [{"name": "plain"}, {"name": "tiled", "tile": 0}, {"name": "ckpt", "checkpointing": True},
            {"name": "ckpt+tiled", "checkpointing": True, "tile": 0},
            {"name": "ckpt+offload", "checkpointing": True, "offload": True},
            {"name": "ckpt+offload+tiled", "checkpointing": True, "offload": True, "tile": 0}]
    return base if cp == 1 else [c for c in base if c["name"] in ("plain", "ckpt", "ckpt+offload+tiled")]


def _saved_table(args: argparse.Namespace, shape: Shape) -> list[dict[str, Any]]:
    tile = args.tile or max(1, args.seq_len // 8)
    runs: list[tuple[str, int, list[dict[str, Any]]]] = [("single", 1, _cases(1))]
    runs += [(s, _world(s, args.cp), _cases(args.cp)) for s in args.strategies if s in ("ring", "ulysses", "hybrid")]
    rows = []
    for strategy, world, cases in runs:
        cases = [{**c, "strategy": strategy, **({"tile": tile} if "tile" in c else {})} for c in cases]
        shp = dataclasses.asdict(shape)
        if world == 1:
            recs = saved_bytes_worker(0, 1, shp, cases, args.seq_len, args.dtype)
        else:
            recs = [r for per_rank in run_ranks(saved_bytes_worker, world, args=(shp, cases, args.seq_len, args.dtype),
                                                timeout=900) for r in per_rank]
        for case in cases:
            mine = [r for r in recs if r["name"] == case["name"]]
            rows.append(_row(f"longreach {strategy}" + (f" cp={world}" if world > 1 else ""), case["name"], mine))
    if args.alst:
        try:
            recs = run_ranks(alst_worker, args.cp, args=(dataclasses.asdict(shape), args.seq_len, args.dtype, 256),
                             timeout=900)
            rows.append(_row(f"DeepSpeed ALST cp={args.cp}", "ckpt+TiledMLP+tiled loss", recs))
        except Exception as e:  # noqa: BLE001 - the reason is the result
            rows.append({"system": f"DeepSpeed ALST cp={args.cp}", "config": "did not run",
                         "error": f"{type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}"[:300]})
    return rows


def _row(system: str, config: str, recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Max over ranks of bytes per token per layer, per component."""
    per = {c: max(r["bytes"][c] / r["tokens"] / r["layers"] for r in recs) for c in COMPONENTS}
    total = max(sum(r["bytes"].values()) / r["tokens"] / r["layers"] for r in recs)
    host = max(r["host"] / r["tokens"] / r["layers"] for r in recs)
    return {"system": system, "config": config, "per_token_layer": per, "device": total, "host": host}


def _print_saved(rows: list[dict[str, Any]], shape: Shape, dtype: str, seq_len: int) -> None:
    el = torch.tensor([], dtype=_DTYPES[dtype]).element_size()
    floor = shape.dim * el
    print(f"saved for backward, bytes per token per layer (max over ranks); Llama dim {shape.dim}, {shape.layers} "
          f"layers, {shape.heads} heads ({shape.kv_heads} kv), ffn {shape.ffn}, vocab {shape.vocab}; {dtype}; "
          f"S={seq_len}; floor = hidden × {el} B = {floor} B")
    cols = [c for c in COMPONENTS if any(r.get("per_token_layer", {}).get(c) for r in rows)]
    head = f"{'system':<26} {'config':<24}" + "".join(f"{c:>11}" for c in cols) + f"{'device':>10} {'÷floor':>7} {'host':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['system']:<26} did not run: {r['error']}")
            continue
        vals = "".join(f"{r['per_token_layer'][c]:>11.1f}" for c in cols)
        print(f"{r['system']:<26} {r['config']:<24}{vals}{r['device']:>10.1f} {r['device'] / floor:>7.2f} "
              f"{r['host']:>8.1f}")
    print(f"{'floor':<26} {'one hidden state':<24}" + "".join(f"{'':>11}" for _ in cols) + f"{floor:>10.1f} {1.0:>7.2f}")


def _world(strategy: str, cp: int) -> int:
    """Ranks a strategy runs on: one for ``single``/``hf``; hybrid needs U=2 × at least 2 ring groups (4)."""
    if strategy in ("single", "hf"):
        return 1
    return max(cp, 4) if strategy == "hybrid" else cp


def _peak_table(args: argparse.Namespace, shape: Shape) -> list[dict[str, Any]]:
    rows = []
    for strategy in args.strategies:
        world = _world(strategy, args.cp)
        for ckpt in (False, True):
            recs = run_ranks(peak_worker, world, args=(dataclasses.asdict(shape), strategy, ckpt, args.seq_lens,
                                                       args.dtype, 256), timeout=1800)
            per_s: dict[int, dict[str, int]] = {}
            for r in (x for per_rank in recs for x in per_rank):
                cur = per_s.setdefault(r["seq_len"], {"peak_live": 0, "rss": 0})
                cur["peak_live"] = max(cur["peak_live"], r["peak_live"])
                cur["rss"] = max(cur["rss"], r["rss"])
            xs = sorted(per_s)
            row: dict[str, Any] = {"strategy": strategy, "cp": world, "checkpointing": ckpt, "points": per_s}
            for key in ("peak_live", "rss"):
                a, b = fit_line([float(x) for x in xs], [float(per_s[x][key]) for x in xs])
                row[key] = {"a": a, "b": b, "max_seq_len": (args.budget - a) / b if b > 0 else float("inf")}
            rows.append(row)
            print(f"  measured {strategy} cp={world} ckpt={ckpt}: " + ", ".join(
                f"S={x} live {per_s[x]['peak_live'] / 2 ** 20:.1f} MiB RSS {per_s[x]['rss'] / 2 ** 20:.0f} MiB" for x in xs),
                flush=True)
    return rows


def _print_peak(rows: list[dict[str, Any]], budget: float) -> None:
    print(f"\npeak memory per rank against S (max over ranks); fit peak = a + b·S; longest S within "
          f"{budget / 2 ** 30:.1f} GiB projected from the fit")
    print("  live = peak live tensor bytes (MemTracker, exact, no allocator cache); RSS = peak resident set "
          "(interpreter + libraries + allocator caching included)")
    single = {r["checkpointing"]: r for r in rows if r["strategy"] == "single"}
    head = (f"{'strategy':<9} {'cp':>3} {'ckpt':>5} {'live b KiB/tok':>15} {'÷single':>8} {'live S max':>11} "
            f"{'RSS a MiB':>10} {'RSS b KiB/tok':>14} {'RSS S max':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ref = single.get(r["checkpointing"])
        ratio = r["peak_live"]["b"] / ref["peak_live"]["b"] if ref and ref["peak_live"]["b"] else float("nan")
        print(f"{r['strategy']:<9} {r['cp']:>3} {'yes' if r['checkpointing'] else 'no':>5} "
              f"{r['peak_live']['b'] / 1024:>15.2f} {ratio:>8.2f} {r['peak_live']['max_seq_len']:>11,.0f} "
              f"{r['rss']['a'] / 2 ** 20:>10.1f} {r['rss']['b'] / 1024:>14.2f} {r['rss']['max_seq_len']:>10,.0f}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longreach bench memory", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + "\n".join(__doc__.strip().splitlines()[-3:]))
    p.add_argument("--saved", action="store_true", help="saved bytes per token per layer (default when no part given)")
    p.add_argument("--peak", action="store_true", help="peak memory per rank against sequence length, with fits")
    p.add_argument("--alst", action="store_true", help="with --saved: also DeepSpeed ALST (HF Llama, gloo cp)")
    for name, default in (("dim", 64), ("layers", 4), ("heads", 4), ("kv-heads", 2), ("ffn", 176), ("vocab", 256)):
        p.add_argument(f"--{name}", type=int, default=default, help=f"model {name} (default {default})")
    p.add_argument("--seq-len", type=int, default=512, help="--saved: global sequence length (default 512)")
    p.add_argument("--seq-lens", default="1k,2k,4k", help="--peak: comma-separated lengths (k suffix)")
    p.add_argument("--tile", type=int, default=0, help="sequence tile in tokens (default S/8)")
    p.add_argument("--cp", type=int, default=2, help="context-parallel ranks (default 2; hybrid: U=2 on max(cp, 4))")
    p.add_argument("--strategies", default="single,ring,ulysses,hybrid,hf",
                   help=f"comma-separated, from {', '.join(STRATEGIES)}")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(_DTYPES))
    p.add_argument("--budget", default="8G", help="--peak: memory per rank to project the longest S for (G/M suffix)")
    p.add_argument("--json", default=None, help="write the tables here")
    return p


def _bytes(text: str) -> float:
    t = text.strip().upper().rstrip("IB")
    mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    try:
        return float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    except ValueError:
        raise UserError(f"bench memory: --budget {text!r} is not a size (e.g. 8G, 512M)") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``longreach bench memory``."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in args.strategies if s not in STRATEGIES]
    if bad or not args.strategies:
        raise UserError(f"bench memory: --strategies: unknown {bad[0] if bad else '(empty)'!r}; choose from "
                        f"{', '.join(STRATEGIES)}")
    args.seq_lens = sorted(parse_tokens(x) for x in args.seq_lens.split(",") if x.strip())
    args.budget = _bytes(args.budget)
    if args.cp < 2 or (args.cp % 2 and "hybrid" in args.strategies):
        raise UserError(f"bench memory: --cp must be >= 2 (and even for hybrid), got {args.cp}")
    try:
        shape = Shape(dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, ffn=args.ffn,
                      vocab=args.vocab)
        for s in [args.seq_len, *args.seq_lens]:
            if s % (2 * max(args.cp, 4)):
                raise UserError(f"bench memory: sequence length {s} must divide by 2·cp = {2 * max(args.cp, 4)} "
                                "(zigzag; hybrid runs on at least 4 ranks)")
    except ValueError as e:
        raise UserError(f"bench memory: {e}") from None
    out: dict[str, Any] = {"shape": dataclasses.asdict(shape), "dtype": args.dtype}
    if args.saved or not args.peak:
        out["saved"] = _saved_table(args, shape)
        _print_saved(out["saved"], shape, args.dtype, args.seq_len)
    if args.peak:
        out["peak"] = _peak_table(args, shape)
        _print_peak(out["peak"], args.budget)
    print("(measured on a shared CPU machine; saved bytes are exact counts, peaks are per process)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
