"""Routers for routing controls: keyword rules (oracle routing by kind) and a random partition."""

import pytest
import torch

from aptp.core.errors import ConfigError
from aptp.world.data import World
from aptp.pruners.aptp import expert_steps
from aptp.routers.keyword import KeywordRouter, KeywordRouterConfig
from aptp.routers.random_partition import RandomPartitionRouter, RandomPartitionRouterConfig

KIND_EXPERT = {"glyph": 0, "placed": 1, "plain": 2}


@pytest.fixture(scope="module")
def world_prompts(encoder):
    samples = World().sample(240, seed=21)
    return [s.caption for s in samples], [s.scene.kind for s in samples], encoder.encode([s.caption for s in samples])


def test_keyword_router_routes_held_out_prompts_by_kind(world_prompts):
    prompts, kinds, z = world_prompts
    router = KeywordRouter(KeywordRouterConfig())
    assert router.num_experts == 3
    assert router.label(prompts[:6]).tolist() == [KIND_EXPERT[k] for k in kinds[:6]]
    router.fit(z[:160], prompts=prompts[:160])
    ids = router.route(z[160:]).expert_ids
    want = torch.tensor([KIND_EXPERT[k] for k in kinds[160:]])
    assert (ids == want).float().mean() >= 0.98  # a linear probe on the rule labels
    with pytest.raises(ConfigError, match="prompts="):
        KeywordRouter(KeywordRouterConfig()).fit(z[:10])
    with pytest.raises(ValueError, match="not a regular expression"):
        KeywordRouterConfig(rules=["(unclosed"])


def test_random_partition_has_equal_groups_and_ignores_kinds(world_prompts):
    prompts, kinds, z = world_prompts
    router = RandomPartitionRouter(RandomPartitionRouterConfig(num_experts=3, seed=4))
    router.fit(z[:160])
    distinct = torch.unique(z[:160], dim=0).shape[0]
    assert sorted(torch.bincount(router.labels).tolist()) == sorted(
        [distinct // 3 + (i < distinct % 3) for i in range(3)])  # equal groups of distinct prompts
    # a repeated prompt has one group, and training prompts route to their own group
    ids = router.route(z[:160]).expert_ids
    for i in range(160):
        same = (z[:160] == z[i]).all(dim=1)
        assert (ids[same] == ids[i]).all()
    loads = torch.bincount(ids, minlength=3)
    assert loads.min() >= 30, loads  # no group swallows the repeated prompts
    again = RandomPartitionRouter(RandomPartitionRouterConfig(num_experts=3, seed=4))
    again.fit(z[:160])
    assert torch.equal(router.labels, again.labels)  # seeded
    # a kind is spread over every group (it is not an oracle)
    glyph_ids = ids[torch.tensor([k == "glyph" for k in kinds[:160]])]
    assert len(set(glyph_ids.tolist())) == 3


def test_fine_tuning_steps_shared_by_load_sum_to_the_total():
    assert expert_steps(240, torch.tensor([10, 20, 30, 0])) == [40, 80, 120, 0]
    assert sum(expert_steps(7, torch.tensor([1, 1, 1]))) == 7
