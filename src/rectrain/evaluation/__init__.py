"""Ranking evaluation: full-catalog protocol (the truth), sampled protocol (comparison only), baselines."""
from rectrain.evaluation.baselines import ItemKNN, MostPopular
from rectrain.evaluation.queries import RankingQueries, csr_from_groups
from rectrain.evaluation.ranking import (RankingResult, evaluate_ranking, format_table, target_ranks,
                                         tie_ordered_topk)
from rectrain.evaluation.sampled import evaluate_sampled, read_ncf_negatives, sample_negatives

__all__ = [
    "ItemKNN", "MostPopular", "RankingQueries", "RankingResult", "csr_from_groups", "evaluate_ranking",
    "evaluate_sampled", "format_table", "read_ncf_negatives", "sample_negatives", "target_ranks",
    "tie_ordered_topk",
]
