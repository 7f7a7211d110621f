"""Worker functions for multi-rank trainer tests (spawned by ``longreach.testing.run_ranks``).

Each worker runs a whole matrix of cases in one process group and returns a list of failure strings
(empty when everything matched), so one spawn per world size covers everything.
"""
from __future__ import annotations

import dataclasses
import shutil
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from longreach.engines import as_engine_config, build_engine
from longreach.job import JobConfig
from longreach.metrics import read_metrics
from longreach.models import build_model
from longreach.models.config import ModelConfig
from longreach.parallel.config import ParallelConfig
from longreach.mixtures.expert_parallel import expert_shards
from longreach.model_setup import dp_cp_group, parallelize
from longreach.trainer import build_mesh, forward_backward, train

from longreach.models.config import MoEOptions

IGNORE = -100


class SyntheticBatches:
    """Deterministic, learnable batches: arithmetic sequences token_i = (a + c·i) mod V.

    The next token follows from the previous two, so a tiny model's loss falls within a few dozen steps.
    Labels are shifted on the global sequence (position i predicts token i+1; the last is ignored), and
    ``ignore_every`` additionally ignores a pseudo-random share of labels (uneven counts per shard).
    Stateful (``state_dict``/``load_state_dict``): the position in the stream is checkpointed.

    Args:
        vocab: vocabulary size V.
        seq_len: global sequence length S.
        batch: rows per micro-batch.
        seed: base seed; rows depend on (seed, dp_rank, index) only.
        dp_rank / dp_size: this data-parallel rank's stream.
        documents: pack two documents per row (per-document position ids and cu_seqlens).
        ignore_every: ignore labels where a hash of the position hits 0 mod this (0: none).
    """

    def __init__(self, *, vocab: int, seq_len: int, batch: int, seed: int = 0, dp_rank: int = 0, dp_size: int = 1,
                 documents: bool = False, ignore_every: int = 0) -> None:
        self.vocab, self.seq_len, self.batch, self.seed = vocab, seq_len, batch, seed
        self.dp_rank, self.dp_size, self.documents, self.ignore_every = dp_rank, dp_size, documents, ignore_every
        self.index = 0

    def make(self, index: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index * self.dp_size + self.dp_rank)
        s, b, v = self.seq_len, self.batch, self.vocab
        a = torch.randint(0, v, (b, 1), generator=g)
        c = torch.randint(1, 4, (b, 1), generator=g)
        tokens = (a + c * torch.arange(s + 1)) % v  # [B, S+1]
        inputs, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()  # [B, S]
        labels[:, -1] = IGNORE
        out: dict[str, Any] = {"input_ids": inputs, "labels": labels}
        if self.ignore_every:
            drop = torch.randint(0, self.ignore_every, (b, s), generator=g) == 0
            labels[drop] = IGNORE
        if self.documents:
            cut = s // 3 + 1
            cu = torch.tensor([0, cut, s])
            out["cu_seqlens"] = cu
            pos = torch.cat([torch.arange(cut), torch.arange(s - cut)]).expand(b, s).clone()
            out["position_ids"] = pos
            labels[:, cut - 1] = IGNORE  # no prediction across the document boundary
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        out = self.make(self.index)
        self.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.index = int(sd["index"])


def tiny_job(**over: Any):
    """A small JobConfig for tests (dotted keys in ``over``: ``{"train.seq_len": 32}``)."""
    cfg = JobConfig(model=ModelConfig(vocab_size=37, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                                      max_seq_len=64))
    sections: dict[str, dict[str, Any]] = {}
    for key, value in over.items():
        sec, name = key.split(".", 1)
        sections.setdefault(sec, {})[name] = value
    for sec, values in sections.items():
        cfg = dataclasses.replace(cfg, **{sec: dataclasses.replace(getattr(cfg, sec), **values)})
    return dataclasses.replace(cfg)  # re-run JobConfig's cross-section checks


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> str | None:
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    return None if err <= tol else f"{name}: relative error {err:.3e} > {tol:.0e}"


# MoE with experts split over cp; the load-balancing loss (nonlinear in per-rank token shares) and the
# capacity limit (per-rank token counts) differ from a single rank by design, so both are off here
_MOE_GRAD_MODEL = {"model.ffn_type": "moe",
                   "model.moe": MoEOptions(experts=4, top_k=2, balance_coef=0.0, expert_parallel=True)}


