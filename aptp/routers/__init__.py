"""aptp.routers: prompt encoder, architecture predictor + codes, balancers, routers, losses, bundles.

Public API (imported lazily, so ``from aptp.routers import distributed`` stays light)::

    from aptp.routers import (SentenceTransformerEncoder, OTRouter, KMeansRouter, NearestRouter,
        SingleRouter, SinkhornBalancer, PotSinkhornBalancer, EmdBalancer, GreedyBalancer,
        balanced_assignment, contrastive_loss, resource_loss, spread_losses, gumbel_sigmoid,
        straight_through, monotone_depth_logits, save_router_bundle, load_router_bundle,
        route_prompts, RouterBundle, BundleRouting)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BundleRouting": "bundle", "RouterBundle": "bundle", "load_router_bundle": "bundle",
    "route_prompts": "bundle", "save_router_bundle": "bundle",
    "EmdBalancer": "balancers", "GreedyBalancer": "balancers", "PotSinkhornBalancer": "balancers",
    "SinkhornBalancer": "balancers", "balanced_assignment": "balancers",
    "SentenceTransformerEncoder": "encoder",
    "gumbel_sigmoid": "gates", "monotone_depth_logits": "gates", "straight_through": "gates",
    "KMeansRouter": "kmeans", "NearestRouter": "nearest", "OTRouter": "ot", "SingleRouter": "single",
    "contrastive_loss": "losses", "resource_loss": "losses", "spread_losses": "losses",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"aptp.routers.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'aptp.routers' has no attribute {name!r}")
