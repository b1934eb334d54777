"""Runs that cannot lie (issue 14): a run folder's fingerprint, its lock, durable checkpoints,
names that stay names, and an import order that does not matter."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from aptp.cli import main as cli_main
from aptp.core.build import build
from aptp.core.checkpoint import latest_checkpoint, remove_stale_temps, save_checkpoint
from aptp.core.config import check_name, config_search_path, find_preset, load_experiment
from aptp.core.errors import ConfigError, RunLockedError
from aptp.core.rundir import (
    FINGERPRINT_FILE,
    LOCK_FILE,
    OWNER_FILE,
    check_run_folder,
    fingerprint,
    lock_run_folder,
    open_run,
)

# The smoke experiment at 16 px: a whole run (phase 1, phase 2, bundle) in a few seconds.
TINY = ["backbone.resolution=16", "pruner.progress=false"]


def _config(*overrides: str):
    return load_experiment("smoke", [*TINY, *overrides])


def _run(out: Path, *overrides: str) -> dict:
    composition = build(_config(*overrides))
    return composition.pruner.run(composition, out)


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` (relative path -> (sha256, mtime_ns))."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    _run(out)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A private copy of the finished run (tests may damage it)."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# ------------------------------------------------------------------------------------------ fingerprint
def test_fingerprint_ignores_reporting_keys_but_not_results():
    base = fingerprint(_config())
    assert base["sha256"] == fingerprint(_config())["sha256"]
    for harmless in ("pruner.progress=true", "pruner.log_every=3", "pruner.checkpoint_every=7", "name=other",
                     "output_dir=elsewhere"):
        assert fingerprint(_config(harmless))["sha256"] == base["sha256"], harmless
    for changed in ("pruner.target_ratio=0.5", "pruner.phase2.steps=3", "seed=1", "router.num_experts=3"):
        assert fingerprint(_config(changed))["sha256"] != base["sha256"], changed
    assert base["versions"]["aptp"]


def test_a_finished_run_records_its_fingerprint(finished_run):
    recorded = json.loads((finished_run / FINGERPRINT_FILE).read_text())
    assert recorded["sha256"] == fingerprint(_config())["sha256"]
    assert (finished_run / "config.yaml").is_file()
    assert not (finished_run / OWNER_FILE).exists(), "the lock's owner record goes with the lock"
    assert check_run_folder(finished_run, _config("pruner.progress=true")) == "same"


def test_changed_config_is_refused_before_anything_is_written(run_copy):
    before = _snapshot(run_copy)
    with pytest.raises(ConfigError) as exc:
        _run(run_copy, "pruner.target_ratio=0.5", "seed=1")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "pruner.target_ratio: 0.6 → 0.5" in msg and "seed: 0 → 1" in msg
    assert "--restart" in msg and "--output-dir" in msg
    assert _snapshot(run_copy) == before, "a refused rerun must leave the folder untouched (config.yaml included)"


def test_same_config_resumes(run_copy):
    summary = _run(run_copy, "pruner.progress=true")  # reporting keys do not count
    assert summary["expert_macs_ratios"]


def test_cli_refuses_in_one_line_and_restart_starts_over(run_copy, capsys):
    args = ["run", "smoke", *TINY, "pruner.target_ratio=0.5", "--output-dir", str(run_copy)]
    before = _snapshot(run_copy)
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pruner.target_ratio: 0.6 → 0.5" in err and "--restart" in err, err
    assert _snapshot(run_copy) == before

    (run_copy / "experts" / "stale-marker").write_text("from the old run")
    assert cli_main([*args, "--restart"]) == 0
    assert not (run_copy / "experts" / "stale-marker").exists(), "--restart discards the old results"
    recorded = json.loads((run_copy / FINGERPRINT_FILE).read_text())
    assert recorded["config"]["pruner"]["target_ratio"] == 0.5
    assert recorded["sha256"] == fingerprint(_config("pruner.target_ratio=0.5"))["sha256"]
    assert "--restart" in _run_help()


def _run_help() -> str:
    from aptp.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["run"].format_help()


def test_older_run_without_fingerprint_is_adopted_or_refused_by_its_config(run_copy):
    (run_copy / FINGERPRINT_FILE).unlink()
    with pytest.raises(ConfigError, match=r"pruner\.phase2\.steps: 2 → 5"):
        check_run_folder(run_copy, _config("pruner.phase2.steps=5"))
    with pytest.warns(UserWarning, match="adopting"):
        with open_run(run_copy, _config()) as status:
            assert status == "adopt"
    assert (run_copy / FINGERPRINT_FILE).is_file()
    assert check_run_folder(run_copy, _config()) == "same"


def test_an_option_added_since_at_its_default_keeps_a_finished_run(run_copy):
    """A fingerprint written before aptp had an option (here: pruner.phase2.lr is deleted from the
    record, as if it had not existed) still matches while the option is at its default; set to
    another value, it is a change."""
    record = json.loads((run_copy / FINGERPRINT_FILE).read_text())
    del record["config"]["pruner"]["phase2"]["lr"]
    record["sha256"] = "written-by-an-older-aptp"
    (run_copy / FINGERPRINT_FILE).write_text(json.dumps(record))
    assert check_run_folder(run_copy, _config()) == "same"
    default_lr = _config().pruner.phase2.lr
    with pytest.raises(ConfigError, match=r'pruner\.phase2\.lr: "\(absent\)" → '):
        check_run_folder(run_copy, _config(f"pruner.phase2.lr={default_lr * 2}"))


def test_a_run_that_stopped_before_any_result_does_not_block_the_corrected_one(tmp_path):
    """A run refused after its folder was opened (a bad component choice found at run time) leaves
    only fingerprint.json and config.yaml: the corrected rerun starts there instead of being
    refused as "a different run"."""
    out = tmp_path / "run"
    with open_run(out, _config("pruner.target_ratio=0.5")):
        pass  # stopped here: no result written
    assert check_run_folder(out, _config()) == "new"
    (out / "phase1.jsonl").write_text("{}\n")  # a result: now the folder is another run's
    with pytest.raises(ConfigError, match="holds results of a different run"):
        check_run_folder(out, _config())


def test_damaged_fingerprint_is_refused(run_copy):
    (run_copy / FINGERPRINT_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        check_run_folder(run_copy, _config())


def test_output_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        with open_run(tmp_path / "file", _config(), restart=True):
            pass


def test_comparison_cell_with_a_changed_config_is_refused(tmp_path):
    from aptp.harness import DONE_FILE, run_cell

    cell = tmp_path / "cells" / "a"
    first = run_cell("smoke", [*TINY], cell)
    assert (cell / DONE_FILE).is_file() and (cell / FINGERPRINT_FILE).is_file()
    assert run_cell("smoke", [*TINY, "pruner.progress=true"], cell) == json.loads(json.dumps(first, default=str))
    before = _snapshot(cell)
    with pytest.raises(ConfigError, match=r"pruner\.target_ratio: 0\.6 → 0\.5"):
        run_cell("smoke", [*TINY, "pruner.target_ratio=0.5"], cell)
    assert _snapshot(cell) == before


# ------------------------------------------------------------------------------------------ the lock
_HOLDER = textwrap.dedent("""
    import sys
    from aptp.core.rundir import lock_run_folder
    with lock_run_folder(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # hold the lock until the parent closes stdin
""")


def test_a_second_process_is_refused_at_once(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as exc:
            with lock_run_folder(folder):
                pass
        msg = str(exc.value)
        assert "\n" not in msg and str(folder / LOCK_FILE) in msg and f"pid {holder.pid}" in msg, msg
        # the command line refuses as well, in one line, before running anything
        args = ["run", "smoke", *TINY, "--output-dir", str(folder)]
        assert cli_main(args) == 2
        assert not (folder / "config.yaml").exists() and not (folder / FINGERPRINT_FILE).exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0
    with lock_run_folder(folder):  # released with its holder
        pass


def test_lock_is_reentrant_within_a_process(tmp_path):
    with lock_run_folder(tmp_path / "run"):
        with lock_run_folder(tmp_path / "run"):
            assert json.loads((tmp_path / "run" / OWNER_FILE).read_text())["pid"] == os.getpid()
        assert (tmp_path / "run" / OWNER_FILE).is_file(), "the outer holder still holds it"
    assert not (tmp_path / "run" / OWNER_FILE).exists()


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("damage", ["empty_state", "truncated_state", "empty_meta", "missing_tensor"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, damage):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"x": torch.full((64,), float(step)), "y": torch.zeros(3)}, keep=3)
    newest = tmp_path / "step-00000003"
    state = newest / "state.safetensors"
    if damage == "empty_state":
        state.write_bytes(b"")
    elif damage == "truncated_state":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "empty_meta":
        (newest / "meta.json").write_text("")
    else:
        meta = json.loads((newest / "meta.json").read_text())
        meta["state"]["__dict__"][0][1]["__tensor__"] = "nope"
        (newest / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="step-00000003"):
        step, loaded = latest_checkpoint(tmp_path)
    assert step == 2 and torch.equal(loaded["x"], torch.full((64,), 2.0))


def test_no_valid_checkpoint_starts_over_with_a_warning(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(2)})
    (tmp_path / "step-00000001" / "meta.json").write_text("")
    with pytest.warns(UserWarning, match="starting from the beginning"):
        assert latest_checkpoint(tmp_path) is None


def test_run_resumes_past_a_damaged_checkpoint(run_copy):
    newest = sorted((run_copy / "checkpoints" / "phase1").iterdir())[-1]
    (newest / "state.safetensors").write_bytes(b"")
    shutil.rmtree(run_copy / "experts")  # phase 2 runs again from the resumed phase 1
    with pytest.warns(UserWarning, match="damaged"):
        summary = _run(run_copy)
    assert (run_copy / "experts" / "expert-1" / "finetune.json").is_file()
    assert summary["phase1_steps"] == 4


def test_stale_temporaries_are_removed_on_start(run_copy):
    ckpt_tmp = run_copy / "checkpoints" / "phase1" / ".tmp-killed"
    ckpt_tmp.mkdir()
    (ckpt_tmp / "state.safetensors").write_bytes(b"half")
    expert_tmp = run_copy / "experts" / ".expert-0.tmp-123-abcd"
    expert_tmp.mkdir()
    with pytest.warns(UserWarning, match="half-written"):
        with open_run(run_copy, _config()):
            pass
    assert not ckpt_tmp.exists() and not expert_tmp.exists()
    assert (run_copy / "checkpoints" / "phase1").is_dir() and (run_copy / "experts" / "expert-0").is_dir()
    assert remove_stale_temps(run_copy / "checkpoints" / "phase1") == []


# ------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("bad", ["../escaped", "a/b", "..", "a\\b", ""])
def test_names_are_names(bad):
    with pytest.raises(ConfigError, match="is not a name"):
        check_name(bad, "run name")


def test_run_name_with_a_path_is_refused():
    with pytest.raises(ConfigError, match="is not a name"):
        _config("name=../../escaped")


@pytest.mark.parametrize("preset", ["../experiment/smoke", "/etc/passwd", "sub/dir"])
def test_preset_names_with_paths_are_refused(preset):
    with pytest.raises(ConfigError, match="is not a name"):
        _config(f"router={preset}")
    with pytest.raises(ConfigError, match="is not a name"):
        find_preset("router", preset, config_search_path())


def test_environment_interpolation_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("APTP_SECRET_FOR_TEST", "s3cret")
    with pytest.raises(ConfigError, match="environment") as exc:
        _config("output_dir=${oc.env:APTP_SECRET_FOR_TEST}/runs")
    assert "s3cret" not in str(exc.value)
    experiment = tmp_path / "env.yaml"
    experiment.write_text("defaults:\n  - backbone: tiny\nname: env\nbackbone:\n  pretrained: ${oc.env:APTP_SECRET_FOR_TEST}\n")
    with pytest.raises(ConfigError, match=r"backbone\.pretrained"):
        load_experiment(str(experiment))


def test_cli_refuses_cell_and_ablation_names_with_paths(tmp_path, capsys):
    assert cli_main(["ablate", "smoke", "--grid", "seed=0,1", "--name", "../../escaped",
                     "--output-dir", str(tmp_path / "out")]) == 2
    assert "is not a name" in capsys.readouterr().err
    comparison = tmp_path / "cmp.yaml"
    comparison.write_text("name: cmp\nbase: smoke\ncells:\n  ../../escaped: [seed=1]\n")
    assert cli_main(["compare", str(comparison), "--output-dir", str(tmp_path / "cmp")]) == 2
    assert "is not a name" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "cmp").exists()


# ------------------------------------------------------------------------------------------ import order
def test_diffusers_before_aptp_imports():
    code = "import diffusers, transformers, aptp; from aptp.core.plugins import default_registry; default_registry()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]



@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/inner.safetensors"])
def test_a_shard_index_cannot_point_outside_its_folder(tmp_path, shard):
    from safetensors.torch import save_file

    from aptp.backbones.diffusers_base import DIFFUSERS_WEIGHTS, load_denoiser_files

    folder = tmp_path / "expert"
    (folder / "sub").mkdir(parents=True)
    for path in (tmp_path / "outside.safetensors", folder / "sub" / "inner.safetensors", folder / "ok.safetensors"):
        save_file({"w": torch.zeros(1)}, str(path))
    index = folder / f"{DIFFUSERS_WEIGHTS}.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "ok.safetensors"}}))
    assert set(load_denoiser_files(folder)) == {"w"}
    index.write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(ConfigError, match="not a file of"):
        load_denoiser_files(folder)
