"""Contract checks for components, usable by plugin authors in their own test suites::

    # tests/test_my_plugin.py of a plugin distribution
    import pytest
    from aptp.testing import check_component, registered_specs

    @pytest.mark.parametrize("spec", registered_specs(provider="my_plugin"), ids=str)
    def test_contract(spec):
        check_component(spec)

Each check builds the component from its default config, round-trips its config through YAML,
and checks that building it twice under the same seed gives the same behaviour (a kind-specific
*probe*: a balancer's plan, an encoder's embeddings, a module's tensors, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import OmegaConf

from aptp.core.config import config_to_dict, instantiate_config
from aptp.core.registry import ComponentSpec, Registry

#: kind -> function(component) -> something comparable that exercises the component cheaply.
PROBES: dict[str, Callable[[Any], Any]] = {}


def probe(kind: str) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Register the deterministic probe of a component kind."""

    def deco(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        PROBES[kind] = fn
        return fn

    return deco


def registered_specs(registry: Registry | None = None, provider: str | None = None) -> list[ComponentSpec]:
    """Every registered component (optionally only those of one plugin), for parametrising tests."""
    from aptp.core.plugins import default_registry

    specs = (registry or default_registry()).all_specs()
    return [s for s in specs if provider is None or s.provider == provider]


def check_config_roundtrip(spec: ComponentSpec) -> None:
    """Default config -> YAML text -> config dataclass gives back an equal config."""
    config = spec.default_config()
    text = OmegaConf.to_yaml(OmegaConf.create({"name": spec.name, **config_to_dict(config)}))
    again = instantiate_config(spec, OmegaConf.create(text))
    assert again == config, f"{spec.kind} '{spec.name}': config changed in a YAML round trip: {config} -> {again}"


def build_seeded(spec: ComponentSpec, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return spec.build()


def check_component(spec: ComponentSpec) -> None:
    """All contract checks for one component; raises AssertionError naming what broke."""
    component = build_seeded(spec)
    assert isinstance(component, spec.factory), f"{spec.name}: build() returned {type(component)}"
    assert dataclasses.is_dataclass(component.config) and component.config == spec.default_config(), (
        f"{spec.kind} '{spec.name}': component.config must be the config it was built with"
    )
    check_config_roundtrip(spec)
    fn = PROBES.get(spec.kind, _generic_probe)
    first = fn(component)
    second = fn(build_seeded(spec))
    assert_same(first, second, f"{spec.kind} '{spec.name}' is not deterministic under a seed")


def assert_same(a: Any, b: Any, msg: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), msg
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), msg
        for k in a:
            assert_same(a[k], b[k], f"{msg} (at {k!r})")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), msg
        for x, y in zip(a, b):
            assert_same(x, y, msg)
    else:
        assert a == b, msg


def _generic_probe(component: Any) -> Any:
    return {k: v.detach().clone() for k, v in component.state_tensors().items()}


@probe("balancer")
def _probe_balancer(balancer: Any) -> Any:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(12, 4, generator=g)  # (B, K)
    plan = balancer.plan(scores)
    assert plan.shape == scores.shape and torch.isfinite(plan).all(), "plan must be a finite (B, K) tensor"
    return plan


@probe("encoder")
def _probe_encoder(encoder: Any) -> Any:
    z = encoder.encode(["a red circle", "a small blue square left of a large yellow triangle"])
    assert z.shape == (2, encoder.dim), f"encode must return (B, dim={encoder.dim}), got {tuple(z.shape)}"
    return z


@probe("metric")
def _probe_metric(metric: Any) -> Any:
    """Metrics that can run here without user-provided weights (``metric.can_probe()`` is true, e.g.
    the world metrics once the world evaluator is shipped) are computed on fixed random images;
    the others (FID, CLIP score, CMMD: weights loaded lazily on first compute) are only built."""
    can_probe = getattr(metric, "can_probe", None)
    if can_probe is None or not can_probe():
        return _generic_probe(metric)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 32, 32, generator=g)  # (N, 3, H, W) in [0, 1]
    reference = torch.rand(8, 3, 32, 32, generator=g)
    prompts = ["a red circle", "a small blue square on the left", 'the letter "A" in green',
               "a large yellow triangle at the top"] * 2
    value = metric.compute(images, prompts, reference=reference)
    assert isinstance(value, float), f"compute must return a float, got {type(value).__name__}"
    return value
