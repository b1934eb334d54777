"""One table of kinds (aptp.core.registry.KIND_TABLE): the hooks, the registries' base classes, the
experiment slots, the CLI and the preset folders all follow it; a kind added in one place only fails here."""

import inspect
from pathlib import Path

from aptp.core import hookspecs
from aptp.core.config import BUILTIN_CONFIG_DIR, SLOTS
from aptp.core.plugins import make_plugin_manager
from aptp.core.registry import HOOKS, KIND_TABLE, KINDS, Registry

ROOT = Path(__file__).resolve().parents[2]


def _register_hookspecs() -> dict[str, object]:
    return {name: f for name, f in vars(hookspecs).items()
            if name.startswith("aptp_register_") and inspect.isfunction(f)}


def test_kind_names_are_unique():
    assert len({k.name for k in KIND_TABLE}) == len(KIND_TABLE)
    assert len({k.slot for k in KIND_TABLE if k.slot}) == sum(1 for k in KIND_TABLE if k.slot)


def test_every_kind_has_its_hookspec_and_every_register_hookspec_a_kind():
    specs = _register_hookspecs()
    assert set(specs) == set(HOOKS.values()), "add the kind to KIND_TABLE and its aptp_register_<plural> hookspec"
    pm = make_plugin_manager()
    for kind in KIND_TABLE:
        assert hasattr(pm.hook, kind.hook)
        # the hookspec documents the base class the registry enforces
        assert f":class:`{kind.base}`" in (specs[kind.hook].__doc__ or ""), kind.hook


def test_registries_use_the_tables_base_classes():
    registry = Registry()
    assert tuple(registry) == KINDS
    for kind in KIND_TABLE:
        assert registry[kind.name].base is kind.base_class()


def test_slots_cli_and_preset_folders_follow_the_table():
    assert SLOTS == {k.slot: (k.name, k.many) for k in KIND_TABLE if k.slot}
    for kind in KIND_TABLE:
        assert (BUILTIN_CONFIG_DIR / kind.name).is_dir(), f"configs/{kind.name}/ holds the {kind.name} presets"
    from aptp.cli import build_parser

    parser = build_parser()
    list_parser = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" list"))
    (kind_arg,) = [a for a in list_parser._actions if a.dest == "kind"]
    assert tuple(kind_arg.choices) == KINDS


def test_the_plugin_guide_names_every_kind():
    text = (ROOT / "docs" / "plugins.md").read_text()
    for kind in KIND_TABLE:
        assert f"`{kind.name}`" in text, f"docs/plugins.md does not name the kind {kind.name}"