def _grad_case_config(case: dict[str, Any]) -> tuple[Any, Any]:
    """(the case's parallel JobConfig, the single-rank reference's JobConfig)."""
    cfg = tiny_job(**{"train.seq_len": 24, "train.grad_accum": case.get("grad_accum", 1),
                      "attention.backend": "reference", "parallel.dp": case["dp"], "parallel.cp": case["cp"],
                      "parallel.strategy": case.get("strategy", "ring"),
                      "parallel.layout": case.get("layout", "zigzag"),
                      "train.loss_chunk_size": 7,
                      "train.activation_checkpointing": case.get("activation_checkpointing", False),
                      **(_MOE_GRAD_MODEL if case.get("moe") else {})})
    ref_cfg = tiny_job(**{"train.seq_len": 24, "attention.backend": "reference", "train.loss_chunk_size": 7})
    return cfg, ref_cfg


def _grad_case_inputs(case: dict[str, Any], cfg: Any) -> tuple[torch.nn.Module, list[list[dict[str, Any]]]]:
    """The case's seeded float64 model and its global batch: ``[dp rank][micro-batch]``."""
    torch.manual_seed(11)
    base = build_model(cfg.model).double()
    dp, accum = case["dp"], case.get("grad_accum", 1)
    streams = [SyntheticBatches(vocab=cfg.model.vocab_size, seq_len=cfg.train.seq_len, batch=2, seed=3,
                                dp_rank=r, dp_size=dp, documents=case.get("documents", False), ignore_every=3)
               for r in range(dp)]
    return base, [[s.make(i) for i in range(accum)] for s in streams]


def grad_reference(case: dict[str, Any]) -> dict[str, Any]:
    """One process, no process group: the full global batch (every dp rank's micro-batches), local attention,
    float64. Returns ``{"loss", "n" (tokens), "grads": {parameter name: gradient}}``."""
    cfg, ref_cfg = _grad_case_config(case)
    base, batches = _grad_case_inputs(case, cfg)
    parallelize(base, ref_cfg, None)
    flat = [mb for per_rank in batches for mb in per_rank]
    loss, _, n = forward_backward(base, flat, cfg=ref_cfg, mesh=None, step=0, device=torch.device("cpu"))
    return {"loss": loss, "n": n, "grads": {name: p.grad for name, p in base.named_parameters()}}


def grad_match_worker(rank: int, world_size: int, cases: list[dict[str, Any]]) -> list[dict[str, Any] | str]:
    """Each case's loss, token count and gradients on this rank, parallel as the case says.

    Case keys: dp, cp, strategy, layout, documents, grad_accum, activation_checkpointing, engine (an
    ``engine:`` section routed through longreach.engines), moe (MoE FFN with experts split over cp: a
    rank's expert gradients are its block of the reference's).

    Returns:
        per case ``{"loss", "n", "cp_rank", "grads": {parameter name: full (unsharded) gradient}}``, or the
        error the case raised; the test compares them with :func:`grad_reference` (:func:`grad_mismatches`).
    """
    out: list[dict[str, Any] | str] = []
    meshes: dict[tuple[int, int], Any] = {}
    for case in cases:
        try:
            dp, cp = case["dp"], case["cp"]
            cfg, _ = _grad_case_config(case)
            base, batches = _grad_case_inputs(case, cfg)
            if (dp, cp) not in meshes:
                meshes[(dp, cp)] = build_mesh(ParallelConfig(dp=dp, cp=cp), world_size, torch.device("cpu"))
            mesh, dp_rank, _ = meshes[(dp, cp)]
            model = parallelize(base, cfg, mesh)  # seams and split experts; the engine wraps it for dp
            engine = build_engine(as_engine_config(case.get("engine", "native")), model,
                                  lambda ps: torch.optim.SGD(ps, lr=0.0), group=dp_cp_group(mesh), mesh=mesh)
            model = engine.model
            loss, _, n = forward_backward(model, batches[dp_rank], cfg=cfg, mesh=mesh, step=0,
                                          device=torch.device("cpu"), engine=engine)
            inner = model.module if hasattr(model, "module") else model
            grads = {}
            for pname, p in inner.named_parameters():
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2 shards
                grads[pname.replace("._checkpoint_wrapped_module", "")] = g.detach().clone()
            out.append({"loss": loss, "n": n, "cp_rank": mesh["cp"].get_local_rank(), "grads": grads})
        except Exception as e:  # noqa: BLE001 - report every case
            out.append(f"[{case}] rank {rank} {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}")
    return out


