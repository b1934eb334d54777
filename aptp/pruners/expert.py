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

Shared storage (``save_expert(..., storage="shared", dense=unet)``): the folder holds no weights of
its own, only where each of the expert's tensors lies in the dense weights and what phase 2
changed::

    config.json                 the dense model's diffusers config (as above)
    aptp_expert.json            as above, plus "storage": "shared", each tensor's source and index sets
    aptp_slices.safetensors     index sets (int32) along the dims whose kept indices are not one range
    aptp_delta.safetensors      "delta/<name>" exact diffs (W_k - dense[idx], zero diffs omitted),
                                "lora_A/<name>" (r, in*kh*kw) and "lora_B/<name>" (out, r) low-rank
                                diffs, "own/<name>" tensors that are not a slice of a dense tensor

A tensor of expert k is ``W_k = dense[source][idx_0, idx_1, ...] + delta``. ``load_expert`` either
materialises it (a plain diffusers model, as above) or, with ``materialise=False``, returns a
:class:`SharedExpert` that keeps only the deltas and gathers its weights from ONE resident dense
model at call time (so K experts cost about the dense weights plus K deltas; the gathered weights
of one expert live only during its call, or during a ``with expert.gathered():`` block that
spans the denoising steps of one batch). Exact diffs are lossless up to one float rounding
(``a + (b - a)`` is ``b`` to within one ulp; exact when ``b`` is within a factor 2 of ``a``).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aptp.core.config import config_to_dict
from aptp.core.errors import IncompatibleError, reading
from aptp.backbones.diffusers_base import diffusers_model_from_config, load_denoiser_files, save_denoiser_files
from aptp.core.interfaces import Backbone, Conditioning, Granularity
from aptp.core.registry import Registry
from aptp.core.units import UnitSpace
from aptp.pruners.gating import build_unit_space, cut_model, kind_of

EXPERT_FILE = "aptp_expert.json"
SLICES_FILE = "aptp_slices.safetensors"
DELTA_FILE = "aptp_delta.safetensors"
EXPERT_FORMAT = 1
STORAGES = ("materialised", "shared")
_EXPERT_HINT = "rerun the run that wrote it (aptp run ... --restart) or save it again with save_expert."


def save_expert(directory: str | Path, expert: nn.Module, architecture: torch.Tensor, space: UnitSpace,
                granularities: list[Granularity], conditioning: Conditioning,
                backbone: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                storage: str = "materialised", dense: nn.Module | None = None,
                lowrank: Mapping[str, LowRank] | None = None, diff_rank: int | None = None,
                registry: Registry | None = None) -> Path:
    """Write ``expert`` (a cut diffusers model, e.g. from :func:`cut_model`) and how to rebuild it.

    ``storage="materialised"``: the expert's own weights (a plain diffusers folder plus
    ``aptp_expert.json``). ``storage="shared"``: index sets over ``dense`` (the dense model it was
    cut from, required) plus the diff of each tensor against its dense slice (see the module
    docstring); ``lowrank``: tensors whose diff is a low-rank product (e.g. LoRA factors from
    :mod:`aptp.pruners.lora`), stored as factors while ``expert`` holds the unchanged base there.
    ``diff_rank``: store the diffs of 2-D / 4-D weights after full fine-tuning as their best rank-r
    approximation (truncated SVD; LOSSY, marked ``"lossy": true``) where that is smaller than the diff;
    1-D diffs (norms, biases) stay exact. None (default): every diff exact.
    ``registry``: where the ``backbone`` config's name is looked up (default: the installed plugins).
    """
    directory = Path(directory)
    space.check(architecture)
    if storage not in STORAGES:
        raise ValueError(f"storage={storage!r} is unknown; use one of {list(STORAGES)}.")
    arch = (architecture.detach().cpu() >= 0.5).to(torch.float32)
    shared: dict[str, Any] | None = None
    if storage == "shared":
        if dense is None:
            raise ValueError("storage='shared' needs dense= (the dense model the expert was cut from).")
        if diff_rank is not None and diff_rank < 1:
            raise ValueError(f"diff_rank={diff_rank} must be >= 1 (or None for exact diffs).")
        shared = _save_shared(directory, expert, dense, space, granularities, arch, lowrank or {}, diff_rank)
    elif lowrank:  # materialised: the low-rank diffs go into the weights
        expert = merge_lowrank(copy.deepcopy(expert), lowrank)
    bb = _backbone(backbone, registry)
    if shared is not None:
        directory.mkdir(parents=True, exist_ok=True)
        if hasattr(expert, "save_config"):  # config.json: what dense_denoiser_for rebuilds
            expert.save_config(str(directory))
    elif bb is not None:  # the backbone decides the weights' format (Backbone.save_denoiser)
        bb.save_denoiser(expert, directory)
    else:
        save_denoiser_files(expert, directory)
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
    if shared is not None:
        meta["storage"] = "shared"
        meta["shared"] = shared
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


