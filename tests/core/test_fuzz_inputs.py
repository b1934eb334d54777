"""A fuzz corpus of malformed user inputs (issue 14): bad config values and overrides, malformed
experiment files, prompt files, damaged router bundles, run folders, experts and checkpoints.

Every case goes through ``aptp.cli.main`` and must end in exactly one line ``aptp COMMAND: error:
...`` with a non-zero exit code, no traceback, and nothing written outside the case's folder.
Damaged folders are copies of one tiny ``aptp run smoke`` made once per module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from aptp.cli import main
from aptp.core.errors import AptpError

TINY = ["backbone.resolution=16", "pruner.progress=false"]
ERROR_LINE = re.compile(r"^aptp( [a-z]+)?: error: \S")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() or p.is_dir()}


def _cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        return exc.code if isinstance(exc.code, int) else 1


def assert_one_error_line(capsys, rc: int, root: Path, before: dict, allowed: Path | None = None) -> str:
    """rc != 0, output ends in exactly one ``aptp ...: error:`` line, no traceback, and nothing under
    ``root`` changed except inside ``allowed``."""
    out, err = capsys.readouterr()
    text = out + err
    assert rc != 0, text
    assert "Traceback" not in text, text
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and ERROR_LINE.match(lines[-1]), text
    assert sum(bool(ERROR_LINE.match(line)) for line in text.splitlines()) == 1, text
    after = _tree(root)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    if allowed is not None:
        prefix = str(allowed.relative_to(root))
        changed = {k for k in changed if k != prefix and not k.startswith(prefix + os.sep)}
    assert not changed, f"written outside the case's folder: {sorted(changed)}"
    return lines[-1]


@pytest.fixture
def case_dir(tmp_path, monkeypatch):
    """The case's working folder (also the cwd, so a default ``runs/...`` would show up here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "run"
    assert main(["run", "smoke", *TINY, "--output-dir", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------- config overrides
BAD_OVERRIDES = [
    "pruner.lr=-1", "pruner.lr=inf", "pruner.lr=nan", "pruner.lr=0", "pruner.lr=-inf", "pruner.lr=abc",
    "pruner.phase2.lr=nan", "pruner.phase2.lr=-1e-5", "pruner.contrastive_tau=0", "pruner.contrastive_tau=-1",
    "pruner.contrastive_tau=nan", "pruner.weights.denoise=nan", "pruner.weights.contrastive=-1",
    "pruner.weights.resource=inf", "pruner.phase2.distill=nan", "pruner.weight_decay=-1",
    "pruner.warmup_steps=5", "pruner.warmup_steps=-1", "pruner.steps=-1", "pruner.target_ratio=0",
    "pruner.target_ratio=1.5", "pruner.target_ratio=nan", "pruner.min_snr_gamma=nan", "pruner.batch_size=0",
    "pruner.checkpoint_every=0", "pruner.init_codes=bogus", "pruner.phase2.split=bogus",
    "pruner.data.source=bogus", "pruner.data.num_samples=-1", "pruner.data.source=tsv",
    "device=quantum", "device=cuda:x", "encoder.device=quantum", "router.num_experts=0", "router.tau=0",
    "router.tau=inf", "router.similarity=euclid", "balancer.eps=0", "balancer.eps=inf",
    "backbone.resolution=3", "backbone.preset=huge", "name=../../escaped", "name=a/b", "pruner.lrr=1",
    "router=nonexistent", "router=../router/ot", "seed=abc", "no_equals_sign", "output_dir=${oc.env:HOME}",
    "pruner.weights=[1,2]",
]


@pytest.mark.parametrize("override", BAD_OVERRIDES)
def test_bad_override_is_one_line_before_anything_runs(override, case_dir, capsys):
    out = case_dir / "run"
    before = _tree(case_dir)
    rc = _cli(["run", "smoke", *TINY, override, "--output-dir", str(out)])
    assert_one_error_line(capsys, rc, case_dir, before)
    assert not out.exists()


def test_static_finetune_lr_is_checked(case_dir, capsys):
    before = _tree(case_dir)
    rc = _cli(["run", "smoke", *TINY, "pruner=static", "assignment=magnitude", "pruner.finetune.lr=nan",
               "--output-dir", str(case_dir / "run")])
    assert "lr=nan" in assert_one_error_line(capsys, rc, case_dir, before)


STATIC_FINETUNE_OVERRIDES = {  # override -> what the one error line must name
    "pruner.finetune.lr=-1": "finetune.lr=-1.0 must be a finite number > 0",
    "pruner.finetune.lr=inf": "finetune.lr=inf must be a finite number > 0",
    "pruner.finetune.lr=0": "finetune.lr=0.0 must be a finite number > 0",
    "pruner.finetune.distill=nan": "finetune.distill=nan must be a finite number >= 0",
    "pruner.finetune.denoise=-1": "finetune.denoise=-1.0 must be a finite number >= 0",
    "pruner.finetune.block=inf": "finetune.block=inf must be a finite number >= 0",
    "pruner.finetune.steps=-1": "finetune.steps=-1 must be >= 0",
    "pruner.finetune.batch_size=0": "finetune.batch_size=0 must be >= 1",
    "pruner.finetune.checkpoint_every=0": "finetune.checkpoint_every=0 must be >= 1",
    "pruner.finetune.split=by_load": "finetune.split='by_load'",
}


@pytest.mark.parametrize("override", sorted(STATIC_FINETUNE_OVERRIDES))
def test_static_finetune_errors_name_the_static_keys(override, case_dir, capsys):
    """The static pruner's fine-tuning lives under ``finetune``: its errors say ``finetune.*``, not
    APTP's ``phase2.*`` (a key the static config does not have)."""
    before = _tree(case_dir)
    rc = _cli(["run", "smoke", *TINY, "pruner=static", "assignment=magnitude", override,
               "--output-dir", str(case_dir / "run")])
    line = assert_one_error_line(capsys, rc, case_dir, before)
    assert STATIC_FINETUNE_OVERRIDES[override] in line and "phase2" not in line.replace("pruner.phase2.split", "")


def test_missing_local_pretrained_folder_is_not_a_network_error(case_dir, capsys):
    before = _tree(case_dir)
    rc = _cli(["run", "smoke", *TINY, f"backbone.pretrained={case_dir / 'no' / 'such' / 'model'}",
               "--output-dir", str(case_dir / "run")])
    line = assert_one_error_line(capsys, rc, case_dir, before, allowed=case_dir / "run")
    assert "is not a folder" in line


def test_errors_name_the_value_and_what_to_do(case_dir, capsys):
    rc = _cli(["config", "smoke", "pruner.lr=-1"])
    assert "lr=-1.0 must be a finite number > 0" in assert_one_error_line(capsys, rc, case_dir, _tree(case_dir))
    rc = _cli(["config", "smoke", "device=quantum"])
    assert "not a torch device; use cpu, cuda" in assert_one_error_line(capsys, rc, case_dir, _tree(case_dir))


# ------------------------------------------------------------------------------- experiment files
BAD_EXPERIMENTS = {
    "empty": b"",
    "a_list": b"- 1\n- 2\n",
    "a_scalar": b"just a string\n",
    "unclosed_bracket": b"defaults: [\nname: x\n",
    "tab_indent": b"pruner:\n\tlr: 1\n",
    "unknown_slot": b"defaults:\n  - routr: ot\nname: x\n",
    "two_key_default": b"defaults:\n  - {router: ot, backbone: tiny}\nname: x\n",
    "preset_path": b"defaults:\n  - router: ../router/ot\nname: x\n",
    "unknown_key": b"defaults:\n  - pruner: aptp\nname: x\nfoo: 1\n",
    "bad_value": b"defaults:\n  - pruner: aptp\nname: x\npruner: {lr: -1}\n",
    "env": b"defaults:\n  - pruner: aptp\nname: x\noutput_dir: ${oc.env:HOME}\n",
    "not_utf8": b"name: \xff\xfe\x00x\n",
    "no_name_component": b"router: {num_experts: 2}\n",
    "unknown_component": b"router: {name: nosuch}\n",
}


@pytest.mark.parametrize("name", sorted(BAD_EXPERIMENTS))
def test_malformed_experiment_file(name, case_dir, capsys):
    path = case_dir / f"{name}.yaml"
    path.write_bytes(BAD_EXPERIMENTS[name])
    before = _tree(case_dir)
    rc = _cli(["run", str(path), *TINY, "--output-dir", str(case_dir / "run")])
    assert_one_error_line(capsys, rc, case_dir, before)


def test_missing_experiment_file(case_dir, capsys):
    before = _tree(case_dir)
    assert_one_error_line(capsys, _cli(["run", str(case_dir / "nope.yaml")]), case_dir, before)


# ------------------------------------------------------------------------------- prompt files
BAD_PROMPT_FILES = {
    "stray_quote.csv": b'Prompt,Category\na red cat,animals\n"a blue dog,animals\na frog,animals\n',
    "quote_then_text.csv": b'Prompt,Category\n"a blue" dog,animals\n',
    "quote_runs_over_lines.csv": b'Prompt,Category\n"a blue dog,animals\nfoo,x\nbar",x\n',
    "no_prompt_column.tsv": b"Text\tCategory\na cat\tanimals\n",
    "no_prompt_column.csv": b"Text,Category\na cat,animals\n",
    "header_only.csv": b"Prompt,Category\n",
    "empty.txt": b"",
    "blank.txt": b"  \n\n\t\n",
    "latin1.txt": b"caf\xe9 au lait\n",
    "blank_prompts.csv": b"Prompt,Category\n  ,a\n,b\n",
}


@pytest.mark.parametrize("name", sorted(BAD_PROMPT_FILES))
def test_malformed_prompt_file(name, finished_run, case_dir, capsys):
    path = case_dir / name
    path.write_bytes(BAD_PROMPT_FILES[name])
    before = _tree(case_dir)
    rc = _cli(["route", str(finished_run / "router"), "--file", str(path)])
    line = assert_one_error_line(capsys, rc, case_dir, before)
    if "quote" in name:
        assert re.search(r"line \d", line), line


def test_stray_quote_reports_its_line(case_dir):
    from aptp.data.prompts import PromptFileError, read_prompts

    path = case_dir / "p.csv"
    path.write_bytes(BAD_PROMPT_FILES["quote_runs_over_lines.csv"])
    with pytest.raises(PromptFileError, match=r"line 2: a quoted field runs on to line 4"):
        read_prompts(path)
    path.write_text('Prompt\n"a ""quoted"" prompt, with a comma"\nplain\n')
    assert read_prompts(path) == ['a "quoted" prompt, with a comma', "plain"]


@pytest.mark.parametrize("kind", ["missing", "a_folder"])
def test_prompt_file_that_is_not_a_file(kind, finished_run, case_dir, capsys):
    path = case_dir / "prompts.txt"
    if kind == "a_folder":
        path.mkdir()
    before = _tree(case_dir)
    rc = _cli(["route", str(finished_run / "router"), "--file", str(path)])
    assert_one_error_line(capsys, rc, case_dir, before)


# ------------------------------------------------------------------------------- router bundles
def _json_edit(fn):
    def damage(d: Path) -> None:
        info = json.loads((d / "bundle.json").read_text())
        fn(info)
        (d / "bundle.json").write_text(json.dumps(info))
    return damage


def _tensors_edit(fname: str, fn):
    def damage(d: Path) -> None:
        tensors = load_file(str(d / fname))
        save_file(fn(tensors), str(d / fname))
    return damage


def _truncate(fname: str, keep: float = 0.5):
    def damage(d: Path) -> None:
        data = (d / fname).read_bytes()
        (d / fname).write_bytes(data[: int(len(data) * keep)])
    return damage


def _write(fname: str, data: bytes):
    return lambda d: (d / fname).write_bytes(data)


def _first_key(tensors: dict) -> str:
    return sorted(tensors)[0]


BUNDLE_DAMAGE = {
    "bundle_json_empty": _write("bundle.json", b""),
    "bundle_json_truncated": _truncate("bundle.json"),
    "bundle_json_list": _write("bundle.json", b"[1, 2]"),
    "bundle_json_no_router": _json_edit(lambda i: i.pop("router")),
    "bundle_json_format_99": _json_edit(lambda i: i.update(format=99)),
    "bundle_json_unknown_router": _json_edit(lambda i: i["router"].update(name="nosuch")),
    "bundle_json_bad_router_value": _json_edit(lambda i: i["router"].update(tau=-1)),
    "bundle_json_extra_router_key": _json_edit(lambda i: i["router"].update(bogus=1)),
    "router_empty": _write("router.safetensors", b""),
    "router_truncated": _truncate("router.safetensors"),
    "router_garbage": _write("router.safetensors", b"\x00" * 64),
    "router_missing_tensor": _tensors_edit("router.safetensors", lambda t: {k: v for k, v in t.items()
                                                                         if k != _first_key(t)}),
    "router_wrong_shape": _tensors_edit("router.safetensors", lambda t: {
        **t, _first_key(t): torch.zeros(3, 5, 7, dtype=t[_first_key(t)].dtype)}),
    "architectures_truncated": _truncate("architectures.safetensors"),
    "architectures_wrong_shape": _tensors_edit("architectures.safetensors",
                                               lambda t: {"architectures": torch.ones(7, 3)}),
    "unit_space_malformed": _write("unit_space.json", b"{\"units\": ["),
    "bundle_json_missing": lambda d: (d / "bundle.json").unlink(),
}


@pytest.mark.parametrize("name", sorted(BUNDLE_DAMAGE))
def test_damaged_router_bundle(name, finished_run, case_dir, capsys):
    bundle = case_dir / "router"
    shutil.copytree(finished_run / "router", bundle)
    BUNDLE_DAMAGE[name](bundle)
    before = _tree(case_dir)
    rc = _cli(["route", str(bundle), "a red cube on a table"])
    assert_one_error_line(capsys, rc, case_dir, before)


def test_router_bundle_that_is_a_file(case_dir, capsys):
    (case_dir / "router").write_text("not a folder")
    before = _tree(case_dir)
    assert_one_error_line(capsys, _cli(["route", str(case_dir / "router"), "a prompt"]), case_dir, before)


# ------------------------------------------------------------------------------- run folders
RUN_DAMAGE = {
    "fingerprint_empty": _write("fingerprint.json", b""),
    "fingerprint_garbage": _write("fingerprint.json", b"\x00\x01{"),
    "fingerprint_list": _write("fingerprint.json", b"[]"),
    "finetune_json_empty": _write("experts/expert-0/finetune.json", b""),
    "finetune_json_no_key": _write("experts/expert-1/finetune.json", b"{}"),
}


@pytest.mark.parametrize("name", sorted(RUN_DAMAGE))
def test_damaged_run_folder(name, finished_run, case_dir, capsys):
    run = case_dir / "run"
    shutil.copytree(finished_run, run)
    RUN_DAMAGE[name](run)
    before = _tree(case_dir)
    rc = _cli(["run", "smoke", *TINY, "--output-dir", str(run)])
    assert_one_error_line(capsys, rc, case_dir, before, allowed=run)


@pytest.mark.parametrize("kind", ["a_file", "under_a_file"])
def test_output_dir_that_cannot_be_a_folder(kind, case_dir, capsys):
    (case_dir / "blocker").write_text("a file")
    out = case_dir / "blocker" if kind == "a_file" else case_dir / "blocker" / "run"
    before = _tree(case_dir)
    assert_one_error_line(capsys, _cli(["run", "smoke", *TINY, "--output-dir", str(out)]), case_dir, before)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores read-only folders")
def test_read_only_output_dir(case_dir, capsys):
    out = case_dir / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        before = _tree(case_dir)
        assert_one_error_line(capsys, _cli(["run", "smoke", *TINY, "--output-dir", str(out)]), case_dir, before)
    finally:
        out.chmod(0o700)


# ------------------------------------------------------------------------------- checkpoints
def _checkpoint_wrong_structure(run: Path) -> None:
    """Every expert-1 checkpoint holds a tensor of the wrong shape (valid files, foreign state), and
    expert 1 is not finished: resuming its fine-tuning must refuse in one line."""
    shutil.rmtree(run / "experts" / "expert-1")
    for step in (run / "checkpoints" / "expert-1").iterdir():
        tensors = load_file(str(step / "state.safetensors"))
        key = max(tensors, key=lambda k: tensors[k].numel())
        tensors[key] = torch.zeros(3, 5, 7, dtype=tensors[key].dtype)
        save_file(tensors, str(step / "state.safetensors"))


def test_checkpoint_with_a_foreign_state(finished_run, case_dir, capsys):
    run = case_dir / "run"
    shutil.copytree(finished_run, run)
    _checkpoint_wrong_structure(run)
    before = _tree(case_dir)
    rc = _cli(["run", "smoke", *TINY, "--output-dir", str(run)])
    assert_one_error_line(capsys, rc, case_dir, before, allowed=run)


@pytest.mark.parametrize("damage", ["empty_state", "truncated_state", "empty_meta"])
def test_damaged_newest_checkpoint_falls_back_without_traceback(damage, finished_run, case_dir, capsys):
    """Checkpoint damage a kill or a full disk leaves is not an error: the run resumes from the one
    before (with a warning) and finishes."""
    run = case_dir / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "router")  # phase 1 must resume from its checkpoints again
    newest = sorted((run / "checkpoints" / "phase1").iterdir())[-1]
    target = newest / ("meta.json" if damage == "empty_meta" else "state.safetensors")
    target.write_bytes(target.read_bytes()[:100] if damage == "truncated_state" else b"")
    (run / "phase1.jsonl").write_bytes((run / "phase1.jsonl").read_bytes()[:-7])  # a line cut by a kill
    before = _tree(case_dir)
    with pytest.warns(UserWarning, match="damaged|not a complete"):
        rc = _cli(["run", "smoke", *TINY, "--output-dir", str(run)])
    out, err = capsys.readouterr()
    assert rc == 0 and "Traceback" not in out + err, out + err
    after = _tree(case_dir)
    assert all(k == "run" or k.startswith("run" + os.sep) for k in set(before) ^ set(after))


# ------------------------------------------------------------------------------- experts
def _meta_edit(fn):
    def damage(d: Path) -> None:
        meta = json.loads((d / "aptp_expert.json").read_text())
        fn(meta)
        (d / "aptp_expert.json").write_text(json.dumps(meta))
    return damage


EXPERT_DAMAGE = {
    "meta_empty": _write("aptp_expert.json", b""),
    "meta_list": _write("aptp_expert.json", b"[]"),
    "meta_extra_granularity_key": _meta_edit(lambda m: m["granularities"][0].update(bogus=1)),
    "meta_no_architecture": _meta_edit(lambda m: m.pop("architecture")),
    "meta_short_architecture": _meta_edit(lambda m: m.update(architecture=m["architecture"][:3])),
    "weights_truncated": _truncate("diffusion_pytorch_model.safetensors"),
    "weights_empty": _write("diffusion_pytorch_model.safetensors", b""),
    "weights_missing_tensor": _tensors_edit("diffusion_pytorch_model.safetensors",
                                            lambda t: {k: v for k, v in t.items() if k != _first_key(t)}),
    "weights_wrong_shape": _tensors_edit("diffusion_pytorch_model.safetensors", lambda t: {
        **t, _first_key(t): torch.zeros(3, 5, 7, dtype=t[_first_key(t)].dtype)}),
}


@pytest.mark.parametrize("name", sorted(EXPERT_DAMAGE))
def test_damaged_expert_is_one_aptp_error(name, finished_run, case_dir):
    """No CLI command loads a bare expert, so the loader itself: an aptp error whose message is one
    line (what ``aptp.cli.main`` prints after ``aptp COMMAND: error:``)."""
    from aptp.pruners.expert import load_expert

    expert = case_dir / "expert"
    shutil.copytree(finished_run / "experts" / "expert-0", expert)
    EXPERT_DAMAGE[name](expert)
    with pytest.raises(AptpError) as info:
        load_expert(expert)
    assert "\n" not in str(info.value)


def test_debug_env_shows_the_traceback(case_dir, capsys, monkeypatch):
    monkeypatch.setenv("APTP_DEBUG", "1")
    assert _cli(["config", "smoke", "pruner.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and ERROR_LINE.match(err.splitlines()[-1])
