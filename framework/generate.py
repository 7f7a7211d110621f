"""``longreach generate SOURCE --prompt TEXT``: greedy text generation from any model source.

    longreach generate runs/pre --prompt "The pass key is" --max-new-tokens 16
    longreach generate runs/tnl --prompt-ids 5,17,99 --decode recurrent --json
    torchrun --nproc-per-node 2 -m longreach.launchers.cli generate runs/pre --prompt-file long.txt --strategy ring

SOURCE is a run folder (its latest complete step), a ``step-N`` checkpoint, an export or an HF folder;
the first line says which was loaded. ``--decode full`` recomputes the sequence for every token (and runs
under context parallelism for long prompts); ``--decode recurrent`` (TransNormerLLM, one rank) carries
each lightning layer's state from token to token; ``auto`` picks recurrent where it applies. HF folders
decode with transformers' ``generate`` (KV cache) on one rank.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from longreach.errors import UserError
from longreach.parallel.config import LAYOUTS, STRATEGIES

__all__ = ["main"]


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longreach generate", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="run folder, step-N checkpoint, export or HF folder")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (tokenized with the source's tokenizer)")
    prompt.add_argument("--prompt-file", help="a text file holding the prompt")
    prompt.add_argument("--prompt-ids", type=_ids, help="prompt as comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--decode", default="auto", choices=("auto", "full", "recurrent"),
                   help="full recomputation, recurrent state (TransNormerLLM), or auto")
    p.add_argument("--strategy", default="none", choices=("none", *STRATEGIES),
                   help="context parallelism over all launched ranks")
    p.add_argument("--layout", default="zigzag", choices=LAYOUTS)
    p.add_argument("--ulysses-degree", type=int, default=None)
    p.add_argument("--backend", default="auto", help="local attention backend (HF models)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16", "float64"))
    p.add_argument("--json", action="store_true", help="print one JSON line (source, prompt_ids, ids, text)")
    return p


def generate(args: argparse.Namespace) -> dict:
    """Run the generation ``args`` describe; every launched rank calls it. Returns the JSON record."""
    from longreach.evaluation.common import TextCodec
    from longreach.evaluation.native import supports_recurrent
    from longreach.evaluation.runner import open_model

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    opened = open_model(args.source, strategy=args.strategy, layout=args.layout, ulysses_degree=args.ulysses_degree,
                        backend=args.backend, dtype=args.dtype)
    try:
        codec = TextCodec(opened.tokenizer) if opened.tokenizer is not None else None
        if args.prompt_ids is not None:
            ids = list(args.prompt_ids)
        else:
            if codec is None:
                raise UserError(f"{args.source}: no tokenizer found; give --prompt-ids")
            text = args.prompt if args.prompt is not None else _read(args.prompt_file)
            ids = codec.encode(text)
        if not ids:
            raise UserError("the prompt is empty")
        decode = args.decode
        if decode == "auto":
            native = opened.native
            decode = ("recurrent" if native is not None and opened.world == 1 and supports_recurrent(native.model)
                      else "full")
        out = opened.decode(ids, args.max_new_tokens, pad_id=codec.pad_id if codec else 0, decode=decode)
        record = {"source": opened.source.describe(), "decode": decode, "prompt_ids": ids, "ids": out,
                  "text": codec.decode(out) if codec is not None else None}
        if opened.rank == 0:
            print(json.dumps(record) if args.json else (record["text"] if record["text"] is not None else
                                                        " ".join(map(str, out))), flush=True)
        return record
    finally:
        opened.close()


def _read(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompt-file {p} does not exist")
    return p.read_text()


def main(argv: list[str] | None = None) -> int:
    """``longreach generate SOURCE (--prompt TEXT | --prompt-file F | --prompt-ids …) [options]``."""
    generate(build_parser().parse_args(argv))
    return 0
