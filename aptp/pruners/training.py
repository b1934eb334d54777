"""The training engine both pruning procedures (APTP two-phase, static one-shot) run on.

:class:`TrainContext` holds the frozen dense model with gates installed and its data, and gives
each step what it needs:

    batch = ctx.batch(global_batch_indices(N, B, seed, step), step)     # this process's rows
    L_task, terms = ctx.task_loss(batch, (w_d, w_o, w_b), B, gates=g)    # phase 1: gated dense weights
    L_task, terms = ctx.task_loss(batch, (w_d, w_o, w_b), B, expert=e)   # fine-tuning: a cut expert
    expert = ctx.cut(arch)                                               # (U,) -> a plain diffusers model

The rest of a run lives beside it: the data (:mod:`aptp.pruners.data`), the global batch and the
gradient sum over processes (:mod:`aptp.pruners.distributed`), the one fine-tuning loop
(:mod:`aptp.pruners.finetune`) and what a run writes (:mod:`aptp.pruners.artefacts`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from aptp.core.units import UnitSpace
from aptp.pruners import objectives as O
from aptp.pruners.artefacts import JsonlLogger, save_bundle
from aptp.pruners.data import DataConfig, load_dataset
from aptp.pruners.distributed import barrier, global_batch_indices, local_rows, step_generator
from aptp.pruners.gating import Gates, build_unit_space, cut_model

# (re-exported: scripts and tests outside the pruners import these from here)
__all__ = ["Batch", "CUT_BACKENDS", "CutStudent", "DataConfig", "JsonlLogger", "TrainContext", "check_cut_backend",
           "global_batch_indices", "load_dataset", "local_rows", "step_generator"]


@dataclass
class Batch:
    """This process's rows of a global batch, ready for a gated forward."""

    captions: list[str]
    z: torch.Tensor  # (b, D) prompt embeddings
    text: torch.Tensor  # (b, L, D_text) text-encoder states
    x_t: torch.Tensor  # (b, C, H, W) noised sample
    t: torch.Tensor  # (b,) timesteps
    target: torch.Tensor  # (b, C, H, W) what the denoiser should predict
    snr_weight: torch.Tensor  # (b,) Min-SNR weights


@dataclass
class CutStudent:
    """A cut expert as the student of :meth:`TrainContext.task_loss`, its block features recorded."""

    model: nn.Module
    features: O.FeatureRecorder

    @classmethod
    def of(cls, model: nn.Module, backbone) -> CutStudent:
        return cls(model, O.FeatureRecorder(backbone.feature_modules(model)))

    def remove(self) -> None:
        self.features.remove()


CUT_BACKENDS = ("aptp", "torch_pruning")


def check_cut_backend(name: str) -> str:
    """``name`` if it is a cutting backend, else a ValueError listing them."""
    if name not in CUT_BACKENDS:
        raise ValueError(f"cut_backend={name!r} is unknown; use one of {list(CUT_BACKENDS)}.")
    return name