def _default(registry: Registry | None) -> Registry:
    """``registry``, or the installed plugins' when the caller (a top-level API) passed none."""
    if registry is not None:
        return registry
    from aptp.core.plugins import default_registry

    return default_registry()


def _granularities(specs: list[dict[str, Any]], registry: Registry) -> list[Granularity]:
    reg = registry["granularity"]
    out = []
    for s in specs:
        params = dict(s)
        spec = reg.get(params.pop("name"))
        out.append(spec.build(spec.config_class(**params)))
    return out


def _backbone(config: dict[str, Any] | None, registry: Registry | None) -> Backbone | None:
    """The backbone an expert's ``backbone`` config (with its registered ``name``) builds, or None."""
    if not config or "name" not in config:
        return None
    from aptp.core.config import instantiate_config

    spec = _default(registry)["backbone"].get(config["name"])
    return spec.build(instantiate_config(spec, dict(config)))


def load_expert(directory: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, dense: nn.Module | None = None,
                materialise: bool = True, registry: Registry | None = None) -> nn.Module:
    """Rebuild a saved expert: the backbone's dense denoiser (meta; ``Backbone.dense_denoiser_for``) -> cut to
    the stored architecture -> the saved weights (``Backbone.load_denoiser_state``).

    A shared-storage expert takes its weights from ``dense`` (default: the backbone's dense denoiser,
    built once per call): ``materialise=True`` gives a plain diffusers model (its own copy of the
    weights), ``materialise=False`` a :class:`SharedExpert` over ``dense`` itself (pass the same
    ``dense`` to K experts to keep one copy). A materialised folder always loads materialised.
    ``registry``: where the stored backbone and granularity names are looked up (default: the
    installed plugins; :meth:`aptp.pipeline.RoutedPipeline.from_run` passes its own)."""
    directory = Path(directory)
    meta = read_expert_meta(directory)
    registry = _default(registry)
    with reading(directory, "expert", _EXPERT_HINT):
        if meta.get("storage", "materialised") == "shared":
            return _load_shared(directory, meta, device, dtype, dense, materialise, registry)
        return _load_expert(directory, meta, device, dtype, registry)


def _skeleton(directory: Path, meta: dict[str, Any], registry: Registry) -> tuple[nn.Module, Backbone | None]:
    """The expert's cut model with shapes only (``meta`` device)."""
    bb = _backbone(meta.get("backbone"), registry)
    model = bb.dense_denoiser_for(directory) if bb is not None else diffusers_model_from_config(directory)
    if model is None:
        raise IncompatibleError(f"expert {directory} names no backbone and holds no diffusers config.json; "
                                "it cannot be rebuilt.")
    grans = _granularities(meta["granularities"], registry)
    c = meta["conditioning"]
    cond = Conditioning(tuple(c["sample_shape"]), int(c["text_len"]), int(c["text_dim"]),
                        call=bb.trace_call if bb is not None else None)
    space = build_unit_space(model, grans, cond)
    space.require_same(meta["unit_space"]["fingerprint"], f"expert {directory}")
    return cut_model(model, space, grans, torch.tensor(meta["architecture"], dtype=torch.float32), inplace=True), bb


def _load_expert(directory: Path, meta: dict[str, Any], device, dtype, registry: Registry) -> nn.Module:
    model, bb = _skeleton(directory, meta, registry)
    state = bb.load_denoiser_state(directory) if bb is not None else load_denoiser_files(directory)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise IncompatibleError(f"expert {directory} has no weights for {left[:5]}; the folder is incomplete.")
    if any(t.is_floating_point() and t.dtype != dtype for t in model.parameters()):
        model = model.to(dtype=dtype)  # (diffusers warns on every dtype cast, even a no-op)
    return model.to(device=device).eval()


