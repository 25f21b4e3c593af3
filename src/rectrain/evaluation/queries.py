"""Moved to :mod:`rectrain.data.queries` (the query contract is part of the prepared data, and
``rectrain.data`` must not import ``rectrain.evaluation``). Kept so older imports keep working."""
from rectrain.data.queries import RankingQueries, csr_from_groups, pad_histories

__all__ = ["RankingQueries", "csr_from_groups", "pad_histories"]
