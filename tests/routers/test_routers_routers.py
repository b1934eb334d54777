"""Routers: deterministic inference, save -> load (tensors and bundles), clear errors."""

from __future__ import annotations

import pytest
import torch
from routing_helpers import PROMPTS, make_unit_space

from aptp.core.errors import ConfigError, IncompatibleError, ShapeError
from aptp.routers.balancers import SinkhornBalancer
from aptp.routers.bundle import load_router_bundle, route_prompts, save_router_bundle
from aptp.routers.kmeans import KMeansRouter, KMeansRouterConfig
from aptp.routers.nearest import NearestRouter, NearestRouterConfig
from aptp.routers.ot import OTRouter, OTRouterConfig
from aptp.routers.single import SingleRouter

ROUTERS = ["ot", "kmeans", "nearest", "single"]


def make_router(name: str, embeddings: torch.Tensor, registry, seed: int = 0):
    """A router of each kind, ready to route (bound / fitted), built through the registry."""
    spec = registry["router"].get(name)
    torch.manual_seed(seed)
    if name == "ot":
        r = spec.build(OTRouterConfig(num_experts=4, offset=0.0))
        r.bind(make_unit_space(), embeddings.shape[1])
        with torch.no_grad():
            r.codes.weight.mul_(5)  # distinct codes, so routing is not all ties
    elif name == "kmeans":
        r = spec.build(KMeansRouterConfig(num_experts=3))
        r.fit(embeddings)
    elif name == "nearest":
        r = spec.build(NearestRouterConfig(num_experts=3))
        r.fit(embeddings, labels=torch.arange(embeddings.shape[0]) % 3)
    else:
        r = spec.build()
    return r.eval()


@pytest.mark.parametrize("name", ROUTERS)
def test_inference_routing_is_deterministic(name, embeddings, registry):
    r = make_router(name, embeddings, registry)
    a, b = r.route(embeddings), r.route(embeddings)
    assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.scores, b.scores)
    assert a.scores.shape == (len(PROMPTS), r.num_experts)
    assert int(a.load.sum()) == len(PROMPTS)
    other = make_router(name, embeddings, registry)  # same seed, same router
    assert torch.equal(other.route(embeddings).expert_ids, a.expert_ids)


@pytest.mark.parametrize("name", ROUTERS)
def test_state_tensors_round_trip_into_a_fresh_router(name, embeddings, registry):
    r = make_router(name, embeddings, registry)
    fresh = registry["router"].get(name).build(r.config)  # unbound / unfitted
    fresh.load_state_tensors(r.state_tensors())
    assert torch.equal(fresh.eval().route(embeddings).scores, r.route(embeddings).scores)


def test_nearest_router_sends_bank_prompts_to_their_label(embeddings):
    r = NearestRouter(NearestRouterConfig(num_experts=3))
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 0, 1, 2])
    r.fit(embeddings, labels=labels)
    assert torch.equal(r.route(embeddings).expert_ids, labels)


def test_nearest_router_fitted_without_labels_uses_kmeans_clusters(embeddings):
    """What a pruner does (fit on its training prompts): the bank is labelled by k-means."""
    r = NearestRouter(NearestRouterConfig(num_experts=3))
    r.fit(embeddings)
    assert sorted(set(r.labels.tolist())) == [0, 1, 2]
    assert torch.equal(r.route(embeddings).expert_ids, r.labels)  # every bank prompt is its own neighbour
    again = NearestRouter(NearestRouterConfig(num_experts=3))
    again.fit(embeddings)
    assert torch.equal(again.labels, r.labels)  # seeded


def test_kmeans_router_routes_to_nearest_centre(embeddings):
    r = KMeansRouter(KMeansRouterConfig(num_experts=4))
    r.fit(embeddings)
    z = torch.nn.functional.normalize(embeddings, dim=-1)
    assert torch.equal(r.route(embeddings).expert_ids, torch.cdist(z, r.centers).argmin(1))


def test_ot_router_balanced_in_training_argmax_at_inference(embeddings, registry):
    r = make_router("ot", embeddings, registry)
    s = r.scores(embeddings)
    assert torch.equal(r.route(embeddings).expert_ids, s.argmax(1))
    balanced = r.route(embeddings, SinkhornBalancer()).load
    assert balanced.tolist() == [3, 3, 3, 3]  # 12 prompts, 4 experts


@pytest.mark.parametrize("name", ROUTERS)
def test_bundle_save_load_route(name, embeddings, registry, encoder, tmp_path):
    r = make_router(name, embeddings, registry)
    space = make_unit_space()
    archs = None
    if name != "ot":  # the ot router brings its own codes' architectures
        archs = torch.ones(r.num_experts, space.size)
        archs[0, :4] = 0
    save_router_bundle(tmp_path / "router", encoder, r, unit_space=space, architectures=archs)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    bundle = load_router_bundle(tmp_path / "router")
    res = route_prompts(bundle, PROMPTS)
    assert torch.equal(res.expert_ids, r.route(encoder.encode(PROMPTS)).expert_ids)
    expected = space.macs_ratio((archs if archs is not None else r.architectures()).double()).float()
    assert torch.allclose(res.kept_ratios, expected)
    assert res.prompt_kept_ratios.shape == (len(PROMPTS),)
    save_router_bundle(tmp_path / "router", encoder, r)  # overwrite in place, without architectures
    again = load_router_bundle(tmp_path / "router").kept_ratios()
    if name == "ot":  # still known: the ot router carries its unit space and codes
        assert torch.allclose(again, res.kept_ratios)
    else:
        assert again is None


