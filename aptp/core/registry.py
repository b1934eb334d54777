"""Registries: short component names -> factories and their config dataclasses.

One :class:`KindRegistry` per component kind (backbone, granularity, router, ...). Plugins fill
them through the hooks in :mod:`aptp.core.hookspecs`; the whole set is a :class:`Registry`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aptp.core.errors import DuplicateComponentError, UnknownComponentError, did_you_mean

@dataclass(frozen=True)
class Kind:
    """One kind of component: the one declaration the hook names, the registries' base classes,
    the experiment slots and the CLI's ``aptp list`` derive from (:data:`KIND_TABLE`)."""

    name: str  # "granularity": the registry key, ``registry["granularity"]``
    plural: str  # "granularities": the hook is ``aptp_register_<plural>`` (:mod:`aptp.core.hookspecs`)
    base: str  # "aptp.core.interfaces.Granularity": the class every factory of this kind subclasses
    slot: str | None = None  # the experiment key that names components of this kind; None: not composed
    many: bool = False  # whether that slot holds a list of components

    @property
    def hook(self) -> str:
        return f"aptp_register_{self.plural}"

    def base_class(self) -> type:
        import importlib

        module, _, attr = self.base.rpartition(".")
        return getattr(importlib.import_module(module), attr)


#: Every component kind, in registration (and listing) order. A new kind is one row here plus its
#: hookspec (``aptp_register_<plural>``, a test holds the two equal).
KIND_TABLE: tuple[Kind, ...] = (
    Kind("backbone", "backbones", "aptp.core.interfaces.Backbone", slot="backbone"),
    Kind("granularity", "granularities", "aptp.core.interfaces.Granularity", slot="granularity", many=True),
    Kind("encoder", "encoders", "aptp.core.interfaces.PromptEncoder", slot="encoder"),
    Kind("balancer", "balancers", "aptp.core.interfaces.Balancer", slot="balancer"),
    Kind("router", "routers", "aptp.core.interfaces.Router", slot="router"),
    Kind("assignment", "assignments", "aptp.core.interfaces.Assignment", slot="assignment"),
    Kind("pruner", "pruners", "aptp.core.interfaces.Pruner", slot="pruner"),
    Kind("metric", "metrics", "aptp.core.interfaces.Metric", slot="metrics", many=True),
    # chosen by name inside a pruner's section (``pruner.latency_model.name``), not an experiment slot
    Kind("latency_model", "latency_models", "aptp.latency.base.LatencyModel"),
)
#: kind -> name of the hook that registers components of that kind.
HOOKS: dict[str, str] = {k.name: k.hook for k in KIND_TABLE}
KINDS: tuple[str, ...] = tuple(HOOKS)


@dataclass(frozen=True)
class ComponentSpec:
    """What a registry knows of one component."""

    kind: str
    name: str
    factory: type
    config_class: type
    provider: str  # the plugin that registered it (its entry-point name)
    distribution: str | None  # "name version" of the distribution shipping that plugin, if any

    @property
    def summary(self) -> str:
        """First line of the factory's docstring."""
        doc = (self.factory.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def default_config(self) -> Any:
        return self.config_class()

    def build(self, config: Any = None) -> Any:
        """Instantiate the component from a config dataclass (default config if ``None``)."""
        if config is None:
            config = self.config_class()
        elif not isinstance(config, self.config_class):
            raise TypeError(
                f"{self.kind} '{self.name}' takes a {self.config_class.__name__}, "
                f"got {type(config).__name__}."
            )
        return self.factory(config)


class KindRegistry:
    """The components of one kind. Plugins call :meth:`add`; everyone else :meth:`get`."""

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind = kind
        self.base = base
        self._specs: dict[str, ComponentSpec] = {}
        self._provider: tuple[str, str | None] = ("<direct>", None)

    @contextlib.contextmanager
    def providing(self, provider: str, distribution: str | None) -> Iterator[None]:
        """Attribute the components added inside this block to ``provider``."""
        previous, self._provider = self._provider, (provider, distribution)
        try:
            yield
        finally:
            self._provider = previous

    def add(self, name: str, factory: type, config_class: type | None = None) -> ComponentSpec:
        """Register ``factory`` under ``name``.

        ``config_class`` defaults to ``factory.config_class``; it must be a dataclass whose
        fields are the component's parameters.
        """
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(
                f"{self.kind} name {name!r} must be a short identifier (letters, digits, '_', '-')."
            )
        if self.base is not None and not (isinstance(factory, type) and issubclass(factory, self.base)):
            raise TypeError(
                f"{self.kind} '{name}': {factory!r} must be a subclass of {self.base.__qualname__}."
            )
        config_class = config_class or getattr(factory, "config_class", None)
        if config_class is None or not dataclasses.is_dataclass(config_class):
            raise TypeError(
                f"{self.kind} '{name}': config class {config_class!r} must be a dataclass "
                "(set `config_class` on the component or pass it to add())."
            )
        provider, distribution = self._provider
        if name in self._specs:
            other = self._specs[name]
            raise DuplicateComponentError(
                f"{self.kind} '{name}' is registered twice: by '{other.provider}' "
                f"({other.distribution or 'no distribution'}) and by '{provider}' "
                f"({distribution or 'no distribution'}). Uninstall or block one of them "
                "(APTP_BLOCK_PLUGINS=name)."
            )
        spec = ComponentSpec(self.kind, name, factory, config_class, provider, distribution)
        self._specs[name] = spec
        return spec

    def get(self, name: str) -> ComponentSpec:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(sorted(self._specs)) or "none"
            raise UnknownComponentError(
                f"unknown {self.kind} '{name}'.{did_you_mean(name, self._specs)} "
                f"Known {self.kind} names: {known}. (`aptp list` shows every component.)"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[ComponentSpec]:
        return iter(self._specs[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._specs)


class Registry(Mapping[str, KindRegistry]):
    """Every kind's registry. Get one from :func:`aptp.core.plugins.load_registry`."""

    def __init__(self) -> None:
        self._kinds = {k.name: KindRegistry(k.name, k.base_class()) for k in KIND_TABLE}

    def __getitem__(self, kind: str) -> KindRegistry:
        try:
            return self._kinds[kind]
        except KeyError:
            raise UnknownComponentError(
                f"unknown component kind '{kind}'.{did_you_mean(kind, KINDS)} "
                f"Kinds: {', '.join(KINDS)}."
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._kinds)

    def __len__(self) -> int:
        return len(self._kinds)

    def spec(self, kind: str, name: str) -> ComponentSpec:
        return self[kind].get(name)

    def all_specs(self) -> list[ComponentSpec]:
        return [spec for kind in KINDS for spec in self._kinds[kind]]
