"""Study "mixtures": MoE, MoH and BAM against dense models at small scale.

Three comparisons on one two-domain corpus (standard-library docstrings + generated tasks,
:mod:`longreach.studies.lm`), every arm trained by the same loop and scored by held-out loss per domain:

(a) **MoE top-k of E vs dense at equal active parameters and tokens**: the dense SwiGLU has hidden F,
    each of the E experts hidden F/k, so a token meets the same FFN parameters in both
    (Switch/Mixtral-style sparse scaling: more total parameters at equal compute per token).
(b) **MoH vs dense** (Mixture-of-Head attention, Jin et al. 2024): ``moh_shared`` always-on heads plus
    top-``moh_top_k`` of the routed ones (default 2 + 4 of 6 = 75% of the heads per token), same
    parameters otherwise, equal tokens.
(c) **BAM** (Branch-Attend-Mix, Zhang et al. 2024): a dense parallel-block seed is branched into two
    copies continued on different domains (docs, tasks), then upcycled
    (:func:`longreach.mixtures.upcycle_state_dicts`: attention experts in a soft mixture, FFN experts
    top-1 routed, the rest averaged) and continued on the mix. Against it, from the same seed and the same branches:

    * **dense continuation**: the seed continued on the mix for the FLOPs of both branches plus BAM's
      mixture stage;
    * **FFN-only upcycling** (Branch-Train-MiX: FFN experts from the branches, attention averaged):
      continued on the mix for the FLOPs of BAM's mixture stage (more steps: its step is cheaper).

    Compute is counted per training step with ``torch.utils.flop_counter`` (:func:`~longreach.studies.lm.step_flops`).
    Held-out loss against FLOPs spent after the seed is plotted and tabulated at several budgets, which
    tells a mixture that is merely slow to recover from upcycling apart from one that loses. The whole of (c)
    runs once per seed (``bam_seeds``), and a table per seed says where BAM's loss comes from: how much better
    each branch learnt its own domain than the dense continuation did with the same FLOPs, how much of that the
    upcycled model keeps, and BAM against dense continuation at equal mixture steps. ``dense_budget: mixture``
    gives the dense continuation BAM's mixture-stage FLOPs only (the branch stage not charged).

Weights that later steps need (seed, branches) are kept in ``weights/`` of the run folder, so a resumed
study picks up after its last finished step. Each seed's part (c) is one chain of steps and each scratch
arm its own, so ``longreach study mixtures --workers N`` trains N of them at once, with the numbers of one
process.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longreach.mixtures import bam_model_config
from longreach.models import ModelConfig, build_model
from longreach.models.config import MoEOptions, MoHOptions
from longreach.studies.base import (Finding, Step, StudyContext, StudyResult, Table, register, seed_suffix,
                                   with_mean_row)
from longreach.studies.lm import (Corpus, CorpusConfig, TrainSpec, attention_core_flops, build_corpus, gap_trend,
                                  lead_from, load_weights, mean_loss, paired_seeds, param_count, plot_curves,
                                  save_weights, step_flops, train_lm)

__all__ = ["MixturesStudyConfig", "build_arm", "ffn_only_state_dict", "run"]


@dataclass(kw_only=True, slots=True)
class MixturesStudyConfig(CorpusConfig):
    """Sizes and budgets of the mixtures study (recipe ``configs/study_mixtures.yaml``)."""

    dim: int = 96
    """Model width."""
    n_layers: int = 3
    """Decoder blocks."""
    n_heads: int = 8
    """Attention heads (as many key/value heads)."""
    ffn_hidden: int = 384
    """Dense SwiGLU hidden size F (each MoE expert: F / moe_top_k)."""
    moe_experts: int = 8
    """Experts E of arm (a)."""
    moe_top_k: int = 2
    """Experts per token of arm (a)."""
    moh_shared: int = 2
    """Always-on heads of arm (b)."""
    moh_top_k: int = 4
    """Routed heads active per token of arm (b)."""
    moh_execution: str = "masked"
    """MoH execution: ``masked`` (every head computed, unrouted ones zeroed) or ``routed`` (only the routed
    pairs); the same outputs and gradients, masked is the faster of the two at this size on CPU."""
    seq_len: int = 128
    """Tokens per training sequence."""
    batch: int = 8
    """Sequences per step."""
    lr: float = 3e-3
    """Peak learning rate (cosine to a tenth)."""
    scratch_steps: int = 500
    """Steps of the from-scratch arms (a) and (b)."""
    scratch_seeds: int = 1
    """Training runs of each from-scratch arm, seeded ``seed``, ``seed + 1``, … (initial weights and batch order;
    the corpus stays that of ``seed``). The claims of (a) and (b) are judged on the mean over seeds and on the
    seeds paired (every arm of one seed sees the same batches)."""
    seed_steps: int = 150
    """Steps of BAM's dense seed."""
    branch_steps: int = 75
    """Steps of each BAM branch on its own domain."""
    branch_other: float = 0.2
    """Share of each branch's sequences drawn from the other domain (a small data mix, as BTX/BAM's
    domain mixes keep general data, limits what a branch forgets); 0 = its own domain alone."""
    mix_steps: int = 450
    """Steps of the BAM mixture on the mix (the budget of the other arms follows from its FLOPs)."""
    bam_seeds: int = 1
    """Runs of the whole of (c) (seed, branches, the three arms after them), seeded ``seed``, ``seed + 1``, …
    (initial weights, batch order and routers; the corpus stays that of ``seed``). Its claims are judged on the
    mean over seeds and on the seeds paired."""
    dense_budget: str = "after_seed"
    """FLOPs of the dense continuation: ``after_seed`` (both branches plus BAM's mixture stage: equal compute
    after the seed) or ``mixture`` (BAM's mixture stage only, the branches not charged: a diagnostic of what the
    branch stage costs)."""
    bam_top_k: int = 1
    """FFN experts per token of the upcycled mixtures."""
    bam_share_kv: bool = False
    """BAM attention experts share one (averaged) K/V projection."""
    eval_every: int = 25
    """Held-out loss every this many steps."""
    eval_windows: int = 8
    """Held-out windows per domain."""

    def quick(self) -> MixturesStudyConfig:
        """The smallest setting (tests, ``--quick``): a few steps of everything."""
        return dataclasses.replace(self, **QUICK)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "ffn_hidden", "moe_experts", "moe_top_k", "seq_len", "batch",
                     "scratch_steps", "scratch_seeds", "seed_steps", "branch_steps", "mix_steps", "bam_seeds",
                     "bam_top_k", "eval_every", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"mixtures.{name} must be >= 1, got {getattr(self, name)}")
        if self.ffn_hidden % self.moe_top_k:
            raise ValueError(f"mixtures.ffn_hidden={self.ffn_hidden} must divide by moe_top_k={self.moe_top_k} "
                             "(equal active parameters)")
        if not self.moe_top_k <= self.moe_experts:
            raise ValueError(f"mixtures.moe_top_k={self.moe_top_k} exceeds moe_experts={self.moe_experts}")
        if not 0 <= self.moh_shared < self.n_heads or not 1 <= self.moh_top_k <= self.n_heads - self.moh_shared:
            raise ValueError(f"mixtures: need 0 <= moh_shared < n_heads={self.n_heads} and 1 <= moh_top_k <= "
                             f"{self.n_heads - self.moh_shared}; got {self.moh_shared}, {self.moh_top_k}")
        if self.moh_execution not in ("masked", "routed"):
            raise ValueError(f"mixtures.moh_execution must be masked or routed, got {self.moh_execution!r}")
        if not 0.0 <= self.branch_other < 1.0:
            raise ValueError(f"mixtures.branch_other must be in [0, 1), got {self.branch_other}")
        if self.dense_budget not in ("after_seed", "mixture"):
            raise ValueError(f"mixtures.dense_budget must be after_seed or mixture, got {self.dense_budget!r}")
        if self.bam_top_k > 2:
            raise ValueError(f"mixtures.bam_top_k must be 1 or 2 (two branches), got {self.bam_top_k}")


