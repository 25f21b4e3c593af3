"""MostPopular and ItemKNN against dense numpy brute force on tiny matrices."""
import math

import numpy as np
import pytest
import torch

from rectrain.evaluation import ItemKNN, MostPopular, RankingQueries, evaluate_ranking


def csr(lists):
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    return indptr, np.array([v for x in lists for v in x], dtype=np.int64)


def queries_from(histories, targets, n_items, mask=True):
    excludes = histories if mask else [[] for _ in histories]
    return RankingQueries(np.arange(len(histories)), *csr(targets), *csr(excludes), *csr(histories), n_items=n_items)


# 5 users x 6 items; (0, 1) appears twice and must count once; item 5 is never interacted with
USERS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 0])
ITEMS = np.array([0, 1, 2, 1, 2, 0, 2, 3, 4, 3, 4, 1])


def brute_knn(users, items, n_users, n_items, histories, self_similarity=0.0, neighbours=None, last_n=None):
    x = np.zeros((n_users, n_items))
    x[users, items] = 1.0
    n = x.sum(0)
    d = np.divide(1.0, np.sqrt(n), out=np.zeros(n_items), where=n > 0)
    sim = (x.T @ x) * d[:, None] * d[None, :]
    np.fill_diagonal(sim, 0.0)
    if neighbours is not None:
        kept = np.zeros_like(sim)
        for i in range(n_items):
            cand = [j for j in np.lexsort((np.arange(n_items), -sim[i])) if j != i and sim[i, j] > 0][:neighbours]
            kept[i, cand] = sim[i, cand]
        sim = kept
    np.fill_diagonal(sim, self_similarity)
    h = np.zeros((len(histories), n_items))
    for r, hist in enumerate(histories):
        h[r, hist[-last_n:] if last_n else hist] = 1.0
    return h @ sim


def test_most_popular_counts_distinct_users():
    pop = MostPopular().fit(USERS, ITEMS, 5, 6)
    np.testing.assert_array_equal(pop.popularity, [2, 2, 3, 2, 2, 0])
    clicks = MostPopular(distinct_users=False).fit(USERS, ITEMS, 5, 6)
    np.testing.assert_array_equal(clicks.popularity, [2, 3, 3, 2, 2, 0])  # user 0's repeat of item 1 counts
    q = queries_from([[0], [1, 2]], [[3], [4]], 6)
    scores = pop(q, np.array([0, 1]))
    assert scores.shape == (2, 6)
    np.testing.assert_array_equal(scores.numpy(), [[2, 2, 3, 2, 2, 0]] * 2)
    # row 0 masks item 0: order 2, 1, 3(target: ties 1 at a lower index), 4 -> rank 2
    # row 1 masks 1, 2: order 0, 3, 4(target) -> rank 2
    res = evaluate_ranking(pop, q, ks=(2, 3))
    np.testing.assert_array_equal(res.per_query["hr@2"], [0, 0])
    np.testing.assert_allclose(res.per_query["mrr@3"], [1 / 3, 1 / 3])
    np.testing.assert_array_equal(res.rec_counts[2], [1, 1, 1, 1, 0, 0])


def test_item_knn_hand_value():
    knn = ItemKNN().fit(USERS, ITEMS, 5, 6)
    q = queries_from([[0]], [[1]], 6)
    s = knn(q, np.array([0])).numpy()[0]
    # item 0: users {0, 2}; item 2: users {0, 1, 2}; item 3: users {2, 4}; item 5: nobody
    assert s[2] == pytest.approx(2 / math.sqrt(2 * 3))
    assert s[3] == pytest.approx(1 / math.sqrt(2 * 2))
    assert s[0] == 0.0 and s[5] == 0.0


HISTORIES = [[0], [1, 2, 1], [3, 4, 2, 0], [5], [5, 3], []]  # repeats, an item unseen in fit, an empty history


