"""Registers aptp's built-in quality metrics."""

from aptp.core.hookspecs import hookimpl


@hookimpl
def aptp_register_metrics(registry):
    from aptp.metrics.clip_score import ClipScore
    from aptp.metrics.cmmd import Cmmd
    from aptp.metrics.fid import Fid
    from aptp.metrics.world_accuracy import WorldAccuracy
    from aptp.metrics.world_fd import WorldFd
    from aptp.metrics.world_mmd import WorldMmd

    registry.add("fid", Fid)
    registry.add("clip_score", ClipScore)
    registry.add("cmmd", Cmmd)
    registry.add("world_accuracy", WorldAccuracy)
    registry.add("world_fd", WorldFd)
    registry.add("world_mmd", WorldMmd)
