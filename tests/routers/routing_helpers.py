"""Helpers shared by the router tests (imported as a plain module: tests/ has no packages)."""

from __future__ import annotations

import torch

from aptp.core.units import UnitGroup, UnitSpace

PROMPTS = [
    "a red cube on a wooden table",
    "a small blue sphere left of a green cone",
    "a photo of a cat sleeping on a sofa",
    "a dog running on the beach at sunset",
    "a storefront with the word 'OPEN' written on it",
    "an oil painting of a lighthouse in a storm",
    "a bowl of ramen with chopsticks",
    "two people shaking hands in an office",
    "a futuristic city skyline at night",
    "a close-up of a bee on a sunflower",
    "a yellow triangle above a purple square",
    "a medieval knight riding a horse",
]



def make_unit_space(extra: int = 0) -> UnitSpace:
    """Two width groups (the second with a depth parent) and one depth group of 3 blocks."""
    groups = (
        UnitGroup("resnet_channels", "down.0.resnets.0", 8, 10.0, 5),
        UnitGroup("attention_heads", "down.1.attentions.1", 4 + extra, 20.0, 5, parent="down.1.attentions.1"),
        UnitGroup("depth", "depth", 3, 100.0, 50,
                  unit_paths=("down.1.attentions.1", "up.0.resnets.2", "up.1.resnets.2")),
    )
    return UnitSpace(groups, total_macs=1000.0, total_params=1000)



def skewed_scores(B: int, K: int, seed: int = 0) -> torch.Tensor:
    """Cosine-like scores in [-1, 1] where expert 0 is everyone's favourite by a wide margin."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(B, K, generator=g) * 2 - 1
    s[:, 0] += 0.8
    return s.clamp(-1, 1)


SPLIT = (37, 27)  # rows per process in the distributed test: unequal on purpose


def distributed_worker(rank: int, world: int, init_file: str, scores: torch.Tensor, e: torch.Tensor,
                       z: torch.Tensor, out_dir: str) -> None:
    """One process of the distributed balancer test: plans and contrastive loss on its rows."""
    import torch.distributed as dist

    from aptp.routers.balancers import (
        EmdBalancer,
        GreedyBalancer,
        PotSinkhornBalancer,
        SinkhornBalancer,
        SinkhornConfig,
    )
    from aptp.routers.losses import contrastive_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        start = sum(SPLIT[:rank])
        rows = slice(start, start + SPLIT[rank])
        balancers = {"sinkhorn": SinkhornBalancer(), "pot": PotSinkhornBalancer(), "emd": EmdBalancer(),
                     "greedy": GreedyBalancer(),
                     "sinkhorn-tol": SinkhornBalancer(SinkhornConfig(tolerance=1e-3))}
        out = {name: b.plan(scores[rows]) for name, b in balancers.items()}
        e_local = e[rows].clone().requires_grad_()
        loss = contrastive_loss(e_local, z[rows], tau=0.1)
        loss.backward()  # the gathered remote rows are constants: the gradient reaches the local rows
        out["contrastive"] = loss.detach()
        out["contrastive_grad"] = e_local.grad
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
