"""Ranking and catalog metrics as pure numpy functions.

Per-query metrics take the 0-based rank of every target item in its query's full ranking (rank 0 =
first place) and a CSR ``indptr`` grouping targets into queries. Working from ranks, not scores,
keeps the tie rule in one place (the evaluator) and lets DDP ranks, chunks and the sampled protocol
share the same arithmetic. Catalog metrics take per-item recommendation counts, which add up
across chunks and shards, so a sharded evaluation gives exactly the single-process figures.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _rows_of(indptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row id of every target, number of targets per row) from a CSR ``indptr``."""
    indptr = np.asarray(indptr, dtype=np.int64)
    n_targets = np.diff(indptr)  # (Q,)
    return np.repeat(np.arange(n_targets.size), n_targets), n_targets


def _single(ranks: np.ndarray) -> np.ndarray:
    """``indptr`` for one target per query."""
    return np.arange(np.asarray(ranks).size + 1, dtype=np.int64)


def _hits_per_query(ranks: np.ndarray, indptr: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    rows, n_targets = _rows_of(indptr)
    hits = np.bincount(rows, weights=(np.asarray(ranks) < k), minlength=n_targets.size)  # (Q,)
    return hits, n_targets


def hit_rate(ranks: np.ndarray, k: int, indptr: np.ndarray | None = None) -> np.ndarray:
    """HR@K: 1 if any target ranks in the top K. Equals Recall@K when a query has one target."""
    indptr = _single(ranks) if indptr is None else indptr
    hits, _ = _hits_per_query(ranks, indptr, k)
    return (hits > 0).astype(np.float64)


def recall(ranks: np.ndarray, k: int, indptr: np.ndarray | None = None) -> np.ndarray:
    """Recall@K: share of a query's targets found in its top K."""
    indptr = _single(ranks) if indptr is None else indptr
    hits, n_targets = _hits_per_query(ranks, indptr, k)
    return hits / np.maximum(n_targets, 1)


def precision(ranks: np.ndarray, k: int, indptr: np.ndarray | None = None) -> np.ndarray:
    """Precision@K: share of the K recommended slots holding a target (denominator K, not |T|)."""
    indptr = _single(ranks) if indptr is None else indptr
    hits, _ = _hits_per_query(ranks, indptr, k)
    return hits / k


def ndcg(ranks: np.ndarray, k: int, indptr: np.ndarray | None = None) -> np.ndarray:
    """NDCG@K with binary gains; the ideal DCG places min(|T|, K) targets first, so 1.0 is reachable."""
    indptr = _single(ranks) if indptr is None else indptr
    ranks = np.asarray(ranks, dtype=np.int64)
    rows, n_targets = _rows_of(indptr)
    gains = np.where(ranks < k, 1.0 / np.log2(ranks.astype(np.float64) + 2.0), 0.0)  # (T,)
    dcg = np.bincount(rows, weights=gains, minlength=n_targets.size)  # (Q,)
    ideal_cum = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(k, dtype=np.float64) + 2.0))])
    idcg = ideal_cum[np.minimum(n_targets, k)]  # (Q,)
    return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)


def mrr(ranks: np.ndarray, k: int, indptr: np.ndarray | None = None) -> np.ndarray:
    """MRR@K: 1 / (1 + rank of the best-placed target) if it is in the top K, else 0."""
    indptr = _single(ranks) if indptr is None else indptr
    ranks = np.asarray(ranks, dtype=np.int64)
    rows, n_targets = _rows_of(indptr)
    best = np.full(n_targets.size, np.iinfo(np.int64).max, dtype=np.int64)  # (Q,)
    np.minimum.at(best, rows, ranks)
    return np.where(best < k, 1.0 / (best.astype(np.float64) + 1.0), 0.0)


def ranking_metrics(ranks: np.ndarray, ks: tuple[int, ...] | list[int], indptr: np.ndarray | None = None
                    ) -> dict[str, np.ndarray]:
    """All per-query metrics for every K, keyed ``"hr@10"``, ``"ndcg@10"``, ... (one value per query)."""
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate(ranks, k, indptr)
        out[f"ndcg@{k}"] = ndcg(ranks, k, indptr)
        out[f"mrr@{k}"] = mrr(ranks, k, indptr)
        out[f"recall@{k}"] = recall(ranks, k, indptr)
        out[f"precision@{k}"] = precision(ranks, k, indptr)
    return out


def topk_ranks(answers: Sequence[Sequence[Any]], targets: Sequence[Sequence[Any]], k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of every target in its row's answered top-``k`` list (``k`` when absent) and the CSR indptr.

    What a served model answers is a list, not scores: this turns lists into the ranks the metrics
    above read, so an exported graph (int8 check) and a replayed service (offline A/B) are scored by
    the same arithmetic as the evaluator. Items compare by ``==`` (indices or raw ids alike).
    """
    ranks: list[int] = []
    indptr = np.zeros(len(targets) + 1, dtype=np.int64)
    for row, (answer, wanted) in enumerate(zip(answers, targets)):
        position: dict[Any, int] = {}
        for p, item in enumerate(list(answer)[:k]):
            position.setdefault(item, p)
        ranks += [position.get(t, k) for t in wanted]
        indptr[row + 1] = len(ranks)
    return np.asarray(ranks, dtype=np.int64), indptr


def topk_metrics(answers: Sequence[Sequence[Any]], targets: Sequence[Sequence[Any]], k: int
                 ) -> dict[str, np.ndarray]:
    """HR@k, NDCG@k and MRR@k per row of answered top-``k`` lists (see :func:`topk_ranks`).

    A row's targets should be distinct (a repeated target would count twice).
    """
    ranks, indptr = topk_ranks(answers, targets, k)
    return {f"hr@{k}": hit_rate(ranks, k, indptr), f"ndcg@{k}": ndcg(ranks, k, indptr),
            f"mrr@{k}": mrr(ranks, k, indptr)}


# ---- catalog metrics from per-item recommendation counts (n_items,) -------------------------------

def coverage(rec_counts: np.ndarray) -> float:
    """Share of the catalog recommended at least once: a model that shows everyone the same list scores low."""
    rec_counts = np.asarray(rec_counts)
    return float(np.count_nonzero(rec_counts) / max(rec_counts.size, 1))


def average_popularity(rec_counts: np.ndarray, item_popularity: np.ndarray, n_users: int | None = None) -> float:
    """Mean training popularity over all recommended slots; divided by ``n_users`` (a share) when given.

    Tells how much a model leans on the head of the catalog, comparable across data sets once normalised.
    """
    rec_counts = np.asarray(rec_counts, dtype=np.float64)
    total = rec_counts.sum()
    if total == 0:
        return 0.0
    value = float(np.dot(rec_counts, np.asarray(item_popularity, dtype=np.float64)) / total)
    return value / n_users if n_users else value


def gini(rec_counts: np.ndarray) -> float:
    """Gini index of how recommendations spread over all items (0 = even, towards 1 = a few items get all).

    G = sum_i (2i - n - 1) x_(i) / (n sum x) with x sorted ascending, i = 1..n, items never recommended
    included (they are the inequality).
    """
    x = np.sort(np.asarray(rec_counts, dtype=np.float64))
    n, total = x.size, x.sum()
    if n == 0 or total == 0:
        return 0.0
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(np.dot(2.0 * i - n - 1.0, x) / (n * total))
