"""train_base: a few steps write the diffusers layout, and a killed run resumes exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aptp.world.tools import train_base

COMMON = ["--batch-size", "4", "--log-every", "1", "--ckpt-every", "1", "--export-every", "100", "--fp32-export"]


def _steps(log: Path) -> list[int]:
    return [json.loads(line)["step"] for line in log.read_text().splitlines() if line.strip()]


def test_help_runs_as_a_module() -> None:
    out = subprocess.run([sys.executable, "-m", "aptp.world.tools.train_base", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--resume" in out.stdout and "--steps" in out.stdout


def test_three_steps_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    # run A: 3 steps, "killed", then resumed to 5
    assert train_base.main(["--out", str(a), "--steps", "3", *COMMON]) == 0
    assert _steps(a / "train_log.jsonl") == [1, 2, 3]
    ck = torch.load(a / "checkpoints" / train_base.CKPT_NAME, weights_only=True)
    assert ck["step"] == 3
    assert (a / "unet" / "config.json").is_file() and (a / "scheduler" / "scheduler_config.json").is_file()
    assert train_base.main(["--out", str(a), "--steps", "5", "--resume", *COMMON]) == 0
    assert _steps(a / "train_log.jsonl") == [1, 2, 3, 4, 5]  # step count continues
    assert torch.load(a / "checkpoints" / train_base.CKPT_NAME, weights_only=True)["step"] == 5
    # run B: 5 steps without interruption
    assert train_base.main(["--out", str(b), "--steps", "5", *COMMON]) == 0
    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # the exported directory loads with diffusers' own classes
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(a, subfolder="unet")
    assert unet.config.cross_attention_dim == 384
    assert DDPMScheduler.from_pretrained(a, subfolder="scheduler").config.prediction_type == "v_prediction"
    assert json.loads((a / "text_encoder.json").read_text())["max_length"] == 24
    readme = (a / "README.md").read_text()
    assert "python -m aptp.world.tools.train_base --out" in readme and "--steps 5 --resume" in readme


def test_bad_arguments_are_reported() -> None:
    with pytest.raises(SystemExit):
        train_base.parse_args(["--out", "x", "--steps", "0"])
