"""Ray Serve smoke test (extra [ray]): the router ingress and the multiplexed, batched experts
started locally on loopback; each request's image equals generating its prompt alone."""

from __future__ import annotations

import json
import socket
import sys
import urllib.request

import pytest
import torch

import aptp  # noqa: F401  (before ray: makes a torchvision built for another torch importable)

serve = pytest.importorskip("ray.serve", reason="the Ray Serve deployment needs the [ray] extra (pip install 'aptp[ray]')")
import ray  # noqa: E402

from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig  # noqa: E402
from aptp.pipeline import RoutedPipeline  # noqa: E402
from aptp.pruners.gating import build_unit_space, cut_model, uniform_architecture  # noqa: E402
from aptp.routers.kmeans import KMeansRouter, KMeansRouterConfig  # noqa: E402
from aptp.serving_ray import routed_app  # noqa: E402

STEPS = 2


class WordEncoder:
    """z = (1, 0) for prompts with 'circle', else (0, 1)."""

    def dim(self) -> int:
        return 2

    def encode(self, prompts):
        return torch.tensor([[1.0, 0.0] if "circle" in p else [0.0, 1.0] for p in prompts])


def tiny_pipeline() -> RoutedPipeline:
    """Two experts of the tiny backbone (16 px) routed by word; built the same in every replica."""
    from aptp.pruners.granularities import FFN, AttentionHeads, AttentionHeadsConfig, FFNConfig, ResnetChannels, ResnetChannelsConfig

    bb = UNetBackbone(UNetBackboneConfig(preset="tiny", resolution=16))
    modules = bb.load()
    grans = [ResnetChannels(ResnetChannelsConfig()), AttentionHeads(AttentionHeadsConfig()), FFN(FFNConfig())]
    space = build_unit_space(modules.denoiser, grans, bb.conditioning())
    router = KMeansRouter(KMeansRouterConfig(num_experts=2, normalize=False))
    router.centers = torch.eye(2)
    experts = {k: cut_model(modules.denoiser, space, grans, uniform_architecture(space, r)).eval()
               for k, r in enumerate((0.5, 0.8))}
    return RoutedPipeline(bb, modules, WordEncoder(), router, experts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_handle():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # replicas rebuild the test's pipeline
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    port = _free_port()
    # Ray Serve waits a fixed 60 s for its HTTP proxy actor to start; on a loaded 2-core CI machine
    # starting that process can take longer (seen: ActorDiedError at setup), so wait up to 10 minutes
    import ray.serve._private.api as serve_api

    if hasattr(serve_api, "HTTP_PROXY_TIMEOUT"):
        serve_api.HTTP_PROXY_TIMEOUT = 600
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(routed_app(tiny_pipeline, max_batch=4, max_wait_s=0.05, num_inference_steps=STEPS),
                       name="aptp", route_prefix="/aptp")
    yield handle, port
    serve.shutdown()
    ray.shutdown()


def test_ray_serve_routes_batches_and_returns_each_request_its_own_image(app_handle):
    handle, port = app_handle
    prompts = ["a red circle", "a blue square", "a green circle", "two squares", "one circle"]
    responses = [handle.remote({"prompt": p, "seed": 10 + i}) for i, p in enumerate(prompts)]  # concurrent
    results = [r.result(timeout_s=600) for r in responses]
    pipe = tiny_pipeline()
    for i, (p, res) in enumerate(zip(prompts, results)):
        assert res["expert_id"] == (0 if "circle" in p else 1)
        alone = pipe([p], num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(10 + i)],
                     output_type="pt").images[0]
        assert torch.allclose(torch.tensor(res["image"].copy()), alone, atol=1e-5), p
    body = json.dumps({"prompt": "a red circle", "seed": 10}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/aptp", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:  # over HTTP on loopback
        out = json.loads(r.read())
    assert out["expert_id"] == 0
    assert torch.allclose(torch.tensor(out["image"]), torch.tensor(results[0]["image"].copy()), atol=1e-6)
