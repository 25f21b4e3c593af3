"""Evaluation queries built a chunk of users at a time equal the queries built from the whole log.

At a billion events the targets, exclusions and histories of every user are a copy of the log; the
evaluator and the validation loop build them per chunk (binary search in the user-sorted splits)
and item popularity is counted per block of users. The oracle below is the former whole-log
construction (concatenate and sort the history, CSR over every user).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rectrain.data import dataset as dataset_module
from rectrain.data.dataset import Interactions, PreparedData, SplitConfig, prepare
from rectrain.data.preprocess import PreprocessConfig
from rectrain.data.queries import LazyQueries, RankingQueries, csr_from_groups
from rectrain.data.synthetic import generate_synthetic
from rectrain.evaluation import ranking
from rectrain.evaluation.ranking import evaluate_ranking


def oracle_queries(data: PreparedData, stage: str) -> RankingQueries:
    events = data.valid if stage == "valid" else data.test
    hist = data.history(stage)
    t_indptr, t_items = csr_from_groups(events.user, events.item, data.n_users)
    h_indptr, h_items = csr_from_groups(hist.user, hist.item, data.n_users)
    none = np.zeros(data.n_users + 1, np.int64)
    full = RankingQueries(np.arange(data.n_users, dtype=np.int64), t_indptr, t_items,
                          h_indptr if data.mask_seen else none, h_items if data.mask_seen else np.zeros(0, np.int64),
                          h_indptr, h_items, data.n_items, data.protocol_label())
    return full.subset(np.unique(events.user))


def oracle_popularity(data: PreparedData, stage: str) -> np.ndarray:
    hist = data.history(stage)
    pairs = np.unique(hist.user * data.n_items + hist.item)
    return np.bincount(pairs % data.n_items, minlength=data.n_items)


def assert_same(got: RankingQueries, want: RankingQueries) -> None:
    for name in ("users", "target_indptr", "target_items", "exclude_indptr", "exclude_items", "history_indptr",
                 "history_items"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert (got.n_items, got.protocol) == (want.n_items, want.protocol)


@pytest.fixture(scope="module")
def log():
    log = generate_synthetic(n_users=150, n_items=120, n_categories=4, mean_length=15, seed=5)
    frame = log.interactions.copy()
    # every user active over the whole period (a time split then cuts through most users), in
    # two-hour steps: many ties, broken by file order
    seconds = np.random.default_rng(5).random(len(frame)) * 60 * 86400
    frame["timestamp"] = 1.6e9 + np.floor(seconds / 7200.0) * 7200.0
    return dataclasses.replace(log, interactions=frame)


SPLITS = [SplitConfig("leave_one_out"), SplitConfig("leave_one_out", mask_seen=False),
          SplitConfig("time", valid_fraction=0.1, test_fraction=0.2)]


@pytest.mark.parametrize("split", SPLITS, ids=["loo", "loo-unmasked", "time"])
def test_queries_and_popularity_per_chunk_equal_the_whole_log(log, split, monkeypatch):
    data = prepare(log, PreprocessConfig(dedup="none", min_user_interactions=2), split)
    monkeypatch.setattr(dataset_module, "USER_BLOCK_EVENTS", 97)  # many blocks of whole users
    for stage in ("valid", "test"):
        want = oracle_queries(data, stage)
        assert len(want) > 50 and want.history_items.size > 500
        assert_same(data.ranking_queries(stage), want)
        lazy = data.lazy_queries(stage)
        assert isinstance(lazy, LazyQueries) and np.array_equal(lazy.users, want.users)
        rows = np.array([0, 3, 4, len(lazy) - 1])
        assert_same(lazy.subset(rows), dataclasses.replace(want.subset(rows), protocol=want.protocol))
        assert_same(lazy.select(rows[1:]).subset(np.array([1, 2])),
                    dataclasses.replace(want.subset(rows[2:]), protocol=want.protocol))
        popularity = data.item_popularity(stage)
        assert stage in data.popularity  # counted by the pipeline as it wrote the splits
        assert popularity.dtype == np.int64 and np.array_equal(popularity, oracle_popularity(data, stage))
        recounted = dataclasses.replace(data, popularity={}).item_popularity(stage)  # a cache from before
        assert np.array_equal(recounted, popularity)


def test_distinct_users_per_item_streamed_in_batches_equals_one_count():
    """The write loop's batches (re-cut to whole users, however the engine cut them) counted one by one."""
    from rectrain.data.engine.pipeline import whole_users
    from rectrain.data.engine.sinks import DistinctUsersPerItem

    rng = np.random.default_rng(0)
    user = np.sort(rng.integers(0, 40, size=3000))
    user[1000:1600] = user[999]  # one user longer than several batches
    user = np.sort(user)
    item = rng.integers(0, 25, size=3000)  # repeats within a user: distinct users, not rows
    want = np.bincount(np.unique(user * 25 + item) % 25, minlength=25)
    for cuts in ([], [1], [5, 6, 7, 500, 1100, 1200, 2999], list(range(0, 3000, 13))):
        counter = DistinctUsersPerItem(25)
        batches = ((user[lo:hi], item[lo:hi]) for lo, hi in zip([0, *cuts], [*cuts, 3000]))
        for users, items in whole_users(batches):
            counter.add(users, items)
        assert np.array_equal(counter.finish(), want), cuts


