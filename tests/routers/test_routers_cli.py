"""``aptp route`` on a saved bundle prints each prompt's expert and kept-MACs ratio."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from routing_helpers import PROMPTS, make_unit_space

from aptp.routers.bundle import save_router_bundle
from aptp.routers.cli_route import add_parser, main
from aptp.routers.kmeans import KMeansRouter, KMeansRouterConfig


@pytest.fixture
def bundle_dir(tmp_path, encoder, embeddings):
    r = KMeansRouter(KMeansRouterConfig(num_experts=3))
    r.fit(embeddings)
    space = make_unit_space()
    archs = torch.ones(3, space.size)
    archs[1, :8] = 0  # expert 1 drops the first group: 80 of 1000 MACs
    return save_router_bundle(tmp_path / "router", encoder, r, unit_space=space, architectures=archs), r


def test_route_prints_experts_and_kept_ratios(bundle_dir, encoder, capsys, tmp_path):
    path, router = bundle_dir
    f = tmp_path / "p.txt"
    f.write_text("\n".join(PROMPTS[3:]) + "\n")
    assert main([str(path), *PROMPTS[:3], "--file", str(f), "--no-progress"]) == 0
    out = capsys.readouterr().out
    expected = router.route(encoder.encode(PROMPTS)).expert_ids.tolist()
    ratios = {0: "1.000", 1: "0.920", 2: "1.000"}
    lines = [ln for ln in out.splitlines() if ln.strip() and ln.split()[0].isdigit()][: len(PROMPTS)]
    for i, (line, k) in enumerate(zip(lines, expected)):
        idx, expert, kept, *prompt = line.split()
        assert (int(idx), int(expert), kept, " ".join(prompt)) == (i, k, ratios[k], PROMPTS[i])


def test_route_json_and_wired_parser(bundle_dir, capsys):
    path, _ = bundle_dir
    parser = argparse.ArgumentParser(prog="aptp")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["route", str(path), "a cat", "--json"])
    assert args.func(args) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert set(row) == {"index", "expert", "kept_macs_ratio", "prompt"} and row["prompt"] == "a cat"


def test_route_errors_are_clear(tmp_path, bundle_dir, capsys):
    path, _ = bundle_dir
    assert main([str(tmp_path / "nope"), "a cat"]) == 2
    assert "not a router bundle" in capsys.readouterr().err
    assert main([str(path)]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main([str(path), "--file", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_describes_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "kept-MACs ratio" in capsys.readouterr().out


def test_installed_aptp_route_command(bundle_dir):
    """The `aptp route` entry point (wired by aptp/cli.py) on a saved bundle."""
    import subprocess
    import sys
    from pathlib import Path

    path, _ = bundle_dir
    exe = Path(sys.executable).with_name("aptp")
    if not exe.exists():
        pytest.skip("the aptp console script is not installed next to this interpreter")
    proc = subprocess.run([str(exe), "route", str(path), "a red cube", "--summary"], capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split() == ["expert", "prompts", "kept"]
    assert sum(int(line.split()[1]) for line in proc.stdout.splitlines()[1:]) == 1