# ------------------------------------------------------------------------------------ bad inputs
def test_ot_router_saved_with_another_unit_space_is_refused(embeddings, registry, tmp_path, encoder):
    r = make_router("ot", embeddings, registry)
    other = OTRouter(OTRouterConfig(num_experts=4)).bind(make_unit_space(extra=2), embeddings.shape[1])
    with pytest.raises(IncompatibleError, match="unit space"):
        other.load_state_tensors(r.state_tensors())
    with pytest.raises(IncompatibleError, match="unit space"):
        save_router_bundle(tmp_path / "b", encoder, r, unit_space=make_unit_space(extra=2))
    with pytest.raises(IncompatibleError, match="K=4"):
        OTRouter(OTRouterConfig(num_experts=8)).load_state_tensors(r.state_tensors())


def test_bundle_with_mismatching_unit_space_file_is_refused(embeddings, registry, tmp_path, encoder):
    import json

    r = make_router("ot", embeddings, registry)
    save_router_bundle(tmp_path / "b", encoder, r)
    (tmp_path / "b" / "unit_space.json").write_text(json.dumps(make_unit_space(extra=2).to_dict()))
    with pytest.raises(IncompatibleError, match="unit space"):
        load_router_bundle(tmp_path / "b")


def test_kmeans_needs_at_least_k_prompts(embeddings):
    with pytest.raises(ConfigError, match=r"K=16 clusters from 12 prompts"):
        KMeansRouter(KMeansRouterConfig(num_experts=16)).fit(embeddings)


@pytest.mark.parametrize("bad", [[], ["ok", 3], "just one string", [None]])
def test_bad_prompt_lists(bad, encoder, embeddings, registry, tmp_path):
    with pytest.raises(ConfigError, match="prompt"):
        encoder.encode(bad)
    save_router_bundle(tmp_path / "b", encoder, make_router("single", embeddings, registry))
    with pytest.raises(ConfigError, match="prompt"):
        route_prompts(load_router_bundle(tmp_path / "b"), bad)


@pytest.mark.parametrize("name", ROUTERS)
def test_wrong_embedding_shapes(name, embeddings, registry):
    r = make_router(name, embeddings, registry)
    with pytest.raises(ShapeError, match=r"\(B, D\)"):
        r.route(embeddings[0])  # (D,) instead of (B, D)
    if name != "single":
        with pytest.raises(ShapeError, match="D=384"):
            r.route(embeddings[:, :100])


def test_unprepared_routers_say_what_to_do(embeddings):
    with pytest.raises(ConfigError, match="bind"):
        OTRouter().route(embeddings)
    with pytest.raises(ConfigError, match="fit"):
        KMeansRouter().route(embeddings)
    with pytest.raises(ConfigError, match="labels"):
        NearestRouter(NearestRouterConfig(unlabelled="none")).fit(embeddings)
    with pytest.raises(ConfigError, match="at least num_experts=16"):
        NearestRouter(NearestRouterConfig(num_experts=16)).fit(embeddings)
    with pytest.raises(ConfigError, match="num_experts=5"):
        NearestRouter(NearestRouterConfig(num_experts=3)).fit(embeddings, labels=torch.arange(12) % 5)
    assert SingleRouter().route(embeddings).load.tolist() == [12]


@pytest.mark.parametrize("cls,bad", [(OTRouterConfig, dict(num_experts=0)), (OTRouterConfig, dict(tau=0.0)),
                                     (KMeansRouterConfig, dict(num_experts=0)),
                                     (NearestRouterConfig, dict(num_experts=-1))])
def test_router_configs_are_checked(cls, bad):
    with pytest.raises(ValueError, match=str(next(iter(bad.values())))):
        cls(**bad)


@pytest.mark.parametrize("name", ["ot", "kmeans", "nearest"])
def test_composition_save_load_restores_a_fitted_router(name, embeddings, registry, tmp_path):
    """Through aptp's own Composition save/load (config.yaml + state.safetensors)."""
    from aptp.core.build import Composition, build
    from aptp.core.config import compose

    fitted = make_router(name, embeddings, registry)
    section = {"num_experts": fitted.num_experts, **({"offset": fitted.config.offset} if name == "ot" else {})}
    cfg = compose({"defaults": [{"balancer": "sinkhorn"}, {"router": name}], "router": section}, registry=registry)
    comp = build(cfg, registry)
    comp.router.load_state_tensors(fitted.state_tensors())
    comp.save(tmp_path / "run")
    again = Composition.load(tmp_path / "run", registry)
    assert torch.equal(again.router.eval().route(embeddings, again.balancer).expert_ids,
                       fitted.route(embeddings, comp.balancer).expert_ids)