# ------------------------------------------------------------------------------ shared storage
@dataclass(frozen=True)
class Slice:
    """Where a cut tensor lies in the dense weights: ``dense[source]`` indexed along every dim.

    ``index[d]`` is None (the whole dim), a ``slice`` (one contiguous range: a view, no copy) or a
    long tensor of kept indices (``index_select``: a copy, made at call time)."""

    source: str  # the dense tensor's state-dict key
    index: tuple[slice | torch.Tensor | None, ...]

    def take(self, dense: torch.Tensor) -> torch.Tensor:
        w = dense
        for d, ix in enumerate(self.index):
            if ix is None:
                continue
            if isinstance(ix, slice):
                w = w.narrow(d, ix.start, ix.stop - ix.start)
            else:
                w = w.index_select(d, ix if ix.device == w.device else ix.to(w.device))
        return w


@dataclass(frozen=True)
class LowRank:
    """A low-rank diff ``scale * (B @ A)`` reshaped to the tensor: A (r, in * kh * kw), B (out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    def delta(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        return (self.scale * (self.B @ self.A)).view(shape)


def dense_state(dense: nn.Module) -> dict[str, torch.Tensor]:
    """The dense model's parameters and buffers by state-dict key (the tensors themselves, no copy)."""
    return {**dict(dense.named_parameters(remove_duplicate=False)), **dict(dense.named_buffers(remove_duplicate=False))}


def slice_map(dense: nn.Module, space: UnitSpace, granularities: list[Granularity],
              arch: torch.Tensor) -> dict[str, Slice | None]:
    """For every tensor of ``cut_model(dense, ..., arch)``: the slice of the dense weights it holds, or
    None when it is not one (its own tensor). Found without knowing the granularities' cuts: a probe
    copy whose every floating entry holds its global position (float64, exact below 2**53) is cut,
    and the positions each cut tensor holds are read back (and checked) as index sets."""
    state = dense_state(dense)
    offsets: dict[str, int] = {}
    total = 0
    memo: dict[int, Any] = {}
    for name, t in state.items():
        if t.is_floating_point() and id(t) not in memo:
            offsets[name] = total
            total += t.numel()
            probe = torch.arange(offsets[name], total, dtype=torch.float64).view(t.shape)
            memo[id(t)] = nn.Parameter(probe, requires_grad=False) if isinstance(t, nn.Parameter) else probe
    if total >= 2**53:
        raise ValueError(f"the dense model has {total} weights, too many to probe in float64; save it materialised.")
    probe_model = copy.deepcopy(dense, memo)  # the same structure, the probe tensors instead of the weights
    cut = cut_model(probe_model, space, granularities, arch, inplace=True)
    starts = sorted((o, n) for n, o in offsets.items())
    return {name: _find_slice(t, starts, state) for name, t in dense_state(cut).items()}


def _find_slice(t: torch.Tensor, starts: list[tuple[int, str]], state: dict[str, torch.Tensor]) -> Slice | None:
    """The slice of the dense tensors that the probe values ``t`` hold, or None."""
    if not t.is_floating_point() or t.dtype != torch.float64 or t.numel() == 0:
        return None
    t = t.detach()
    first = float(t.flatten()[0])
    owner = [(o, n) for o, n in starts if o <= first]
    if not owner:
        return None
    offset, source = owner[-1]
    shape = state[source].shape
    if t.dim() != len(shape) or bool((t != t.round()).any()):
        return None
    local = t.to(torch.long) - offset  # (cut shape) flat positions inside the source
    if int(local.min()) < 0 or int(local.max()) >= state[source].numel():
        return None
    index: list[slice | torch.Tensor | None] = []
    rest = local
    for d in reversed(range(len(shape))):  # unravel, last dim first
        coord = rest % shape[d]
        rest = rest // shape[d]
        ix = coord.movedim(d, 0).reshape(coord.shape[d], -1)[:, 0]  # (cut size of dim d,)
        index.append(_compact(ix, shape[d]))
    sl = Slice(source, tuple(reversed(index)))
    full = torch.arange(state[source].numel()).view(shape)
    return sl if torch.equal(sl.take(full), local) else None


