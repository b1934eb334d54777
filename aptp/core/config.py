"""Experiment configs: YAML files of registered component names plus parameters.

An experiment composes one preset per *slot* from ``configs/<kind>/<preset>.yaml`` through a
``defaults`` list, then overrides values::

    # configs/experiment/demo.yaml
    defaults:
      - backbone: tiny
      - granularity: both        # a list of granularities
      - router: ot
    name: demo
    router:
      num_experts: 4

Command-line overrides are ``slot=preset`` (choose another preset: ``router=kmeans``) or
``dotted.key=value`` (``router.num_experts=8``). Every component section is validated against the
registered component's config dataclass; there are no import paths, so a config cannot run code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from aptp.core.errors import ConfigError, did_you_mean
from aptp.core.registry import KIND_TABLE, ComponentSpec, Registry

#: slot in an experiment -> (component kind, whether the slot holds a list of components), from the
#: one table of kinds (:data:`aptp.core.registry.KIND_TABLE`)
SLOTS: dict[str, tuple[str, bool]] = {k.slot: (k.name, k.many) for k in KIND_TABLE if k.slot is not None}
CONFIG_PATH_ENV = "APTP_CONFIG_PATH"
#: aptp's own presets (``configs/`` of the source tree)
BUILTIN_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class ExperimentSettings:
    """Top-level keys of an experiment besides the component slots."""

    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs/${name}"
    device: str = "cpu"

    def __post_init__(self) -> None:
        from aptp.core import values

        values.device("device", self.device)


def config_search_path(extra: Sequence[str | Path] = ()) -> list[Path]:
    """Folders searched for ``<kind>/<preset>.yaml``, first match wins: ``extra`` (``--config-dir``),
    the folders in ``$APTP_CONFIG_PATH`` (``os.pathsep``-separated), the plugins' preset folders
    (hook ``aptp_config_dirs``), then aptp's own presets.

    A ``./configs`` folder in the current working directory is **not** searched unless it is given
    explicitly (``--config-dir configs`` or ``$APTP_CONFIG_PATH``): a folder that happens to lie where
    aptp is run would otherwise silently replace built-in presets (``smoke``, ``ot``, ...) and change
    what a command means depending on where it is typed (``aptp compare`` / ``ablate`` take no
    ``--config-dir``: ``$APTP_CONFIG_PATH`` is their explicit path). :func:`find_preset` warns once when such a
    folder holds a preset of the name it resolved elsewhere, and its "no preset" error names a
    preset found only there, with the flag that uses it."""
    from aptp.core.plugins import plugin_config_dirs

    paths = [Path(p) for p in extra]
    paths += [Path(p) for p in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if p]
    paths += [Path(p) for p in plugin_config_dirs()]
    paths.append(BUILTIN_CONFIG_DIR)
    seen, out = set(), []
    for p in paths:
        rp = p.resolve()
        if rp not in seen and rp.is_dir():
            seen.add(rp)
            out.append(rp)
    return out


def list_presets(kind_dir: str, search_path: Sequence[Path]) -> list[str]:
    names = set()
    for root in search_path:
        names.update(p.stem for p in (root / kind_dir).glob("*.yaml"))
    return sorted(names)


def check_name(value: Any, what: str) -> str:
    """``value`` if it is a plain name (a run, a comparison cell, a preset), else a ConfigError: a
    name becomes one path component, so a separator or ``..`` would let it escape its folder."""
    name = str(value)
    if not name or name in (".", "..") or any(c in name for c in ("/", "\\", "\0")):
        raise ConfigError(
            f"{what} {name!r} is not a name: use letters, digits, '-', '_' or '.', without a path separator "
            "or '..' (it becomes a single folder or file name)."
        )
    return name


def find_preset(kind_dir: str, preset: str, search_path: Sequence[Path]) -> Path:
    """The first ``<root>/<kind_dir>/<preset>.yaml`` over ``search_path`` (see
    :func:`config_search_path`); a ConfigError listing the known presets if there is none."""
    check_name(preset, f"{kind_dir} preset")
    for root in search_path:
        path = root / kind_dir / f"{preset}.yaml"
        if path.is_file():
            _warn_ignored_local_preset(kind_dir, preset, path, search_path)
            return path
    known = list_presets(kind_dir, search_path)
    local = _unsearched_local_preset(kind_dir, preset, search_path)
    hint = (f" {local} is not searched: ./configs is used only when given explicitly; pass --config-dir "
            f"configs (or set {CONFIG_PATH_ENV}=configs) to use it." if local else "")
    raise ConfigError(
        f"no preset '{preset}' for '{kind_dir}'.{did_you_mean(preset, known)}{hint} "
        f"Known presets: {', '.join(known) or 'none'} (searched {', '.join(map(str, search_path))})."
    )


_warned_local_presets: set[Path] = set()


def _unsearched_local_preset(kind_dir: str, preset: str, search_path: Sequence[Path]) -> Path | None:
    """``./configs/<kind_dir>/<preset>.yaml`` if it exists and its folder is not on ``search_path``."""
    local_root = Path.cwd() / "configs"
    local = local_root / kind_dir / f"{preset}.yaml"
    if not local.is_file() or local_root.resolve() in {Path(p).resolve() for p in search_path}:
        return None
    return local


def _warn_ignored_local_preset(kind_dir: str, preset: str, used: Path, search_path: Sequence[Path]) -> None:
    """Warn (once per file) that a preset of the same name in an unsearched ``./configs`` is ignored."""
    local = _unsearched_local_preset(kind_dir, preset, search_path)
    if local is None or local.resolve() == used.resolve() or local.resolve() in _warned_local_presets:
        return
    _warned_local_presets.add(local.resolve())
    warnings.warn(
        f"{local} is ignored ({kind_dir} preset '{preset}' comes from {used}): ./configs is searched only "
        f"when given explicitly; pass --config-dir configs (or set {CONFIG_PATH_ENV}=configs) to use it.",
        stacklevel=3,
    )


def _load_yaml(path: Path) -> DictConfig | ListConfig:
    try:
        return OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist.") from None
    except Exception as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None


def _parse_overrides(overrides: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    choices, values = {}, []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. router=kmeans, router.num_experts=4).")
        key, value = item.split("=", 1)
        _refuse_env_interpolation(value, key, "override")
        if key in SLOTS and not value.startswith(("{", "[")):
            choices[key] = value
        else:
            values.append(item)
    return choices, values


def load_experiment(
    experiment: str | Path,
    overrides: Sequence[str] = (),
    registry: Registry | None = None,
    search_path: Sequence[str | Path] = (),
) -> DictConfig:
    """Compose, override and validate an experiment; return the resolved config.

    ``experiment`` is a YAML path or the name of a file under ``configs/experiment/``.
    """
    paths = config_search_path(search_path)
    path = Path(experiment)
    if not path.suffix:
        path = find_preset("experiment", str(experiment), paths)
    raw = _load_yaml(path)
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"experiment {path} must be a mapping, got a {type(raw).__name__}.")
    return compose(raw, overrides, registry, paths, source=str(path))


def compose(
    raw: DictConfig | dict,
    overrides: Sequence[str] = (),
    registry: Registry | None = None,
    search_path: Sequence[Path] | None = None,
    source: str = "<config>",
) -> DictConfig:
    """Resolve a ``defaults`` list, apply overrides and validate (see :func:`load_experiment`)."""
    from aptp.core.plugins import default_registry

    registry = registry or default_registry()
    paths = config_search_path() if search_path is None else list(search_path)
    raw = OmegaConf.create(raw) if not isinstance(raw, DictConfig) else raw.copy()
    choices, values = _parse_overrides(overrides)

    defaults = raw.pop("defaults", []) or []
    selected: dict[str, str] = {}
    for entry in defaults:
        if not isinstance(entry, DictConfig) or len(entry) != 1:
            raise ConfigError(f"{source}: each defaults entry must be 'slot: preset', got {entry!r}.")
        (slot, preset), = entry.items()
        _check_slot(slot, source)
        selected[str(slot)] = str(preset)
    for slot, preset in choices.items():
        selected[slot] = preset

    composed = OmegaConf.create({})
    for slot, preset in selected.items():
        composed[slot] = _load_yaml(find_preset(SLOTS[slot][0], preset, paths))
    for slot in choices:  # the experiment tuned another component for this slot: keep what still applies
        _drop_foreign_keys(raw, composed, slot, registry, source)
    try:
        composed = OmegaConf.merge(composed, raw)
        for item in values:  # one by one: a dotted key may index into a list slot (granularity.1.x=2)
            key, _ = item.split("=", 1)
            value = OmegaConf.from_dotlist([item.replace(key, "value", 1)]).value
            OmegaConf.update(composed, key, value, merge=True, force_add=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: cannot apply overrides {list(values)}: {exc}") from None
    return validate(composed, registry, source)


def _drop_foreign_keys(raw: DictConfig, composed: DictConfig, slot: str, registry: Registry, source: str) -> None:
    """Remove from the experiment's ``slot`` section the keys the command-line preset's component
    does not take (e.g. ``router.num_experts`` after ``router=single``), with a warning."""
    section, preset = raw.get(slot), composed.get(slot)
    if not isinstance(section, DictConfig) or not isinstance(preset, DictConfig) or "name" not in preset:
        return
    if "name" in section:  # the experiment names its own component: nothing to reconcile
        return
    kind = SLOTS[slot][0]
    fields = {f.name for f in dataclasses.fields(registry[kind].get(str(preset.name)).config_class)}
    foreign = [str(k) for k in section if k not in fields]
    if foreign:
        warnings.warn(
            f"{source}: {', '.join(f'{slot}.{k}' for k in foreign)} ignored: {kind} '{preset.name}' (chosen "
            "on the command line) has no such parameter.", stacklevel=3,
        )
    for key in foreign:
        del section[key]


def _check_slot(slot: Any, source: str) -> None:
    if slot not in SLOTS:
        raise ConfigError(
            f"{source}: unknown slot '{slot}'.{did_you_mean(str(slot), SLOTS)} Slots: {', '.join(SLOTS)}."
        )


def validate(cfg: DictConfig, registry: Registry, source: str = "<config>") -> DictConfig:
    """Check every key and value; return a new config with each component's defaults filled in."""
    settings_keys = {f.name for f in dataclasses.fields(ExperimentSettings)}
    for key in cfg:
        if key not in SLOTS and key not in settings_keys:
            known = sorted(set(SLOTS) | settings_keys)
            raise ConfigError(f"{source}: unknown key '{key}'.{did_you_mean(str(key), known)} Known keys: {', '.join(known)}.")
    settings = {k: cfg[k] for k in settings_keys if k in cfg}
    out: dict[str, Any] = _to_plain(ExperimentSettings, settings, "experiment settings", source)
    for slot, (kind, many) in SLOTS.items():
        if slot not in cfg or cfg[slot] is None:
            continue
        node = cfg[slot]
        if many:
            items = list(node) if isinstance(node, ListConfig) else [node]
            out[slot] = [_validate_component(registry, kind, it, f"{slot}[{i}]", source) for i, it in enumerate(items)]
        else:
            out[slot] = _validate_component(registry, kind, node, slot, source)
    _refuse_env_interpolation(out, "", source)
    resolved = OmegaConf.create(out)
    try:
        OmegaConf.resolve(resolved)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: cannot resolve interpolations: {exc}") from None
    check_name(resolved.name, f"{source}: experiment name")
    _check_experts_fit_samples(resolved, source)
    return resolved


