"""The pandas preprocessing pipeline rectrain shipped before the engine, kept as the tests' oracle.

:func:`rectrain.data.dataset.prepare` runs :mod:`rectrain.data.engine` (DuckDB, Spark); these
functions are the former in-memory implementation, unchanged, so tests/test_engine.py can hold every
engine's arrays equal to what rectrain produced before, and bench/scale.py can measure the old path
beside the new one. Nothing in the package imports this.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rectrain.data import splits
from rectrain.data.dataset import (
    Interactions,
    PreparedData,
    SplitConfig,
    _attach_item_features,
    _attach_user_attributes,
    _check_split,
)
from rectrain.data.preprocess import PreprocessConfig
from rectrain.data.schema import ITEM, RATING, SESSION, TIMESTAMP, USER, RawLog
from rectrain.errors import ConfigError, DataError


@dataclass
class FilterReport:
    """How many events each stage removed (logged and saved with the cache)."""

    rows_read: int = 0
    removed: dict[str, int] = field(default_factory=dict)


def filter_interactions(log: RawLog, cfg: PreprocessConfig) -> tuple[pd.DataFrame, FilterReport]:
    """Apply threshold, dedup and k-core; return the remaining events in file order."""
    frame = log.interactions.copy()
    frame["_order"] = np.arange(len(frame), dtype=np.int64)  # file order breaks every tie
    report = FilterReport(rows_read=len(frame))

    if cfg.min_rating is not None:
        if RATING not in frame:
            raise ConfigError("data.preprocess.min_rating", f"{log.source} has no rating column to threshold")
        keep = frame[RATING].to_numpy() >= cfg.min_rating
        report.removed["below_min_rating"] = int((~keep).sum())
        frame = frame[keep]

    if cfg.dedup not in ("first", "last", "none"):
        raise ConfigError("data.preprocess.dedup", f"must be first, last or none, got {cfg.dedup!r}")
    if cfg.dedup != "none":
        key = [SESSION, ITEM] if SESSION in frame and USER not in frame else [USER, ITEM]
        frame = frame.sort_values([TIMESTAMP, "_order"], kind="stable")
        dup = frame.duplicated(key, keep=cfg.dedup)
        report.removed["duplicates"] = int(dup.sum())
        frame = frame[~dup].sort_values("_order", kind="stable")

    frame = k_core(frame, cfg.min_user_interactions, cfg.min_item_interactions, report)
    if frame.empty:
        raise DataError(
            f"no interactions left after filtering {report.rows_read} rows ({report.removed}); "
            "lower the thresholds",
            path=log.source,
            key="data.preprocess",
        )
    return frame.reset_index(drop=True), report


def k_core(frame: pd.DataFrame, min_user: int, min_item: int, report: FilterReport) -> pd.DataFrame:
    """Iteratively drop users and items with too few events until both thresholds hold."""
    removed = 0
    while True:
        n_before = len(frame)
        if min_item > 1:
            counts = frame[ITEM].map(frame[ITEM].value_counts())
            frame = frame[counts.to_numpy() >= min_item]
        if min_user > 1:
            counts = frame[USER].map(frame[USER].value_counts())
            frame = frame[counts.to_numpy() >= min_user]
        removed += n_before - len(frame)
        if len(frame) == n_before:
            break
    if min_user > 1 or min_item > 1:
        report.removed["k_core"] = removed
    return frame


def build_vocabulary(raw_ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Map raw ids to contiguous indices by order of first appearance (deterministic, file order).

    Returns:
        (codes, vocab): ``codes[i]`` is the index of row ``i``; ``vocab[index]`` is the raw id (str).
    """
    codes, uniques = pd.factorize(raw_ids, sort=False)
    return codes.astype(np.int64), np.asarray(uniques, dtype=str)