def _compact(ix: torch.Tensor, size: int) -> slice | torch.Tensor | None:
    n = ix.numel()
    if n and torch.equal(ix, torch.arange(int(ix[0]), int(ix[0]) + n)):
        return None if n == size else slice(int(ix[0]), int(ix[0]) + n)
    return ix.clone()


def _checksum(state: Mapping[str, torch.Tensor], names: list[str]) -> float:
    """A cheap fingerprint of the dense tensors an expert reads (sum of |w| in float64)."""
    return float(sum(float(state[n].detach().double().abs().sum()) for n in sorted(set(names))))


def _save_shared(directory: Path, expert: nn.Module, dense: nn.Module, space: UnitSpace,
                 granularities: list[Granularity], arch: torch.Tensor,
                 lowrank: Mapping[str, LowRank], diff_rank: int | None = None) -> dict[str, Any]:
    from safetensors.torch import save_file

    slices = slice_map(dense, space, granularities, arch)
    base = dense_state(dense)
    own = dense_state(expert)
    if set(own) != set(slices):
        raise IncompatibleError(f"the expert's tensors are not those of the dense model cut to its architecture "
                                f"(e.g. {sorted(set(own) ^ set(slices))[:3]}); pass the dense model it was cut from.")
    unknown = set(lowrank) - set(own)
    if unknown:
        raise ValueError(f"lowrank names tensors the expert does not have: {sorted(unknown)[:3]}.")
    index_tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    lossy_names: list[str] = []
    table: dict[str, Any] = {}
    with torch.no_grad():
        for name, w in own.items():
            sl = slices[name]
            if sl is None:
                deltas[f"own/{name}"] = w.detach().cpu().contiguous()
                table[name] = None
                continue
            dims: list[Any] = []
            for d, ix in enumerate(sl.index):
                if isinstance(ix, torch.Tensor):
                    index_tensors[f"{name}/{d}"] = ix.to(torch.int32)
                    dims.append("index")
                else:
                    dims.append(None if ix is None else [ix.start, ix.stop])
            table[name] = {"source": sl.source, "dims": dims}
            ref = sl.take(base[sl.source].detach()).to(w.device, w.dtype)
            diff = w.detach() - ref
            if name in lowrank:
                lr = lowrank[name]
                deltas[f"lora_A/{name}"] = lr.A.detach().cpu().contiguous()
                deltas[f"lora_B/{name}"] = lr.B.detach().cpu().contiguous()
                table[name]["lora_scale"] = float(lr.scale)
            if not bool(diff.ne(0).any()):
                continue
            lossy = _truncated(diff, diff_rank) if diff_rank is not None and name not in lowrank else None
            if lossy is not None:  # fully fine-tuned, compressed: the best rank-r approximation of the diff
                deltas[f"lora_A/{name}"], deltas[f"lora_B/{name}"] = lossy.A.cpu().contiguous(), lossy.B.cpu().contiguous()
                table[name]["lora_scale"] = 1.0
                lossy_names.append(name)
            else:  # fully fine-tuned (or a non-adapter tensor that changed): its exact diff
                deltas[f"delta/{name}"] = diff.cpu().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(index_tensors, str(directory / SLICES_FILE))
    save_file(deltas, str(directory / DELTA_FILE))
    sources = [v["source"] for v in table.values() if v is not None]
    return {"tensors": table, "dense_checksum": _checksum(base, sources), "lossy": bool(lossy_names),
            **({"diff_rank": diff_rank, "lossy_tensors": len(lossy_names)} if lossy_names else {}),
            "delta_bytes": sum(t.numel() * t.element_size() for t in deltas.values())}


def _truncated(diff: torch.Tensor, rank: int) -> LowRank | None:
    """The best rank-``rank`` factors of a 2-D / 4-D diff (out, in * kh * kw), or None when the diff is
    1-D or the factors would not be smaller than the diff itself."""
    if diff.dim() < 2:
        return None
    m = diff.detach().flatten(1).double()  # (out, in * kh * kw)
    r = min(rank, *m.shape)
    if r * (m.shape[0] + m.shape[1]) >= m.numel():
        return None
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    return LowRank(vh[:r].to(diff.dtype), (u[:, :r] * sv[:r]).to(diff.dtype), 1.0)


@dataclass
class _Entry:
    slice: Slice | None
    own: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    lowrank: LowRank | None = None


