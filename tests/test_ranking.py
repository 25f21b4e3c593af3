"""Full-catalog evaluator: tie rule, masking, chunking, shard merging, torchmetrics agreement, sampled protocol."""
import math

import numpy as np
import pytest
import torch
from torchmetrics.retrieval import (RetrievalHitRate, RetrievalMRR, RetrievalNormalizedDCG, RetrievalPrecision,
                                    RetrievalRecall)

from rectrain.errors import DataError
from rectrain.evaluation import (RankingQueries, RankingResult, evaluate_ranking, evaluate_sampled, format_table,
                                 read_ncf_negatives, sample_negatives, target_ranks, tie_ordered_topk)


def csr(lists):
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    values = np.array([v for x in lists for v in x], dtype=np.int64)
    return indptr, values


def make_queries(targets, excludes, n_items, histories=None, protocol="test"):
    histories = excludes if histories is None else histories
    return RankingQueries(np.arange(len(targets)), *csr(targets), *csr(excludes), *csr(histories),
                          n_items=n_items, protocol=protocol)


def table_fn(table):
    """score_fn returning fixed rows of a (Q, I) array."""
    table = np.asarray(table, dtype=np.float32)
    return lambda queries, rows: table[rows]


def random_case(seed, n_q=37, n_items=23, ties=True, max_targets=4):
    rng = np.random.default_rng(seed)
    targets, excludes = [], []
    for _ in range(n_q):
        items = rng.permutation(n_items)
        nt, ne = rng.integers(1, max_targets + 1), rng.integers(0, 8)
        targets.append(sorted(items[:nt].tolist()))
        # some excludes overlap the targets on purpose: targets must never be masked
        excludes.append(items[nt - 1:nt - 1 + ne].tolist())
    scores = rng.integers(0, 5, size=(n_q, n_items)).astype(np.float32) if ties else rng.random((n_q, n_items))
    return make_queries(targets, excludes, n_items), scores


def brute_ranks(queries, scores):
    """Loop version of the tie rule for checking: sort by (-score, index) after masking."""
    out = []
    for q in range(len(queries)):
        s = np.asarray(scores[q], dtype=np.float64).copy()
        t = queries.target_items[queries.target_indptr[q]:queries.target_indptr[q + 1]]
        keep = s[t].copy()
        s[queries.exclude_items[queries.exclude_indptr[q]:queries.exclude_indptr[q + 1]]] = -np.inf
        s[t] = keep
        order = np.lexsort((np.arange(s.size), -s))
        position = np.empty(s.size, dtype=np.int64)
        position[order] = np.arange(s.size)
        out.extend(position[t].tolist())
    return np.array(out)


# ---- hand-computed case -------------------------------------------------------------------------

HAND_SCORES = [[0.5, 0.9, 0.5, 0.1, 0.5],  # target 2, item 1 masked: item 0 ties and has a lower index
               [1.0, 2.0, 3.0, 4.0, 5.0],  # target 4 also listed as excluded: never masked
               [0.0, 0.0, 0.0, 0.0, 0.0],  # all tied: target 3 has three lower-index items above it
               [1.0, 1.0, 1.0, 1.0, 1.0]]  # four items masked: a single candidate
HAND_TARGETS = [[2], [4], [3], [4]]
HAND_EXCLUDES = [[1], [4, 3], [], [0, 1, 2, 3]]