def _check_experts_fit_samples(cfg: DictConfig, source: str) -> None:
    """A ConfigError when ``router.num_experts`` exceeds ``pruner.data.num_samples`` (the training
    prompts, at most that many; 0 = all): some expert could get no prompt of its own, yet the run
    would succeed. Checked before anything runs; the pruners and the fitted routers check the
    *distinct* prompts again once they hold them (``aptp.routers._checks.check_enough_prompts``)."""
    router, pruner = cfg.get("router"), cfg.get("pruner")
    k = router.get("num_experts") if isinstance(router, DictConfig) else None
    data = pruner.get("data") if isinstance(pruner, DictConfig) else None
    n = data.get("num_samples") if isinstance(data, DictConfig) else None
    if isinstance(k, int) and isinstance(n, int) and 0 < n < k:
        raise ConfigError(
            f"{source}: router.num_experts={k} is more than the {n} training prompts (pruner.data.num_samples="
            f"{n}): every expert needs prompts of its own; lower router.num_experts to <= {n} or raise "
            "pruner.data.num_samples."
        )


_ENV_INTERPOLATION = re.compile(r"\$\{\s*(oc\.env|env)\s*:")


def _refuse_env_interpolation(node: Any, where: str, source: str) -> None:
    """A ConfigError for any ``${oc.env:...}``: a resolved config is saved with every run
    (``config.yaml``), which would copy the environment variable's value into it."""
    if isinstance(node, dict):
        for key, value in node.items():
            _refuse_env_interpolation(value, f"{where}.{key}" if where else str(key), source)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _refuse_env_interpolation(value, f"{where}.{i}", source)
    elif isinstance(node, str) and _ENV_INTERPOLATION.search(node):
        raise ConfigError(
            f"{source}: {where}={node!r} reads an environment variable; aptp does not interpolate the "
            "environment into configs (the resolved config is saved with the run). Write the value itself, "
            "e.g. as a command-line override."
        )


