"""An ad-hoc plugin for the core tests: registered in-process, not through an entry point."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aptp.core.hookspecs import hookimpl
from aptp.core.interfaces import Router


@dataclass
class ProjectionRouterConfig:
    num_experts: int = 3
    dim: int = 8

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}.")


class ProjectionRouter(Router):
    """Routes by a fixed random projection of the prompt embedding (test plugin)."""

    config_class = ProjectionRouterConfig

    def __init__(self, config: ProjectionRouterConfig | None = None) -> None:
        super().__init__(config)
        self.proj = torch.nn.Parameter(torch.randn(self.config.dim, self.config.num_experts))

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.proj  # (B, K)


class AdHocPlugin:
    """The plugin object: pluggy takes any object with hookimpl-marked methods."""

    __name__ = "adhoc"

    @hookimpl
    def aptp_register_routers(self, registry):
        registry.add("projection", ProjectionRouter)


