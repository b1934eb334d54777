"""Latency models: measured, hardware-aware resource models (``resource: latency``).

See :mod:`aptp.latency.base` for the contract and :mod:`aptp.latency.profiled` for the built-in
``profiled`` model; :mod:`aptp.latency.resource` is what the pruners call.
"""

from aptp.latency.base import LatencyContext, LatencyModel

__all__ = ["LatencyContext", "LatencyModel"]
