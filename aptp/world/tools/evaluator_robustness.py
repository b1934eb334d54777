"""Robustness report of the world evaluator: attribute accuracy on clean and degraded renders.

    python -m aptp.world.tools.evaluator_robustness [--evaluator DIR] [--n 500]

Renders of a held-out world seed, clean, with noise, blurred, and both; one line per variant.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aptp.world.data import World, WorldConfig
from aptp.world.evaluator import Evaluator, attribute_accuracy, images_to_tensor, load_evaluator, score_images


def robustness_report(evaluator: Evaluator, n: int = 500, seed: int = 55_555) -> dict[str, dict[str, float | None]]:
    """Attribute accuracy on clean and degraded (noise / blur) renders of a held-out world seed."""
    import torch.nn.functional as F

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)

    out: dict[str, dict[str, float | None]] = {}
    worlds = (
        ("single", World(WorldConfig(partial_prob=0.0))),
        ("single_off_slot_0.12", World(WorldConfig(partial_prob=0.0, jitter=0.12))),
        ("all_kinds", World()),
    )
    for kind, world in worlds:
        ss = world.sample(n, seed=seed, kind="single" if kind.startswith("single") else None)
        x, scenes = images_to_tensor([s.image for s in ss]), [s.scene for s in ss]
        g = torch.Generator().manual_seed(0)
        variants = {
            "clean": x,
            "noise0.1": (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1),
            "blur3x3": blur(x),
            "blur3x3+noise0.2": (blur(x) + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1),
        }
        for name, xv in variants.items():
            out[f"{kind}/{name}"] = attribute_accuracy(score_images(evaluator, xv, scenes))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m aptp.world.tools.evaluator_robustness",
                                 description="Robustness report of an evaluator on clean and degraded renders.")
    ap.add_argument("--evaluator", type=Path, default=None, help="evaluator dir (default: shipped)")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    for k, v in robustness_report(load_evaluator(a.evaluator), n=a.n).items():
        print(k, json.dumps({kk: round(vv, 3) for kk, vv in v.items() if vv is not None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
