"""What the pruning procedures share: data, the frozen backbone with gates, a global-batch
sampler that gives N processes the same work as one, expert fine-tuning, and run artefacts."""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from omegaconf import OmegaConf

from aptp.core.build import replace_dir
from aptp.core.checkpoint import latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from aptp.core.units import UnitSpace
from aptp.pruners import objectives as O
from aptp.pruners.gating import Gates, build_unit_space, cut_model
from aptp.routers import distributed as D

DATA_SOURCES = ("world", "coco", "tsv", "folder", "webdataset")


@dataclass
class DataConfig:
    """Where training images and captions come from."""

    source: str = "world"  # world (the embedded default) | coco | tsv | folder | webdataset
    path: Optional[str] = None  # coco: annotations JSON; tsv: the TSV; folder: the folder; webdataset: a shard
    image_dir: Optional[str] = None  # coco: the image folder; tsv: root of relative image paths
    num_samples: int = 2048  # world: how many samples to draw; others: at most this many (0 = all)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source={self.source!r} must be one of {', '.join(DATA_SOURCES)}.")
        if self.source != "world" and not self.path:
            raise ValueError(f"data.source={self.source!r} needs data.path (a local file or folder).")
        if self.num_samples < 0:
            raise ValueError(f"data.num_samples={self.num_samples} must be >= 0.")


def load_dataset(cfg: DataConfig, resolution: int):
    """A map-style dataset of ``{"image": (3, R, R) in [-1, 1], "caption": str}``."""
    from aptp.data import captions as C

    if cfg.source == "world":
        from aptp.world.data import World, WorldConfig, WorldDataset

        world = World(WorldConfig(image_size=resolution))
        return _Renamed(WorldDataset(world, length=cfg.num_samples or 2048, seed=cfg.seed))
    if cfg.source == "coco":
        ds = C.coco_captions(cfg.path, cfg.image_dir or Path(cfg.path).parent, resolution)
    elif cfg.source == "tsv":
        ds = C.tsv_captions(cfg.path, cfg.image_dir, resolution)
    elif cfg.source == "folder":
        ds = C.folder_captions(cfg.path, resolution)
    else:
        ds = C.webdataset_captions([cfg.path], resolution)
    if cfg.num_samples and len(ds) > cfg.num_samples:
        ds.records = ds.records[: cfg.num_samples]
    return ds


class _Renamed:
    """World items (``pixel_values``) under the caption datasets' keys (``image``)."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.ds[i]
        return {"image": item["pixel_values"], "caption": item["caption"]}

    @property
    def captions(self) -> list[str]:
        return [self.ds.world.sample_one(self.ds.seed, i, self.ds.kind).caption for i in range(len(self.ds))]


def global_batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Dataset indices of global batch ``step`` (B,): epochs of seeded permutations, same on every process."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    if n >= batch_size:
        return perm[pos * batch_size:(pos + 1) * batch_size]
    return perm[torch.arange(batch_size) % n]


def local_rows(batch_size: int) -> slice:
    """This process's contiguous share of a global batch of ``batch_size`` rows."""
    w, r = D.world_size(), D.rank()
    per = math.ceil(batch_size / w)
    return slice(min(r * per, batch_size), min((r + 1) * per, batch_size))


def step_generator(seed: int, step: int, salt: str) -> torch.Generator:
    h = int(hashlib.sha256(f"{seed}/{step}/{salt}".encode()).hexdigest()[:15], 16)
    return torch.Generator().manual_seed(h)


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


