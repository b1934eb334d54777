"""Registers aptp's built-in granularities, assignments and pruners."""

from aptp.core.hookspecs import hookimpl


@hookimpl
def aptp_register_granularities(registry):
    from aptp.pruners.granularities import AttentionHeads, Depth, FFN, ResnetChannels

    for cls in (ResnetChannels, AttentionHeads, FFN, Depth):
        registry.add(cls.kind, cls)


@hookimpl
def aptp_register_assignments(registry):
    from aptp.pruners.assignments.depgraph import DepGraphImportanceAssignment
    from aptp.pruners.assignments.magnitude import MagnitudeAssignment
    from aptp.pruners.assignments.random import RandomAssignment
    from aptp.pruners.assignments.taylor import TaylorAssignment

    registry.add("magnitude", MagnitudeAssignment)
    registry.add("taylor", TaylorAssignment)
    registry.add("random", RandomAssignment)
    registry.add("depgraph", DepGraphImportanceAssignment)


@hookimpl
def aptp_register_pruners(registry):
    from aptp.pruners.aptp import AptpPruner
    from aptp.pruners.static import StaticPruner

    registry.add("aptp", AptpPruner)
    registry.add("static", StaticPruner)
