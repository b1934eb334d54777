"""Registers aptp's built-in granularities, assignments and pruners."""

from aptp.core.hookspecs import hookimpl


@hookimpl
def aptp_register_granularities(registry):
    from aptp.pruners.granularities import AttentionHeads, Depth, FFN, ResnetChannels

    for cls in (ResnetChannels, AttentionHeads, FFN, Depth):
        registry.add(cls.kind, cls)
