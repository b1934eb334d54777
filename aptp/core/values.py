"""Value checks for config dataclasses (called from their ``__post_init__``).

Each raises ``ValueError`` with the key, the value and what to give instead; the config loader
turns it into a one-line :class:`aptp.core.errors.ConfigError` before anything runs.
"""

from __future__ import annotations

import math
from typing import Any


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number.")
    return float(value)


def finite(name: str, value: Any, hint: str = "") -> float:
    """``value`` if it is a finite number (not nan or +-inf)."""
    v = _number(name, value)
    if not math.isfinite(v):
        raise ValueError(f"{name}={value} must be a finite number{_hint(hint)}.")
    return v


def positive(name: str, value: Any, hint: str = "") -> float:
    """``value`` if it is finite and > 0 (learning rates, temperatures)."""
    v = _number(name, value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}={value} must be a finite number > 0{_hint(hint)}.")
    return v


def non_negative(name: str, value: Any, hint: str = "") -> float:
    """``value`` if it is finite and >= 0 (loss weights, weight decay)."""
    v = _number(name, value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name}={value} must be a finite number >= 0{_hint(hint)}.")
    return v


def weights(prefix: str, obj: Any, names: tuple[str, ...]) -> None:
    """Every ``obj.<name>`` is a finite loss weight >= 0 (0 switches the term off)."""
    for name in names:
        non_negative(f"{prefix}{name}", getattr(obj, name), "(a loss weight; 0 switches the term off)")


def device(name: str, value: Any) -> str:
    """``value`` if torch parses it as a device (cpu, cuda, cuda:1, mps, ...)."""
    import torch

    try:
        torch.device(str(value))
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(
            f"{name}={value!r} is not a torch device; use cpu, cuda, cuda:N or mps."
        ) from None
    return str(value)


def _hint(hint: str) -> str:
    return f" {hint}" if hint else ""
