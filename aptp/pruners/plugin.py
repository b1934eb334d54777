"""Registers aptp's built-in granularities, assignments and pruners."""

from aptp.core.hookspecs import hookimpl


@hookimpl
def aptp_register_granularities(registry):
    pass
