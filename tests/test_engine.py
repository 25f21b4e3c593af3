"""The engine pipeline (DuckDB, Spark) gives exactly the arrays of the former pandas pipeline.

``prepare_in_memory`` is the pandas implementation rectrain used before the engine; every
prepared array (each split's user/item/timestamp, vocabularies, side tables, cold items) and every
count in the stats must be identical, on the synthetic log, a MovieLens-format fixture and session
fixtures, for every split kind, with tied timestamps (file order breaks them). Parquet logs are
also scanned by the engine itself (file order from the files) and must equal the validated reader.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rectrain.data.dataset import PreparedData, SplitConfig, load_or_prepare, prepare
from rectrain.data.engine import EngineConfig
from rectrain.data.movielens import read_movielens
from rectrain.data.preprocess import PreprocessConfig
from rectrain.data.readers import read_interactions, read_sessions
from rectrain.data.sources import InteractionFileSource, SessionFileSource
from rectrain.data.synthetic import generate_synthetic
from rectrain.errors import ConfigError, DataError
from tests.reference_pipeline import prepare_in_memory

ARRAYS = ("user_vocab", "item_vocab", "item_titles", "category_vocab", "item_category_indptr",
          "item_category_index", "cold_items")


def assert_identical(got: PreparedData, want: PreparedData) -> None:
    for part in ("train", "valid", "test"):
        for col in ("user", "item", "timestamp"):
            a, b = getattr(getattr(got, part), col), getattr(getattr(want, part), col)
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{part}_{col}"
    for name in ARRAYS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert sorted(got.user_attributes) == sorted(want.user_attributes)
    for name, values in want.user_attributes.items():
        assert np.array_equal(got.user_attributes[name], values, equal_nan=values.dtype.kind == "f"), name
    strip = {"prepare_seconds", "source"}
    assert {k: v for k, v in got.stats.items() if k not in strip} == \
        {k: v for k, v in want.stats.items() if k not in strip}
    assert (got.split, got.mask_seen) == (want.split, want.mask_seen)


def tied(log, seconds: float):
    """The same log with timestamps rounded down to ``seconds``: many ties, broken by file order."""
    frame = log.interactions.copy()
    frame["timestamp"] = np.floor(frame["timestamp"] / seconds) * seconds
    return dataclasses.replace(log, interactions=frame)


@pytest.fixture(scope="module")
def synthetic():
    return tied(generate_synthetic(n_users=300, n_items=200, n_categories=6, mean_length=20, seed=3), 3600.0)


CASES = [
    (PreprocessConfig(), SplitConfig("leave_one_out")),
    (PreprocessConfig(min_user_interactions=5, min_item_interactions=5), SplitConfig("leave_one_out",
                                                                                    cold_item_fraction=0.1)),
    (PreprocessConfig(dedup="last", min_user_interactions=3, min_item_interactions=2), SplitConfig("time")),
    (PreprocessConfig(dedup="none"), SplitConfig("time", valid_fraction=0.05, test_fraction=0.15)),
    (PreprocessConfig(min_item_interactions=3), SplitConfig("session", session_gap=7200.0)),
    (PreprocessConfig(dedup="none", min_user_interactions=4), SplitConfig("session", min_session_length=3,
                                                                          mask_seen=True)),
]


@pytest.mark.parametrize("pre,split", CASES, ids=[f"{s.kind}-{p.dedup}-{i}" for i, (p, s) in enumerate(CASES)])
def test_duckdb_equals_pandas_on_the_synthetic_log(synthetic, pre, split):
    assert_identical(prepare(synthetic, pre, split), prepare_in_memory(synthetic, pre, split))


def write_movielens(root: Path, seed: int = 0) -> Path:
    """An ml-100k-format folder (u.data, u.item, u.genre, u.user) with ratings and tied timestamps."""
    rng = np.random.default_rng(seed)
    n, users, items = 3000, 120, 90
    root.mkdir(parents=True)
    data = pd.DataFrame({"u": rng.integers(1, users + 1, n), "i": rng.zipf(1.4, n) % items + 1,
                         "r": rng.integers(1, 6, n), "t": 880000000 + rng.integers(0, 400, n) * 60})
    data.to_csv(root / "u.data", sep="\t", header=False, index=False)
    genres = ["unknown", "Action", "Comedy", "Drama"]
    (root / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(genres)))
    lines = [f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|" + "|".join(str(int(b)) for b in rng.random(4) < 0.4)
             for i in range(1, items + 1)]
    (root / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    occupations = ["writer", "engineer", "other"]
    (root / "u.user").write_text("".join(f"{u}|{20 + u % 40}|{'MF'[u % 2]}|{occupations[u % 3]}|0{u:04d}\n"
                                         for u in range(1, users + 1)))
    return root


@pytest.mark.parametrize("split", [SplitConfig("leave_one_out"), SplitConfig("time")], ids=["loo", "time"])
def test_duckdb_equals_pandas_on_a_movielens_folder(tmp_path, split):
    log = read_movielens(write_movielens(tmp_path / "ml-100k"))
    pre = PreprocessConfig(min_rating=4.0, min_user_interactions=3, min_item_interactions=2)
    got, want = prepare(log, pre, split), prepare_in_memory(log, pre, split)
    assert_identical(got, want)
    assert got.n_categories == 4 and got.user_attributes  # the side tables did travel


def write_sessions(path: Path, seed: int, n_sessions: int = 150, fmt: str = "tsv", start: float = 1.4e9) -> Path:
    """A yoochoose-format click log: repeats inside sessions, tied times, sessions interleaved."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, n_sessions)
    session = np.repeat(np.arange(1, n_sessions + 1) + seed * 10_000, lengths)
    item = rng.zipf(1.3, session.size) % 80 + 1
    time = start + np.floor(np.repeat(rng.uniform(0, 5e5, n_sessions), lengths) + rng.integers(0, 30, session.size))
    frame = pd.DataFrame({"SessionId": session, "ItemId": item, "Time": time}).sample(frac=1.0, random_state=seed)
    if fmt == "parquet":
        frame.astype({"SessionId": str, "ItemId": str}).to_parquet(path, row_group_size=97)
    else:
        frame.to_csv(path, sep="\t", index=False)
    return path


