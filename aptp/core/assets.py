"""Files shipped inside the aptp package (the embedded world's base model and evaluator).

Configs name them portably as ``aptp:<path under aptp/assets>``, e.g. ``pretrained: aptp:world/base``.
"""

from __future__ import annotations

from pathlib import Path

from aptp.core.errors import ConfigError

PREFIX = "aptp:"
ASSETS = Path(__file__).resolve().parents[1] / "assets"


def resolve_asset(path: str | None) -> str | None:
    """``aptp:world/base`` -> the absolute folder inside the installed package; other values unchanged."""
    if path is None or not str(path).startswith(PREFIX):
        return path
    target = ASSETS / str(path)[len(PREFIX):]
    if not target.exists():
        known = sorted(str(p.relative_to(ASSETS)) for p in ASSETS.glob("*/*") if p.is_dir())
        raise ConfigError(f"{path!r} names no shipped asset ({target} is missing); shipped: {', '.join(known) or 'none'}.")
    return str(target)
