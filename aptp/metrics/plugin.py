"""Registers aptp's built-in quality metrics."""

from aptp.core.hookspecs import hookimpl


@hookimpl
def aptp_register_metrics(registry):
    pass
