import pytest

from aptp.core.errors import DuplicateComponentError, PluginError, UnknownComponentError
from aptp.core.hookspecs import hookimpl
from aptp.core.plugins import BLOCK_ENV, default_registry, load_registry, make_plugin_manager
from aptp.core.registry import KIND_TABLE

from adhoc_plugin import AdHocPlugin, ProjectionRouter


def test_builtins_come_from_aptp_entry_points():
    pm = make_plugin_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"aptp.backbones", "aptp.pruners", "aptp.routers", "aptp.metrics"} <= names
    dists = {dist.project_name for _, dist in pm.list_plugin_distinfo()}
    assert "aptp" in dists
    builtins = [s for s in default_registry().all_specs() if s.provider.startswith("aptp.")]
    assert len(builtins) >= 20
    for spec in builtins:  # built-ins: registered by aptp's own entry points, attributed to the aptp distribution
        assert spec.distribution and spec.distribution.startswith("aptp "), spec


def test_adhoc_plugin_adds_a_router(adhoc_registry):
    spec = adhoc_registry["router"].get("projection")
    assert spec.factory is ProjectionRouter and spec.provider == "adhoc" and spec.distribution is None
    router = spec.build()
    assert router.num_experts == 3


def test_blocking_a_plugin_removes_its_components(monkeypatch):
    assert "projection" not in load_registry(block=["adhoc"], extra_plugins=[AdHocPlugin()])["router"]
    monkeypatch.setenv(BLOCK_ENV, "adhoc, something-else")
    assert "projection" not in load_registry(extra_plugins=[AdHocPlugin()])["router"]
    monkeypatch.setenv(BLOCK_ENV, "aptp.routers")
    blocked = load_registry()
    assert len(blocked["router"]) == 0 and len(blocked["balancer"]) == 0
    monkeypatch.delenv(BLOCK_ENV)
    assert len(load_registry()["router"]) == len(default_registry()["router"])


def test_blocking_keeps_other_plugins(monkeypatch):
    full = load_registry()
    monkeypatch.setenv(BLOCK_ENV, "aptp.routers")
    partial = load_registry()
    for kind in ("backbone", "granularity", "pruner", "metric"):
        assert partial[kind].names() == full[kind].names()


def test_misspelled_hook_fails_loudly():
    class Typo:
        __name__ = "typo"

        @hookimpl
        def aptp_register_router(self, registry):  # missing 's'
            pass

    with pytest.raises(PluginError, match="aptp_register_router.*aptp_register_routers"):
        make_plugin_manager(extra_plugins=[Typo()])


def test_duplicate_name_names_both_providers():
    class Intruder:
        __name__ = "intruder"

        @hookimpl
        def aptp_register_routers(self, registry):
            registry.add("projection", ProjectionRouter)

    with pytest.raises(DuplicateComponentError, match="'adhoc'.*'intruder'"):
        load_registry(extra_plugins=[AdHocPlugin(), Intruder()])


def test_unknown_name_lists_known_and_suggests(adhoc_registry):
    with pytest.raises(UnknownComponentError, match="Did you mean 'projection'.*Known router names:.*projection"):
        adhoc_registry["router"].get("projektion")
    with pytest.raises(UnknownComponentError, match="Did you mean 'router'"):
        adhoc_registry["routr"]


def test_registration_rejects_wrong_types():
    class NotARouter:
        config_class = dict

    class Bad:
        __name__ = "bad"

        @hookimpl
        def aptp_register_routers(self, registry):
            registry.add("bad", NotARouter)

    with pytest.raises(TypeError, match="subclass of Router"):
        load_registry(extra_plugins=[Bad()])


def test_every_kind_has_a_hook():
    pm = make_plugin_manager()
    for kind in KIND_TABLE:
        assert hasattr(pm.hook, kind.hook)


def test_plugins_ship_presets_through_aptp_config_dirs(tmp_path, monkeypatch):
    from aptp.core import plugins
    from aptp.core.config import config_search_path, find_preset

    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "shipped.yaml").write_text("name: projection\n")

    class Shipping(AdHocPlugin):
        @hookimpl
        def aptp_config_dirs(self):
            return [str(tmp_path)]

    monkeypatch.setattr(plugins, "make_plugin_manager",
                        lambda block=(), **kw: make_plugin_manager(block, extra_plugins=[Shipping()]))
    plugins._config_dirs.cache_clear()
    try:
        assert find_preset("router", "shipped", config_search_path()) == tmp_path / "router" / "shipped.yaml"
        monkeypatch.setenv(BLOCK_ENV, "adhoc")  # Shipping registers under the AdHocPlugin name
        assert tmp_path not in config_search_path()
    finally:
        plugins._config_dirs.cache_clear()
