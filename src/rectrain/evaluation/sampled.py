"""Sampled-negatives protocol: FOR COMPARISON WITH PUBLISHED TABLES ONLY.

Ranking a target among, say, 100 sampled negatives (the NCF protocol) inflates every metric and can
reorder models relative to the full-catalog ranking (Krichene & Rendle, "On Sampled Metrics for Item
Recommendation", KDD 2020). Use :func:`rectrain.evaluation.ranking.evaluate_ranking` for decisions;
use this module only to line figures up against papers that used sampled metrics.

Same tie rule as the full protocol: a negative with a score equal to the target's and a lower item
index ranks above it. Negative scores are gathered from the full score rows, so any ``score_fn``
works unchanged and the result is exact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rectrain.errors import DataError
from rectrain.evaluation import metrics as M
from rectrain.data.queries import RankingQueries
from rectrain.evaluation.ranking import (RankingResult, ScoreFn, check_ks, check_nan, check_queries, chunk_rows,
                                         score_chunk)
from rectrain.utils.arrays import unique_ints


def sample_negatives(queries: RankingQueries, n_negatives: int, rng: np.random.Generator) -> np.ndarray:
    """(Q, N) distinct items per row, uniform over items neither excluded for the row nor its target.

    Vectorised rejection sampling: draw all, then redraw only the draws that hit a forbidden item or
    repeat an earlier draw of the same row, until none is left.
    """
    n_q, n_items = len(queries), queries.n_items
    # forbidden (row, item) pairs as sorted int64 keys row * n_items + item
    ex_rows = np.repeat(np.arange(n_q), np.diff(queries.exclude_indptr))
    t_rows = np.repeat(np.arange(n_q), np.diff(queries.target_indptr))
    forbidden = unique_ints(np.concatenate([ex_rows * n_items + queries.exclude_items,
                                            t_rows * n_items + queries.target_items]))
    n_forbidden = np.bincount(forbidden // n_items, minlength=n_q)  # (Q,)
    if n_q and np.any(n_items - n_forbidden < n_negatives):
        bad = int(np.argmax(n_items - n_forbidden < n_negatives))
        raise ValueError(f"query row {bad} has only {n_items - n_forbidden[bad]} items to sample "
                         f"{n_negatives} distinct negatives from")
    negatives = rng.integers(0, n_items, size=(n_q, n_negatives), dtype=np.int64)
    while True:
        keys = np.arange(n_q)[:, None] * n_items + negatives  # (Q, N)
        bad = np.isin(keys, forbidden)
        order = np.argsort(negatives, axis=1, kind="stable")  # a repeat is bad, its first occurrence is not
        ordered = np.take_along_axis(negatives, order, axis=1)
        repeat = np.zeros_like(bad)
        np.put_along_axis(repeat, order[:, 1:], ordered[:, 1:] == ordered[:, :-1], axis=1)
        redraw = bad | repeat
        n_bad = int(redraw.sum())
        if n_bad == 0:
            return negatives
        negatives[redraw] = rng.integers(0, n_items, size=n_bad, dtype=np.int64)


def evaluate_sampled(
    score_fn: ScoreFn,
    queries: RankingQueries,
    n_negatives: int = 100,
    negatives: np.ndarray | None = None,
    ks: Sequence[int] = (10,),
    seed: int = 0,
    memory_budget_mb: float = 256,
    device: str | torch.device = "cpu",
) -> RankingResult:
    """Rank each query's single target among N negatives (comparison with papers only).

    Args:
        score_fn: as for :func:`evaluate_ranking`; full rows are scored and the N + 1 columns gathered.
        queries: one target per row; the exclude CSR is what sampling avoids (it is not applied to
            given negatives, whose scores are used as they are).
        n_negatives: negatives sampled per row when ``negatives`` is not given.
        negatives: (Q, N) given negative items (e.g. from :func:`read_ncf_negatives`).
        ks: cut-offs for hr/ndcg/mrr/recall/precision.
        seed: seeds the numpy Generator used for sampling.
    """
    check_queries(queries)
    if np.any(np.diff(queries.target_indptr) != 1):
        raise ValueError("the sampled protocol needs exactly one target per query row")
    targets = queries.target_items  # (Q,)
    if negatives is None:
        negatives = sample_negatives(queries, n_negatives, np.random.default_rng(seed))
    negatives = np.asarray(negatives, dtype=np.int64)
    if negatives.ndim != 2 or negatives.shape[0] != len(queries):
        raise ValueError(f"negatives must be (n_queries={len(queries)}, N), got {negatives.shape}")
    if negatives.size and (negatives.min() < 0 or negatives.max() >= queries.n_items):
        raise ValueError("negatives hold an item index outside the catalog")
    if np.any(negatives == targets[:, None]):
        raise ValueError(f"query row {int(np.argmax((negatives == targets[:, None]).any(1)))} "
                         "lists its own target among its negatives (misaligned negatives?)")
    ks = check_ks(ks)
    ranks = np.empty(len(queries), dtype=np.int64)
    chunk = chunk_rows(queries.n_items, memory_budget_mb)
    for start in range(0, len(queries), chunk):
        rows = np.arange(start, min(start + chunk, len(queries)))
        scores = score_chunk(score_fn, queries, rows, device)  # (c, I)
        t = torch.tensor(targets[rows], dtype=torch.long, device=scores.device)  # (c,)
        neg = torch.tensor(negatives[rows], dtype=torch.long, device=scores.device)  # (c, N)
        s_t = scores.gather(1, t[:, None])  # (c, 1)
        s_n = scores.gather(1, neg)  # (c, N)
        check_nan(torch.cat([s_t, s_n], 1), rows)
        above = (s_n > s_t) | ((s_n == s_t) & (neg < t[:, None]))
        ranks[rows] = above.sum(1).cpu().numpy()
    n = negatives.shape[1]
    return RankingResult(M.ranking_metrics(ranks, ks), {}, len(queries),
                         f"sampled ({n} negatives) — comparison only", ks)


def read_ncf_negatives(path: str | Path, user_index: dict[str, int], item_index: dict[str, int]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read NCF's ``test.negative`` file: lines ``(user,item)\\tneg1\\tneg2...``.

    Returns (users (Q,), targets (Q,), negatives (Q, N)) as index arrays via the given vocabularies.
    Raises DataError naming the file and line for malformed lines, unknown ids or ragged rows.
    """
    users: list[int] = []
    targets: list[int] = []
    negatives: list[list[int]] = []
    path = str(path)

    def lookup(vocab: dict[str, int], raw: str, what: str, line_no: int) -> int:
        try:
            return vocab[raw]
        except KeyError:
            raise DataError(f"unknown {what} id {raw!r}", path=path, line=line_no) from None

    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            fields = line.split("\t")
            head = fields[0].strip()
            pair = head[1:-1].split(",") if head.startswith("(") and head.endswith(")") else []
            if len(pair) != 2 or not all(p.strip() for p in pair):
                raise DataError(f"expected '(user,item)' at the start of the line, got {head[:40]!r}",
                                path=path, line=line_no)
            row = [lookup(item_index, raw.strip(), "item", line_no) for raw in fields[1:] if raw.strip()]
            if negatives and len(row) != len(negatives[0]):
                raise DataError(f"{len(row)} negatives where earlier lines have {len(negatives[0])}",
                                path=path, line=line_no)
            users.append(lookup(user_index, pair[0].strip(), "user", line_no))
            targets.append(lookup(item_index, pair[1].strip(), "item", line_no))
            negatives.append(row)
    n = len(negatives[0]) if negatives else 0
    return (np.asarray(users, dtype=np.int64), np.asarray(targets, dtype=np.int64),
            np.asarray(negatives, dtype=np.int64).reshape(len(negatives), n))