def test_duckdb_equals_pandas_on_sessions_with_a_test_file(tmp_path):
    train, test = write_sessions(tmp_path / "train.tsv", 1), write_sessions(tmp_path / "test.tsv", 2, 40, start=1.41e9)
    pre = PreprocessConfig(dedup="none", min_item_interactions=2)
    split = SplitConfig("session", valid_fraction=0.2)
    assert_identical(prepare(read_sessions(train), pre, split, read_sessions(test)),
                     prepare_in_memory(read_sessions(train), pre, split, read_sessions(test)))


def test_parquet_is_scanned_by_the_engine_and_equals_the_reader(tmp_path):
    """A directory of Parquet files: file order is (file name, row); ids as ints or text alike."""
    log = tied(generate_synthetic(n_users=200, n_items=150, mean_length=15, seed=5), 600.0)
    frame = log.interactions.rename(columns={"user": "uid", "item": "sku", "timestamp": "ts"})
    folder = tmp_path / "events"
    folder.mkdir()
    cut = len(frame) // 3
    frame.iloc[:cut].assign(uid=lambda f: f.uid.astype(int)).to_parquet(folder / "part-0.parquet", row_group_size=500)
    frame.iloc[cut:].to_parquet(folder / "part-1.parquet", row_group_size=500)
    columns = {"user": "uid", "item": "sku", "timestamp": "ts"}
    pre, split = PreprocessConfig(min_user_interactions=3, min_item_interactions=3), SplitConfig("leave_one_out")
    source = InteractionFileSource(str(folder), columns)
    assert source.engine_inputs() is not None
    got = load_or_prepare(source, pre, split, tmp_path / "cache")
    want = prepare_in_memory(dataclasses.replace(log, items=None, users=None), pre, split)  # no side tables given
    assert_identical(got, want)
    # and through a glob, and the second load comes from the cache it wrote
    globbed = load_or_prepare(InteractionFileSource(str(folder / "part-*.parquet"), columns), pre, split,
                              tmp_path / "cache")
    assert_identical(globbed, want)


def test_a_csv_log_is_streamed_to_the_engine_in_chunks_and_equals_the_reader(tmp_path, monkeypatch):
    """A CSV is never read whole: validated chunk by chunk, written to Parquet, scanned by the engine."""
    from rectrain.data import readers

    log = tied(generate_synthetic(n_users=200, n_items=150, mean_length=15, seed=6), 600.0)
    path = tmp_path / "events.csv"
    log.interactions.rename(columns={"user": "uid", "item": "sku", "timestamp": "ts"}).to_csv(path, index=False)
    columns = {"user": "uid", "item": "sku", "timestamp": "ts"}
    pre, split = PreprocessConfig(min_user_interactions=3, min_item_interactions=3), SplitConfig("leave_one_out")
    want = prepare_in_memory(read_interactions(path, columns), pre, split)
    chunks = []
    monkeypatch.setattr(readers, "READ_CHUNK_ROWS", 257)
    monkeypatch.setattr(readers, "read_interactions", lambda *a, **k: pytest.fail("the whole log was read"))
    real_validate = readers._validate
    monkeypatch.setattr(readers, "_validate", lambda frame, *a, **k: chunks.append(len(frame)) or
                        real_validate(frame, *a, **k))
    got = load_or_prepare(InteractionFileSource(str(path), columns), pre, split, tmp_path / "cache")
    assert_identical(got, want)
    assert max(chunks) == 257 and sum(chunks) == len(log.interactions)
    assert not [p for p in (tmp_path / "cache").rglob("*.parquet")]  # the Parquet copy went with the engine


def test_csv_ids_that_are_canonical_integers_are_scanned_as_integers_and_others_stay_text(tmp_path, monkeypatch):
    """``7`` and ``007`` are two items; ``-3`` and ``12`` may be integers: the vocabularies say the same."""
    from rectrain.data import readers
    from rectrain.data.engine.backends import connect
    from rectrain.data.engine.scan import from_chunks

    rng = np.random.default_rng(4)
    n = 4000
    users = rng.integers(-20, 120, n).astype(str)
    items = np.where(rng.random(n) < 0.1, "007", rng.integers(0, 60, n).astype(str))  # "007" beside "7"
    path = tmp_path / "events.csv"
    pd.DataFrame({"u": users, "i": items, "t": 1e9 + rng.integers(0, 500, n) * 60}).to_csv(path, index=False)
    columns = {"user": "u", "item": "i", "timestamp": "t"}
    monkeypatch.setattr(readers, "READ_CHUNK_ROWS", 999)
    engine = connect(EngineConfig(), tmp_path)
    try:
        scanned = from_chunks(engine, readers.iter_interactions(path, columns))
        assert scanned.schema()["user"].is_integer() and scanned.schema()["item"].is_string()
    finally:
        engine.close()
    pre, split = PreprocessConfig(min_user_interactions=3, min_item_interactions=3), SplitConfig("leave_one_out")
    got = load_or_prepare(InteractionFileSource(str(path), columns), pre, split, tmp_path / "cache")
    assert_identical(got, prepare_in_memory(read_interactions(path, columns), pre, split))
    assert {"007", "7"} <= set(got.item_vocab.tolist()) and "-3" in set(got.user_vocab.tolist())


def test_tsv_sessions_with_a_test_file_are_streamed_and_equal_the_reader(tmp_path, monkeypatch):
    from rectrain.data import readers

    train, test = write_sessions(tmp_path / "train.tsv", 1), write_sessions(tmp_path / "test.tsv", 2, 40, start=1.41e9)
    pre, split = PreprocessConfig(dedup="none", min_item_interactions=2), SplitConfig("session", valid_fraction=0.2)
    want = prepare_in_memory(read_sessions(train), pre, split, read_sessions(test))
    monkeypatch.setattr(readers, "READ_CHUNK_ROWS", 100)
    assert_identical(load_or_prepare(SessionFileSource(str(train), str(test)), pre, split, None), want)


