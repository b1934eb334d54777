"""Fixtures of the serving tests: the tiny random backbone, its dense UNet and a unit space."""

from __future__ import annotations

import pytest
import torch

from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig
from aptp.core.config import config_to_dict
from aptp.pruners.gating import build_unit_space
from aptp.pruners.granularities import (
    FFN,
    AttentionHeads,
    AttentionHeadsConfig,
    Depth,
    DepthConfig,
    FFNConfig,
    ResnetChannels,
    ResnetChannelsConfig,
)


@pytest.fixture(scope="session")
def tiny():
    """(backbone, dense UNet, unit space of all four granularities, granularities, backbone reference)."""
    bb = UNetBackbone(UNetBackboneConfig(preset="tiny"))
    dense = bb.build_denoiser().eval()
    grans = [ResnetChannels(ResnetChannelsConfig()), AttentionHeads(AttentionHeadsConfig()), FFN(FFNConfig()),
             Depth(DepthConfig())]
    space = build_unit_space(dense, grans, bb.conditioning())
    return bb, dense, space, grans, {"name": "unet", **config_to_dict(bb.config)}


@pytest.fixture(scope="session")
def tiny_inputs(tiny):
    cond = tiny[0].conditioning()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *cond.sample_shape, generator=g)  # (B, C, H, W)
    t = torch.tensor([10, 500, 990])  # (B,)
    text = torch.randn(3, cond.text_len, cond.text_dim, generator=g)  # (B, L, D)
    return x, t, text


def random_arch(size: int, seed: int, p_drop: float) -> torch.Tensor:
    """(U,) 0/1 architecture dropping each unit with probability ``p_drop``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(size, generator=g) >= p_drop).to(torch.float32)


def burst(server, request, clients: int = 3, per_client: int = 6) -> dict[int, object]:
    """``clients`` threads each submit ``per_client`` requests at once (``request(offset + i)`` ->
    (prompt, generator)) and wait for them; returns every result by request id, failing on a
    duplicate (each request must come back exactly once)."""
    import threading

    results: dict[int, object] = {}
    lock = threading.Lock()

    def client(offset: int) -> None:
        futures = {offset + i: server.submit(*request(offset + i)) for i in range(per_client)}
        for i, f in futures.items():
            res = f.result(timeout=300)  # a bound against a hang, not a timing check
            with lock:
                assert i not in results
                results[i] = res

    threads = [threading.Thread(target=client, args=(100 * j,)) for j in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(100 * j + i for j in range(clients) for i in range(per_client))
    return results
