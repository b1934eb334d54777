"""Registers aptp's built-in backbones (listed in aptp's own ``[project.entry-points.aptp]``)."""

from aptp.core.hookspecs import hookimpl


@hookimpl
def aptp_register_backbones(registry):
    from aptp.backbones.unet import UNetBackbone

    registry.add("unet", UNetBackbone)
    registry.add("dit", _dit())
    registry.add("sd3", _sd3())
    registry.add("flux", _flux())


def _dit():
    from aptp.backbones.transformer import DiTBackbone

    return DiTBackbone


def _sd3():
    from aptp.backbones.sd3 import SD3Backbone

    return SD3Backbone


def _flux():
    from aptp.backbones.flux import FluxBackbone

    return FluxBackbone
