"""The filtering settings of the preprocessing pipeline (``data.preprocess.*``).

Order of operations matters and is fixed: implicit threshold -> dedup -> iterative k-core ->
vocabularies. Every stage counts what it removed, so a run's log says where data went. The
pipeline itself runs on an engine: :mod:`rectrain.data.engine`.
"""
from __future__ import annotations

from dataclasses import dataclass


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
