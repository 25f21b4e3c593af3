"""Splits without leakage, on indexed events sorted by (group, timestamp, file order).

Every function takes the row order as given (already sorted deterministically) and returns a
boolean mask or labels per row, so ties are broken the same way everywhere: by file order.
"""
from __future__ import annotations

import numpy as np

TRAIN, VALID, TEST = 0, 1, 2


def sort_events(group: np.ndarray, timestamp: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Permutation sorting events by group, then time, then file order (the one tie rule)."""
    return np.lexsort((order, timestamp, group))


def leave_one_out(group: np.ndarray, min_events: int = 3) -> np.ndarray:
    """Per group (user): last event -> test, second to last -> valid, the rest -> train.

    ``group`` must be sorted (events of a user contiguous, in time order). Users with fewer than
    ``min_events`` events keep everything in train: they cannot give a validation *and* a test item
    and still have a history.
    """
    n = group.shape[0]
    labels = np.full(n, TRAIN, dtype=np.int8)
    if n == 0:
        return labels
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], n]
    lengths = ends - starts
    ok = lengths >= min_events
    labels[ends[ok] - 1] = TEST
    labels[ends[ok] - 2] = VALID
    return labels


def time_split(timestamp: np.ndarray, order: np.ndarray, valid_fraction: float, test_fraction: float) -> np.ndarray:
    """Global time split: the latest ``test_fraction`` of events -> test, the ``valid_fraction`` before -> valid.

    Cut by event rank in (time, file order), so the fractions are exact even with tied timestamps.
    """
    n = timestamp.shape[0]
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((order, timestamp))] = np.arange(n)
    n_test = int(round(n * test_fraction))
    n_valid = int(round(n * valid_fraction))
    labels = np.full(n, TRAIN, dtype=np.int8)
    labels[rank >= n - n_test] = TEST
    labels[(rank >= n - n_test - n_valid) & (rank < n - n_test)] = VALID
    return labels


def sessionize(user: np.ndarray, timestamp: np.ndarray, gap_seconds: float) -> np.ndarray:
    """Session index per event: a new session starts at a new user or after ``gap_seconds`` of inactivity.

    Events must be sorted by (user, time). Returns contiguous session indices in that order.
    """
    n = user.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.r_[True, (user[1:] != user[:-1]) | (np.diff(timestamp) > gap_seconds)]
    return np.cumsum(new) - 1


def session_split(session: np.ndarray, timestamp: np.ndarray, valid_fraction: float, test_fraction: float) -> np.ndarray:
    """Whole sessions go to one split, ordered by their end time (the latest sessions -> test).

    ``session`` must be sorted with contiguous sessions. Sessions are never cut, so no session's
    future leaks into training.
    """
    n = session.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int8)
    starts = np.flatnonzero(np.r_[True, session[1:] != session[:-1]])
    ends = np.r_[starts[1:], n]
    end_time = np.maximum.reduceat(timestamp, starts)
    n_sessions = starts.shape[0]
    rank = np.empty(n_sessions, dtype=np.int64)
    rank[np.lexsort((np.arange(n_sessions), end_time))] = np.arange(n_sessions)
    n_test = int(round(n_sessions * test_fraction))
    n_valid = int(round(n_sessions * valid_fraction))
    session_label = np.full(n_sessions, TRAIN, dtype=np.int8)
    session_label[rank >= n_sessions - n_test] = TEST
    session_label[(rank >= n_sessions - n_test - n_valid) & (rank < n_sessions - n_test)] = VALID
    return np.repeat(session_label, ends - starts)
