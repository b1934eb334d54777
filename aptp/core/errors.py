"""Exceptions raised by aptp. Every message says what was wrong, with the value, and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class AptpError(Exception):
    """Base class of every error aptp raises on purpose."""


class ConfigError(AptpError, ValueError):
    """A configuration value, key or file is wrong."""


class UnknownComponentError(AptpError, KeyError):
    """A component name is not registered for its kind."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class DuplicateComponentError(AptpError):
    """Two providers registered the same name for the same kind."""


class PluginError(AptpError):
    """A plugin could not be loaded or implements a hook that does not exist."""


class ShapeError(AptpError, ValueError):
    """A tensor has the wrong shape or dtype."""


class IncompatibleError(AptpError, ValueError):
    """Two saved artefacts do not belong together (e.g. a router saved for another unit space)."""


class RunLockedError(AptpError):
    """Another process holds a run folder's lock."""


class CheckpointError(AptpError):
    """A checkpoint folder is incomplete or damaged."""


class DamagedFileError(AptpError, ValueError):
    """A saved file (an expert, a router bundle, a run folder's records) is truncated or malformed."""


class OutputError(AptpError, OSError):
    """An output folder cannot be written (it is a file, read-only, or the disk is full)."""


@contextmanager
def reading(path, what: str, hint: str) -> Iterator[None]:
    """Turn the I/O and format errors of reading a saved ``what`` at ``path`` (truncated or malformed
    JSON / YAML / safetensors, missing keys, wrongly shaped tensors) into a one-line
    DamagedFileError that says what to do (``hint``). aptp's own errors pass unchanged; the original
    error stays chained (``APTP_DEBUG=1`` shows it)."""
    try:
        yield
    except AptpError:
        raise
    except Exception as exc:
        if not _is_format_error(exc):
            raise
        detail = " ".join(str(exc).split()) or type(exc).__name__
        if len(detail) > 300:
            detail = detail[:300] + "..."
        raise DamagedFileError(f"{what} {path} is damaged or not what aptp wrote ({detail}); {hint}") from exc


def _is_format_error(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeError, RuntimeError)):
        return True
    # safetensors' SafetensorError, YAML and OmegaConf errors have their own bases
    return type(exc).__module__.split(".")[0] in ("safetensors", "yaml", "omegaconf")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """A ' Did you mean 'x'?' suffix when a close match exists, else ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""

