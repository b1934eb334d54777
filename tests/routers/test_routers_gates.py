"""Gumbel-sigmoid gates, straight-through thresholding, monotone depth ordering, predictor + codes."""

from __future__ import annotations

import torch
from routing_helpers import make_unit_space

from aptp.routers.gates import gumbel_sigmoid, monotone_depth_logits, straight_through
from aptp.routers.ot import OTRouter, OTRouterConfig
from aptp.routers.predictor import RawLayout


def test_gumbel_sigmoid_formula_without_noise():
    logits = torch.tensor([-5.0, -3.0, -2.9, 0.0, 2.0])
    soft = gumbel_sigmoid(logits, tau=0.4, offset=3.0, noise=False, hard=False)
    assert torch.allclose(soft, torch.sigmoid((logits + 3.0) / 0.4))
    hard = gumbel_sigmoid(logits, tau=0.4, offset=3.0, noise=False, hard=True)
    assert hard.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]  # 1[g >= 0.5] = 1[logit + 3 >= 0]


def test_straight_through_passes_the_soft_gradient():
    x = torch.tensor([-1.0, 0.2, 3.0], requires_grad=True)
    soft = torch.sigmoid(x / 0.4)
    hard = straight_through(soft)
    assert hard.tolist() == [0.0, 1.0, 1.0]
    hard.sum().backward()
    assert torch.allclose(x.grad, soft * (1 - soft) / 0.4)


def test_noise_is_random_and_absent_at_inference():
    logits = torch.zeros(1000)
    torch.manual_seed(0)
    a = gumbel_sigmoid(logits, noise=True, hard=True)
    b = gumbel_sigmoid(logits, noise=True, hard=True)
    assert not torch.equal(a, b)
    assert 0.9 < float(a.mean()) < 0.99  # P(logistic >= -3) = sigmoid(3) = 0.953
    assert torch.equal(gumbel_sigmoid(logits), gumbel_sigmoid(logits))


def test_depth_keep_probability_is_monotone_cumsum_of_softmax():
    raw = torch.randn(50, 5) * 3  # 4 blocks
    keep = torch.sigmoid(monotone_depth_logits(raw))  # (50, 4)
    expected = torch.softmax(raw, -1).cumsum(-1)[:, :-1]
    assert torch.allclose(keep, expected, atol=1e-5)
    assert (keep[:, 1:] >= keep[:, :-1] - 1e-6).all(), "block 0 (first in drop priority) is kept least"
    assert torch.isfinite(monotone_depth_logits(torch.tensor([[100.0, -100.0, 0.0]]))).all()


def test_noisy_hard_depth_gates_drop_blocks_in_priority_order():
    space = make_unit_space()
    layout = RawLayout(space)
    raw = torch.randn(500, layout.raw_size)
    torch.manual_seed(1)
    g = layout.gates(layout.unit_logits(raw), tau=0.4, offset=0.0, noise=True, hard=True)  # (500, U)
    depth = g[:, space.mask_of_kind("depth")]  # (500, 3)
    assert (depth[:, 1:] >= depth[:, :-1]).all(), "a block is dropped while an earlier-priority one is kept"
    assert 0 < float(depth.mean()) < 1


def test_predictor_and_codes_are_orthogonally_initialised(unit_space):
    torch.manual_seed(0)
    r = OTRouter(OTRouterConfig(num_experts=4)).bind(unit_space, 64)
    W = r.predictor.heads.weight  # (R, 64), one orthogonal block per group
    sizes = r.layout.raw_sizes
    for block in torch.split(W, sizes):
        assert torch.allclose(block @ block.T, torch.eye(block.shape[0]), atol=1e-5)
    C = r.codes.weight  # (K, R)
    assert torch.allclose(C @ C.T, torch.eye(4), atol=1e-5)
    assert r.predict(torch.randn(3, 64)).shape == (3, unit_space.size)
    h = OTRouter(OTRouterConfig(num_experts=4, hidden_dim=32)).bind(unit_space, 64)
    assert h.predict(torch.randn(3, 64)).shape == (3, unit_space.size)
    assert h.predictor.hidden is not None and r.predictor.hidden is None


def test_scores_are_cosines_of_group_normalised_hard_gates(unit_space):
    torch.manual_seed(0)
    r = OTRouter(OTRouterConfig(num_experts=3, offset=0.0)).bind(unit_space, 16)
    z = torch.randn(5, 16)
    w = r.layout.group_weight
    gp, gc = r.predicted_gates(z) * w, r.code_gates() * w
    expected = torch.nn.functional.cosine_similarity(gp[:, None], gc[None], dim=-1, eps=1e-8)
    assert torch.allclose(r.scores(z), expected, atol=1e-5)
    assert set(r.architectures().unique().tolist()) <= {0.0, 1.0}
