"""The ``profiled`` latency model: exact on what it measured, differentiable, monotone, cached."""

from __future__ import annotations

import json

import pytest
import torch

from aptp.core.resources import flop_counter_macs
from aptp.latency.profiled import ProfiledLatency, ProfiledLatencyConfig, bucket_points
from aptp.pruners.gating import cut_model
from aptp.pruners.granularities.toolkit import dummy_inputs
from aptp.testing import random_architectures

from fake_timers import dispatch_timer


def fitted(context, timer, tmp_path, **kw) -> ProfiledLatency:
    model = ProfiledLatency(ProfiledLatencyConfig(cache_dir=str(tmp_path), **kw))
    model.timer = timer
    return model.fit(context)


def cut_macs(tiny, arch: torch.Tensor) -> float:
    backbone, denoiser, grans, space = tiny
    expert = cut_model(denoiser, space, grans, arch)
    x, t, c = dummy_inputs(backbone.conditioning(), 1)
    return flop_counter_macs(_Call(backbone, expert), x, t, c) / 1e6


class _Call(torch.nn.Module):
    def __init__(self, backbone, model) -> None:
        super().__init__()
        self.backbone, self.model = backbone, model

    def forward(self, x, t, c):
        return self.backbone.denoise(self.model, x, t, c)


def test_bucket_points():
    assert bucket_points(32, 8) == [0, 1, 4, 8, 12, 16, 20, 24, 28, 32]
    assert bucket_points(3, 8) == [0, 1, 2, 3]
    assert bucket_points(10, 4) == [0, 1, 3, 5, 8, 10]
    assert bucket_points(1, 4) == [0, 1]


def test_exact_on_profiled_points_and_additive_cost(context, flop_timer, tmp_path, tiny):
    """With an exactly additive, linear cost (MACs), the table predicts any cut model exactly: the
    dense model, every group at every bucket point, dropped blocks and random architectures."""
    model = fitted(context, flop_timer, tmp_path, buckets=3)
    space = tiny[3]
    dense = space.dense()
    assert model.latency(dense).item() == pytest.approx(cut_macs(tiny, dense), rel=1e-9)
    assert model.latency(dense).item() == pytest.approx(model.dense_ms, rel=1e-12)
    archs = [dense.clone()]
    for i, grp in enumerate(space.groups[:6]):  # a few groups at each of their bucket points
        if grp.unit_paths:
            continue
        for k in model.table.knots[i]:
            a = dense.clone()
            sl = space.group_slice(i)
            a[sl] = (torch.arange(grp.num_units) < k).float()
            archs.append(a)
            # the table itself: the group's value at a knot is what was measured there
            assert model.group_latency(i, torch.tensor(float(k), dtype=torch.float64)).item() == pytest.approx(
                model.table.ms[i][model.table.knots[i].index(k)], rel=1e-12)
    archs += list(random_architectures(space, 4, keep_prob=0.6, seed=1))
    for a in archs:
        assert model.latency(a).item() == pytest.approx(cut_macs(tiny, a), rel=1e-6, abs=1e-6)