def test_a_bad_value_deep_in_a_csv_names_its_line_and_leaves_no_cache(tmp_path, monkeypatch):
    from rectrain.data import readers

    rows = [f"{i % 50},{i % 40},{1000 + i}" for i in range(5000)]
    rows[4321] = "7,,1234"
    path = tmp_path / "events.csv"
    path.write_text("u,i,t\n" + "\n".join(rows) + "\n")
    monkeypatch.setattr(readers, "READ_CHUNK_ROWS", 1000)
    with pytest.raises(DataError) as info:
        load_or_prepare(InteractionFileSource(str(path), {"user": "u", "item": "i", "timestamp": "t"}),
                        PreprocessConfig(), SplitConfig(), tmp_path / "cache")
    assert f"{path}" in str(info.value) and "line 4323" in str(info.value) and "column 'i'" in str(info.value)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_csv_log_on_a_spark_cluster_is_read_in_memory_with_a_warning(tmp_path, caplog):
    """Its executors could not read the local Parquet copy: the log goes over as one table, as
    before streaming, and the user is told how to go beyond memory."""
    from types import SimpleNamespace

    from rectrain.data.engine.backends import Engine
    from rectrain.data.engine.scan import from_chunks
    from rectrain.data.readers import iter_interactions

    def spark(master: str) -> Engine:
        return Engine(SimpleNamespace(_session=SimpleNamespace(sparkContext=SimpleNamespace(master=master))), "spark",
                      tmp_path)

    path = tmp_path / "events.csv"
    path.write_text("u,i,t\n" + "".join(f"{k % 7},{k % 5},{1000 + k}\n" for k in range(50)))
    cluster = spark("spark://head:7077")
    cluster.register = lambda table: table  # what Spark would be handed
    with caplog.at_level("WARNING"):
        handed = from_chunks(cluster, iter_interactions(path, {"user": "u", "item": "i", "timestamp": "t"},
                                                        chunk_rows=16))
    assert "convert it once to Parquet" in caplog.text
    assert handed.column("user").to_pylist() == [str(k % 7) for k in range(50)]
    assert handed.column("_order").to_pylist() == list(range(50))
    assert spark("local[2]").reads_local_files() and not spark("yarn").reads_local_files()


def _scanned_types(tmp_path, make) -> dict[str, str]:
    from rectrain.data.engine.backends import connect

    engine = connect(EngineConfig(), tmp_path)
    try:
        schema = make(engine).schema()
        return {name: str(schema[name]) for name in ("user", "item", "timestamp", "_order")}
    finally:
        engine.close()


def test_ids_and_file_positions_are_scanned_as_int32_while_they_fit_and_the_arrays_do_not_change(tmp_path):
    """Narrow rows for every pass (dedup's window spills ~20 instead of ~32 bytes an event): an id
    column is int32 when the files' statistics say every id fits, int64 when one does not or when a
    writer left no statistics; the prepared arrays are those of the reader either way."""
    from rectrain.data.engine.scan import from_parquet

    log = tied(generate_synthetic(n_users=150, n_items=120, mean_length=15, seed=8), 600.0)
    frame = log.interactions.rename(columns={"user": "uid", "item": "sku", "timestamp": "ts"})
    frame = frame.assign(uid=frame.uid.astype(np.int64), sku=frame.sku.astype(np.int64))
    columns = {"user": "uid", "item": "sku", "timestamp": "ts"}
    pre, split = PreprocessConfig(min_user_interactions=3, min_item_interactions=3), SplitConfig("leave_one_out")
    wide = frame.assign(sku=np.where(frame.sku == frame.sku.iloc[-1], 2**31, frame.sku))  # one item past int32
    cases = {"fit": (frame, {}, "int32"), "past int32": (wide, {}, "int64"),
             "no statistics": (frame, {"write_statistics": False}, "int64")}
    for name, (data, options, item_type) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        data.iloc[:500].to_parquet(folder / "a.parquet", row_group_size=200, **options)
        data.iloc[500:].to_parquet(folder / "b.parquet", row_group_size=200, **options)
        types = _scanned_types(tmp_path, lambda engine: from_parquet(engine, folder, columns))
        assert types == {"user": "int32" if not options else "int64", "item": item_type, "timestamp": "int32",
                         "_order": "int32"}, name
        got = load_or_prepare(InteractionFileSource(str(folder), columns), pre, split, None)
        reader = read_interactions(folder / "a.parquet", columns)  # the reader of one file, then the other
        both = pd.concat([reader.interactions, read_interactions(folder / "b.parquet", columns).interactions],
                         ignore_index=True)
        assert_identical(got, prepare_in_memory(dataclasses.replace(reader, interactions=both), pre, split))
        if name == "past int32":
            assert str(2**31) in set(got.item_vocab.tolist())


def test_csv_ids_are_scanned_as_int32_while_every_chunk_fits(tmp_path, monkeypatch):
    from rectrain.data import readers
    from rectrain.data.engine.scan import from_chunks

    monkeypatch.setattr(readers, "READ_CHUNK_ROWS", 100)
    columns = {"user": "u", "item": "i", "timestamp": "t"}
    items = np.arange(300) % 40
    items[-1] = -(2**31) - 1  # in the last chunk only: one id below int32
    path = tmp_path / "events.csv"
    pd.DataFrame({"u": np.arange(300) % 25, "i": items, "t": 1e9 + np.arange(300)}).to_csv(path, index=False)
    types = _scanned_types(tmp_path, lambda engine: from_chunks(engine, readers.iter_interactions(path, columns)))
    assert types == {"user": "int32", "item": "int64", "timestamp": "int32", "_order": "int32"}


@pytest.mark.parametrize("times,expected", [("whole", "int32"), ("one fraction", "float64"),
                                            ("past 2038", "float64"), ("before 1970", "float64")])