def test_time_split_histories_merge_train_and_valid_in_time_order(log):
    """Under the time split a user's test history is train then valid events, ordered by time with
    train first on a tie: built per chunk, exactly as the sorted concatenation."""
    data = prepare(log, PreprocessConfig(dedup="none", min_user_interactions=2),
                   SplitConfig("time", valid_fraction=0.3, test_fraction=0.2))
    queries = data.ranking_queries("test")
    mixed = [r for r in range(len(queries)) if np.isin(queries.users[r], data.valid.user)]
    assert mixed, "some test users have valid events in their history"
    row = mixed[0]
    user = queries.users[row]
    hist = queries.history_items[queries.history_indptr[row]:queries.history_indptr[row + 1]]
    train_items = data.train.item[data.train.user == user]
    valid_items = data.valid.item[data.valid.user == user]
    assert np.array_equal(hist, np.r_[train_items, valid_items])


def test_lazy_evaluation_in_chunks_equals_one_pass(log, monkeypatch):
    data = prepare(log, PreprocessConfig(), SplitConfig("leave_one_out"))
    popularity = data.item_popularity("test").astype(np.float32)
    rng = np.random.default_rng(0)
    noise = rng.random((data.n_users, data.n_items), dtype=np.float32)

    def score(q: RankingQueries, rows: np.ndarray) -> np.ndarray:
        return popularity[None, :] + noise[q.users[rows]]

    full = evaluate_ranking(score, data.ranking_queries("test"), ks=(5, 10), item_popularity=popularity)
    monkeypatch.setattr(ranking, "LAZY_CHUNK_QUERIES", 7)
    built = []
    lazy = data.lazy_queries("test")
    counting = dataclasses.replace(lazy, build=lambda rows: built.append(rows.size) or lazy.build(rows))
    chunked = evaluate_ranking(score, counting, ks=(5, 10), item_popularity=popularity)
    assert max(built) == 7 and sum(built) == len(lazy)  # never more than a chunk of histories at once
    for name, values in full.per_query.items():
        assert np.array_equal(chunked.per_query[name], values), name
    for k, counts in full.rec_counts.items():
        assert np.array_equal(chunked.rec_counts[k], counts)
    assert chunked.summary() == full.summary()


def test_a_split_not_sorted_by_user_is_refused_by_name(log):
    data = prepare(log, PreprocessConfig(), SplitConfig("leave_one_out"))
    order = np.random.default_rng(1).permutation(len(data.train))
    shuffled = dataclasses.replace(data, train=Interactions(data.train.user[order], data.train.item[order],
                                                            data.train.timestamp[order]))
    with pytest.raises(ValueError, match="train split is not sorted by user"):
        shuffled.lazy_queries("test")
