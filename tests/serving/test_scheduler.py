"""The request scheduler: per-expert queues, max_batch, max_wait, each request's own result, and the
same image as generating the prompt alone with the same generator. No timed assertions: max_wait
is checked on a hand-driven clock."""

from __future__ import annotations


import pytest
import torch
from conftest import burst, random_arch

from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig
from aptp.pipeline import RoutedPipeline
from aptp.pruners.expert import SharedExpert, _Entry, slice_map
from aptp.pruners.gating import cut_model, uniform_architecture
from aptp.routers.kmeans import KMeansRouter, KMeansRouterConfig
from aptp.serving import ExpertScheduler

STEPS = 2
PROMPTS = ["a red circle", "a blue square", "a green circle", "the letter A", "a small circle", "a big square",
           "one circle", "two squares"]


class WordEncoder:
    """A prompt encoder for tests: z = (1, 0) for prompts with 'circle', else (0, 1)."""

    def dim(self) -> int:
        return 2

    def encode(self, prompts):
        return torch.tensor([[1.0, 0.0] if "circle" in p else [0.0, 1.0] for p in prompts])  # (B, 2)


@pytest.fixture(scope="module")
def pipe(tiny):
    _, dense, space, grans, _ = tiny
    bb = UNetBackbone(UNetBackboneConfig(preset="tiny", resolution=16))
    modules = bb.load()
    router = KMeansRouter(KMeansRouterConfig(num_experts=2, normalize=False))
    router.centers = torch.eye(2)  # circles -> expert 0, the rest -> expert 1
    arch1 = random_arch(space.size, 1, 0.3)
    shared = SharedExpert(cut_model(modules.denoiser, space, grans, arch1).to("meta"), modules.denoiser,
                          {n: _Entry(sl) for n, sl in slice_map(modules.denoiser, space, grans, arch1).items()})
    experts = {0: cut_model(modules.denoiser, space, grans, uniform_architecture(space, 0.5)).eval(),
               1: shared.eval()}  # expert 1 gathers its weights from the dense model
    return RoutedPipeline(bb, modules, WordEncoder(), router, experts)


def _alone(pipe, prompt: str, seed: int) -> torch.Tensor:
    return pipe([prompt], num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(seed)],
                output_type="pt").images[0]  # (3, H, W)


def test_each_request_gets_its_own_image_equal_to_generating_it_alone(pipe):
    server = ExpertScheduler(pipe, max_batch=3, max_wait_s=0.0, num_inference_steps=STEPS)
    futures = [server.submit(p, generator=torch.Generator().manual_seed(100 + i)) for i, p in enumerate(PROMPTS)]
    server.poll(flush=True)
    ids = pipe.route(PROMPTS).tolist()
    assert sorted(server.stats.groups) == [(0, 1), (0, 3), (1, 1), (1, 3)]  # 4 circles, 4 others; batches of 3
    for i, (p, f) in enumerate(zip(PROMPTS, futures)):
        res = f.result(timeout=0)
        assert res.expert_id == ids[i] == (0 if "circle" in p else 1)
        assert torch.allclose(res.image, _alone(pipe, p, 100 + i), atol=1e-5), p


def test_groups_respect_max_batch_and_flush_after_max_wait(pipe):
    now = [0.0]
    server = ExpertScheduler(pipe, max_batch=3, max_wait_s=5.0, num_inference_steps=STEPS, clock=lambda: now[0])
    futures = [server.submit("a circle", generator=torch.Generator().manual_seed(i)) for i in range(7)]
    futures.append(server.submit("a square", generator=torch.Generator().manual_seed(7)))
    assert server.poll() == 2  # two full groups of expert 0 run at once
    assert server.stats.groups == [(0, 3), (0, 3)]
    assert server.pending() == 2 and not futures[6].done() and not futures[7].done()
    now[0] = 4.999
    assert server.poll() == 0  # nothing has waited max_wait yet
    now[0] = 5.0
    assert server.poll() == 2  # both partial groups flush, expert 0's (older) first
    assert server.stats.groups[2:] == [(0, 1), (1, 1)]
    assert all(f.done() for f in futures) and server.pending() == 0
    assert all(size <= 3 for _, size in server.stats.groups)


def test_a_burst_from_several_threads_returns_every_request_exactly_once(pipe):
    with ExpertScheduler(pipe, max_batch=4, max_wait_s=0.01, num_inference_steps=STEPS) as server:
        results = burst(server, lambda r: (PROMPTS[r % len(PROMPTS)], torch.Generator().manual_seed(r)))
    assert sum(size for _, size in server.stats.groups) == 18
    assert all(size <= 4 for _, size in server.stats.groups)
    i = 101  # one of them, checked against generating it alone
    assert torch.allclose(results[i].image, _alone(pipe, PROMPTS[i % len(PROMPTS)], i), atol=1e-5)


def test_a_failing_group_fails_each_of_its_requests_and_the_others_still_run(pipe):
    def broken():
        raise RuntimeError("expert 1 cannot be loaded")

    bad = RoutedPipeline(pipe.backbone, pipe.modules, pipe.encoder, pipe.router, {0: pipe.expert(0), 1: broken})
    server = ExpertScheduler(bad, max_batch=2, max_wait_s=0.0, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="latents must have shape"):  # a wrong request is refused at submit
        server.submit("a circle", latents=torch.zeros(1, 3, 2, 2))
    failing = [server.submit("a square"), server.submit("two squares")]
    ok = server.submit("a circle", generator=torch.Generator().manual_seed(1))
    server.poll(flush=True)
    for f in failing:
        with pytest.raises(RuntimeError, match="cannot be loaded"):
            f.result(timeout=0)
    assert ok.result(timeout=0).image.shape[0] == 3


def test_compiled_experts_give_the_same_image(pipe):
    server = ExpertScheduler(pipe, max_batch=2, max_wait_s=0.0, num_inference_steps=STEPS, compile=True,
                             compile_options={"backend": "eager"})  # dynamo capture; inductor takes minutes on CPU
    futures = [server.submit(p, generator=torch.Generator().manual_seed(i)) for i, p in
               enumerate(["a red circle", "a blue square"])]
    server.poll(flush=True)
    assert isinstance(server._denoisers[1], torch._dynamo.eval_frame.OptimizedModule)
    for i, (p, f) in enumerate(zip(["a red circle", "a blue square"], futures)):
        assert torch.allclose(f.result(timeout=0).image, _alone(pipe, p, i), atol=1e-5), p
