"""Small language-model runs for the studies: a two-domain token corpus, a training loop with held-out
loss, per-step FLOPs, checkpoints between steps and loss-curve plots.

Everything runs on one device with the project's own parts: models from :mod:`longreach.models`, the
chunked loss inside them, :func:`longreach.optim.build_optimizer` / :func:`~longreach.optim.build_scheduler`,
and documents from :mod:`longreach.data` (the standard library's docstrings and the generated tasks,
built locally, no download).

Two domains, so that a study can branch a model on different data (BAM):

* ``docs``: standard-library docstrings (English prose about code);
* ``tasks``: generated documents (passkey retrieval, associative recall, templated sentences).

Each domain is split by documents into training and held-out streams (``[N]`` int64 token ids,
every document wrapped in BOS … EOS).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

__all__ = ["Corpus", "CorpusConfig", "TrainSpec", "attention_core_flops", "build_corpus", "evaluate", "gap_trend",
           "lead_from", "load_weights", "mean_loss", "param_count", "plot_curves", "save_weights", "step_flops", "train_lm"]


@dataclass(kw_only=True, slots=True)
class Corpus:
    """Token streams per domain (``[N]`` int64) and the tokenizer's vocabulary size."""

    vocab_size: int
    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]

    def sizes(self) -> dict[str, int]:
        """Tokens per stream, e.g. ``{"docs/train": 812345, ...}``."""
        return {f"{d}/{part}": int(len(s[d])) for part, s in (("train", self.train), ("val", self.val)) for d in s}


@dataclass(kw_only=True, slots=True)
class CorpusConfig:
    """The corpus settings a study config shares (study configs extend this class)."""

    vocab_size: int = 512
    """Tokenizer pieces (digits split one per piece; at least 300)."""
    harvest_chars: int = 1_000_000
    """Standard-library docstring characters (domain ``docs``)."""
    task_documents: int = 600
    """Generated documents (domain ``tasks``): 40% passkey, 30% associative recall, 30% sentences."""
    task_chars: int = 1500
    """Longest generated document in characters."""
    seed: int = 0
    """Seed of data, initialisation and batches."""


def build_corpus(cache: Path, cfg: CorpusConfig, *, val_fraction: float = 0.05) -> Corpus:
    """Tokenize the two domains with a sentencepiece tokenizer trained on both (cached in ``cache``);
    ``val_fraction`` of each domain's documents (at least 2) are held out."""
    vocab_size, harvest_chars, seed = cfg.vocab_size, cfg.harvest_chars, cfg.seed
    task_documents, task_chars = cfg.task_documents, cfg.task_chars
    from longreach.data.config import DataConfig
    from longreach.data.harvest import harvest_docstrings
    from longreach.data.synthetic import synthetic_documents
    from longreach.data.tokenizer import load_or_train_tokenizer

    dcfg = DataConfig(source="embedded", harvest_chars=harvest_chars, vocab_size=vocab_size, task_chars=task_chars,
                      passkey_fraction=0.1, recall_fraction=0.1, seed=seed, cache_dir=str(cache))
    tok = load_or_train_tokenizer(dcfg)
    domains = {"docs": list(harvest_docstrings(harvest_chars)),
               "tasks": synthetic_documents(task_documents, seed=seed, passkey_fraction=0.4, recall_fraction=0.3,
                                            max_chars=task_chars)}
    rng = np.random.default_rng(seed)
    train, val = {}, {}
    for name, docs in domains.items():
        order = rng.permutation(len(docs))
        n_val = max(2, int(round(len(docs) * val_fraction)))
        ids = [np.asarray([tok.bos_id, *tok.encode(docs[i]), tok.eos_id], dtype=np.int64) for i in order]
        val[name], train[name] = np.concatenate(ids[:n_val]), np.concatenate(ids[n_val:])
    return Corpus(vocab_size=tok.vocab_size, train=train, val=val)


@dataclass(kw_only=True, slots=True)
class TrainSpec:
    """One training run of a small model."""

    steps: int
    """Optimizer steps."""
    batch: int
    """Sequences per step."""
    seq_len: int
    """Tokens per sequence."""
    lr: float = 3e-3
    """Peak learning rate (AdamW, warm-up then cosine to ``min_lr``)."""
    min_lr: float = 3e-4
    """Learning rate at the last step."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the matrices."""
    eval_every: int = 50
    """Held-out loss every this many steps (and after the last)."""
    eval_windows: int = 16
    """Held-out windows of ``seq_len`` tokens per domain."""
    seed: int = 0
    """Seed of the batch sampler."""
    mix: dict[str, float] = field(default_factory=lambda: {"docs": 1.0})
    """Training domains and their sampling weights."""


def _windows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    return torch.as_tensor(stream[starts[:, None] + np.arange(seq_len + 1)])  # [B, L+1]


