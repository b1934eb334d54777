"""Routing analysis: what did the router learn? Which prompts go to which expert, and how big is it?

The paper's qualitative finding (APTP, arXiv 2406.12042, Sec. 5) is that the learned experts are
semantically meaningful and that prompts known to be hard (text rendering, people) go to the
largest experts. :func:`analyze` answers that for any router bundle and any prompt set::

    a = analyze("runs/demo/router", "PartiPrompts.tsv", label_columns=["Category", "Challenge"])
    a.labels["Challenge"].nmi           # how strongly experts and labels go together
    a.labels["Challenge"].kept_by_label # mean kept-MACs ratio per label, largest first
    write_report(a, "runs/demo/router/analysis")  # analysis.md + PNG figures + analysis.json

It reads only the bundle's public surface (encoder, router scores, kept-MACs ratios), so every
router kind (ot, kmeans, nearest, single, or a plugin's) is analysed the same way.

What is computed
* load per expert and each expert's kept-MACs ratio (kept MACs / dense MACs; None without the
  bundle's unit space + architectures);
* per label column: the (K, L) contingency table of experts x labels, the mean kept-MACs ratio of
  the prompts of each label (sorted, with counts), and NMI / AMI / ARI between experts and labels
  (defined as 0 when either labelling is constant: one expert or one label carries no information);
* per expert: distinguishing words, by the weighted log-odds ratio with an informative Dirichlet
  prior (Monroe, Colaresi & Quinn 2008, "Fightin' Words"), expert vs the rest, over lowercase word
  tokens minus stop-words, each word counted once per prompt; and the prompts the router scores
  highest for the expert as examples;
* a 2-D map of the prompt embeddings (PCA, or t-SNE) coloured by expert.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aptp.core.errors import ConfigError, did_you_mean

MAP_METHODS = ("pca", "tsne")
MAX_AUTO_LABEL_VALUES = 50  # label columns with more distinct values (free text, e.g. Note) are skipped by default
EMPTY_LABEL = "(empty)"

#: Small English stop-word list: function words that say nothing about a prompt's topic.
STOP_WORDS = frozenset("""
a an the and or but nor of in on at to for from by with without within into onto over under above below
up down out off about as is are was were be been being am it its it's this that these those there here
his her hers him he she they them their theirs we us our you your i me my mine who whom whose which what
when where why how all any each every some no not very so than too can will would should could may might
has have had having do does did doing just also only then while against between through during before
after again further once other such own same s t one""".split())

_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


# --- results ------------------------------------------------------------------------------------
@dataclass
class WordScore:
    """A word that distinguishes an expert's prompts from the rest."""

    word: str
    z: float  # log-odds z-score, expert vs rest (> 0: more frequent in the expert's prompts)
    share: float  # fraction of the expert's prompts containing the word
    rest_share: float  # fraction of the other prompts containing the word


@dataclass
class ExpertSummary:
    """One expert: its load, size, distinguishing words and example prompts."""

    expert: int
    load: int  # prompts routed to it
    share: float  # load / N
    kept_ratio: float | None  # kept MACs / dense MACs, None without architectures
    words: list[WordScore] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)


@dataclass
class LabelKept:
    """Kept-MACs ratio of the experts that the prompts of one label go to."""

    label: str
    count: int  # prompts with this label
    mean_kept: float  # mean kept-MACs ratio of their experts
    std_kept: float


@dataclass
class LabelAnalysis:
    """Experts vs one label column (e.g. PartiPrompts' Category)."""

    column: str
    labels: list[str]  # distinct values, most frequent first
    counts: list[list[int]]  # (K, L) prompts of expert k with label l
    nmi: float  # normalised mutual information (arithmetic mean), 0 = independent, 1 = same partition
    ami: float  # adjusted mutual information (corrected for chance; ~0 for random routing)
    ari: float  # adjusted Rand index
    kept_by_label: list[LabelKept] | None  # sorted by mean kept ratio, largest first; None without architectures
    kept_eta2: float | None = None  # share of the variance of the prompts' kept ratios explained by the label

    def label_shares(self) -> np.ndarray:
        """(K, L) share of each expert's prompts that carry each label (rows sum to 1; 0 for idle experts)."""
        c = np.asarray(self.counts, dtype=np.float64).reshape(len(self.counts), len(self.labels))
        return c / np.maximum(c.sum(axis=1, keepdims=True), 1)


