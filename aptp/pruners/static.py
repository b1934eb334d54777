"""Static (one-shot) pruning: route with a fixed router (``single`` for the classic static
baseline, ``kmeans`` for routing without learned codes), choose each expert's architecture with an
assignment (magnitude, Taylor, random) at the budget, cut, fine-tune with the dense teacher."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from aptp.core import values
from aptp.core.interfaces import AssignmentContext, LearnedRouter, Pruner
from aptp.core.rundir import open_run
from aptp.latency.resource import check_resource, fit_latency_model, latency_budget, resolve_target_ratio
from aptp.pruners.artefacts import save_bundle
from aptp.pruners.data import DataConfig
from aptp.pruners.finetune import Phase2Config, finetune_experts
from aptp.pruners.training import TrainContext, check_cut_backend
from aptp.routers._checks import check_enough_prompts


@dataclass
class FinetuneConfig(Phase2Config):
    """APTP's phase-2 fine-tuning settings under the static pruner's own key, ``finetune``: the same
    fields, checked with messages that name ``finetune.*`` (the keys a static config has)."""

    KEY: ClassVar[str] = "finetune"

    def __post_init__(self) -> None:
        values.positive("finetune.lr", self.lr, "(e.g. 1e-5, times sqrt(batch) with scale_lr)")
        values.weights("finetune.", self, ("denoise", "distill", "block"))
        if self.steps < 0:
            raise ValueError(f"finetune.steps={self.steps} must be >= 0 (0 keeps each expert as cut).")
        if self.batch_size < 1:
            raise ValueError(f"finetune.batch_size={self.batch_size} must be >= 1.")
        if self.checkpoint_every < 1:
            raise ValueError(f"finetune.checkpoint_every={self.checkpoint_every} must be >= 1.")
        if self.split != "per_expert":
            raise ValueError(f"finetune.split={self.split!r}: the static pruner fine-tunes every expert for "
                             "finetune.steps; leave split at 'per_expert' (by_load is APTP's pruner.phase2.split).")
        super().__post_init__()  # any check Phase2Config gains later


@dataclass
class StaticPrunerConfig:
    """One-shot pruning at a kept-MACs (or latency: ``resource``) budget, then fine-tuning (phase 2 of APTP)."""

    target_ratio: float = 0.6
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scale_lr: bool = True
    min_snr_gamma: float = 5.0
    resume: bool = True
    progress: bool = True
    cut_backend: str = "aptp"  # or torch_pruning: the same expert cut by its dependency graph (channels only)
    # "macs" (the paper's baseline): target_ratio is kept MACs; "latency": a fraction of the dense model's
    # latency predicted by latency_model (aptp.latency.resource.latency_budget searches the budget)
    resource: str = "macs"
    latency_model: Optional[dict[str, Any]] = None  # {name: <registered latency model>, ...}; None: profiled
    target_ms: Optional[float] = None  # resource: latency only: a target in ms, replaces target_ratio

    def __post_init__(self) -> None:
        if not 0.0 < self.target_ratio <= 1.0:
            raise ValueError(f"target_ratio={self.target_ratio} must be in (0, 1].")
        check_resource(self.resource, self.latency_model, self.target_ms)
        values.non_negative("min_snr_gamma", self.min_snr_gamma, "(e.g. 5; 0 switches Min-SNR weighting off)")
        check_cut_backend(self.cut_backend)


class StaticPruner(Pruner):
    """Static pruning: a fixed router and an importance criterion instead of learned codes."""

    config_class = StaticPrunerConfig

    def run(self, composition, output_dir: Path) -> dict[str, Any]:
        c = self.config
        router = composition.require("router")  # fail before loading any model
        if isinstance(router, LearnedRouter):
            from aptp.core.errors import ConfigError

            raise ConfigError(f"the static pruner takes a router that learns no codes (router=single for one "
                              f"model, or kmeans / nearest / keyword / random_partition for static experts), "
                              f"not '{composition.config.router.name}', whose codes only APTP's phase 1 learns (pruner=aptp).")
        assignment = composition.require("assignment")
        with open_run(output_dir, composition.config, composition.registry):  # lock; refuse another config's folder
            ctx = TrainContext(composition, c.data, Path(output_dir), progress=c.progress,
                               min_snr_gamma=c.min_snr_gamma)
            embeddings = ctx.all_embeddings()  # (N, D)
            check_enough_prompts(router.num_experts, embeddings, ctx.captions)  # no expert without prompts
            router.fit(embeddings, prompts=ctx.captions)  # keyword rules read the texts
            router.eval()
            with torch.no_grad():
                ids = router.route(embeddings).expert_ids  # (N,)

            def assign(space, ratio: float) -> torch.Tensor:  # (K, U) at a kept-MACs ratio of ``space``
                return assignment.architectures(AssignmentContext(
                    unit_space=space, num_experts=router.num_experts, target_ratio=ratio,
                    denoiser=ctx.denoiser, router=router, granularities=ctx.granularities,
                    expert_ids=ids, train_context=ctx,
                ))

            latency = fit_latency_model(c.latency_model, ctx) if c.resource == "latency" else None
            c.target_ratio = resolve_target_ratio(c, latency)  # target_ms / the dense model's predicted ms
            archs = (assign(ctx.unit_space, c.target_ratio) if latency is None
                     else latency_budget(assign, ctx.unit_space, c.target_ratio, latency))  # (K, U)
            f = c.finetune
            losses = finetune_experts(ctx, archs, ids, f, [f.steps] * router.num_experts, scale_lr=c.scale_lr,
                                      resume=c.resume, cut_backend=c.cut_backend)
            save_bundle(ctx, router, archs)
        ratios = ctx.unit_space.macs_ratio(archs)
        summary = {} if latency is None else {
            "expert_latency_ratios": [round(float(r), 4) for r in latency.latency_ratio(archs.double())]}
        return {**summary, "expert_macs_ratios": [round(float(r), 4) for r in ratios],
                "routed_load": torch.bincount(ids, minlength=router.num_experts).tolist(),
                "phase2_distill_before_after": losses, "output_dir": str(output_dir)}
