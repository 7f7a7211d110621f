"""Tokenization benchmark: throughput and peak memory of the streaming shard builder against corpus size.

    python -m longreach.data.bench --sizes 50 100 200 --workers 2 --rounds 2 --out runs/bench_data

For each size a jsonl corpus of generated English-like text is written once; every build runs in a fresh
child process (so its peak RSS is its own) with an empty cache, sizes interleaved over the rounds; then
a second run on the full cache shows the reuse (no tokenization). Reported per size: MB/s (median and
spread over the rounds), tokens, peak RSS of the building process and of the largest worker, and the
reuse time. ``--baseline`` adds the in-memory builder (all documents read into a list, then tokenized:
how shards were built before streaming) as the other arm of each round.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from longreach.data import DataConfig, TokenShards, write_shards
from longreach.data.corpus import iter_documents
from longreach.data.shards import stream_shards
from longreach.data.tokenizer import Tokenizer, train_tokenizer

_WORDS = ("the model attention context sequence token layer rank shard memory long range data parallel ring "
          "query key value head block window passkey document training step gradient loss batch window "
          "river mountain city garden music number letter story reader writer history science").split()


def write_corpus(path: Path, megabytes: float, *, seed: int = 0) -> int:
    """Write ``megabytes`` MB of generated jsonl documents (2–20 kB each) to ``path``; returns its bytes."""
    rng = np.random.default_rng(seed)
    target = int(megabytes * 1e6)
    written = 0
    with path.open("w") as fh:
        while written < target:
            n_words = int(rng.integers(300, 3000))
            words = np.asarray(_WORDS)[rng.integers(0, len(_WORDS), n_words)]
            sentences = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
            digits = "".join(map(str, rng.integers(0, 10, 5)))
            line = json.dumps({"text": " ".join(sentences) + f" The pass key is {digits}."}) + "\n"
            fh.write(line)
            written += len(line)
    return written


def _child(args: argparse.Namespace) -> None:
    """One build in this (fresh) process: prints a JSON line with its figures."""
    tok = Tokenizer(args.tokenizer)
    cfg = DataConfig(source="files", paths=[args.corpus], cache_dir=args.cache, tokenizer=args.tokenizer,
                     tokenize_workers=args.workers)
    t0 = time.perf_counter()
    if args.mode == "list":
        shards = write_shards(list(iter_documents(cfg)), tok, Path(args.cache) / "list", shard_tokens=cfg.shard_tokens)
    else:
        root = Path(args.cache)
        existed = any((root / "shards-v2").glob("*/index.json")) if (root / "shards-v2").is_dir() else False
        shards = TokenShards(stream_shards(cfg, tok, root, bos=True, eos=True))
    seconds = time.perf_counter() - t0
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"seconds": seconds, "tokens": shards.num_tokens, "rss_mb": self_kb / 1024,
                      "worker_rss_mb": child_kb / 1024, "reused": args.mode != "list" and existed}))


def _run_child(corpus: Path, tokenizer: Path, cache: Path, workers: int, mode: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "longreach.data.bench", "--child", "--corpus", str(corpus), "--tokenizer",
           str(tokenizer), "--cache", str(cache), "--workers", str(workers), "--mode", mode]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longreach.data.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[50, 100, 200], help="corpus sizes in MB")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes (data.tokenize_workers)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the sizes")
    p.add_argument("--baseline", action="store_true", help="also time the in-memory (pre-streaming) builder")
    p.add_argument("--out", default="runs/bench_data", help="work folder (corpora, caches) and results.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpora: dict[float, tuple[Path, int]] = {}
    for mb in args.sizes:
        f = out / f"corpus_{mb:g}MB.jsonl"
        size = f.stat().st_size if f.is_file() else write_corpus(f, mb)
        corpora[mb] = (f, size)
    tokenizer = out / "bench.model"
    if not tokenizer.is_file():
        sample = out / "sample.jsonl"
        write_corpus(sample, 2, seed=1)
        train_tokenizer([json.loads(x)["text"] for x in sample.read_text().splitlines()], 1024, tokenizer)
    modes = ["stream", "list"] if args.baseline else ["stream"]
    runs: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for mb in args.sizes:
            for mode in (modes if r % 2 == 0 else modes[::-1]):  # alternate which arm goes first
                cache = out / f"cache_{mb:g}_{mode}"
                shutil.rmtree(cache, ignore_errors=True)
                res = _run_child(corpora[mb][0], tokenizer, cache, args.workers, mode)
                res["mb_s"] = corpora[mb][1] / 1e6 / res["seconds"]
                runs.setdefault((mb, mode), []).append(res)
                print(f"round {r + 1} {mb:g} MB {mode}: {res['mb_s']:.2f} MB/s, rss {res['rss_mb']:.0f} MB, "
                      f"worker rss {res['worker_rss_mb']:.0f} MB", file=sys.stderr)
    rows = []
    for (mb, mode), rs in runs.items():
        reuse = _run_child(corpora[mb][0], tokenizer, out / f"cache_{mb:g}_{mode}", args.workers, mode) \
            if mode == "stream" else None
        speeds = [x["mb_s"] for x in rs]
        rows.append({"mb": corpora[mb][1] / 1e6, "mode": mode, "workers": args.workers if mode == "stream" else 0,
                     "mb_s_median": statistics.median(speeds), "mb_s_min": min(speeds), "mb_s_max": max(speeds),
                     "tokens": rs[0]["tokens"], "rss_mb_max": max(x["rss_mb"] for x in rs),
                     "worker_rss_mb_max": max(x["worker_rss_mb"] for x in rs),
                     "reuse_s": reuse["seconds"] if reuse else None, "reused": reuse["reused"] if reuse else None})
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print("| MB | builder | workers | MB/s median (min–max) | tokens | peak RSS builder | peak RSS worker | 2nd run |")
    print("|---|---|---|---|---|---|---|---|")
    for x in rows:
        second = f"{x['reuse_s']:.2f} s, reused={x['reused']}" if x["reuse_s"] is not None else "—"
        print(f"| {x['mb']:.0f} | {x['mode']} | {x['workers']} | {x['mb_s_median']:.2f} ({x['mb_s_min']:.2f}–"
              f"{x['mb_s_max']:.2f}) | {x['tokens']:,} | {x['rss_mb_max']:.0f} MB | {x['worker_rss_mb_max']:.0f} MB "
              f"| {second} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
