"""The aptp-timm plugin (plugins/aptp-timm), installed as its own distribution: found only through its
``aptp`` entry point, covered by the contract checks, listed with its distribution, removable by
blocking, exact (hard gates == physical cuts), and runnable end to end by the unchanged framework.

Install it with ``pip install -c constraints-cpu.txt -e plugins/aptp-timm`` (``make install`` does).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest
import torch

try:
    DIST = importlib.metadata.distribution("aptp-timm")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("the aptp-timm plugin is not installed: pip install -c constraints-cpu.txt -e plugins/aptp-timm",
                allow_module_level=True)

from aptp.cli import main
from aptp.core.errors import UnknownComponentError
from aptp.core.plugins import load_registry
from aptp.core.resources import flop_counter_macs
from aptp.pruners.expert import load_expert, read_expert_meta, save_expert
from aptp.pruners.gating import build_unit_space, cut_model
from aptp.testing import check_component, check_granularity_exactness, random_architectures, registered_specs

PROVIDER = "aptp_timm"
COMPONENTS = {("backbone", "timm_dit"), ("granularity", "timm_heads"), ("granularity", "timm_mlp"),
              ("granularity", "timm_blocks")}
GRANULARITIES = ("timm_heads", "timm_mlp", "timm_blocks")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def backbone(registry):
    return registry["backbone"].get("timm_dit").build()


def _grans(registry, *names: str):
    return [registry["granularity"].get(n).build() for n in names]


# ------------------------------------------------------------------------------- registration
def test_registers_only_through_its_own_entry_point(registry):
    eps = [ep for ep in DIST.entry_points if ep.group == "aptp"]
    assert [(ep.name, ep.value) for ep in eps] == [("aptp_timm", "aptp_timm.plugin")]
    mine = {(s.kind, s.name) for s in registry.all_specs() if s.provider == PROVIDER}
    assert mine == COMPONENTS
    for s in registry.all_specs():
        if s.provider == PROVIDER:
            assert s.distribution == f"aptp-timm {DIST.version}"
            assert s.factory.__module__.startswith("aptp_timm.")
    aptp_eps = [ep.value for ep in importlib.metadata.distribution("aptp").entry_points if ep.group == "aptp"]
    assert not any("timm" in v for v in aptp_eps), "aptp itself must not register the plugin"


def test_project_wide_contract_tests_include_the_plugin():
    names = {(s.kind, s.name) for s in registered_specs()}  # what tests/test_contracts.py parametrises over
    assert COMPONENTS <= names


@pytest.mark.parametrize("spec", registered_specs(provider=PROVIDER), ids=lambda s: f"{s.kind}-{s.name}")
def test_contract(spec):
    check_component(spec)


def test_aptp_list_shows_them_with_their_distribution(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for _, name in COMPONENTS:
        line = next(ln for ln in out.splitlines() if ln.split() and ln.split()[0] == name)
        assert f"aptp-timm {DIST.version}" in line, line


def test_blocking_removes_them_and_nothing_else(registry):
    blocked = load_registry(block=[PROVIDER])
    assert not {(s.kind, s.name) for s in blocked.all_specs()} & COMPONENTS
    rest = {(s.kind, s.name) for s in registry.all_specs() if s.provider != PROVIDER}
    assert {(s.kind, s.name) for s in blocked.all_specs()} == rest
    with pytest.raises(UnknownComponentError, match="unknown backbone 'timm_dit'"):
        blocked["backbone"].get("timm_dit")


def test_blocked_by_env_the_cli_lists_and_composes_without_it():
    env = _env(APTP_BLOCK_PLUGINS=PROVIDER)
    out = subprocess.run([sys.executable, "-m", "aptp.cli", "list"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "timm" not in out.stdout and "unet" in out.stdout and "dit" in out.stdout
    cfg = subprocess.run([sys.executable, "-m", "aptp.cli", "config", "smoke"], capture_output=True, text=True, env=env)
    assert cfg.returncode == 0, cfg.stderr


def _site_without_the_plugin(tmp_path):
    """A copy (symlinks) of this environment's site-packages without aptp-timm's files: what
    ``pip uninstall aptp-timm`` leaves (timm and everything else stay)."""
    import sysconfig
    from pathlib import Path

    real = Path(sysconfig.get_paths()["purelib"])
    site = tmp_path / "site-packages"
    site.mkdir()
    for entry in real.iterdir():
        if "aptp_timm" not in entry.name and "aptp-timm" not in entry.name:
            (site / entry.name).symlink_to(entry)
    return site


def test_uninstalled_the_cli_lists_composes_and_runs_builtins_without_it(tmp_path):
    site = _site_without_the_plugin(tmp_path)
    code = (f"import site, sys; site.addsitedir({str(site)!r}); import importlib.util as u; "
            "assert u.find_spec('aptp_timm') is None, 'plugin still importable'; "
            "from aptp.cli import main; sys.exit(main(sys.argv[1:]))")
    for args in (["list"], ["config", "smoke"]):
        # -S: no site-packages but the stripped copy
        out = subprocess.run([sys.executable, "-S", "-c", code, *args], capture_output=True, text=True, env=_env(),
                             cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "timm" not in out.stdout and "unet" in out.stdout


def test_torchvision_guard_lets_timm_and_the_hf_stack_import_in_a_fresh_process():
    code = "import aptp, timm, torchvision, transformers, diffusers, sentence_transformers; print(timm.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("names", [("timm_heads",), ("timm_mlp",), ("timm_blocks",), GRANULARITIES],
                         ids=lambda n: "+".join(n))
def test_hard_gates_equal_physical_cuts(registry, backbone, names):
    report = check_granularity_exactness(backbone, _grans(registry, *names), num_architectures=6, seed=len(names))
    assert report.max_abs_diff <= 1e-5 * max(1.0, report.output_scale)
    assert all(got == want for got, want in report.params)  # parameters removed == the unit space's account
    assert report.macs_ratios[0] == 1.0  # the dense architecture
    assert report.macs_ratios[1] == min(report.macs_ratios) < 0.95  # cutting every unit saves the most


def test_units_and_nesting(registry, backbone):
    model = backbone.build_denoiser()
    space = build_unit_space(model, _grans(registry, *GRANULARITIES), backbone.conditioning())
    by_kind = {k: [g for g in space.groups if g.kind == k] for k in space.kinds()}
    assert [g.num_units for g in by_kind["timm_heads"]] == [4] * 4
    assert [g.num_units for g in by_kind["timm_mlp"]] == [16] * 4
    (blocks,) = by_kind["timm_blocks"]
    assert blocks.unit_paths == ("blocks.1", "blocks.2")  # protect=1 keeps the first and last block; middle-out
    assert {g.parent for g in by_kind["timm_heads"]} == {None, "blocks.1", "blocks.2"}


def _ref_macs(model, cond, seed: int = 0) -> int:
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(1, *cond.sample_shape, generator=g), torch.tensor([10])
    text = torch.randn(1, cond.text_len, cond.text_dim, generator=g)
    return flop_counter_macs(model, x, t, encoder_hidden_states=text)


def test_analytic_macs_count_the_attention_matmuls(backbone):
    """aptp_timm.macs registers timm Attention's Q K^T and P V (2 N^2 D per block) with aptp's tracer:
    the dense total equals FlopCounterMode's, and those matmuls are 5.8 % of it."""
    model = backbone.build_denoiser()
    cond = backbone.conditioning()
    space = build_unit_space(model, [], cond)
    ref = _ref_macs(model, cond)
    assert space.total_macs == pytest.approx(ref, rel=1e-6)
    n = cond.text_len + 1 + (backbone.config.resolution // backbone.config.patch_size) ** 2  # tokens
    attention = backbone.config.depth * 2 * n * n * backbone.config.dim
    assert 0.05 < attention / ref < 0.07  # what the tracer missed before the formula


def test_head_units_carry_their_share_of_the_attention_matmuls(registry, backbone):
    model, cond = backbone.build_denoiser(), backbone.conditioning()
    space = build_unit_space(model, _grans(registry, "timm_heads"), cond)
    n = cond.text_len + 1 + (backbone.config.resolution // backbone.config.patch_size) ** 2
    d = backbone.config.dim // backbone.config.num_heads
    dim = backbone.config.dim
    for g in space.groups:  # per head: q, k, v rows + proj columns + its Q K^T and P V
        assert g.macs_per_unit == pytest.approx(n * (3 * d * dim + d * dim) + 2 * n * n * d)


@pytest.mark.parametrize("names", [("timm_heads",), GRANULARITIES], ids=lambda n: "+".join(n))
def test_analytic_macs_agree_with_flop_counter_for_random_architectures(registry, backbone, names):
    grans = _grans(registry, *names)
    model, cond = backbone.build_denoiser(), backbone.conditioning()
    space = build_unit_space(model, grans, cond)
    for arch in random_architectures(space, 6, 0.5, seed=11)[1:]:
        ref = _ref_macs(cut_model(model, space, grans, arch), cond)
        assert abs(float(space.kept_macs(arch)) / ref - 1) < 0.005, (float(space.kept_macs(arch)), ref)


def test_errors_say_what_to_do(registry):
    from timm.layers import Mlp

    with pytest.raises(ValueError, match="not divisible by num_units=5"):
        mlp_spec = registry["granularity"].get("timm_mlp")
        gran = mlp_spec.build(mlp_spec.config_class(num_units=5))
        gran._layout("m", Mlp(8, 64))
    with pytest.raises(ValueError, match="protect=-1 must be >= 0"):
        registry["granularity"].get("timm_blocks").config_class(protect=-1)
    with pytest.raises(ValueError, match="text_dim=32 but minilm gives 384"):
        registry["backbone"].get("timm_dit").config_class(text_dim=32)


# ------------------------------------------------------------------------------ experts, runs
def test_expert_is_a_plain_module_saved_as_safetensors_and_loaded_identically(registry, backbone, tmp_path):
    from aptp.core.config import config_to_dict

    grans = _grans(registry, *GRANULARITIES)
    model, cond = backbone.build_denoiser(), backbone.conditioning()
    space = build_unit_space(model, grans, cond)
    arch = random_architectures(space, 3, 0.5, seed=7)[2]
    expert = cut_model(model, space, grans, arch)
    folder = save_expert(tmp_path / "e", expert, arch, space, grans, cond,
                         backbone={"name": "timm_dit", **config_to_dict(backbone.config)})
    assert sorted(p.name for p in folder.iterdir()) == ["aptp_expert.json", "model.safetensors"]
    assert read_expert_meta(folder)["backbone"]["name"] == "timm_dit"
    loaded = load_expert(folder)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, *cond.sample_shape, generator=g), torch.randn(2, cond.text_len, cond.text_dim, generator=g)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(backbone.denoise(expert, x, t, text), backbone.denoise(loaded, x, t, text))


@pytest.mark.slow
def test_aptp_and_static_run_end_to_end_and_route(tmp_path):
    from aptp.pipeline import RoutedPipeline
    from aptp_timm import CONFIG_DIR

    runs = {"aptp": [], "static": ["pruner=static", "router=single", "assignment=magnitude", "pruner.finetune.steps=2",
                                   "pruner.finetune.batch_size=4", "pruner.data.num_samples=16",
                                   "pruner.progress=false"]}
    for name, overrides in runs.items():
        extra = ["pruner.progress=false"] if name == "aptp" else []
        rc = main(["run", "--config-dir", str(CONFIG_DIR), "timm_smoke", *overrides, *extra,
                   "--output-dir", str(tmp_path / name)])
        assert rc in (0, None)
        pipe = RoutedPipeline.from_run(tmp_path / name)
        out = pipe(["a red circle", "a small blue square on the left"], num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), output_type="pt")
        assert out.images.shape == (2, 3, 16, 16) and bool(torch.isfinite(out.images).all())
        expert = pipe.expert(int(out.expert_ids[0]))
        assert type(expert).__name__ == "TimmDiT"
        ratio = read_expert_meta(tmp_path / name / "experts" / f"expert-{int(out.expert_ids[0])}")["macs_ratio"]
        if name == "static":
            assert 0.5 < ratio <= 0.6  # magnitude pruning at target_ratio 0.6
            assert sum(p.numel() for p in expert.parameters()) < 252_592  # the dense TimmDiT's parameters
