"""Contrastive, resource and spread losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aptp.routers.losses import contrastive_loss, resource_loss, spread_losses


def _bce_reference(e, z, tau):
    p = torch.softmax(F.normalize(e, dim=-1) @ F.normalize(e, dim=-1).T / tau, -1)
    t = torch.softmax(F.normalize(z, dim=-1) @ F.normalize(z, dim=-1).T / tau, -1)
    return F.binary_cross_entropy(p, t), F.binary_cross_entropy(t, t)


def test_equals_paper_bce_minus_target_entropy():
    torch.manual_seed(0)
    z, e = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    bce, floor = _bce_reference(e, z, tau=0.3)
    assert torch.allclose(contrastive_loss(e, z, tau=0.3), bce - floor, atol=1e-9)


@pytest.mark.parametrize("mask_diagonal", [False, True])
def test_zero_loss_and_zero_gradient_at_the_optimum(mask_diagonal):
    torch.manual_seed(0)
    z = torch.randn(10, 16, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    e = (z @ q * 2.5).requires_grad_()  # rotated + scaled: same cosines, so P_arch == P_text
    loss = contrastive_loss(e, z, tau=0.03, mask_diagonal=mask_diagonal)
    loss.backward()
    assert abs(loss.item()) < 1e-10
    assert float(e.grad.abs().max()) < 1e-8
    e2 = (e.detach() + 0.3 * torch.randn_like(e)).requires_grad_()  # away from it: a real gradient
    contrastive_loss(e2, z, tau=0.03, mask_diagonal=mask_diagonal).backward()
    assert float(e2.grad.abs().max()) > 1e3 * float(e.grad.abs().max()) + 1e-9


def test_pulls_similar_prompts_architectures_together():
    """Prompts 0-3 are near-duplicates, 4-7 too; architectures start random. Minimising the loss
    makes architectures within a group more alike than across groups."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(2, 32, generator=g)
    z = centers.repeat_interleave(4, 0) + 0.2 * torch.randn(8, 32, generator=g)  # (8, 32)
    e = torch.randn(8, 20, generator=g).requires_grad_()
    opt = torch.optim.Adam([e], lr=0.05)

    def within_minus_across(x):
        c = F.normalize(x, dim=-1) @ F.normalize(x, dim=-1).T
        same = torch.block_diag(torch.ones(4, 4), torch.ones(4, 4)).bool() & ~torch.eye(8, dtype=torch.bool)
        return float(c[same].mean() - c[~torch.block_diag(torch.ones(4, 4), torch.ones(4, 4)).bool()].mean())

    before, first = within_minus_across(e.detach()), None
    for _ in range(150):
        opt.zero_grad()
        loss = contrastive_loss(e, z, tau=0.1)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    assert within_minus_across(e.detach()) > before + 0.5


def test_contrastive_loss_checks_shapes():
    with pytest.raises(ValueError, match="same B"):
        contrastive_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="tau"):
        contrastive_loss(torch.randn(4, 3), torch.randn(4, 3), tau=0.0)


def test_resource_loss():
    r = torch.tensor([0.5, 0.7], requires_grad=True)
    assert resource_loss(r, 0.6).item() == pytest.approx(0.0, abs=1e-7)
    assert resource_loss(torch.tensor([0.3]), 0.6).item() == pytest.approx(abs(torch.log(torch.tensor(0.5)).item()))
    big = torch.tensor([0.9, 0.9], requires_grad=True)
    resource_loss(big, 0.6).backward()
    assert (big.grad > 0).all(), "above the target the loss must push the ratio down"
    with pytest.raises(ValueError, match="target"):
        resource_loss(r, 1.5)


def test_spread_losses():
    std_term, max_term = spread_losses(torch.tensor([0.4, 0.6, 0.8]))
    assert float(std_term) == pytest.approx(-torch.tensor([0.4, 0.6, 0.8]).std(correction=0).item())
    assert float(max_term) == pytest.approx(0.2)
    s1, m1 = spread_losses(torch.tensor([0.5]))
    assert float(s1) == 0.0 and float(m1) == pytest.approx(0.5)
