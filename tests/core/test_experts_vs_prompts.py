"""More experts than distinct training prompts is refused (issue 14): such a run used to succeed and
report K experts of which some had no prompt of their own (an empty k-means cluster or group, an
expert fine-tuned on everything)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from aptp.cli import main
from aptp.core.config import load_experiment
from aptp.core.errors import ConfigError
from aptp.routers._checks import check_enough_prompts, distinct_prompts
from aptp.routers.kmeans import KMeansRouter, KMeansRouterConfig
from aptp.routers.random_partition import RandomPartitionRouter, RandomPartitionRouterConfig

TINY = ["backbone.resolution=16", "pruner.progress=false"]
ERROR_LINE = re.compile(r"^aptp( [a-z]+)?: error: \S")


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _one_error_line(capsys, rc: int) -> str:
    out, err = capsys.readouterr()
    assert rc != 0 and "Traceback" not in out + err, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert ERROR_LINE.match(lines[-1]) and sum(bool(ERROR_LINE.match(x)) for x in lines) == 1, err
    return lines[-1]


@pytest.fixture
def case_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------ before anything runs
@pytest.mark.parametrize("overrides", [["router.num_experts=64", "pruner.data.num_samples=8"],
                                       ["router.num_experts=17"],  # smoke draws 16 prompts
                                       ["pruner=static", "assignment=magnitude", "router=kmeans",
                                        "router.num_experts=9", "pruner.data.num_samples=8"]])
def test_more_experts_than_samples_is_refused_before_anything_runs(overrides, case_dir, capsys):
    rc = main(["run", "smoke", *TINY, *overrides, "--output-dir", str(case_dir / "run")])
    line = _one_error_line(capsys, rc)
    k = re.search(r"router\.num_experts=(\d+)", " ".join(overrides)).group(1)
    assert f"router.num_experts={k} is more than the" in line and "lower router.num_experts" in line
    assert _files(case_dir) == set(), "nothing is written"


def test_as_many_experts_as_samples_is_accepted():
    cfg = load_experiment("smoke", ["router.num_experts=8", "pruner.data.num_samples=8"])
    assert cfg.router.num_experts == 8
    cfg = load_experiment("smoke", ["router.num_experts=64", "pruner.data.num_samples=0"])  # 0: all of a file
    assert cfg.router.num_experts == 64


# ------------------------------------------------------------------------------ the distinct prompts
def test_distinct_prompts_counts_texts_or_embedding_rows():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # (3, 2): two distinct prompts
    assert distinct_prompts(z) == 2
    assert distinct_prompts(prompts=["a", "b", "a", "c"]) == 3
    assert check_enough_prompts(2, z) == 2
    with pytest.raises(ConfigError, match=r"num_experts=3 is more than the 2 distinct training prompts "
                                          r"\(3 prompts, some repeated\).*lower router.num_experts to <= 2"):
        check_enough_prompts(3, z)


def _repeated(n_distinct: int, repeats: int) -> torch.Tensor:
    base = torch.nn.functional.normalize(torch.randn(n_distinct, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    return base.repeat(repeats, 1)  # (n_distinct * repeats, 8)


def test_kmeans_fit_refuses_more_clusters_than_distinct_prompts():
    z = _repeated(3, 4)  # 12 rows, 3 distinct: N >= K but K - 3 clusters would be empty
    with pytest.raises(ConfigError, match="num_experts=4 is more than the 3 distinct training prompts"):
        KMeansRouter(KMeansRouterConfig(num_experts=4)).fit(z)
    with pytest.raises(ConfigError, match="more than the 2 distinct"):  # the texts decide when given
        KMeansRouter(KMeansRouterConfig(num_experts=4)).fit(z, prompts=["a", "b"] * 6)
    KMeansRouter(KMeansRouterConfig(num_experts=3, n_init=1)).fit(z)


def test_random_partition_fit_refuses_empty_groups():
    with pytest.raises(ConfigError, match="num_experts=5 is more than the 3 distinct"):
        RandomPartitionRouter(RandomPartitionRouterConfig(num_experts=5)).fit(_repeated(3, 2))
    RandomPartitionRouter(RandomPartitionRouterConfig(num_experts=3)).fit(_repeated(3, 2))


@pytest.mark.parametrize("pruner", [["router=kmeans"], ["router=ot"],
                                    ["router=kmeans", "pruner=static", "assignment=magnitude",
                                     "pruner.finetune.steps=1", "pruner.finetune.batch_size=2"]])
def test_pruners_refuse_more_experts_than_distinct_prompts(pruner, case_dir, capsys):
    """smoke's 16 world prompts hold 14 distinct texts: 16 experts pass the config check (16 <= 16
    samples) and are refused once the prompts are drawn (APTP with learned OT codes and with a
    fixed router, static), before any training step."""
    rc = main(["run", "smoke", *TINY, *pruner, "router.num_experts=16",
               "--output-dir", str(case_dir / "run")])
    line = _one_error_line(capsys, rc)
    assert "router.num_experts=16 is more than the 14 distinct training prompts (16 prompts, some repeated)" in line
    written = _files(case_dir)
    assert all(p == "run" or p.startswith("run" + os.sep) for p in written), written
    assert not (case_dir / "run" / "experts").exists() and not (case_dir / "run" / "checkpoints").exists()
