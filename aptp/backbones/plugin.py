"""Registers aptp's built-in backbones (listed in aptp's own ``[project.entry-points.aptp]``)."""

from aptp.core.hookspecs import hookimpl


@hookimpl
def aptp_register_backbones(registry):
    pass
