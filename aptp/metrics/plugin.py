"""Registers aptp's built-in quality metrics."""

from aptp.core.hookspecs import hookimpl


@hookimpl
def aptp_register_metrics(registry):
    from aptp.metrics.clip_score import ClipScore
    from aptp.metrics.cmmd import Cmmd
    from aptp.metrics.fid import Fid

    registry.add("fid", Fid)
    registry.add("clip_score", ClipScore)
    registry.add("cmmd", Cmmd)
