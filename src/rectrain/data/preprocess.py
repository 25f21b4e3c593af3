"""From a raw log to indexed, filtered interactions.

Order of operations matters and is fixed: implicit threshold -> dedup -> iterative k-core ->
vocabularies. Every stage counts what it removed, so a run's log says where data went.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rectrain.data.schema import ITEM, RATING, SESSION, TIMESTAMP, USER, RawLog
from rectrain.errors import ConfigError, DataError


@dataclass
class PreprocessConfig:
    """Filtering applied before splitting.

    Attributes:
        dedup: ``first`` keeps the earliest event of each (user, item) pair, ``last`` the latest,
            ``none`` keeps repeats (session logs: a repeated click is a real next event).
        min_rating: keep events with rating >= this (implicit-feedback threshold); None keeps all.
        min_user_interactions / min_item_interactions: iterative k-core thresholds.
    """

    dedup: str = "first"
    min_rating: float | None = None
    min_user_interactions: int = 1
    min_item_interactions: int = 1


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
