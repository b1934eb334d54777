"""Registers aptp's built-in prompt encoders, balancers and routers."""

from aptp.core.hookspecs import hookimpl


@hookimpl
def aptp_register_encoders(registry):
    from aptp.routers.encoder import SentenceTransformerEncoder

    registry.add("minilm", SentenceTransformerEncoder)


@hookimpl
def aptp_register_balancers(registry):
    from aptp.routers.balancers import EmdBalancer, GreedyBalancer, PotSinkhornBalancer, SinkhornBalancer

    registry.add("sinkhorn", SinkhornBalancer)
    registry.add("pot", PotSinkhornBalancer)
    registry.add("emd", EmdBalancer)
    registry.add("greedy", GreedyBalancer)


@hookimpl
def aptp_register_routers(registry):
    from aptp.routers.keyword import KeywordRouter
    from aptp.routers.kmeans import KMeansRouter
    from aptp.routers.nearest import NearestRouter
    from aptp.routers.ot import OTRouter
    from aptp.routers.random_partition import RandomPartitionRouter
    from aptp.routers.single import SingleRouter

    registry.add("ot", OTRouter)
    registry.add("kmeans", KMeansRouter)
    registry.add("nearest", NearestRouter)
    registry.add("single", SingleRouter)
    registry.add("keyword", KeywordRouter)
    registry.add("random_partition", RandomPartitionRouter)
