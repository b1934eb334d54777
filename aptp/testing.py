"""Contract checks for components, usable by plugin authors in their own test suites::

    # tests/test_my_plugin.py of a plugin distribution
    import pytest
    from aptp.testing import check_component, registered_specs

    @pytest.mark.parametrize("spec", registered_specs(provider="my_plugin"), ids=str)
    def test_contract(spec):
        check_component(spec)

Each check builds the component from its default config, round-trips its config through YAML,
and checks that building it twice under the same seed gives the same behaviour (a kind-specific
*probe*: a balancer's plan, an encoder's embeddings, a backbone's denoiser layout, a module's
tensors, ...).

Granularities need a denoiser to act on, so they have their own checks, run against a backbone::

    from aptp.testing import check_backbone, check_granularity_exactness

    def test_my_granularity_is_exact():
        backbone = registered_specs(provider="my_plugin")[0].build()        # or any Backbone
        report = check_granularity_exactness(backbone, [MyGranularity()])
        assert report.max_abs_diff < 1e-5

:func:`check_granularity_exactness` hard-gates the backbone's (random) denoiser with random
per-sample architectures and compares each sample with the physically cut model of its
architecture; it also checks that all-ones gates leave the dense function unchanged, that removing
the gates restores the model, that the cut model's parameter count is what the unit space predicts,
and that ``unit_magnitude`` (when defined) has one value per unit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf

from aptp.core.config import config_to_dict, instantiate_config
from aptp.core.registry import ComponentSpec, Registry

#: kind -> function(component) -> something comparable that exercises the component cheaply.
PROBES: dict[str, Callable[[Any], Any]] = {}


def probe(kind: str) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Register the deterministic probe of a component kind."""

    def deco(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        PROBES[kind] = fn
        return fn

    return deco


def registered_specs(registry: Registry | None = None, provider: str | None = None) -> list[ComponentSpec]:
    """Every registered component (optionally only those of one plugin), for parametrising tests."""
    from aptp.core.plugins import default_registry

    specs = (registry or default_registry()).all_specs()
    return [s for s in specs if provider is None or s.provider == provider]


def check_config_roundtrip(spec: ComponentSpec) -> None:
    """Default config -> YAML text -> config dataclass gives back an equal config."""
    config = spec.default_config()
    text = OmegaConf.to_yaml(OmegaConf.create({"name": spec.name, **config_to_dict(config)}))
    again = instantiate_config(spec, OmegaConf.create(text))
    assert again == config, f"{spec.kind} '{spec.name}': config changed in a YAML round trip: {config} -> {again}"


def build_seeded(spec: ComponentSpec, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return spec.build()


def check_component(spec: ComponentSpec) -> None:
    """All contract checks for one component; raises AssertionError naming what broke."""
    component = build_seeded(spec)
    assert isinstance(component, spec.factory), f"{spec.name}: build() returned {type(component)}"
    assert dataclasses.is_dataclass(component.config) and component.config == spec.default_config(), (
        f"{spec.kind} '{spec.name}': component.config must be the config it was built with"
    )
    check_config_roundtrip(spec)
    fn = PROBES.get(spec.kind, _generic_probe)
    first = fn(component)
    second = fn(build_seeded(spec))
    assert_same(first, second, f"{spec.kind} '{spec.name}' is not deterministic under a seed")


def assert_same(a: Any, b: Any, msg: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), msg
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), msg
        for k in a:
            assert_same(a[k], b[k], f"{msg} (at {k!r})")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), msg
        for x, y in zip(a, b):
            assert_same(x, y, msg)
    else:
        assert a == b, msg


def _generic_probe(component: Any) -> Any:
    return {k: v.detach().clone() for k, v in component.state_tensors().items()}


@probe("balancer")
def _probe_balancer(balancer: Any) -> Any:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(12, 4, generator=g)  # (B, K)
    plan = balancer.plan(scores)
    assert plan.shape == scores.shape and torch.isfinite(plan).all(), "plan must be a finite (B, K) tensor"
    return plan


@probe("encoder")
def _probe_encoder(encoder: Any) -> Any:
    z = encoder.encode(["a red circle", "a small blue square left of a large yellow triangle"])
    assert z.shape == (2, encoder.dim), f"encode must return (B, dim={encoder.dim}), got {tuple(z.shape)}"
    return z


