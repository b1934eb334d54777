"""What README.md and docs/ say about preset discovery and MiniLM embeddings agrees with the code
(issue 14: the docs said plugin presets need --config-dir and that MiniLM embeddings are not
normalised; neither was true)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _text() -> str:
    return "\n".join(" ".join(p.read_text().split()) for p in DOCS if p.is_file())  # lines joined


def test_default_minilm_embeddings_have_unit_norm_and_no_doc_says_otherwise():
    from aptp.routers.encoder import SentenceTransformerEncoder

    z = SentenceTransformerEncoder().encode(["a red circle", "two blue squares on the left of a green star"])
    assert z.norm(dim=-1).sub(1).abs().max() < 1e-5  # the model's own pipeline ends in Normalize
    wrong = re.findall(r"[^.]*\bnot (?:L2[- ])?normali[sz]ed[^.]*\.", _text())
    assert not [s for s in wrong if re.search(r"minilm|embedding", s, re.I)], wrong


def test_docs_give_the_preset_search_order_of_the_code(monkeypatch, tmp_path):
    from aptp.core.config import BUILTIN_CONFIG_DIR, CONFIG_PATH_ENV, config_search_path
    from aptp.core.plugins import plugin_config_dirs

    text = _text()
    assert not re.search(r"plugin presets need `--config-dir`|does not yet discover a plugin's config folder",
                         text, re.I)
    stated = re.search(r"aptp searches (.*?); blocking", text)
    assert stated, "docs/plugins.md states the preset search order"
    order = [p.strip() for p in re.split(r", then ", re.sub(r"\s*\(.*?\)", "", stated.group(1)))]
    assert order == ["`--config-dir` folders", "`$APTP_CONFIG_PATH`", "the plugins' folders", "its own presets"]

    given, env = tmp_path / "given", tmp_path / "env"
    for d in (given, env, tmp_path / "configs"):
        d.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CONFIG_PATH_ENV, str(env))
    path = config_search_path([given])
    plugins = [Path(p).resolve() for p in plugin_config_dirs() if Path(p).is_dir()]
    assert path == [given.resolve(), env.resolve(), *plugins, BUILTIN_CONFIG_DIR.resolve()]
    assert (tmp_path / "configs").resolve() not in path  # "./configs ... only when given as --config-dir"


def test_an_installed_plugins_presets_are_found_without_flags(monkeypatch, tmp_path):
    from aptp.core.config import CONFIG_PATH_ENV, load_experiment

    pytest.importorskip("aptp_timm")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_PATH_ENV, raising=False)
    assert load_experiment("timm_smoke").backbone.name == "timm_dit"
