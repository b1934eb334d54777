"""The plugin API of aptp.

A plugin is a module (or object) with functions named like the hooks below, decorated with
``aptp.hookimpl``, and listed under the ``aptp`` entry-point group of its distribution::

    # pyproject.toml of a plugin
    [project.entry-points.aptp]
    my_plugin = "my_package.aptp_plugin"

    # my_package/aptp_plugin.py
    import aptp

    @aptp.hookimpl
    def aptp_register_routers(registry):
        registry.add("my_router", MyRouter)   # MyRouter.config_class is its config dataclass

aptp's own built-ins are registered the same way (see ``[project.entry-points.aptp]`` in aptp's
``pyproject.toml``). Every hook receives the :class:`~aptp.core.registry.KindRegistry` of one
component kind; call ``registry.add(name, factory)`` once per component. The kinds, their hooks,
base classes and experiment slots are declared once, in :data:`aptp.core.registry.KIND_TABLE`; a new
kind is a row there and its hookspec here.
"""

from __future__ import annotations

import pluggy

from aptp.core.registry import KindRegistry

PROJECT_NAME = "aptp"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def aptp_register_backbones(registry: KindRegistry) -> None:
    """Register backbones: adapters over a diffusion model (denoiser, text encoder, scheduler, VAE).

    Each factory is a subclass of :class:`aptp.core.interfaces.Backbone`.
    """


@hookspec
def aptp_register_granularities(registry: KindRegistry) -> None:
    """Register granularities: kinds of prunable units (channel groups, heads, blocks) with their
    gates and physical cuts.

    Each factory is a subclass of :class:`aptp.core.interfaces.Granularity`.
    """


@hookspec
def aptp_register_encoders(registry: KindRegistry) -> None:
    """Register prompt encoders: prompt list -> embeddings ``z`` of shape (B, D).

    Each factory is a subclass of :class:`aptp.core.interfaces.PromptEncoder`.
    """


@hookspec
def aptp_register_balancers(registry: KindRegistry) -> None:
    """Register balancers: score matrix (B, K) -> transport plan (B, K) whose marginals are balanced.

    Each factory is a subclass of :class:`aptp.core.interfaces.Balancer`.
    """


@hookspec
def aptp_register_routers(registry: KindRegistry) -> None:
    """Register routers: prompt embeddings (B, D) -> expert ids (B,).

    Each factory is a subclass of :class:`aptp.core.interfaces.Router`.
    """


@hookspec
def aptp_register_assignments(registry: KindRegistry) -> None:
    """Register assignments: which units each of the K experts keeps, an architecture matrix (K, U).

    Each factory is a subclass of :class:`aptp.core.interfaces.Assignment`.
    """


@hookspec
def aptp_register_pruners(registry: KindRegistry) -> None:
    """Register pruners: procedures that turn a composition into experts (e.g. APTP's two phases,
    static one-shot pruning).

    Each factory is a subclass of :class:`aptp.core.interfaces.Pruner`.
    """


@hookspec
def aptp_register_metrics(registry: KindRegistry) -> None:
    """Register quality metrics over generated images and their prompts.

    Each factory is a subclass of :class:`aptp.core.interfaces.Metric`.
    """


@hookspec
def aptp_register_latency_models(registry: KindRegistry) -> None:
    """Register latency models: measured (or modelled) latency of any architecture of a denoiser on
    some hardware, differentiable in the gates (``resource: latency`` of the pruners).

    Each factory is a subclass of :class:`aptp.latency.base.LatencyModel`.
    """


@hookspec
def aptp_config_dirs() -> list[str]:
    """Folders of presets this plugin ships, laid out like aptp's ``configs/``
    (``backbone/<preset>.yaml``, ``experiment/<name>.yaml``, ...).

    They are searched after ``--config-dir``, ``$APTP_CONFIG_PATH`` and ``./configs`` and before
    aptp's own presets; blocking the plugin hides them.
    """
