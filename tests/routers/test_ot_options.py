"""Options of the ot router and of APTP that are not in the paper: correlation scores, k-means code init."""

import torch

from aptp.core.units import UnitGroup, UnitSpace
from aptp.routers.ot import OTRouter, OTRouterConfig


def _space() -> UnitSpace:
    groups = tuple(UnitGroup("resnet_channels", f"b{i}", 8, 10.0, 1) for i in range(4))
    return UnitSpace(groups, total_macs=400.0, total_params=40)


def test_correlation_ignores_density_cosine_does_not():
    torch.manual_seed(0)
    router = OTRouter(OTRouterConfig(num_experts=2, similarity="correlation")).bind(_space(), 4)
    cosine = OTRouter(OTRouterConfig(num_experts=2)).bind(_space(), 4)
    cosine.load_state_dict(router.state_dict())
    with torch.no_grad():
        # code 0: keeps the first half of every group (dense 0.5); code 1: keeps everything but 2 units
        raw = torch.full((2, 32), 5.0)
        raw[0, torch.arange(32) % 8 >= 4] = -10.0
        raw[1, :2] = -10.0
        router.codes.weight.copy_(raw)
        cosine.codes.weight.copy_(raw)
        # the predictor ignores z and predicts code 0's pattern at a higher density (6 of 8 kept)
        router.predictor.heads.weight.zero_()
        bias = torch.full((32,), 5.0)
        bias[torch.arange(32) % 8 >= 6] = -10.0
        router.predictor.heads.bias.copy_(bias)
        cosine.predictor.load_state_dict(router.predictor.state_dict())
    z = torch.randn(3, 4)
    assert (cosine.scores(z).argmax(-1) == 1).all(), "cosine prefers the denser code"
    assert (router.scores(z).argmax(-1) == 0).all(), "correlation matches which units are kept"


def test_kmeans_code_init_puts_codes_at_cluster_centres():
    torch.manual_seed(0)
    router = OTRouter(OTRouterConfig(num_experts=2)).bind(_space(), 4)
    z = torch.cat([torch.randn(20, 4) + 5, torch.randn(20, 4) - 5])
    labels = router.init_codes_from_predictions(z, seed=0)
    assert labels[:20].unique().numel() == 1 and labels[20:].unique().numel() == 1 and labels[0] != labels[20]
    raw = router.predictor(z)
    for k in (0, 1):
        torch.testing.assert_close(router.codes.weight[k], raw[labels == k].mean(0), atol=1e-5, rtol=1e-5)


def test_normalised_gates_are_what_routing_compares_and_carry_a_gradient():
    """The contrastive loss's architecture vector (issue 15): hard gates / sqrt(group size)."""
    torch.manual_seed(0)
    router = OTRouter(OTRouterConfig(num_experts=3)).bind(_space(), 4)
    with torch.no_grad():
        router.predictor.heads.bias.copy_(torch.randn(32) * 6)
    z = torch.randn(5, 4)
    a = router.normalised_gates(z)  # (5, 32)
    hard = router.predicted_gates(z, hard=True)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(a, hard / 8 ** 0.5)  # every group here has 8 units
    codes = router.normalised_code_gates()
    expected = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(codes, dim=-1).T
    torch.testing.assert_close(router.scores(z), expected)
    a.sum().backward()  # straight-through: the predictor gets a gradient
    assert router.predictor.heads.weight.grad is not None and router.predictor.heads.weight.grad.abs().sum() > 0
