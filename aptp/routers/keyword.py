"""Keyword router (oracle routing by prompt kind): rules label the training prompts, and a linear
probe on the prompt embeddings learns those labels, so inference needs only the embedding.

``rules`` are regular expressions, one per expert, tried in order; a prompt matching none goes to
the last expert, so K = len(rules) + 1. ``fit(embeddings, prompts=...)`` labels each training
prompt by its first matching rule (a pruner passes its training prompts) and fits a multinomial
logistic regression (scikit-learn) from embeddings to labels; ``scores(z)`` are its logits. On the
embedded world the default rules send glyph, placed and plain prompts to experts 0, 1 and 2:
routing fixed by prompt kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from aptp.core.errors import ConfigError, ShapeError
from aptp.core.interfaces import Router
from aptp.routers._checks import check_embeddings


@dataclass
class KeywordRouterConfig:
    """One regular expression per expert; unmatched prompts go to an extra, last expert."""

    # default: the embedded world's kinds (glyph -> 0, placed -> 1, plain -> 2)
    rules: list[str] = field(default_factory=lambda: ["letter", " (on|at|in) the "])
    l2: float = 1e-3  # inverse of scikit-learn's C: L2 penalty of the probe

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("keyword router: give at least one rule (a regular expression per expert).")
        for rule in self.rules:
            try:
                re.compile(rule)
            except re.error as exc:
                raise ValueError(f"keyword router: rule {rule!r} is not a regular expression ({exc}).") from None
        if not self.l2 > 0:
            raise ValueError(f"keyword router: l2={self.l2} must be > 0.")


class KeywordRouter(Router):
    """Rule labels on the training prompts, learned by a linear probe (oracle routing by kind)."""

    config_class = KeywordRouterConfig

    def __init__(self, config: KeywordRouterConfig | None = None) -> None:
        super().__init__(config)
        self.register_buffer("weight", torch.empty(0, 0))  # (K, D) once fitted
        self.register_buffer("bias", torch.empty(0))  # (K,)

    @property
    def num_experts(self) -> int:
        return len(self.config.rules) + 1

    def label(self, prompts: list[str]) -> torch.Tensor:
        """The expert of each prompt by its first matching rule (the last expert when none), (N,)."""
        patterns = [re.compile(r) for r in self.config.rules]
        return torch.tensor([next((k for k, p in enumerate(patterns) if p.search(text)), len(patterns))
                             for text in prompts], dtype=torch.long)

    def fit(self, embeddings: torch.Tensor, labels: Any = None, prompts: list[str] | None = None,
            **context: Any) -> None:
        """Label ``prompts`` by the rules (or take ``labels``) and fit the probe on ``embeddings`` (N, D)."""
        from sklearn.linear_model import LogisticRegression

        z = check_embeddings(embeddings)
        if labels is None:
            if prompts is None:
                raise ConfigError("the 'keyword' router labels its training prompts by its rules: call "
                                  "fit(embeddings, prompts=[...]) (the aptp and static pruners do).")
            labels = self.label(list(prompts))
        y = torch.as_tensor(labels).long()
        if y.shape != (z.shape[0],):
            raise ShapeError(f"got {y.shape[0]} labels for {z.shape[0]} embeddings; pass one per prompt.")
        K = self.num_experts
        probe = LogisticRegression(C=1.0 / self.config.l2, max_iter=2000)
        probe.fit(z.detach().cpu().double().numpy(), y.numpy())
        weight = torch.zeros(K, z.shape[1])
        bias = torch.full((K,), -1e4)  # an expert no training prompt matched is never chosen
        coef, icpt = torch.as_tensor(probe.coef_, dtype=torch.float32), torch.as_tensor(probe.intercept_, dtype=torch.float32)
        classes = torch.as_tensor(probe.classes_)
        if len(classes) == 2:  # scikit-learn keeps one row for two classes: logit of the second
            coef, icpt = torch.cat([-coef / 2, coef / 2]), torch.cat([-icpt / 2, icpt / 2])
        if len(classes) == 1:
            coef, icpt = torch.zeros(1, z.shape[1]), torch.zeros(1)
        weight[classes], bias[classes] = coef, icpt
        self.weight, self.bias = weight, bias

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        if self.weight.numel() == 0:
            raise ConfigError("the 'keyword' router is not fitted: call router.fit(embeddings, prompts=[...]) first.")
        z = check_embeddings(z, self.weight.shape[1]).to(self.weight)  # (B, D)
        return z @ self.weight.T + self.bias  # (B, K)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"weight", "bias"}:
            raise ShapeError(f"a saved 'keyword' router holds 'weight' and 'bias', got {sorted(tensors)}.")
        if tensors["weight"].shape[0] != self.num_experts or tensors["bias"].shape != (self.num_experts,):
            raise ShapeError(f"the saved keyword router has {tensors['weight'].shape[0]} experts, these rules give "
                             f"{self.num_experts}; use the rules it was fitted with.")
        self.weight, self.bias = tensors["weight"].float().clone(), tensors["bias"].float().clone()
