"""The export's ANN step: which index a two-tower export gets, built from the very graphs it writes.

The item vectors are read from the final ``item_vectors`` graph and the tuning queries from the
final ``query`` graph (onnxruntime, the scorer's runtime), so the index matches what the scorer
computes bit for bit. Tuning queries are the query graph's answers to histories drawn from the
training popularity (no training data is needed at export, and none is stored).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from rectrain.ann import KINDS, AnnIndex, build_index, tune
from rectrain.errors import RectrainError

log = logging.getLogger(__name__)

CHOICES = ("auto", "none", *KINDS)
DEFAULT_MIN_ITEMS = 100_000
TUNING_QUERIES = 2000


class AnnExportError(RectrainError):
    """An ANN index was asked for a model it cannot serve, or with settings that cannot work."""


def choose_kind(ann: str, *, kind: str, n_items: int, min_items: int, repeat_mode: str | None) -> str | None:
    """The index kind to build (None: exact scoring only) for ``export.py ann=...``."""
    if ann not in CHOICES:
        raise AnnExportError(f"ann must be one of {', '.join(CHOICES)}, got {ann!r}")
    if ann == "none":
        return None
    if ann == "auto":
        if kind != "two_tower" or repeat_mode == "mixture" or n_items < min_items:
            return None
        return "ivf"  # monotone in its effort and 7x quicker to build than HNSW at 1M items (README, Large catalogs)
    if kind != "two_tower":
        raise AnnExportError(f"ann={ann}: an index needs a dot-product model (two-tower); this is an NCF model, "
                             "whose recommend graph stays exact")
    if repeat_mode == "mixture":
        raise AnnExportError(f"ann={ann}: model.net.repeat_mode=mixture scores a softmax over the whole catalog, "
                             "which a nearest-neighbour search cannot rank; export with ann=none")
    return ann


def tuning_histories(popularity: np.ndarray, max_length: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` histories of 1..min(max_length, 20) items drawn by training popularity (+1, so every item can appear)."""
    rng = np.random.default_rng(seed)
    weights = np.asarray(popularity, dtype=np.float64) + 1.0
    width = int(min(max_length, 20))
    history = rng.choice(len(weights), size=(n, width), p=weights / weights.sum()).astype(np.int64)
    lengths = rng.integers(1, width + 1, size=n).astype(np.int64)
    return history, lengths


def build_for_export(query_graph: bytes, item_vectors_graph: bytes, open_session: Callable[[bytes], Any], *,
                     kind: str, n_items: int,
                     popularity: np.ndarray, max_length: int, user_width: int, target_recall: float,
                     m: int, ef_construction: int, fetch: int, threads: int, seed: int,
                     head: int | None = None) -> AnnIndex:
    """Build and tune an index over the exported item vectors; its settings carry the measured recall.

    The graphs come as bytes and ``open_session`` (bytes -> onnxruntime session) opens each for as
    long as it is needed: a session holds a copy of the catalog, so none outlives its use."""
    if not 0.0 < target_recall <= 1.0:
        raise AnnExportError(f"ann_recall must be in (0, 1], got {target_recall}")
    if fetch < 10:
        raise AnnExportError(f"ann_fetch must be at least 10 (the tuned top-10 is re-ranked from it), got {fetch}")
    (vectors,) = open_session(item_vectors_graph).run(["item_vectors"], {"items": np.arange(n_items, dtype=np.int64)})
    history, lengths = tuning_histories(popularity, max_length, TUNING_QUERIES, seed)
    feed = {"history": history, "lengths": lengths}
    if user_width:
        feed["user_features"] = np.zeros((len(history), user_width), np.float32)  # attributes unknown
    query_session = open_session(query_graph)
    queries = np.concatenate([query_session.run(["query"], {k: v[i:i + 256] for k, v in feed.items()})[0]
                              for i in range(0, len(history), 256)])
    del query_session
    if head is not None and not 0 <= head <= n_items:
        raise AnnExportError(f"ann_head must be between 0 and the catalog's {n_items} items, got {head}")
    index = build_index(vectors, kind, m=m, ef_construction=ef_construction, head=head, threads=threads, seed=seed)
    result = tune(index, queries, vectors, target_recall=target_recall, k=min(10, n_items), fetch=min(fetch, n_items))
    index.settings["tuning"]["queries_from"] = ("the query graph on histories of 1-20 items drawn by training "
                                                f"popularity (seed {seed}), user attributes unknown")
    if not result["reached"]:
        log.warning("ANN index reaches recall@10 %.4f, below ann_recall=%s even at its most thorough setting",
                    index.settings.get("recall_at_10", 0.0), target_recall)
    return index