@pytest.mark.parametrize("mode", ["dense", "factorised", "neighbours"])
@pytest.mark.parametrize("self_similarity", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("last_n", [None, 1])
def test_item_knn_matches_brute_force(mode, self_similarity, last_n):
    neighbours = 2 if mode == "neighbours" else None
    knn = ItemKNN(self_similarity=self_similarity, neighbours=neighbours, last_n=last_n,
                  dense_max_mb=0 if mode == "factorised" else 256, dtype=torch.float64)
    knn.fit(USERS, ITEMS, 5, 6)
    assert knn.mode == mode
    q = queries_from(HISTORIES, [[0]] * len(HISTORIES), 6)
    got = knn(q, np.arange(len(HISTORIES))).numpy()
    want = brute_knn(USERS, ITEMS, 5, 6, HISTORIES, self_similarity, neighbours, last_n)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    if self_similarity == 0.0 and mode == "factorised":
        # the removed diagonal leaves an exact 0, not rounding residue, so ties break by index as intended
        assert got[0, 0] == 0.0 and got[3, 5] == 0.0


def test_item_knn_random_matrix_all_modes_agree():
    rng = np.random.default_rng(0)
    n_users, n_items = 30, 17
    users, items = rng.integers(0, n_users, 120), rng.integers(0, n_items, 120)
    hist = [rng.integers(0, n_items, rng.integers(1, 6)).tolist() for _ in range(9)]
    q = queries_from(hist, [[0]] * len(hist), n_items, mask=False)
    rows = np.arange(len(hist))
    for kwargs, k in [({}, None), ({"dense_max_mb": 0}, None), ({"neighbours": 4}, 4), ({"neighbours": 3}, 3)]:
        for self_sim in (0.0, 1.0):
            knn = ItemKNN(self_similarity=self_sim, memory_budget_mb=1e-3, **kwargs).fit(users, items, n_users, n_items)
            want = brute_knn(users, items, n_users, n_items, hist, self_sim, k)
            np.testing.assert_allclose(knn(q, rows).numpy(), want, rtol=1e-6, atol=1e-6)
    # neighbours >= catalog size is the full neighbourhood
    full = ItemKNN(neighbours=n_items).fit(users, items, n_users, n_items)(q, rows).numpy()
    np.testing.assert_allclose(full, brute_knn(users, items, n_users, n_items, hist), rtol=1e-6, atol=1e-6)


def test_item_knn_through_evaluator_masks_history():
    knn = ItemKNN().fit(USERS, ITEMS, 5, 6)
    q = queries_from([[0]], [[3]], 6)
    # scores for history {0}: item 2 = 2/sqrt(6) ~ 0.816, item 3 = 0.5, item 1 = 1/2, others 0; item 0 masked
    # order: 2, then 1 and 3 tie at 0.5 (1 first, lower index), so target 3 has rank 2
    res = evaluate_ranking(knn, q, ks=(2, 3))
    np.testing.assert_array_equal(res.per_query["hr@2"], [0])
    np.testing.assert_allclose(res.per_query["mrr@3"], [1 / 3])


def test_factorised_diagonal_removal_is_exact():
    # one history item per row: the product's sim(i, i) = n_i * (1/sqrt(n_i))^2 is not exactly 1 in floating point
    # for every n_i; removing it must leave an exact 0 (or self_similarity), or ties with 0 break by noise
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 30
    users, items = rng.integers(0, n_users, 300), rng.integers(0, n_items, 300)
    q = queries_from([[i] for i in range(n_items)], [[0]] * n_items, n_items, mask=False)
    for self_sim in (0.0, 1.0):
        knn = ItemKNN(self_similarity=self_sim, dense_max_mb=0).fit(users, items, n_users, n_items)
        diag = np.diag(knn(q, np.arange(n_items)).numpy())
        np.testing.assert_array_equal(diag, np.full(n_items, self_sim, dtype=np.float32))


def test_session_knn_against_brute_force():
    from rectrain.evaluation.baselines import SessionKNN
    from rectrain.data.queries import RankingQueries

    # training sessions (index order = time order)
    sessions = [[0, 1, 2], [1, 3], [2, 3, 4], [0, 4], [1, 2]]
    users = np.concatenate([[s] * len(x) for s, x in enumerate(sessions)])
    items = np.concatenate(sessions)
    knn = SessionKNN(k=2).fit(users, items, len(sessions), 5)
    prefixes = [[1], [0, 2], [3, 1, 3]]
    indptr = np.r_[0, np.cumsum([len(p) for p in prefixes])]
    q = RankingQueries(users=np.arange(3), target_indptr=np.arange(4), target_items=np.zeros(3, np.int64),
                       exclude_indptr=np.zeros(4, np.int64), exclude_items=np.zeros(0, np.int64),
                       history_indptr=indptr, history_items=np.concatenate(prefixes), n_items=5)
    got = knn(q, np.arange(3)).numpy()
    binary = np.zeros((len(sessions), 5))
    for s, x in enumerate(sessions):
        binary[s, x] = 1
    for r, prefix in enumerate(prefixes):
        w = np.zeros(5)
        for pos, item in enumerate(prefix, start=1):
            w[item] = max(w[item], pos / len(prefix))
        sim = binary @ w / np.sqrt(binary.sum(1) * len(set(prefix)))
        top = np.argsort(-sim, kind="stable")[:2]
        expected = (sim[top, None] * binary[top]).sum(0)
        np.testing.assert_allclose(got[r], expected, rtol=1e-6, atol=1e-7)
