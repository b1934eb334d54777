import shutil

import pytest
import torch
from safetensors.torch import load_file

from aptp.pipeline import RoutedPipeline

from runs import read_log, run_experiment


@pytest.mark.slow
def test_phase1_meets_the_budget_and_uses_every_expert(aptp_run):
    out, summary = aptp_run
    last = read_log(out / "phase1.jsonl")[-1]
    assert abs(last["mean_ratio"] - 0.6) <= 0.03, last
    load = torch.tensor(last["load"])
    fair = load.sum() / len(load)
    assert (load >= fair / 2).all(), f"OT must keep every expert in use, got load {load.tolist()}"
    ratios = summary["expert_macs_ratios"]
    assert len(ratios) == 4 and all(0.3 < r < 0.95 for r in ratios), ratios
    assert len(set(ratios)) > 1, "spread terms should give experts of different sizes"


@pytest.mark.slow
def test_run_writes_router_and_loadable_experts(aptp_run):
    out, summary = aptp_run
    assert (out / "config.yaml").is_file() and (out / "router" / "bundle.json").is_file()
    arch = load_file(str(out / "router" / "architectures.safetensors"))["architectures"]
    assert arch.shape[0] == 4
    for k in range(4):
        assert (out / "experts" / f"expert-{k}" / "config.json").is_file()


@pytest.mark.slow
def test_routed_pipeline_returns_images_in_input_order(aptp_run):
    out, _ = aptp_run
    pipe = RoutedPipeline.from_run(out, max_batch_size=2)
    prompts = ["a red circle", "a small blue square left of a large yellow triangle",
               "a green triangle at the top", "the letter A in red", "a big yellow circle", "a blue square"]
    g = torch.Generator().manual_seed(0)
    result = pipe(prompts, num_inference_steps=2, generator=g, output_type="pt")
    assert result.images.shape[0] == len(prompts) and result.expert_ids.shape == (len(prompts),)
    noise = torch.randn((len(prompts), *pipe.backbone.conditioning().sample_shape),
                        generator=torch.Generator().manual_seed(0))
    for i in (0, 3, 5):  # each image equals the same prompt generated alone on its expert
        alone = pipe.backbone.generate(pipe.modules, [prompts[i]], denoiser=pipe.expert(int(result.expert_ids[i])),
                                       num_inference_steps=2, latents=noise[i:i + 1])
        torch.testing.assert_close(result.images[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="empty prompt list"):
        pipe([])
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        pipe(["ok", 3])


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    import aptp.pruners.aptp as aptp_module

    common = ["router.num_experts=2", "pruner.warmup_steps=0", "pruner.batch_size=4", "pruner.lr=0.1",
              "pruner.scale_lr=false", "pruner.checkpoint_every=3", "pruner.phase2.steps=0",
              "pruner.data.num_samples=16", "pruner.steps=7"]
    full, _ = run_experiment(tmp_path / "full", common)

    class Killed(Exception):
        pass

    save = aptp_module.save_checkpoint

    def save_then_die(directory, step, state, **kw):  # the same run, killed right after checkpoint 6
        save(directory, step, state, **kw)
        if step == 6:
            raise Killed

    monkeypatch.setattr(aptp_module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run_experiment(tmp_path / "cut", common)
    monkeypatch.undo()
    ckpts = tmp_path / "cut" / "checkpoints" / "phase1"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000003", "step-00000006"]
    shutil.rmtree(ckpts / "step-00000006")  # as if killed after logging step 5, before its checkpoint
    resumed, _ = run_experiment(tmp_path / "cut", common + ["pruner.steps=7"])
    steps = [r["step"] for r in read_log(tmp_path / "cut" / "phase1.jsonl")]
    assert steps == list(range(7)), "resumed at step 3: steps 3-4 are redone and logged once"
    a, b = full.router.state_dict(), resumed.router.state_dict()
    for key in a:  # bit-level differences in reductions may show on a few entries after Adam steps
        rel = (a[key] - b[key]).norm() / a[key].norm().clamp_min(1e-12)
        assert rel < 1e-5, (key, float(rel))


def test_aptp_with_a_fixed_router_learns_one_code_per_cluster(tmp_path):
    """router=kmeans under pruner=aptp: k-means assigns the prompts, phase 1 learns the codes."""
    from aptp.routers.bundle import load_router_bundle

    comp, summary = run_experiment(tmp_path, ["router=kmeans", "pruner.init_codes=kmeans"])
    phase1 = read_log(tmp_path / "phase1.jsonl")
    trained = [r for r in phase1 if not r["warmup"]]
    assert trained and all(sum(r["load"]) == 4 for r in trained)
    bundle = load_router_bundle(tmp_path / "router")
    assert type(bundle.router).__name__ == "KMeansRouter" and bundle.architectures.shape[0] == 2
    # the saved router routes the training prompts as they were routed in training
    assert sum(summary["routed_load"]) == 16 and len(summary["expert_macs_ratios"]) == 2
    pipe = RoutedPipeline.from_run(tmp_path)
    ids = pipe.route(["a red circle", "the letter A in blue"])
    assert ids.shape == (2,) and int(ids.max()) < 2


def test_router_initialisation_does_not_depend_on_the_global_random_state():
    """The router is initialised from the run's seed: a cell of a comparison starts the same
    whatever ran before it in the process (e.g. whether it loaded the shared model itself)."""
    from types import SimpleNamespace

    from aptp.pruners.aptp import bind_seeded
    from aptp.routers.ot import OTRouter, OTRouterConfig

    from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig
    from aptp.pruners.gating import build_unit_space
    from aptp.pruners.granularities import FFN, FFNConfig

    bb = UNetBackbone(UNetBackboneConfig(preset="tiny"))
    space = build_unit_space(bb.build_denoiser(), [FFN(FFNConfig())], bb.conditioning())
    ctx = SimpleNamespace(seed=3, unit_space=space, encoder=SimpleNamespace(dim=384))
    tensors = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        tensors.append(bind_seeded(OTRouter(OTRouterConfig(num_experts=4)), ctx).state_tensors())
    for key in tensors[0]:
        assert torch.equal(tensors[0][key], tensors[1][key]), key
