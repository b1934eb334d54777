"""Where presets come from (issue 14): aptp's own, the plugins' and explicitly given folders; a
``./configs`` folder where aptp happens to be run does not replace a built-in preset."""

from __future__ import annotations

import warnings

import pytest

from aptp.core import config as config_module
from aptp.core.config import BUILTIN_CONFIG_DIR, CONFIG_PATH_ENV, config_search_path, find_preset, load_experiment
from aptp.core.errors import ConfigError


@pytest.fixture
def local_configs(tmp_path, monkeypatch):
    """A cwd with ``configs/router/ot.yaml`` (a built-in name, other values) and ``configs/router/mine.yaml``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_PATH_ENV, raising=False)
    monkeypatch.setattr(config_module, "_warned_local_presets", set(), raising=False)
    router = tmp_path / "configs" / "router"
    router.mkdir(parents=True)
    (router / "ot.yaml").write_text("name: ot\nnum_experts: 7\ntau: 0.9\n")
    (router / "mine.yaml").write_text("name: kmeans\nnum_experts: 3\n")
    return tmp_path / "configs"


def test_cwd_configs_is_not_on_the_default_search_path(local_configs):
    assert local_configs.resolve() not in config_search_path()
    assert config_search_path()[-1] == BUILTIN_CONFIG_DIR.resolve()


def test_builtin_preset_wins_over_cwd_configs_with_one_warning(local_configs):
    with pytest.warns(UserWarning, match=r"configs/router/ot\.yaml is ignored.*--config-dir configs"):
        cfg = load_experiment("smoke")
    assert cfg.router.tau == 0.4  # the built-in ot.yaml, not ./configs/router/ot.yaml (tau 0.9)
    assert find_preset("router", "ot", config_search_path()) == BUILTIN_CONFIG_DIR.resolve() / "router" / "ot.yaml"
    with warnings.catch_warnings():  # once per file
        warnings.simplefilter("error")
        assert load_experiment("smoke").router.tau == 0.4


def test_config_dir_makes_cwd_configs_win(local_configs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # given explicitly: nothing ignored, no warning
        cfg = load_experiment("smoke", search_path=["configs"])
        assert cfg.router.tau == 0.9
        assert load_experiment("smoke", ["router=mine"], search_path=["configs"]).router.name == "kmeans"


def test_config_path_env_makes_cwd_configs_win(local_configs, monkeypatch):
    monkeypatch.setenv(CONFIG_PATH_ENV, str(local_configs))
    assert load_experiment("smoke").router.tau == 0.9


def test_preset_only_in_cwd_configs_is_refused_with_the_flag_to_use(local_configs):
    with pytest.raises(ConfigError) as exc:
        load_experiment("smoke", ["router=mine"])
    message = str(exc.value)
    assert "no preset 'mine'" in message and "pass --config-dir configs" in message
    assert "\n" not in message


def test_cli_reports_the_local_only_preset_in_one_line(local_configs, capsys):
    from aptp.cli import main

    assert main(["config", "smoke", "router=mine"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--config-dir configs" in err[0]
    assert main(["config", "smoke", "router=mine", "--config-dir", "configs"]) == 0


def test_a_comparison_only_in_cwd_configs_names_the_environment_variable(local_configs, monkeypatch, capsys):
    """``aptp compare`` has no --config-dir: the hint also names $APTP_CONFIG_PATH, which works there."""
    from aptp.cli import main

    (local_configs / "comparison").mkdir()
    (local_configs / "comparison" / "mine.yaml").write_text("name: mine\nbase: smoke\ncells:\n  a: []\n")
    assert main(["compare", "mine"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert f"{CONFIG_PATH_ENV}=configs" in err[-1]
    monkeypatch.setenv(CONFIG_PATH_ENV, "configs")
    assert find_preset("comparison", "mine", config_search_path()) == (local_configs / "comparison" / "mine.yaml").resolve()
