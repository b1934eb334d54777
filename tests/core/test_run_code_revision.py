"""A run folder's fingerprint records the code that wrote it (issue 14): aptp's version and, from a git
checkout, the commit and whether it had uncommitted changes. Shown when a folder is refused; not
hashed, so a rerun after a code change alone is not refused."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from aptp import __version__
from aptp.core import rundir
from aptp.core.config import load_experiment
from aptp.core.errors import ConfigError
from aptp.core.rundir import FINGERPRINT_FILE, check_run_folder, code_revision, fingerprint

TINY = ["backbone.resolution=16", "pruner.progress=false"]
OLD_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _config(*overrides: str):
    return load_experiment("smoke", [*TINY, *overrides])


def _folder_made_by(tmp_path, code: dict, *overrides: str):
    folder = tmp_path / "run"
    folder.mkdir()
    fp = {**fingerprint(_config(*overrides)), "code": code}
    (folder / FINGERPRINT_FILE).write_text(json.dumps(fp))
    (folder / "experts").mkdir()
    return folder


def test_fingerprint_records_version_and_commit():
    code = fingerprint(_config())["code"]
    assert code == code_revision()
    assert code["aptp"] == __version__
    repo_head = subprocess.run(["git", "-C", str(rundir.Path(rundir.__file__).parents[1]), "rev-parse", "HEAD"],
                               capture_output=True, text=True)
    if repo_head.returncode == 0:  # this test suite runs from a checkout
        assert code["commit"] == repo_head.stdout.strip() and isinstance(code["dirty"], bool)


def test_code_revision_is_not_part_of_the_hash(monkeypatch):
    base = fingerprint(_config())
    monkeypatch.setattr(rundir, "code_revision", lambda: {"aptp": __version__, "commit": OLD_COMMIT, "dirty": True})
    other = fingerprint(_config())
    assert other["code"]["commit"] == OLD_COMMIT
    assert other["sha256"] == base["sha256"]


def test_rerun_after_a_code_change_is_not_refused(tmp_path):
    folder = _folder_made_by(tmp_path, {"aptp": __version__, "commit": OLD_COMMIT, "dirty": False})
    assert check_run_folder(folder, _config()) == "same"


def test_refusal_names_the_code_of_both_runs(tmp_path, monkeypatch):
    folder = _folder_made_by(tmp_path, {"aptp": "0.0.9", "commit": OLD_COMMIT, "dirty": True})
    monkeypatch.setattr(rundir, "code_revision", lambda: {"aptp": __version__, "commit": "f" * 40, "dirty": False})
    with pytest.raises(ConfigError) as exc:
        check_run_folder(folder, _config("pruner.target_ratio=0.5"))
    message = str(exc.value)
    assert "\n" not in message
    assert "They were made by aptp 0.0.9 at commit 0123456789ab with uncommitted changes" in message
    assert f"this is aptp {__version__} at commit ffffffffffff." in message
    assert "pruner.target_ratio" in message and "--restart" in message


def test_refusal_of_a_fingerprint_without_code(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    fp = fingerprint(_config())
    del fp["code"]  # written before the code revision was recorded
    (folder / FINGERPRINT_FILE).write_text(json.dumps(fp))
    (folder / "phase1.jsonl").write_text("{}\n")  # a result (a folder of metadata alone would be reused)
    assert check_run_folder(folder, _config()) == "same"
    with pytest.raises(ConfigError, match="made by an aptp that recorded no code revision; this is aptp"):
        check_run_folder(folder, _config("seed=3"))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_revision_of_a_checkout_and_of_a_plain_folder(tmp_path):
    revision = rundir._git_revision.__wrapped__  # uncached
    plain = tmp_path / "plain" / "pkg"
    plain.mkdir(parents=True)
    (plain / "__init__.py").write_text("")
    assert revision(plain) == (None, None)

    repo = tmp_path / "repo"
    pkg = repo / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "pkg/__init__.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert revision(pkg) == (head, False)
    (pkg / "__init__.py").write_text("x = 1\n")
    assert revision(pkg) == (head, True)
    untracked = repo / "venv" / "aptp"  # a package installed under a checkout is not its code
    untracked.mkdir(parents=True)
    (untracked / "__init__.py").write_text("")
    assert revision(untracked) == (None, None)