class JsonlLogger:
    """Appends one JSON object per line (the run's metrics log)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def rewind(self, step: int, **match: Any) -> None:
        """Drop records at or after ``step`` (those matching ``match``): a resumed run logs them again."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by a killed run: logged again from the checkpoint
                continue
            if not isinstance(rec, dict):
                continue
            if rec.get("step", -1) >= step and all(rec.get(k) == v for k, v in match.items()):
                continue
            keep.append(line)
        self.path.write_text("".join(f"{line}\n" for line in keep))


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
        if D.is_distributed():
            dist.barrier()

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
            x_t=scheduler.add_noise(x0, noise, t),
            t=t,
            target=self.backbone.training_target(scheduler, x0, noise, t),
            snr_weight=O.min_snr_weights(scheduler, t, self.min_snr_gamma),
        )

    def forward_pair(self, batch: Batch, gates: torch.Tensor):
        """(student, teacher, student features, teacher features): the gated and the ungated
        forward of the same weights. Only the student keeps a graph."""
        self.gates.clear()
        self.features.take()
        with torch.no_grad():
            teacher = self.backbone.denoise(self.denoiser, batch.x_t, batch.t, batch.text)
        f_t = self.features.take()
        self.gates.set(gates)
        student = self.backbone.denoise(self.denoiser, batch.x_t, batch.t, batch.text)
        f_s = self.features.take()
        self.gates.clear()
        return student, teacher, f_s, f_t

    # --- experts ---------------------------------------------------------------------------------
    def finetune_expert(self, k: int, arch: torch.Tensor, members: torch.Tensor, steps: int, batch_size: int,
                        lr: float, weights: tuple[float, float, float], resume: bool = True,
                        cut_backend: str = "aptp", checkpoint_every: int = 100, adapter: str = "none",
                        lora_rank: int = 8, lora_alpha: float | None = None,
                        storage: str = "materialised") -> list[float]:
        """Cut expert ``k`` from the dense weights (with ``cut_backend``, see :meth:`cut`), fine-tune
        it on dataset rows ``members`` with the dense model as teacher (the loss of
        :func:`aptp.pruners.objectives.task_losses`, weighted by ``weights`` = (denoise, distill,
        block)), checkpoint every ``checkpoint_every`` steps and at the end, save it under
        ``experts/expert-k``. Returns the output-distillation loss on a fixed batch of its prompts
        before and after fine-tuning.

        ``adapter="lora"``: train rank-``lora_rank`` LoRA adapters (peft) on the cut expert's
        linear / conv weights instead of all its weights (:mod:`aptp.pruners.lora`).
        ``storage="shared"``: save the expert as index sets over the dense weights plus its diffs
        (LoRA factors, or exact diffs after full fine-tuning) instead of its own weights
        (:func:`aptp.pruners.expert.save_expert`)."""
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 1.")
        from aptp.pruners.expert import STORAGES, save_expert
        from aptp.pruners.lora import attach_lora, check_adapter, detach_lora

        check_adapter(adapter, lora_rank)
        if storage not in STORAGES:
            raise ValueError(f"storage={storage!r} is unknown; use one of {list(STORAGES)}.")

        final = self.output_dir / "experts" / f"expert-{k}"
        if resume and (final / "finetune.json").is_file():  # finished in an earlier run
            from aptp.core.errors import reading

            with reading(final / "finetune.json", "finished expert's record",
                         "delete that expert folder to fine-tune it again, or rerun with --restart."):
                return list(json.loads((final / "finetune.json").read_text())["distill_before_after"])
        w_d, w_o, w_b = weights
        expert = self.cut(arch, cut_backend)
        expert.train().requires_grad_(True)
        adapters = attach_lora(expert, lora_rank, lora_alpha) if adapter == "lora" else None  # the rest frozen
        opt = torch.optim.AdamW([p for p in expert.parameters() if p.requires_grad], lr=lr)
        ckpt_dir = self.output_dir / "checkpoints" / f"expert-{k}"
        start = 0
        if resume and (found := latest_checkpoint(ckpt_dir)) is not None:
            start, state = found
            from aptp.core.errors import reading

            with reading(ckpt_dir, f"the checkpoint of step {start} under",
                         f"delete {ckpt_dir} to fine-tune expert {k} again, or rerun with --restart."):
                expert.load_state_dict(state["expert"])
                opt.load_state_dict(state["opt"])
                set_rng_state(state["rng"])
        recorder = O.FeatureRecorder(self.backbone.feature_modules(expert))
        log = JsonlLogger(self.output_dir / "phase2.jsonl", enabled=self.is_main)
        log.rewind(start, expert=k)
        eval_batch = self.batch(global_batch_indices(len(members), batch_size, self.seed, 0), -1 - k, subset=members)
        before = self._distillation(expert, eval_batch)
        bar = tqdm(range(start, steps), desc=f"expert {k} fine-tune", disable=not (self.progress and self.is_main),
                   initial=start, total=steps)
        self.gates.clear()
        for step in bar:
            idx = global_batch_indices(len(members), batch_size, self.seed + 7919 * (k + 1), step)
            batch = self.batch(idx, step + 1_000_000 * (k + 1), subset=members)
            self.features.take()
            with torch.no_grad():
                teacher = self.backbone.denoise(self.denoiser, batch.x_t, batch.t, batch.text)
            f_t = self.features.take()
            recorder.take()
            pred = self.backbone.denoise(expert, batch.x_t, batch.t, batch.text)
            f_s = recorder.take()
            # the same task losses as phase 1 (block distillation averaged over the blocks)
            task = O.task_losses(pred, teacher, batch.target, batch.snr_weight, f_s, f_t, global_batch=batch_size)
            loss = task.weighted(w_d, w_o, w_b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if D.is_distributed():
                for p in expert.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
            opt.step()
            log.write({"expert": k, "step": step, "loss": loss.item(), "denoise": task.denoise.item(),
                       "distill": task.distill.item(), "block": task.block.item()})
            bar.set_postfix(distill=f"{task.distill.item():.4f}")
            if self.is_main and ((step + 1) % checkpoint_every == 0 or step == steps - 1):
                save_checkpoint(ckpt_dir, step + 1, {"expert": expert.state_dict(), "opt": opt.state_dict(),
                                                     "rng": rng_state()})
        recorder.remove()
        expert.eval().requires_grad_(False)
        after = self._distillation(expert, eval_batch)
        lowrank = detach_lora(expert, adapters) if adapters is not None else None  # the cut weights, unchanged
        if self.is_main:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # unique per process
            self.features.remove()  # the shared save probes a copy of the dense model: no recorder hooks in it
            try:
                save_expert(tmp, expert, arch, self.unit_space, self.granularities, self.conditioning,
                            backbone=OmegaConf.to_container(self.composition.config.backbone, resolve=True),
                            storage=storage, dense=self.denoiser if storage == "shared" else None, lowrank=lowrank,
                            extra={"adapter": adapter, **({"lora_rank": lora_rank} if adapters else {})})
            finally:
                self.features = O.FeatureRecorder(self.backbone.feature_modules(self.denoiser))
            (tmp / "finetune.json").write_text(json.dumps({"steps": steps, "distill_before_after": [before, after]}))
            replace_dir(tmp, final)
        self.barrier()
        return [before, after]

    def cut(self, arch: torch.Tensor, backend: str = "aptp") -> torch.nn.Module:
        """The expert of ``arch`` (U,) cut from the dense weights (without this context's hooks) by
        ``backend``: ``aptp`` (the granularities' own cuts) or ``torch_pruning`` (its dependency
        graph; channel units only, the same expert: :mod:`aptp.pruners.depgraph`)."""
        check_cut_backend(backend)
        self.features.remove()  # a deepcopy would carry the recorder's hooks into the expert
        try:
            if backend == "torch_pruning":
                from aptp.pruners.depgraph import cut_with_torch_pruning

                return cut_with_torch_pruning(self.denoiser, self.unit_space, self.granularities, arch,
                                              self.example_inputs(), lambda m, a: self.backbone.denoise(m, *a))
            return cut_model(self.denoiser, self.unit_space, self.granularities, arch)
        finally:
            self.features = O.FeatureRecorder(self.backbone.feature_modules(self.denoiser))

    def example_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sample's denoiser inputs (x_t (1, C, H, W), t (1,), text (1, L, D)) for tracing
        (from a private generator: the global random state is left alone)."""
        p = next(self.denoiser.parameters())
        cond, g = self.conditioning, torch.Generator().manual_seed(0)
        t = torch.full((1,), self.modules.scheduler.config.num_train_timesteps // 2, device=p.device)
        return (torch.randn(1, *cond.sample_shape, generator=g).to(p.device, p.dtype), t,
                torch.randn(1, cond.text_len, cond.text_dim, generator=g).to(p.device, p.dtype))

    @torch.no_grad()
    def _distillation(self, expert: torch.nn.Module, batch: Batch) -> float:
        """Output-distillation MSE of ``expert`` against the dense model on ``batch``."""
        self.gates.clear()
        teacher = self.backbone.denoise(self.denoiser, batch.x_t, batch.t, batch.text)
        self.features.take()
        was_training = expert.training
        pred = self.backbone.denoise(expert.eval(), batch.x_t, batch.t, batch.text)
        expert.train(was_training)
        return float(O.per_sample_mse(pred, teacher).mean())

    def save_bundle(self, router, architectures: torch.Tensor) -> Path | None:
        """The router bundle (encoder + router + architectures + unit space) under ``router/``."""
        from aptp.routers.bundle import save_router_bundle

        if not self.is_main:
            return None
        return save_router_bundle(self.output_dir / "router", self.encoder, router,
                                  unit_space=self.unit_space, architectures=architectures)