def test_hand_computed_ranking():
    q = make_queries(HAND_TARGETS, HAND_EXCLUDES, 5)
    res = evaluate_ranking(table_fn(HAND_SCORES), q, ks=(1, 3))
    l3 = 1 / math.log2(3)
    np.testing.assert_array_equal(res.per_query["hr@1"], [0, 1, 0, 1])
    np.testing.assert_array_equal(res.per_query["hr@3"], [1, 1, 0, 1])
    np.testing.assert_allclose(res.per_query["ndcg@3"], [l3, 1, 0, 1])
    np.testing.assert_allclose(res.per_query["mrr@3"], [0.5, 1, 0, 1])
    np.testing.assert_allclose(res.per_query["precision@3"], [1 / 3, 1 / 3, 0, 1 / 3])
    # top-3 lists: {0,2,4}, {4,2,1}, {0,1,2}, {4} (masked items are never counted)
    np.testing.assert_array_equal(res.rec_counts[3], [2, 2, 3, 0, 3])
    np.testing.assert_array_equal(res.rec_counts[1], [2, 0, 0, 0, 2])
    s = res.summary()
    assert s["hr@3"] == pytest.approx(0.75)
    assert s["mrr@3"] == pytest.approx(2.5 / 4)
    assert s["coverage@3"] == pytest.approx(0.8)
    assert s["coverage@1"] == pytest.approx(0.4)
    assert res.n_queries == 4 and res.protocol == "test"


def test_tie_ordered_topk_by_hand():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, -math.inf],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [-math.inf, -math.inf, 5.0, -math.inf, -math.inf, -math.inf]])
    values, idx = tie_ordered_topk(scores, 3)
    assert idx.tolist() == [[1, 2, 4], [0, 1, 2], [2, 0, 1]]
    assert values[0].tolist() == [3.0, 3.0, 3.0]
    values, idx = tie_ordered_topk(scores, 4)
    assert idx.tolist() == [[1, 2, 4, 3], [0, 1, 2, 3], [2, 0, 1, 3]]


@pytest.mark.parametrize("seed", [0, 1])
def test_ranks_and_topk_follow_one_tie_rule(seed):
    q, scores = random_case(seed)  # integer scores in 0..4: ties everywhere
    t_rows = np.repeat(np.arange(len(q)), np.diff(q.target_indptr))
    # target_ranks alone (no masking) against the sort-based brute force, in blocks of 5 targets
    plain = make_queries([q.target_items[q.target_indptr[i]:q.target_indptr[i + 1]].tolist() for i in range(len(q))],
                         [[] for _ in range(len(q))], q.n_items)
    ranks = target_ranks(torch.tensor(scores), torch.tensor(t_rows), torch.tensor(q.target_items), block=5)
    np.testing.assert_array_equal(ranks.numpy(), brute_ranks(plain, scores))
    # top-K = the first K of the (-score, index) order, so "target in top-K" <=> "rank < K"
    _, idx = tie_ordered_topk(torch.tensor(scores), 7)
    for r in range(len(q)):
        np.testing.assert_array_equal(idx[r].numpy(), np.lexsort((np.arange(q.n_items), -scores[r]))[:7])
    # the evaluator (with masking): hits at every cut-off pin down every target's rank
    expected = brute_ranks(q, scores)
    for ks in [(1, 2, 3, 5, 8, 13), tuple(range(1, q.n_items + 1))]:  # top-k path and full-sort path
        res = evaluate_ranking(table_fn(scores), q, ks=ks)
        for k in ks:
            hits = np.bincount(t_rows, weights=expected < k, minlength=len(q))
            np.testing.assert_allclose(res.per_query[f"recall@{k}"], hits / np.diff(q.target_indptr))


@pytest.mark.parametrize("budget", [1e-6, 3 * 23 * 16 / 2**20])  # 1 row per chunk, 3 rows per chunk
def test_chunked_equals_unchunked(budget):
    q, scores = random_case(2)
    one = evaluate_ranking(table_fn(scores), q, ks=(3, 10), memory_budget_mb=256)
    chunked = evaluate_ranking(table_fn(scores), q, ks=(3, 10), memory_budget_mb=budget)
    for name in one.per_query:
        np.testing.assert_array_equal(one.per_query[name], chunked.per_query[name])
    for k in one.rec_counts:
        np.testing.assert_array_equal(one.rec_counts[k], chunked.rec_counts[k])
        assert one.rec_counts[k].dtype == np.int64