def _read_shared(directory: Path, meta: dict[str, Any]) -> dict[str, _Entry]:
    from safetensors.torch import load_file

    indices = load_file(str(directory / SLICES_FILE))
    deltas = load_file(str(directory / DELTA_FILE))
    out: dict[str, _Entry] = {}
    for name, spec in meta["shared"]["tensors"].items():
        if spec is None:
            out[name] = _Entry(None, own=deltas[f"own/{name}"])
            continue
        index = tuple(None if d is None else slice(int(d[0]), int(d[1])) if isinstance(d, list)
                      else indices[f"{name}/{i}"].to(torch.long) for i, d in enumerate(spec["dims"]))
        lr = (LowRank(deltas[f"lora_A/{name}"], deltas[f"lora_B/{name}"], float(spec["lora_scale"]))
              if "lora_scale" in spec else None)
        out[name] = _Entry(Slice(str(spec["source"]), index), delta=deltas.get(f"delta/{name}"), lowrank=lr)
    return out


def _load_shared(directory: Path, meta: dict[str, Any], device, dtype, dense: nn.Module | None,
                 materialise: bool, registry: Registry) -> nn.Module:
    skeleton, bb = _skeleton(directory, meta, registry)
    entries = _read_shared(directory, meta)
    names = dense_state(skeleton)
    if set(names) != set(entries):
        raise IncompatibleError(f"expert {directory} does not list the tensors of its architecture "
                                f"(e.g. {sorted(set(names) ^ set(entries))[:3]}); the folder is incomplete.")
    if dense is None:
        if bb is None:
            raise IncompatibleError(f"shared expert {directory} names no backbone; pass dense= (its dense model).")
        dense = bb.build_denoiser(device, dtype)
    base = dense_state(dense)
    missing = sorted({e.slice.source for e in entries.values() if e.slice is not None} - set(base))
    if missing:
        raise IncompatibleError(f"the dense model has no tensors {missing[:3]} that expert {directory} slices; "
                                "pass the dense model it was cut from.")
    want = float(meta["shared"]["dense_checksum"])
    got = _checksum(base, [e.slice.source for e in entries.values() if e.slice is not None])
    if abs(got - want) > 1e-6 * max(1.0, abs(want)):
        raise IncompatibleError(f"expert {directory} was cut from other dense weights (checksum {got:.6g}, "
                                f"saved {want:.6g}); pass the dense model it was cut from.")
    for name, e in entries.items():  # shapes, checked once here instead of at the first call
        shape = tuple(names[name].shape)
        ref = e.own if e.slice is None else e.slice.take(base[e.slice.source].detach().to("meta"))
        if tuple(ref.shape) != shape or (e.delta is not None and tuple(e.delta.shape) != shape) or (
                e.lowrank is not None and e.lowrank.B.shape[0] * e.lowrank.A.shape[1] != ref.numel()):
            raise ValueError(f"tensor {name} of the saved expert has the wrong shape for {shape}")
    shared = SharedExpert(skeleton, dense, entries).to(device=device)
    shared.cast_deltas(dtype)
    if not materialise:
        return shared.eval()
    model = skeleton
    with torch.no_grad():
        own = {k: v.detach().clone() for k, v in shared.weights().items()}  # never the dense tensors themselves
        model.load_state_dict(own, strict=True, assign=True)
    return model.to(device=device).eval()


