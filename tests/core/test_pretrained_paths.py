"""``backbone.pretrained`` (issue 14): an existing local folder always wins over a hub id of the same
spelling, and a value that looks like a path but names no folder is a ConfigError naming it, never a
hub lookup (which would wait on the network and end in a misleading "no file named config.json")."""

from __future__ import annotations

import pytest
import torch

from aptp.backbones.transformer import DiTBackbone, DiTBackboneConfig
from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig, local_pretrained
from aptp.core.errors import ConfigError


@pytest.fixture
def tiny_folder(tmp_path, monkeypatch):
    """cwd = tmp_path holding ``models/base`` (a saved tiny UNet + scheduler); HOME = tmp_path/home."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = UNetBackbone(UNetBackboneConfig(preset="tiny", seed=5))
    unet = tiny.build_denoiser()
    unet.save_pretrained(tmp_path / "models" / "base" / "unet")
    tiny._scheduler().save_pretrained(tmp_path / "models" / "base" / "scheduler")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "base").symlink_to(tmp_path / "models" / "base")
    return unet


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("value", ["models/base", "./models/base", "~/base"])
def test_existing_local_folder_wins(value, tiny_folder, tmp_path):
    """``models/base`` has one ``/`` like a hub id ``org/name``: it is the local folder, as are ./ and ~."""
    bb = UNetBackbone(UNetBackboneConfig(preset="tiny", pretrained=value, text_encoder="none", vae=None))
    assert bb._local() is not None and bb._local().resolve() == (tmp_path / "models" / "base").resolve()
    assert _same(bb.build_denoiser(), tiny_folder)  # seed 5's weights, from the folder
    assert bb.conditioning().sample_shape == (4, 32, 32)


@pytest.mark.parametrize("value", ["./models/missing", "../missing/model", "/no/such/model", "~/missing",
                                   "models/base/unet/config.json"])
def test_local_looking_path_that_is_no_folder_is_a_config_error(value, tiny_folder):
    bb = UNetBackbone(UNetBackboneConfig(preset="tiny", pretrained=value, text_encoder="none", vae=None))
    with pytest.raises(ConfigError) as exc:
        bb.conditioning()
    message = str(exc.value)
    assert f"pretrained={value!r} is not a folder" in message and "\n" not in message
    assert ("it is a file" if value.endswith(".json") else "no folder or file exists at") in message


def test_hub_id_that_is_no_local_folder_is_left_to_the_hub(tiny_folder):
    assert local_pretrained("org/name") is None
    assert local_pretrained(None) is None
    with pytest.raises(ConfigError, match="'org/name' is not a folder"):
        local_pretrained("org/name", hub=False)


@pytest.mark.parametrize("value", ["~/base", "models/base"])
def test_transformer_backbone_takes_the_same_local_folders(value, tiny_folder, tmp_path):
    tiny = DiTBackbone(DiTBackboneConfig(preset="tiny"))
    tiny.build_denoiser().save_pretrained(tmp_path / "models" / "base" / "transformer")
    bb = DiTBackbone(DiTBackboneConfig(preset="tiny", pretrained=value, text_encoder="none", vae=None))
    assert bb._transformer_dir().resolve() == (tmp_path / "models" / "base" / "transformer").resolve()
    with pytest.raises(ConfigError, match=r"pretrained='\./nope' is not a folder \(no folder or file exists at /"):
        DiTBackbone(DiTBackboneConfig(preset="tiny", pretrained="./nope")).conditioning()