#: the smallest setting (tests): a few steps of every arm
QUICK = dict(dim=32, n_layers=1, n_heads=4, ffn_hidden=64, moe_experts=4, moh_shared=1, moh_top_k=2, seq_len=32,
             batch=2, scratch_steps=3, scratch_seeds=1, bam_seeds=1, seed_steps=2, branch_steps=2, mix_steps=2,
             vocab_size=400, harvest_chars=20_000, task_documents=16, task_chars=300, eval_every=4, eval_windows=2)

ARMS = ("dense", "moe", "moh", "seed", "bam", "ffn_only")
#: the from-scratch arms, trained once per seed
SCRATCH = ("dense", "moe", "moh")
#: the mix every arm trains on but the branches: both domains alike
BOTH = {"docs": 0.5, "tasks": 0.5}


def scratch_losses(cfg: MixturesStudyConfig, runs: dict[str, dict[str, Any]]) -> dict[str, list[float]]:
    """Final mean held-out loss of every from-scratch arm, one per seed."""
    return {arm: [mean_loss(runs[arm + seed_suffix(k)]["val"]) for k in range(cfg.scratch_seeds)] for arm in SCRATCH}


def build_arm(cfg: MixturesStudyConfig, arm: str, vocab_size: int) -> tuple[Any, torch.nn.Module]:
    """The model config and a freshly initialised model of one arm (the one place models are configured).

    Arms: ``dense``, ``moe`` (E experts of hidden F/k, top-k), ``moh`` (shared + top-k routed heads),
    ``seed`` (dense parallel block, BAM's seed), ``bam`` (its upcycled architecture) and ``ffn_only``
    (parallel block, dense attention, the seeds' FFNs as experts).
    """
    base = dict(vocab_size=vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                max_seq_len=cfg.seq_len, ffn_hidden=cfg.ffn_hidden, tie_embeddings=True)
    seed = ModelConfig(**base, parallel_block=True)
    configs = {
        "dense": lambda: ModelConfig(**base),
        "moe": lambda: ModelConfig(**{**base, "ffn_hidden": cfg.ffn_hidden // cfg.moe_top_k}, ffn_type="moe",
                                   moe=MoEOptions(experts=cfg.moe_experts, top_k=cfg.moe_top_k)),
        "moh": lambda: ModelConfig(**base, attention_type="moh",
                                   moh=MoHOptions(shared=cfg.moh_shared, top_k=cfg.moh_top_k,
                                                  execution=cfg.moh_execution)),
        "seed": lambda: seed,
        "bam": lambda: bam_model_config(seed, 2, share_kv=cfg.bam_share_kv, top_k=cfg.bam_top_k),
        "ffn_only": lambda: ModelConfig(**base, parallel_block=True, ffn_type="moe",
                                        moe=MoEOptions(experts=2, top_k=cfg.bam_top_k, hidden=cfg.ffn_hidden)),
    }
    model_cfg = configs[arm]()
    torch.manual_seed(cfg.seed)
    return model_cfg, build_model(model_cfg)


@torch.no_grad()
def ffn_only_state_dict(bam_state: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """Branch-Train-MiX from BAM's upcycled state dict: keep the FFN experts and their router, and
    replace each layer's attention experts by their average (one dense attention layer).

    Args:
        bam_state: :func:`longreach.mixtures.upcycle_state_dicts` output without K/V sharing.
        n_experts: the number of branches N.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in bam_state.items():
        if ".self_attn." not in key:
            out[key] = t
        elif key.endswith("router.weight"):
            continue  # the attention router: there is one attention layer now
        elif key.endswith("o_proj.weight"):
            out[key] = t.mean(0)  # [N, dim, H*D] -> [dim, H*D]
        else:
            out[key] = t.view(n_experts, -1, t.shape[-1]).mean(0)  # [N*H*D, dim] -> [H*D, dim]
    return out


def _print(msg: str) -> None:
    print(f"  {msg}", flush=True)


def _train(cfg: MixturesStudyConfig, corpus: Corpus, weights: Path, key: str, arm: str, steps: int,
           mix: dict[str, float], init: str | None = None, sfx: str = "", save: bool = False) -> dict[str, Any]:
    """One training step of the study (a :class:`Step`'s function: it runs here or in a worker process and
    computes from its arguments alone): build the arm, start it from ``init`` (:func:`_initial_state` of
    seed ``sfx``; None: the arm's own initialisation), train, and keep the weights in ``weights/KEY.pt``
    with ``save``."""
    _, model = build_arm(cfg, arm, corpus.vocab_size)
    if init is not None:
        model.load_state_dict(_initial_state(cfg, corpus, weights, init, sfx))
    spec = TrainSpec(steps=steps, batch=cfg.batch, seq_len=cfg.seq_len, lr=cfg.lr, min_lr=cfg.lr / 10,
                     warmup_steps=min(20, max(1, steps // 10)), eval_every=cfg.eval_every,
                     eval_windows=cfg.eval_windows, seed=cfg.seed, mix=mix)
    rec = train_lm(model, corpus, spec, log=_print, name=key)
    rec["params"] = param_count(model)
    rec["flops_per_step"] = _flops(cfg, arm, model, corpus.vocab_size)
    if save:
        save_weights(model, weights / f"{key}.pt")
    return rec


def _initial_state(cfg: MixturesStudyConfig, corpus: Corpus, weights: Path, init: str, sfx: str
                   ) -> dict[str, torch.Tensor]:
    """``seed``: the dense seed's weights; ``bam``: its two branches upcycled into BAM (attention experts,
    K/V shared per ``cfg.bam_share_kv``); ``ffn_only``: the same upcycling with the attention averaged back
    into one layer (FFN experts only), all of seed ``sfx``."""
    if init == "seed":
        return load_weights(weights / f"seed{sfx}.pt")
    from longreach.mixtures import upcycle_state_dicts

    seed_cfg, _ = build_arm(cfg, "seed", corpus.vocab_size)
    branches = [load_weights(weights / f"branch_{d}{sfx}.pt") for d in ("docs", "tasks")]
    share_kv = cfg.bam_share_kv if init == "bam" else False
    state = upcycle_state_dicts(branches, seed_cfg, share_kv=share_kv, top_k=cfg.bam_top_k, seed=cfg.seed)[1]
    return state if init == "bam" else ffn_only_state_dict(state, 2)


def _flops(cfg: MixturesStudyConfig, arm: str, model: torch.nn.Module, vocab_size: int) -> float:
    """Training FLOPs per step: counted matrix products plus the attention cores (BAM: 2 experts' heads;
    MoH: the active heads)."""
    heads = {"bam": 2 * cfg.n_heads, "moh": cfg.moh_shared + cfg.moh_top_k}.get(arm, cfg.n_heads)
    return step_flops(model, batch=cfg.batch, seq_len=cfg.seq_len, vocab_size=vocab_size) + attention_core_flops(
        batch=cfg.batch, seq_len=cfg.seq_len, heads=heads, head_dim=cfg.dim // cfg.n_heads, layers=cfg.n_layers)


def _flops_per_step(ctx: StudyContext, cfg: MixturesStudyConfig, arm: str, vocab_size: int) -> float:
    _, model = build_arm(cfg, arm, vocab_size)
    return ctx.step(f"flops_{arm}", lambda: _flops(cfg, arm, model, vocab_size))


def _at_budget(curve: list[list[Any]], flops_per_step: float, offset: float, budget: float, *,
               domain: str | None = None) -> float | None:
    """Held-out loss (mean over domains, or ``domain``'s) where the run had spent ``budget`` FLOPs (linear
    between evaluations); None outside the run."""
    pts = [(offset + step * flops_per_step, mean_loss(val) if domain is None else val[domain])
           for step, _, _, val in curve]
    if pts[-1][0] < budget <= pts[-1][0] + flops_per_step:
        return pts[-1][1]  # its step count was rounded: within one step of the budget
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= budget <= x1:
            return y0 + (y1 - y0) * (budget - x0) / max(x1 - x0, 1e-9)
    return None


@register("mixtures", MixturesStudyConfig, "MoE, MoH and BAM upcycling against dense models of equal active "
          "parameters / compute (held-out loss, loss curves, tokens/s)")
def run(cfg: MixturesStudyConfig, ctx: StudyContext) -> StudyResult:
    """Train every arm (cached per step) and compare; see the module docstring."""
    if ctx.quick:
        cfg = cfg.quick()  # idempotent: the runner may have shrunk it already
    corpus = build_corpus(ctx.path("cache"), cfg)
    ctx.log(f"corpus: {corpus.sizes()} tokens")
    # (c) BAM: seed -> two branches -> upcycle -> continue; baselines at equal FLOPs, once per seed. Every
    # seed's chain and every scratch arm is independent of the others: ctx.workers processes run them at once,
    # the longest (the BAM chains) queued first
    f_bam = _flops_per_step(ctx, cfg, "bam", corpus.vocab_size)
    f_ffn = _flops_per_step(ctx, cfg, "ffn_only", corpus.vocab_size)
    weights = ctx.path("weights")
    chains = [_bam_chain(dataclasses.replace(cfg, seed=cfg.seed + k), corpus, weights, seed_suffix(k),
                         f_bam=f_bam, f_ffn=f_ffn)
              for k in range(cfg.bam_seeds)]  # seed k's runs are "seed", "bam", … (k = 0) or "seed-s1", …
    for k in range(cfg.scratch_seeds):  # seed k's runs are "dense", "moe", "moh" (k = 0) or "dense-s1", …
        ck = dataclasses.replace(cfg, seed=cfg.seed + k)
        chains += [Step(key=arm + seed_suffix(k), fn=_train,
                        args=(ck, corpus, weights, arm + seed_suffix(k), arm, cfg.scratch_steps, BOTH))
                   for arm in SCRATCH]
    runs: dict[str, dict[str, Any]] = ctx.steps(chains)
    f_seed = runs["seed"]["flops_per_step"]
    return _report(ctx, cfg, corpus, runs, f_seed=f_seed, f_bam=f_bam, f_ffn=f_ffn,
                   branch_flops=2 * cfg.branch_steps * f_seed)


def _bam_chain(cfg: MixturesStudyConfig, corpus: Corpus, weights: Path, sfx: str, *, f_bam: float, f_ffn: float
               ) -> Step:
    """Part (c) for one seed (``cfg.seed``; step keys and weight files end in ``sfx``) as one chain: the dense
    seed, its two branches, then BAM, FFN-only upcycling and dense continuation at equal FLOPs."""

    def step(name: str, arm: str, steps: int, mix: dict[str, float], init: str | None = None, save: bool = False,
             then: Step | None = None) -> Step:
        return Step(key=f"{name}{sfx}", fn=_train, args=(cfg, corpus, weights, f"{name}{sfx}", arm, steps, mix, init,
                                                         sfx, save),
                    then=None if then is None else (lambda _: then))

    def branch(domain: str, other: str) -> dict[str, float]:
        return {domain: 1.0 - cfg.branch_other, other: cfg.branch_other} if cfg.branch_other else {domain: 1.0}

    mix_flops = cfg.mix_steps * f_bam  # BAM's mixture stage sets the budget of the other two arms

    def after_seed(seed: dict[str, Any]) -> Step:
        f_seed = seed["flops_per_step"]
        dense_flops = mix_flops + (2 * cfg.branch_steps * f_seed if cfg.dense_budget == "after_seed" else 0.0)
        dense = step("dense_cont", "seed", max(1, round(dense_flops / f_seed)), BOTH, "seed")
        ffn = step("ffn_only", "ffn_only", max(1, round(mix_flops / f_ffn)), BOTH, "ffn_only", then=dense)
        bam = step("bam", "bam", cfg.mix_steps, BOTH, "bam", then=ffn)
        tasks = step("branch_tasks", "seed", cfg.branch_steps, branch("tasks", "docs"), "seed", save=True, then=bam)
        return step("branch_docs", "seed", cfg.branch_steps, branch("docs", "tasks"), "seed", save=True, then=tasks)

    return dataclasses.replace(step("seed", "seed", cfg.seed_steps, BOTH, save=True), then=after_seed)


def _row(name: str, rec: dict[str, Any], *, active: str, steps: int) -> list[Any]:
    loss = mean_loss(rec["val"])
    return [name, rec["params"], active, steps, rec["tokens"], rec["val"]["docs"], rec["val"]["tasks"], loss,
            math.exp(loss), rec["flops_per_step"] / 1e9, rec["tokens_per_s"]]


def _report(ctx: StudyContext, cfg: MixturesStudyConfig, corpus: Corpus, runs: dict[str, dict[str, Any]], *,
            f_seed: float, f_bam: float, f_ffn: float, branch_flops: float) -> StudyResult:
    cols = ["arm", "parameters", "active per token", "steps", "tokens", "held-out loss docs", "held-out loss tasks",
            "mean loss", "perplexity", "GFLOP/step", "tokens/s"]
    e, k, f = cfg.moe_experts, cfg.moe_top_k, cfg.ffn_hidden
    active_heads = cfg.moh_shared + cfg.moh_top_k
    scratch = Table(title="(a) MoE and (b) MoH vs dense, from scratch, equal tokens", columns=cols, rows=[
        _row("dense", runs["dense"], active=f"FFN {f}, {cfg.n_heads} heads", steps=cfg.scratch_steps),
        _row(f"MoE top-{k} of {e}", runs["moe"], active=f"FFN {k}x{f // k}", steps=cfg.scratch_steps),
        _row(f"MoH {active_heads} of {cfg.n_heads} heads", runs["moh"],
             active=f"{active_heads}/{cfg.n_heads} heads ({active_heads / cfg.n_heads:.0%})",
             steps=cfg.scratch_steps),
    ], note=f"Trained on docs and tasks 50/50, {cfg.seq_len}-token sequences, batch {cfg.batch}; held-out loss "
            f"over {cfg.eval_windows} windows per domain. tokens/s: wall clock on a shared machine (indicative "
            f"only); MoH ran its {cfg.moh_execution} execution.")
    tables = [scratch]
    if cfg.scratch_seeds > 1:
        scratch.title += f" (seed {cfg.seed} of {cfg.scratch_seeds})"
        per_seed = scratch_losses(cfg, runs)
        rows = with_mean_row([[cfg.seed + k, *(per_seed[a][k] for a in SCRATCH),
                               per_seed["moe"][k] - per_seed["dense"][k], per_seed["moh"][k] - per_seed["dense"][k]]
                              for k in range(cfg.scratch_seeds)])
        tables.append(Table(title="(a, b) mean held-out loss per seed, from scratch",
                            columns=["seed", "dense", f"MoE top-{k} of {e}", f"MoH {active_heads} of {cfg.n_heads}",
                                     "MoE − dense", "MoH − dense"], rows=rows,
                            note="Each seed changes the initial weights and the batch order of all three arms alike."))
    per_step = cfg.batch * cfg.seq_len
    dense_words = ("the FLOPs of both branches plus BAM's mixture stage" if cfg.dense_budget == "after_seed" else
                   "the FLOPs of BAM's mixture stage only (dense_budget: mixture, the branches not charged)")
    bam = Table(title="(c) BAM vs dense continuation vs FFN-only upcycling, equal FLOPs after the seed", columns=cols,
                rows=[_row("dense seed", runs["seed"], active="dense", steps=cfg.seed_steps),
                      _row("branch docs", runs["branch_docs"], active="dense", steps=cfg.branch_steps),
                      _row("branch tasks", runs["branch_tasks"], active="dense", steps=cfg.branch_steps),
                      _row("BAM (soft MoA + MoE)", runs["bam"], active=f"2 attn experts, FFN top-{cfg.bam_top_k}",
                           steps=cfg.mix_steps),
                      _row("FFN-only upcycling (BTX)", runs["ffn_only"], active=f"FFN top-{cfg.bam_top_k}",
                           steps=runs["ffn_only"]["tokens"] // per_step),
                      _row("dense continuation", runs["dense_cont"], active="dense",
                           steps=runs["dense_cont"]["tokens"] // per_step)],
                note="Mixture arms start after the branches (both branches' FLOPs count towards their budget); "
                     f"dense continuation starts from the seed and gets {dense_words} in steps.")
    diag = [_bam_diagnostics(cfg, runs, seed_suffix(k), f_seed=f_seed, f_bam=f_bam, f_ffn=f_ffn,
                             branch_flops=branch_flops) for k in range(cfg.bam_seeds)]
    # held-out loss vs FLOPs after the seed at several budgets, the mean over seeds
    total = branch_flops + cfg.mix_steps * f_bam
    budget_rows = []
    for i, q in enumerate(BUDGETS):
        vals = [[d["budgets"][i][n] for d in diag] for n in BUDGET_ARMS]
        means = [None if None in v else sum(v) / len(v) for v in vals]
        budget_rows.append([(branch_flops + (total - branch_flops) * q) / 1e12, *means,
                            None if None in (means[0], means[2]) else means[0] - means[2]])
    budget = Table(title="(c) mean held-out loss against training FLOPs after the seed"
                         + (f", mean of {cfg.bam_seeds} seeds" if cfg.bam_seeds > 1 else ""),
                   columns=["TFLOP after seed", *BUDGET_ARMS, "BAM − dense"],
                   rows=budget_rows, note="Linear between evaluations; the first budget is a quarter into the "
                                          "mixture stage. A shrinking gap means the mixture is still recovering.")
    tables += [bam, budget]
    if cfg.bam_seeds > 1:
        bam.title += f" (seed {cfg.seed} of {cfg.bam_seeds})"
        tables.append(Table(title="(c) mean held-out loss per seed, after the seed and branches",
                            columns=["seed", "BAM", "FFN-only", "dense continuation", "BAM − FFN-only",
                                     "BAM − dense"],
                            rows=with_mean_row([[cfg.seed + k, d["bam"], d["ffn_only"], d["dense"],
                                                 d["bam"] - d["ffn_only"], d["bam"] - d["dense"]]
                                                for k, d in enumerate(diag)]),
                            note="Each seed changes the seed model's initial weights, every arm's batch order and "
                                 "the upcycled routers."))
    tables.append(Table(title="(c) where BAM's loss comes from, per seed",
                        columns=["seed", "branch gain docs", "branch gain tasks", "kept at upcycling docs",
                                 "kept at upcycling tasks", f"BAM − dense at step {cfg.mix_steps}",
                                 "BAM − dense, equal FLOPs"],
                        rows=with_mean_row([[cfg.seed + k, d["gain_docs"], d["gain_tasks"], d["kept_docs"],
                                             d["kept_tasks"], d["equal_steps"], d["bam"] - d["dense"]]
                                            for k, d in enumerate(diag)]),
                        note="Branch gain: the dense continuation's held-out loss on a branch's own domain after both "
                             "branches' FLOPs minus that branch's (> 0: the branch learnt its domain better than "
                             "training on the mix). Kept at upcycling: the share of its branch's gain over the seed on "
                             "that domain that the upcycled model has before its first mixture step. BAM − dense "
                             f"at step {cfg.mix_steps}: both after as many mixture steps (the branches and BAM's "
                             "dearer step not charged; the dense continuation is mid-schedule there)."))
    series = _bam_series(cfg, runs, "", f_seed=f_seed, f_bam=f_bam, f_ffn=f_ffn, branch_flops=branch_flops)
    plots = [p for p in (
        plot_curves(ctx.out / "mixtures_scratch.png",
                    {n: [(c[1], mean_loss(c[3])) for c in runs[n]["curve"]] for n in ("dense", "moe", "moh")},
                    title="(a, b) from scratch", xlabel="training tokens", ylabel="mean held-out loss", log=ctx.log),
        plot_curves(ctx.out / "mixtures_bam.png",
                    {n: [((off + c[0] * fps) / 1e12, mean_loss(c[3])) for c in r["curve"]]
                     for n, (r, fps, off) in series.items()},
                    title="(c) after the seed", xlabel="TFLOP after the seed", ylabel="mean held-out loss",
                    log=ctx.log),
    ) if p]
    return StudyResult(tables=tables, findings=_findings(cfg, runs, budget_rows, diag), plots=plots,
                       data={"config": dataclasses.asdict(cfg), "corpus_tokens": corpus.sizes(), "runs": runs,
                             "flops_per_step": {"seed": f_seed, "bam": f_bam, "ffn_only": f_ffn}, "bam_seeds": diag})


#: budgets of the (c) loss-against-FLOPs table: these fractions of BAM's mixture stage after the branches
BUDGETS = (0.25, 0.5, 0.75, 1.0)
BUDGET_ARMS = ("BAM", "FFN-only", "dense continuation")


def _bam_series(cfg: MixturesStudyConfig, runs: dict[str, dict[str, Any]], sfx: str, *, f_seed: float, f_bam: float,
                f_ffn: float, branch_flops: float) -> dict[str, tuple[dict[str, Any], float, float]]:
    """One seed's (c) arms against FLOPs after the seed: name -> (run, FLOPs per step, FLOPs charged before its
    first step: the branches for the mixtures, and for the dense continuation unless ``dense_budget: mixture``
    leaves them uncharged)."""
    dense_offset = 0.0 if cfg.dense_budget == "after_seed" else branch_flops
    return {"BAM": (runs[f"bam{sfx}"], f_bam, branch_flops), "FFN-only": (runs[f"ffn_only{sfx}"], f_ffn, branch_flops),
            "dense continuation": (runs[f"dense_cont{sfx}"], f_seed, dense_offset)}


def _bam_diagnostics(cfg: MixturesStudyConfig, runs: dict[str, dict[str, Any]], sfx: str, *, f_seed: float,
                     f_bam: float, f_ffn: float, branch_flops: float) -> dict[str, Any]:
    """One seed's (c) numbers: final losses, losses at the :data:`BUDGETS`, and where BAM's loss comes from
    (the branches' gain on their own domain, the upcycling jump, BAM against dense at equal steps)."""
    bam, ffn, dense = runs[f"bam{sfx}"], runs[f"ffn_only{sfx}"], runs[f"dense_cont{sfx}"]
    total = branch_flops + cfg.mix_steps * f_bam
    series = _bam_series(cfg, runs, sfx, f_seed=f_seed, f_bam=f_bam, f_ffn=f_ffn, branch_flops=branch_flops)
    budgets = [{n: _at_budget(r["curve"], fps, off, branch_flops + (total - branch_flops) * q)
                for n, (r, fps, off) in series.items()} for q in BUDGETS]

    def gain(domain: str) -> float:  # the dense continuation's loss after the branches' FLOPs minus the branch's
        at = _at_budget(dense["curve"], f_seed, 0.0, branch_flops, domain=domain)
        return float("nan") if at is None else at - runs[f"branch_{domain}{sfx}"]["val"][domain]

    def kept(domain: str) -> float:  # share of its own branch's gain over the seed the upcycled model starts with
        before, branch = runs[f"seed{sfx}"]["val"][domain], runs[f"branch_{domain}{sfx}"]["val"][domain]
        return (before - bam["curve"][0][3][domain]) / (before - branch) if before > branch else float("nan")

    at_steps = _at_budget(dense["curve"], 1.0, 0.0, cfg.mix_steps)
    return {"bam": mean_loss(bam["val"]), "ffn_only": mean_loss(ffn["val"]), "dense": mean_loss(dense["val"]),
            "budgets": budgets, "gain_docs": gain("docs"), "gain_tasks": gain("tasks"),
            "kept_docs": kept("docs"), "kept_tasks": kept("tasks"),
            "equal_steps": float("nan") if at_steps is None else mean_loss(bam["val"]) - at_steps}


def _findings(cfg: MixturesStudyConfig, runs: dict[str, dict[str, Any]], budget_rows: list[list[Any]],
              diag: list[dict[str, Any]]) -> list[Finding]:
    loss = {n: mean_loss(r["val"]) for n, r in runs.items()}
    per_seed = scratch_losses(cfg, runs)
    loss.update({arm: sum(v) / len(v) for arm, v in per_seed.items()})  # the scratch arms: mean over seeds
    moe_seeds, moe_ok = paired_seeds(per_seed["moe"], per_seed["dense"], "dense")
    moh_seeds, _ = paired_seeds(per_seed["moh"], per_seed["dense"], "dense")
    matches = sum(m <= d + 0.01 for m, d in zip(per_seed["moh"], per_seed["dense"]))  # seeds where MoH matches
    moh_ok = loss["moh"] <= loss["dense"] + 0.01 and matches * 2 > cfg.scratch_seeds
    during = " (seed 0)" if cfg.scratch_seeds > 1 else ""
    gaps = [r[-1] for r in budget_rows if r[-1] is not None]
    shrinks = len(gaps) > 1 and gaps[-1] < gaps[0] - 1e-3
    trend = ("BAM − dense continuation at 1/4, 1/2, 3/4, all of the mixture stage's FLOPs: "
             + " → ".join(f"{g:+.3f}" for g in gaps) + (" (shrinking)" if shrinks else " (not shrinking)"))
    active = cfg.moh_shared + cfg.moh_top_k
    moe_lead = lead_from(runs["moe"], runs["dense"])
    bam, ffn, dense = ([d[n] for d in diag] for n in ("bam", "ffn_only", "dense"))
    vs_ffn, ffn_ok = paired_seeds(bam, ffn, "FFN-only")
    vs_dense, dense_ok = paired_seeds(bam, dense, "dense continuation")
    return [
        Finding(claim=f"MoE beats dense at equal active parameters and tokens (top-{cfg.moe_top_k} of "
                      f"{cfg.moe_experts})",
                published="Switch Transformer (Fedus et al. 2021): up to 7x faster pre-training than the dense "
                          "T5-Base of the same FLOPs per token",
                ours=f"held-out loss MoE {loss['moe']:.3f} vs dense {loss['dense']:.3f}{moe_seeds}; MoE − dense "
                     f"during training{during} {gap_trend(runs['moe'], runs['dense'])}",
                reproduced=moe_ok,
                why=f"{runs['dense']['tokens']} training tokens: each expert sees ~{cfg.moe_top_k}/{cfg.moe_experts} "
                    "of them and the router starts untrained, so the MoE starts behind; "
                    + (f"it leads from step {moe_lead} on" if moe_lead is not None else
                       "it has not caught up by the last step (a shrinking gap says more tokens might close it)")),
        Finding(claim=f"MoH with {active / cfg.n_heads:.0%} of heads active matches or beats dense attention",
                published="MoH (Jin et al. 2024): MoH-LLaMA3-8B with 75% of heads active, 64.0% average on 14 "
                          "benchmarks, +2.4 over LLaMA3-8B",
                ours=f"held-out loss MoH {loss['moh']:.3f} vs dense {loss['dense']:.3f}{moh_seeds}; MoH − dense "
                     f"during training{during} {gap_trend(runs['moh'], runs['dense'])}",
                reproduced=moh_ok,
                why="'matches' read as within 0.01 nats; trained from scratch here (the published figure is "
                    "continue-tuning)"),
        Finding(claim="BAM beats FFN-only upcycling at equal compute",
                published="BAM (Zhang et al. 2024), seeds 590M-2B: lower perplexity than BTX (FFN-only) upcycling "
                          "at equal total training FLOPs",
                ours=f"held-out loss BAM {sum(bam) / len(bam):.3f} vs FFN-only {sum(ffn) / len(ffn):.3f}{vs_ffn}",
                reproduced=ffn_ok,
                why=f"two branches of a {runs['seed']['params']}-parameter seed; equal FLOPs in the mixture stage "
                    f"({cfg.mix_steps} BAM steps, {runs['ffn_only']['tokens'] // (cfg.batch * cfg.seq_len)} "
                    f"FFN-only steps: BAM's soft attention mixture computes both attention experts, "
                    f"{runs['bam']['flops_per_step'] / runs['ffn_only']['flops_per_step']:.2f}x the FLOPs of an "
                    "FFN-only step)"),
        Finding(claim="BAM beats dense continuation of the seed at equal compute",
                published="BTX (Sukhbaatar et al. 2024), which BAM extends: the upcycled mixture beats the dense "
                          "seed trained on with the same compute",
                ours=f"held-out loss BAM {sum(bam) / len(bam):.3f} vs dense continuation "
                     f"{sum(dense) / len(dense):.3f}{vs_dense}; {trend}",
                reproduced=dense_ok,
                why=_bam_why(cfg, runs, diag)),
    ]


def _bam_why(cfg: MixturesStudyConfig, runs: dict[str, dict[str, Any]], diag: list[dict[str, Any]]) -> str:
    """Where BAM's loss against dense continuation comes from, in the run's numbers (means over seeds)."""
    def avg(key: str) -> float:
        return sum(d[key] for d in diag) / len(diag)

    over = f" (mean of {len(diag)} seeds)" if len(diag) > 1 else ""
    gain = max(avg("gain_docs"), avg("gain_tasks"))
    dense_steps = runs["dense_cont"]["tokens"] // (cfg.batch * cfg.seq_len)
    ratio = runs["bam"]["flops_per_step"] / runs["seed"]["flops_per_step"]
    own, other = (1 - cfg.branch_other) * cfg.branch_steps, cfg.branch_steps  # batches of one domain, each
    return (f"{cfg.seed_steps}-step seed, {cfg.branch_steps}-step branches ({1 - cfg.branch_other:.0%} their own "
            f"domain), {cfg.mix_steps} mixture steps{over}. Measured: (1) the branches "
            + ("barely out-learn the mix" if gain < 0.1 else "specialise")
            + f": the dense continuation's loss after the branches' FLOPs minus a branch's on its own domain is "
            f"{avg('gain_docs'):+.3f} (docs) / {avg('gain_tasks'):+.3f} (tasks) nats, the dense run having seen "
            f"{other:g} batches' worth of each domain ({2 * cfg.branch_steps} steps x 50%) to a branch's {own:g} of "
            f"its own; (2) the upcycled model starts with {avg('kept_docs'):.0%} (docs) / {avg('kept_tasks'):.0%} "
            f"(tasks) of its branches' gain over the seed; (3) per step BAM is {avg('equal_steps'):+.3f} from the "
            f"dense continuation at step {cfg.mix_steps} (same tokens in the mixture stage, dense mid-schedule), but a "
            f"BAM step costs {ratio:.2f}x a dense one"
            + (f" and the dense continuation also spends the branches' FLOPs on the mix: {dense_steps} steps to "
               f"BAM's {cfg.mix_steps}" if cfg.dense_budget == "after_seed" else
               f"; the dense continuation gets BAM's mixture-stage FLOPs only: {dense_steps} steps")
            + ". Separate runs with --dense_budget=mixture (the branches not charged) and a longer --mix_steps tell "
              "the branch stage's cost and a still-closing gap apart (configs/study_mixtures.yaml records them). "
              "The earlier 4.82 vs 4.78 has no recorded setting")