def prepare_in_memory(log_: RawLog, pre: PreprocessConfig, split: SplitConfig,
                      test_log: RawLog | None = None) -> PreparedData:
    """The former pandas implementation of :func:`rectrain.data.dataset.prepare`."""
    _check_split(split, test_log is not None)
    started = time.perf_counter()
    frame, report = filter_interactions(log_, pre)
    stats: dict[str, Any] = {"rows_read": report.rows_read, "removed": dict(report.removed)}
    if split.kind == "session":
        frame, labels = _label_sessions(frame, split, test_log, pre)
    else:
        user_codes, _ = build_vocabulary(frame[USER])
        order = frame["_order"].to_numpy()
        perm = sort_events(user_codes, frame[TIMESTAMP].to_numpy(), order)
        frame = frame.iloc[perm].reset_index(drop=True)
        if split.kind == "leave_one_out":
            labels = leave_one_out(user_codes[perm])
        else:
            labels = time_split(frame[TIMESTAMP].to_numpy(), frame["_order"].to_numpy(),
                                       split.valid_fraction, split.test_fraction)
    data = _index_and_pack(frame, labels, split, log_, stats)
    data.stats["prepare_seconds"] = round(time.perf_counter() - started, 3)
    return data


def _label_sessions(frame: pd.DataFrame, split: SplitConfig, test_log: RawLog | None,
                    pre: PreprocessConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """Give every event a session key in the USER column and a split label."""
    if test_log is not None:
        test_frame, _ = filter_interactions(test_log, dataclasses.replace(pre, min_item_interactions=1))
        test_frame["_order"] += len(frame) + 1
        frame = pd.concat([frame.assign(_test=False), test_frame.assign(_test=True)], ignore_index=True)
    else:
        frame = frame.assign(_test=False)
    key = SESSION if SESSION in frame.columns and frame[SESSION].notna().all() else USER
    codes, _ = build_vocabulary(frame[key].astype(str) + np.where(frame["_test"], "#test", ""))
    perm = sort_events(codes, frame[TIMESTAMP].to_numpy(), frame["_order"].to_numpy())
    frame, codes = frame.iloc[perm].reset_index(drop=True), codes[perm]
    if key == USER and SESSION not in frame.columns:  # user log: cut sessions at inactivity gaps
        codes = sessionize(codes, frame[TIMESTAMP].to_numpy(), split.session_gap)
    frame[USER] = codes.astype(str)  # the session is the "user" from here on
    is_test = frame["_test"].to_numpy()
    labels = np.full(len(frame), splits.TRAIN, dtype=np.int8)
    if test_log is not None:
        labels[is_test] = splits.TEST
        train_rows = ~is_test
        labels[train_rows] = session_split(codes[train_rows], frame[TIMESTAMP].to_numpy()[train_rows],
                                                  split.valid_fraction, 0.0)
    else:
        labels = session_split(codes, frame[TIMESTAMP].to_numpy(), split.valid_fraction, split.test_fraction)
    return frame, labels


def _index_and_pack(frame: pd.DataFrame, labels: np.ndarray, split: SplitConfig, log_: RawLog,
                    stats: dict[str, Any]) -> PreparedData:
    """Build vocabularies, drop evaluation events the model cannot know, pack arrays."""
    is_train = labels == splits.TRAIN
    in_file_order = frame["_order"].to_numpy().argsort(kind="stable")
    if split.kind == "leave_one_out":
        # the whole catalog, indexed by first appearance in the file
        _, item_vocab = build_vocabulary(frame[ITEM].iloc[in_file_order])
    else:
        # Time and session splits: the catalog is what training saw; unseen evaluation items are dropped.
        _, item_vocab = build_vocabulary(frame[ITEM].iloc[in_file_order][is_train[in_file_order]])
    item_codes = pd.Index(item_vocab).get_indexer(frame[ITEM].astype(str))
    if split.kind != "leave_one_out":
        unknown = item_codes < 0
        stats["eval_events_unseen_item_dropped"] = int(unknown.sum())
        keep = ~unknown
        frame, labels, item_codes = frame[keep], labels[keep], item_codes[keep]
    _, user_vocab = build_vocabulary(frame[USER].iloc[frame["_order"].to_numpy().argsort(kind="stable")])
    user_codes = pd.Index(user_vocab).get_indexer(frame[USER].astype(str)).astype(np.int64)
    timestamp = frame[TIMESTAMP].to_numpy(dtype=np.float64)
    if split.kind == "session":
        # sessions too short to hold a prefix and a target are useless for evaluation
        counts = np.bincount(user_codes, minlength=user_vocab.shape[0])
        keep = counts[user_codes] >= split.min_session_length
        keep |= labels == splits.TRAIN
        stats["short_session_events_dropped"] = int((~keep).sum())
        frame, labels, item_codes, user_codes, timestamp = (
            frame[keep], labels[keep], item_codes[keep], user_codes[keep], timestamp[keep])
    elif split.kind == "time":
        seen_users = np.zeros(user_vocab.shape[0], dtype=bool)
        seen_users[user_codes[labels == splits.TRAIN]] = True
        cold = ~seen_users[user_codes] & (labels != splits.TRAIN)
        stats["eval_events_cold_user_dropped"] = int(cold.sum())
        frame, labels, item_codes, user_codes, timestamp = (
            frame[~cold], labels[~cold], item_codes[~cold], user_codes[~cold], timestamp[~cold])

    order = frame["_order"].to_numpy()
    perm = sort_events(user_codes, timestamp, order)
    user_codes, item_codes, timestamp, labels = user_codes[perm], item_codes[perm], timestamp[perm], labels[perm]

    cold_items = np.zeros(0, dtype=np.int64)
    if split.cold_item_fraction > 0:
        n_items = item_vocab.shape[0]
        rng = np.random.default_rng(split.cold_item_seed)
        cold_items = np.sort(rng.choice(n_items, size=int(round(n_items * split.cold_item_fraction)), replace=False))
        is_cold = np.isin(item_codes, cold_items)
        stats["cold_item_train_events_dropped"] = int((is_cold & (labels == splits.TRAIN)).sum())
        labels = np.where(is_cold & (labels == splits.TRAIN), -1, labels)

    def part(label: int) -> Interactions:
        rows = labels == label
        return Interactions(user_codes[rows].astype(np.int64), item_codes[rows].astype(np.int64), timestamp[rows])

    mask_seen = split.mask_seen if split.mask_seen is not None else split.kind != "session"
    data = PreparedData(
        train=part(splits.TRAIN), valid=part(splits.VALID), test=part(splits.TEST),
        user_vocab=user_vocab, item_vocab=item_vocab, split=split.kind, mask_seen=bool(mask_seen), stats=stats,
        cold_items=cold_items.astype(np.int64),
    )
    for name, piece in (("train", data.train), ("valid", data.valid), ("test", data.test)):
        stats[f"n_{name}"] = len(piece)
    if len(data.train) == 0:
        raise DataError("the training split is empty after filtering and splitting", path=log_.source, key="data.split")
    _attach_item_features(data, log_)
    if split.kind != "session":  # for session logs the "user" is a session: a user table does not apply
        _attach_user_attributes(data, log_)
    stats.update(n_users=data.n_users, n_items=data.n_items)
    return data


# --- the former numpy split functions (rectrain.data.splits) ----------------------------------
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
    labels = np.full(n, splits.TRAIN, dtype=np.int8)
    if n == 0:
        return labels
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], n]
    lengths = ends - starts
    ok = lengths >= min_events
    labels[ends[ok] - 1] = splits.TEST
    labels[ends[ok] - 2] = splits.VALID
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
    labels = np.full(n, splits.TRAIN, dtype=np.int8)
    labels[rank >= n - n_test] = splits.TEST
    labels[(rank >= n - n_test - n_valid) & (rank < n - n_test)] = splits.VALID
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
    session_label = np.full(n_sessions, splits.TRAIN, dtype=np.int8)
    session_label[rank >= n_sessions - n_test] = splits.TEST
    session_label[(rank >= n_sessions - n_test - n_valid) & (rank < n_sessions - n_test)] = splits.VALID
    return np.repeat(session_label, ends - starts)
