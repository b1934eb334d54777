"""``aptp analyze ROUTER_DIR PROMPTS``: the report on disk, and clear errors for malformed prompt files."""

from __future__ import annotations

import json

import pytest
from analysis_helpers import make_unit_space

from aptp.analysis_cli import main
from aptp.routers.bundle import save_router_bundle
from aptp.routers.kmeans import KMeansRouter, KMeansRouterConfig


@pytest.fixture
def bundle_dir(tmp_path, encoder, topic_embeddings):
    import torch

    r = KMeansRouter(KMeansRouterConfig(num_experts=2))
    r.fit(topic_embeddings)
    space = make_unit_space()
    archs = torch.ones(2, space.size)
    archs[0, :2] = 0
    return save_router_bundle(tmp_path / "router", encoder, r, space, archs)


def _tsv(path, prompts, topics):
    path.write_text("Prompt\tTopic\tNote\n" + "".join(f"{p}\t{t}\t\n" for p, t in zip(prompts, topics)))
    return path


def test_aptp_analyze_writes_the_report(tmp_path, bundle_dir, topic_prompts, capsys):
    """Through the main `aptp` parser (EXTERNAL_COMMANDS wiring), default --out = ROUTER_DIR/analysis."""
    from aptp.cli import main as aptp_main

    prompts, topics = topic_prompts
    tsv = _tsv(tmp_path / "prompts.tsv", prompts, topics)
    assert aptp_main(["analyze", str(bundle_dir), str(tsv), "--label-columns", "topic", "--no-progress",
                      "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "kmeans router, K=2, 32 prompts" in out and "Topic: NMI 1.000" in out
    folder = bundle_dir / "analysis"
    data = json.loads((folder / "analysis.json").read_text())
    assert data["labels"]["Topic"]["nmi"] == pytest.approx(1.0) and "Note" not in data["labels"]
    assert all(len(e["examples"]) == 1 for e in data["experts"])
    assert {"analysis.md", "expert_load.png", "embedding_map.png", "labels_per_expert_Topic.png",
            "kept_macs_per_label_Topic.png"} <= {p.name for p in folder.iterdir()}


def test_plain_prompt_file_without_labels(tmp_path, bundle_dir, topic_prompts, capsys):
    prompts, _ = topic_prompts
    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(prompts) + "\n")
    assert main([str(bundle_dir), str(txt), "--out", str(tmp_path / "rep"), "--max-prompts", "12",
                 "--no-progress"]) == 0
    data = json.loads((tmp_path / "rep" / "analysis.json").read_text())
    assert data["labels"] == {} and data["num_prompts"] == 12 and sum(data["load"]) == 12
    assert "random sample of 12 of the 32" in capsys.readouterr().out


@pytest.mark.parametrize("content,message", [
    (b"Text\tTopic\na boat\tocean\n", "has no 'Prompt' column (columns: ['Text', 'Topic'])"),
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"Prompt\tTopic\n", "has a Prompt column but no prompts"),
    (b"Prompt\na caf\xe9 by the sea\n", "is not UTF-8 text (byte 12: b'\\xe9')"),
])
def test_malformed_prompt_files_give_clear_errors(tmp_path, bundle_dir, content, message, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(content)
    assert main([str(bundle_dir), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aptp analyze: error: ") and message in err and str(bad) in err
    assert not (bundle_dir / "analysis").exists()


def test_other_input_errors(tmp_path, bundle_dir, topic_prompts, capsys):
    prompts, topics = topic_prompts
    tsv = _tsv(tmp_path / "p.tsv", prompts, topics)
    assert main([str(bundle_dir), str(tmp_path / "missing.tsv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(tmp_path / "no_router"), str(tsv)]) == 2
    assert "not a router bundle" in capsys.readouterr().err
    assert main([str(bundle_dir), str(tsv), "--label-columns", "Category,Topic"]) == 2
    err = capsys.readouterr().err
    assert "label column 'Category' is not in the prompt file (columns: Topic, Note)" in err
    assert main([str(bundle_dir), str(tsv), "--examples", "-1"]) == 2
    assert "examples=-1 must be >= 0" in capsys.readouterr().err


def test_help_explains_the_outputs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for text in ("analysis.md", "embedding_map.png", "NMI", "--label-columns", "--max-prompts", "--map",
                 "--examples", "ROUTER_DIR/analysis", "kept-MACs"):
        assert text in out
