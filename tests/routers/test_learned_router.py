"""Declared contracts, not sniffed ones: a router that learns architectures is a
:class:`~aptp.core.interfaces.LearnedRouter` (APTP trains its predictor and codes), and a unit group
is depth to the router exactly when it is depth to the unit space (``UnitGroup.is_depth``), whatever
its kind's name (the timm plugin's ``timm_blocks`` as much as the built-in ``depth``)."""

from __future__ import annotations

import pytest
import torch
from routing_helpers import make_unit_space

from aptp.core.interfaces import LearnedRouter, Router
from aptp.core.units import UnitGroup, UnitSpace
from aptp.routers.predictor import RawLayout
from aptp.testing import registered_specs

ROUTER_SPECS = [s for s in registered_specs() if s.kind == "router"]


def test_ot_is_the_built_in_learned_router(registry):
    learned = {s.name for s in registry["router"] if s.provider.startswith("aptp.") and issubclass(s.factory, LearnedRouter)}
    assert learned == {"ot"}
    for name in ("kmeans", "nearest", "single", "keyword", "random_partition"):
        assert not issubclass(registry["router"].get(name).factory, LearnedRouter)


@pytest.mark.parametrize("spec", ROUTER_SPECS, ids=lambda s: s.name)
def test_every_learned_router_keeps_the_contract(spec):
    """Bound to a unit space it gives gates and architectures of the declared shapes."""
    if not issubclass(spec.factory, LearnedRouter):
        assert issubclass(spec.factory, Router)
        return
    space, k = make_unit_space(), 3
    router = spec.build(spec.config_class(num_experts=k))
    assert not router.bound
    router = router.bind(space, 16)
    assert router.bound and router.unit_space is space
    z = torch.randn(5, 16)
    assert router.predicted_gates(z).shape == (5, space.size)
    assert router.normalised_gates(z).shape == (5, space.size)
    assert router.code_gates().shape == (k, space.size)
    arch = router.architectures()
    assert arch.shape == (k, space.size) and set(arch.unique().tolist()) <= {0.0, 1.0}
    assert router.init_codes_from_predictions(torch.randn(8, 16)).shape == (8,)
    router.init_codes_from_groups(torch.randn(6, 16), torch.arange(6) % k)


def test_a_router_missing_part_of_the_contract_cannot_be_built():
    class Half(LearnedRouter):
        num_experts = 2

        def scores(self, z):
            return torch.zeros(z.shape[0], 2)

    with pytest.raises(TypeError, match="abstract"):
        Half()


def _space(kind: str) -> UnitSpace:
    blocks = tuple(f"blocks.{i}" for i in (2, 1, 3))
    groups = (UnitGroup("width", "blocks.0.mlp", 4, 10.0, 5), UnitGroup(kind, kind, 3, 100.0, 50, unit_paths=blocks))
    return UnitSpace(groups, total_macs=1000.0, total_params=1000)


@pytest.mark.parametrize("kind", ["depth", "timm_blocks", "any_blocks"])
def test_a_group_of_blocks_is_depth_to_the_router_whatever_its_kind(kind):
    space = _space(kind)
    assert [g.is_depth for g in space.groups] == [False, True]
    layout = RawLayout(space)
    assert layout.is_depth == [False, True]
    assert layout.raw_sizes == [4, 3 + 1]  # n_g + 1 raw logits: a monotone keep probability
    keep = torch.sigmoid(layout.unit_logits(torch.randn(64, layout.raw_size)))[:, 4:]  # (64, 3)
    assert bool((keep[:, :-1] <= keep[:, 1:] + 1e-6).all())  # unit 0 drops first


def test_width_groups_are_not_depth():
    assert not any(g.is_depth for g in make_unit_space().groups[:2])