def test_shard_merge_equals_single_evaluation():
    q, scores = random_case(3, n_q=41)
    pop = np.arange(q.n_items)[::-1].copy()
    kwargs = dict(ks=(5, 10), item_popularity=pop, n_users_popularity=50)
    single = evaluate_ranking(table_fn(scores), q, **kwargs)
    # interleaved shards, as a distributed sampler deals them out
    shards = [np.arange(r, len(q), 3) for r in range(3)]
    parts = [evaluate_ranking(table_fn(scores[rows]), q.subset(rows), **kwargs) for rows in shards]
    merged = RankingResult.merge(parts)
    assert merged.n_queries == single.n_queries
    assert merged.summary() == single.summary()  # exact, whatever the gather order
    assert set(single.summary()) >= {"coverage@5", "avg_pop@10", "avg_pop_norm@10", "gini@10"}
    for k in single.rec_counts:
        np.testing.assert_array_equal(merged.rec_counts[k], single.rec_counts[k])


@pytest.mark.parametrize("max_targets", [1, 4])
def test_agrees_with_torchmetrics(max_targets):
    q, scores = random_case(4, n_q=30, n_items=40, ties=False, max_targets=max_targets)
    q = make_queries([q.target_items[q.target_indptr[i]:q.target_indptr[i + 1]].tolist() for i in range(len(q))],
                     [[] for _ in range(len(q))], q.n_items)  # torchmetrics ranks without masking
    res = evaluate_ranking(table_fn(scores), q, ks=(5, 10)).summary()
    relevant = np.zeros(scores.shape, dtype=bool)
    relevant[np.repeat(np.arange(len(q)), np.diff(q.target_indptr)), q.target_items] = True
    preds = torch.tensor(scores, dtype=torch.float32).flatten()
    target = torch.tensor(relevant).flatten()
    indexes = torch.arange(len(q)).repeat_interleave(q.n_items)
    for k in (5, 10):
        for name, metric in [("hr", RetrievalHitRate), ("ndcg", RetrievalNormalizedDCG), ("mrr", RetrievalMRR),
                             ("recall", RetrievalRecall), ("precision", RetrievalPrecision)]:
            expected = float(metric(top_k=k)(preds, target, indexes=indexes))
            assert res[f"{name}@{k}"] == pytest.approx(expected, abs=1e-6), f"{name}@{k}"


def test_rejects_bad_scores_and_queries():
    q = make_queries([[0], [1]], [[], []], 3)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_ranking(table_fn([[0, 1, 2], [0, np.nan, 1]]), q)  # full-sort path
    with pytest.raises(ValueError, match="query row 1"):
        evaluate_ranking(table_fn([[0, 1, 2], [0, 1, np.nan]]), q, ks=(1,))  # top-k path
    with pytest.raises(ValueError, match="ks"):
        evaluate_ranking(table_fn(np.zeros((2, 3))), q, ks=())
    with pytest.raises(ValueError, match="shape"):
        evaluate_ranking(lambda queries, rows: np.zeros((len(rows), 2)), q)
    with pytest.raises(ValueError, match="no target"):
        evaluate_ranking(table_fn(np.zeros((2, 3))), make_queries([[0], []], [[], []], 3))
    with pytest.raises(ValueError, match="outside"):
        evaluate_ranking(table_fn(np.zeros((2, 3))), make_queries([[0], [3]], [[], []], 3))


def test_format_table():
    text = format_table({"pop": {"hr@10": 0.08594, "n": 3}, "knn": {"hr@10": 0.1}}, ["hr@10", "n"], "ML")
    assert text == ("ML\n\n| method | hr@10 | n |\n|---|---:|---:|\n"
                    "| pop | 0.0859 | 3 |\n| knn | 0.1000 |  |\n")


# ---- sampled protocol ---------------------------------------------------------------------------