def _loss(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean token loss, auxiliary loss or None) of windows ``x [B, L+1]``."""
    loss_sum, n = model(x[:, :-1], labels=x[:, 1:])
    return loss_sum / n, getattr(model, "aux_loss", None)


@torch.no_grad()
def evaluate(model: nn.Module, stream: np.ndarray, *, seq_len: int, windows: int) -> float:
    """Mean token loss over the first ``windows`` non-overlapping windows of a held-out stream."""
    was = model.training
    model.eval()
    count = max(1, min(windows, (len(stream) - 1) // seq_len))
    x = _windows(stream, np.arange(count) * seq_len, seq_len)
    loss = float(_loss(model, x)[0])
    model.train(was)
    return loss


def step_flops(model: nn.Module, *, batch: int, seq_len: int, vocab_size: int) -> float:
    """Floating-point operations of one training step (forward + backward) counted by
    ``torch.utils.flop_counter`` on random tokens: matrix products (elementwise work, the optimizer and,
    on CPU, the attention core (:func:`attention_core_flops`) are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter:
        loss, aux = _loss(model, x)
        (loss if aux is None else loss + aux).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def attention_core_flops(*, batch: int, seq_len: int, heads: int, head_dim: int, layers: int) -> float:
    """Training FLOPs (forward + backward ≈ 3 forwards) of causal softmax attention cores: scores and
    values over the ``S(S+1)/2`` allowed pairs of each head. ``torch.utils.flop_counter`` does not see the
    CPU attention kernel, so :func:`step_flops` callers add this term."""
    return 3.0 * layers * 4.0 * batch * heads * head_dim * seq_len * (seq_len + 1) / 2


def param_count(model: nn.Module) -> int:
    """Parameters (tied ones once)."""
    return sum(p.numel() for p in model.parameters())


def train_lm(model: nn.Module, corpus: Corpus, spec: TrainSpec, *, log: Callable[[str], None], name: str
             ) -> dict[str, Any]:
    """Train ``model`` on ``spec.mix`` and return its record.

    Returns:
        ``{"curve": [[step, tokens, train loss (mean since the last point), {domain: held-out loss}], ...],
        "val": {domain: final held-out loss}, "tokens": trained tokens, "seconds": training time
        without evaluations, "tokens_per_s": training throughput}``.
    """
    from longreach.optim import build_optimizer, build_scheduler

    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    opt = build_optimizer(model, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.95))
    sched = build_scheduler(opt, warmup_steps=spec.warmup_steps, total_steps=spec.steps, schedule="cosine",
                            lr=spec.lr, min_lr=spec.min_lr)
    domains = list(spec.mix)
    weights = np.asarray([spec.mix[d] for d in domains], dtype=np.float64)
    weights /= weights.sum()

    def held_out() -> dict[str, float]:
        return {d: evaluate(model, s, seq_len=spec.seq_len, windows=spec.eval_windows) for d, s in corpus.val.items()}

    curve: list[list[Any]] = [[0, 0, None, held_out()]]
    model.train()
    seconds, losses = 0.0, []
    for step in range(1, spec.steps + 1):
        which = rng.choice(len(domains), size=spec.batch, p=weights)
        parts = []
        for d, name_d in enumerate(domains):
            stream, count = corpus.train[name_d], int((which == d).sum())
            if count:
                parts.append(_windows(stream, rng.integers(0, len(stream) - spec.seq_len - 1, count), spec.seq_len))
        x = torch.cat(parts)  # [B, L+1]
        t = time.perf_counter()
        loss, aux = _loss(model, x)
        (loss if aux is None else loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        seconds += time.perf_counter() - t
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{name}: training loss is {losses[-1]} at step {step}")
        if step % spec.eval_every == 0 or step == spec.steps:
            curve.append([step, step * spec.batch * spec.seq_len, sum(losses) / len(losses), held_out()])
            log(f"{name}: step {step}/{spec.steps} train {curve[-1][2]:.3f} held-out "
                + " ".join(f"{d} {v:.3f}" for d, v in curve[-1][3].items()))
            losses = []
    tokens = spec.steps * spec.batch * spec.seq_len
    return {"curve": curve, "val": curve[-1][3], "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9)}


def mean_loss(val: dict[str, float]) -> float:
    """Mean over domains of a ``{domain: held-out loss}`` record."""
    return sum(val.values()) / len(val)


def gap_trend(a: dict[str, Any], b: dict[str, Any]) -> str:
    """``a − b`` mean held-out loss of two :func:`train_lm` records evaluated at the same steps: at the
    first evaluation after step 0, halfway and at the end."""
    gaps = [(ca[0], mean_loss(ca[3]) - mean_loss(cb[3])) for ca, cb in zip(a["curve"][1:], b["curve"][1:])]
    picks = sorted({0, len(gaps) // 2, len(gaps) - 1}) if gaps else []
    return " → ".join(f"{gaps[i][1]:+.3f} (step {gaps[i][0]})" for i in picks)


def lead_from(a: dict[str, Any], b: dict[str, Any]) -> int | None:
    """The first evaluation step from which ``a``'s mean held-out loss stays below ``b``'s at every later
    evaluation (two :func:`train_lm` records evaluated at the same steps), or None when it ends behind."""
    step = None
    for ca, cb in zip(a["curve"][1:], b["curve"][1:]):
        if mean_loss(ca[3]) < mean_loss(cb[3]):
            step = ca[0] if step is None else step
        else:
            step = None
    return step


def save_weights(model: nn.Module, path: Path) -> None:
    """The model's state dict, written atomically (a later step of a resumed study reads it back)."""
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict written by :func:`save_weights`."""
    return torch.load(path, map_location="cpu", weights_only=True)


def plot_curves(path: Path, curves: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str,
                ylabel: str, log: Callable[[str], None], logx: bool = False) -> str | None:
    """Line plot of ``{label: [(x, y), ...]}`` into ``path`` (PNG); returns its file name, or None (with a
    logged line) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed: {path.name} not drawn")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def paired_seeds(ours: list[float], base: list[float], base_name: str) -> tuple[str, bool]:
    """Final losses of two arms, one per seed, trained on the same batches per seed: ("; mean of n seeds, below
    BASE in m of n (per seed …)", whether ours is below in the mean and in most seeds). One seed: ("", below)."""
    diffs = [a - b for a, b in zip(ours, base)]
    below = sum(x < 0 for x in diffs)
    ok = sum(ours) < sum(base) and below * 2 > len(diffs)
    if len(diffs) == 1:
        return "", ok
    return (f"; mean of {len(diffs)} seeds, below {base_name} in {below} of {len(diffs)} (per seed "
            + ", ".join(f"{x:+.3f}" for x in diffs) + ")"), ok
