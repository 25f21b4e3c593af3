"""Per-query and catalog metrics against values worked out by hand."""
import math

import numpy as np
import pytest

from rectrain.evaluation import metrics as M


def test_single_target_metrics_by_hand():
    ranks = np.array([0, 1, 4, 9, 10])
    np.testing.assert_array_equal(M.hit_rate(ranks, 10), [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(M.recall(ranks, 10), [1, 1, 1, 1, 0])
    np.testing.assert_allclose(M.ndcg(ranks, 10), [1.0, 1 / math.log2(3), 1 / math.log2(6), 1 / math.log2(11), 0.0])
    np.testing.assert_allclose(M.mrr(ranks, 10), [1.0, 0.5, 0.2, 0.1, 0.0])
    np.testing.assert_allclose(M.precision(ranks, 10), [0.1, 0.1, 0.1, 0.1, 0.0])
    np.testing.assert_array_equal(M.hit_rate(ranks, 1), [1, 0, 0, 0, 0])


def test_multi_target_metrics_by_hand():
    # query 0: targets at ranks 0, 3, 7; query 1: ranks 6, 2; query 2: six targets, none in the top 5;
    # query 3: six targets at ranks 0..5 (more targets than K)
    ranks = np.array([0, 3, 7, 6, 2, 5, 6, 7, 8, 9, 10, 0, 1, 2, 3, 4, 5])
    indptr = np.array([0, 3, 5, 11, 17])
    k = 5
    d = [1 / math.log2(r + 2) for r in range(k)]  # discount of rank r
    np.testing.assert_allclose(M.recall(ranks, k, indptr), [2 / 3, 1 / 2, 0, 5 / 6])
    np.testing.assert_allclose(M.precision(ranks, k, indptr), [2 / 5, 1 / 5, 0, 1])
    np.testing.assert_array_equal(M.hit_rate(ranks, k, indptr), [1, 1, 0, 1])
    np.testing.assert_allclose(M.mrr(ranks, k, indptr), [1, 1 / 3, 0, 1])
    expected_ndcg = [(d[0] + d[3]) / (d[0] + d[1] + d[2]),  # ideal places min(|T|=3, K) targets first
                     d[2] / (d[0] + d[1]),
                     0.0,
                     1.0]  # all K slots hold targets: the ideal over min(6, 5) = 5
    np.testing.assert_allclose(M.ndcg(ranks, k, indptr), expected_ndcg)


def test_ranking_metrics_keys_and_consistency():
    ranks = np.array([0, 12, 3])
    out = M.ranking_metrics(ranks, (1, 10))
    assert list(out) == ["hr@1", "ndcg@1", "mrr@1", "recall@1", "precision@1",
                         "hr@10", "ndcg@10", "mrr@10", "recall@10", "precision@10"]
    np.testing.assert_array_equal(out["hr@10"], [1, 0, 1])
    np.testing.assert_array_equal(out["hr@10"], out["recall@10"])  # one target: HR == Recall
    np.testing.assert_allclose(out["mrr@10"], [1, 0, 0.25])


def test_coverage_popularity_gini_by_hand():
    counts = np.array([3, 0, 1, 0, 0])
    assert M.coverage(counts) == pytest.approx(2 / 5)
    # popularity weighted by how often each item was recommended: (3*10 + 1*4) / 4
    pop = np.array([10, 7, 4, 1, 0])
    assert M.average_popularity(counts, pop) == pytest.approx(34 / 4)
    assert M.average_popularity(counts, pop, n_users=17) == pytest.approx(34 / 4 / 17)
    assert M.average_popularity(np.zeros(5), pop) == 0.0
    # Gini: x ascending = [0,0,0,0,10]: (2*5-5-1)*10 / (5*10) = 0.8
    assert M.gini(np.array([0, 10, 0, 0, 0])) == pytest.approx(0.8)
    assert M.gini(np.array([2, 2, 2, 2])) == pytest.approx(0.0)
    # [1,2,3]: (-2*1 + 0*2 + 2*3) / (3*6) = 4/18
    assert M.gini(np.array([3, 1, 2])) == pytest.approx(4 / 18)
    assert M.gini(np.zeros(4)) == 0.0


def test_topk_metrics_of_answered_lists_by_hand():
    """What the int8 check and ab_compare score: target positions in answered top-k lists."""
    answers = [["a", "b", "c"], ["c", "x", "a"], ["b", "b", "d"]]
    targets = [["b"], ["a", "z"], ["q"]]
    ranks, indptr = M.topk_ranks(answers, targets, k=3)
    assert ranks.tolist() == [1, 2, 3, 3] and indptr.tolist() == [0, 1, 3, 4]
    out = M.topk_metrics(answers, targets, k=3)
    np.testing.assert_array_equal(out["hr@3"], [1, 1, 0])
    np.testing.assert_allclose(out["mrr@3"], [1 / 2, 1 / 3, 0])
    # row 1: one hit at position 2 of two targets; ideal DCG places both first
    np.testing.assert_allclose(out["ndcg@3"], [1 / math.log2(3), (1 / math.log2(4)) / (1 + 1 / math.log2(3)), 0])
    # only the first k answers count, and a repeated answer counts at its first position
    assert M.topk_ranks([["x", "b", "b"]], [["b"]], k=1)[0].tolist() == [1]
