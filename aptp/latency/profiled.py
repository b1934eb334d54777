"""``profiled``: a latency table measured on the target hardware, piecewise linear in kept units.

What is measured (every time with :func:`aptp.timing.time_interleaved`: thread CPU time with one
torch thread on CPU, CUDA events on GPU; candidates interleaved round by round), on a copy of the
denoiser at the configured device, dtype and batch, at the unit space's resolution and text length:

* each width unit group ``g`` (a ResNet, an ``Attention``, a ``FeedForward``): its module alone, fed
  the inputs it receives in the dense forward, cut by its granularity to ``k`` kept units for ``k``
  in a few *buckets* ``0 = k_0 < 1 = k_1 < ... < k_m = n`` -> ``f_g(k_i)`` ms (``k = 0`` is what the
  cut leaves at width zero: a residual bypass, a zero-head attention; ``k = 1`` the smallest block,
  so the step between them, the block's fixed cost, is measured rather than interpolated);
* each depth unit ``d`` (a droppable block): the block dense and as the bypass its depth cut leaves
  -> its *fixed cost* ``c_d = T(block) - sum_{g in d} f_g(n_g)`` (norms, activations, projections,
  residual additions, dispatch: everything in the block no width unit owns) and ``b_d = T(bypass)``;
* the whole dense model -> the unprunable rest ``r = T(model) - sum_g f_g(n_g) - sum_d c_d``; and the
  model cut to no unit at all -> ``T_min`` (see the calibration below).

Prediction for an architecture ``a`` (..., U), differentiable in ``a``::

    k_g  = sum of g's gates                                   # (...) kept units, soft while training
                                                              # (0 below the group's min_kept)
    f_g  = piecewise linear interpolation of the table at k_g # monotone in k_g (cumulative max)
    P(a) = r + sum_{g outside depth units} f_g
             + sum_d [ a_d (c_d + sum_{g in d} f_g) + (1 - a_d) b_d ]

Module times measured alone do not add up to the model's time (a module alone runs with its
weights in cache; in the model they compete), and the gap grows with the model, so a constant rest
over-predicts small models. The model cut to *no* unit is measured too (``T_min``), and the sum
above, ``P(a)``, is mapped affinely onto the two measured ends::

    T(a) = T_min + (P(a) - P_min) (T_dense - T_min) / (T_dense - P_min)

which is the identity for an exactly additive cost. The prediction is exact on the dense and the
smallest model, and the table on every profiled point of a group (by construction); the error
elsewhere is what is left of the non-additivity, measured by ``benchmarks/latency_model/``. The table is cached on disk (JSON), keyed by the device, torch's
version, dtype, batch, threads, shapes, the unit space and the model's structure (module types and
parameter shapes, not values) and the measuring settings; any change measures again.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aptp.core.errors import ConfigError
from aptp.core.interfaces import Granularity
from aptp.core.units import UnitGroup, UnitSpace
from aptp.latency.base import LatencyContext, LatencyModel

#: a timer takes zero-argument candidates and returns each one's latency (ms)
Timer = Callable[[Mapping[str, Callable[[], Any]]], dict[str, float]]

TABLE_FORMAT = 2
CACHE_ENV = "APTP_LATENCY_CACHE"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ProfiledLatencyConfig:
    """device / dtype: where to measure ('auto': the denoiser's own); batch_size: samples per call;
    threads: torch threads on CPU (1: thread CPU time is exact); buckets: measured widths per unit
    group besides zero; rounds / repeats / warmup: of ``aptp.timing.time_interleaved``; cache_dir:
    where tables are kept ('': $APTP_LATENCY_CACHE, else ~/.cache/aptp/latency); cache: False
    measures again every time."""

    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 1
    threads: int = 1
    buckets: int = 8
    rounds: int = 5
    repeats: int = 2
    warmup: int = 1
    cache_dir: str = ""
    cache: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype={self.dtype!r} must be 'auto' or one of {sorted(_DTYPES)}.")
        for name in ("batch_size", "threads", "buckets", "rounds", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} must be >= 0.")


@dataclass
class LatencyTable:
    """What was measured (ms), in the order of the unit space's groups; plain data (JSON)."""

    key: dict[str, Any]
    dense_ms: float  # the whole dense model, measured
    rest_ms: float  # what no unit and no depth unit owns
    smallest_ms: float | None = None  # the model cut to no unit at all, measured (None: no calibration)
    knots: list[list[int]] = field(default_factory=list)  # per group: kept units measured (width groups)
    ms: list[list[float]] = field(default_factory=list)  # per group: monotone latency at the knots
    raw_ms: list[list[float]] = field(default_factory=list)  # per group: as measured
    fixed_ms: dict[str, float] = field(default_factory=dict)  # depth unit path -> c_d
    bypass_ms: dict[str, float] = field(default_factory=dict)  # depth unit path -> b_d

    def to_dict(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        if data.get("format") != TABLE_FORMAT:
            raise ValueError(f"latency table format {data.get('format')!r}, expected {TABLE_FORMAT}")
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def bucket_points(n: int, buckets: int) -> list[int]:
    """Kept-unit counts measured for a group of ``n`` units: 0 (the block's bypass), 1 (the step
    from the bypass to the smallest block: its fixed cost, which no interpolation from 0 sees),
    then ``buckets`` evenly spaced points up to ``n``."""
    return sorted({0, min(1, n), *(math.ceil(n * i / buckets) for i in range(1, buckets + 1))})


def device_name(device: torch.device) -> str:
    """A name of the hardware behind ``device`` (latency tables of different hardware never mix)."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"cuda:{p.name}:sm{p.major}{p.minor}:cuda{torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type}:{platform.machine()}:{cpu}"


def structure_hash(model: nn.Module) -> str:
    """Hash of a model's module types and parameter shapes (not values: latency ignores them)."""
    layout = [(n, type(m).__name__) for n, m in model.named_modules()]
    layout += [(n, list(p.shape)) for n, p in model.named_parameters()]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aptp" / "latency"


class _Root(nn.Module):
    """Holds one module at path ``m`` so a granularity can cut it out of its model."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m = module


def cut_copy(module: nn.Module, granularity: Granularity, group: UnitGroup, keep: torch.Tensor) -> nn.Module:
    """A copy of ``module`` (the module of ``group``, or the block of a one-unit depth group) cut
    by ``granularity`` to ``keep`` (n,) bool (exactly: a width group's minimum kept width is not
    applied here, so the table measures every width; the prediction applies it)."""
    root = _Root(copy.deepcopy(module))
    if group.is_depth:
        local = dataclasses.replace(group, num_units=1, unit_paths=("m",), unit_macs=(), unit_params=(), parent=None)
    else:
        local = dataclasses.replace(group, path="m", parent=None, min_kept=0)  # the width as asked
    granularity.cut(root, local, keep)
    return root.m


def capture_inputs(model: nn.Module, paths: set[str], run: Callable[[], Any]) -> dict[str, tuple[tuple, dict, int]]:
    """The (args, kwargs) of the first call of every module in ``paths`` during ``run()``, and how
    many times each was called."""
    seen: dict[str, list] = {}
    handles = []
    for path in paths:
        def hook(module: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            if path in seen:
                seen[path][2] += 1
            else:
                seen[path] = [args, dict(kwargs), 1]

        handles.append(model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    missing = paths - set(seen)
    if missing:
        raise ValueError(f"modules {sorted(missing)[:3]} never ran in the denoiser's forward; the unit space "
                         "does not match this denoiser (rebuild it with build_unit_space).")
    return {p: (a, k, n) for p, (a, k, n) in seen.items()}


class ProfiledLatency(LatencyModel):
    """Measured per-unit-group latency table on the target device, piecewise linear in kept units."""

    config_class = ProfiledLatencyConfig

    def __init__(self, config: ProfiledLatencyConfig | None = None) -> None:
        super().__init__(config)
        self.timer: Timer | None = None  # None: aptp.timing.time_interleaved with the config's settings
        self.table: LatencyTable | None = None
        self.space: UnitSpace | None = None
        self.measured = False  # whether the last fit measured (False: loaded from the cache)

    # --------------------------------------------------------------------------------- fitting
    def fit(self, context: LatencyContext) -> ProfiledLatency:
        device, dtype = self._where(context.denoiser)
        key = self.cache_key(context, device, dtype)
        path = self.cache_path(key)
        table = self._load(path, key) if self.config.cache else None
        self.measured = table is None
        if table is None:
            table = self.profile(context, device, dtype, key)
            if self.config.cache:
                _write_json(path, table.to_dict())
        self.bind(table, context.unit_space)
        return self

    def _where(self, denoiser: nn.Module) -> tuple[torch.device, torch.dtype]:
        p = next(denoiser.parameters())
        device = p.device if self.config.device == "auto" else torch.device(self.config.device)
        if device.type == "meta":
            raise ConfigError("the latency model cannot measure a denoiser on the meta device; load its weights "
                              "(or build it on cpu) first.")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"latency model device={self.config.device!r} but CUDA is not available; "
                              "use device: cpu or auto.")
        dtype = p.dtype if self.config.dtype == "auto" else _DTYPES[self.config.dtype]
        return device, dtype

    def cache_key(self, context: LatencyContext, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Everything a measurement depends on; a table is reused only for an equal key."""
        c = self.config
        call = getattr(context.call, "__qualname__", type(context.call).__name__)
        return {"model": "profiled", "device": device_name(device), "torch": torch.__version__,
                "dtype": str(dtype).replace("torch.", ""), "batch_size": c.batch_size,
                "threads": c.threads if device.type == "cpu" else None,
                "sample_shape": list(context.conditioning.sample_shape), "text_len": context.conditioning.text_len,
                "text_dim": context.conditioning.text_dim, "unit_space": context.unit_space.fingerprint(),
                "structure": structure_hash(context.denoiser), "call": call,
                "settings": {"buckets": c.buckets, "rounds": c.rounds, "repeats": c.repeats, "warmup": c.warmup}}

    def cache_path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        root = Path(self.config.cache_dir) if self.config.cache_dir else default_cache_dir()
        return root / f"profiled-{digest}.json"

    def _load(self, path: Path, key: dict[str, Any]) -> LatencyTable | None:
        if not path.is_file():
            return None
        try:
            table = LatencyTable.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            warnings.warn(f"latency table {path} is unreadable ({exc}); measuring again.", stacklevel=3)
            return None
        return table if table.key == key else None

    def _timer(self, device: torch.device) -> Timer:
        if self.timer is not None:
            return self.timer
        from aptp.timing import time_interleaved

        c = self.config

        def timer(candidates: Mapping[str, Callable[[], Any]]) -> dict[str, float]:
            out = time_interleaved(candidates, rounds=c.rounds, repeats=c.repeats, warmup=c.warmup,
                                   device=device, threads=c.threads)
            return {k: t.median for k, t in out.items()}

        return timer

    @torch.no_grad()
    def profile(self, context: LatencyContext, device: torch.device, dtype: torch.dtype,
                key: dict[str, Any]) -> LatencyTable:
        """Measure the table (see the module docstring) on a copy of the denoiser."""
        from aptp.pruners.gating import cut_model, kind_of, strip_gate_hooks

        space, cond, c = context.unit_space, context.conditioning, self.config
        by_kind = {kind_of(g): g for g in context.granularities}
        for grp in space.groups:
            if grp.kind not in by_kind:
                raise ConfigError(f"unit space has groups of kind '{grp.kind}' but no such granularity was given; "
                                  "pass the granularities the space was built with.")
        timer = self._timer(device)
        model = copy.deepcopy(context.denoiser)
        strip_gate_hooks(model)
        p = next(model.parameters())
        if (p.device, p.dtype) != (device, dtype):
            model = model.to(device=device, dtype=dtype)
        model = model.eval().requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        ch, h, w = cond.sample_shape
        x = torch.randn(c.batch_size, ch, h, w, generator=g).to(device, dtype)  # (B, C, H, W)
        t = torch.full((c.batch_size,), 500, dtype=torch.long, device=device)  # (B,)
        text = torch.randn(c.batch_size, cond.text_len, cond.text_dim, generator=g).to(device, dtype)  # (B, L, D)

        def dense_call() -> Any:
            return context.call(model, x, t, text)

        paths = {grp.path for grp in space.groups if not grp.is_depth}
        paths |= {p for grp in space.groups for p in grp.unit_paths}
        inputs = capture_inputs(model, paths, dense_call)
        smallest = cut_model(model, space, context.granularities, torch.zeros(space.size))
        ends = timer({"dense": dense_call, "smallest": lambda: context.call(smallest, x, t, text)})
        dense_ms, smallest_ms = float(ends["dense"]), float(ends["smallest"])
        del smallest

        knots: list[list[int]] = []
        raw: list[list[float]] = []
        mono: list[list[float]] = []
        for grp in space.groups:
            if grp.is_depth:
                knots.append([])
                raw.append([])
                mono.append([])
                continue
            module = model.get_submodule(grp.path)
            args, kwargs, calls = inputs[grp.path]
            ks = bucket_points(grp.num_units, c.buckets)
            candidates = {}
            for k in ks:
                keep = torch.arange(grp.num_units) < k  # the first k units (which ones does not matter)
                m = module if k == grp.num_units else cut_copy(module, by_kind[grp.kind], grp, keep)
                candidates[str(k)] = _bound(m, args, kwargs)
            times = timer(candidates)
            ms = [float(times[str(k)]) * calls for k in ks]
            knots.append(ks)
            raw.append(ms)
            mono.append([max(ms[: i + 1]) for i in range(len(ms))])  # monotone in kept units
            del candidates

        fixed, bypass = {}, {}
        for grp in space.groups:
            for p in grp.unit_paths:
                block = model.get_submodule(p)
                args, kwargs, calls = inputs[p]
                nested = [i for i, gg in enumerate(space.groups) if gg.parent == p]
                own = [i for i in nested if space.groups[i].path == p]  # a ResNet is its own width group
                candidates = {"bypass": _bound(cut_copy(block, by_kind[grp.kind], grp, torch.zeros(1, dtype=torch.bool)),
                                               args, kwargs)}
                if not own:
                    candidates["block"] = _bound(block, args, kwargs)
                times = timer(candidates)
                block_ms = mono[own[0]][-1] if own else float(times["block"]) * calls
                fixed[p] = block_ms - sum(mono[i][-1] for i in nested)
                bypass[p] = float(times["bypass"]) * calls
        rest = dense_ms - sum(m[-1] for m in mono if m) - sum(fixed.values())
        return LatencyTable(key=key, dense_ms=float(dense_ms), rest_ms=float(rest), smallest_ms=smallest_ms,
                            knots=knots, ms=mono, raw_ms=raw, fixed_ms=fixed, bypass_ms=bypass)

    # ------------------------------------------------------------------------------ prediction
    def bind(self, table: LatencyTable, space: UnitSpace) -> None:
        """Use ``table`` to predict architectures of ``space`` (the space it was measured on)."""
        if len(table.knots) != len(space.groups) or table.key.get("unit_space") not in (None, space.fingerprint()):
            raise ConfigError(f"the latency table was measured on unit space {table.key.get('unit_space')}, not on "
                              f"{space.fingerprint()}; fit the latency model on this model.")
        self.table, self.space = table, space
        self._hinges: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
        for ks, ms in zip(table.knots, table.ms):
            if not ks:
                self._hinges.append(None)
                continue
            x = torch.tensor(ks, dtype=torch.float64)  # (m + 1,)
            v = torch.tensor(ms, dtype=torch.float64)
            slope = (v[1:] - v[:-1]) / (x[1:] - x[:-1])  # (m,)
            self._hinges.append((x, v, slope))
        # calibration T = offset + scale * P: exact on the dense and on the smallest model (P = the sum of
        # module times and rest, exact on the dense model by construction); identity for an additive cost
        self._offset, self._scale = 0.0, 1.0
        if table.smallest_ms is not None:
            p_min = float(self._additive(torch.zeros(space.size, dtype=torch.float64)))
            if table.dense_ms - p_min > 0 and table.dense_ms - table.smallest_ms > 0:
                self._scale = (table.dense_ms - table.smallest_ms) / (table.dense_ms - p_min)
                self._offset = table.smallest_ms - self._scale * p_min

    def _require_fit(self) -> None:
        if self.table is None or self.space is None:
            raise RuntimeError("the latency model has not been fitted; call fit(LatencyContext(...)) first.")

    def group_latency(self, index: int, kept: torch.Tensor) -> torch.Tensor:
        """Latency (ms) of width group ``index`` keeping ``kept`` (...) units: piecewise linear."""
        x, v, slope = self._hinges[index]
        x, v, slope = x.to(kept.device), v.to(kept.device), slope.to(kept.device)
        seg = (kept.unsqueeze(-1) - x[:-1]).clamp(min=0.0)  # (..., m)
        seg = torch.minimum(seg, x[1:] - x[:-1])
        return v[0] + (seg * slope).sum(-1)

    def latency(self, arch: torch.Tensor) -> torch.Tensor:
        self._require_fit()
        self.space.check(arch)
        return self._offset + self._scale * self._additive(arch)

    def _additive(self, arch: torch.Tensor) -> torch.Tensor:
        """The sum of the measured parts (..., U) -> (...) ms, before calibration."""
        space, table = self.space, self.table
        a = space.normalise(arch.to(torch.float64))  # minimum kept widths: what the cut keeps
        total = torch.full(a.shape[:-1], table.rest_ms, dtype=torch.float64, device=a.device)
        in_block: dict[str, torch.Tensor] = {}
        for i, grp in enumerate(space.groups):
            if grp.is_depth:
                continue
            f = self.group_latency(i, a[..., space.group_slice(i)].sum(-1))  # (...)
            if grp.parent is None:
                total = total + f
            else:
                in_block[grp.parent] = in_block.get(grp.parent, 0.0) + f
        for i, grp in enumerate(space.groups):
            sl = space.group_slice(i)
            for j, p in enumerate(grp.unit_paths):
                d = a[..., sl.start + j]  # (...) keep gate of the block
                total = total + d * (table.fixed_ms[p] + in_block.get(p, 0.0)) + (1.0 - d) * table.bypass_ms[p]
        return total

    @property
    def dense_ms(self) -> float:
        self._require_fit()
        return float(self.table.dense_ms)


def _bound(module: nn.Module, args: tuple, kwargs: dict) -> Callable[[], Any]:
    def call() -> Any:
        return module(*args, **kwargs)

    return call


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a concurrent reader sees the old file or the new one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
