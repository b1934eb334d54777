"""A third-party latency model is registered through a plugin exactly like the other kinds, and the
pruners' resource helper builds it by name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import aptp
from aptp.core.errors import ConfigError, UnknownComponentError
from aptp.core.plugins import load_registry, make_plugin_manager
from aptp.core.registry import KINDS
from aptp.latency.base import LatencyContext, LatencyModel
from aptp.latency.resource import build_latency_model, check_resource


@dataclass
class MacsAsLatencyConfig:
    ms_per_gmac: float = 10.0


class MacsAsLatency(LatencyModel):
    """A toy hardware model: latency proportional to kept MACs."""

    config_class = MacsAsLatencyConfig

    def fit(self, context: LatencyContext) -> "MacsAsLatency":
        self.space = context.unit_space
        return self

    def latency(self, arch: torch.Tensor) -> torch.Tensor:
        return self.space.kept_macs(arch) / 1e9 * self.config.ms_per_gmac

    @property
    def dense_ms(self) -> float:
        return self.space.total_macs / 1e9 * self.config.ms_per_gmac


class MyHardware:
    __name__ = "my_hardware"

    @aptp.hookimpl
    def aptp_register_latency_models(self, registry):
        registry.add("macs_as_latency", MacsAsLatency)


def test_latency_model_is_a_kind_with_a_hook():
    assert "latency_model" in KINDS
    assert hasattr(make_plugin_manager().hook, "aptp_register_latency_models")
    spec = load_registry()["latency_model"].get("profiled")
    assert spec.provider == "aptp.latency" and spec.distribution.startswith("aptp ")


def test_third_party_latency_model_through_a_plugin(context):
    registry = load_registry(extra_plugins=[MyHardware()])
    spec = registry["latency_model"].get("macs_as_latency")
    assert spec.provider == "my_hardware" and spec.factory is MacsAsLatency
    model = build_latency_model({"name": "macs_as_latency", "ms_per_gmac": 2.0}, registry).fit(context)
    space = context.unit_space
    assert model.latency_ratio(space.dense()).item() == pytest.approx(1.0)
    arch = torch.rand(3, space.size, dtype=torch.float64)
    assert torch.allclose(model.latency_ratio(arch), space.macs_ratio(arch))
    priced = model.priced_space(space)  # linear model: the priced space is the MACs space, rescaled
    assert torch.allclose(priced.macs_ratio(arch), space.macs_ratio(arch), atol=1e-9)


def test_wrong_base_class_and_bad_names_are_refused():
    class NotALatencyModel:
        config_class = MacsAsLatencyConfig

    class Bad:
        __name__ = "bad"

        @aptp.hookimpl
        def aptp_register_latency_models(self, registry):
            registry.add("bad", NotALatencyModel)

    with pytest.raises(TypeError, match="subclass of LatencyModel"):
        load_registry(extra_plugins=[Bad()])
    with pytest.raises(UnknownComponentError, match="Did you mean 'profiled'"):
        build_latency_model({"name": "profiledd"})
    with pytest.raises(ConfigError, match="no parameter 'bucket'"):
        build_latency_model({"name": "profiled", "bucket": 3})
    with pytest.raises(ValueError, match="'macs' or 'latency'"):
        check_resource("flops")
