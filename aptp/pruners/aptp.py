"""APTP: prompt-routed pruning in two phases (Ganjdanesh et al., ICLR 2025).

Phase 1 (model weights frozen) trains the router's architecture predictor and its K codes:

    z = encoder(prompts)                      # (B, D)   frozen sentence transformer
    a = router.normalised_gates(z)            # (B, U)   predicted hard gates / sqrt(group size)
    k = balancer.assign(router.scores(z))     # (B,)     optimal transport: every code in use
    g = router.code_gates(noise=True)[k]      # (B, U)   soft gates of each prompt's code
    student = denoiser(x_t | gates g)         # the same weights gated per sample ...
    teacher = denoiser(x_t | no gates)        # ... and ungated: the dense teacher, no second copy
    L = w_d L_denoise + w_o L_out + w_b L_block + w_r |log(mean r / p)| + w_s (-std r + 1 - max r)
        + w_c L_contrastive(a, z)             # r = kept-MACs ratio of g, (B,)

With ``code_budget: sensitivity`` (an option; the paper's ``uniform`` is the default) the resource
term gains ``sum_k (n_k / B) |log(rbar_k / p_k)|`` with per-code targets p_k allocated, once after
warm-up, from each code's measured sensitivity to pruning (:mod:`aptp.pruners.capacity`).

L_block is averaged over the down/mid/up blocks (as the original); the task terms are assembled by
:meth:`aptp.pruners.training.TrainContext.task_loss`, the same method phase 2 uses. The contrastive loss
compares the architectures routing compares (hard straight-through gates, group-normalised:
:meth:`OTRouter.normalised_gates`), not the predictor's raw logits.

During the first ``warmup_steps`` the predictor's own soft gates drive the model (no codes, no
OT). With a router that learns no codes (``kmeans``, ``nearest``, ``single``), that router assigns the prompts
instead of optimal transport and phase 1 learns one code per expert (an ablation of the learned
routing; :meth:`AptpPruner.run`; its codes are held by the registry's ``ot`` router). Phase 2 cuts each
expert from the dense weights by its code and fine-tunes it on the prompts routed to it, with the dense model
as teacher: the fine-tuning loop the static pruner runs too (:mod:`aptp.pruners.finetune`).

Distributed (``accelerate launch`` / ``torchrun``): every process draws the *global* batch's
noise from the same seeded stream and keeps its own rows; balancing, the contrastive matrix and
the resource terms use the global batch (all-gather), every loss is a global mean, and router
gradients are summed across processes, so N processes compute what one process computes on the
whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from aptp.core import values
from aptp.core.errors import reading
from aptp.core.checkpoint import latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from aptp.core.rundir import open_run
from aptp.core.interfaces import LearnedRouter, Pruner
from aptp.latency.resource import check_resource, resolve_target_ratio, resource_ratio
from aptp.pruners import distributed as D
from aptp.pruners.artefacts import JsonlLogger, save_bundle
from aptp.pruners.data import DataConfig
from aptp.pruners.distributed import global_batch_indices, local_rows, step_generator, sum_gradients
from aptp.pruners.finetune import Phase2Config, finetune_experts
from aptp.pruners.training import TrainContext
from aptp.routers._checks import check_enough_prompts
from aptp.routers.losses import contrastive_loss, resource_loss, spread_losses


@dataclass
class Phase1Weights:
    denoise: float = 1.0
    distill: float = 0.2  # output distillation from the dense teacher
    block: float = 0.2  # block-feature distillation
    resource: float = 2.0
    spread: float = 0.1  # each of -std(r) and 1 - max(r)
    contrastive: float = 100.0

    def __post_init__(self) -> None:
        values.weights("weights.", self, ("denoise", "distill", "block", "resource", "spread", "contrastive"))


@dataclass
class AptpPrunerConfig:
    """APTP's two phases; defaults are the paper's recipe."""

    target_ratio: float = 0.6  # kept MACs (or latency, see resource) of the whole model, batch mean
    steps: int = 5000  # phase 1
    warmup_steps: int = 500  # predictor warm-up: predicted soft gates, no codes, no OT
    batch_size: int = 64  # global batch
    lr: float = 2e-4  # times sqrt(global batch) when scale_lr
    scale_lr: bool = True
    weight_decay: float = 0.0
    contrastive_tau: float = 0.03
    # "orthogonal" (the paper) or "kmeans": at the end of warm-up, codes = k-means centres of the
    # predicted architectures (OTRouter.init_codes_from_predictions), so inference routing agrees
    # with the balanced training routing.
    init_codes: str = "orthogonal"
    min_snr_gamma: Optional[float] = 5.0
    weights: Phase1Weights = field(default_factory=Phase1Weights)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint_every: int = 100
    log_every: int = 10
    resume: bool = True
    progress: bool = True
    # "macs" (the paper): r is each sample's kept-MACs ratio; "latency": its latency ratio predicted by
    # latency_model (aptp.latency.resource), measured on the hardware that model names
    resource: str = "macs"
    latency_model: Optional[dict[str, Any]] = None  # {name: <registered latency model>, ...}; None: profiled
    target_ms: Optional[float] = None  # resource: latency only: a target in ms, replaces target_ratio
    # "uniform" (the paper): one resource target, on the batch mean. "sensitivity" (an option, issue 15):
    # at the first post-warm-up step, measure how much each code's prompts suffer from pruning and give
    # each code its own target p_k (|p_k - target_ratio| <= code_budget_spread, load-weighted mean =
    # target_ratio), priced by an extra per-code resource term (aptp.pruners.capacity).
    code_budget: str = "uniform"
    code_budget_spread: float = 0.15  # most a code's target may differ from target_ratio
    code_budget_samples: int = 256  # training prompts routed and measured (dataset rows, seeded)

    def __post_init__(self) -> None:
        from aptp.pruners.capacity import check_code_budget

        check_code_budget(self.code_budget)
        if not 0.0 <= self.code_budget_spread < 1.0:
            raise ValueError(f"code_budget_spread={self.code_budget_spread} must be in [0, 1) (e.g. 0.15).")
        if self.code_budget_samples < 1:
            raise ValueError(f"code_budget_samples={self.code_budget_samples} must be >= 1 (e.g. 256).")
        if not 0.0 < self.target_ratio <= 1.0:
            raise ValueError(f"target_ratio={self.target_ratio} must be in (0, 1] (the paper: 0.6 to 0.85).")
        check_resource(self.resource, self.latency_model, self.target_ms)
        if self.steps < 0 or not 0 <= self.warmup_steps:
            raise ValueError(f"steps={self.steps} and warmup_steps={self.warmup_steps} must be >= 0.")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be <= steps={self.steps} (phase 1 would "
                             "never reach the codes); lower warmup_steps or raise steps.")
        values.positive("lr", self.lr, "(the paper: 2e-4, times sqrt(batch) with scale_lr)")
        values.non_negative("weight_decay", self.weight_decay)
        values.positive("contrastive_tau", self.contrastive_tau, "(the paper: 0.03)")
        if self.min_snr_gamma is not None:
            values.non_negative("min_snr_gamma", self.min_snr_gamma, "(e.g. 5; 0 or null switches Min-SNR weighting off)")
        if self.batch_size < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("batch_size, checkpoint_every and log_every must be >= 1.")
        if self.init_codes not in ("orthogonal", "kmeans"):
            raise ValueError(f"init_codes={self.init_codes!r} must be 'orthogonal' (the paper) or 'kmeans'.")


class AptpPruner(Pruner):
    """APTP: learn a prompt router and K architecture codes, then cut and fine-tune K experts."""

    config_class = AptpPrunerConfig

    def run(self, composition, output_dir: Path) -> dict[str, Any]:
        """Phase 1 and phase 2, then the router bundle. With a router that learns no codes (not a
        :class:`~aptp.core.interfaces.LearnedRouter`: ``kmeans``, ``nearest``, ``single``), that
        router is fitted to the training prompts and assigns them to experts, and phase 1 trains
        codes of its own (the ablation "routing without learned codes": APTP's objective, no
        balancing); the bundle routes with that router."""
        output_dir = Path(output_dir)
        router = composition.require("router")  # fail before loading any model
        fixed = not isinstance(router, LearnedRouter)
        if not fixed:
            composition.require("balancer")
        with open_run(output_dir, composition.config, composition.registry):  # lock; refuse another config's folder
            ctx = TrainContext(composition, self.config.data, output_dir, progress=self.config.progress,
                               min_snr_gamma=self.config.min_snr_gamma)
            # more experts than distinct training prompts would leave an expert without prompts of its own
            check_enough_prompts(router.num_experts, prompts=ctx.captions)
            ids = None
            if fixed:
                embeddings = ctx.all_embeddings()  # (N, D)
                router.fit(embeddings, prompts=ctx.captions)  # keyword rules read the texts
                with torch.no_grad():
                    ids = router.eval().route(embeddings).expert_ids  # (N,) fixed for the whole run
            codes = bind_seeded(code_router(composition.registry, router.num_experts) if fixed else router, ctx)
            phase1 = self.phase1(ctx, codes, fixed_ids=ids)
            phase2 = self.phase2(ctx, codes, fixed_ids=ids)
            save_bundle(ctx, router, codes.architectures())
        return {**phase1, **phase2, "output_dir": str(output_dir)}

    # --------------------------------------------------------------------------------- phase 1
    def phase1(self, ctx: TrainContext, router: LearnedRouter, fixed_ids: torch.Tensor | None = None) -> dict[str, Any]:
        """Train ``router``'s predictor and codes; prompts go to codes by optimal transport, or by
        ``fixed_ids`` (N,) (the expert of every dataset row) when given."""
        c = self.config
        balancer = ctx.composition.require("balancer") if fixed_ids is None else None
        lr = c.lr * (math.sqrt(c.batch_size) if c.scale_lr else 1.0)
        opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=c.weight_decay)
        ckpt_dir = ctx.output_dir / "checkpoints" / "phase1"
        start = 0
        capacity: dict[str, torch.Tensor] | None = None  # code_budget=sensitivity: measured once after warm-up
        if c.resume and (found := latest_checkpoint(ckpt_dir)) is not None:
            start, state = found
            with reading(ckpt_dir, f"the checkpoint of step {start} under",
                         f"delete {ckpt_dir} to run phase 1 again, or rerun with --restart."):
                router.load_state_tensors(state["router"])
                opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=c.weight_decay)
                opt.load_state_dict(state["opt"])
                set_rng_state(state["rng"])
                capacity = state.get("capacity")
                if c.code_budget == "sensitivity" and start > c.warmup_steps and capacity is None:
                    raise ValueError("it holds no measured code targets (code_budget=sensitivity)")
            ctx.log(f"phase 1: resumed from step {start}")
        log = JsonlLogger(ctx.output_dir / "phase1.jsonl", enabled=ctx.is_main)
        log.rewind(start)
        bar = tqdm(range(start, c.steps), desc="APTP phase 1", disable=not (c.progress and ctx.is_main),
                   initial=start, total=c.steps)
        w = c.weights
        last: dict[str, float] = {}
        ratio_of = resource_ratio(c.resource, c.latency_model, ctx)  # (..., U) -> (...): kept MACs or latency
        c.target_ratio = resolve_target_ratio(c, ratio_of)  # target_ms / the dense model's predicted ms
        for step in bar:
            idx = global_batch_indices(len(ctx.dataset), c.batch_size, ctx.seed, step)  # (B,) dataset rows
            batch = ctx.batch(idx, step)
            warm = step < c.warmup_steps
            if step == c.warmup_steps and c.init_codes == "kmeans":
                sample = global_batch_indices(len(ctx.dataset), min(len(ctx.dataset), 1024), ctx.seed, 0)
                if fixed_ids is None:
                    router.init_codes_from_predictions(ctx.all_embeddings()[sample], seed=ctx.seed)
                else:  # the fixed router's groups are the clusters
                    router.init_codes_from_groups(ctx.all_embeddings()[sample], fixed_ids[sample])
            if step == c.warmup_steps and c.code_budget == "sensitivity":
                capacity = self._code_budgets(ctx, router, balancer, fixed_ids, ratio_of)
                ctx.log(f"phase 1: code targets {[round(x, 4) for x in capacity['targets'].tolist()]}")
            z = batch.z  # (b, D) local rows
            with torch.random.fork_rng():  # gate noise depends on (seed, step) only: resumable
                torch.manual_seed(step_generator(ctx.seed, step, "gates").initial_seed())
                if warm:  # the predictor's own gates drive the model: no codes, no OT
                    g = router.predicted_gates(z, noise=True, hard=False)  # (b, U) soft
                    g_deploy = router.predicted_gates(z, noise=False, hard=True)  # (b, U) straight-through
                    expert = torch.full((z.shape[0],), -1, dtype=torch.long)
                else:
                    with torch.no_grad():
                        if fixed_ids is None:
                            expert = balancer.assign(router.scores(z))  # (b,) balanced over the global batch
                        else:
                            expert = fixed_ids[idx[local_rows(len(idx))]]  # (b,) this process's rows
                    g = router.code_gates(noise=True, hard=False)[expert]  # (b, U) soft, of the routed codes
                    g_deploy = router.code_gates(noise=False, hard=True)[expert]  # (b, U) straight-through
            # global batch: every term is a global mean; block distillation averaged over the blocks
            l_task, task = ctx.task_loss(batch, (w.denoise, w.distill, w.block), c.batch_size, gates=g)
            # Value: the MACs of the architectures that will be cut (deterministic hard gates; the
            # noisy training gates would misstate them). Gradient: that of the noisy soft gates
            # (the deterministic sigmoid is flat far from the threshold, so it could not move units
            # that the task losses hold on to).
            r_soft = ratio_of(g)  # (b,)
            r_local = ratio_of(g_deploy).detach() + r_soft - r_soft.detach()  # (b,)
            r, _ = D.all_gather_rows(r_local)  # (B,) global, gradient through the local rows
            l_res = resource_loss(r, c.target_ratio)
            l_code = None
            if capacity is not None and not warm:  # per-code targets; the global term above stays
                from aptp.pruners.capacity import code_resource_loss

                ids_all, _ = D.all_gather_rows(expert, keep_grad=False)  # (B,)
                l_code = code_resource_loss(r, ids_all, capacity["targets"])
            l_spread = sum(spread_losses(r))
            # Contrastive loss on the predicted architectures as routing sees them (the original):
            # hard straight-through gates normalised by group size, not the raw logits e.
            a = router.normalised_gates(z)  # (b, U)
            # The whole (B, B) similarity structure on every process, gradient through the local
            # rows and columns: summed over processes, that is the exact global gradient.
            a_all, _ = D.all_gather_rows(a)  # (B, U)
            z_all, _ = D.all_gather_rows(z, keep_grad=False)  # (B, D)
            l_con = contrastive_loss(a_all, z_all, tau=c.contrastive_tau, gather=False)
            loss = l_task + w.resource * l_res + w.spread * l_spread + w.contrastive * l_con
            if l_code is not None:
                loss = loss + w.resource * l_code
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sum_gradients(router.parameters())
            opt.step()
            if step % c.log_every == 0 or step == c.steps - 1:
                with torch.no_grad():
                    load = torch.bincount(D.all_gather_rows(expert.clamp(min=0), keep_grad=False)[0],
                                          minlength=router.num_experts)
                    code_r = ctx.unit_space.macs_ratio(router.architectures())
                    # each process holds its share of the per-sample terms: sum them for the log
                    parts = D.all_reduce_sum(task.stacked())
                    l_global = w.resource * l_res + w.spread * l_spread + w.contrastive * l_con  # already global
                    if l_code is not None:
                        l_global = l_global + w.resource * l_code
                    total = float((parts * torch.tensor([w.denoise, w.distill, w.block])).sum() + l_global)
                last = {"step": step, "loss": total, "denoise": parts[0].item(), "distill": parts[1].item(),
                        "block": parts[2].item(), "resource": l_res.item(), "contrastive": l_con.item(),
                        "mean_ratio": r.mean().item(), "warmup": warm,
                        "load": load.tolist() if not warm else None, "code_ratios": code_r.tolist()}
                if c.code_budget == "sensitivity":
                    last["code_resource"] = None if l_code is None else l_code.item()
                    last["code_targets"] = None if capacity is None else capacity["targets"].tolist()
                log.write(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", ratio=f"{last['mean_ratio']:.3f}")
            if (step + 1) % c.checkpoint_every == 0 or step == c.steps - 1:
                if ctx.is_main:
                    state = {"router": router.state_tensors(), "opt": opt.state_dict(), "rng": rng_state()}
                    if capacity is not None:
                        state["capacity"] = capacity
                    save_checkpoint(ckpt_dir, step + 1, state)
                ctx.barrier()
        code_ratios = ctx.unit_space.macs_ratio(router.architectures())
        out = {"phase1_steps": c.steps, "expert_macs_ratios": [round(float(x), 4) for x in code_ratios],
               "phase1_last": last}
        if c.resource != "macs":
            out[f"expert_{c.resource}_ratios"] = [round(float(x), 4) for x in ratio_of(router.architectures())]
        if capacity is not None:
            out["code_targets"] = [round(float(x), 4) for x in capacity["targets"]]
            out["code_sensitivity"] = {"ratios": [round(float(x), 4) for x in capacity["ratios"]],
                                       "errors": [[float(x) for x in row] for row in capacity["errors"]],
                                       "loads": [int(x) for x in capacity["loads"]]}
        return out

    def _code_budgets(self, ctx: TrainContext, router: LearnedRouter, balancer, fixed_ids: torch.Tensor | None,
                      ratio_of) -> dict[str, torch.Tensor]:
        """``code_budget: sensitivity``: route a seeded sample of ``code_budget_samples`` training
        prompts as training routes them (the balancer on the freshly initialised codes, or
        ``fixed_ids``), measure each code's output-distillation error under uniform pruning at
        ``target -/+ spread`` and allocate per-code targets (:mod:`aptp.pruners.capacity`).
        Deterministic (seeded data, noise and timesteps; the global random state is left alone).
        Returns {"targets" (K,), "errors" (K, 3), "ratios" (3,), "loads" (K,)}."""
        from aptp.pruners.capacity import allocate_targets, measure_sensitivity, measurement_ratios

        c = self.config
        n = min(len(ctx.dataset), c.code_budget_samples)
        sample = global_batch_indices(len(ctx.dataset), n, ctx.seed, 0)  # (n,) dataset rows
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            if fixed_ids is None:
                z = ctx.all_embeddings()[sample]  # (n, D)
                mine = local_rows(n)  # each process routes its rows of the global sample, as in training
                ids_local = balancer.assign(router.scores(z[mine].to(ctx.state.device)))  # (n_r,)
                ids = D.all_gather_rows(ids_local, keep_grad=False)[0].cpu()  # (n,)
            else:
                ids = fixed_ids[sample].cpu()  # (n,)
            groups = [sample[ids == k] for k in range(router.num_experts)]
            loads = torch.bincount(ids, minlength=router.num_experts)  # (K,)
            errors, measured = measure_sensitivity(ctx, groups, measurement_ratios(c.target_ratio, c.code_budget_spread),
                                                   batch_size=c.batch_size, ratio_of=ratio_of)
        targets = allocate_targets(errors, measured, loads, c.target_ratio, c.code_budget_spread)  # (K,)
        return {"targets": targets.float(), "errors": errors, "ratios": measured, "loads": loads}

    # --------------------------------------------------------------------------------- phase 2
    def phase2(self, ctx: TrainContext, router: LearnedRouter, fixed_ids: torch.Tensor | None = None) -> dict[str, Any]:
        """Cut and fine-tune every code's expert on the prompts routed to it (by ``router``, or
        ``fixed_ids`` (N,) when given)."""
        p = self.config.phase2
        archs = router.architectures()  # (K, U)
        ids = fixed_ids
        if ids is None:
            with torch.no_grad():
                router.eval()
                ids = router.route(ctx.all_embeddings()).expert_ids  # (N,) inference routing
        load = torch.bincount(ids, minlength=router.num_experts)  # (K,)
        steps = expert_steps(p.steps, load) if p.split == "by_load" else [p.steps] * router.num_experts
        summary: dict[str, Any] = {"routed_load": load.tolist(), "phase2_steps": steps}
        losses = finetune_experts(ctx, archs, ids, p, steps, scale_lr=self.config.scale_lr, resume=self.config.resume)
        summary["phase2_distill_before_after"] = losses
        return summary


def expert_steps(total: int, load: torch.Tensor) -> list[int]:
    """``total`` fine-tuning steps shared out in proportion to each expert's routed load (K,),
    rounded by largest remainder so they sum to ``total``; an expert with no load gets none."""
    share = load.double() / load.sum().clamp(min=1) * total  # (K,)
    steps = share.floor().long()
    for k in torch.argsort(share - steps, descending=True)[: total - int(steps.sum())].tolist():
        steps[k] += 1
    return steps.tolist()


def bind_seeded(router: LearnedRouter, ctx: TrainContext) -> LearnedRouter:
    """``router.bind(...)`` with its predictor and codes initialised from the run's seed, not from
    whatever the global random state is (which depends on what ran before in the process)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        return router.bind(ctx.unit_space, ctx.encoder.dim)


def code_router(registry, num_experts: int) -> LearnedRouter:
    """The router whose codes phase 1 learns when the run's router learns none: the registry's
    ``ot`` with its defaults and ``num_experts`` codes (it only holds the codes; the run's router routes)."""
    spec = registry["router"].get("ot")
    router = spec.build(spec.config_class(num_experts=num_experts))
    if not isinstance(router, LearnedRouter):
        raise TypeError(f"the registered router 'ot' ({spec.provider}) is no LearnedRouter; it cannot hold codes.")
    return router