def test_differentiable_gradcheck(context, flop_timer, tmp_path, tiny):
    model = fitted(context, flop_timer, tmp_path, buckets=3)
    space = tiny[3]
    g = torch.Generator().manual_seed(0)
    # soft gates away from the knots: the prediction is linear there, gradcheck holds exactly
    arch = (0.2 + 0.6 * torch.rand(2, space.size, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: model.latency(a), (arch,), eps=1e-4, atol=1e-6)
    ratio = model.latency_ratio(arch.float())
    assert ratio.dtype == torch.float32 and ratio.shape == (2,)


def test_monotone_in_kept_units(context, tmp_path, tiny):
    """A noisy timer (smaller widths sometimes slower): the table is made monotone in kept units."""
    g = torch.Generator().manual_seed(3)

    def noisy(candidates):
        return {k: 1.0 + float(torch.rand(1, generator=g)) for k in candidates}

    model = fitted(context, noisy, tmp_path, buckets=4)
    space = tiny[3]
    for i, grp in enumerate(space.groups):
        if grp.unit_paths:
            continue
        kept = torch.linspace(0, grp.num_units, 17, dtype=torch.float64)
        f = model.group_latency(i, kept)
        assert bool((f[1:] >= f[:-1] - 1e-12).all()), grp.path


def test_cache_reused_and_invalidated(context, flop_timer, tmp_path, monkeypatch):
    first = fitted(context, flop_timer, tmp_path, buckets=2)
    assert first.measured and flop_timer.calls > 0
    calls = flop_timer.calls
    again = fitted(context, flop_timer, tmp_path, buckets=2)
    assert not again.measured and flop_timer.calls == calls  # loaded, nothing measured
    assert again.table == first.table
    files = list(tmp_path.glob("profiled-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["dtype"] == "float32"
    for change in ({"batch_size": 2}, {"dtype": "bfloat16"}, {"buckets": 3}):  # any change measures again
        model = fitted(context, flop_timer, tmp_path, **{"buckets": 2, **change})
        assert model.measured, change
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert fitted(context, flop_timer, tmp_path, buckets=2).measured  # another torch version
    assert len(list(tmp_path.glob("profiled-*.json"))) == 5


def test_cache_key_follows_shapes_and_structure(context, tiny):
    backbone, denoiser, grans, space = tiny
    import dataclasses

    model = ProfiledLatency()
    key = model.cache_key(context, torch.device("cpu"), torch.float32)
    other = dataclasses.replace(context, conditioning=dataclasses.replace(context.conditioning, text_len=7))
    assert model.cache_key(other, torch.device("cpu"), torch.float32) != key
    assert model.cache_path(key) != model.cache_path(model.cache_key(other, torch.device("cpu"), torch.float32))
    small = cut_model(denoiser, space, grans, random_architectures(space, 3, seed=0)[2])
    assert model.cache_key(dataclasses.replace(context, denoiser=small), torch.device("cpu"), torch.float32)["structure"] != key["structure"]


def test_damaged_cache_is_measured_again(context, flop_timer, tmp_path):
    model = fitted(context, flop_timer, tmp_path, buckets=2)
    path = model.cache_path(model.table.key)
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert fitted(context, flop_timer, tmp_path, buckets=2).measured


def test_unfitted_model_says_what_to_do(tiny):
    with pytest.raises(RuntimeError, match="fit"):
        ProfiledLatency().latency(tiny[3].dense())


def test_calibrated_to_the_dense_and_the_smallest_model(context, flop_timer, tmp_path, tiny):
    """A non-additive cost (module times do not sum to the model's): the prediction is still exact
    on the two whole models measured, the dense one and the one cut to no unit."""

    def concave(candidates):
        return {k: v ** 0.8 for k, v in flop_timer(candidates).items()}

    model = fitted(context, concave, tmp_path, buckets=2)
    space = tiny[3]
    dense, smallest = space.dense().double(), torch.zeros(space.size, dtype=torch.float64)
    assert model.latency(dense).item() == pytest.approx(cut_macs(tiny, dense) ** 0.8, rel=1e-9)
    assert model.latency(smallest).item() == pytest.approx(cut_macs(tiny, smallest) ** 0.8, rel=1e-9)
    assert model.table.smallest_ms == pytest.approx(cut_macs(tiny, smallest) ** 0.8, rel=1e-9)


def test_depth_units_carry_their_fixed_cost(context, flop_timer, tmp_path, tiny):
    """With a cost per module call (norms, activations, dispatch: no MACs), dropping a block saves
    more than cutting its width units to zero, and the priced unit space charges the depth unit that
    fixed cost; the MACs space charges only the block's MACs (its norms have none)."""
    model = fitted(context, dispatch_timer, tmp_path, buckets=2)
    space = tiny[3]
    (d,) = [i for i, g in enumerate(space.groups) if g.unit_paths]
    depth = space.groups[d]
    priced = model.priced_space(space)
    for j, p in enumerate(depth.unit_paths):
        if ".attentions." not in p:
            continue
        dense = space.dense().double()
        drop, narrow = dense.clone(), dense.clone()
        drop[space.group_slice(d).start + j] = 0.0
        for i, g in enumerate(space.groups):
            if g.parent == p:
                narrow[space.group_slice(i)] = 0.0
        assert model.latency(drop) < model.latency(narrow) - 0.02, p  # norms, projections, dispatch
        assert model.table.fixed_ms[p] > model.table.bypass_ms[p] >= 0.0
        assert priced.groups[d].unit_macs[j] > 0.0
