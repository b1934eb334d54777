"""aptp.routers: prompt encoder, architecture predictor + codes, balancers, routers, losses, bundles.

Public API::

    from aptp.routers import (SentenceTransformerEncoder, OTRouter, KMeansRouter, NearestRouter,
        SingleRouter, SinkhornBalancer, PotSinkhornBalancer, EmdBalancer, GreedyBalancer,
        contrastive_loss, resource_loss, spread_losses, gumbel_sigmoid, monotone_depth_logits,
        save_router_bundle, load_router_bundle, route_prompts)
"""

from aptp.routers.balancers import (
    EmdBalancer,
    GreedyBalancer,
    PotSinkhornBalancer,
    SinkhornBalancer,
    balanced_assignment,
)
from aptp.routers.bundle import BundleRouting, RouterBundle, load_router_bundle, route_prompts, save_router_bundle
from aptp.routers.encoder import SentenceTransformerEncoder
from aptp.routers.gates import gumbel_sigmoid, monotone_depth_logits, straight_through
from aptp.routers.kmeans import KMeansRouter
from aptp.routers.losses import contrastive_loss, resource_loss, spread_losses
from aptp.routers.nearest import NearestRouter
from aptp.routers.ot import OTRouter
from aptp.routers.single import SingleRouter

__all__ = [
    "BundleRouting", "EmdBalancer", "GreedyBalancer", "KMeansRouter", "NearestRouter", "OTRouter",
    "PotSinkhornBalancer", "RouterBundle", "SentenceTransformerEncoder", "SingleRouter", "SinkhornBalancer",
    "balanced_assignment", "contrastive_loss", "gumbel_sigmoid", "load_router_bundle", "monotone_depth_logits",
    "resource_loss", "route_prompts", "save_router_bundle", "spread_losses", "straight_through",
]
