"""A *router bundle*: everything ``aptp route`` needs to send prompts to experts, in one folder.

::

    bundle.json                 format, aptp version, encoder + router (registered name and config), K
    router.safetensors          the router's tensors (Component.state_tensors)
    unit_space.json             the unit space (UnitSpace.to_dict), optional
    architectures.safetensors   the experts' architectures "architectures" (K, U), optional

With a unit space and architectures, routing also reports each expert's kept-MACs ratio. An
``ot`` router carries its own unit space and codes: saving it without them stores its unit space
and its codes' hard architectures. Writes are atomic (a temporary folder, then os.replace).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aptp.core.build import replace_dir
from aptp.core.config import config_to_dict, instantiate_config
from aptp.core.errors import ConfigError, IncompatibleError, UnknownComponentError, reading
from aptp.core.interfaces import LearnedRouter, PromptEncoder, Router, RoutingResult
from aptp.core.registry import Registry
from aptp.core.units import UnitSpace
from aptp.routers._checks import check_prompts
from aptp.routers.ot import check_architectures

BUNDLE_FORMAT = 1
BUNDLE_FILE = "bundle.json"
ROUTER_FILE = "router.safetensors"
UNIT_SPACE_FILE = "unit_space.json"
ARCH_FILE = "architectures.safetensors"


@dataclass
class BundleRouting(RoutingResult):
    """A RoutingResult with the prompts and each expert's kept-MACs ratio (when known)."""

    prompts: list[str] = field(default_factory=list)
    kept_ratios: torch.Tensor | None = None  # (K,) kept MACs / dense MACs per expert

    @property
    def prompt_kept_ratios(self) -> torch.Tensor | None:
        """Kept-MACs ratio of each prompt's expert, (B,)."""
        return None if self.kept_ratios is None else self.kept_ratios[self.expert_ids]


@dataclass
class RouterBundle:
    """A loaded bundle: encoder + router (+ unit space and the experts' architectures)."""

    encoder: PromptEncoder
    router: Router
    unit_space: UnitSpace | None = None
    architectures: torch.Tensor | None = None  # (K, U)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def kept_ratios(self) -> torch.Tensor | None:
        """Kept-MACs ratio of each expert, (K,), or None without unit space and architectures."""
        if self.unit_space is None or self.architectures is None:
            return None
        return self.unit_space.macs_ratio(self.architectures.to(torch.float64)).to(torch.float32)

    def route(self, prompts: Sequence[str], progress: bool | None = None) -> BundleRouting:
        return route_prompts(self, prompts, progress=progress)


def _registered_name(registry: Registry, kind: str, obj: Any) -> str:
    for spec in registry[kind]:
        if spec.factory is type(obj):
            return spec.name
    raise UnknownComponentError(
        f"{type(obj).__qualname__} is not a registered {kind}; register it with the "
        f"aptp_register_{kind}s hook (or an entry point) so a bundle can name it."
    )


