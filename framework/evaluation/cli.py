"""``longreach eval SOURCE``: perplexity and passkey retrieval of any model source.

SOURCE is a run folder (its latest complete step), a ``step-N`` checkpoint, an export
(``model.safetensors`` + ``config.yaml``) or an HF folder; the first output line says which was loaded.

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
from typing import Any

from longreach.errors import UserError
from longreach.parallel.config import LAYOUTS, STRATEGIES


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
    p.add_argument("checkpoint", help="model source: a run folder (its latest step), a step-N checkpoint, an export "
                                      "(model.safetensors + config.yaml) or an HF folder")
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
    p.add_argument("--strategy", default="none", choices=("none", *STRATEGIES),
                   help="context parallelism over all launched ranks")
    p.add_argument("--layout", default="zigzag", choices=LAYOUTS)
    p.add_argument("--ulysses-degree", type=int, default=None)
    p.add_argument("--backend", default="auto", help="local attention backend")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--beyond-positions", action="store_true",
                   help="allow lengths beyond the model's positions (max_position_embeddings / max_seq_len)")
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


def check_lengths(lengths: list[int], max_positions: int, *, rope_from_length: str, beyond: bool) -> None:
    """Lengths beyond the model's positions need ``--rope-from-length`` or an explicit ``--beyond-positions``."""
    over = [n for n in lengths if n > max_positions]
    if over and rope_from_length == "none" and not beyond:
        raise UserError(f"length(s) {', '.join(map(str, over))} exceed the model's {max_positions} positions: "
                        "pass --beyond-positions to evaluate there anyway (extrapolation), or --rope-from-length "
                        "to scale RoPE per length")


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluations ``args`` asks for on any model source; every launched rank calls it."""
    from longreach.evaluation.runner import open_model

    if not args.ppl_lengths and not args.passkey_lengths:
        raise UserError("nothing to evaluate: give --ppl-lengths (with --tokens) and/or --passkey-lengths")
    if args.ppl_lengths and not args.tokens:
        raise UserError("--ppl-lengths needs --tokens")
    opened = open_model(args.checkpoint, strategy=args.strategy, layout=args.layout,
                        ulysses_degree=args.ulysses_degree, backend=args.backend, dtype=args.dtype)
    try:
        return _evaluate(args, opened)
    finally:
        opened.close()


def _evaluate(args: argparse.Namespace, opened: Any) -> dict:
    from longreach.evaluation.passkey import passkey_retrieval, write_results
    from longreach.evaluation.perplexity import load_tokens

    model, tokenizer, rank = opened.hf, opened.tokenizer, opened.rank
    if args.rope_from_length != "none" and model is None:
        raise UserError("--rope-from-length applies to HF checkpoints; export the model with --format hf first")
    check_lengths([*args.ppl_lengths, *args.passkey_lengths], opened.max_positions(),
                  rope_from_length=args.rope_from_length, beyond=args.beyond_positions)
    tokens = load_tokens(args.tokens, tokenizer) if args.ppl_lengths else None
    if args.passkey_lengths and tokenizer is None:
        raise UserError(f"{args.checkpoint}: passkey retrieval needs the model's tokenizer (none found)")
    orig_params = copy.deepcopy(getattr(model.config, "rope_parameters", None)) if model is not None else None
    orig_max = opened.max_positions()
    results: dict = {"checkpoint": str(args.checkpoint), "loaded": opened.source.describe(), "world_size": opened.world,
                     "strategy": args.strategy, "perplexity": [], "passkey": None}
    for length in args.ppl_lengths:
        if args.rope_from_length != "none":
            _with_rope(model, orig_params, orig_max, args.rope_from_length, length)
        res = opened.perplexity(tokens, length=length, stride=args.stride, max_windows=args.max_windows)
        results["perplexity"].append(asdict(res))
        if rank == 0:
            print(f"ppl@{length}: {res.ppl:.3f} ({res.windows} windows)")
    if args.passkey_lengths:
        from longreach.evaluation.common import TextCodec

        pad_id = TextCodec(tokenizer).pad_id
        records = []
        for length in args.passkey_lengths:
            if args.rope_from_length != "none":
                _with_rope(model, orig_params, orig_max, args.rope_from_length, length)
            records += passkey_retrieval(model, tokenizer, lengths=[length], depths=args.depths, seeds=args.seeds,
                                         seed=args.seed,
                                         decode=lambda ids, n: opened.decode(ids, n, pad_id=pad_id))
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
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
    except UserError as e:
        print(f"longreach: error: {e}", file=sys.stderr)
        return 2
    return 0
