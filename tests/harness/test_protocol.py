"""The paired evaluation protocol: same noise per (prompt, seed) in every model and batch, stratified
prompts, bootstrap intervals that cover at their nominal rate, and verdicts only where an interval
excludes zero."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch

from aptp.core.build import build
from aptp.core.config import load_experiment
from aptp.harness import EvalConfig, deterministic_modules, eval_prompts, evaluate_pipeline, paired_summary
from aptp.metrics.suite import build_metrics
from aptp.pipeline import RoutedPipeline, prompt_noise
from aptp.routers.single import SingleRouter
from aptp.stats import bootstrap_mean, paired_difference, verdict


def _pipeline(experiment: str, overrides=()) -> RoutedPipeline:
    comp = build(load_experiment(experiment, list(overrides)))
    backbone = comp.require("backbone")
    modules = deterministic_modules(backbone.load(), "ddim")
    return RoutedPipeline(backbone, modules, comp.require("encoder"), SingleRouter(), {0: modules.denoiser})


def test_identical_values_give_an_exact_zero_difference():
    a = np.random.default_rng(0).random(50)
    d = paired_difference(a, a.copy(), strata=["x", "y"] * 25)
    assert (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0)
    assert verdict(d) == "no significant difference"


def test_bootstrap_interval_covers_the_true_mean_at_about_its_nominal_rate():
    rng = np.random.default_rng(1)
    p, n, trials = 0.3, 80, 300
    covered = 0
    for t in range(trials):
        x = (rng.random(n) < p).astype(float)
        ci = bootstrap_mean(x, n_boot=1000, seed=t)
        covered += ci.low <= p <= ci.high
    assert 0.90 <= covered / trials <= 0.99, covered / trials


def test_verdicts_follow_the_direction_of_the_metric():
    worse = paired_difference(np.zeros(40), np.ones(40))  # a is always 1 below b
    assert verdict(worse, higher_is_better=True) == "worse"
    assert verdict(worse, higher_is_better=False) == "better"


def test_stratified_world_prompts_have_the_requested_counts_per_kind():
    prompts = eval_prompts(EvalConfig(prompts_per_kind=7), 32)
    assert Counter(prompts.kinds) == {"plain": 7, "placed": 7, "glyph": 7}
    assert len(prompts.prompts) == 21 and prompts.reference.shape == (21, 3, 32, 32)
    assert [d for d, k in zip(prompts.difficulty, prompts.kinds) if k == "glyph"] == [3] * 7
    assert eval_prompts(EvalConfig(prompts_per_kind=7), 32).prompts == prompts.prompts  # deterministic


def test_initial_noise_depends_on_prompt_seed_only():
    shape = (3, 4, 8, 8)
    a = prompt_noise(shape, [11, 12, 13])
    b = prompt_noise(shape, [13, 99, 11])
    assert torch.equal(a[0], b[2]) and torch.equal(a[2], b[0]) and not torch.equal(a[1], b[1])


@pytest.mark.slow
def test_an_image_does_not_depend_on_its_batch():
    pipe = _pipeline("smoke", ["backbone.resolution=16"])
    prompts = ["a red circle", "the letter \"E\" in blue", "a small green square on the left"]
    shape = (3, *pipe.backbone.conditioning().sample_shape)
    noise = prompt_noise(shape, [5, 6, 7])
    batch = pipe(prompts, num_inference_steps=3, latents=noise, output_type="pt").images
    alone = pipe(prompts[1:2], num_inference_steps=3, latents=noise[1:2], output_type="pt").images
    assert torch.allclose(batch[1], alone[0], atol=1e-5)
    # diffusers' convention: one generator per prompt gives the same image alone or batched
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    listed = pipe(prompts, num_inference_steps=3, generator=gens, output_type="pt").images
    assert torch.allclose(listed, batch, atol=1e-6)
    with pytest.raises(ValueError, match="one per prompt"):
        pipe(prompts, num_inference_steps=3, generator=gens[:2], output_type="pt")


@pytest.mark.slow
def test_same_model_ties_and_a_damaged_model_is_significantly_worse():
    dense = _pipeline("world")
    damaged_unet = copy.deepcopy(dense.modules.denoiser)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in damaged_unet.parameters():
            p.add_(0.5 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=g))
    damaged = RoutedPipeline(dense.backbone, dense.modules, dense.encoder, SingleRouter(), {0: damaged_unet})
    cfg = EvalConfig(prompts_per_kind=8, sample_seeds=[0, 1], steps=8, metrics=["world_accuracy"], bootstrap=1000)
    prompts = eval_prompts(cfg, 32)
    metrics = build_metrics(cfg.metrics)
    rows, per_prompt = [], []
    for name, pipe in (("dense", dense), ("copy", dense), ("damaged", damaged)):
        res = evaluate_pipeline(name, pipe, prompts, cfg, metrics, None)
        rows.append(res["row"])
        per_prompt += res["per_prompt"]
    assert len(per_prompt) == 3 * 24 * 2
    assert {r["sample_seed"] for r in per_prompt} == {0, 1}
    stats = paired_summary(per_prompt, rows, cfg, metrics)
    pairs = {p["a"]: p for p in stats["pairs"]}
    tie = pairs["copy"]["difference"]["all"]
    assert (tie["estimate"], tie["low"], tie["high"]) == (0.0, 0.0, 0.0)
    assert pairs["copy"]["verdict"]["all"] == "no significant difference"
    assert stats["models"]["dense"]["world_accuracy"]["all"]["estimate"] >= 0.6
    assert pairs["damaged"]["verdict"]["all"] == "worse", pairs["damaged"]["difference"]["all"]


def test_pairs_must_name_models_of_the_comparison(tmp_path):
    from aptp.harness import compare

    cfg = EvalConfig(pairs=["aptp:statik"])
    with pytest.raises(ValueError, match="statik"):
        compare("smoke", {"aptp": [], "static": []}, cfg, tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "cells").exists()  # refused before any cell ran
