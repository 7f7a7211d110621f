"""Study "extension": a base model pretrained at L, extended to 4L with each recipe (CPU, minutes).

1. **Data.** The embedded corpus (standard-library docstrings + passkey and associative-recall tasks,
   digits one token each). Pre-training tasks are at most ~L tokens long and ``aligned_fraction`` of the
   pre-training windows start at a task's first token (the rest anywhere), so whole tasks are seen often;
   the fine-tuning mix is one *fresh* passkey task per fine-tuning sequence, each 2L to ~4L tokens long, half
   with the key at a uniform depth (keys up to ~4L back), half with it within L/2 of the question (in reach of
   the sparse training patterns), plus fresh recall tasks, packed whole
   into the fine-tuning loader's windows of 4L with the training docstrings filling the rest. The data step
   records how far back the keys of each mix lie. Held-out docstring modules are the perplexity text.
2. **Base model.** A tiny Llama pretrained with longreach at L and exported to HF (weights, config,
   sentencepiece tokenizer). The study checks that it retrieves passkeys at L: an extension can only
   be judged against a base that retrieves where it was trained.
3. **Recipes**, all from the HF export extended to 4L with ``finetune_rope``: LongLoRA (LoRA + S2-Attn,
   embeddings and norms trained), SinkLoRA (LoRA + SF-Attn + 4 sinks), full fine-tuning with full attention;
   and three baselines without any training: RoPE scaled by PI, by YaRN with its published beta (32 / 1,
   attention factor 0.1 ln s + 1) and by YaRN with beta counted for this L (``yarn_*``). The recipes use PI
   as LongLoRA and SinkLoRA publish it; ``finetune_rope: yarn`` fine-tunes from YaRN with beta for L instead,
   which keeps the base's retrieval at L (PI does not).
4. **Evaluation** of every model with full attention (LongLoRA protocol): perplexity at L, 2L, 4L
   (independent windows every 256 tokens) and passkey accuracy by depth at L and 4L (greedy decoding,
   exact match, ``seeds`` keys per depth); heat-maps depth × length per model.

Once the base exists, the recipes (fine-tune, then evaluate) and the untrained evaluations are independent:
``longreach study extension --workers N`` runs them in N processes of one torch thread each, with the same
numbers as one after another.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longreach.data.synthetic import FILLER
from longreach.studies.base import (Finding, Step, StudyContext, StudyResult, Table, TinyLMConfig,
                                    embedded_documents, encode_documents, lm_step, register, warmup_decay)

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
PASSKEY_INTRO = "There is an important piece"
"""The first words of every passkey document (how the data step tells them from the other tasks)."""


@dataclass(kw_only=True, slots=True)
class ExtensionConfig(TinyLMConfig):
    """Everything the study's numbers depend on (``configs/study_extension.yaml``). ``seq_len`` is the
    pre-training context L, ``batch``/``lr`` the base model's (30 warm-up steps), ``task_chars`` the longest
    pre-training task (~L tokens; the fine-tuning tasks reach ``factor`` x this)."""

    factor: int = 4
    """Context extension factor."""
    pretrain_steps: int = 2500
    """Base model optimizer steps."""
    finetune_steps: int = 1200
    """Optimizer steps of each extension recipe."""
    finetune_batch: int = 4
    """Sequences of ``factor`` x L tokens per fine-tuning step."""
    lora_lr: float = 2e-3
    """Learning rate of the LoRA recipes."""
    lora_rank: int = 8
    """LoRA rank r of the LoRA recipes, with alpha = 2r (LongLoRA's r 8, alpha 16: the same alpha / r scale at
    every rank)."""
    full_lr: float = 1e-3
    """Learning rate of full fine-tuning."""
    aligned_fraction: float = 0.75
    """Share of pre-training windows that start at a task document's first token (the rest start anywhere,
    so text is seen at every offset)."""
    finetune_rope: str = "linear"
    """RoPE scaling of the fine-tuned recipes: ``linear`` (position interpolation, what LongLoRA and SinkLoRA
    publish) or ``yarn`` (with the ``yarn_*`` settings below)."""
    yarn_beta_fast: float = 2.0
    """YaRN's beta: frequencies that rotate more than this many times over L are kept as they are. The
    published 32 is meant for L = 4096: at L = 128 with head_dim 32 the fastest frequency rotates ~20 times, so
    32 interpolates every frequency, like PI."""
    yarn_beta_slow: float = 1.0
    """YaRN's alpha: frequencies that rotate fewer times than this over L are fully interpolated (ramp between)."""
    yarn_attention_factor: float = 1.0
    """YaRN's multiplier of cos/sin (attention temperature); the published 0.1 ln s + 1 is used by the
    "YaRN (published)" baseline."""
    finetune_task_chars: int = 1700
    """Longest fine-tuning task in characters (a passkey task of ~``factor`` x L tokens; the fine-tuning passkey
    tasks are half as long up to this)."""
    seeds: int = 10
    """Passkey keys per (length, depth)."""
    ppl_windows: int = 16
    """Perplexity windows per length."""

    def __post_init__(self) -> None:
        TinyLMConfig.__post_init__(self)
        for name in ("pretrain_steps", "finetune_steps", "finetune_batch", "seeds", "ppl_windows",
                     "finetune_task_chars", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.aligned_fraction <= 1.0:
            raise ValueError(f"aligned_fraction must be in [0, 1], got {self.aligned_fraction}")
        if self.finetune_rope not in ("linear", "yarn"):
            raise ValueError(f"finetune_rope must be linear or yarn, got {self.finetune_rope!r}")
        if not 0 < self.yarn_beta_slow < self.yarn_beta_fast:
            raise ValueError(f"yarn_beta_slow must be in (0, yarn_beta_fast), got {self.yarn_beta_slow}, "
                             f"{self.yarn_beta_fast}")
        if self.factor < 2:
            raise ValueError(f"factor must be >= 2 (an extension), got {self.factor}")

    def quick(self) -> "ExtensionConfig":
        """The smallest setting (tests): a few steps of everything."""
        return replace(self, seq_len=128, factor=2, dim=32, n_layers=1, n_heads=2, pretrain_steps=4, batch=2, vocab_size=400,
                       harvest_chars=30_000, task_chars=250, finetune_task_chars=500, finetune_steps=2, finetune_batch=1, seeds=1,
                       ppl_windows=1)


def _finetune_api() -> dict[str, Any]:
    """The HF fine-tuning job's config classes and entry point (the one import of them here)."""
    from longreach.hf import config, train

    api = {name: getattr(config, name) for name in ("FinetuneConfig", "FTAttention", "FTData", "FTRun", "FTTrain",
                                                     "HFSource")}
    return {**api, "finetune": train.finetune}


def _encode(tok: Any, docs: list[str], idx: Any) -> list[np.ndarray]:
    """Each of ``docs[idx]`` as ``[n]`` int64 ids between BOS and EOS."""
    return [np.asarray([tok.bos_id] + tok.encode(docs[int(i)]) + [tok.eos_id], dtype=np.int64) for i in idx]


def _pack(tasks: list[np.ndarray], text: np.ndarray, width: int) -> np.ndarray:
    """``[W * width]`` tokens: windows of ``width`` that each hold whole task documents from their first token,
    the rest of the window running text (``text`` read on cyclically). Tasks longer than ``width`` are left out.
    The fine-tuning loader cuts its windows at multiples of ``width``, so every task there is seen whole."""
    windows, pos, i = [], 0, 0
    tasks = [t for t in tasks if len(t) <= width]
    while i < len(tasks):
        parts, used = [], 0
        while i < len(tasks) and used + len(tasks[i]) <= width:
            parts.append(tasks[i])
            used, i = used + len(tasks[i]), i + 1
        fill = np.take(text, np.arange(pos, pos + width - used), mode="wrap")  # [width - used]
        pos += width - used
        windows.append(np.concatenate(parts + [fill]))
    return np.concatenate(windows)


def _key_distances(tok: Any, docs: list[str]) -> np.ndarray:
    """``[P]`` tokens from the key of each passkey document among ``docs`` to its answer: how far back the model
    must look to answer (0 where the key sits right before the question; other documents are skipped)."""
    from longreach.data.synthetic import PASSKEY_QUESTION

    needle = "The pass key is"
    dist = []
    for d in docs:
        if not d.startswith(PASSKEY_INTRO):
            continue
        key_end = d.index(needle) + len(needle)  # the key follows
        ask_end = d.rindex(PASSKEY_QUESTION) + len(PASSKEY_QUESTION)  # the answer follows
        dist.append(len(tok.encode(d[:ask_end])) - len(tok.encode(d[:key_end])))
    return np.asarray(dist, dtype=np.int64)


def _distance_summary(dist: np.ndarray, seq_len: int) -> dict[str, Any]:
    """Key-to-answer distances ``[P]`` as the data step records them: count, quartiles, maximum and the share
    of keys farther back than ``seq_len`` (what the base, trained at L, never had to reach)."""
    if not len(dist):
        return {"tasks": 0, "quartiles": [], "max": 0, "beyond_L": 0.0}
    return {"tasks": int(len(dist)), "quartiles": [int(q) for q in np.quantile(dist, [0.25, 0.5, 0.75])],
            "max": int(dist.max()), "beyond_L": float(np.mean(dist > seq_len))}


def _long_passkeys(count: int, max_chars: int, near: int, rng: np.random.Generator) -> list[str]:
    """``count`` passkey documents of ``max_chars // 2`` to ``max_chars`` characters (the generic generator draws
    lengths from one filler repeat up, which leaves few keys far back). Every other document has its key at a
    uniform depth, so that key-to-answer distances spread evenly up to the document's length; the others have
    it at most ``near`` filler repeats before the question, within the reach of the sparse training patterns
    (S2 and SF attend within groups of a quarter of the window, half the heads shifted by half a group), which
    cannot learn a lookup from keys they do not see."""
    from longreach.data.synthetic import passkey_prompt

    most = max(1, max_chars // (len(FILLER) + 1))  # filler repeats in max_chars
    docs = []
    for i in range(count):
        n = int(rng.integers((most + 1) // 2, most + 1))
        depth = float(rng.random()) if i % 2 == 0 else (n - int(rng.integers(0, min(near, n) + 1))) / n
        docs.append(passkey_prompt(n, depth, int(rng.integers(1, 50001))).text)
    return docs


def _data(cfg: ExtensionConfig, out: Path) -> dict[str, Any]:
    """Write pretrain/fine-tune/held-out token files (and the pre-training task starts); return their sizes
    and the tokenizer file."""
    tok, docs, n_text = embedded_documents(cfg, out / "cache", task_chars=cfg.task_chars)
    rng = np.random.default_rng(cfg.seed)
    held = np.sort(rng.permutation(n_text)[:max(4, n_text // 20)])  # held-out docstring modules
    keep = rng.permutation(np.setdiff1d(np.arange(len(docs)), held))
    pieces = _encode(tok, docs, keep)
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])  # [D] first token of each document
    train = np.concatenate(pieces)  # [N]
    task_starts = starts[keep >= n_text]  # documents after the docstrings are tasks
    val = encode_documents(tok, docs, held)  # [N_val] natural text only
    # fine-tuning: one fresh passkey task per fine-tuning sequence, each filling half to most of the factor x L
    # window, half of them with the key at any depth (up to ~factor x L back), half with it within L/2 of the
    # question; plus fresh recall tasks (the seed shifts their contents), packed whole into windows of factor x L
    # whose remainder is the training docstrings
    _, long_docs, _ = embedded_documents(replace(cfg, seed=cfg.seed + 1), out / "cache",
                                         task_chars=cfg.finetune_task_chars, tokenizer=str(tok.path))
    near = max(1, cfg.seq_len // 2 // len(tok.encode(" " + FILLER)))  # filler repeats in L/2 tokens
    keys = _long_passkeys(cfg.finetune_steps * cfg.finetune_batch, cfg.finetune_task_chars, near, rng)
    tasks = keys + [d for d in long_docs[n_text:] if not d.startswith(PASSKEY_INTRO)]
    text_idx = rng.permutation(np.setdiff1d(np.arange(n_text), held))
    tune = _pack(_encode(tok, tasks, rng.permutation(len(tasks))), encode_documents(tok, long_docs, text_idx),
                 cfg.factor * cfg.seq_len)
    for name, arr in (("pretrain", train), ("finetune", tune), ("val", val)):
        np.save(out / f"{name}_tokens.npy", arr)
    np.save(out / "pretrain_task_starts.npy", task_starts)
    # how far back each passkey task's answer must look: the base's tasks stay inside L, the fine-tuning tasks
    # reach ~factor x L
    return {"documents": len(docs), "docstring_modules": n_text, "held_out": len(held), "pretrain_tokens": len(train),
            "pretrain_tasks": len(task_starts), "finetune_tokens": len(tune), "finetune_passkey_docs": len(keys),
            "finetune_tasks": len(tasks), "val_tokens": len(val), "tokenizer": str(tok.path),
            "pretrain_key_distance": _distance_summary(_key_distances(tok, docs[n_text:]), cfg.seq_len),
            "finetune_key_distance": _distance_summary(_key_distances(tok, keys), cfg.seq_len),
            "finetune_windows": len(tune) // (cfg.factor * cfg.seq_len)}


def _pretrain(cfg: ExtensionConfig, out: Path, tokenizer: str, ctx: StudyContext) -> dict[str, Any]:
    """Train the base model at L and export it to HF (``base_hf``)."""
    from longreach.data.tokenizer import Tokenizer
    from longreach.hf.convert import save_hf

    train = torch.as_tensor(np.load(out / "pretrain_tokens.npy"))  # [N]
    task_starts = np.load(out / "pretrain_task_starts.npy")  # [T]
    last = len(train) - cfg.seq_len - 1
    rng = np.random.default_rng(cfg.seed)
    model = cfg.build_model(Tokenizer(tokenizer).vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = warmup_decay(opt, cfg.pretrain_steps, 30)
    span = torch.arange(cfg.seq_len + 1)
    losses = []
    for step in range(cfg.pretrain_steps):
        starts = rng.integers(0, last, cfg.batch)  # [B]
        aligned = rng.random(cfg.batch) < cfg.aligned_fraction
        starts[aligned] = np.minimum(rng.choice(task_starts, int(aligned.sum())), last)
        losses.append(lm_step(model, opt, sched, train[torch.as_tensor(starts)[:, None] + span]))  # batch [B, L+1]
        if step % 250 == 0 or step == cfg.pretrain_steps - 1:
            ctx.log(f"pretrain step {step}/{cfg.pretrain_steps} loss {losses[-1]:.3f}")
    save_hf(model.eval(), out / "base_hf", sp_model_file=tokenizer)
    return {"first_loss": losses[0], "last_loss": float(np.mean(losses[-20:]))}


@torch.no_grad()
def _copy_nll(model: Any, tok: Any, cfg: ExtensionConfig) -> float:
    """Mean loss (nats per digit; chance ln 10 = 2.30) on the key's second occurrence in passkey prompts of L
    tokens ("The pass key is N. Remember it. N is the pass key."): copying digits from ~8 tokens back, the
    in-context copy that every retrieved answer also needs. ``seeds`` five-digit keys at depth 0.5."""
    from longreach.evaluation.common import TextCodec
    from longreach.evaluation.passkey import build_prompt

    codec = TextCodec(tok)
    losses = []
    for s in range(cfg.seeds):
        key = int(np.random.default_rng([cfg.seed, 8, s]).integers(10_000, 50_001))
        prompt, ans, answer = build_prompt(codec, cfg.seq_len, 0.5, key)
        digits = ans[-len(answer):]  # one token per digit
        second = [i for i in range(len(prompt) - len(digits)) if prompt[i:i + len(digits)] == digits][1]
        logits = model(input_ids=torch.as_tensor([prompt[:second + len(digits)]])).logits[0]  # [S, V]
        logp = torch.log_softmax(logits[second - 1:second - 1 + len(digits)].float(), dim=-1)  # [5, V]
        losses.append(-float(logp[torch.arange(len(digits)), torch.as_tensor(digits)].mean()))
    return float(np.mean(losses))


def _evaluate(checkpoint: Path, val: np.ndarray, cfg: ExtensionConfig, rope: Any = None) -> dict[str, Any]:
    """Perplexity at L, 2L, 4L, passkey accuracy by depth at L and 4L and the digit-copy loss at L
    (:func:`_copy_nll`), with full attention.

    ``rope``: a :class:`~longreach.hf.rope.RopeScaling` applied to the loaded model without training.
    """
    from longreach.evaluation.passkey import accuracy_table, passkey_retrieval
    from longreach.evaluation.perplexity import perplexity
    from longreach.hf.load import load_hf
    from longreach.hf.patch import AttentionPatch, patch_attention
    from longreach.hf.rope import apply_rope_scaling, rebuild_rotary

    long = cfg.factor * cfg.seq_len
    model, tok = load_hf(checkpoint, dtype=torch.float32, device="cpu")
    if rope is not None:
        apply_rope_scaling(model.config, rope, target_len=long)
        rebuild_rotary(model)
    patch_attention(model, AttentionPatch(backend="cpu"))
    ppl = {}
    for n in sorted({cfg.seq_len, 2 * cfg.seq_len, long}):
        ppl[str(n)] = perplexity(model, val, length=n, stride=256, max_windows=cfg.ppl_windows).ppl
    recs = passkey_retrieval(model, tok, lengths=[cfg.seq_len, long], depths=DEPTHS, seeds=cfg.seeds, seed=cfg.seed)
    table = accuracy_table(recs)
    return {"ppl": ppl, "passkey": {str(n): row for n, row in zip(table["lengths"], table["accuracy"])},
            "copy_nll": _copy_nll(model, tok, cfg),
            "examples": [(r.length, r.answer, r.generated) for r in recs[:: max(1, len(recs) // 6)]]}


BASELINES: dict[str, tuple[str, str]] = {
    "PI, no fine-tune": ("eval-pi", "linear"),
    "YaRN (published beta 32), no fine-tune": ("eval-yarn-published", "yarn-published"),
    "YaRN (beta for L), no fine-tune": ("eval-yarn", "yarn"),
}
"""Row name -> (step key, :func:`_rope` kind) of the extensions without training."""

RECIPES: dict[str, tuple[str, str]] = {
    "LongLoRA (LoRA + S2)": ("longlora", "s2"),
    "SinkLoRA (LoRA + SF + 4 sinks)": ("sinklora", "sf"),
    "full fine-tune (full attention)": ("full", "full"),
}
"""Recipe row name -> (recipe.method, attention.pattern)."""


def _rope(cfg: ExtensionConfig, kind: str) -> Any:
    """The :class:`~longreach.hf.rope.RopeScaling` to ``factor`` x L of ``kind``: ``linear`` (PI), ``yarn`` (the
    study's betas and attention factor) or ``yarn-published`` (transformers' defaults: beta 32 / 1, attention
    factor 0.1 ln s + 1)."""
    from longreach.hf.rope import RopeScaling

    factor = float(cfg.factor)
    if kind == "yarn":
        return RopeScaling(type="yarn", factor=factor, beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow,
                           attention_factor=cfg.yarn_attention_factor)
    return RopeScaling(type="yarn" if kind == "yarn-published" else "linear", factor=factor)


def _finetune(cfg: ExtensionConfig, out: Path, method: str, pattern: str, lora_targets: list[str] | None = None
              ) -> dict[str, Any]:
    """Extend the base export to 4L with one recipe (``finetune_rope``); the export lands in
    ``METHOD_PATTERN/export``. ``lora_targets``: the modules LoRA adapts (None: the recipe's, q/k/v/o)."""
    from longreach.hf.recipes import RecipeConfig
    from longreach.parallel.config import ParallelConfig

    ft = _finetune_api()
    run = out / f"{method}_{pattern}"
    job = ft["FinetuneConfig"](
        hf=ft["HFSource"](path=str(out / "base_hf"), dtype="float32"),
        recipe=RecipeConfig(method=method, target_len=cfg.factor * cfg.seq_len, rope=_rope(cfg, cfg.finetune_rope),
                            lora_r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank,
                            **({} if lora_targets is None else {"lora_targets": list(lora_targets)})),
        attention=ft["FTAttention"](pattern=pattern, backend="cpu"),
        parallel=ParallelConfig(cp=1),
        data=ft["FTData"](source="tokens", tokens_path=str(out / "finetune_tokens.npy"), seed=cfg.seed),
        run=ft["FTRun"](out_dir=str(run), steps=cfg.finetune_steps, log_every=50, seed=cfg.seed, overwrite=True),
        train=ft["FTTrain"](lr=cfg.full_lr if method == "full" else cfg.lora_lr, warmup_steps=5,
                            micro_batch_size=cfg.finetune_batch),
    )
    summary = ft["finetune"](job)
    losses = summary.get("losses") or []
    return {"trainable_fraction": summary["trainable"]["fraction"], "export": str(run / "export"),
            "last_loss": float(np.mean(losses[-10:])) if losses else None}


@register("extension", ExtensionConfig,
          "context extension L -> 4L: LongLoRA, SinkLoRA, full fine-tune, PI/YaRN without training "
          "(passkey by depth, perplexity at L/2L/4L)")
def run(cfg: ExtensionConfig, ctx: StudyContext) -> StudyResult:
    out = ctx.out
    data = ctx.step("data", lambda: _data(cfg, out))
    ctx.log(f"data: {data['documents']} documents, {data['pretrain_tokens']} pre-training tokens, "
            f"{data['finetune_tokens']} fine-tuning tokens ({data['finetune_passkey_docs']} passkey documents "
            f"up to ~{cfg.factor}L), {data['val_tokens']} held-out tokens")
    for part in ("pretrain", "finetune"):
        kd = data[f"{part}_key_distance"]
        ctx.log(f"{part} passkey tasks: {kd['tasks']}, key-to-answer distance quartiles {kd['quartiles']} tokens, "
                f"max {kd['max']}, {100 * kd['beyond_L']:.0f}% farther than L={cfg.seq_len}")
    base = ctx.step("pretrain", lambda: _pretrain(cfg, out, data["tokenizer"], ctx))
    val = np.load(out / "val_tokens.npy")
    base_hf = out / "base_hf"
    # the recipes (fine-tune, then evaluate the export) and the untrained evaluations are independent once the
    # base exists: ctx.workers processes run them at once, the longest (the fine-tuning chains) queued first
    chains = [Step(key=f"finetune-{method}-{pattern}", fn=_finetune, args=(cfg, out, method, pattern),
                   then=lambda ft, k=f"{method}-{pattern}": Step(key=f"eval-{k}", fn=_evaluate,
                                                                  args=(Path(ft["export"]), val, cfg)))
              for method, pattern in RECIPES.values()]
    chains.append(Step(key="eval-base", fn=_evaluate, args=(base_hf, val, cfg)))
    chains += [Step(key=key, fn=_evaluate, args=(base_hf, val, cfg, _rope(cfg, kind)))
               for key, kind in BASELINES.values()]
    done = ctx.steps(chains)
    rows: dict[str, dict[str, Any]] = {"base (no fine-tune, no scaling)": done["eval-base"]}
    rows.update({name: done[key] for name, (key, _) in BASELINES.items()})
    trainable: dict[str, float] = {}
    for name, (method, pattern) in RECIPES.items():
        trainable[name] = done[f"finetune-{method}-{pattern}"]["trainable_fraction"]
        rows[name] = done[f"eval-{method}-{pattern}"]
    return _report(cfg, ctx, rows, trainable, data, base)


def _report(cfg: ExtensionConfig, ctx: StudyContext, rows: dict[str, dict[str, Any]], trainable: dict[str, float],
            data: dict[str, Any], base: dict[str, Any]) -> StudyResult:
    n1, n4 = str(cfg.seq_len), str(cfg.factor * cfg.seq_len)
    lens = list(rows[next(iter(rows))]["ppl"])
    ppl_table = Table(title="Perplexity on held-out text and passkey accuracy (full-attention evaluation)",
                      columns=["model", "trainable"] + [f"ppl @{n}" for n in lens]
                      + [f"passkey @{n1}", f"passkey @{n4}", f"digit-copy loss @{n1}"],
                      rows=[[name, f"{100 * trainable[name]:.1f}%" if name in trainable else "–"]
                            + [r["ppl"][n] for n in lens]
                            + [float(np.mean(r["passkey"][n1])), float(np.mean(r["passkey"][n4])), r["copy_nll"]]
                            for name, r in rows.items()],
                      note=f"L = {cfg.seq_len}, extended to {cfg.factor}L = {n4}; the fine-tuned recipes use "
                           + ("linear position interpolation (PI)" if cfg.finetune_rope == "linear" else
                              f"YaRN (beta {cfg.yarn_beta_fast:g}/{cfg.yarn_beta_slow:g}, attention factor "
                              f"{cfg.yarn_attention_factor:g})")
                           + f"; passkey: {cfg.seeds} keys x {len(DEPTHS)} depths per length; digit-copy loss: "
                           "nats per digit on the key's second occurrence, ~8 tokens after the first (chance 2.30).")
    depth_table = Table(title="Passkey accuracy by depth of the key",
                        columns=["model", "length"] + [f"depth {d:.2f}" for d in DEPTHS],
                        rows=[[name, int(n)] + list(r["passkey"][n]) for name, r in rows.items() for n in (n1, n4)])
    findings = _findings(cfg, rows, data.get("finetune_key_distance"))
    plots = _plots(cfg, ctx, rows)
    return StudyResult(tables=[ppl_table, depth_table], findings=findings, plots=plots,
                       data={"rows": rows, "trainable_fraction": trainable, "data": data, "pretrain": base,
                             "depths": DEPTHS})


LORA_MEASURED = (
    "measured beside the recipe's 1800-step run, on its base and fine-tuning data (the LongLoRA arm alone, "
    "`python -m longreach.studies.extension_arm RUN ARM --rank R [--mlp] [--attention full] --steps S`, lora_rank r "
    "with alpha 2r; passkey @128 / @512, digit-copy loss): not the rank alone: "
    "r 8 / 32 / 64 after 800 steps 0.02 / 0.00 / 0.02, 0 / 0 / 0, 0.18 / 0.08 / 0.12 (full fine-tuning after 800 "
    "steps: 0.06, 0.06 (depth 1 only), 0.37: retrieval at 4L needs more than 800 steps here), r 64 after 1800 steps "
    "0.14, 0, 0.37 (r 8: 0.02, 0, 0.17); nor the frozen MLPs: r 8 with LoRA also on gate, up and down after 1800 "
    "steps 0.04, 0, 0.11; nor S2: r 8 with full attention after 1800 steps 0.08, 0.04 (depth 1 only), 0.90, though "
    "ppl@512 12.87 (full fine-tuning 12.36, with S2 16.93); all three lifted at once (r 64 on attention and MLP, "
    "full attention) it retrieves: 0.12, 0.58 (keys farther than L 0.50, full fine-tuning 0.60), 0.38, at r 8 so "
    "lifted 0.02, 0.12 (keys farther than L 0.08), 0.61: the LoRA recipes' restrictions together, none alone"
)
"""What the LoRA recipes' rank, frozen MLPs and sparse training pattern were measured to cost them (quoted when they
fail under PI)."""


def far_accuracy(cfg: ExtensionConfig, record: dict[str, Any]) -> float:
    """Passkey accuracy of an :func:`_evaluate` record at 4L with the key farther than ~L before the question
    (the depths below 1: keys the base, trained at L, never had to reach)."""
    at4 = record["passkey"][str(cfg.factor * cfg.seq_len)]
    return float(np.mean([at4[i] for i, d in enumerate(DEPTHS) if d < 1.0]))


def _no_retrieval_why(cfg: ExtensionConfig, rows: dict[str, dict[str, Any]], far: Any, tasks: str, copying: str
                      ) -> str:
    """Why the retrieval finding failed, from the numbers: which recipes reach keys farther than L back at 4L
    (``far(name)``: their accuracy there) and what the others lost, or, when none does, what the base can reach."""
    n1, n4 = str(cfg.seq_len), str(cfg.factor * cfg.seq_len)
    base_name = "base (no fine-tune, no scaling)"
    pi_name, yarn_paper, yarn_name = list(BASELINES)
    pk1 = {name: float(np.mean(r["passkey"][n1])) for name, r in rows.items()}
    reached = [k for k in RECIPES if far(k) > far(base_name)]
    if reached:
        others = [k for k in RECIPES if k not in reached]
        return (f"{', '.join(f'{k} ({far(k):.2f})' for k in reached)} reach keys farther than L back at {n4} "
                f"(base {far(base_name):.2f}) after {cfg.finetune_steps} steps ({tasks}); "
                f"{', '.join(f'{k} ({far(k):.2f}, passkey @{n1} {pk1[k]:.2f})' for k in others)} do not, "
                f"trained on the same data ({copying})"
                + (f"; the LoRA recipes' failure {LORA_MEASURED}"
                   if cfg.finetune_rope == "linear" and set(others) & set(list(RECIPES)[:2]) else ""))
    return (f"this {cfg.n_layers}-layer base retrieves only keys within ~L of the question: with its "
            f"positions kept in the trained range ({yarn_name}: passkey @{n1} {pk1[yarn_name]:.2f}) its accuracy on "
            f"keys farther away at {n4} is {far(yarn_name):.2f}, and {cfg.finetune_steps} fine-tuning steps ({tasks}) "
            f"did not teach it ({max(far(k) for k in RECIPES):.2f} at best, base {far(base_name):.2f}). PI breaks "
            f"retrieval even at L ({pk1[pi_name]:.2f}), as does YaRN with its published beta (every frequency of "
            f"this L interpolated; {pk1[yarn_paper]:.2f}); {copying}")


def _findings(cfg: ExtensionConfig, rows: dict[str, dict[str, Any]], mix: dict[str, Any] | None = None
              ) -> list[Finding]:
    """The published effects against ``rows`` (one :func:`_evaluate` record per model); ``mix`` is the data
    step's ``finetune_key_distance`` (how far back the fine-tuning tasks' keys lie), quoted in the "why"."""
    n1, n4 = str(cfg.seq_len), str(cfg.factor * cfg.seq_len)
    pk = {name: float(np.mean(r["passkey"][n4])) for name, r in rows.items()}
    pk1 = {name: float(np.mean(r["passkey"][n1])) for name, r in rows.items()}
    p4 = {name: r["ppl"][n4] for name, r in rows.items()}
    base_name = "base (no fine-tune, no scaling)"
    pi_name, yarn_paper, yarn_name = list(BASELINES)
    # the fine-tuned recipes start from the base with their RoPE scaling: that row is their no-training reference
    start = pi_name if cfg.finetune_rope == "linear" else yarn_name
    rope_words = "PI" if cfg.finetune_rope == "linear" else f"YaRN (beta {cfg.yarn_beta_fast:g}/{cfg.yarn_beta_slow:g})"
    longlora, sinklora, full = list(RECIPES)
    ext_4 = min(pk[longlora], pk[sinklora], pk[full])

    def far(name: str) -> float:
        return far_accuracy(cfg, rows[name])

    def gain(name: str) -> float:  # share of full fine-tuning's perplexity improvement over the untrained start
        whole = math.log(p4[start]) - math.log(p4[full])
        return (math.log(p4[start]) - math.log(p4[name])) / whole if whole > 0 else float("nan")

    retrieves = ext_4 > pk[base_name] and min(far(k) for k in RECIPES) > far(base_name)
    tasks = (f"{mix['tasks']} passkey tasks, {100 * mix['beyond_L']:.0f}% with the key farther back than L"
             if mix else "passkey tasks")
    cp = {name: r["copy_nll"] for name, r in rows.items()}
    copying = (f"digit-copy loss @{n1} (nats, chance 2.30): base {cp[base_name]:.2f}, {rope_words} untrained "
               f"{cp[start]:.2f}, LongLoRA {cp[longlora]:.2f}, SinkLoRA {cp[sinklora]:.2f}, full {cp[full]:.2f}")
    return [
        Finding(claim=f"the base model retrieves passkeys at its training length L={n1}",
                published="prerequisite of the passkey test (LongLoRA, Landmark Attention: base models retrieve "
                          "inside their pre-training context)",
                ours=f"base passkey @{n1}: {pk1[base_name]:.2f}", reproduced=pk1[base_name] >= 0.5,
                why="" if pk1[base_name] >= 0.5 else "the base is too small or undertrained for retrieval at L"),
        Finding(claim=f"extended models retrieve at {cfg.factor}L={n4} where the base cannot",
                published="LongLoRA (passkey retrieval figure): Llama2-7B extended to 32k retrieves passkeys up "
                          "to 32k, the 4k base fails beyond 4k",
                ours=f"passkey @{n4} (keys deeper than ~L before the question): LongLoRA {pk[longlora]:.2f} "
                     f"({far(longlora):.2f}), SinkLoRA {pk[sinklora]:.2f} ({far(sinklora):.2f}), full {pk[full]:.2f} "
                     f"({far(full):.2f}); base {pk[base_name]:.2f} ({far(base_name):.2f}); passkey @{n1}: "
                     f"LongLoRA {pk1[longlora]:.2f}, SinkLoRA {pk1[sinklora]:.2f}, full {pk1[full]:.2f}",
                reproduced=retrieves,
                why=(f"{rope_words} without training: passkey @{n1} {pk1[start]:.2f} (base {pk1[base_name]:.2f}); "
                     f"{cfg.finetune_steps} fine-tuning steps ({tasks}) restore the in-context copy ({copying}) and "
                     f"reach keys farther than L back at {n4}, which the base does not") if retrieves
                else _no_retrieval_why(cfg, rows, far, tasks, copying)),
        Finding(claim=f"perplexity at {cfg.factor}L: full fine-tune <= SinkLoRA <= LongLoRA",
                published="LongLoRA (Llama2-7B, 8k): PG19/proof-pile ppl LoRA + S2 8.20/2.78 vs full fine-tune "
                          "7.93/2.73; SinkLoRA PG19 ablation: SF-Attn 8.64 vs S2 9.09",
                ours=f"ppl @{n4}: full {p4[full]:.3g}, SinkLoRA {p4[sinklora]:.3g}, LongLoRA {p4[longlora]:.3g} "
                     f"(all {rope_words})",
                reproduced=p4[full] <= p4[sinklora] <= p4[longlora]),
        Finding(claim="SinkLoRA recovers more of full fine-tuning's perplexity improvement than LongLoRA",
                published="SinkLoRA: 92% of the full-attention improvement vs LongLoRA's 39%",
                ours=f"SinkLoRA {100 * gain(sinklora):.0f}%, LongLoRA {100 * gain(longlora):.0f}% (log-ppl at "
                     f"{n4}, from {start} to full fine-tuning)",
                reproduced=gain(sinklora) > gain(longlora)),
        Finding(claim=f"every extended model is far below the base at {cfg.factor}L",
                published="Position Interpolation (Chen et al. 2023), LongLoRA: a model evaluated beyond its "
                          "pre-training window without extension reaches very high perplexity; extended models stay "
                          "near their short-context level",
                ours=f"ppl @{n4}: base {p4[base_name]:.3g}; extended "
                     f"{min(p4[longlora], p4[sinklora], p4[full]):.3g}-{max(p4[longlora], p4[sinklora], p4[full]):.3g}",
                reproduced=max(p4[longlora], p4[sinklora], p4[full]) < p4[base_name]),
        Finding(claim="without fine-tuning, YaRN extends better than PI",
                published="YaRN (Peng et al. 2023): high frequencies left unscaled plus an attention temperature "
                          "degrade less than PI without fine-tuning; PI (Chen et al. 2023) needs ~1000 fine-tuning steps",
                ours=f"ppl @{n4}: YaRN beta for L {p4[yarn_name]:.3g} (passkey @{n1} {pk1[yarn_name]:.2f}), "
                     f"published beta {p4[yarn_paper]:.3g} ({pk1[yarn_paper]:.2f}); PI {p4[pi_name]:.3g} "
                     f"({pk1[pi_name]:.2f})",
                reproduced=max(p4[yarn_name], p4[yarn_paper]) < p4[pi_name],
                why=f"YaRN's beta counts rotations over L: at L={n1} the published beta 32 interpolates every "
                    f"frequency; beta {cfg.yarn_beta_fast:g}/{cfg.yarn_beta_slow:g} keeps those that rotate within L"),
    ]


def _plots(cfg: ExtensionConfig, ctx: StudyContext, rows: dict[str, dict[str, Any]]) -> list[str]:
    plt = ctx.pyplot()
    if plt is None:
        return []
    n1, n4 = str(cfg.seq_len), str(cfg.factor * cfg.seq_len)
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 2.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], rows.items()):
        acc = np.asarray([r["passkey"][n1], r["passkey"][n4]], dtype=float)  # [lengths, depths]
        ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(DEPTHS)), [f"{d:.2f}" for d in DEPTHS], fontsize=7)
        ax.set_yticks([0, 1], [n1, n4])
        ax.set_title(name, fontsize=7)
        ax.set_xlabel("depth", fontsize=7)
        for i in range(acc.shape[0]):
            for j in range(acc.shape[1]):
                ax.text(j, i, f"{acc[i, j]:.1f}", ha="center", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(ctx.out / "passkey_heatmaps.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in rows.items():
        lens = [int(n) for n in r["ppl"]]
        ax.plot(lens, list(r["ppl"].values()), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("evaluated context (tokens)")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(ctx.out / "perplexity.png", dpi=100)
    plt.close(fig)
    return ["passkey_heatmaps.png", "perplexity.png"]
