"""Config -> a :class:`Composition` of built components; save and load it (never pickle).

A saved composition is a folder::

    config.yaml        the resolved experiment config (registered names + parameters)
    manifest.json      aptp's version and the plugin + distribution that provided each component
    state.safetensors  tensors of the stateful components, keys prefixed by their slot
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from aptp.core.config import SLOTS, instantiate_config, validate
from aptp.core.errors import ConfigError, IncompatibleError, UnknownComponentError, reading
from aptp.core.interfaces import (
    Assignment,
    Backbone,
    Balancer,
    Component,
    Granularity,
    Metric,
    PromptEncoder,
    Pruner,
    Router,
)
from aptp.core.registry import ComponentSpec, Registry

FORMAT_VERSION = 1


@dataclass
class Composition:
    """The components an experiment names, built. Slots an experiment leaves out are ``None``."""

    config: DictConfig
    registry: Registry
    backbone: Backbone | None = None
    granularity: list[Granularity] = field(default_factory=list)
    encoder: PromptEncoder | None = None
    balancer: Balancer | None = None
    router: Router | None = None
    assignment: Assignment | None = None
    pruner: Pruner | None = None
    metrics: list[Metric] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.config.get("name", "experiment"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def require(self, slot: str) -> Any:
        """The component in ``slot``, or a ConfigError saying the experiment must name one."""
        value = getattr(self, slot)
        if value is None or value == []:
            kind = SLOTS[slot][0]
            known = ", ".join(self.registry[kind].names())
            article = "an" if slot[0] in "aeiou" else "a"
            raise ConfigError(
                f"experiment '{self.name}' needs {article} '{slot}' (one of: {known}); add it to its "
                f"defaults list or pass {slot}=<preset> on the command line."
            )
        return value

    def items(self) -> Iterator[tuple[str, Component]]:
        """(key, component) for every built component; list slots give keys like 'granularity.0'."""
        for slot, (_, many) in SLOTS.items():
            value = getattr(self, slot)
            if many:
                for i, comp in enumerate(value):
                    yield f"{slot}.{i}", comp
            elif value is not None:
                yield slot, value

    def specs(self) -> dict[str, ComponentSpec]:
        out = {}
        for key, _ in self.items():
            slot, _, index = key.partition(".")
            section = self.config[slot][int(index)] if index else self.config[slot]
            out[key] = self.registry[SLOTS[slot][0]].get(section["name"])
        return out

    # --- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write config, manifest and state atomically (a partial folder is never left behind)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(self.config))
        (tmp / "manifest.json").write_text(json.dumps(self.manifest(), indent=2) + "\n")
        tensors: dict[str, torch.Tensor] = {}
        for key, comp in self.items():
            for name, t in comp.state_tensors().items():
                tensors[f"{key}/{name}"] = t.detach().cpu().contiguous()
        save_file(tensors, str(tmp / "state.safetensors"))
        replace_dir(tmp, directory)
        return directory

    def manifest(self) -> dict[str, Any]:
        from aptp import __version__

        return {
            "format": FORMAT_VERSION,
            "aptp": __version__,
            "components": {
                key: {"name": s.name, "kind": s.kind, "provider": s.provider, "distribution": s.distribution}
                for key, s in self.specs().items()
            },
        }

    @classmethod
    def load(cls, directory: str | Path, registry: Registry | None = None) -> Composition:
        """Rebuild a saved composition with the installed plugins and restore its tensors."""
        from aptp.core.plugins import default_registry

        directory = Path(directory)
        for fname in ("config.yaml", "manifest.json", "state.safetensors"):
            if not (directory / fname).is_file():
                raise FileNotFoundError(
                    f"{directory} is not a saved aptp composition: {fname} is missing "
                    "(save one with Composition.save)."
                )
        registry = registry or default_registry()
        with reading(directory, "saved composition", "save it again with Composition.save."):
            manifest = json.loads((directory / "manifest.json").read_text())
            if not isinstance(manifest, dict):
                raise ValueError(f"manifest.json holds a {type(manifest).__name__}, not an object")
            if manifest.get("format") != FORMAT_VERSION:
                raise IncompatibleError(
                    f"{directory} has format {manifest.get('format')}, this aptp reads format {FORMAT_VERSION}."
                )
            for key, info in manifest["components"].items():
                kind = info["kind"]
                if info["name"] not in registry[kind]:
                    raise UnknownComponentError(
                        f"{directory} uses {kind} '{info['name']}' from plugin '{info['provider']}' "
                        f"({info['distribution'] or 'no distribution'}), which is not installed or is blocked. "
                        "Install that plugin to load it."
                    )
            config = validate(OmegaConf.load(directory / "config.yaml"), registry, str(directory))
            comp = build(config, registry)
            state = load_file(str(directory / "state.safetensors"))
            for key, component in comp.items():
                prefix = f"{key}/"
                own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                component.load_state_tensors(own)
        return comp


def build(config: DictConfig, registry: Registry | None = None) -> Composition:
    """Build every component a validated config names (seeded with ``config.seed``)."""
    from aptp.core.plugins import default_registry

    registry = registry or default_registry()
    torch.manual_seed(int(config.get("seed", 0)))
    built: dict[str, Any] = {}
    for slot, (kind, many) in SLOTS.items():
        if slot not in config or config[slot] is None:
            continue
        sections = list(config[slot]) if many else [config[slot]]
        comps = []
        for section in sections:
            spec = registry[kind].get(str(section["name"]))
            comps.append(spec.build(instantiate_config(spec, section)))
        built[slot] = comps if many else comps[0]
    return Composition(config=config, registry=registry, **built)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing ``dst`` as atomically as the filesystem allows."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