class TrainContext:
    """The frozen dense model with gates installed, the data, and the run folder."""

    def __init__(self, composition, data: DataConfig, output_dir: Path, progress: bool = True,
                 min_snr_gamma: float | None = 5.0) -> None:
        from accelerate import PartialState

        # Initialises torch.distributed under torchrun / accelerate launch (gloo on CPU, nccl on GPUs).
        on_cpu = str(composition.config.get("device", "cpu")) == "cpu" or not torch.cuda.is_available()
        self.state = PartialState(cpu=on_cpu)
        self.composition = composition
        self.output_dir = Path(output_dir)
        self.progress = progress
        self.seed = composition.seed
        self.min_snr_gamma = min_snr_gamma
        self.backbone = composition.require("backbone")
        self.granularities = composition.require("granularity")
        self.encoder = composition.require("encoder")
        self.modules = self.backbone.load(device=self.state.device)
        self.denoiser = self.modules.denoiser.eval().requires_grad_(False)
        for m in (self.modules.text_encoder, self.modules.vae):
            if m is not None:
                m.eval().requires_grad_(False)
        self.conditioning = self.backbone.conditioning()
        self.unit_space: UnitSpace = build_unit_space(self.denoiser, self.granularities, self.conditioning)
        self.gates = Gates(self.denoiser, self.unit_space, self.granularities)
        self.features = O.FeatureRecorder(self.backbone.feature_modules(self.denoiser))
        self.dataset = load_dataset(data, self._pixel_resolution())
        if len(self.dataset) == 0:
            raise ValueError(f"the training data ({data.source}: {data.path}) holds no sample.")
        self._captions: list[str] | None = None
        # config.yaml (what RoutedPipeline.from_run rebuilds) and fingerprint.json are written by
        # aptp.core.rundir.open_run, which the procedures hold around the whole run.
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def _pixel_resolution(self) -> int:
        c, h, w = self.conditioning.sample_shape
        vae = self.modules.vae
        return h * (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def barrier(self) -> None:
        barrier()

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    @property
    def captions(self) -> list[str]:
        if self._captions is None:
            self._captions = list(self.dataset.captions)
        return self._captions

    @torch.no_grad()
    def all_embeddings(self) -> torch.Tensor:
        """Prompt embeddings of the whole training set, (N, D)."""
        return self.encoder.encode(self.captions)

    # --- one batch -------------------------------------------------------------------------------
    @torch.no_grad()
    def batch(self, global_indices: torch.Tensor, step: int, subset: torch.Tensor | None = None) -> Batch:
        """Noise, timesteps and targets of a global batch, drawn for all its rows from a seeded
        stream (so the split over processes does not change them), keeping this process's rows."""
        idx = global_indices if subset is None else subset[global_indices]
        n = len(idx)
        scheduler = self.modules.scheduler
        c, h, w = self.conditioning.sample_shape
        g = step_generator(self.seed, step, "noise")
        noise = torch.randn((n, c, h, w), generator=g)  # (B, C, H, W)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g)  # (B,)
        eps = torch.randn((n, c, h, w), generator=g) if self.modules.vae is not None else None  # VAE posterior
        rows = local_rows(n)
        items = [self.dataset[int(i)] for i in idx[rows]]
        device, dtype = self.state.device, next(self.denoiser.parameters()).dtype
        images = torch.stack([it["image"] for it in items]).to(device, dtype)
        x0 = self.backbone.to_latents(self.modules, images, None if eps is None else eps[rows])  # (b, C, H, W)
        noise, t = noise[rows].to(device, dtype), t[rows].to(device)
        captions = [it["caption"] for it in items]
        return Batch(
            captions=captions,
            z=self.encoder.encode(captions).to(device),
            text=self.backbone.encode_prompts(self.modules, captions).to(device, dtype),
            x_t=self.backbone.add_noise(scheduler, x0, noise, t),
            t=t,
            target=self.backbone.training_target(scheduler, x0, noise, t),
            snr_weight=self.backbone.loss_weights(scheduler, t, self.min_snr_gamma),
        )

    # --- the loss both procedures train with ---------------------------------------------------
    def forward_pair(self, batch: Batch, gates: torch.Tensor | None = None, expert: CutStudent | None = None):
        """(student, teacher, student features, teacher features) of ``batch``: the dense teacher
        (ungated, no graph) and the student, either the same weights under per-sample ``gates``
        (b, U) (phase 1) or a cut ``expert`` (fine-tuning). Only the student keeps a graph."""
        if (gates is None) == (expert is None):
            raise ValueError("forward_pair needs exactly one student: gates (the gated dense model) or expert (a cut one).")
        self.gates.clear()
        self.features.take()
        with torch.no_grad():
            teacher = self.backbone.denoise(self.denoiser, batch.x_t, batch.t, batch.text)
        f_t = self.features.take()
        if expert is not None:
            expert.features.take()
            student = self.backbone.denoise(expert.model, batch.x_t, batch.t, batch.text)
            f_s = expert.features.take()
            return student, teacher, f_s, f_t
        self.gates.set(gates)
        student = self.backbone.denoise(self.denoiser, batch.x_t, batch.t, batch.text)
        f_s = self.features.take()
        self.gates.clear()
        return student, teacher, f_s, f_t

    def task_loss(self, batch: Batch, weights: tuple[float, float, float], global_batch: int,
                  gates: torch.Tensor | None = None, expert: CutStudent | None = None,
                  ) -> tuple[torch.Tensor, O.TaskLosses]:
        """The task part of both procedures' loss, assembled here once::

            L_task = w_d L_denoise + w_o L_out + w_b L_block      # weights = (w_d, w_o, w_b)

        of the student (``gates`` (b, U) on the dense weights, or a cut ``expert``; see
        :meth:`forward_pair`) against the dense teacher (:func:`aptp.pruners.objectives.task_losses`:
        Min-SNR denoising, output distillation, block distillation averaged over the blocks), each
        term a sum over this process's rows divided by ``global_batch``. Returns (L_task, its terms)."""
        student, teacher, f_s, f_t = self.forward_pair(batch, gates=gates, expert=expert)
        task = O.task_losses(student, teacher, batch.target, batch.snr_weight, f_s, f_t, global_batch=global_batch)
        return task.weighted(*weights), task

    # --- experts ---------------------------------------------------------------------------------
    def finetune_expert(self, k: int, arch: torch.Tensor, members: torch.Tensor, **settings: Any) -> list[float]:
        """:func:`aptp.pruners.finetune.finetune_expert` on this context (the same arguments)."""
        from aptp.pruners.finetune import finetune_expert

        return finetune_expert(self, k, arch, members, **settings)

    @contextlib.contextmanager
    def without_feature_hooks(self) -> Iterator[None]:
        """The dense model without the block-feature recorder's hooks (a deepcopy of it, e.g. a cut
        or a shared save's probe, must not carry them); the recorder is back afterwards."""
        self.features.remove()
        try:
            yield
        finally:
            self.features = O.FeatureRecorder(self.backbone.feature_modules(self.denoiser))

    def cut(self, arch: torch.Tensor, backend: str = "aptp") -> torch.nn.Module:
        """The expert of ``arch`` (U,) cut from the dense weights (without this context's hooks) by
        ``backend``: ``aptp`` (the granularities' own cuts) or ``torch_pruning`` (its dependency
        graph; channel units only, the same expert: :mod:`aptp.pruners.torch_pruning_cut`)."""
        check_cut_backend(backend)
        with self.without_feature_hooks():  # a deepcopy would carry the recorder's hooks into the expert
            if backend == "torch_pruning":
                from aptp.pruners.torch_pruning_cut import cut_with_torch_pruning

                return cut_with_torch_pruning(self.denoiser, self.unit_space, self.granularities, arch,
                                              self.example_inputs(), lambda m, a: self.backbone.denoise(m, *a))
            return cut_model(self.denoiser, self.unit_space, self.granularities, arch)

    def example_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sample's denoiser inputs (x_t (1, C, H, W), t (1,), text (1, L, D)) for tracing
        (from a private generator: the global random state is left alone)."""
        p = next(self.denoiser.parameters())
        cond, g = self.conditioning, torch.Generator().manual_seed(0)
        t = torch.full((1,), self.modules.scheduler.config.num_train_timesteps // 2, device=p.device)
        return (torch.randn(1, *cond.sample_shape, generator=g).to(p.device, p.dtype), t,
                torch.randn(1, cond.text_len, cond.text_dim, generator=g).to(p.device, p.dtype))

    @torch.no_grad()
    def distillation(self, expert: torch.nn.Module, batch: Batch) -> float:
        """Output-distillation MSE of ``expert`` against the dense model on ``batch``."""
        self.gates.clear()
        teacher = self.backbone.denoise(self.denoiser, batch.x_t, batch.t, batch.text)
        self.features.take()
        was_training = expert.training
        pred = self.backbone.denoise(expert.eval(), batch.x_t, batch.t, batch.text)
        expert.train(was_training)
        return float(O.per_sample_mse(pred, teacher).mean())


    # (the name before it was public; a benchmark script calls it)
    _distillation = distillation

    def save_bundle(self, router, architectures: torch.Tensor) -> Path | None:
        """:func:`aptp.pruners.artefacts.save_bundle` of this run."""
        return save_bundle(self, router, architectures)