def test_timestamps_are_scanned_as_int32_only_when_all_are_whole_seconds_that_fit(tmp_path, times, expected):
    """Whole seconds in [0, 2^31) sort and spill as int32; anything else stays float64, and the
    cache's timestamps are the same float64 values from every source either way."""
    from rectrain.data.engine.scan import from_parquet, from_raw_log

    log = tied(generate_synthetic(n_users=120, n_items=100, mean_length=12, seed=9), 60.0)
    seconds = log.interactions["timestamp"].to_numpy().copy()
    if times == "one fraction":
        seconds[len(seconds) // 2] += 0.25
    elif times == "past 2038":
        seconds += 2**31 - seconds.min()
    elif times == "before 1970":
        seconds -= seconds.max() + 1.0
    log = dataclasses.replace(log, interactions=log.interactions.assign(timestamp=seconds), items=None, users=None)
    columns = {"user": "user", "item": "item", "timestamp": "timestamp"}
    path = tmp_path / "events.parquet"
    log.interactions.to_parquet(path, row_group_size=300)
    csv = tmp_path / "events.csv"
    log.interactions.to_csv(csv, index=False)
    for make in (lambda engine: from_parquet(engine, path, columns), lambda engine: from_raw_log(engine, log)):
        assert _scanned_types(tmp_path, make)["timestamp"] == expected
    pre, split = PreprocessConfig(min_user_interactions=3, min_item_interactions=3), SplitConfig("leave_one_out")
    want = prepare_in_memory(log, pre, split)
    for source in (InteractionFileSource(str(path), columns), InteractionFileSource(str(csv), columns)):
        assert_identical(load_or_prepare(source, pre, split, None), want)


def test_session_logs_whose_integer_ids_differ_in_width_are_joined_as_int64(tmp_path):
    """Training items fit int32, one test item does not: both logs' items become int64, not text."""
    train, test = write_sessions(tmp_path / "train.tsv", 5), write_sessions(tmp_path / "test.tsv", 6, 40, start=1.41e9)
    frame = pd.read_csv(test, sep="\t", dtype=str)
    frame.loc[frame.index[:3], "ItemId"] = str(2**33)
    frame.to_csv(test, sep="\t", index=False)
    pre, split = PreprocessConfig(dedup="none", min_item_interactions=2), SplitConfig("session", valid_fraction=0.2)
    got = load_or_prepare(SessionFileSource(str(train), str(test)), pre, split, None)
    assert_identical(got, prepare_in_memory(read_sessions(train), pre, split, read_sessions(test)))


def test_session_logs_whose_ids_differ_in_type_are_joined_as_text(tmp_path):
    """Training items all canonical integers (scanned as integers), the test file's not: one type."""
    train, test = write_sessions(tmp_path / "train.tsv", 1), write_sessions(tmp_path / "test.tsv", 2, 40, start=1.41e9)
    frame = pd.read_csv(test, sep="\t", dtype=str)
    frame.loc[frame.index[:5], "ItemId"] = "00" + frame["ItemId"].iloc[:5]  # "0012": text, another item than 12
    frame.to_csv(test, sep="\t", index=False)
    pre, split = PreprocessConfig(dedup="none", min_item_interactions=2), SplitConfig("session", valid_fraction=0.2)
    got = load_or_prepare(SessionFileSource(str(train), str(test)), pre, split, None)
    assert_identical(got, prepare_in_memory(read_sessions(train), pre, split, read_sessions(test)))


def test_parquet_sessions_equal_the_tsv_reader(tmp_path):
    train = write_sessions(tmp_path / "train.parquet", 3, fmt="parquet")
    test = write_sessions(tmp_path / "test.parquet", 4, 30, fmt="parquet", start=1.41e9)
    pre, split = PreprocessConfig(dedup="none"), SplitConfig("session", valid_fraction=0.1)
    got = load_or_prepare(SessionFileSource(str(train), str(test)), pre, split, None)
    want = prepare_in_memory(read_sessions(train), pre, split, read_sessions(test))
    assert_identical(got, want)


def test_a_bad_parquet_value_names_file_row_group_and_row(tmp_path):
    frame = pd.DataFrame({"user_id": [str(i % 7) for i in range(1000)], "item_id": [str(i % 13) for i in range(1000)],
                          "timestamp": np.arange(1000, dtype=float)})
    frame.loc[640, "item_id"] = "  "
    path = tmp_path / "log.parquet"
    frame.to_parquet(path, row_group_size=256)
    source = InteractionFileSource(str(path), {"user": "user_id", "item": "item_id", "timestamp": "timestamp"})
    with pytest.raises(DataError) as info:
        load_or_prepare(source, PreprocessConfig(), SplitConfig(), tmp_path / "cache")
    text = str(info.value)
    assert f"{path}, row group 2, row 641" in text and "item_id" in text and "data.source.columns.item" in text
    # every column is checked in one pass; the first column of the mapping with a bad row is named
    frame.loc[100, "timestamp"] = np.nan
    frame.to_parquet(path, row_group_size=256)
    with pytest.raises(DataError, match=r"item_id.*row group 2, row 641"):
        load_or_prepare(source, PreprocessConfig(), SplitConfig(), tmp_path / "cache")
    frame.loc[640, "item_id"] = "x"
    frame.to_parquet(path, row_group_size=256)
    with pytest.raises(DataError) as info:
        load_or_prepare(source, PreprocessConfig(), SplitConfig(), tmp_path / "cache")
    assert f"{path}, row group 0, row 101" in str(info.value) and "data.source.columns.timestamp" in str(info.value)
    # integer ids: a column whose statistics count no null is not read to check; one null is found
    # whether the writer kept statistics or not
    ints = frame.assign(user_id=pd.array(np.arange(1000) % 7, dtype="Int64"), item_id=np.arange(1000) % 13,
                        timestamp=np.arange(1000, dtype=float))
    ints.to_parquet(path, row_group_size=256)
    assert load_or_prepare(source, PreprocessConfig(), SplitConfig(), None).stats["rows_read"] == 1000
    ints.loc[900, "user_id"] = pd.NA
    for statistics in (True, False):
        ints.to_parquet(path, row_group_size=256, write_statistics=statistics)
        with pytest.raises(DataError, match=r"row group 3, row 901.*user_id|user_id.*row group 3, row 901"):
            load_or_prepare(source, PreprocessConfig(), SplitConfig(), None)


def test_the_engine_spills_inside_the_cache_dir_and_leaves_nothing(tmp_path, synthetic, monkeypatch):
    from rectrain.data.engine import backends

    seen = []
    real = backends.connect
    monkeypatch.setattr(backends, "connect", lambda cfg, root: seen.append(Path(root)) or real(cfg, root))
    import rectrain.data.engine as engine_pkg
    monkeypatch.setattr(engine_pkg, "connect", backends.connect)
    cache = tmp_path / "cache"
    load_or_prepare(_InMemory(synthetic), PreprocessConfig(), SplitConfig(), cache,
                    engine=EngineConfig(memory_limit="200MB", threads=1))
    assert seen == [cache]
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == \
        [p.name for p in cache.iterdir() if not p.name.startswith(".")]  # only the finished cache is left


class _InMemory:
    def __init__(self, log):
        self.log = log

    def load(self):
        return self.log

    def fingerprint(self):
        return {"kind": "test", "n": len(self.log.interactions)}


def test_a_stale_engine_folder_of_a_killed_run_is_removed(tmp_path, synthetic):
    from rectrain.utils.io import TEMP_MARK, _HOST

    cache = tmp_path / "cache"
    stale = cache / f".engine.{TEMP_MARK}.{_HOST}.999999999.x.tmp"
    (stale / "spill").mkdir(parents=True)
    (stale / "spill" / "duckdb_temp_block.bin").write_bytes(b"x" * 100)
    load_or_prepare(_InMemory(synthetic), PreprocessConfig(), SplitConfig(), cache)
    assert not stale.exists()


def test_engine_settings_are_checked_with_the_key():
    with pytest.raises(ConfigError, match="data.engine.name"):
        EngineConfig(name="polars")
    with pytest.raises(ConfigError, match="data.engine.threads"):
        EngineConfig(threads=0)
    with pytest.raises(ConfigError, match="data.engine"):
        prepare(generate_synthetic(n_users=20, n_items=10, seed=0), PreprocessConfig(), SplitConfig(),
                engine=EngineConfig(memory_limit="lots"))


spark = pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs Java")


@pytest.mark.slow
@spark
def test_spark_equals_pandas_on_every_fixture(tmp_path, synthetic):
    """One Spark session (local[2]) for all fixtures: JVM start-up is most of this test's time."""
    pytest.importorskip("pyspark")
    engine = EngineConfig(name="spark", master="local[2]")
    for pre, split in (CASES[1], CASES[2], CASES[4]):
        assert_identical(prepare(synthetic, pre, split, engine=engine), prepare_in_memory(synthetic, pre, split))
    log = read_movielens(write_movielens(tmp_path / "ml-100k"))
    pre = PreprocessConfig(min_rating=4.0, min_user_interactions=3, min_item_interactions=2)
    assert_identical(prepare(log, pre, SplitConfig(), engine=engine), prepare_in_memory(log, pre, SplitConfig()))
    train = write_sessions(tmp_path / "train.parquet", 3, fmt="parquet")
    test = write_sessions(tmp_path / "test.parquet", 4, 30, fmt="parquet", start=1.41e9)
    pre, split = PreprocessConfig(dedup="none"), SplitConfig("session", valid_fraction=0.1)
    got = load_or_prepare(SessionFileSource(str(train), str(test)), pre, split, tmp_path / "cache", engine=engine)
    assert_identical(got, prepare_in_memory(read_sessions(train), pre, split, read_sessions(test)))
    train_tsv = write_sessions(tmp_path / "train.tsv", 3)  # a delimited log, streamed to Spark as Parquet
    got = load_or_prepare(SessionFileSource(str(train_tsv)), pre, split, None, engine=engine)
    assert_identical(got, prepare_in_memory(read_sessions(train_tsv), pre, split))


def test_validation_on_sampled_users_is_seeded_labelled_and_the_test_stays_complete(compose_cfg):
    """eval.sample_users=N: validation ranks every item for a seeded sample of N users, says so in
    the protocol, results.json and TensorBoard; the test split keeps every user."""
    from rectrain.training import build, train
    from tests.conftest import TINY_DATA

    cfg = compose_cfg(*TINY_DATA, "trainer.max_epochs=1", "eval.sample_users=40")
    full = build(compose_cfg(*TINY_DATA).data)
    sampled, again = build(cfg.data), build(cfg.data)
    n_valid, n_test = len(full.queries("valid")), len(full.queries("test"))
    assert n_valid > 40
    valid = sampled.queries("valid")
    assert len(valid) == 40 and np.array_equal(valid.users, again.queries("valid").users)  # seeded
    assert np.isin(valid.users, full.queries("valid").users).all()
    assert "sample of 40 of" in valid.protocol and "not negatives" in valid.protocol
    assert len(sampled.queries("test")) == n_test  # the final test: every user
    results = train(cfg)
    sample = results["evaluation_sample"]
    assert list(sample) == ["valid"] and sample["valid"]["sampled_users"] == 40 and sample["valid"]["of"] == n_valid
    assert results["valid"]["sampled_users"] == 40 and "sampled_users" not in results["test"]
    with pytest.raises(ConfigError, match="eval.sample_users"):
        build(compose_cfg(*TINY_DATA, "eval.sample_users=0").data)


def test_an_engine_failure_or_a_full_disk_is_one_line_naming_the_stage(tmp_path, synthetic, monkeypatch):
    import errno

    from rectrain.data.engine import sinks
    from rectrain.data.engine.pipeline import EngineFailure

    def full(handle, hasher, data):  # on the sink's writer thread: raised by a later append or finish
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sinks.NpyFileSink, "_write", staticmethod(full))
    cache = tmp_path / "cache"
    with pytest.raises(EngineFailure) as info:
        load_or_prepare(_InMemory(synthetic), PreprocessConfig(), SplitConfig(), cache)
    text = str(info.value)
    assert "stage 'sort and write arrays'" in text and "disk is full" in text and "\n" not in text
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # nothing half-written left
    monkeypatch.undo()
    from rectrain.data.engine import backends

    real = backends.Engine.keep
    monkeypatch.setattr(backends.Engine, "keep", lambda self, expr: (_ for _ in ()).throw(
        __import__("duckdb").OutOfMemoryException("Out of Memory Error: could not allocate block")))
    with pytest.raises(EngineFailure, match=r"stage 'dedup' on duckdb: "
                                            r"OutOfMemoryException"):
        prepare(synthetic, PreprocessConfig(), SplitConfig())
    monkeypatch.setattr(backends.Engine, "keep", real)


