"""What the evaluator ranks, for whom, and what it must hide.

A :class:`RankingQueries` is protocol-agnostic: leave-one-out (one target per user, seen items
masked), a global time split (several targets per user) and the session protocol (one query per
next click, nothing masked) are all expressed as rows with CSR lists of targets, excluded items and
the ordered item history a sequence model or item-kNN reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np


def csr_from_groups(group: np.ndarray, values: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Build CSR ``(indptr, values)`` from rows already sorted by ``group`` (order inside a group kept)."""
    group = np.asarray(group, dtype=np.int64)
    if group.size and np.any(np.diff(group) < 0):
        raise ValueError("csr_from_groups needs rows sorted by group")
    counts = np.bincount(group, minlength=n_groups)
    indptr = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, np.asarray(values, dtype=np.int64)


def concat_ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(indptr, positions)`` of the ranges ``[starts[i], ends[i])`` laid end to end, vectorised."""
    lengths = ends - starts
    indptr = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    offsets = np.arange(indptr[-1], dtype=np.int64) - np.repeat(indptr[:-1], lengths)
    return indptr, np.repeat(starts, lengths) + offsets


@dataclass
class RankingQueries:
    """Rows to rank against the whole catalog.

    Attributes:
        users: (Q,) int64 user index per row (session index for session data); used by user-based models.
        target_indptr, target_items: CSR of the items each row should rank high (at least one per row).
        exclude_indptr, exclude_items: CSR of items scored -inf before ranking (seen items). A row's own
            targets are never excluded, even if listed.
        history_indptr, history_items: CSR of the ordered item history (oldest first) a sequence
            model or item-kNN conditions on.
        n_items: catalog size; item indices are ``0..n_items-1``.
        protocol: a human-readable label stated in every results table.
    """

    users: np.ndarray
    target_indptr: np.ndarray
    target_items: np.ndarray
    exclude_indptr: np.ndarray
    exclude_items: np.ndarray
    history_indptr: np.ndarray
    history_items: np.ndarray
    n_items: int
    protocol: str = ""

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def subset(self, rows: np.ndarray) -> "RankingQueries":
        """The queries at ``rows`` (used to shard evaluation across DDP ranks)."""
        rows = np.asarray(rows, dtype=np.int64)

        def take(indptr: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            new_indptr, positions = concat_ranges(indptr[rows], indptr[rows + 1])
            return new_indptr, values[positions]

        t = take(self.target_indptr, self.target_items)
        e = take(self.exclude_indptr, self.exclude_items)
        h = take(self.history_indptr, self.history_items)
        return RankingQueries(self.users[rows], *t, *e, *h, n_items=self.n_items, protocol=self.protocol)


@dataclass(frozen=True)
class LazyQueries:
    """The queries of a whole split, built a subset at a time.

    At a billion events the targets, exclusions and histories of every user do not fit in memory
    together (a copy of the log); the evaluator and the validation loop ask for a chunk of rows at
    a time, and only that chunk is built. ``users`` (one index per row) is all that is held.

    Attributes:
        users: (Q,) user (or session) index of every row.
        build: rows -> the :class:`RankingQueries` of those rows (of any protocol label).
        n_items: catalog size.
        protocol: the label every subset carries.
    """

    users: np.ndarray
    build: Callable[[np.ndarray], RankingQueries]
    n_items: int
    protocol: str = ""

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def subset(self, rows: np.ndarray) -> RankingQueries:
        """The queries at ``rows``, built now."""
        queries = self.build(np.asarray(rows, dtype=np.int64))
        queries.protocol = self.protocol
        return queries

    def select(self, rows: np.ndarray) -> "LazyQueries":
        """Only the rows ``rows`` (e.g. a seeded sample of users), still unbuilt."""
        rows = np.asarray(rows, dtype=np.int64)
        return LazyQueries(self.users[rows], lambda sub: self.build(rows[sub]), self.n_items, self.protocol)

    def chunks(self, size: int) -> Iterator[RankingQueries]:
        """Every row, ``size`` rows at a time (at least one chunk, possibly empty)."""
        for start in range(0, max(len(self), 1), max(int(size), 1)):
            yield self.subset(np.arange(start, min(start + size, len(self)), dtype=np.int64))


def pad_histories(indptr: np.ndarray, items: np.ndarray, rows: np.ndarray, max_length: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The last ``max_length`` items of CSR rows ``rows``, right-padded with 0, and lengths >= 1.

    What a history model reads, vectorised over rows: (B, max_length) int64 and (B,) int64 (an
    empty history becomes a single padding item; the caller decides what that means). Evaluation,
    analytics and the benchmarks all pad with this one rule.
    """
    starts, ends = indptr[rows], indptr[rows + 1]
    lengths = np.minimum(ends - starts, max_length)
    first = ends - lengths
    offsets = np.arange(max_length)
    valid = offsets[None, :] < lengths[:, None]
    pos = np.where(valid, first[:, None] + offsets[None, :], 0)
    padded = np.where(valid, items[np.minimum(pos, max(items.size - 1, 0))], 0) if items.size else np.zeros_like(pos)
    return padded.astype(np.int64), np.maximum(lengths, 1).astype(np.int64)
