"""Registers aptp's built-in latency models."""

from aptp.core.hookspecs import hookimpl


@hookimpl
def aptp_register_latency_models(registry):
    from aptp.latency.profiled import ProfiledLatency

    registry.add("profiled", ProfiledLatency)