@pytest.mark.parametrize("pre,split", [CASES[1], CASES[2], CASES[4]], ids=["loo", "time", "session"])
def test_per_user_parts_and_sorted_blocks_change_nothing(synthetic, pre, split, monkeypatch):
    """At a billion events dedup and k-core's counts run per hash part of the ids and the final sort
    (with the leave-one-out labels) per block of users; shrunk to a few thousand events here, the arrays are still identical."""
    from rectrain.data.engine import pipeline

    monkeypatch.setattr(pipeline, "EVENTS_PER_PART", 1500)
    monkeypatch.setattr(pipeline, "BYTES_PER_COUNTED_ID", 2**32 // 40)  # the 4GB default cap: 40 ids per part
    monkeypatch.setattr(pipeline, "SINGLE_SORT_EVENTS", 2000)
    monkeypatch.setattr(pipeline, "SORT_BLOCK_EVENTS", 997)
    count_parts: list[dict[str, int]] = []
    real_count = pipeline._count_per_id

    def spied(engine, events, column, n_events, parts_of):
        counted = real_count(engine, events, column, n_events, parts_of)
        count_parts.append(dict(parts_of))
        return counted

    monkeypatch.setattr(pipeline, "_count_per_id", spied)
    assert len(synthetic.interactions) > 4 * 1500
    assert_identical(prepare(synthetic, pre, split), prepare_in_memory(synthetic, pre, split))
    assert count_parts and all(parts > 1 for parts in count_parts[-1].values())  # the counts ran in parts


@pytest.mark.parametrize("spread", [1, 10_000], ids=["dense ids: codes looked up in numpy", "sparse ids: joined"])
def test_blocks_of_integer_user_ids_get_their_codes_by_lookup_or_join_alike(tmp_path, spread, monkeypatch):
    """Past SINGLE_SORT_EVENTS the blocks give int32 user ids in a dense range their codes from a
    table indexed by id, and other ids theirs from the engine's join: the arrays are identical."""
    from rectrain.data.engine import pipeline

    log = tied(generate_synthetic(n_users=150, n_items=100, mean_length=15, seed=12), 600.0)
    frame = log.interactions.assign(user=log.interactions.user.astype(np.int64) * spread + 7,
                                    item=log.interactions.item.astype(np.int64))
    path = tmp_path / "events.parquet"
    frame.to_parquet(path, row_group_size=400)
    columns = {"user": "user", "item": "item", "timestamp": "timestamp"}
    monkeypatch.setattr(pipeline, "SINGLE_SORT_EVENTS", 1000)
    monkeypatch.setattr(pipeline, "SORT_BLOCK_EVENTS", 311)
    lookups = []
    real = pipeline._user_code_lookup
    monkeypatch.setattr(pipeline, "_user_code_lookup", lambda *a: lookups.append(real(*a)) or lookups[-1])
    reader = read_interactions(path, columns)
    for pre, split in ((PreprocessConfig(min_user_interactions=3, min_item_interactions=3),
                        SplitConfig("leave_one_out")), (PreprocessConfig(), SplitConfig("time"))):
        got = load_or_prepare(InteractionFileSource(str(path), columns), pre, split, None)
        assert_identical(got, prepare_in_memory(reader, pre, split))
    assert len(lookups) == 2 and all((found is not None) == (spread == 1) for found in lookups)


@pytest.mark.parametrize("dense", [False, True], ids=["parquet", "dense"])
def test_partition_writes_each_part_once_and_gives_its_disk_back(tmp_path, dense):
    """The parts of a billion-event table are written once and read alone (Parquet, or raw column
    files bucketed in numpy when every column is a non-null number); an empty part is None; a part
    read for the last time is removed at once, the rest on close."""
    import ibis
    import pyarrow as pa

    from rectrain.data.engine.backends import connect

    engine = connect(EngineConfig(memory_limit="256MB", threads=1), tmp_path)
    try:
        users = np.arange(10, dtype=np.int64)
        table = engine.register(pa.table({"user": users, "code": users.astype(np.int32) * 3,
                                          "value": np.arange(10) * 1.5}))
        real_batches = engine.batches
        engine.batches = lambda expr, rows=1 << 20: real_batches(expr, rows=3)  # several batches per part
        parts = engine.partition(table, table.user % 4 + ibis.ifelse(table.user % 4 == 3, 1, 0), 5, dense=dense)
        assert parts.folder is not None and parts.folder.is_dir()
        got = [None if t is None else sorted(t.execute()["user"].tolist()) for t in parts.tables]
        assert got == [[0, 4, 8], [1, 5, 9], [2, 6], None, [3, 7]]
        assert list(parts.tables[0].columns) == ["user", "code", "value"]
        assert parts.tables[0].schema() == table.schema()  # each column's type kept
        last = parts.tables[4].execute().sort_values("user")
        assert last["value"].tolist() == [4.5, 10.5] and last["code"].tolist() == [9, 21]
        first, second = ("_part=0", "_part=1") if not dense else ("0.user", "1.user")
        parts.drop(0)
        assert not (parts.folder / first).exists() and (parts.folder / second).exists()
        assert parts.tables[0] is None and sorted(parts.tables[1].execute()["user"]) == [1, 5, 9]
        parts.close()
        assert not parts.folder.exists()
        if dense:  # a null cannot be a raw number: refused, not written as garbage
            nulls = engine.register(pa.table({"user": pa.array([1, None, 3], type=pa.int64())}))
            with pytest.raises(ValueError, match="column user holds nulls"):
                engine.partition(nulls, nulls.user.fill_null(0) % 2, 2, dense=True)
        single = engine.partition(table, table.user * 0, 1)
        assert single.folder is None and single.tables == [table]
    finally:
        engine.close()


@pytest.mark.parametrize("limit,expected", [("3GB", 3e9), ("256MB", 256e6), ("2GiB", 2 * 2**30)])
def test_the_engine_reads_its_memory_cap_as_duckdb_does(tmp_path, limit, expected):
    """k-core sizes its count parts by the cap: DuckDB's own reading of it (GB = 10^9, GiB = 2^30)."""
    from rectrain.data.engine.backends import connect

    engine = connect(EngineConfig(memory_limit=limit, threads=1), tmp_path)
    try:
        assert engine.memory_bytes() == pytest.approx(expected, rel=0.05)  # DuckDB reports one decimal
    finally:
        engine.close()


def test_distinct_ids_are_estimated_from_a_stored_tables_statistics_or_one_scan(tmp_path):
    """k-core's parts come from an estimate of the ids: free from the statistics of a table in the
    scratch database, one HyperLogLog scan of anything else; both near enough the true count to
    size parts by."""
    import pyarrow as pa

    from rectrain.data.engine.backends import connect

    engine = connect(EngineConfig(memory_limit="256MB", threads=1), tmp_path)
    try:
        rng = np.random.default_rng(0)
        stored = engine.keep(engine.register(pa.table({"user": rng.integers(0, 5000, 50_000)})))
        true = len(np.unique(stored.execute()["user"]))
        from_statistics = engine.approx_distinct(stored, "user")
        assert 0.75 * true <= from_statistics <= 1.6 * true  # DuckDB's statistics err high (7399 for 5000)
        assert from_statistics != int(engine.scalar(stored.user.approx_nunique()))  # not the scan's figure
        half = stored.filter(stored.user < 2500)  # an expression: no statistics of its own
        assert engine.approx_distinct(half, "user") == pytest.approx(true / 2, rel=0.25)
    finally:
        engine.close()


def test_leave_one_out_labels_read_off_the_sorted_stream():
    from rectrain.data.engine.pipeline import leave_one_out_labels

    user = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 5])
    assert leave_one_out_labels(user).tolist() == [0, 1, 2, 0, 0, 0, 0, 1, 2, 0]  # < 3 events: all train
    assert leave_one_out_labels(np.zeros(0, dtype=np.int64)).shape == (0,)


