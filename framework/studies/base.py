"""Result types, the registry and the resumable step cache shared by every study.

A study is a function ``run(cfg, ctx) -> StudyResult`` over a typed config dataclass (loaded from
``configs/study_NAME.yaml`` by the strict loader). It does its work in named **steps**
(:meth:`StudyContext.step`): each step's JSON-serialisable result is written to ``steps/KEY.json`` inside
the run folder, so a rerun of an interrupted study skips every finished step. Independent chains of steps
(:class:`Step`, :meth:`StudyContext.steps`) run in ``ctx.workers`` worker processes of one torch thread each,
with the same results as one after another. Its result is tables (rendered as markdown), **findings** (the
paper's published effect beside ours, and whether its direction was reproduced) and plots written into the
run folder.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["STUDIES", "Finding", "Step", "Study", "StudyContext", "StudyResult", "Table", "TinyLMConfig",
           "embedded_documents", "encode_documents", "lm_step", "markdown", "register", "seed_suffix", "warmup_decay",
           "with_mean_row"]

T = TypeVar("T")


@dataclass(kw_only=True, slots=True)
class Finding:
    """One published effect, checked at small scale."""

    claim: str
    """The effect in words, e.g. "SinkLoRA's perplexity at 4L is below LongLoRA's"."""
    published: str
    """The paper's figure(s) behind the claim, with the setting (model, length, data set)."""
    ours: str
    """Our figure(s) for the same comparison."""
    reproduced: bool | None
    """Whether the effect's direction holds here; None when this scale cannot tell."""
    why: str = ""
    """Caveats, or why the effect was not reproduced."""


@dataclass(kw_only=True, slots=True)
class Table:
    """A markdown table: ``rows`` are lists of cells in ``columns`` order (floats are printed with 4
    significant digits)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass(kw_only=True, slots=True)
class StudyResult:
    """What a study hands back to the runner."""

    tables: list[Table]
    findings: list[Finding]
    plots: list[str] = field(default_factory=list)
    """File names (relative to the run folder) of the plots the study wrote."""
    data: dict[str, Any] = field(default_factory=dict)
    """Raw numbers, written into ``study.json``."""


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a chain run by :meth:`StudyContext.steps`: ``fn(*args)`` runs in a worker process, so
    ``fn`` is a module-level function and ``args`` plain data (both are pickled)."""

    key: str
    """The step's name (its result is ``steps/KEY.json``)."""
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    then: Callable[[Any], "Step"] | None = None
    """The chain's next step, made from this step's result (called in the study's process, never pickled)."""


def seed_suffix(k: int) -> str:
    """Step-key and file-name suffix of a study's training seed ``k`` (``seed + k``): none for the first, so a
    one-seed run keeps its plain names (and an earlier run folder resumes), ``-sK`` for the others."""
    return f"-s{k}" if k else ""


def with_mean_row(rows: list[list[Any]]) -> list[list[Any]]:
    """Per-seed table rows (first cell the seed, the others numbers) followed by a ``mean`` row."""
    return [*rows, ["mean", *(sum(col) / len(col) for col in list(zip(*rows))[1:])]]


def _run_step(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, float]:
    """In a worker: ``fn(*args)`` and its seconds."""
    t = time.perf_counter()
    return fn(*args), time.perf_counter() - t


def _one_thread() -> None:
    """Worker initializer: one torch thread per worker process."""
    import torch

    torch.set_num_threads(1)


