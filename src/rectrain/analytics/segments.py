"""Customer segments: k-means (scikit-learn) over user vectors, k given or chosen by silhouette.

Vectors are L2-normalised before clustering by default (``normalize=True``): the direction of a
user embedding is the taste, its length mostly activity and training time, and the segment of a
history must not depend on how long it is. Centroids live in the same (normalised) space, so
assigning a new vector is ``argmin_j ||v / |v| - c_j||^2`` (:func:`rectrain.artifacts.assign_segments`, numpy only: the scorer runs it too).

Segments are numbered by size, largest first, so the numbering is stable between runs that find the
same partition.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from rectrain.artifacts import SEGMENTS_FORMAT, assign_segments, normalize_rows
from rectrain.errors import RectrainError

#: above this many users MiniBatchKMeans replaces KMeans (same objective, bounded memory and time)
MINIBATCH_ABOVE = 50_000
FORMAT_VERSION = SEGMENTS_FORMAT


@dataclass
class SegmentFit:
    """The clustering: centroids (k, d) in the clustered space, labels (n,), and how k was chosen."""

    centroids: np.ndarray
    labels: np.ndarray
    k: int
    silhouette: dict[int, float]
    inertia: float
    normalize: bool
    seed: int
    algorithm: str
    chosen_by: str  # "given" or "silhouette"

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)

    def assign(self, vectors: np.ndarray) -> np.ndarray:
        return assign_segments(vectors, self.centroids, self.normalize)


def parse_k_range(text: str | Sequence[int]) -> tuple[int, int]:
    """``"2-12"`` (or a pair) -> (2, 12), both ends included; RectrainError names ``k_range``."""
    if isinstance(text, str):
        lo, sep, hi = text.partition("-")
        try:
            pair = (int(lo), int(hi)) if sep else (int(lo), int(lo))
        except ValueError:
            raise RectrainError(f"k_range must look like 2-12, got {text!r}") from None
    else:
        pair = (int(text[0]), int(text[-1]))
    if pair[0] < 2 or pair[1] < pair[0]:
        raise RectrainError(f"k_range must be lo-hi with 2 <= lo <= hi, got {text!r}")
    return pair


def _kmeans(x: np.ndarray, k: int, seed: int, n_init: int) -> tuple[Any, str]:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if x.shape[0] > MINIBATCH_ABOVE:
        model = MiniBatchKMeans(n_clusters=k, n_init=max(3, n_init // 3), random_state=seed, batch_size=4096)
        return model.fit(x), "MiniBatchKMeans"
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x), "KMeans"


def _silhouette(x: np.ndarray, labels: np.ndarray, sample_size: int, seed: int) -> float:
    from sklearn.metrics import silhouette_score

    if np.unique(labels).size < 2:
        return float("nan")
    size = sample_size if x.shape[0] > sample_size else None
    return float(silhouette_score(x, labels, sample_size=size, random_state=seed))


def fit_segments(vectors: np.ndarray, k: int | None = None, k_range: str | Sequence[int] = (2, 12), *,
                 seed: int = 0, normalize: bool = True, sample_size: int = 5000, n_init: int = 10,
                 threads: int | None = 1) -> SegmentFit:
    """Cluster user vectors with k-means.

    Args:
        vectors: (n_users, d).
        k: the number of segments; None chooses it over ``k_range`` by the best silhouette score.
        k_range: ``"lo-hi"`` or ``(lo, hi)``, both included (used when ``k`` is None).
        seed: k-means initialisation and the silhouette sample.
        normalize: L2-normalise vectors first (see the module docstring).
        sample_size: silhouette scores are computed on this many sampled users (O(n^2) otherwise).
        n_init: k-means restarts (the best inertia is kept).
        threads: OpenMP/BLAS threads for scikit-learn (None: its default, one per core). One is the
            default because on a busy machine more cost far more than they give: measured here,
            KMeans on 300 x 12 took 2.4 s with 2 threads on 2 loaded cores and 0.07 s with 1.

    Returns:
        A SegmentFit with segments renumbered by size (0 = largest); ``silhouette`` holds every k scored.
    """
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise RectrainError(f"expected (n_users, d) vectors, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise RectrainError("user vectors hold NaN or inf (a diverged model?)")
    if normalize:
        x = normalize_rows(x)
    n = x.shape[0]
    if k is not None:
        if int(k) < 2:
            raise RectrainError(f"k must be >= 2, got {k}")
        candidates, chosen_by = [int(k)], "given"
    else:
        lo, hi = parse_k_range(k_range)
        candidates, chosen_by = list(range(lo, hi + 1)), "silhouette"
    if max(candidates) >= n:
        raise RectrainError(f"k={max(candidates)} needs more than {n} users")
    from threadpoolctl import threadpool_limits

    fits: dict[int, tuple[Any, str]] = {}
    scores: dict[int, float] = {}
    with threadpool_limits(limits=threads):
        for kk in candidates:
            fits[kk] = _kmeans(x, kk, seed, n_init)
            scores[kk] = _silhouette(x, fits[kk][0].predict(x), sample_size, seed)
    best = candidates[0] if chosen_by == "given" else max(candidates, key=lambda kk: (np.nan_to_num(scores[kk], nan=-2), -kk))
    model, algorithm = fits[best]
    centroids = np.asarray(model.cluster_centers_, dtype=np.float32)
    labels = assign_segments(x, centroids, normalize=False)
    # renumber by size, largest first (ties: lower old index first)
    sizes = np.bincount(labels, minlength=best)
    order = np.lexsort((np.arange(best), -sizes))
    new_index = np.empty(best, np.int64)
    new_index[order] = np.arange(best)
    inertia = float(((x - centroids[labels]) ** 2).sum())
    return SegmentFit(centroids=centroids[order], labels=new_index[labels], k=best, silhouette=scores,
                      inertia=inertia, normalize=normalize, seed=seed, algorithm=algorithm, chosen_by=chosen_by)


# --- the file a scorer reads ---------------------------------------------------------------------
def segments_payload(fit: SegmentFit, definition: dict[str, Any], *, checkpoint_sha256: str | None = None,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a torch-free scorer needs to answer the segment of a vector (JSON-able).

    ``centroids`` is a (k, d) list of lists; a vector is assigned by :func:`assign_segments` with
    ``normalize`` as stored.
    """
    return {
        "format": FORMAT_VERSION,
        "kind": definition.get("kind"),
        "k": fit.k,
        "dim": int(fit.centroids.shape[1]),
        "centroids": fit.centroids.astype(np.float64).tolist(),
        "normalize": "l2" if fit.normalize else "none",
        "distance": "squared_euclidean",
        "assign": "argmin_j ||v' - centroids[j]||^2 with v' = v / ||v||_2 when normalize == 'l2', else v",
        "vector": definition,
        "sizes": fit.sizes.tolist(),
        "silhouette": {str(k): v for k, v in fit.silhouette.items()},
        "chosen_by": fit.chosen_by,
        "algorithm": fit.algorithm,
        "seed": fit.seed,
        "checkpoint_sha256": checkpoint_sha256,
        **(extra or {}),
    }
