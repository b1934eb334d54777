"""Registers aptp's built-in backbones (listed in aptp's own ``[project.entry-points.aptp]``)."""

from aptp.core.hookspecs import hookimpl


@hookimpl
def aptp_register_backbones(registry):
    from aptp.backbones.unet import UNetBackbone

    registry.add("unet", UNetBackbone)
    registry.add("dit", _dit())


def _dit():
    from aptp.backbones.transformer import DiTBackbone

    return DiTBackbone