@dataclass
class RoutingAnalysis:
    """Everything :func:`analyze` measured; ``to_json()`` for the numbers, ``write_report`` for figures."""

    router: str  # registered router name (ot, kmeans, nearest, single, ...)
    source: str  # the bundle folder, or "" for an in-memory bundle
    num_experts: int  # K
    prompts: list[str]
    expert_ids: list[int]  # (N,) expert of each prompt
    load: list[int]  # (K,)
    kept_ratios: list[float] | None  # (K,), None without unit space + architectures
    experts: list[ExpertSummary]
    labels: dict[str, LabelAnalysis]  # per label column
    map_method: str  # "pca" or "tsne"
    map_xy: np.ndarray = field(repr=False)  # (N, 2) 2-D map of the prompt embeddings
    map_note: str = ""  # e.g. the variance the two PCA components explain
    notes: list[str] = field(default_factory=list)  # e.g. sub-sampling, unavailable parts

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def mean_kept(self) -> float | None:
        """Mean kept-MACs ratio over the prompts (the routed model's average cost)."""
        if self.kept_ratios is None:
            return None
        return float(np.mean([self.kept_ratios[k] for k in self.expert_ids]))

    def to_dict(self) -> dict[str, Any]:
        """The numbers as plain JSON types (prompts and the 2-D map left out: they are inputs / figures)."""
        return {
            "router": self.router,
            "source": self.source,
            "num_prompts": self.num_prompts,
            "num_experts": self.num_experts,
            "load": self.load,
            "kept_ratios": self.kept_ratios,
            "mean_kept_ratio": self.mean_kept,
            "experts": [asdict(e) for e in self.experts],
            "labels": {c: asdict(a) for c, a in self.labels.items()},
            "map_method": self.map_method,
            "map_note": self.map_note,
            "notes": self.notes,
            "expert_ids": self.expert_ids,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# --- the analysis -------------------------------------------------------------------------------
def analyze(bundle_or_dir: Any, prompts: Any, labels: Mapping[str, Sequence[str]] | None = None, *,
            label_columns: Sequence[str] | None = None, max_prompts: int | None = None,
            top_words: int = 8, examples: int = 3, map_method: str = "pca", seed: int = 0,
            progress: bool | None = None, registry: Any = None) -> RoutingAnalysis:
    """Route ``prompts`` with a router bundle and measure what the experts stand for.

    Args:
        bundle_or_dir: a :class:`~aptp.routers.bundle.RouterBundle` or the folder of one.
        prompts: a list of prompts, a :class:`~aptp.data.prompts.PromptTable`, or a prompt file path
            (one prompt per line, or TSV/CSV with a ``Prompt`` column and label columns).
        labels: label columns, name -> one value per prompt (default: a table's label columns).
        label_columns: which label columns to analyse (case-insensitive); default: all of ``labels``,
            or, for a table's own columns, those with at most ``MAX_AUTO_LABEL_VALUES`` distinct
            values and at most one per two prompts (so free-text columns are skipped).
        max_prompts: analyse a seeded random sample of this many prompts (file order kept).
        top_words / examples: distinguishing words and example prompts reported per expert.
        map_method: "pca" or "tsne" for the 2-D map of the embeddings.
        seed: seeds the sub-sample and t-SNE.
        progress: tqdm bar while encoding (None: only on a terminal, for many prompts).
        registry: the components a bundle folder is rebuilt from and a router's name is looked up
            in (default: the installed plugins').
    """
    from aptp.data.prompts import PromptTable, read_prompt_table
    from aptp.routers.bundle import RouterBundle, load_router_bundle

    if map_method not in MAP_METHODS:
        raise ConfigError(f"map_method={map_method!r} is not one of {MAP_METHODS}; pick 'pca' (fast) or 'tsne'.")
    if top_words < 0 or examples < 0:
        raise ConfigError(f"top_words={top_words} and examples={examples} must be >= 0.")
    if isinstance(prompts, (str, Path)):  # read the prompts first: a bad file fails before any model loads
        prompts = read_prompt_table(prompts)
    from_table = labels is None and isinstance(prompts, PromptTable)
    if isinstance(prompts, PromptTable):
        labels = dict(prompts.labels) if labels is None else labels
        prompts = prompts.prompts
    prompts, labels = _check_inputs(prompts, labels or {})
    notes: list[str] = []
    if label_columns is None and from_table:
        skipped = [c for c, v in labels.items() if len(set(v)) > min(MAX_AUTO_LABEL_VALUES, len(v) / 2)]
        labels = {c: v for c, v in labels.items() if c not in skipped}
        if skipped:
            notes.append(f"free-text label columns skipped (more than {MAX_AUTO_LABEL_VALUES} distinct values, or "
                         f"more than one per two prompts): {', '.join(skipped)} (name them with label_columns / "
                         "--label-columns to include them).")
    labels = _select_columns(labels, label_columns)

    if max_prompts is not None:
        if max_prompts < 1:
            raise ConfigError(f"max_prompts={max_prompts} must be >= 1 (or None for all prompts).")
        if len(prompts) > max_prompts:
            keep = np.sort(np.random.default_rng(seed).choice(len(prompts), max_prompts, replace=False))
            notes.append(f"a random sample of {max_prompts} of the {len(prompts)} prompts (seed {seed}).")
            prompts = [prompts[i] for i in keep]
            labels = {c: [v[i] for i in keep] for c, v in labels.items()}

    if registry is None:
        from aptp.core.plugins import default_registry

        registry = default_registry()
    source = ""
    if isinstance(bundle_or_dir, RouterBundle):
        bundle = bundle_or_dir
    elif isinstance(bundle_or_dir, (str, Path)):
        source = str(bundle_or_dir)
        bundle = load_router_bundle(bundle_or_dir, registry)
    else:
        raise ConfigError(f"analyze needs a RouterBundle or a bundle folder, got {type(bundle_or_dir).__name__}; "
                          "save a router with save_router_bundle(dir, encoder, router) and pass dir.")

    # route exactly as aptp route does (argmax of the router's scores), keeping the embeddings
    z = _encode(bundle.encoder, prompts, progress)  # (N, D)
    was_training = bundle.router.training
    try:
        bundle.router.eval()  # inference routing, whatever state an in-memory router is in
        with torch.no_grad():
            routing = bundle.router.route(z)
    finally:
        bundle.router.train(was_training)
    ids = routing.expert_ids.cpu().numpy().astype(np.int64)  # (N,)
    scores = routing.scores.detach().cpu().to(torch.float64).numpy()  # (N, K)
    K = int(bundle.num_experts)
    load = np.bincount(ids, minlength=K)  # (K,)
    kept_t = bundle.kept_ratios()
    kept = None if kept_t is None else [float(x) for x in kept_t.tolist()]
    if kept is None:
        notes.append("kept-MACs ratios are unavailable: the bundle has no unit space + architectures "
                     "(save it with save_router_bundle(..., unit_space=..., architectures=...)).")

    words = distinguishing_words(prompts, ids, K, top=top_words)
    experts = []
    for k in range(K):
        members = np.flatnonzero(ids == k)
        order = members[np.argsort(-scores[members, k], kind="stable")]  # most confidently routed first
        experts.append(ExpertSummary(k, int(load[k]), float(load[k] / len(prompts)),
                                     None if kept is None else kept[k], words[k],
                                     [prompts[i] for i in order[:examples]]))

    label_results = {c: _label_analysis(c, values, ids, K, kept) for c, values in labels.items()}
    xy, map_note = embedding_map(z.numpy(), map_method, seed=seed)
    return RoutingAnalysis(_router_name(bundle, registry), source, K, list(prompts), ids.tolist(), load.tolist(), kept, experts,
                           label_results, map_method, xy, map_note, notes)


def _router_name(bundle: Any, registry: Any) -> str:
    """The router's registered name: from bundle.json, else looked up in ``registry``, else its class name."""
    name = bundle.info.get("router", {}).get("name")
    if name:
        return str(name)
    for spec in registry["router"]:
        if spec.factory is type(bundle.router):
            return spec.name
    return type(bundle.router).__name__


def _encode(encoder: Any, prompts: list[str], progress: bool | None) -> torch.Tensor:
    import inspect

    if "progress" in inspect.signature(encoder.encode).parameters:
        z = encoder.encode(prompts, progress=progress)
    else:
        z = encoder.encode(prompts)
    return z.detach().cpu().to(torch.float32)  # (N, D)


def _check_inputs(prompts: Any, labels: Mapping[str, Sequence[str]]) -> tuple[list[str], dict[str, list[str]]]:
    from aptp.routers._checks import check_prompts

    prompts = check_prompts(prompts)
    out: dict[str, list[str]] = {}
    for col, values in labels.items():
        values = list(values)
        if len(values) != len(prompts):
            raise ConfigError(f"label column {col!r} has {len(values)} values for {len(prompts)} prompts; "
                              "give one value per prompt.")
        out[str(col)] = [str(v).strip() or EMPTY_LABEL for v in values]
    return prompts, out


def _select_columns(labels: dict[str, list[str]], columns: Sequence[str] | None) -> dict[str, list[str]]:
    if columns is None:
        return labels
    by_lower = {c.lower(): c for c in labels}
    chosen: dict[str, list[str]] = {}
    for col in columns:
        name = by_lower.get(col.strip().lower())
        if name is None:
            known = ", ".join(labels) or "none: the prompts have no label columns (use a TSV/CSV with a header)"
            raise ConfigError(f"label column {col!r} is not in the prompt file (columns: {known})."
                              f"{did_you_mean(col, list(labels))}")
        chosen[name] = labels[name]
    return chosen


def _label_analysis(column: str, values: list[str], ids: np.ndarray, K: int,
                    kept: list[float] | None) -> LabelAnalysis:
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

    counts_by_label = Counter(values)
    names = sorted(counts_by_label, key=lambda v: (-counts_by_label[v], v))  # most frequent first
    index = {v: j for j, v in enumerate(names)}
    lab = np.array([index[v] for v in values], dtype=np.int64)  # (N,)
    table = np.zeros((K, len(names)), dtype=np.int64)  # (K, L)
    np.add.at(table, (ids, lab), 1)
    if len(np.unique(ids)) < 2 or len(names) < 2:
        # sklearn scores two constant labellings as identical (1.0); a constant labelling carries no
        # information about the other, so it is 0 here (a single expert says nothing about labels)
        nmi = ami = ari = 0.0
    else:
        nmi = float(normalized_mutual_info_score(lab, ids))
        ami = float(adjusted_mutual_info_score(lab, ids))
        ari = float(adjusted_rand_score(lab, ids))
    kept_by_label, kept_eta2 = None, None
    if kept is not None:
        per_prompt = np.asarray(kept, dtype=np.float64)[ids]  # (N,)
        kept_by_label = [LabelKept(v, int((lab == j).sum()), float(per_prompt[lab == j].mean()),
                                   float(per_prompt[lab == j].std())) for j, v in enumerate(names)]
        kept_by_label.sort(key=lambda r: (-r.mean_kept, r.label))
        # eta^2 = between-label sum of squares / total sum of squares (0: same compute for every label)
        total = float(((per_prompt - per_prompt.mean()) ** 2).sum())
        between = sum(r.count * (r.mean_kept - per_prompt.mean()) ** 2 for r in kept_by_label)
        kept_eta2 = float(between / total) if total > 0 else 0.0
    return LabelAnalysis(column, names, table.tolist(), nmi, ami, ari, kept_by_label, kept_eta2)


# --- distinguishing words -----------------------------------------------------------------------
def tokenize(prompt: str) -> list[str]:
    """Lowercase word tokens of a prompt, stop-words and one-character tokens removed."""
    return [t for t in _TOKEN.findall(prompt.lower()) if len(t) > 1 and t not in STOP_WORDS]


def distinguishing_words(prompts: Sequence[str], expert_ids: Sequence[int] | np.ndarray, num_experts: int,
                         top: int = 8, min_prompts: int = 2) -> list[list[WordScore]]:
    """Top words of each expert's prompts vs the rest, by weighted log-odds with an informative prior.

    Monroe et al. (2008), eq. 16-22: with y_w the number of the expert's prompts containing word w,
    n = the sum over words, and the same for the rest (y'_w, n'), and a prior a_w = the count of w
    over all prompts (a_0 = its sum),
    ``delta_w = log((y_w + a_w) / (n + a_0 - y_w - a_w)) - log((y'_w + a_w) / (n' + a_0 - y'_w - a_w))``,
    ``z_w = delta_w / sqrt(1 / (y_w + a_w) + 1 / (y'_w + a_w))``. Words in fewer than ``min_prompts``
    of the expert's prompts are skipped. An expert with no prompts, or no other prompts to compare
    with (one expert takes everything), gets no words.
    """
    ids = np.asarray(expert_ids, dtype=np.int64)
    docs = [set(tokenize(p)) for p in prompts]  # each word counted once per prompt
    vocab = sorted(set().union(*docs)) if docs else []
    if not vocab:
        return [[] for _ in range(num_experts)]
    col = {w: j for j, w in enumerate(vocab)}
    counts = np.zeros((num_experts, len(vocab)), dtype=np.float64)  # (K, V) prompts of expert k with word w
    for k, doc in zip(ids, docs):
        for w in doc:
            counts[k, col[w]] += 1
    prior = counts.sum(axis=0)  # (V,) a_w
    a0 = prior.sum()
    out: list[list[WordScore]] = []
    for k in range(num_experts):
        n_in, n_out = int((ids == k).sum()), int((ids != k).sum())
        if n_in == 0 or n_out == 0:
            out.append([])
            continue
        y, y_rest = counts[k], prior - counts[k]  # (V,)
        n, n_rest = y.sum(), y_rest.sum()
        delta = (np.log((y + prior) / (n + a0 - y - prior)) -
                 np.log((y_rest + prior) / (n_rest + a0 - y_rest - prior)))  # (V,)
        z = delta / np.sqrt(1.0 / (y + prior) + 1.0 / (y_rest + prior))  # (V,)
        z[y < min(min_prompts, n_in)] = -np.inf
        best = [j for j in np.argsort(-z, kind="stable")[:top] if np.isfinite(z[j]) and z[j] > 0]
        out.append([WordScore(vocab[j], float(z[j]), float(y[j] / n_in), float(y_rest[j] / n_out)) for j in best])
    return out


# --- the 2-D map --------------------------------------------------------------------------------
def embedding_map(z: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, 2) coordinates of the embeddings (N, D) by PCA or t-SNE, and a one-line note."""
    n = z.shape[0]
    if n < 3:  # too few points for either method: place them on a line
        return np.stack([np.arange(n, dtype=np.float64), np.zeros(n)], axis=1), f"{n} prompts: no projection"
    z = z.astype(np.float64)
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed).fit(z)
        ev = pca.explained_variance_ratio_
        return pca.transform(z), f"PCA: the two components explain {ev[0]:.1%} + {ev[1]:.1%} of the variance"
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z)
    return xy, f"t-SNE (perplexity {perplexity:g}): distances between far clusters are not meaningful"


# --- the report ---------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "column"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _short(text: str, width: int = 28) -> str:
    """A label cut to ``width`` characters for a figure's tick."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_report(analysis: RoutingAnalysis, out_dir: str | Path, dpi: int = 120) -> Path:
    """Write ``analysis.md``, ``analysis.json`` and the PNG figures to ``out_dir``; returns the .md path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = _write_figures(analysis, out, dpi)
    (out / "analysis.json").write_text(analysis.to_json() + "\n")
    md = out / "analysis.md"
    md.write_text(_markdown(analysis, figures))
    return md


def _write_figures(a: RoutingAnalysis, out: Path, dpi: int) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figs: dict[str, str] = {}
    K = a.num_experts
    colors = plt.get_cmap("tab10" if K <= 10 else "tab20")
    expert_color = [colors(k % colors.N) for k in range(K)]

    # load per expert, with each expert's kept-MACs ratio
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * K + 2), 3.4))
    bars = ax.bar(range(K), a.load, color=expert_color)
    ax.set_xticks(range(K))
    ax.set_xlabel("expert")
    ax.set_ylabel("prompts routed")
    title = f"{a.router} router: load per expert (N={a.num_prompts})"
    if a.kept_ratios is not None:
        for b, r in zip(bars, a.kept_ratios):
            ax.annotate(f"{r:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
        title += "\n(numbers: kept-MACs ratio)"
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(out / "expert_load.png", dpi=dpi)
    plt.close(fig)
    figs["load"] = "expert_load.png"

    for col, la in a.labels.items():
        name = _safe(col)
        shares = la.label_shares()  # (K, L)
        L = len(la.labels)
        ticks = [_short(v) for v in la.labels]
        longest = max(len(t) for t in ticks)  # rotated 45 degrees below the heatmap
        fig, ax = plt.subplots(figsize=(min(3.0 + 0.1 * longest + 0.55 * L, 24), 1.6 + 0.4 * K + 0.07 * longest))
        im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=max(shares.max(), 1e-9), aspect="auto")
        for k in range(K):
            for j in range(L):
                c = la.counts[k][j]
                if c:
                    ax.text(j, k, str(c), ha="center", va="center", fontsize=7,
                            color="white" if shares[k, j] > 0.6 * shares.max() else "black")
        ax.set_xticks(range(L))
        ax.set_xticklabels(ticks, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_yticks(range(K))
        ax.set_yticklabels([f"{k} (n={a.load[k]}" + ("" if a.kept_ratios is None else f", {a.kept_ratios[k]:.2f}")
                            + ")" for k in range(K)], fontsize=8)
        ax.set_ylabel("expert (prompts" + ("" if a.kept_ratios is None else ", kept MACs") + ")")
        ax.set_title(f"{col} per expert: share of the expert's prompts (numbers: counts)\n"
                     f"NMI {la.nmi:.3f}, AMI {la.ami:.3f}, ARI {la.ari:.3f}", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
        fig.tight_layout()
        fname = f"labels_per_expert_{name}.png"
        fig.savefig(out / fname, dpi=dpi)
        plt.close(fig)
        figs[f"labels:{col}"] = fname

        if la.kept_by_label is not None:
            rows = la.kept_by_label
            fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.3 * len(rows)))
            y = np.arange(len(rows))[::-1]
            ax.barh(y, [r.mean_kept for r in rows], xerr=[r.std_kept for r in rows], color="tab:blue",
                    error_kw={"elinewidth": 0.8, "ecolor": "0.4"})
            ax.set_yticks(y)
            ax.set_yticklabels([f"{_short(r.label)} (n={r.count})" for r in rows], fontsize=8)
            overall = a.mean_kept
            if overall is not None:
                ax.axvline(overall, color="tab:red", lw=1, ls="--", label=f"all prompts {overall:.3f}")
                ax.legend(fontsize=8, loc="lower right")
            lo = min(r.mean_kept - r.std_kept for r in rows)
            ax.set_xlim(max(0.0, lo - 0.05), 1.0 + 0.01)
            ax.set_xlabel("mean kept-MACs ratio of the prompts' experts (bars: std)")
            ax.set_title(f"Kept MACs per {col} (eta² {la.kept_eta2:.3f})", fontsize=10)
            fig.tight_layout()
            fname = f"kept_macs_per_label_{name}.png"
            fig.savefig(out / fname, dpi=dpi)
            plt.close(fig)
            figs[f"kept:{col}"] = fname

    # 2-D map of the prompt embeddings, coloured by expert
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    ids = np.asarray(a.expert_ids)
    size = float(np.clip(8000 / max(a.num_prompts, 1), 6, 40))
    for k in range(K):
        m = ids == k
        if m.any():
            lab = f"{k} (n={a.load[k]}" + ("" if a.kept_ratios is None else f", {a.kept_ratios[k]:.2f}") + ")"
            ax.scatter(a.map_xy[m, 0], a.map_xy[m, 1], s=size, color=expert_color[k], alpha=0.75,
                       linewidths=0, label=lab)
    ax.set_title(f"Prompt embeddings ({a.map_method.upper() if a.map_method == 'pca' else 't-SNE'}), "
                 "coloured by expert", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2.0, loc="best", title="expert", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "embedding_map.png", dpi=dpi)
    plt.close(fig)
    figs["map"] = "embedding_map.png"
    return figs


def _markdown(a: RoutingAnalysis, figs: dict[str, str]) -> str:
    L: list[str] = []
    add = L.append
    add(f"# Routing analysis: `{a.router}` router, K={a.num_experts}, {a.num_prompts} prompts\n")
    if a.source:
        add(f"Router bundle: `{a.source}`\n")
    if a.mean_kept is not None:
        add(f"Mean kept-MACs ratio over the prompts: **{a.mean_kept:.3f}**\n")
    for note in a.notes:
        add(f"> {note}\n")

    add("## Load and size per expert\n")
    add(f"![load per expert]({figs['load']})\n")
    add("| expert | prompts | share | kept-MACs ratio |")
    add("|---:|---:|---:|---:|")
    for e in a.experts:
        add(f"| {e.expert} | {e.load} | {e.share:.1%} | {_fmt(e.kept_ratio)} |")
    add("")

    for col, la in a.labels.items():
        add(f"## {col}\n")
        add(f"Experts vs {col}: NMI **{la.nmi:.3f}**, AMI {la.ami:.3f}, ARI {la.ari:.3f} "
            f"({len(la.labels)} labels; NMI 1 = the experts are exactly the labels, "
            "AMI/ARI ~0 = no more than chance).\n")
        if la.kept_by_label is None:
            add("Kept MACs per label: unavailable (the bundle has no unit space + architectures).\n")
        else:
            add(f"### Mean kept-MACs ratio per {col} (largest experts first)\n")
            add(f"{col} explains {la.kept_eta2:.1%} of the variance of the prompts' kept-MACs ratios (eta²).\n")
            add(f"![kept MACs per {col}]({figs[f'kept:{col}']})\n")
            add(f"| {_md_cell(col)} | prompts | mean kept | std |")
            add("|---|---:|---:|---:|")
            for r in la.kept_by_label:
                add(f"| {_md_cell(r.label)} | {r.count} | {r.mean_kept:.3f} | {r.std_kept:.3f} |")
            add("")
        add(f"### {col} per expert\n")
        add(f"![{col} per expert]({figs[f'labels:{col}']})\n")
        add(f"| expert | prompts | top {_md_cell(col)} (share of the expert's prompts) |")
        add("|---:|---:|---|")
        shares = la.label_shares()
        for k in range(a.num_experts):
            top = np.argsort(-shares[k], kind="stable")[:3]
            cells = ", ".join(f"{_md_cell(la.labels[j])} {shares[k, j]:.0%}" for j in top if la.counts[k][j])
            add(f"| {k} | {a.load[k]} | {cells or '-'} |")
        add("")

    add("## What each expert's prompts are about\n")
    add("Distinguishing words: weighted log-odds with an informative Dirichlet prior (Monroe et al. 2008), "
        "the expert's prompts vs all others; z > 2 is a clear difference. `share` = fraction of the expert's "
        "prompts with the word (vs the other prompts). Examples: the prompts the router scores highest for "
        "the expert.\n")
    for e in a.experts:
        head = f"### Expert {e.expert}: {e.load} prompts"
        if e.kept_ratio is not None:
            head += f", kept-MACs ratio {e.kept_ratio:.3f}"
        add(head + "\n")
        if e.words:
            add("Words: " + ", ".join(f"**{_md_cell(w.word)}** (z {w.z:.1f}, {w.share:.0%} vs {w.rest_share:.0%})"
                                     for w in e.words) + "\n")
        elif e.load and e.load == a.num_prompts:
            add("Words: - (this expert takes every prompt: nothing to contrast with)\n")
        else:
            add("Words: -\n")
        for p in e.examples:
            add(f"- {_md_cell(p)}")
        add("")

    add("## Map of the prompt embeddings\n")
    add(f"![embedding map]({figs['map']})\n")
    if a.map_note:
        add(f"{a.map_note}.\n")
    return "\n".join(L) + "\n"
