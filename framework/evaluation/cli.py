"""``longreach eval CHECKPOINT``: perplexity and passkey retrieval of an HF checkpoint.

One rank, or context parallelism under torchrun / ``longreach launch`` (``--strategy ring`` …): every
rank loads the model, each evaluated sequence is sharded with ``--layout`` across the ranks.

    longreach eval runs/ft/export --tokens val.npy --ppl-lengths 4096,16384 \
        --passkey-lengths 4096,16384 --depths 0,0.25,0.5,0.75,1 --seeds 10 --out runs/ft/eval
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict
from pathlib import Path

from longreach.errors import UserError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not 0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longreach eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="HF checkpoint folder (config.json, weights, tokenizer files)")
    p.add_argument("--tokens", help="perplexity tokens: .npy ids, a token-shard folder, or .txt/.md text")
    p.add_argument("--ppl-lengths", type=_ints, default=[], help="window lengths for perplexity (comma list)")
    p.add_argument("--stride", type=int, default=256, help="offset between perplexity windows (LongLoRA: 256)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows per length")
    p.add_argument("--passkey-lengths", type=_ints, default=[], help="passkey prompt lengths in tokens (comma list)")
    p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="key depths in [0, 1]")
    p.add_argument("--seeds", type=int, default=10, help="passkey samples per (length, depth)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the pass keys")
    p.add_argument("--rope-from-length", default="none",
                   choices=["none", "linear", "dynamic", "yarn", "llama3", "static_ntk"],
                   help="for unscaled checkpoints: scale RoPE to each evaluated length (factor ceil(L'/L))")
    p.add_argument("--strategy", default="none", choices=["none", "ring", "ulysses", "hybrid", "allgather"],
                   help="context parallelism over all launched ranks")
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag", "stripe"])
    p.add_argument("--ulysses-degree", type=int, default=None)
    p.add_argument("--backend", default="auto", help="local attention backend")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="folder for results.json, passkey.md and passkey.png")
    return p


def _with_rope(model, original_params: dict, original_max: int, kind: str, length: int) -> None:
    """Restore the checkpoint's RoPE, then scale it for ``length`` (LongLoRA sets the factor per length)."""
    from longreach.hf.rope import RopeScaling, apply_rope_scaling, rebuild_rotary

    model.config.rope_parameters = copy.deepcopy(original_params)
    model.config.max_position_embeddings = original_max
    if length > original_max:
        apply_rope_scaling(model.config, RopeScaling(type=kind), target_len=length)
    rebuild_rotary(model, device=next(model.parameters()).device)


def evaluate(args: argparse.Namespace) -> dict:
    import torch

    from longreach.evaluation.passkey import passkey_retrieval, write_results
    from longreach.evaluation.perplexity import load_tokens, perplexity
    from longreach.hf.load import load_hf
    from longreach.hf.patch import AttentionPatch, patch_attention
    from longreach.trainer import setup_distributed

    if not args.ppl_lengths and not args.passkey_lengths:
        raise UserError("nothing to evaluate: give --ppl-lengths (with --tokens) and/or --passkey-lengths")
    if args.ppl_lengths and not args.tokens:
        raise UserError("--ppl-lengths needs --tokens")
    patch_cfg = AttentionPatch(pattern="full", strategy=args.strategy, layout=args.layout,
                               ulysses_degree=args.ulysses_degree, backend=args.backend)
    rank, world, device, owned = setup_distributed()
    if world > 1 and args.strategy == "none":
        raise UserError(f"{world} ranks were launched but --strategy is none: choose ring, ulysses, hybrid or allgather")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = load_hf(args.checkpoint, dtype=dtype, device=device)
    patch_attention(model, patch_cfg)
    tokens = load_tokens(args.tokens, tokenizer) if args.ppl_lengths else None
    if args.passkey_lengths and tokenizer is None:
        raise UserError(f"{args.checkpoint}: passkey retrieval needs tokenizer files in the checkpoint")
    orig_params = copy.deepcopy(getattr(model.config, "rope_parameters", None))
    orig_max = int(model.config.max_position_embeddings)
    results: dict = {"checkpoint": str(args.checkpoint), "world_size": world, "strategy": args.strategy,
                     "perplexity": [], "passkey": None}
    for length in args.ppl_lengths:
        if args.rope_from_length != "none":
            _with_rope(model, orig_params, orig_max, args.rope_from_length, length)
        res = perplexity(model, tokens, length=length, stride=args.stride, max_windows=args.max_windows)
        results["perplexity"].append(asdict(res))
        if rank == 0:
            print(f"ppl@{length}: {res.ppl:.3f} ({res.windows} windows)")
    if args.passkey_lengths:
        records = []
        for length in args.passkey_lengths:
            if args.rope_from_length != "none":
                _with_rope(model, orig_params, orig_max, args.rope_from_length, length)
            records += passkey_retrieval(model, tokenizer, lengths=[length], depths=args.depths, seeds=args.seeds,
                                         seed=args.seed)
        from longreach.evaluation.passkey import accuracy_table, markdown_table

        table = accuracy_table(records)
        results["passkey"] = table
        if args.out and rank == 0:
            write_results(records, args.out, title=f"passkey: {Path(args.checkpoint).name}")
        if rank == 0:
            print(markdown_table(table))
    if args.out and rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    if owned:
        import torch.distributed as dist

        dist.destroy_process_group()
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
    except UserError as e:
        print(f"longreach: error: {e}", file=sys.stderr)
        return 2
    return 0