@probe("metric")
def _probe_metric(metric: Any) -> Any:
    """Metrics that can run here without user-provided weights (``metric.can_probe()`` is true, e.g.
    the world metrics once the world evaluator is shipped) are computed on fixed random images;
    the others (FID, CLIP score, CMMD: weights loaded lazily on first compute) are only built."""
    can_probe = getattr(metric, "can_probe", None)
    if can_probe is None or not can_probe():
        return _generic_probe(metric)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 32, 32, generator=g)  # (N, 3, H, W) in [0, 1]
    reference = torch.rand(8, 3, 32, 32, generator=g)
    prompts = ["a red circle", "a small blue square on the left", 'the letter "A" in green',
               "a large yellow triangle at the top"] * 2
    value = metric.compute(images, prompts, reference=reference)
    assert isinstance(value, float), f"compute must return a float, got {type(value).__name__}"
    return value


# --------------------------------------------------------------------------------- backbones
def check_backbone(backbone: Any, batch: int = 2) -> dict[str, Any]:
    """A backbone's shape contract, on the ``meta`` device (no memory, any model size).

    ``conditioning()`` gives integer shapes; ``build_denoiser('meta')`` builds; ``denoise`` maps
    sample (B, C, H, W), timestep (B,) and text states (B, L, D) to (B, C, H, W); the denoiser can be
    traced with aptp's call convention. Returns the layout (parameter names and shapes, MACs).
    """
    from aptp.core.interfaces import Conditioning
    from aptp.core.resources import count_params
    from aptp.pruners.granularities.toolkit import trace

    cond = backbone.conditioning()
    assert isinstance(cond, Conditioning), f"conditioning() must return a Conditioning, got {type(cond).__name__}"
    c, h, w = cond.sample_shape
    assert all(isinstance(v, int) and v > 0 for v in (c, h, w, cond.text_len, cond.text_dim)), (
        f"conditioning() must give positive integer shapes, got {cond}")
    denoiser = backbone.build_denoiser("meta")
    sample = torch.zeros(batch, c, h, w, device="meta")
    t = torch.full((batch,), 10, device="meta", dtype=torch.long)
    text = torch.zeros(batch, cond.text_len, cond.text_dim, device="meta")
    with torch.no_grad():
        out = backbone.denoise(denoiser, sample, t, text)
    assert tuple(out.shape) == (batch, c, h, w), (
        f"denoise must return (B, C, H, W) = {(batch, c, h, w)}, got {tuple(out.shape)}")
    macs = trace(denoiser, cond).total_macs
    assert macs > 0, "tracing the denoiser found no MACs: aptp calls it through backbone.trace_call (default: denoise); check that conditioning() passes call=self.trace_call"
    return {"params": [(n, tuple(p.shape)) for n, p in denoiser.named_parameters()],
            "num_params": count_params(denoiser), "macs": macs,
            "features": len(backbone.feature_modules(denoiser))}


@probe("backbone")
def _probe_backbone(backbone: Any) -> Any:
    return check_backbone(backbone)


# ----------------------------------------------------------------------------- granularities
@dataclass
class ExactnessReport:
    """What :func:`check_granularity_exactness` measured."""

    unit_space_size: int  # U
    kinds: list[str]
    max_abs_diff: float  # max |hard-gated - cut| over every sample and architecture
    output_scale: float  # max |dense output|
    dense_gate_diff: float  # max |all-ones gated - ungated|
    params: list[tuple[int, int]] = field(default_factory=list)  # (cut model, unit space) per architecture
    macs_ratios: list[float] = field(default_factory=list)  # kept-MACs ratio of each architecture


