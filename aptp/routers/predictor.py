"""The architecture predictor (hypernetwork) and the K architecture codes of APTP.

Both produce *raw logits* over a unit space's groups: n_g per width group and n_g + 1 per depth
group (:attr:`aptp.core.units.UnitGroup.is_depth`, whatever its kind: ``depth``, the timm plugin's
``timm_blocks``, ...; see :func:`aptp.routers.gates.monotone_depth_logits`), R = U + number of depth
groups in all.
:class:`RawLayout` turns raw logits into unit logits (..., U) and gates (..., U).
"""

from __future__ import annotations

import torch
from torch import nn

from aptp.core.units import UnitSpace
from aptp.routers.gates import gumbel_sigmoid, logistic_noise, monotone_depth_logits


class RawLayout:
    """Where each unit group's raw logits live in a raw vector (..., R), and how they become gates."""

    def __init__(self, unit_space: UnitSpace) -> None:
        self.unit_space = unit_space
        self.is_depth = [g.is_depth for g in unit_space.groups]
        self.raw_sizes = [g.num_units + d for g, d in zip(unit_space.groups, self.is_depth)]
        self.raw_size = sum(self.raw_sizes)  # R
        sizes = torch.tensor([float(g.num_units) for g in unit_space.groups for _ in range(g.num_units)])
        self.group_weight = sizes.rsqrt()  # (U,) 1/sqrt(n_g): every fully kept group has norm 1

    def unit_logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw logits (..., R) -> unit logits (..., U); depth groups become monotone."""
        parts = torch.split(raw, self.raw_sizes, dim=-1)
        return torch.cat([monotone_depth_logits(p) if d else p for p, d in zip(parts, self.is_depth)], dim=-1)

    def gates(self, unit_logits: torch.Tensor, tau: float, offset: float, noise: bool = False,
              hard: bool = True) -> torch.Tensor:
        """Unit logits (..., U) -> gates (..., U); a depth group shares one noise sample per row."""
        sample = None
        if noise:
            sample = logistic_noise(unit_logits.shape, unit_logits)  # (..., U)
            parts = list(torch.split(sample, [g.num_units for g in self.unit_space.groups], dim=-1))
            for i, d in enumerate(self.is_depth):
                if d:  # one sample for the whole group keeps the hard gates monotone
                    parts[i] = parts[i][..., :1].expand_as(parts[i])
            sample = torch.cat(parts, dim=-1)
        return gumbel_sigmoid(unit_logits, tau=tau, offset=offset, noise=noise, hard=hard, noise_sample=sample)


def _orthogonal_blocks(weight: torch.Tensor, sizes: list[int]) -> None:
    """Orthogonal init of each group's block of rows (one head per unit group)."""
    with torch.no_grad():
        for block in torch.split(weight, sizes, dim=0):
            nn.init.orthogonal_(block)


class ArchitecturePredictor(nn.Module):
    """z (B, D) -> raw logits (B, R): one linear head per unit group, orthogonal init (the paper).

    The heads of all groups are stored as one Linear (the same function as separate heads, one
    matmul). ``hidden_dim`` adds a shared hidden layer (Linear + GELU) before the heads.
    """

    def __init__(self, embed_dim: int, raw_sizes: list[int], hidden_dim: int | None = None) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.hidden = None
        width = embed_dim
        if hidden_dim is not None:
            self.hidden = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU())
            nn.init.orthogonal_(self.hidden[0].weight)
            nn.init.zeros_(self.hidden[0].bias)
            width = hidden_dim
        self.heads = nn.Linear(width, sum(raw_sizes))  # all heads, (R, width)
        _orthogonal_blocks(self.heads.weight, raw_sizes)
        nn.init.zeros_(self.heads.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.hidden(z) if self.hidden is not None else z  # (B, width)
        return self.heads(h)  # (B, R)


class ArchitectureCodes(nn.Module):
    """K learnable architecture codes (K, R), orthogonal init."""

    def __init__(self, num_experts: int, raw_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, raw_size))
        nn.init.orthogonal_(self.weight)

    def forward(self) -> torch.Tensor:
        return self.weight  # (K, R)
