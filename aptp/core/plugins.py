"""The plugin manager: loads the ``aptp`` entry-point group and fills a :class:`Registry`.

There is no module-level plugin manager: call :func:`load_registry` (cached per blocked set by
:func:`default_registry`) or build a :class:`pluggy.PluginManager` with :func:`make_plugin_manager`.

Block plugins with the environment variable ``APTP_BLOCK_PLUGINS`` (comma-separated entry-point
names, e.g. ``APTP_BLOCK_PLUGINS=aptp_timm``) or the ``block`` argument.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import pluggy

from aptp.core import hookspecs
from aptp.core.errors import PluginError
from aptp.core.registry import HOOKS, Registry

BLOCK_ENV = "APTP_BLOCK_PLUGINS"


def blocked_from_env() -> frozenset[str]:
    raw = os.environ.get(BLOCK_ENV, "")
    return frozenset(p.strip() for p in raw.split(",") if p.strip())


def make_plugin_manager(
    block: Iterable[str] = (), extra_plugins: Iterable[object] = (), entry_points: bool = True
) -> pluggy.PluginManager:
    """A plugin manager with aptp's hookspecs, the ``aptp`` entry points and ``extra_plugins``.

    Raises :class:`PluginError` if a plugin implements a hook that does not exist (a misspelled
    ``aptp_register_*`` function would otherwise be ignored silently).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in set(block) | blocked_from_env():
        pm.set_blocked(name)
    if entry_points:
        try:
            pm.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
        except Exception as exc:  # an entry point that fails to import
            raise PluginError(
                f"an 'aptp' plugin failed to load: {exc!r}. Reinstall it, or block it with "
                f"{BLOCK_ENV}=<entry point name>."
            ) from exc
    for plugin in extra_plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        if not pm.is_blocked(name):
            pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(
            f"{exc}. The hooks a plugin may implement are: {', '.join(HOOKS.values())}."
        ) from exc
    return pm


def registry_from_plugin_manager(pm: pluggy.PluginManager) -> Registry:
    """Call every plugin's ``aptp_register_*`` hooks, recording which plugin provided what."""
    registry = Registry()
    distributions = {
        id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()
    }
    for kind, hook_name in HOOKS.items():
        caller = getattr(pm.hook, hook_name)
        # Oldest registration first, so a duplicate error names the built-in before the intruder.
        for impl in caller.get_hookimpls():
            provider = pm.get_name(impl.plugin) or repr(impl.plugin)
            with registry[kind].providing(provider, distributions.get(id(impl.plugin))):
                impl.function(registry=registry[kind])
    return registry


def load_registry(block: Iterable[str] = (), extra_plugins: Iterable[object] = ()) -> Registry:
    """A fresh registry of every installed (and not blocked) plugin's components."""
    return registry_from_plugin_manager(make_plugin_manager(block, extra_plugins))


@functools.lru_cache(maxsize=8)
def _cached(blocked: frozenset[str]) -> Registry:
    return load_registry(block=blocked)


def default_registry() -> Registry:
    """The registry of installed plugins, cached per value of ``APTP_BLOCK_PLUGINS``."""
    return _cached(blocked_from_env())


@functools.lru_cache(maxsize=8)
def _config_dirs(blocked: frozenset[str]) -> tuple[str, ...]:
    pm = make_plugin_manager(block=blocked)
    return tuple(str(d) for dirs in pm.hook.aptp_config_dirs() for d in (dirs or []))


def plugin_config_dirs() -> list[str]:
    """Preset folders of the installed (and not blocked) plugins, cached per ``APTP_BLOCK_PLUGINS``."""
    return list(_config_dirs(blocked_from_env()))