class StudyContext:
    """The run folder, the size setting, the worker processes and progress output of one study run."""

    def __init__(self, out: Path, *, quick: bool = False, workers: int = 1,
                 log: Callable[[str], None] | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.out = Path(out)
        self.quick = quick
        """True for the smallest setting (tests): a few steps of everything."""
        self.workers = workers
        """Processes that run independent chains of steps at once (:meth:`steps`); 1: here, in turn."""
        self.pooled = False
        """Whether any step ran in worker processes (studies without :meth:`steps` never do)."""
        self._log = log or (lambda msg: print(msg, flush=True))
        self._t0 = time.perf_counter()
        self.resumed: list[str] = []
        """Keys of the steps read back from an earlier run."""

    def log(self, msg: str) -> None:
        """One progress line, prefixed with the seconds since the study started."""
        self._log(f"[{time.perf_counter() - self._t0:7.1f}s] {msg}")

    def path(self, *parts: str) -> Path:
        """A folder inside the run folder (created)."""
        p = self.out.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def step(self, key: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` once per run folder: its JSON-serialisable result is kept in ``steps/KEY.json``
        (written atomically) and read back on a rerun, so an interrupted study resumes after its last
        finished step."""
        if self._done(key):
            return self._read(key)
        self.log(f"{key} ...")
        t = time.perf_counter()
        value = fn()
        self._write(key, value, time.perf_counter() - t)
        return value

    def steps(self, chains: list[Step]) -> dict[str, Any]:
        """Run independent chains of steps, each from its first :class:`Step` along ``then``, as :meth:`step`
        runs one (each result kept in ``steps/KEY.json``; a finished step is read back, not rerun).

        With ``workers`` > 1 the steps run in that many spawned processes of one torch thread each, the
        chains' steps queued in the order given (put the longest chains first); with 1, here, chain after
        chain. Each step computes from its arguments alone, so either way gives the same results. A failed
        step stops the rest (finished steps stay on disk).

        Returns:
            Every step's result by key.
        """
        results: dict[str, Any] = {}

        def ready(step: Step | None) -> Step | None:  # the chain's first step not done yet
            while step is not None and self._done(step.key):
                results[step.key] = self._read(step.key)
                step = step.then(results[step.key]) if step.then else None
            return step

        if self.workers == 1:
            for head in chains:
                step = ready(head)
                while step is not None:
                    results[step.key] = self.step(step.key, lambda s=step: s.fn(*s.args))
                    step = ready(step.then(results[step.key]) if step.then else None)
            return results
        pending: dict[Future, Step] = {}
        spawn = multiprocessing.get_context("spawn")  # no fork of a process that already ran torch threads
        with ProcessPoolExecutor(self.workers, mp_context=spawn, initializer=_one_thread) as pool:
            def submit(step: Step | None) -> None:
                if step is not None:
                    self.pooled = True
                    self.log(f"{step.key} ... (queued for {self.workers} worker processes)")
                    pending[pool.submit(_run_step, step.fn, step.args)] = step

            for head in chains:
                submit(ready(head))
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        step = pending.pop(fut)
                        value, seconds = fut.result()
                        self._write(step.key, value, seconds)
                        results[step.key] = value
                        submit(ready(step.then(value) if step.then else None))
            except BaseException:
                pool.shutdown(cancel_futures=True)  # queued steps never start; running ones finish
                raise
        return results

    def _file(self, key: str) -> Path:
        return self.path("steps") / f"{key}.json"

    def _done(self, key: str) -> bool:
        return self._file(key).exists()

    def _read(self, key: str) -> Any:
        """A finished step's result, noted as read back."""
        self.resumed.append(key)
        self.log(f"{key}: done in an earlier run (steps/{key}.json)")
        return json.loads(self._file(key).read_text())

    def _write(self, key: str, value: Any, seconds: float) -> None:
        """Keep a finished step's result (atomically: a half-written file never reads as done)."""
        f = self._file(key)
        tmp = f.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(value, indent=1, default=float))
        os.replace(tmp, f)
        self.log(f"{key}: {seconds:.1f}s")

    def pyplot(self) -> Any:
        """``matplotlib.pyplot`` on the Agg backend, or None (logged) when matplotlib is not installed."""
        try:
            import matplotlib
        except ModuleNotFoundError:
            self.log("plots skipped: matplotlib is not installed (pip install matplotlib)")
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt


@dataclass(kw_only=True, slots=True)
class TinyLMConfig:
    """What studies of a tiny Llama trained on the embedded corpus share (each study's config extends it)."""

    seq_len: int = 128
    """Training sequence length."""
    dim: int = 128
    """Model width."""
    n_layers: int = 2
    """Model depth."""
    n_heads: int = 4
    """Attention heads (as many key/value heads)."""
    batch: int = 16
    """Sequences per training step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW, linear warm-up, linear decay to 10%)."""
    vocab_size: int = 512
    """Tokenizer pieces (digits split one per piece; at least 300)."""
    harvest_chars: int = 400_000
    """Standard-library docstring characters of the embedded corpus."""
    passkey_fraction: float = 0.1
    """Share of documents that are passkey tasks."""
    recall_fraction: float = 0.1
    """Share of documents that are associative-recall tasks."""
    task_chars: int = 500
    """Longest task document in characters."""
    seed: int = 0
    """Seed of data, initialisation and batches."""

    def __post_init__(self) -> None:
        for name in ("seq_len", "dim", "n_layers", "n_heads", "batch", "task_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must divide by n_heads {self.n_heads}")

    def build_model(self, vocab: int) -> Any:
        """A freshly initialised longreach Llama of this size (seeded with ``seed``)."""
        import torch

        from longreach.models import ModelConfig, build_model

        torch.manual_seed(self.seed)
        return build_model(ModelConfig(vocab_size=vocab, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                                       max_seq_len=self.seq_len))


def embedded_documents(cfg: TinyLMConfig, cache: Path, *, task_chars: int, tokenizer: str | None = None
                       ) -> tuple[Any, list[str], int]:
    """(tokenizer, documents, number of leading docstring documents) of the embedded corpus: standard-library
    docstrings, then passkey and associative-recall tasks of at most ``task_chars`` characters. The
    tokenizer is trained once into ``cache`` (or read from the file ``tokenizer``)."""
    from longreach.data.config import DataConfig
    from longreach.data.corpus import corpus_documents
    from longreach.data.harvest import harvest_docstrings
    from longreach.data.tokenizer import load_or_train_tokenizer

    dcfg = DataConfig(source="embedded", harvest_chars=cfg.harvest_chars, vocab_size=cfg.vocab_size,
                      passkey_fraction=cfg.passkey_fraction, recall_fraction=cfg.recall_fraction,
                      task_chars=task_chars, split_digits=True, seed=cfg.seed, cache_dir=str(cache),
                      tokenizer=tokenizer)
    n_text = len(list(harvest_docstrings(cfg.harvest_chars)))
    return load_or_train_tokenizer(dcfg), corpus_documents(dcfg), n_text


def encode_documents(tok: Any, docs: list[str], idx: Any) -> Any:
    """``[N]`` int64 token ids of ``docs[idx]`` in that order, each document between BOS and EOS."""
    import numpy as np

    return np.concatenate([np.asarray([tok.bos_id] + tok.encode(docs[int(i)]) + [tok.eos_id], dtype=np.int64)
                           for i in idx])


def warmup_decay(optimizer: Any, steps: int, warmup: int) -> Any:
    """A ``LambdaLR``: linear warm-up over ``warmup`` steps, then linear decay to 10% at ``steps``."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / max(1, warmup)) * max(0.1, 1 - k / max(1, steps)))


def lm_step(model: Any, optimizer: Any, scheduler: Any, tokens: Any, ctx: Any = None) -> float:
    """One next-token training step of a longreach decoder on ``tokens [B, S+1]`` (grad clip 1.0).

    Returns:
        The step's mean token loss.
    """
    import torch

    loss_sum, n = model(tokens[:, :-1], None, ctx, labels=tokens[:, 1:])  # inputs [B, S], labels [B, S]
    loss = loss_sum / n
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return float(loss.detach())


@dataclass(frozen=True, slots=True)
class Study:
    """A registered study."""

    name: str
    config: type
    """Its typed config dataclass (the recipe ``configs/study_NAME.yaml`` fills it)."""
    run: Callable[[Any, StudyContext], StudyResult]
    description: str


STUDIES: dict[str, Study] = {}


def register(name: str, config: type, description: str) -> Callable[[Callable], Callable]:
    """Decorator registering ``run(cfg, ctx) -> StudyResult`` as study ``name``."""

    def deco(fn: Callable) -> Callable:
        STUDIES[name] = Study(name=name, config=config, run=fn, description=description)
        return fn

    return deco


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return "–" if v is None else str(v)


def markdown(name: str, result: StudyResult, seconds: float | None = None, *, detail: str = "") -> str:
    """The study's report: the wall time (``detail`` in brackets after it: CPU time, load), every table, then
    the findings table (published vs ours)."""
    lines = [f"# Study: {name}", ""]
    if seconds is not None:
        lines += [f"Wall time: {seconds:.0f} s" + (f" ({detail})" if detail else ""), ""]
    for t in result.tables:
        lines += [f"## {t.title}", "", "| " + " | ".join(t.columns) + " |",
                  "|" + "---|" * len(t.columns)]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
        lines += ["", t.note, ""] if t.note else [""]
    lines += ["## Published effects", "", "| claim | published | ours | reproduced | why |",
              "|---|---|---|---|---|"]
    for f in result.findings:
        rep = {True: "yes", False: "**no**", None: "n/a"}[f.reproduced]
        lines.append(f"| {f.claim} | {f.published} | {f.ours} | {rep} | {f.why} |")
    for p in result.plots:
        lines += ["", f"![{p}]({p})"]
    return "\n".join(lines) + "\n"


def as_json(result: StudyResult) -> dict[str, Any]:
    """``study.json``'s body."""
    return {"tables": [asdict(t) for t in result.tables], "findings": [asdict(f) for f in result.findings],
            "plots": result.plots, "data": result.data}
