import pytest
from omegaconf import OmegaConf

from aptp.core.build import Composition, build
from aptp.core.config import compose, load_experiment
from aptp.core.errors import ConfigError, UnknownComponentError


def load(preset_dir, registry, overrides=()):
    return load_experiment("exp", overrides, registry=registry, search_path=[preset_dir])


def test_defaults_list_and_body_compose(preset_dir, adhoc_registry):
    cfg = load(preset_dir, adhoc_registry)
    assert cfg.router == {"name": "projection", "num_experts": 3, "dim": 6}
    assert cfg.name == "exp" and cfg.seed == 3 and cfg.output_dir == "runs/exp"


def test_overrides_choose_presets_and_set_values(preset_dir, adhoc_registry):
    cfg = load(preset_dir, adhoc_registry, ["router=proj5", "router.num_experts=7", "seed=9"])
    assert cfg.router.num_experts == 7 and cfg.router.dim == 6 and cfg.seed == 9


def test_unknown_component_key_names_key_and_component(preset_dir, adhoc_registry):
    with pytest.raises(ConfigError, match=r"router 'projection' has no parameter 'num_expert'.*Did you mean 'num_experts'"):
        load(preset_dir, adhoc_registry, ["router.num_expert=4"])


def test_wrong_value_type(preset_dir, adhoc_registry):
    with pytest.raises(ConfigError, match=r"router.*num_experts"):
        load(preset_dir, adhoc_registry, ["router.num_experts=many"])


def test_bad_value_caught_by_dataclass_checks(preset_dir, adhoc_registry):
    with pytest.raises(ConfigError, match="num_experts must be >= 1, got 0"):
        load(preset_dir, adhoc_registry, ["router.num_experts=0"])


def test_unknown_component_name(preset_dir, adhoc_registry):
    (preset_dir / "router" / "typo.yaml").write_text("name: projektion\n")
    with pytest.raises(UnknownComponentError, match="Did you mean 'projection'"):
        load(preset_dir, adhoc_registry, ["router=typo"])


def test_unknown_preset_and_slot_and_top_level_key(preset_dir, adhoc_registry):
    with pytest.raises(ConfigError, match="no preset 'proj4'.*Did you mean"):
        load(preset_dir, adhoc_registry, ["router=proj4"])
    with pytest.raises(ConfigError, match="unknown key 'sed'.*Did you mean 'seed'"):
        load(preset_dir, adhoc_registry, ["sed=1"])
    with pytest.raises(ConfigError, match="unknown slot 'routr'"):
        compose({"defaults": [{"routr": "proj3"}]}, registry=adhoc_registry, search_path=[preset_dir])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load(preset_dir, adhoc_registry, ["router"])


def test_missing_and_malformed_files(tmp_path, adhoc_registry):
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "nope.yaml", registry=adhoc_registry)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(bad, registry=adhoc_registry)


def test_no_import_paths_can_run(preset_dir, adhoc_registry):
    (preset_dir / "router" / "evil.yaml").write_text("_target_: os.system\nname: projection\n")
    with pytest.raises(ConfigError, match="no parameter '_target_'"):
        load(preset_dir, adhoc_registry, ["router=evil"])


def test_build_save_load_roundtrip(preset_dir, adhoc_registry, tmp_path):
    cfg = load(preset_dir, adhoc_registry)
    comp = build(cfg, adhoc_registry)
    again = build(cfg, adhoc_registry)
    assert comp.router.num_experts == 3 and comp.backbone is None
    assert (comp.router.proj == again.router.proj).all(), "build must be deterministic under the seed"
    out = comp.save(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "manifest.json", "state.safetensors"]
    loaded = Composition.load(out, adhoc_registry)
    assert (loaded.router.proj == comp.router.proj).all()
    assert OmegaConf.to_container(loaded.config) == OmegaConf.to_container(cfg)
    assert loaded.manifest()["components"]["router"]["provider"] == "adhoc"


def test_load_names_a_missing_plugin(preset_dir, adhoc_registry, tmp_path):
    from aptp.core.plugins import load_registry

    comp = build(load(preset_dir, adhoc_registry), adhoc_registry)
    out = comp.save(tmp_path / "saved")
    with pytest.raises(UnknownComponentError, match="plugin 'adhoc'.*not installed or is blocked"):
        Composition.load(out, load_registry())
    with pytest.raises(FileNotFoundError, match="state.safetensors is missing"):
        (out / "state.safetensors").unlink()
        Composition.load(out, adhoc_registry)


def test_require_names_the_missing_slot(preset_dir, adhoc_registry):
    comp = build(load(preset_dir, adhoc_registry), adhoc_registry)
    with pytest.raises(ConfigError, match="needs a 'pruner'"):
        comp.require("pruner")


def test_swapping_a_slot_drops_settings_the_new_component_lacks(preset_dir, adhoc_registry):
    from dataclasses import dataclass

    from aptp.core.hookspecs import hookimpl
    from aptp.core.interfaces import Router
    from aptp.core.plugins import load_registry

    @dataclass
    class OneConfig:
        num_experts: int = 1

    class One(Router):
        """K = 1."""

        config_class = OneConfig

        @property
        def num_experts(self):
            return 1

        def scores(self, z):
            return z[:, :1]

    class Plugin:
        __name__ = "one"

        @hookimpl
        def aptp_register_routers(self, registry):
            registry.add("one", One)

    from adhoc_plugin import AdHocPlugin

    registry = load_registry(extra_plugins=[AdHocPlugin(), Plugin()])
    (preset_dir / "router" / "one.yaml").write_text("name: one\n")
    with pytest.warns(UserWarning, match="router.dim ignored"):
        cfg = load(preset_dir, registry, ["router=one"])
    assert dict(cfg.router) == {"name": "one", "num_experts": 1}


def test_override_inside_a_list_slot(tmp_path, adhoc_registry):
    from aptp.core.config import compose

    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "p.yaml").write_text("name: projection\n")
    raw = {"defaults": [{"router": "p"}], "metrics": []}
    cfg = compose(raw, ["router.dim=5"], registry=adhoc_registry, search_path=[tmp_path])
    assert cfg.router.dim == 5
    with pytest.raises(ConfigError, match="cannot apply overrides.*metrics.3"):
        compose(raw, ["metrics.3.name=x"], registry=adhoc_registry, search_path=[tmp_path])


def test_override_indexes_into_granularity_list():
    cfg = load_experiment("smoke", ["granularity.2.num_units=8"])
    assert [g.get("num_units") for g in cfg.granularity if g.name == "ffn"] == [8]