def save_router_bundle(directory: str | Path, encoder: PromptEncoder, router: Router,
                       unit_space: UnitSpace | None = None, architectures: torch.Tensor | None = None,
                       registry: Registry | None = None) -> Path:
    """Write a router bundle to ``directory`` atomically; returns the folder."""
    from aptp import __version__
    from aptp.core.plugins import default_registry

    registry = registry or default_registry()
    if isinstance(router, LearnedRouter) and router.bound:
        if unit_space is None:
            unit_space = router.unit_space
        router.unit_space.require_same(unit_space.fingerprint(), "this learned router")
        if architectures is None:
            architectures = router.architectures()
    if architectures is not None:
        if unit_space is None:
            raise ConfigError("architectures need their unit space: pass unit_space=... to save_router_bundle.")
        architectures = check_architectures(torch.as_tensor(architectures).detach().float().cpu(), unit_space,
                                            router.num_experts)
    info = {
        "format": BUNDLE_FORMAT,
        "aptp": __version__,
        "encoder": {"name": _registered_name(registry, "encoder", encoder), **config_to_dict(encoder.config)},
        "router": {"name": _registered_name(registry, "router", router), **config_to_dict(router.config)},
        "num_experts": router.num_experts,
        "unit_space_fingerprint": unit_space.fingerprint() if unit_space is not None else None,
    }
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    (tmp / BUNDLE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    save_file({k: v.detach().cpu().contiguous() for k, v in router.state_tensors().items()}, str(tmp / ROUTER_FILE))
    if unit_space is not None:
        (tmp / UNIT_SPACE_FILE).write_text(json.dumps(unit_space.to_dict()) + "\n")
    if architectures is not None:
        save_file({"architectures": architectures.contiguous()}, str(tmp / ARCH_FILE))
    replace_dir(tmp, directory)
    return directory


def _build(registry: Registry, kind: str, section: dict[str, Any], where: Path) -> Any:
    spec = registry[kind].get(str(section.get("name")))
    try:
        return spec.build(instantiate_config(spec, section))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_router_bundle(directory: str | Path, registry: Registry | None = None) -> RouterBundle:
    """Read a bundle written by :func:`save_router_bundle`; the router is in eval mode."""
    from aptp.core.plugins import default_registry

    directory = Path(directory)
    for fname in (BUNDLE_FILE, ROUTER_FILE):
        if not (directory / fname).is_file():
            raise FileNotFoundError(
                f"{directory} is not a router bundle: {fname} is missing (write one with save_router_bundle)."
            )
    registry = registry or default_registry()
    with reading(directory, "router bundle", "save it again (save_router_bundle, or rerun aptp run with --restart)."):
        registry = registry or default_registry()
        info = json.loads((directory / BUNDLE_FILE).read_text())
        if not isinstance(info, dict):
            raise ValueError(f"{BUNDLE_FILE} holds a {type(info).__name__}, not an object")
        if info.get("format") != BUNDLE_FORMAT:
            raise IncompatibleError(f"{directory} has bundle format {info.get('format')}; this aptp reads {BUNDLE_FORMAT}.")
        encoder = _build(registry, "encoder", info["encoder"], directory)
        router = _build(registry, "router", info["router"], directory)
        router.load_state_tensors(load_file(str(directory / ROUTER_FILE)))
        router.eval()
        unit_space = None
        if (directory / UNIT_SPACE_FILE).is_file():
            unit_space = UnitSpace.from_dict(json.loads((directory / UNIT_SPACE_FILE).read_text()))
            if isinstance(router, LearnedRouter) and router.bound:
                router.unit_space.require_same(unit_space.fingerprint(), f"the router in {directory}")
        architectures = None
        if (directory / ARCH_FILE).is_file():
            if unit_space is None:
                raise IncompatibleError(f"{directory} has architectures but no {UNIT_SPACE_FILE}; re-save the bundle.")
            architectures = check_architectures(load_file(str(directory / ARCH_FILE))["architectures"], unit_space,
                                                router.num_experts)
    return RouterBundle(encoder, router, unit_space, architectures, info)


@torch.no_grad()
def route_prompts(bundle: RouterBundle, prompts: Sequence[str], progress: bool | None = None) -> BundleRouting:
    """Encode ``prompts``, route them (argmax: inference) and attach each expert's kept-MACs ratio."""
    prompts = check_prompts(prompts)
    z = bundle.encoder.encode(prompts, progress=progress) if _takes_progress(bundle.encoder) \
        else bundle.encoder.encode(prompts)  # (B, D)
    result = bundle.router.route(z)
    return BundleRouting(result.expert_ids, result.scores, result.num_experts, prompts=prompts,
                         kept_ratios=bundle.kept_ratios())


def _takes_progress(encoder: PromptEncoder) -> bool:
    import inspect

    return "progress" in inspect.signature(encoder.encode).parameters
