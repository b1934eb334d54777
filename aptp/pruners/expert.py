"""Experts on disk: a cut denoiser saved so that it loads without aptp's training code.

An expert folder::

    config.json                            the dense UNet's diffusers config (what the cut started from)
    diffusion_pytorch_model.safetensors    the cut model's own weights (``save_pretrained`` layout)
    aptp_expert.json                       architecture (U,), unit space, granularities, backbone config

diffusers' UNet config cannot express per-block widths (e.g. ResNet inner channels), so
``UNet2DConditionModel.from_pretrained(folder)`` refuses the weights (size mismatch) rather than
loading them wrongly. :func:`load_expert` builds the dense model from ``config.json`` on the
``meta`` device (no memory), cuts it to the stored architecture and assigns the stored weights:
the result is a plain ``UNet2DConditionModel`` for ``pipe.unet = expert``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aptp.core.config import config_to_dict
from aptp.core.errors import IncompatibleError, reading
from aptp.core.interfaces import (
    Backbone,
    Conditioning,
    Granularity,
    diffusers_model_from_config,
    load_denoiser_files,
    save_denoiser_files,
)
from aptp.core.units import UnitSpace
from aptp.pruners.gating import build_unit_space, cut_model, kind_of

EXPERT_FILE = "aptp_expert.json"
EXPERT_FORMAT = 1
_EXPERT_HINT = "rerun the run that wrote it (aptp run ... --restart) or save it again with save_expert."


def save_expert(directory: str | Path, expert: nn.Module, architecture: torch.Tensor, space: UnitSpace,
                granularities: list[Granularity], conditioning: Conditioning,
                backbone: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``expert`` (a cut diffusers model, e.g. from :func:`cut_model`) and how to rebuild it."""
    directory = Path(directory)
    space.check(architecture)
    bb = _backbone(backbone)
    if bb is not None:  # the backbone decides the weights' format (Backbone.save_denoiser)
        bb.save_denoiser(expert, directory)
    else:
        save_denoiser_files(expert, directory)
    arch = (architecture.detach().cpu() >= 0.5).to(torch.float32)
    meta = {
        "format": EXPERT_FORMAT,
        "architecture": [int(a) for a in arch.tolist()],
        "kept_macs": float(space.kept_macs(arch)),
        "macs_ratio": float(space.macs_ratio(arch)),
        "kept_params": float(space.kept_params(arch)),
        "conditioning": {"sample_shape": list(conditioning.sample_shape), "text_len": conditioning.text_len,
                         "text_dim": conditioning.text_dim},
        "granularities": [{"name": kind_of(g), **config_to_dict(g.config)} for g in granularities],
        "backbone": backbone,
        "unit_space": space.to_dict(),
        "extra": extra or {},
    }
    (directory / EXPERT_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def read_expert_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / EXPERT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an aptp expert: {EXPERT_FILE} is missing (write one with save_expert).")
    with reading(path, "expert metadata", _EXPERT_HINT):
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"{EXPERT_FILE} holds a {type(meta).__name__}, not an object")
    if meta.get("format") != EXPERT_FORMAT:
        raise IncompatibleError(f"{path} has format {meta.get('format')}; this aptp reads format {EXPERT_FORMAT}.")
    return meta


def _granularities(specs: list[dict[str, Any]]) -> list[Granularity]:
    from aptp.core.plugins import default_registry

    reg = default_registry()["granularity"]
    out = []
    for s in specs:
        params = dict(s)
        spec = reg.get(params.pop("name"))
        out.append(spec.build(spec.config_class(**params)))
    return out


def _backbone(config: dict[str, Any] | None) -> Backbone | None:
    """The backbone an expert's ``backbone`` config (with its registered ``name``) builds, or None."""
    if not config or "name" not in config:
        return None
    from aptp.core.config import instantiate_config
    from aptp.core.plugins import default_registry

    spec = default_registry()["backbone"].get(config["name"])
    return spec.build(instantiate_config(spec, dict(config)))


def load_expert(directory: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a saved expert: the backbone's dense denoiser (meta; ``Backbone.dense_denoiser_for``) -> cut to
    the stored architecture -> the saved weights (``Backbone.load_denoiser_state``)."""
    directory = Path(directory)
    meta = read_expert_meta(directory)
    with reading(directory, "expert", _EXPERT_HINT):
        return _load_expert(directory, meta, device, dtype)


def _load_expert(directory: Path, meta: dict[str, Any], device, dtype) -> nn.Module:
    bb = _backbone(meta.get("backbone"))
    model = bb.dense_denoiser_for(directory) if bb is not None else diffusers_model_from_config(directory)
    if model is None:
        raise IncompatibleError(f"expert {directory} names no backbone and holds no diffusers config.json; "
                                "it cannot be rebuilt.")
    grans = _granularities(meta["granularities"])
    c = meta["conditioning"]
    cond = Conditioning(tuple(c["sample_shape"]), int(c["text_len"]), int(c["text_dim"]))
    space = build_unit_space(model, grans, cond)
    space.require_same(meta["unit_space"]["fingerprint"], f"expert {directory}")
    model = cut_model(model, space, grans, torch.tensor(meta["architecture"], dtype=torch.float32), inplace=True)
    state = bb.load_denoiser_state(directory) if bb is not None else load_denoiser_files(directory)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise IncompatibleError(f"expert {directory} has no weights for {left[:5]}; the folder is incomplete.")
    if any(t.is_floating_point() and t.dtype != dtype for t in model.parameters()):
        model = model.to(dtype=dtype)  # (diffusers warns on every dtype cast, even a no-op)
    return model.to(device=device).eval()