def test_sampled_with_given_negatives_by_hand():
    scores = [[0.1, 0.4, 0.3, 0.4, 0.2, 0.9],  # target 3 (0.4): negative 1 ties at a lower index -> above
              [0.1, 0.4, 0.3, 0.4, 0.2, 0.9]]  # target 0 (0.1): every negative above
    q = make_queries([[3], [0]], [[], []], 6)
    res = evaluate_sampled(table_fn(scores), q, negatives=np.array([[1, 2, 4], [5, 4, 2]]), ks=(1, 2, 4))
    np.testing.assert_array_equal(res.per_query["hr@1"], [0, 0])
    np.testing.assert_array_equal(res.per_query["hr@2"], [1, 0])
    np.testing.assert_allclose(res.per_query["mrr@4"], [0.5, 0.25])
    np.testing.assert_allclose(res.per_query["ndcg@4"], [1 / math.log2(3), 1 / math.log2(5)])
    assert res.protocol == "sampled (3 negatives) — comparison only"
    assert res.rec_counts == {}
    with pytest.raises(ValueError, match="own target"):
        evaluate_sampled(table_fn(scores), q, negatives=np.array([[1, 3, 4], [5, 4, 2]]))


def test_sample_negatives_avoids_excluded_and_is_seeded():
    n_items = 12
    q = make_queries([[0], [5], [11]], [[1, 2, 3], [], [0, 1, 2, 3, 4, 5, 6]], n_items)
    a = sample_negatives(q, 4, np.random.default_rng(7))
    b = sample_negatives(q, 4, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    forbidden = [{0, 1, 2, 3}, {5}, {0, 1, 2, 3, 4, 5, 6, 11}]
    for row, bad in zip(a, forbidden):
        assert len(set(row.tolist())) == 4 and not set(row.tolist()) & bad
    # exactly as many allowed items as negatives: the sample is that set
    tight = sample_negatives(q, 4, np.random.default_rng(0))[2]
    assert sorted(tight.tolist()) == [7, 8, 9, 10]
    with pytest.raises(ValueError, match="only 4 items"):
        sample_negatives(q, 5, np.random.default_rng(0))
    res = evaluate_sampled(table_fn(np.tile(np.arange(n_items, dtype=np.float32), (3, 1))), q, n_negatives=4, seed=3)
    assert res.protocol.startswith("sampled (4 negatives)")
    np.testing.assert_array_equal(res.per_query["hr@10"], [1, 1, 1])


def test_read_ncf_negatives(tmp_path):
    users = {"0": 0, "1": 1}
    items = {str(i): i + 100 for i in range(6)}
    path = tmp_path / "test.negative"
    path.write_text("(0,5)\t1\t2\t3\n(1,0)\t4\t5\t2\n\n")
    u, t, n = read_ncf_negatives(path, users, items)
    np.testing.assert_array_equal(u, [0, 1])
    np.testing.assert_array_equal(t, [105, 100])
    np.testing.assert_array_equal(n, [[101, 102, 103], [104, 105, 102]])
    for text, match in [("(0,5)\t1\t2\n0,5\t1\t2\n", "line 2"), ("(0,5)\t1\t9\n", "unknown item id '9'"),
                        ("(7,5)\t1\t2\n", "unknown user id '7'"), ("(0,5)\t1\t2\n(1,1)\t3\n", "line 2")]:
        path.write_text(text)
        with pytest.raises(DataError, match=match) as err:
            read_ncf_negatives(path, users, items)
        assert str(path) in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    q, scores = random_case(5, n_q=300, n_items=500)
    table = torch.tensor(scores, device="cuda")
    on_gpu = lambda queries, rows: table[torch.as_tensor(rows, device="cuda")]  # noqa: E731
    for ks in [(5, 20), (500,)]:
        cpu = evaluate_ranking(table_fn(scores), q, ks=ks, memory_budget_mb=0.1)
        gpu = evaluate_ranking(on_gpu, q, ks=ks, memory_budget_mb=0.1, device="cuda")
        assert gpu.summary() == cpu.summary()
        for k in ks:
            np.testing.assert_array_equal(gpu.rec_counts[k], cpu.rec_counts[k])
    single = make_queries([[t] for t in q.target_items[q.target_indptr[:-1]]], [[] for _ in range(len(q))], 500)
    assert evaluate_sampled(on_gpu, single, n_negatives=50, device="cuda").summary() == \
        evaluate_sampled(table_fn(scores), single, n_negatives=50).summary()
