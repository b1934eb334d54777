"""analyze(): experts vs labels (NMI / AMI / ARI), kept MACs per label, distinguishing words, report files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from analysis_helpers import BAKING_WORDS, OCEAN_WORDS, make_unit_space

from aptp.analysis import RoutingAnalysis, analyze, distinguishing_words, tokenize, write_report
from aptp.core.errors import ConfigError
from aptp.data.prompts import PromptTable
from aptp.routers.bundle import load_router_bundle, save_router_bundle
from aptp.routers.kmeans import KMeansRouter, KMeansRouterConfig
from aptp.routers.nearest import NearestRouter, NearestRouterConfig
from aptp.routers.ot import OTRouter, OTRouterConfig
from aptp.routers.single import SingleRouter


def _kmeans_bundle(tmp_path, encoder, z, archs: bool):
    r = KMeansRouter(KMeansRouterConfig(num_experts=2))
    r.fit(z)
    space, a = None, None
    if archs:
        space = make_unit_space()
        a = torch.ones(2, space.size)
        a[1, :5] = 0  # expert 1 drops 5 of 8 units: 50 of 1000 MACs -> kept ratio 0.95
    return load_router_bundle(save_router_bundle(tmp_path / "kmeans", encoder, r, space, a))


def test_kmeans_experts_follow_two_disjoint_topics(tmp_path, encoder, topic_prompts, topic_embeddings):
    prompts, topics = topic_prompts
    bundle = _kmeans_bundle(tmp_path, encoder, topic_embeddings, archs=True)
    a = analyze(bundle, prompts, {"Topic": topics}, examples=2)
    assert isinstance(a, RoutingAnalysis) and a.router == "kmeans" and a.num_experts == 2
    assert sorted(a.load) == [16, 16] and sum(a.load) == len(prompts)
    t = a.labels["Topic"]
    assert t.nmi > 0.8 and t.ami > 0.8 and t.ari > 0.8, (t.nmi, t.ami, t.ari)
    # each expert's distinguishing words come from the vocabulary of its own topic
    for e in a.experts:
        mine = {topics[i] for i in range(len(prompts)) if a.expert_ids[i] == e.expert}
        assert len(mine) == 1
        vocab = OCEAN_WORDS if mine == {"ocean"} else BAKING_WORDS
        words = [w.word for w in e.words]
        assert len(words) >= 3 and set(words) <= vocab, (mine, words)
        assert all(w.z > 0 and w.share > w.rest_share == 0.0 for w in e.words)
        assert len(e.examples) == 2 and all(prompts.index(p) in np.flatnonzero(np.array(a.expert_ids) == e.expert)
                                            for p in e.examples)
    # the place words every prompt of a topic shares rank first
    top = {w.word for e in a.experts for w in e.words[:2]}
    assert top & {"ocean", "waves", "harbor", "sea", "stormy"} and top & {"kitchen", "oven", "flour", "baking"}


def test_kept_macs_per_label_sorted_with_counts(tmp_path, encoder, topic_prompts, topic_embeddings):
    prompts, topics = topic_prompts
    bundle = _kmeans_bundle(tmp_path, encoder, topic_embeddings, archs=True)
    a = analyze(bundle, prompts, {"Topic": topics})
    assert a.kept_ratios == pytest.approx([1.0, 0.95])
    rows = a.labels["Topic"].kept_by_label
    small_topic = topics[a.expert_ids.index(1)]  # the topic routed to the 0.95 expert
    assert [r.count for r in rows] == [16, 16]
    assert [r.mean_kept for r in rows] == pytest.approx([1.0, 0.95])
    assert rows[1].label == small_topic and rows[0].std_kept == pytest.approx(0.0)
    assert a.mean_kept == pytest.approx(0.975)
    assert a.labels["Topic"].kept_eta2 == pytest.approx(1.0)  # the topic decides the expert, hence the compute


def test_kept_macs_unavailable_without_architectures(tmp_path, encoder, topic_prompts, topic_embeddings):
    prompts, topics = topic_prompts
    a = analyze(_kmeans_bundle(tmp_path, encoder, topic_embeddings, archs=False), prompts, {"Topic": topics})
    assert a.kept_ratios is None and a.mean_kept is None and a.labels["Topic"].kept_by_label is None
    assert any("unavailable" in n for n in a.notes)
    md = write_report(a, tmp_path / "out")
    assert "unavailable" in md.read_text()
    assert not list((tmp_path / "out").glob("kept_macs_per_label_*.png"))


def test_single_router_reports_one_expert_and_nmi_zero(tmp_path, encoder, topic_prompts):
    prompts, topics = topic_prompts
    bundle = load_router_bundle(save_router_bundle(tmp_path / "single", encoder, SingleRouter()))
    a = analyze(bundle, prompts, {"Topic": topics, "Constant": ["x"] * len(prompts)})
    assert a.num_experts == 1 and a.load == [len(prompts)] and set(a.expert_ids) == {0}
    for col in ("Topic", "Constant"):  # sklearn would score two constant labellings as 1.0
        la = a.labels[col]
        assert (la.nmi, la.ami, la.ari) == (0.0, 0.0, 0.0) and la.kept_by_label is None
    assert a.experts[0].words == []  # nothing to contrast with
    assert "takes every prompt" in write_report(a, tmp_path / "out").read_text()


def _router(kind: str, z: torch.Tensor, topics: list[str]):
    if kind == "ot":
        torch.manual_seed(0)
        r = OTRouter(OTRouterConfig(num_experts=3, offset=0.0)).bind(make_unit_space(), z.shape[1])
        with torch.no_grad():
            r.codes.weight.mul_(5)
        return r.eval(), None
    if kind == "kmeans":
        r = KMeansRouter(KMeansRouterConfig(num_experts=3))
        r.fit(z)
    elif kind == "nearest":
        r = NearestRouter(NearestRouterConfig(num_experts=2))
        r.fit(z, labels=torch.tensor([0 if t == "ocean" else 1 for t in topics]))
    else:
        r = SingleRouter()
    archs = torch.ones(r.num_experts, make_unit_space().size)
    archs[0, :3] = 0
    return r, archs


@pytest.mark.parametrize("kind", ["ot", "kmeans", "nearest", "single"])
def test_every_router_kind_analysed_alike(kind, tmp_path, encoder, topic_prompts, topic_embeddings):
    prompts, topics = topic_prompts
    router, archs = _router(kind, topic_embeddings, topics)
    path = save_router_bundle(tmp_path / kind, encoder, router, make_unit_space(), archs)
    a = analyze(path, prompts, {"Topic": topics}, examples=1)  # by folder
    assert a.router == kind and a.source == str(path) and a.num_experts == router.num_experts
    assert a.expert_ids == router.route(topic_embeddings).expert_ids.tolist()
    assert len(a.load) == len(a.experts) == a.num_experts and sum(a.load) == len(prompts)
    assert a.kept_ratios is not None and len(a.kept_ratios) == a.num_experts
    assert a.map_xy.shape == (len(prompts), 2) and np.isfinite(a.map_xy).all()
    assert sum(r.count for r in a.labels["Topic"].kept_by_label) == len(prompts)
    if kind == "nearest":  # the bank labels are the topics: a perfect match
        assert a.labels["Topic"].nmi == pytest.approx(1.0)
    md = write_report(a, tmp_path / "report")
    names = {p.name for p in md.parent.iterdir()}
    assert {"analysis.md", "analysis.json", "expert_load.png", "embedding_map.png", "labels_per_expert_Topic.png",
            "kept_macs_per_label_Topic.png"} <= names


def test_report_json_and_markdown_hold_the_numbers(tmp_path, encoder, topic_prompts, topic_embeddings):
    prompts, topics = topic_prompts
    bundle = _kmeans_bundle(tmp_path, encoder, topic_embeddings, archs=True)
    a = analyze(bundle, PromptTable(prompts, {"Topic": topics, "Free text": [f"note {i}" for i in range(32)]}),
                map_method="tsne")
    assert list(a.labels) == ["Topic"]  # a table's own free-text column (a value per prompt) is skipped
    assert any("free-text label columns skipped" in n and "Free text" in n for n in a.notes)
    md = write_report(a, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert data["labels"]["Topic"]["nmi"] == pytest.approx(a.labels["Topic"].nmi)
    assert data["load"] == a.load and data["kept_ratios"] == pytest.approx(a.kept_ratios)
    assert data["expert_ids"] == a.expert_ids and data["map_method"] == "tsne"
    text = md.read_text()
    assert f"NMI **{a.labels['Topic'].nmi:.3f}**" in text and "![embedding map](embedding_map.png)" in text
    for e in a.experts:
        assert f"**{e.words[0].word}**" in text
    for png in md.parent.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_max_prompts_samples_prompts_with_their_labels(tmp_path, encoder, topic_prompts, topic_embeddings):
    prompts, topics = topic_prompts
    bundle = _kmeans_bundle(tmp_path, encoder, topic_embeddings, archs=False)
    a = analyze(bundle, prompts, {"Topic": topics}, max_prompts=10, seed=3)
    assert a.num_prompts == 10 and any("random sample of 10 of the 32" in n for n in a.notes)
    assert [prompts.index(p) for p in a.prompts] == sorted(prompts.index(p) for p in a.prompts)  # file order
    la = a.labels["Topic"]
    assert sum(map(sum, la.counts)) == 10
    by_prompt = dict(zip(prompts, topics))
    for k in range(a.num_experts):  # the sampled labels still belong to the sampled prompts
        expected = [sum(by_prompt[p] == lab for p, e in zip(a.prompts, a.expert_ids) if e == k) for lab in la.labels]
        assert la.counts[k] == expected


def test_bad_arguments_say_what_to_do(tmp_path, encoder, topic_prompts, topic_embeddings):
    prompts, topics = topic_prompts
    bundle = _kmeans_bundle(tmp_path, encoder, topic_embeddings, archs=False)
    with pytest.raises(ConfigError, match="'Topik' is not in the prompt file.*Did you mean 'Topic'"):
        analyze(bundle, prompts, {"Topic": topics}, label_columns=["Topik"])
    with pytest.raises(ConfigError, match="has 3 values for 32 prompts"):
        analyze(bundle, prompts, {"Topic": topics[:3]})
    with pytest.raises(ConfigError, match="map_method='umap'"):
        analyze(bundle, prompts, map_method="umap")
    with pytest.raises(ConfigError, match="max_prompts=0"):
        analyze(bundle, prompts, max_prompts=0)
    with pytest.raises(ConfigError, match="RouterBundle or a bundle folder, got KMeansRouter"):
        analyze(bundle.router, prompts)
    with pytest.raises(ConfigError, match="prompt list is empty"):
        analyze(bundle, [])
    with pytest.raises(FileNotFoundError, match="not a router bundle"):
        analyze(tmp_path / "nothing", prompts)


# --- pure functions (no encoder) -----------------------------------------------------------------
def test_tokenize_drops_stop_words_and_case():
    assert tokenize("A Cat's hat, on THE mat -- 2 dogs!") == ["cat's", "hat", "mat", "dogs"]


def test_log_odds_ranks_the_word_unique_to_an_expert_first():
    prompts = ["red apple pie", "red apple tart", "red apple cake", "blue whale song", "blue whale swim", "blue sky"]
    ids = [0, 0, 0, 1, 1, 1]
    words = distinguishing_words(prompts, ids, 3, top=3)
    assert {w.word for w in words[0][:2]} == {"apple", "red"}
    assert words[0][0].share == 1.0 and words[0][0].rest_share == 0.0
    assert {w.word for w in words[1][:2]} == {"blue", "whale"}
    assert "pie" not in {w.word for w in words[0]}  # in one prompt only (min_prompts=2)
    assert words[2] == []  # an expert without prompts
    z = {w.word: w.z for w in words[1]}
    assert z["blue"] > z["whale"] > 0  # 3 of 3 prompts beat 2 of 3


def test_in_memory_bundle_named_from_the_registry(encoder, topic_prompts, topic_embeddings):
    from aptp.routers.bundle import RouterBundle

    prompts, topics = topic_prompts
    r = KMeansRouter(KMeansRouterConfig(num_experts=2))
    r.fit(topic_embeddings)
    r.train()
    a = analyze(RouterBundle(encoder, r), prompts, {"Topic": topics}, top_words=1, examples=0)
    assert a.router == "kmeans" and a.source == "" and r.training  # the caller's mode is restored
    assert all(len(e.words) == 1 and e.examples == [] for e in a.experts)
