"""Atomic training checkpoints: a run killed at any moment resumes from the last complete one.

A checkpoint is a folder ``step-00001200/`` holding ``state.safetensors`` (every tensor),
``meta.json`` (step, RNG states, optimizer scalars, anything JSON) and is written to a temporary
folder first, then renamed: a half-written checkpoint never carries a final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_STEP = re.compile(r"^step-(\d{8})$")


def _flatten(prefix: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of a nested structure into ``tensors``; return the JSON skeleton."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(f"{prefix}.k{i}", k, tensors), _flatten(f"{prefix}.{i}", v, tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix!r}; use tensors, numbers, strings, lists, dicts.")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` (nested dicts/lists of tensors and JSON values, e.g. model and optimizer
    ``state_dict()``s) as checkpoint ``step`` under ``directory``; keep the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten("s", state, tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    with open(tmp / "meta.json", "w") as fh:
        json.dump({"step": step, "state": skeleton}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _STEP.match(p.name)
             and (p / "meta.json").is_file() and (p / "state.safetensors").is_file()]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: str | Path) -> tuple[int, dict[str, Any]]:
    """(step, state) of one checkpoint folder."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path} is not a complete checkpoint ({exc.filename} is missing).") from None
    return int(meta["step"]), _unflatten(meta["state"], tensors)


def latest_checkpoint(directory: str | Path) -> tuple[int, dict[str, Any]] | None:
    """(step, state) of the newest complete checkpoint, or None when there is none."""
    found = list_checkpoints(directory)
    return load_checkpoint(found[-1]) if found else None


def rng_state() -> dict[str, Any]:
    """Torch's CPU (and CUDA, when present) RNG states, to checkpoint."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
