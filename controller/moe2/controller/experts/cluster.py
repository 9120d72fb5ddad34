"""Clusters of the prompt space (paper §V-A, Appendix A): embed prompts with the gate's
sentence encoder, group them with K-means, and say what each cluster holds.

Each cluster becomes the fine-tuning set of one domain expert, so the experts specialise
along the same directions the gate sees.

    clusters = kmeans(embeddings, k=4, seed=0)       # labels (n,), centroids (k, dim)
    choice = choose_k(embeddings, range(2, 17))      # K by the data: the best silhouette
    agreement(clusters.labels, subjects)             # purity / adjusted Rand vs chance
    plot_composition(composition(clusters.labels, subjects, 4), Path("clusters.png"))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe2.shared.errors import ConfigError


@dataclass(frozen=True)
class Clusters:
    labels: np.ndarray  # (n,) int, the cluster of each prompt
    centroids: np.ndarray  # (k, dim) float32
    inertia: float  # sum of squared distances to the nearest centroid

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


def kmeans(emb: np.ndarray, k: int, seed: int = 0) -> Clusters:
    """K-means on (n, dim) embeddings. The encoder's rows have unit norm, so the squared
    Euclidean distance is 2 - 2·cosine: K-means groups prompts by cosine similarity."""
    from sklearn.cluster import KMeans

    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or len(emb) == 0:
        raise ConfigError("clustering needs a non-empty (prompts, dim) embedding matrix")
    if not 2 <= k <= len(emb):
        raise ConfigError(f"K must be between 2 and the number of prompts ({len(emb)}); got {k}")
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(emb)
    return Clusters(
        labels=km.labels_.astype(np.int64),
        centroids=km.cluster_centers_.astype(np.float32),
        inertia=float(km.inertia_),
    )


@dataclass(frozen=True)
class KChoice:
    k: int
    silhouettes: dict[int, float]  # K tried -> mean silhouette (cosine), higher is better
    clusters: Clusters  # K-means with the chosen K


def choose_k(
    emb: np.ndarray, candidates: Sequence[int], seed: int = 0, sample: int = 3000
) -> KChoice:
    """K by the data: K-means for every candidate K, keeping the one whose clusters have the
    highest mean silhouette (how much nearer each prompt is to its own cluster than to the
    next; cosine distance, on a seeded sample of at most ``sample`` prompts)."""
    from sklearn.metrics import silhouette_score

    emb = np.asarray(emb, dtype=np.float32)
    ks = sorted({k for k in candidates if 2 <= k < len(emb)})
    if not ks:
        raise ConfigError(
            f"no K to try: candidates {list(candidates)} must lie between 2 and the number of "
            f"prompts less one ({len(emb) - 1})"
        )
    scores: dict[int, float] = {}
    best: Clusters | None = None
    for k in ks:
        c = kmeans(emb, k, seed)
        if len(np.unique(c.labels)) < 2:
            continue
        scores[k] = float(
            silhouette_score(
                emb, c.labels, metric="cosine", sample_size=min(sample, len(emb)), random_state=seed
            )
        )
        if best is None or scores[k] > scores[best.k]:
            best = c
    if best is None:
        raise ConfigError("every K tried put all prompts in one cluster: are they all alike?")
    return KChoice(best.k, scores, best)


def assign(emb: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n,) index of the nearest centroid of each row: how a new prompt joins a cluster."""
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] != centroids.shape[1]:
        raise ConfigError(
            f"embeddings of width {emb.shape[-1]} do not match centroids of width "
            f"{centroids.shape[1]} (another encoder?)"
        )
    d = (emb**2).sum(1)[:, None] - 2 * emb @ centroids.T + (centroids**2).sum(1)[None]
    return d.argmin(1)


def purity(clusters: np.ndarray, labels: Sequence[str]) -> float:
    """Share of prompts whose cluster's most common label is their own label."""
    lab = np.asarray(labels)
    hits = 0
    for c in np.unique(clusters):
        _, counts = np.unique(lab[clusters == c], return_counts=True)
        hits += int(counts.max())
    return hits / len(lab)


def agreement(clusters: np.ndarray, labels: Sequence[str], seed: int = 0) -> dict[str, float]:
    """How well clusters follow known labels (MMLU subjects...), next to the same numbers for
    a shuffled assignment with the same cluster sizes: what chance gives."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    shuffled = np.random.default_rng(seed).permutation(clusters)
    return {
        "purity": purity(clusters, labels),
        "purity_shuffled": purity(shuffled, labels),
        "adjusted_rand": float(adjusted_rand_score(labels, clusters)),
        "adjusted_rand_shuffled": float(adjusted_rand_score(labels, shuffled)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "nmi_shuffled": float(normalized_mutual_info_score(labels, shuffled)),
    }


@dataclass(frozen=True)
class Composition:
    """counts[j, c]: prompts of label j in cluster c."""

    labels: list[str]  # sorted by the cluster that holds most of each label
    counts: np.ndarray  # (labels, k) int

    def summary(self, top: int = 5) -> list[dict[str, Any]]:
        """Per cluster: size and its most common labels, with the share of each label's
        prompts that landed in this cluster."""
        out = []
        for c in range(self.counts.shape[1]):
            col = self.counts[:, c]
            order = np.argsort(-col, kind="stable")[:top]
            out.append(
                {
                    "cluster": c,
                    "size": int(col.sum()),
                    "top": [
                        {
                            "label": self.labels[j],
                            "count": int(col[j]),
                            "share_of_label": round(float(col[j] / self.counts[j].sum()), 3),
                        }
                        for j in order
                        if col[j] > 0
                    ],
                }
            )
        return out


def composition(clusters: np.ndarray, labels: Sequence[str], k: int) -> Composition:
    names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    counts = np.zeros((len(names), k), dtype=np.int64)
    for c, lab in zip(clusters, labels):
        counts[index[lab], int(c)] += 1
    # Order labels by their dominant cluster, then by how concentrated they are there, so
    # the plot reads as blocks (as the paper's Fig. 6 does).
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    order = sorted(range(len(names)), key=lambda j: (int(share[j].argmax()), -share[j].max()))
    return Composition([names[j] for j in order], counts[order])


def plot_composition(comp: Composition, path: Path, title: str = "") -> Path:
    """A heat map like the paper's Fig. 6: one row per label, one column per cluster, colour
    = share of the label's prompts in that cluster. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    share = comp.counts / np.maximum(comp.counts.sum(1, keepdims=True), 1)
    n_labels, k = share.shape
    fig, ax = plt.subplots(figsize=(2.0 + 0.6 * k, 1.2 + 0.19 * n_labels))
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), [f"{c}\n({int(comp.counts[:, c].sum())})" for c in range(k)])
    ax.set_yticks(range(n_labels), comp.labels, fontsize=7)
    ax.set_xlabel("cluster (prompts)")
    ax.set_title(title or "share of each label's prompts per cluster", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