def random_architectures(space: Any, n: int, keep_prob: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``n`` random 0/1 architectures (n, U); row 0 keeps everything, row 1 cuts every unit."""
    g = torch.Generator().manual_seed(seed)
    archs = (torch.rand(n, space.size, generator=g) < keep_prob).to(torch.float32)
    if n > 0:
        archs[0] = 1.0
    if n > 1:
        archs[1] = 0.0
    return archs


def check_granularity_exactness(backbone: Any, granularities: Sequence[Any], *, num_architectures: int = 5,
                                keep_prob: float = 0.5, seed: int = 0, rtol: float = 1e-5,
                                check_params: bool = True) -> ExactnessReport:
    """Hard gates == physical cuts, for ``granularities`` on ``backbone``'s denoiser (random weights).

    Draws ``num_architectures`` architectures (dense, empty, random), gates a batch with one
    architecture per sample (one forward), cuts one model per architecture and runs it on its sample:
    each pair must agree within ``rtol * max(1, |dense output|)``. Also: all-ones gates compute the
    dense function, ``Gates.remove()`` restores it exactly, the cut model has
    ``space.kept_params(arch)`` parameters (``check_params``), and ``unit_magnitude`` -- where a
    granularity defines it -- returns one finite value per unit.
    """
    from aptp.core.resources import count_params
    from aptp.pruners.gating import Gates, build_unit_space, cut_model

    torch.manual_seed(seed)
    denoiser = backbone.build_denoiser()
    cond = backbone.conditioning()
    space = build_unit_space(denoiser, list(granularities), cond)
    assert space.size > 0, f"granularities {[getattr(g, 'kind', g) for g in granularities]} found no unit"
    for grp in space.groups:
        gran = next(g for g in granularities if g.kind == grp.kind)
        try:
            mag = gran.unit_magnitude(denoiser, grp)
        except NotImplementedError:
            continue
        assert tuple(mag.shape) == (grp.num_units,) and bool(torch.isfinite(mag).all()), (
            f"{grp.kind}.unit_magnitude({grp.path}) must be ({grp.num_units},) finite, got {tuple(mag.shape)}")

    archs = random_architectures(space, num_architectures, keep_prob, seed)  # (n, U)
    n = archs.shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    c, h, w = cond.sample_shape
    x = torch.randn(n, c, h, w, generator=g)  # (n, C, H, W): sample i runs architecture i
    t = torch.randint(0, 1000, (n,), generator=g)  # (n,)
    text = torch.randn(n, cond.text_len, cond.text_dim, generator=g)  # (n, L, D)
    with torch.no_grad():
        dense = backbone.denoise(denoiser, x, t, text)
        scale = float(dense.abs().max())
        tol = rtol * max(1.0, scale)
        with Gates(denoiser, space, list(granularities)) as gates:
            gates.set(torch.ones(space.size))
            ones = backbone.denoise(denoiser, x, t, text)
            gates.set(archs)  # (n, U): one architecture per sample
            gated = backbone.denoise(denoiser, x, t, text)
        after = backbone.denoise(denoiser, x, t, text)
        assert torch.equal(after, dense), "removing the gates must restore the dense model exactly"
        dense_gate_diff = float((ones - dense).abs().max())
        assert dense_gate_diff <= tol, f"all-ones gates changed the dense output by {dense_gate_diff:.3g} (tol {tol:.3g})"
        worst, params = 0.0, []
        for i in range(n):
            expert = cut_model(denoiser, space, list(granularities), archs[i])
            out = backbone.denoise(expert, x[i:i + 1], t[i:i + 1], text[i:i + 1])
            diff = float((out - gated[i:i + 1]).abs().max())
            assert diff <= tol, (f"architecture {i} (keeps {int(archs[i].sum())}/{space.size} units): hard-gated and "
                                 f"cut outputs differ by {diff:.3g} > {tol:.3g}; the gate is not where the cut acts")
            worst = max(worst, diff)
            got, want = count_params(expert), int(round(float(space.kept_params(archs[i]))))
            params.append((got, want))
            if check_params:
                assert got == want, (f"architecture {i}: the cut model has {got} parameters but the unit space "
                                     f"predicts {want}; fix params_per_unit of the granularity")
    return ExactnessReport(space.size, space.kinds(), worst, scale, dense_gate_diff, params,
                           [float(space.macs_ratio(a)) for a in archs])


def imported_modules(source: str) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of everything ``source`` imports, read with :mod:`ast` (nothing is
    imported): ``import x.y``, ``from x import y`` (both ``x`` and ``x.y``, absolute imports only),
    and ``importlib.import_module("x")`` / ``__import__("x")`` with a literal name, at top level or in
    a function. For layout tests: "this room imports no model library / no private aptp module"."""
    import ast

    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            names = [node.args[0].value]
        else:
            continue
        found += [(node.lineno, n) for n in names]
    return found
