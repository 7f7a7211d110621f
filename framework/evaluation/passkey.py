"""Passkey retrieval across context lengths × depths (the LongLoRA / Landmark Attention protocol).

Filler "The grass is green. …" repeated, "The pass key is N. Remember it. N is the pass key." at a
depth, N random in [1, 50000]; greedy decoding of the answer's token count; exact match. The prompt is
sized to the target length in tokens. Results: per-sample records, a lengths × depths accuracy table
(markdown and JSON) and a heat-map PNG (matplotlib, Agg backend).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from longreach.data.synthetic import FILLER, passkey_prompt
from longreach.errors import UserError
from longreach.evaluation.common import TextCodec, greedy_decode


@dataclass
class PasskeyRecord:
    length: int
    depth: float
    seed: int
    key: int
    prompt_tokens: int
    answer: str
    generated: str
    correct: bool


def build_prompt(codec: TextCodec, length: int, depth: float, key: int) -> tuple[list[int], list[int], str]:
    """Prompt ids of at most ``length`` − answer tokens, the answer's ids, and the answer text.

    The filler count is the largest whose prompt plus answer fits in ``length`` tokens.
    """
    per = max(1, len(codec.encode(" " + FILLER)))
    answer = str(key)

    def sample(n: int) -> tuple[list[int], list[int]]:
        s = passkey_prompt(n, depth, key)
        prompt = codec.encode(s.prompt)
        full = codec.encode(s.prompt + " " + answer)
        ans = full[len(prompt):] if full[:len(prompt)] == prompt else codec.encode(" " + answer)
        return prompt, ans

    n = max(0, length // per)
    prompt, ans = sample(n)
    while n > 0 and len(prompt) + len(ans) > length:
        n -= max(1, (len(prompt) + len(ans) - length) // per)
        n = max(n, 0)
        prompt, ans = sample(n)
    if len(prompt) + len(ans) > length:
        raise UserError(f"passkey length {length} is too short for the prompt ({len(prompt) + len(ans)} tokens)")
    return prompt, ans, answer


def passkey_retrieval(model: torch.nn.Module | None, tokenizer: Any, *, lengths: list[int], depths: list[float],
                      seeds: int = 10, seed: int = 0,
                      decode: Callable[[list[int], int], list[int]] | None = None) -> list[PasskeyRecord]:
    """Run passkey retrieval for every (length, depth, seed).

    Args:
        model: an HF causal LM, patched (context-parallel or not); every rank calls this.
        tokenizer: a longreach ``Tokenizer`` or an HF tokenizer.
        lengths: prompt lengths in tokens.
        depths: key depths in [0, 1].
        seeds: samples per (length, depth), each with its own random key.
        seed: base seed of the keys.
        decode: ``decode(prompt_ids, n_new) -> ids`` in place of greedy decoding of ``model`` (longreach's
            own models, :class:`~longreach.evaluation.runner.OpenModel`).

    Returns:
        One record per sample (identical on every rank).
    """
    codec = TextCodec(tokenizer)
    if decode is None:
        model.eval()

        def decode(ids: list[int], n_new: int) -> list[int]:
            return greedy_decode(model, ids, n_new, pad_id=codec.pad_id)
    records = []
    for length in lengths:
        for depth in depths:
            for s in range(seeds):
                rng = np.random.default_rng([seed, length, int(round(depth * 1000)), s])
                key = int(rng.integers(1, 50001))
                prompt, ans, answer = build_prompt(codec, length, float(depth), key)
                gen = decode(prompt, len(ans))
                text = codec.decode(gen).strip().rstrip(".")
                records.append(PasskeyRecord(length=length, depth=float(depth), seed=s, key=key,
                                             prompt_tokens=len(prompt), answer=answer, generated=text,
                                             correct=(gen == ans) or text == answer))
    return records


def accuracy_table(records: list[PasskeyRecord]) -> dict[str, Any]:
    """``{"lengths": [...], "depths": [...], "accuracy": [[acc per depth] per length], "overall": x}``."""
    lengths = sorted({r.length for r in records})
    depths = sorted({r.depth for r in records})
    acc = []
    for length in lengths:
        row = []
        for d in depths:
            hits = [r.correct for r in records if r.length == length and r.depth == d]
            row.append(float(np.mean(hits)) if hits else float("nan"))
        acc.append(row)
    overall = float(np.mean([r.correct for r in records])) if records else float("nan")
    return {"lengths": lengths, "depths": depths, "accuracy": acc, "overall": overall}


def markdown_table(table: dict[str, Any]) -> str:
    """The accuracy table as markdown (rows: lengths, columns: depths)."""
    head = "| length | " + " | ".join(f"depth {d:.2f}" for d in table["depths"]) + " | mean |"
    sep = "|---:|" + "---:|" * (len(table["depths"]) + 1)
    rows = [head, sep]
    for length, row in zip(table["lengths"], table["accuracy"]):
        rows.append(f"| {length} | " + " | ".join(f"{a:.2f}" for a in row) + f" | {np.nanmean(row):.2f} |")
    return "\n".join(rows)


def heatmap(table: dict[str, Any], path: str | Path, *, title: str = "passkey retrieval accuracy") -> Path:
    """Write a lengths × depths accuracy heat-map PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.asarray(table["accuracy"], dtype=float)  # [lengths, depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * max(1, acc.shape[1]), 1.2 + 0.5 * max(1, acc.shape[0])))
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(table["depths"])), [f"{d:.2f}" for d in table["depths"]])
    ax.set_yticks(range(len(table["lengths"])), [str(n) for n in table["lengths"]])
    ax.set_xlabel("depth of the key")
    ax.set_ylabel("context (tokens)")
    ax.set_title(title)
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.1f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_results(records: list[PasskeyRecord], out_dir: str | Path, *, title: str = "passkey retrieval accuracy"
                  ) -> dict[str, Any]:
    """Write ``passkey.json`` (records + table), ``passkey.md`` and ``passkey.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = accuracy_table(records)
    (out / "passkey.json").write_text(json.dumps({"table": table, "records": [asdict(r) for r in records]}, indent=1))
    (out / "passkey.md").write_text(markdown_table(table) + "\n")
    heatmap(table, out / "passkey.png", title=title)
    return table