def test_whole_users_recuts_batches_so_no_user_spans_two():
    from rectrain.data.engine.pipeline import whole_users

    rng = np.random.default_rng(1)
    user = np.sort(rng.integers(0, 30, size=500))
    user[100:300] = user[100]  # one user longer than several batches
    user = np.sort(user)
    value = np.arange(500)
    cuts = [0, 1, 7, 8, 120, 150, 151, 400, 499, 500]
    out = list(whole_users((user[lo:hi], value[lo:hi]) for lo, hi in zip(cuts, cuts[1:])))
    assert np.array_equal(np.concatenate([u for u, _ in out]), user)
    assert np.array_equal(np.concatenate([v for _, v in out]), value)
    firsts, lasts = [u[0] for u, _ in out], [u[-1] for u, _ in out]
    assert all(last < first for last, first in zip(lasts, firsts[1:]))  # a user's rows stay together
    for _ in range(200):  # any cut points, a batch starting on a new user or inside a held one
        cuts = [0, *np.sort(rng.choice(np.arange(1, 500), size=rng.integers(1, 40), replace=False)), 500]
        out = list(whole_users((user[lo:hi], value[lo:hi]) for lo, hi in zip(cuts, cuts[1:])))
        assert np.array_equal(np.concatenate([v for _, v in out]), value)
        assert all(u1[-1] < u2[0] for (u1, _), (u2, _) in zip(out, out[1:]))


