import subprocess
import sys

import pytest

from aptp.cli import build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"list", "config", "run"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert f"aptp {name}" in out and len(out) > 100


def test_list_names_components_with_their_distribution(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind in ("backbone", "granularity", "router", "balancer", "encoder", "pruner"):
        assert out.count(f"\n{kind} (") + out.startswith(f"{kind} (") == 1, kind
    assert "aptp 0.1.0" in out


def test_config_errors_are_one_clear_line(capsys, tmp_path):
    assert main(["config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aptp config: error:") and "does not exist" in err


def test_module_entry_point_prints_the_version():
    out = subprocess.run([sys.executable, "-m", "aptp.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("aptp ")


def test_overrides_and_prompts_may_follow_flags(capsys, tmp_path):
    from aptp.cli import main

    assert main(["config", "smoke", "--config-dir", "configs", "router.num_experts=3"]) == 0
    assert "num_experts: 3" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # an unknown flag is still an error, also among overrides
        main(["config", "smoke", "router.num_experts=3", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
