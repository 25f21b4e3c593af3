"""Ranking evaluation: full-catalog protocol (the truth), sampled protocol (comparison only), baselines.

Names are resolved lazily (PEP 562): ``rectrain.evaluation.metrics`` is numpy code that the
torch-free serving side and ``ab_compare`` import, and importing this package must not pull torch in
for them. ``from rectrain.evaluation import evaluate_ranking`` still works.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ItemKNN": "rectrain.evaluation.baselines", "MostPopular": "rectrain.evaluation.baselines",
    "RankingQueries": "rectrain.data.queries", "csr_from_groups": "rectrain.data.queries",
    "RankingResult": "rectrain.evaluation.ranking", "evaluate_ranking": "rectrain.evaluation.ranking",
    "format_table": "rectrain.evaluation.ranking", "target_ranks": "rectrain.evaluation.ranking",
    "tie_ordered_topk": "rectrain.evaluation.ranking", "evaluate_sampled": "rectrain.evaluation.sampled",
    "read_ncf_negatives": "rectrain.evaluation.sampled", "sample_negatives": "rectrain.evaluation.sampled",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'rectrain.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
