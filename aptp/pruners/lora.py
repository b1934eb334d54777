"""Low-rank adapters for phase 2: fine-tune ``r``-rank diffs of a cut expert's weights (LoRA, via ``peft``).

::

    adapters = attach_lora(expert, rank=8)     # peft LoRA on every nn.Linear / nn.Conv2d; the rest frozen
    ...train adapters.parameters()...
    lowrank = detach_lora(expert, adapters)    # {"down_blocks.0...conv1.weight": LowRank(A, B, scale)}
    save_expert(folder, expert, ..., storage="shared", dense=unet, lowrank=lowrank)   # or materialised

``lora_B`` starts at zero, so the adapted expert starts as the cut expert. ``detach_lora`` puts the
base modules back (the expert holds its unchanged cut weights again) and returns each diff as factors
``W = W_cut + scale * (B @ A).view(W.shape)``: A (r, in * kh * kw), B (out, r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aptp.pruners.expert import LowRank

ADAPTERS = ("none", "lora")


@dataclass
class LoraAdapters:
    """The adapted modules' paths and the trainable adapter parameters."""

    paths: list[str]
    rank: int
    alpha: float

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for n, p in model.named_parameters() if "lora_" in n]


def require_peft():
    """The ``peft`` module, or a one-line error saying how to install it."""
    from aptp._compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # peft imports transformers, which imports an installed torchvision
    try:
        import peft
    except ImportError:
        raise ImportError("phase2 adapter 'lora' needs peft: pip install 'aptp[lora]' (or pip install peft).") from None
    return peft


def check_adapter(name: str, rank: int) -> None:
    if name not in ADAPTERS:
        raise ValueError(f"phase2 adapter={name!r} is unknown; use one of {list(ADAPTERS)}.")
    if name == "lora" and rank < 1:
        raise ValueError(f"lora rank={rank} must be >= 1.")


def attach_lora(model: nn.Module, rank: int, alpha: float | None = None) -> LoraAdapters:
    """Wrap every ``nn.Linear`` / ``nn.Conv2d`` (groups 1) of ``model`` in a peft LoRA layer of rank
    ``rank`` (scale ``alpha / rank``, default 1), in place; every other parameter is frozen."""
    peft = require_peft()
    check_adapter("lora", rank)
    paths = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    if not paths:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d to adapt.")
    alpha = float(rank if alpha is None else alpha)
    model.requires_grad_(False)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=paths, lora_dropout=0.0,
                             init_lora_weights=True)
    peft.inject_adapter_in_model(config, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return LoraAdapters(paths, rank, alpha)


def detach_lora(model: nn.Module, adapters: LoraAdapters, adapter_name: str = "default") -> dict[str, LowRank]:
    """Remove the LoRA layers from ``model`` (their base modules back in place) and return each
    adapted weight's diff as low-rank factors, keyed by the weight's state-dict name."""
    from aptp.pruners.granularities.toolkit import get_module, set_module

    out: dict[str, LowRank] = {}
    for path in adapters.paths:
        layer = get_module(model, path)
        if not hasattr(layer, "lora_A"):
            continue
        base = layer.get_base_layer()
        a = layer.lora_A[adapter_name].weight.detach()  # (r, in) or (r, in, kh, kw)
        b = layer.lora_B[adapter_name].weight.detach()  # (out, r) or (out, r, 1, 1)
        out[f"{path}.weight"] = LowRank(a.flatten(1).clone(), b.flatten(1).clone(),
                                        float(layer.scaling[adapter_name]))
        set_module(model, path, base)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)
    model.requires_grad_(False)
    return out