def test_popularity_of_distinct_pairs_is_a_row_count():
    from rectrain.data.engine.sinks import DistinctUsersPerItem

    user, item = np.array([0, 0, 1, 1, 1, 3]), np.array([2, 0, 2, 1, 0, 2])
    fast, slow = DistinctUsersPerItem(4, pairs_distinct=True), DistinctUsersPerItem(4)
    fast.add(user, item), slow.add(user, item)
    assert fast.finish().tolist() == slow.finish().tolist() == [2, 1, 3, 0]


def test_popularity_counted_over_many_batches_matches_a_count_of_the_whole():
    """The counter holds batches until they outnumber the catalog (one bincount per n_items rows):
    counts taken at that threshold, past it and at the end add up to the count of everything."""
    from rectrain.data.engine.sinks import DistinctUsersPerItem

    rng = np.random.default_rng(7)
    n_items, n_users = 50, 400
    user = np.sort(rng.integers(0, n_users, 3000))
    item = rng.integers(0, n_items, 3000)  # repeats within a user: a pair counts once
    expected = np.zeros(n_items, dtype=np.int64)
    np.add.at(expected, np.unique(user * n_items + item) % n_items, 1)
    counter = DistinctUsersPerItem(n_items)
    bounds = np.flatnonzero(np.r_[True, user[1:] != user[:-1], True])  # batches of whole users
    cuts = bounds[::7]
    for lo, hi in zip(cuts, np.r_[cuts[1:], user.size]):
        counter.add(user[lo:hi], item[lo:hi])
    assert counter.finish().tolist() == expected.tolist()
    first = np.unique(user * n_items + item, return_index=True)[1]  # each pair's first row: distinct
    distinct = DistinctUsersPerItem(n_items, pairs_distinct=True)
    for chunk in np.array_split(np.sort(first), 13):
        distinct.add(user[chunk], item[chunk])
    assert distinct.finish().tolist() == expected.tolist()