class SharedExpert(nn.Module):
    """An expert whose weights are gathered from the dense model's tensors at call time.

    Holds the cut model's structure (``skeleton``, on the ``meta`` device), the dense model (shared:
    the same object in every expert; ``parameters()`` yields its tensors) and its own small tensors
    (exact diffs, low-rank factors, tensors that are no slice). ``forward`` runs the skeleton with
    ``W = dense[source][idx] + delta`` by ``torch.func.functional_call``, so it computes what the
    materialised expert computes and works under ``torch.compile`` (the gathers are compiled too).
    Other attributes (``config``, ...) are the skeleton's, so diffusers-style callers see a UNet.
    """

    def __init__(self, skeleton: nn.Module, dense: nn.Module, entries: Mapping[str, _Entry]) -> None:
        super().__init__()
        self.dense = dense
        self.scales = {n: e.lowrank.scale for n, e in entries.items() if e.lowrank is not None}
        self.own = nn.Module()  # the expert's own tensors (index sets too), buffers under escaped names
        # index tensors live in self.own (they follow .to(device)); a slice names them by buffer key
        self.slices: dict[str, tuple[str, tuple[Any, ...]] | None] = {}
        for n, e in entries.items():
            if e.slice is None:
                self.slices[n] = None
                continue
            index = []
            for d, ix in enumerate(e.slice.index):
                if isinstance(ix, torch.Tensor):
                    self.own.register_buffer(_key(f"index{d}", n), ix.to(torch.int32))  # half of int64
                    ix = _key(f"index{d}", n)
                index.append(ix)
            self.slices[n] = (e.slice.source, tuple(index))
        for n, e in entries.items():
            for kind, t in (("own", e.own), ("delta", e.delta),
                            ("A", e.lowrank.A if e.lowrank else None), ("B", e.lowrank.B if e.lowrank else None)):
                if t is not None:
                    self.own.register_buffer(_key(kind, n), t)
        object.__setattr__(self, "skeleton", skeleton)  # not a submodule: its tensors are on meta
        self._held: dict[str, torch.Tensor] | None = None

    def cast_deltas(self, dtype: torch.dtype) -> SharedExpert:
        """Cast the expert's own floating tensors to ``dtype`` (the dense model is left as it is)."""
        for k, t in list(self.own._buffers.items()):
            if t is not None and t.is_floating_point():  # (index sets are integers)
                self.own._buffers[k] = t.to(dtype)
        return self

    def _own(self, kind: str, name: str) -> torch.Tensor | None:
        return self.own._buffers.get(_key(kind, name))

    def weights(self) -> dict[str, torch.Tensor]:
        """Every tensor of the expert by state-dict key: ``dense[source][idx] (+ delta)``."""
        base = dense_state(self.dense)
        out: dict[str, torch.Tensor] = {}
        own = self.own._buffers
        for name, spec in self.slices.items():
            if spec is None:
                out[name] = self._own("own", name)  # type: ignore[assignment]
                continue
            source, index = spec
            w = Slice(source, tuple(own[ix] if isinstance(ix, str) else ix for ix in index)).take(base[source])
            d = self._own("delta", name)
            if d is not None:
                w = w + d
            if name in self.scales:
                w = w + LowRank(self._own("A", name), self._own("B", name), self.scales[name]).delta(w.shape)
            out[name] = w
        return out

    @contextlib.contextmanager
    def gathered(self) -> Iterator[SharedExpert]:
        """Gather the weights once for every call inside the block (e.g. the denoising steps of one
        batch) instead of at each call; they are dropped at its end. Nested blocks reuse the outer's."""
        if self._held is not None:
            yield self
            return
        self._held = self.weights()
        try:
            yield self
        finally:
            self._held = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        weights = self._held if self._held is not None else self.weights()
        return torch.func.functional_call(self.skeleton, weights, args, kwargs, strict=True)

    def train(self, mode: bool = True) -> SharedExpert:
        super().train(mode)
        self.skeleton.train(mode)
        return self

    def own_bytes(self) -> int:
        """Bytes of the expert's own tensors (diffs, factors, index sets; not the shared dense weights)."""
        return sum(t.numel() * t.element_size() for t in self.own.buffers())

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            skeleton = self.__dict__.get("skeleton")
            if skeleton is None or name.startswith("__"):
                raise
            return getattr(skeleton, name)


def gathered(denoiser: nn.Module) -> contextlib.AbstractContextManager:
    """``denoiser.gathered()`` for a :class:`SharedExpert` (also under ``torch.compile``), else a no-op."""
    hold = getattr(denoiser, "gathered", None)
    return hold() if callable(hold) else contextlib.nullcontext()


def resident_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct tensor storages that ``modules`` hold (parameters, buffers and a
    :class:`SharedExpert`'s dense model, each storage counted once however many hold it)."""
    seen: dict[int, int] = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def _key(kind: str, name: str) -> str:
    return f"{kind}__{name.replace('.', '__')}"


def merge_lowrank(model: nn.Module, lowrank: Mapping[str, LowRank]) -> nn.Module:
    """Add each low-rank diff to its tensor of ``model`` in place (a plain model again)."""
    state = dense_state(model)
    with torch.no_grad():
        for name, lr in lowrank.items():
            w = state[name]
            w.add_(lr.delta(w.shape).to(w.device, w.dtype))
    return model
