import numpy as np
import pandas as pd
import pytest

from tests import reference_pipeline as splits
from rectrain.data.dataset import PreparedData, SplitConfig, load_or_prepare, prepare
from rectrain.data.preprocess import PreprocessConfig
from rectrain.data.schema import RawLog
from rectrain.errors import ConfigError, DataError


def make_log(rows):
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"]).astype({"user": str, "item": str})
    frame["timestamp"] = frame["timestamp"].astype(float)
    return RawLog(frame, source="test")


def test_leave_one_out_by_time_with_file_order_ties():
    log = make_log([
        ("a", "x", 1), ("b", "y", 5), ("a", "y", 3), ("a", "z", 3), ("a", "w", 2), ("b", "x", 6), ("b", "z", 7),
    ])
    data = prepare(log, PreprocessConfig(), SplitConfig("leave_one_out"))
    vocab = data.item_vocab
    a = np.flatnonzero(data.user_vocab == "a")[0]
    # a: x(1) w(2) y(3) z(3): the tie y/z keeps file order, so z is last -> test, y -> valid
    assert vocab[data.test.item[data.test.user == a]].tolist() == ["z"]
    assert vocab[data.valid.item[data.valid.user == a]].tolist() == ["y"]
    assert vocab[data.train.item[data.train.user == a]].tolist() == ["x", "w"]
    # items are indexed by first appearance in the file
    assert vocab.tolist() == ["x", "y", "z", "w"]
    q = data.ranking_queries("test")
    row = int(np.flatnonzero(q.users == a)[0])
    excluded = set(q.exclude_items[q.exclude_indptr[row]:q.exclude_indptr[row + 1]].tolist())
    assert excluded == {0, 3, 1}  # x, w, y: training + validation items masked at test time
    assert vocab[q.target_items[q.target_indptr[row]:q.target_indptr[row + 1]]].tolist() == ["z"]


def test_short_users_stay_in_train():
    labels = splits.leave_one_out(np.array([0, 0, 1, 1, 1]))
    assert labels.tolist() == [0, 0, 0, 1, 2]


def test_time_split_exact_fractions_and_no_leakage():
    rng = np.random.default_rng(0)
    ts = rng.integers(0, 50, size=1000).astype(float)
    labels = splits.time_split(ts, np.arange(1000), 0.1, 0.2)
    assert (labels == 2).sum() == 200 and (labels == 1).sum() == 100
    assert ts[labels == 0].max() <= ts[labels == 1].min() <= ts[labels == 1].max() <= ts[labels == 2].min()


def test_sessionize_and_session_split():
    user = np.array([0, 0, 0, 1, 1])
    ts = np.array([0, 10, 5000, 0, 20], dtype=float)
    sessions = splits.sessionize(user, ts, gap_seconds=1800)
    assert sessions.tolist() == [0, 0, 1, 2, 2]
    labels = splits.session_split(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 5, 6, 3, 9.0]), 0.0, 1 / 3)
    assert labels.tolist() == [0, 0, 0, 0, 2, 2]  # session 2 ends last -> test, whole


def test_session_queries_predict_every_next_click_unmasked():
    log = make_log([("s1", "a", 1), ("s1", "b", 2), ("s1", "a", 3), ("s2", "b", 10), ("s2", "c", 11),
                    ("s3", "a", 20), ("s3", "b", 21), ("s3", "c", 22)])
    data = prepare(log, PreprocessConfig(dedup="none"), SplitConfig("session", valid_fraction=0.0, test_fraction=0.34))
    q = data.ranking_queries("test")
    assert not data.mask_seen and q.exclude_items.size == 0
    v = data.item_vocab
    assert v[q.target_items].tolist() == ["b", "c"]
    hist = [v[q.history_items[q.history_indptr[i]:q.history_indptr[i + 1]]].tolist() for i in range(len(q))]
    assert hist == [["a"], ["a", "b"]]


def test_cache_is_reused_and_atomic(tmp_path):
    calls = []

    class Source:
        def load(self):
            calls.append(1)
            return make_log([("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("b", "x", 1)])

        def fingerprint(self):
            return {"kind": "test"}

    d1 = load_or_prepare(Source(), PreprocessConfig(), SplitConfig(), tmp_path)
    d2 = load_or_prepare(Source(), PreprocessConfig(), SplitConfig(), tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(d1.train.item, d2.train.item)
    assert d2.item_vocab.tolist() == d1.item_vocab.tolist()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left

    class Broken(Source):
        def load(self):
            return make_log([("a", "x", 1)])

        def fingerprint(self):
            return {"kind": "broken"}

    with pytest.raises(DataError, match="data.preprocess"):
        load_or_prepare(Broken(), PreprocessConfig(min_user_interactions=5), SplitConfig(), tmp_path)
    assert len(list(tmp_path.iterdir())) == 1  # only the first, complete cache


def test_bad_split_kind_names_the_key():
    with pytest.raises(ConfigError, match="data.split.kind"):
        prepare(make_log([("a", "x", 1)]), PreprocessConfig(), SplitConfig("random"))


def test_k_core_is_iterative():
    # removing item "r" (1 event) drops user "c" below 2 events, which drops item "q" below 2
    log = make_log([("a", "p", 1), ("a", "q", 2), ("b", "p", 1), ("b", "q", 2), ("c", "q", 3), ("c", "r", 4),
                    ("a", "s", 5), ("b", "s", 6)])
    data = prepare(log, PreprocessConfig(min_user_interactions=2, min_item_interactions=2), SplitConfig())
    assert sorted(data.user_vocab.tolist()) == ["a", "b"]
    assert "r" not in data.item_vocab


def test_cold_items_never_reach_training():
    from rectrain.data.synthetic import generate_synthetic

    data = prepare(generate_synthetic(n_users=200, n_items=100, seed=0), PreprocessConfig(),
                   SplitConfig(cold_item_fraction=0.1, cold_item_seed=3))
    assert data.cold_items.size == round(data.n_items * 0.1)
    assert not np.isin(data.train.item, data.cold_items).any()
    assert np.isin(data.test.item, data.cold_items).any()  # still asked for at evaluation