def grad_mismatches(cases: list[dict[str, Any]], per_rank: list[list[dict[str, Any] | str]]) -> list[str]:
    """Compare every rank's :func:`grad_match_worker` result with :func:`grad_reference` (test-process side).

    Token counts must be equal, losses within 1e-10 relative, every gradient within ``1e-9 × max |reference|``
    (``torch.testing.assert_close``; split experts against the rank's block). Returns the mismatches.
    """
    bad: list[str] = []
    for i, case in enumerate(cases):
        want = grad_reference(case)
        for rank, results in enumerate(per_rank):
            got = results[i]
            if isinstance(got, str):
                bad.append(got)
                continue
            tag = f"[{case}] rank {rank}"
            if got["n"] != want["n"]:
                bad.append(f"{tag}: token count {got['n']} != reference {want['n']}")
            if abs(got["loss"] - want["loss"]) > 1e-10 * abs(want["loss"]):
                bad.append(f"{tag}: loss {got['loss']!r} != reference {want['loss']!r}")
            for pname, ref in want["grads"].items():
                g = got["grads"][pname]
                if g.shape != ref.shape and case.get("moe"):  # split experts: cp rank r holds block r
                    r, el = got["cp_rank"], g.shape[0]
                    ref = ref[r * el:(r + 1) * el]
                try:
                    torch.testing.assert_close(g, ref, rtol=0, atol=1e-9 * max(float(ref.abs().max()), 1e-30),
                                               msg=lambda m, t=f"{tag} {pname}.grad": f"{t}: {m}")
                except AssertionError as e:
                    bad.append(str(e))
    return bad