def test_prefetched_batches_keep_order_raise_the_engines_error_and_stop_with_the_caller():
    import threading

    from rectrain.data.engine.backends import prefetched

    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("engine broke")

    with pytest.raises(ValueError, match="engine broke"):
        list(prefetched(failing()))
    stream = prefetched(iter(range(10**6)), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()  # the caller stops early: the thread must not linger, blocked on a full queue
    assert not any(t.name == "rectrain-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_an_array_opened_with_an_upper_bound_ends_at_the_rows_it_got(tmp_path, kind):
    """Training without its cold items is sized by an upper bound; the header then says the truth."""
    from rectrain.data.engine.sinks import MemorySink, NpyFileSink

    def sink(folder: Path):
        folder.mkdir()
        return NpyFileSink(folder) if kind == "file" else MemorySink()

    out = sink(tmp_path / "ok")
    out.open("bounded", np.float64, 1000, exact=False)
    out.open("exact", np.int64, 7)
    out.open("empty", np.int64, 10**12 if kind == "file" else 10, exact=False)  # 13 digits down to 1
    out.append("bounded", np.arange(737, dtype=np.float64) / 3)
    out.append("bounded", np.array([5.5]))
    out.append("exact", np.arange(7))
    arrays = out.finish()
    assert arrays["bounded"].dtype == np.float64 and np.array_equal(arrays["bounded"], np.r_[np.arange(737) / 3, 5.5])
    assert np.array_equal(arrays["exact"], np.arange(7)) and arrays["empty"].shape == (0,)
    if kind == "file":
        for name, rows in (("bounded", 738), ("empty", 0)):
            path = tmp_path / "ok" / f"{name}.npy"
            assert np.load(path).shape == (rows,) and path.read_bytes().index(b"\n") % 64 == 63  # aligned
    wrong = sink(tmp_path / "wrong")
    wrong.open("exact", np.int64, 3)
    wrong.open("bounded", np.int64, 2, exact=False)
    wrong.append("exact", np.arange(2))
    with pytest.raises(RuntimeError, match=r"'bounded' got more rows than counted: 3 > 2"):
        wrong.append("bounded", np.arange(3))
    with pytest.raises(RuntimeError, match=r"not filled to their counted length: \{'exact': \(2, 3\)\}"):
        wrong.finish()


def test_the_file_sinks_writer_thread_keeps_each_files_order_and_raises_its_errors(tmp_path, monkeypatch):
    """Appends are written by a thread, a bounded number behind the caller: interleaved appends to
    several files land in order, and a failed write is raised by the caller's next append."""
    import errno
    import threading
    import time

    from rectrain.data.engine import sinks

    monkeypatch.setattr(sinks, "WRITES_IN_FLIGHT", 3)
    real_write = sinks.NpyFileSink._write

    def slow(handle, hasher, data):  # the disk behind the caller: the queue fills and append waits
        time.sleep(0.002)
        real_write(handle, hasher, data)

    monkeypatch.setattr(sinks.NpyFileSink, "_write", staticmethod(slow))
    rng = np.random.default_rng(3)
    chunks = {"a": [rng.integers(0, 1000, rng.integers(0, 50)) for _ in range(60)],
              "b": [rng.random(rng.integers(1, 50)) for _ in range(60)]}
    sink = sinks.NpyFileSink(tmp_path)
    sink.open("a", np.int64, sum(c.size for c in chunks["a"]))
    sink.open("b", np.float64, sum(c.size for c in chunks["b"]))
    for a, b in zip(chunks["a"], chunks["b"]):
        sink.append("a", a)
        sink.append("b", b)
    arrays = sink.finish()
    assert np.array_equal(arrays["a"], np.concatenate(chunks["a"]))
    assert np.array_equal(arrays["b"], np.concatenate(chunks["b"]))
    sink.close()

    def full(handle, hasher, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sinks.NpyFileSink, "_write", staticmethod(full))
    (tmp_path / "full").mkdir()
    failing = sinks.NpyFileSink(tmp_path / "full")
    failing.open("a", np.int64, 10)
    failing.append("a", np.arange(5))  # queued: its error comes with the next call
    with pytest.raises(OSError, match="No space left"):
        for _ in range(sinks.WRITES_IN_FLIGHT + 1):
            time.sleep(0.01)
            failing.append("a", np.arange(1))
    failing.close()
    assert not any(t.name.startswith("rectrain-npy-writer") for t in threading.enumerate())


def test_user_blocks_of_int32_codes_do_not_overflow(tmp_path):
    """Codes narrowed to int32 for the sort: the block key (code x blocks) is computed in int64; up to
    SINGLE_SORT_EVENTS the events are sorted in one piece, beyond it in blocks of SORT_BLOCK_EVENTS."""
    import pyarrow as pa

    from rectrain.data.engine.backends import connect
    from rectrain.data.engine.pipeline import USER_CODE, _user_blocks

    engine = connect(EngineConfig(), tmp_path)
    try:
        codes = pa.array([0, 200_000_000, 350_000_000, 699_999_999], type=pa.int32())
        final = engine.register(pa.table({USER_CODE: codes}))
        with _user_blocks(engine, final, n_users=700_000_000, n_events=1_000_000_000) as parts:
            got = [sorted(part.execute()[USER_CODE].tolist()) for part in parts.tables if part is not None]
            blocks = len(parts.tables)
        with _user_blocks(engine, final, n_users=700_000_000, n_events=250_000_000) as parts:
            single = (len(parts.tables), parts.folder)
    finally:
        engine.close()
    assert blocks == 32  # 1B events in blocks of 32M
    assert single == (1, None)  # up to 250M events one sort: no parts written first
    assert got == [[0], [200_000_000], [350_000_000], [699_999_999]]  # each in its own block, in code order
