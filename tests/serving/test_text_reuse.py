"""Encoding each prompt once in the scheduler: the backbone's text states are computed at routing time
and reused by the generation; the routing embedding is pooled from them when the router's encoder is
the backbone's text transformer (MiniLM here, as in the world backbone); the text cache. Every
variant routes and generates exactly as the pipeline does."""

from __future__ import annotations


import pytest
import torch
from conftest import burst

from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig
from aptp.pipeline import RoutedPipeline
from aptp.routers.encoder import SentenceTransformerConfig, SentenceTransformerEncoder
from aptp.routers.kmeans import KMeansRouter, KMeansRouterConfig
from aptp.routers.single import SingleRouter
from aptp.serving import ExpertScheduler, TextStates

STEPS = 2
TEXT_LEN = 16
LONG = ("a very small red circle in the top left corner next to a large blue square and a green star "
        "under a yellow triangle")  # more than TEXT_LEN MiniLM tokens: truncated in the backbone's states
PROMPTS = ["a red circle", "a blue square", "a green circle", "two blue squares", LONG, "one small circle"]


@pytest.fixture(scope="module")
def minilm_pipe(tmp_path_factory):
    """A 16 px pixel-space UNet conditioned on MiniLM token states (like the world backbone), two
    experts, and a k-means router on the same MiniLM's sentence embeddings (circles vs squares)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("minilm-unet")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=384, attention_head_dim=2, norm_num_groups=8)
    unet.save_pretrained(folder / "unet")
    DDIMScheduler(prediction_type="epsilon").save_pretrained(folder / "scheduler")
    bb = UNetBackbone(UNetBackboneConfig(pretrained=str(folder), text_encoder="minilm", vae=None, text_len=TEXT_LEN))
    modules = bb.load()
    encoder = SentenceTransformerEncoder(SentenceTransformerConfig(cache_size=0))
    router = KMeansRouter(KMeansRouterConfig(num_experts=2, normalize=False))
    router.centers = encoder.encode(["a circle", "a square"])  # (2, 384)
    torch.manual_seed(1)
    other = UNet2DConditionModel.from_config(unet.config).eval()  # expert 1: other weights
    return RoutedPipeline(bb, modules, encoder, router, {0: modules.denoiser.eval(), 1: other})


def _images(pipe, prompts, seeds, **kwargs):
    server = ExpertScheduler(pipe, max_batch=3, max_wait_s=0.0, num_inference_steps=STEPS, **kwargs)
    futures = [server.submit(p, generator=torch.Generator().manual_seed(s)) for p, s in zip(prompts, seeds)]
    server.poll(flush=True)
    return [f.result(timeout=0) for f in futures], server


def test_routing_embeddings_pooled_from_the_backbones_states_equal_the_encoders(minilm_pipe):
    text = TextStates(minilm_pipe)
    assert text.pooling  # the router's MiniLM is the backbone's text transformer
    states, z, pooled = text.encode(PROMPTS)
    assert pooled == len(PROMPTS) - 1  # the long prompt is truncated in the states: encoded apart
    assert states.shape == (len(PROMPTS), TEXT_LEN, 384)
    assert torch.allclose(states, minilm_pipe.backbone.encode_prompts(minilm_pipe.modules, PROMPTS), atol=1e-5)
    ref = minilm_pipe.encoder.encode(PROMPTS)  # (B, 384)
    assert torch.allclose(z, ref, atol=1e-5)
    assert torch.equal(z[PROMPTS.index(LONG)], ref[PROMPTS.index(LONG)])


def test_scheduler_encoding_once_routes_and_generates_as_encoding_twice(minilm_pipe):
    seeds = list(range(len(PROMPTS)))
    once, server = _images(minilm_pipe, PROMPTS, seeds)
    twice, _ = _images(minilm_pipe, PROMPTS, seeds, reuse_text=False)
    assert (server.stats.pooled, server.stats.encoded) == (len(PROMPTS) - 1, 1)
    ids = minilm_pipe.route(PROMPTS).tolist()
    assert sorted(set(ids)) == [0, 1]  # both experts used
    for i, (a, b) in enumerate(zip(once, twice)):
        assert a.expert_id == b.expert_id == ids[i]
        assert torch.allclose(a.image, b.image, atol=1e-5), PROMPTS[i]
    alone = minilm_pipe([PROMPTS[0]], num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(0)],
                        output_type="pt").images[0]
    assert torch.allclose(once[0].image, alone, atol=1e-5)


def test_a_router_with_another_encoder_is_not_pooled_and_one_expert_encodes_no_embedding(minilm_pipe):
    class Words:
        def dim(self) -> int:
            return 2

        def encode(self, prompts):
            return torch.tensor([[1.0, 0.0] if "circle" in p else [0.0, 1.0] for p in prompts])

    p = minilm_pipe
    router = KMeansRouter(KMeansRouterConfig(num_experts=2, normalize=False))
    router.centers = torch.eye(2)
    words = RoutedPipeline(p.backbone, p.modules, Words(), router, {0: p.expert(0), 1: p.expert(1)})
    assert not TextStates(words).pooling
    res, server = _images(words, PROMPTS, range(len(PROMPTS)))
    assert [r.expert_id for r in res] == [0 if "circle" in q else 1 for q in PROMPTS]
    assert (server.stats.pooled, server.stats.encoded) == (0, len(PROMPTS))
    single = RoutedPipeline(p.backbone, p.modules, p.encoder, SingleRouter(), {0: p.expert(0)})
    res, server = _images(single, PROMPTS[:2], [0, 1])
    assert [r.expert_id for r in res] == [0, 0] and (server.stats.pooled, server.stats.encoded) == (0, 0)


def test_text_cache_reuses_repeated_prompts_and_stays_bounded(minilm_pipe):
    prompts = ["a red circle", "a blue square", "a red circle", "a red circle", "a blue square", "a green circle"]
    seeds = [0, 1, 0, 2, 1, 3]
    cached, server = _images(minilm_pipe, prompts, seeds, text_cache=2)
    plain, _ = _images(minilm_pipe, prompts, seeds)
    assert len(server._text_cache) == 2  # bounded
    more = [server.submit(p, generator=torch.Generator().manual_seed(s)) for p, s in zip(prompts[:2], seeds[:2])]
    server.poll(flush=True)
    assert server.stats.text_cache_hits >= 1  # a prompt of the first drain, encoded again from the cache
    for a, b in zip(cached + [f.result(timeout=0) for f in more], plain + plain[:2]):
        assert a.expert_id == b.expert_id
        assert torch.allclose(a.image, b.image, atol=1e-5)
    assert torch.allclose(cached[0].image, cached[2].image, atol=1e-5)  # same prompt, same seed
    with pytest.raises(ValueError, match="text_cache"):
        ExpertScheduler(minilm_pipe, text_cache=-1)


def test_a_burst_with_repeated_prompts_returns_every_request_exactly_once(minilm_pipe):
    with ExpertScheduler(minilm_pipe, max_batch=4, max_wait_s=0.01, num_inference_steps=STEPS, text_cache=8) as server:
        results = burst(server, lambda r: (PROMPTS[r % 100 % 3], torch.Generator().manual_seed(r % 100)))
    assert sum(size for _, size in server.stats.groups) == 18 and all(size <= 4 for _, size in server.stats.groups)
    for j in (1, 2):  # the same prompt and seed from another client: the same image (up to the batch's rounding)
        assert torch.allclose(results[100 * j + 4].image, results[4].image, atol=1e-5)