def train_worker(rank: int, world_size: int, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``longreach.trainer.train`` for each run spec ({"out_dir", "over": {...}, "remove_latest": bool}).

    ``remove_latest`` deletes the newest checkpoint first (rank 0, then a barrier) so the run resumes
    from the one before. Returns each run's summary.
    """
    out = []
    for spec in runs:
        cfg = tiny_job(**{"run.out_dir": spec["out_dir"], **spec.get("over", {})})
        if spec.get("remove_latest"):
            if rank == 0:
                steps = sorted(Path(spec["out_dir"], "checkpoints").glob("step-*"))
                shutil.rmtree(steps[-1])
            dist.barrier()
        dp = world_size // cfg.parallel.cp
        dp_rank = rank // cfg.parallel.cp
        data = SyntheticBatches(vocab=cfg.model.vocab_size, seq_len=cfg.train.seq_len,
                                batch=cfg.train.micro_batch_size, seed=cfg.run.seed, dp_rank=dp_rank, dp_size=dp,
                                documents=spec.get("documents", False))
        out.append(train(cfg, data=data))
    return out


def two_rank_suite(rank: int, world_size: int, grad_cases: list[dict[str, Any]], runs: list[dict[str, Any]],
                   moe_dir: str | None = None) -> tuple[list[dict[str, Any] | str], list[dict[str, Any]],
                                                        tuple[list[dict], list[dict]],
                                                        tuple[list[str], dict[str, Any]] | None]:
    """The trainer tests' whole 2-rank matrix in one group.

    Returns:
        ``(grad_match_worker(grad_cases), summaries of runs[:-1], (metrics of runs[-1], metrics after resuming
        it from its second-to-last checkpoint), moe_expert_parallel_checks(moe_dir) or None)``.
    """
    grads = grad_match_worker(rank, world_size, grad_cases)
    summaries = train_worker(rank, world_size, runs)
    straight = read_metrics(summaries[-1]["metrics"]) if rank == 0 else []
    train_worker(rank, world_size, [{**runs[-1], "remove_latest": True}])
    again = read_metrics(summaries[-1]["metrics"]) if rank == 0 else []
    moe = moe_expert_parallel_checks(rank, world_size, moe_dir) if moe_dir is not None else None
    return grads, summaries, (straight, again), moe


MOE_OPTIONS = {"experts": 4, "top_k": 2, "capacity_factor": 2.0, "routing": "attention"}


def moe_job(**over: Any):
    """:func:`tiny_job` with configs/moe_tiny_cpu.yaml's MoE FFN (4 SwiGLU experts, top-2, capacity 2,
    attention-aware routing); ``expert_parallel`` and other ``model.moe`` options via ``moe``."""
    moe = MoEOptions(**{**MOE_OPTIONS, **over.pop("moe", {})})
    return tiny_job(**{"model.ffn_type": "moe", "model.moe": moe, **over})


def _full_state_from_checkpoint(ckpt: str, cfg: Any) -> dict[str, torch.Tensor]:
    """The whole model of a checkpoint read by this process alone (DCP, no collective): split experts
    come back gathered, as one ``[E, ...]`` tensor per weight."""
    sd = {k: v.detach().clone() for k, v in build_model(cfg.model).state_dict().items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load({"model": sd}, checkpoint_id=f"{ckpt}/model", no_dist=True)
    return sd


def _split_vs_replicated(rank: int, out_dir: str, common: dict[str, Any], *, dp_rank: int = 0, dp_size: int = 1
                         ) -> tuple[list[str], dict[str, Any], Any, list[dict]]:
    """Train the MoE job with experts replicated, then split over cp; compare per-step loss and grad norm
    (1e-5) and check this rank holds half the expert parameters when split.

    Returns ``(failures, summaries by name, the split run's config, the split run's metrics)``.
    """
    failures: list[str] = []
    summaries: dict[str, Any] = {}
    for name, ep in (("replicated", False), ("split", True)):
        cfg = moe_job(moe={"expert_parallel": ep}, **{"run.out_dir": f"{out_dir}/{name}", **common})
        data = SyntheticBatches(vocab=cfg.model.vocab_size, seq_len=cfg.train.seq_len, batch=2, seed=0,
                                dp_rank=dp_rank, dp_size=dp_size)
        summaries[name] = train(cfg, data=data)
    rep, split = (read_metrics(summaries[n]["metrics"]) for n in ("replicated", "split"))
    for a, b in zip(rep, split, strict=True):
        for key in ("loss", "grad_norm"):
            if abs(a[key] - b[key]) > 1e-5 * abs(a[key]):
                failures.append(f"step {a['step']} {key}: split experts {b[key]!r} != replicated {a[key]!r}")
    # this rank's share of the expert parameters: half of them
    m = cfg.model
    all_experts = m.n_layers * 3 * MOE_OPTIONS["experts"] * m.dim * m.ffn_hidden
    want = {"replicated": (summaries["replicated"]["local_params"], 0),
            "split": (summaries["replicated"]["local_params"] - all_experts // 2, all_experts // 2)}
    for name, (local, experts) in want.items():
        got = (summaries[name]["local_params"], summaries[name]["expert_params"])
        if got != (local, experts):
            failures.append(f"{name}: rank {rank} holds (parameters, split expert parameters) {got}, want "
                            f"{(local, experts)}")
    return failures, summaries, cfg, split


def moe_expert_parallel_checks(rank: int, world_size: int, out_dir: str) -> tuple[list[str], dict[str, Any]]:
    """Experts split over cp=2 against the same MoE model without expert parallelism (every rank holds
    and computes every expert): 4 steps each; then the split run resumed from its step-2 checkpoint.

    Checks (failures returned): equal losses and grad norms per step; equal final weights, the split
    experts gathered from the checkpoint by DCP; the resumed steps equal the straight ones (expert
    weights *and* optimizer moments were saved per rank); this rank holds half the expert parameters.

    Returns:
        ``(failures, {"replicated": summary, "split": summary})``.
    """
    common = {"run.steps": 4, "run.save_every": 2, "checkpoint.keep_last": 0, "train.seq_len": 32,
              "train.micro_batch_size": 2, "train.lr": 1e-2, "train.warmup_steps": 1, "parallel.cp": 2,
              "parallel.layout": "zigzag", "attention.backend": "cpu"}
    failures, summaries, cfg, split = _split_vs_replicated(rank, out_dir, common)
    # final weights: the split experts gathered from the checkpoint equal the replicated ones
    if rank == 0:
        full_rep = _full_state_from_checkpoint(summaries["replicated"]["checkpoint"], cfg)
        full_split = _full_state_from_checkpoint(summaries["split"]["checkpoint"], cfg)
        for k, v in full_rep.items():
            msg = _close(k, full_split[k], v, 1e-4)  # fp32 Adam: summation order differs (all-to-all, norm)
            if msg:
                failures.append(f"final weights: {msg}")
    # resume the split run from step 2: steps 3 and 4 again (step 4 needs step 3's Adam moments)
    if rank == 0:
        shutil.rmtree(sorted(Path(out_dir, "split", "checkpoints").glob("step-*"))[-1])
    dist.barrier()
    cfg = moe_job(moe={"expert_parallel": True}, **{"run.out_dir": f"{out_dir}/split", **common})
    train(cfg, data=SyntheticBatches(vocab=cfg.model.vocab_size, seq_len=cfg.train.seq_len, batch=2, seed=0))
    again = read_metrics(summaries["split"]["metrics"])
    if [(r["loss"], r["grad_norm"]) for r in again] != [(r["loss"], r["grad_norm"]) for r in split]:
        failures.append(f"resumed split run: {[r['loss'] for r in again]} != {[r['loss'] for r in split]}")
    return failures, summaries


FOUR_RANK_GRAD_CASES = [dict(dp=2, cp=2, strategy="ring", layout="zigzag", moe=True)]


def four_rank_moe_suite(rank: int, world_size: int, out_dir: str
                        ) -> tuple[list[dict[str, Any] | str], list[str], dict[str, Any]]:
    """Experts split over cp=2 with dp=2 (world size 4): the dp-group SUM of expert gradients runs.

    1. One step's gradients of the dp=2 × cp=2 split-expert model (:func:`grad_match_worker`, float64) equal
       the single-process full-batch reference; each rank's expert gradients are its block of the reference.
    2. 3 training steps of configs/moe_tiny_cpu.yaml's MoE (top-2, capacity 2, attention routing) with the
       experts split over cp vs replicated on every rank, each dp rank on its own data stream: equal losses
       and grad norms per step; each rank holds half the expert parameters.

    Returns:
        ``(grad_match_worker(FOUR_RANK_GRAD_CASES), failures, {"replicated": summary, "split": summary})``.
    """
    grads = grad_match_worker(rank, world_size, FOUR_RANK_GRAD_CASES)
    failures: list[str] = []
    # the split model really holds E / cp experts per rank, and reduces them over its dp replicas only
    cfg = tiny_job(**{"train.seq_len": 24, "parallel.dp": 2, "parallel.cp": 2, **_MOE_GRAD_MODEL})
    mesh, dp_rank, _ = build_mesh(ParallelConfig(dp=2, cp=2), world_size, torch.device("cpu"))
    shards = expert_shards(parallelize(build_model(cfg.model), cfg, mesh))
    if shards is None or any(p.shape[0] != _MOE_GRAD_MODEL["model.moe"].experts // 2 for p in shards.params):
        failures.append(f"rank {rank}: expert shards {None if shards is None else [p.shape for p in shards.params]}"
                        " do not hold E / cp = 2 experts each")
    elif shards.replicas is None or sorted(dist.get_process_group_ranks(shards.replicas)) != [rank % 2, rank % 2 + 2]:
        failures.append(f"rank {rank}: expert gradients reduced over "
                        f"{None if shards.replicas is None else dist.get_process_group_ranks(shards.replicas)}, "
                        f"want the ranks with the same cp coordinate {[rank % 2, rank % 2 + 2]}")
    common = {"run.steps": 3, "train.seq_len": 32, "train.micro_batch_size": 2, "train.lr": 1e-2,
              "train.warmup_steps": 1, "parallel.dp": 2, "parallel.cp": 2, "parallel.layout": "zigzag",
              "attention.backend": "cpu"}
    more, summaries, _, _ = _split_vs_replicated(rank, out_dir, common, dp_rank=dp_rank, dp_size=2)
    return grads, failures + more, summaries
