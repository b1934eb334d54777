"""Serving a routed run on Ray Serve (optional extra ``[ray]``; the rest of aptp never imports Ray).

The router is the ingress deployment (prompts of concurrent requests are encoded and routed together,
``serve.batch``); the experts are one deployment behind it that uses Ray Serve's model multiplexing
(model id = expert id: a request goes to a replica that already holds its expert, at most
``experts_per_replica`` resident per replica) and its dynamic batching (a batch of up to ``max_batch``
requests, waiting at most ``max_wait_s``, split into one group per expert)::

    from ray import serve
    from aptp.serving_ray import routed_app

    handle = serve.run(routed_app("runs/world", max_batch=8, max_wait_s=0.05, num_inference_steps=25))
    out = handle.remote({"prompt": "a red circle", "seed": 0}).result()
    out["image"]      # (3, H, W) float array in [0, 1]; out["expert_id"]: the expert it ran on

Over HTTP (``serve.start(http_options={"host": "127.0.0.1"})`` first): POST ``{"prompt": ..., "seed": ...}``
as JSON; the image comes back as nested lists. A request's noise comes from its own seed
(``torch.Generator().manual_seed(seed)``), so its image equals ``pipe([prompt], generator=[g])``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aptp.pipeline import RoutedPipeline, initial_noise
from aptp.pruners.expert import gathered

PipelineSource = str | Path | Callable[[], RoutedPipeline]


def require_ray():
    """Ray Serve's ``serve`` module, or a one-line error saying how to install it."""
    try:
        from ray import serve
    except ImportError:
        raise ImportError("serving on Ray Serve needs ray[serve]: pip install 'aptp[ray]'.") from None
    return serve


def _factory(source: PipelineSource, shared: bool) -> Callable[[], RoutedPipeline]:
    if callable(source):
        return source
    return functools.partial(RoutedPipeline.from_run, str(source), shared=shared)


def routed_app(source: PipelineSource, max_batch: int = 8, max_wait_s: float = 0.05, num_inference_steps: int = 25,
               guidance_scale: float = 1.0, shared: bool = True, expert_replicas: int = 1,
               experts_per_replica: int = 64) -> Any:
    """The Ray Serve application of a routed pipeline: ``source`` is an ``aptp run`` folder (experts
    with shared storage kept shared when ``shared``) or a zero-argument factory of a
    :class:`~aptp.pipeline.RoutedPipeline` (called once in every replica)."""
    serve = require_ray()
    if max_batch < 1 or not max_wait_s >= 0:
        raise ValueError(f"max_batch={max_batch} must be >= 1 and max_wait_s={max_wait_s} >= 0.")
    factory = _factory(source, shared)

    @serve.deployment(num_replicas=expert_replicas)
    class Experts:
        def __init__(self) -> None:
            self.pipe = factory()
            self.generate.set_max_batch_size(max_batch)
            self.generate.set_batch_wait_timeout_s(max_wait_s)

        @serve.multiplexed(max_num_models_per_replica=experts_per_replica)
        async def expert(self, model_id: str) -> torch.nn.Module:
            return self.pipe.expert(int(model_id))

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
        async def generate(self, items: list[tuple[int, str, int]]) -> list[Any]:
            """One call per expert of the batch; returns (3, H, W) arrays in the batch's order."""
            shape = (1, *self.pipe.backbone.conditioning().sample_shape)
            out: list[Any] = [None] * len(items)
            for k in sorted({k for k, _, _ in items}):
                rows = [i for i, (e, _, _) in enumerate(items) if e == k]
                denoiser = await self.expert(str(k))
                latents = torch.cat([initial_noise(shape, [torch.Generator().manual_seed(items[i][2])]) for i in rows])
                with torch.no_grad(), gathered(denoiser):
                    images = self.pipe.backbone.generate(
                        self.pipe.modules, [items[i][1] for i in rows], denoiser=denoiser,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        generator=None, latents=latents).cpu()  # (b, 3, H, W)
                for i, image in zip(rows, images):
                    out[i] = image.numpy()
            return out

    @serve.deployment
    class Router:
        def __init__(self, experts: Any) -> None:
            self.pipe = factory()  # the encoder and router; its experts are never loaded here
            self.experts = experts

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
        async def route(self, prompts: list[str]) -> list[int]:
            return self.pipe.route(prompts).tolist()  # one encoder call for the concurrent requests

        async def __call__(self, request: Any) -> dict[str, Any]:
            http = not isinstance(request, dict)
            body = await request.json() if http else request
            prompt, seed = body.get("prompt"), int(body.get("seed", 0))
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"a request needs a non-empty string 'prompt', got {prompt!r}.")
            k = await self.route(prompt)
            image = await self.experts.options(multiplexed_model_id=str(k)).generate.remote((k, prompt, seed))
            return {"expert_id": k, "image": image.tolist() if http else image}

    return Router.bind(Experts.bind())
