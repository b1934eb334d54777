"""Registers aptp's built-in prompt encoders, balancers and routers."""

from aptp.core.hookspecs import hookimpl


@hookimpl
def aptp_register_routers(registry):
    pass
