"""Atomic training checkpoints: a run killed at any moment resumes from the last complete one.

A checkpoint is a folder ``step-00001200/`` holding ``state.safetensors`` (every tensor),
``meta.json`` (step, RNG states, optimizer scalars, anything JSON) and is written to a temporary
folder first (a unique ``.tmp-*`` name), flushed to disk, then renamed: a half-written checkpoint
never carries a final name. Loading skips a damaged checkpoint for the newest one that loads;
:func:`remove_stale_temps` clears the temporary folders of a killed run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aptp.core.errors import CheckpointError

_STEP = re.compile(r"^step-(\d{8})$")
TMP_PREFIX = ".tmp-"
STATE_FILE = "state.safetensors"
META_FILE = "meta.json"


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


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # a platform that cannot open folders (Windows): nothing to flush
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` (nested dicts/lists of tensors and JSON values, e.g. model and optimizer
    ``state_dict()``s) as checkpoint ``step`` under ``directory``; keep the newest ``keep``.

    Files and folder are flushed to disk before the rename that gives the checkpoint its name, so a
    power cut cannot leave a named checkpoint with missing data."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=directory))  # unique per process
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten("s", state, tensors)
    save_file(tensors, str(tmp / STATE_FILE))
    _fsync(tmp / STATE_FILE)
    with open(tmp / META_FILE, "w") as fh:
        json.dump({"step": step, "state": skeleton}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(directory)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove the temporary folders (``.tmp-*``) that a run killed while writing a checkpoint left
    under ``directory`` (each may hold a whole model and optimizer). Call it only while no other
    process writes checkpoints there (with the run folder's lock held). Returns the removed paths."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        if p.name.startswith(TMP_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _STEP.match(p.name)
             and (p / META_FILE).is_file() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: str | Path) -> tuple[int, dict[str, Any]]:
    """(step, state) of one checkpoint folder; a CheckpointError when it is missing or damaged."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        tensors = load_file(str(path / STATE_FILE))
        return int(meta["step"]), _unflatten(meta["state"], tensors)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is not a complete checkpoint ({exc.filename} is missing).") from None
    except Exception as exc:  # truncated / empty / foreign files: json, safetensors or structure errors
        raise CheckpointError(f"{path} is damaged ({type(exc).__name__}: {exc}).") from None


def latest_checkpoint(directory: str | Path) -> tuple[int, dict[str, Any]] | None:
    """(step, state) of the newest checkpoint that loads, or None when there is none. A damaged
    checkpoint (e.g. truncated by a full disk) is skipped with a warning for the one before it."""
    found = list_checkpoints(directory)
    for path in reversed(found):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"{exc} Falling back to an earlier checkpoint.", stacklevel=2)
    if found:
        warnings.warn(f"no checkpoint under {directory} loads; starting from the beginning.", stacklevel=2)
    return None


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
