"""aptp-timm's hook implementations: the module named by this distribution's ``aptp`` entry point.

Imports of timm happen inside the hooks' components (when one is built or its module is imported),
so listing components (``aptp list``) stays cheap.
"""

from __future__ import annotations

from aptp import hookimpl


@hookimpl
def aptp_register_backbones(registry):
    from aptp_timm.backbone import TimmDiTBackbone

    registry.add("timm_dit", TimmDiTBackbone)


@hookimpl
def aptp_register_granularities(registry):
    from aptp_timm.granularities import TimmBlocks, TimmHeads, TimmMlp

    for cls in (TimmHeads, TimmMlp, TimmBlocks):
        registry.add(cls.kind, cls)


@hookimpl
def aptp_config_dirs():
    from aptp_timm import CONFIG_DIR

    return [str(CONFIG_DIR)]