def _validate_component(registry: Registry, kind: str, node: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(node, DictConfig) or "name" not in node:
        raise ConfigError(f"{source}: '{where}' must be a mapping with a 'name' (a registered {kind}), got {node!r}.")
    params = OmegaConf.to_container(node, resolve=False)
    name = params.pop("name")
    spec = registry[kind].get(str(name))
    plain = _to_plain(spec.config_class, params, f"{kind} '{name}'", f"{source}: {where}")
    return {"name": str(name), **plain}


def _to_plain(config_class: type, params: dict, what: str, where: str) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(config_class)}
    for key in params:
        if key not in fields:
            raise ConfigError(
                f"{where}: {what} has no parameter '{key}'.{did_you_mean(str(key), fields)} "
                f"Its parameters: {', '.join(sorted(fields)) or 'none'}."
            )
    try:
        structured = OmegaConf.merge(OmegaConf.structured(config_class), params)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        msg = getattr(exc, "msg", None) or str(exc)
        raise ConfigError(f"{where}: bad value for {what}{f' key {key!r}' if key else ''}: {msg}") from None
    try:  # run the dataclass's own checks (__post_init__) now, not at build time
        OmegaConf.to_object(structured)
    except InterpolationResolutionError:
        pass  # refers to keys outside this section; checked again when the component is built
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: bad value for {what}: {exc}") from None
    return OmegaConf.to_container(structured, resolve=False)


def instantiate_config(spec: ComponentSpec, section: dict[str, Any] | DictConfig) -> Any:
    """The config dataclass of ``spec`` from a validated section (its ``name`` key is ignored)."""
    params = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    params.pop("name", None)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(spec.config_class), params))
    except OmegaConfBaseException as exc:
        msg = " ".join(str(getattr(exc, "msg", None) or exc).split())
        raise ConfigError(f"{spec.kind} '{spec.name}': {msg}") from None
    except (ValueError, TypeError) as exc:  # raised by a config's __post_init__ checks
        raise ConfigError(f"{spec.kind} '{spec.name}': {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain data (what a saved component stores)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
