"""The preprocessing pipeline, written once in Ibis and run by DuckDB or Spark.

From canonical events (``user, item, timestamp`` [, ``rating``, ``session``] and ``_order``, the
event's position in the file) to split, indexed arrays, with the semantics rectrain has always had:

    implicit threshold -> dedup (first/last/none) -> iterative k-core -> split labels
    -> vocabularies by first appearance in the file -> drops the protocol needs -> arrays

Every tie is broken by file order (``_order``). Nothing here holds the log in Python memory: the
engine computes; the only things fetched are counts, the vocabularies (one row per user/item) and
the final arrays, streamed in Arrow batches straight into their (memory-mapped) destination.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from rectrain.data.engine.backends import Engine, Parts
from rectrain.data.engine.sinks import DistinctUsersPerItem
from rectrain.data.preprocess import PreprocessConfig
from rectrain.data.schema import ITEM, RATING, SESSION, TIMESTAMP, USER
from rectrain.data.splits import TEST, TRAIN, VALID
from rectrain.errors import ConfigError, DataError, RectrainError

log = logging.getLogger(__name__)

ORDER = "_order"
LABEL = "_label"
USER_CODE = "_user_code"
ITEM_CODE = "_item_code"
#: the destination of the output arrays (:mod:`rectrain.data.engine.sinks`)
Allocate = Any


@dataclass
class EngineOutput:
    """What the pipeline produced: split arrays (in their destination), vocabularies, stats."""

    arrays: dict[str, np.ndarray]
    user_vocab: np.ndarray
    item_vocab: np.ndarray
    cold_items: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)
    #: stage -> (n_items,) distinct users per item in the events a model conditions on (valid: train;
    #: test: train + valid), counted while the arrays were written
    item_popularity: dict[str, np.ndarray] = field(default_factory=dict)


class EngineFailure(RectrainError):
    """The engine failed (a full disk, memory it could not get, an engine bug): one line naming the stage."""


@contextlib.contextmanager
def stage(engine: Engine, name: str, source: str) -> Iterator[None]:
    """Turn an engine's or the file system's exception into one line that names the stage and the log;
    log the stage's seconds (where the time of a billion-event run goes)."""
    started = time.perf_counter()
    try:
        yield
        log.info("preprocessing stage '%s' on %s: %.1f s", name, engine.name, time.perf_counter() - started)
    except RectrainError:
        raise
    except Exception as exc:  # duckdb.Error, Py4JJavaError/AnalysisException, OSError (ENOSPC) ...
        text = str(exc).strip().splitlines()
        reason = text[0] if text else type(exc).__name__
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left" in str(exc):
            reason = f"the disk is full ({reason}); free space under the cache directory (data.cache_dir)"
        raise EngineFailure(f"preprocessing {source} failed at stage '{name}' on {engine.name}: "
                            f"{type(exc).__name__}: {reason[:400]}") from exc


def run(engine: Engine, events: Any, pre: PreprocessConfig, split: Any, source: str, allocate: Allocate,
        test_events: Any | None = None) -> EngineOutput:
    """Filter, label, index and write ``events`` (an Ibis table on ``engine``); see the module doc."""
    stats: dict[str, Any] = {}
    with stage(engine, "filter (threshold, dedup, k-core)", source):
        kept, per_id = filter_events(engine, events, pre, source, stats)
    positions = stats["rows_read"]  # every file position (_order) is below it
    with stage(engine, f"split ({split.kind})", source):
        if split.kind == "leave_one_out":
            labelled = kept  # labelled per block of users while the arrays are written: no extra copy
        else:
            if split.kind == "session":
                labelled = _label_sessions(engine, kept, pre, split, test_events, source)
            else:
                labelled = _label_time(engine, kept, split)
            labelled = engine.keep(labelled)
            engine.release(kept)
            if test_events is not None:  # the test log's positions follow the training log's
                positions = int(engine.scalar(labelled[ORDER].max())) + 1
    with stage(engine, "index and write arrays", source):
        if split.kind != "leave_one_out":  # k-core's counts describe the events before the protocol's drops
            _release_all(engine, per_id)
            per_id = {}
        return _index_and_write(engine, labelled, split, stats, source, allocate,
                                pairs_distinct=pre.dedup != "none" and split.kind != "session", per_id=per_id,
                                positions=positions)


# --- filtering --------------------------------------------------------------------------------
def filter_events(engine: Engine, events: Any, pre: PreprocessConfig, source: str, stats: dict[str, Any]
                  ) -> tuple[Any, dict[str, Any]]:
    """Threshold, dedup and iterative k-core; counts what each stage removed into ``stats``.

    Returns the kept events and, per id column k-core counted (``user``, ``item``), a table of
    (id, ``_n`` events, ``_first`` file position) over exactly those events: the vocabularies of a
    leave-one-out split are read off it instead of counting a billion events once more.
    """
    import ibis

    removed: dict[str, int] = {}
    rows_read = int(engine.scalar(events.count()))
    stats.update(rows_read=rows_read, removed=removed)
    table = events
    n = rows_read
    if pre.min_rating is not None:
        if RATING not in table.columns:
            raise ConfigError("data.preprocess.min_rating", f"{source} has no rating column to threshold")
        rating = table[RATING]
        table = table.filter(rating.notnull() & ~rating.isnan() & (rating >= float(pre.min_rating)))
    if pre.dedup not in ("first", "last", "none"):
        raise ConfigError("data.preprocess.dedup", f"must be first, last or none, got {pre.dedup!r}")
    if pre.dedup != "none":
        with stage(engine, "dedup", source), _user_parts(engine, table, rows_read) as parts:
            pieces = [_dedup(part, pre.dedup) for part in parts.tables if part is not None]  # a window per part
            table = engine.keep_in_parts(pieces or [_dedup(table, pre.dedup)])
    elif pre.min_rating is not None:
        table = engine.keep(table)
    if pre.min_rating is not None or pre.dedup != "none":
        after = int(engine.scalar(table.count()))
        if pre.min_rating is not None:
            thresholded = int(engine.scalar(events.filter(
                events[RATING].notnull() & ~events[RATING].isnan() & (events[RATING] >= float(pre.min_rating))
            ).count()))
            removed["below_min_rating"] = n - thresholded
            n = thresholded
        if pre.dedup != "none":
            removed["duplicates"] = n - after
        n = after
    with stage(engine, "k-core", source):
        table, per_id = _k_core(engine, table, pre.min_user_interactions, pre.min_item_interactions, n, removed)
    if int(engine.scalar(table.count())) == 0:
        raise DataError(f"no interactions left after filtering {rows_read} rows ({removed}); lower the thresholds",
                        path=source, key="data.preprocess")
    return table, per_id


def _dedup(table: Any, keep: str) -> Any:
    """One event per (user, item): the first (or last) by (time, file order)."""
    import ibis

    ordering = [table[TIMESTAMP], table[ORDER]]
    if keep == "last":
        ordering = [ibis.desc(table[TIMESTAMP]), ibis.desc(table[ORDER])]
    window = ibis.window(group_by=[table[USER], table[ITEM]], order_by=ordering)
    return table.mutate(_rank=ibis.row_number().over(window)).filter(ibis._._rank == 0).drop("_rank")


#: events per partition of dedup: DuckDB's window spills by itself, and one window is faster than
#: parts written first (300M events: 72-75 s against 99.5 s in three parts); parts only bound the
#: window's spill (~32 bytes an event) on logs beyond a billion events
EVENTS_PER_PART = 1_000_000_000


def _user_parts(engine: Engine, table: Any, n_events: int) -> Parts:
    """``table`` split by a hash of the user: whole users per part, so per-user windows stay exact."""
    parts = max(1, -(-n_events // EVENTS_PER_PART))
    return engine.partition(table, engine.hash_part(table[USER], parts), parts)


def _k_core(engine: Engine, table: Any, min_user: int, min_item: int, n: int, removed: dict[str, int]
            ) -> tuple[Any, dict[str, Any]]:
    """Drop users and items with too few events until both thresholds hold (the unique fixed point).

    Each step counts events per item (or user) over the events still alive and keeps the small set
    of survivors; the event table is read through semi-joins only once something was removed, and
    rewritten only at the end. A log that already holds (the usual case) costs one pass per side.
    The last round removed nothing, so its counts (with each id's first file position) describe
    the result exactly: they are returned per column.
    """
    import ibis

    if min_user <= 1 and min_item <= 1:
        return table, {}
    alive: dict[str, Any] = {}  # column -> surviving ids; absent: all of them
    counted: dict[str, Any] = {}  # column -> (id, _n, _first) of the latest count
    parts_of: dict[str, int] = {}
    changed_any = False
    while True:
        changed = False
        for column, minimum in ((ITEM, min_item), (USER, min_user)):
            if minimum <= 1:
                continue
            counts = _count_per_id(engine, _alive_events(table, alive), column, n, parts_of)
            if column in counted:
                engine.release(counted[column])
            counted[column] = counts
            good = counts.filter(counts._n >= int(minimum)).select(column)
            if int(engine.scalar(good.count())) < int(engine.scalar(counts.count())):
                previous, alive[column] = alive.get(column), engine.keep(good)
                if previous is not None:
                    engine.release(previous)
                changed = True
        if not changed:
            break
        changed_any = True
    if not changed_any:  # nothing removed: no second copy of a billion events on disk
        removed["k_core"] = 0
        return table, counted
    result = engine.keep(_alive_events(table, alive))
    removed["k_core"] = n - int(engine.scalar(result.count()))
    engine.release(table)
    return result, counted


#: engine memory per id a count per id (events, first file position) takes without spilling. A
#: hash aggregate over more ids than the cap holds moves its rows through the spill: at 1B events
#: and a 3GB cap, 20M users counted over a table of the log took 112.7 s in one count against 50.6 s
#: in 2 parts of the ids' hash, 40.5 s in 3, 49.9 s in 4 and 66.8 s in 8 (each part reads the
#: column again), 1M items 22.3 s in one count and 26.3 s in 4 (`bench/engine_steps.py --steps
#: count`). So ~10M ids per 3 GB: parts = estimated ids x this / cap, 3 for those users (their
#: estimate errs high: 24.5M)
BYTES_PER_COUNTED_ID = 300


def _count_per_id(engine: Engine, events: Any, column: str, n_events: int, parts_of: dict[str, int]) -> Any:
    """(id, ``_n`` events, ``_first`` file position) per id of ``column``, kept: in parts of the ids'
    hash when the ids outnumber what the engine's memory counts in one piece. ``parts_of``: column
    -> parts, decided on the first round (later rounds count fewer ids)."""
    import ibis

    def count(part: Any) -> Any:
        return part.group_by(column).agg(_n=ibis._.count(), _first=part[ORDER].min())

    if column not in parts_of:
        parts_of[column] = 1
        memory = engine.memory_bytes()  # None on Spark, which spreads a count by itself
        if memory is not None and n_events * BYTES_PER_COUNTED_ID > memory:  # fewer ids than events
            ids = engine.approx_distinct(events, column)
            parts_of[column] = max(1, -(-ids * BYTES_PER_COUNTED_ID // memory))
            log.info("k-core counts %s in %d part(s): ~%d ids, memory cap %d MB", column, parts_of[column], ids,
                     memory >> 20)
    parts = parts_of[column]
    if parts == 1:
        return engine.keep(count(events))
    key = engine.hash_part(events[column], parts)
    return engine.keep_in_parts([count(events.filter(key == p)) for p in range(parts)])


def _alive_events(table: Any, alive: dict[str, Any]) -> Any:
    """The events whose user and item both survive (semi-joins on the survivor sets)."""
    for column, ids in alive.items():
        table = table.filter(table[column].isin(ids[column]))
    return table


# --- split labels -----------------------------------------------------------------------------
def _label_time(engine: Engine, table: Any, split: Any) -> Any:
    """Global cut by event rank in (time, file order): exact fractions even with tied timestamps."""
    import ibis

    n = int(engine.scalar(table.count()))
    n_test, n_valid = int(round(n * split.test_fraction)), int(round(n * split.valid_fraction))
    rank = ibis.row_number().over(ibis.window(order_by=[table[TIMESTAMP], table[ORDER]]))
    label = ibis.cases((rank >= n - n_test, TEST), (rank >= n - n_test - n_valid, VALID), else_=TRAIN)
    return table.mutate(**{LABEL: label.cast("int8")})


def _label_sessions(engine: Engine, table: Any, pre: PreprocessConfig, split: Any, test_events: Any | None,
                    source: str) -> Any:
    """Session keys (cut at inactivity gaps for user logs) in USER, and whole-session split labels."""
    import ibis

    has_session = SESSION in table.columns
    table = table.mutate(_test=ibis.literal(False))
    if test_events is not None:
        test_kept, test_counts = filter_events(engine, test_events, _without_item_core(pre), source, {})
        _release_all(engine, test_counts)
        offset = int(engine.scalar(table[ORDER].max())) + 2
        table = table.mutate(**{ORDER: table[ORDER].cast("int64")})  # positions past both logs' ends
        test_kept = test_kept.mutate(**{ORDER: test_kept[ORDER].cast("int64") + offset}, _test=ibis.literal(True))
        table, test_kept = _same_types(table, test_kept.select(table.columns))
        table = engine.keep(table.union(test_kept))
    use_session = has_session and int(engine.scalar(table[SESSION].isnull().sum())) == 0
    key = table[SESSION] if use_session else table[USER]
    table = table.mutate(_key=key.cast("string") + ibis.ifelse(table._test, "#test", ""))
    keys = engine.keep(table.group_by("_key").agg(_first=table[ORDER].min())
                       .mutate(_code=ibis.row_number().over(ibis.window(order_by="_first"))).select("_key", "_code"))
    table = table.join(keys, "_key")
    if not use_session and not has_session:  # a user log: a new session after `session_gap` of silence
        window = ibis.window(order_by=[table._code, table[TIMESTAMP], table[ORDER]])
        prev_code, prev_time = table._code.lag().over(window), table[TIMESTAMP].lag().over(window)
        new = prev_code.isnull() | (prev_code != table._code) | (table[TIMESTAMP] - prev_time > float(split.session_gap))
        table = table.mutate(_new=new.cast("int64"))
        table = table.mutate(_code=table._new.sum().over(ibis.window(order_by=[table._code, table[TIMESTAMP],
                                                                                 table[ORDER]],
                                                                       preceding=None, following=0)) - 1)
    table = engine.keep(table.mutate(**{USER: table._code.cast("string")}))
    train_part = table.filter(~table._test) if test_events is not None else table
    sessions = train_part.group_by("_code").agg(_end=train_part[TIMESTAMP].max())
    n_sessions = int(engine.scalar(sessions.count()))
    test_fraction = 0.0 if test_events is not None else split.test_fraction
    n_test, n_valid = int(round(n_sessions * test_fraction)), int(round(n_sessions * split.valid_fraction))
    rank = ibis.row_number().over(ibis.window(order_by=[sessions._end, sessions._code]))
    sessions = sessions.mutate(_session_label=ibis.cases(
        (rank >= n_sessions - n_test, TEST), (rank >= n_sessions - n_test - n_valid, VALID), else_=TRAIN))
    labelled = table.left_join(sessions.select("_code", "_session_label"), "_code")
    label = ibis.ifelse(labelled._test, TEST, labelled._session_label)
    return labelled.mutate(**{LABEL: label.cast("int8")}).select(*[c for c in table.columns if c not in (
        "_key", "_code", "_new", "_test")], LABEL)


def _same_types(a: Any, b: Any) -> tuple[Any, Any]:
    """Two logs with their columns of one type (each log is scanned as narrow as its values fit):
    integer ids of two widths become int64, timestamps float64; an id column that is integer in one
    and text in the other (a streamed CSV's ids become integers only when all of them are canonical)
    becomes text in both, the same text the integers were read from."""
    differ = [c for c in (USER, ITEM, SESSION, TIMESTAMP) if c in a.columns and a[c].type() != b[c].type()]
    common = {c: "float64" if c == TIMESTAMP else "int64" if a[c].type().is_integer() and b[c].type().is_integer()
              else "string" for c in differ}
    return (a.mutate(**{c: a[c].cast(t) for c, t in common.items()}) if differ else a,
            b.mutate(**{c: b[c].cast(t) for c, t in common.items()}) if differ else b)


def _release_all(engine: Engine, tables: dict[str, Any]) -> None:
    for table in tables.values():
        engine.release(table)


def _without_item_core(pre: PreprocessConfig) -> PreprocessConfig:
    import dataclasses

    return dataclasses.replace(pre, min_item_interactions=1)


# --- vocabularies, drops, arrays --------------------------------------------------------------
def _first_appearance(engine: Engine, table: Any, column: str, code: str, count: bool = False,
                      counted: Any | None = None) -> Any:
    """Vocabulary of ``column`` by first appearance in the file: (raw id, contiguous code[, ``_n``
    events per id, counted in the same pass when ``count``]). ``counted``: k-core's (id, ``_n``,
    ``_first``) of exactly these events, which spares the pass over them."""
    import ibis

    firsts = counted if counted is not None else table.group_by(column).agg(
        _first=table[ORDER].min(), **({"_n": ibis._.count()} if count else {}))
    return engine.keep(firsts.mutate(**{code: ibis.row_number().over(ibis.window(order_by="_first"))})
                       .select(column, code, *(["_n"] if count else [])))


def _fetch_vocab(engine: Engine, vocab: Any, column: str, code: str) -> np.ndarray:
    """The raw ids as ``str`` in code order (one row per user/item, fetched in batches)."""
    ordered = vocab.select(vocab[column].cast("string").name(column), vocab[code]).order_by(code)
    parts = [batch.column(0).to_numpy(zero_copy_only=False) for batch in engine.batches(ordered)]
    values = np.concatenate(parts) if parts else np.zeros(0, dtype=object)
    return values.astype(str) if values.size else np.zeros(0, dtype="<U1")


def _index_and_write(engine: Engine, table: Any, split: Any, stats: dict[str, Any], source: str,
                     allocate: Allocate, pairs_distinct: bool = False, per_id: dict[str, Any] | None = None,
                     positions: int = 2**63 - 1) -> EngineOutput:
    """Vocabularies, the drops each protocol needs, then the arrays sorted by (user, time, file order).

    ``pairs_distinct``: no (user, item) pair occurs twice (deduplicated, users not re-keyed), so
    distinct users per item is a plain count of the rows. ``per_id``: k-core's counts per user and
    item of exactly ``table``'s events (leave-one-out keeps every event), read instead of recounting.
    ``positions``: every file position is below it (int32 positions in the final sort while it fits).
    """
    import ibis

    per_id = per_id or {}
    loo = split.kind == "leave_one_out"
    items = _first_appearance(engine, table if loo else table.filter(table[LABEL] == TRAIN), ITEM, ITEM_CODE,
                              counted=per_id.get(ITEM))
    if split.kind != "leave_one_out":
        before = int(engine.scalar(table.count()))
        labelled, table = table, engine.keep(table.join(items, ITEM))
        engine.release(labelled)
        stats["eval_events_unseen_item_dropped"] = before - int(engine.scalar(table.count()))
    # leave-one-out keeps every event (every item is in the vocabulary): the users are counted off the
    # events as they are, without the join that brings the item codes
    users = _first_appearance(engine, table, USER, USER_CODE, count=loo, counted=per_id.get(USER))
    _release_all(engine, per_id)  # the vocabularies are kept tables of their own
    if loo:
        table = table.join(items, ITEM)
    if split.kind == "session":
        # the window as a column first: Ibis' Spark compiler mis-aliases a window inside a filter
        counted = table.mutate(_length=table[ORDER].count().over(ibis.window(group_by=table[USER])))
        keep = (counted._length >= int(split.min_session_length)) | (counted[LABEL] == TRAIN)
        before = int(engine.scalar(table.count()))
        table = engine.keep(counted.filter(keep).drop("_length"))
        stats["short_session_events_dropped"] = before - int(engine.scalar(table.count()))
    elif split.kind == "time":
        trained = table.filter(table[LABEL] == TRAIN).select(USER).distinct()
        before = int(engine.scalar(table.count()))
        table = engine.keep(table.filter((table[LABEL] == TRAIN) | table[USER].isin(trained[USER])))
        stats["eval_events_cold_user_dropped"] = before - int(engine.scalar(table.count()))
    with stage(engine, "vocabularies", source):
        user_vocab = _fetch_vocab(engine, users, USER, USER_CODE)
        item_vocab = _fetch_vocab(engine, items, ITEM, ITEM_CODE)

    cold_items = np.zeros(0, dtype=np.int64)
    if split.cold_item_fraction > 0:
        n_items = item_vocab.shape[0]
        rng = np.random.default_rng(split.cold_item_seed)
        cold_items = np.sort(rng.choice(n_items, size=int(round(n_items * split.cold_item_fraction)),
                                        replace=False)).astype(np.int64)
    widest = max(len(user_vocab), len(item_vocab))
    carried = (TIMESTAMP, ORDER) if loo else (TIMESTAMP, LABEL, ORDER)
    final = _narrow_codes(table.join(users, USER), *carried, n=widest, rows=positions)
    # the same rows with each user's id where the code goes: the blocks may look codes up in numpy
    with_ids = _narrow_codes(table.mutate(**{USER_CODE: table[USER]}), *carried, n=widest, rows=positions)
    counts = _leave_one_out_counts(engine, users) if loo else _label_counts(engine, final)
    popularity = {stage_name: DistinctUsersPerItem(item_vocab.shape[0], pairs_distinct=pairs_distinct)
                  for stage_name in ("valid", "test")}
    with stage(engine, "sort and write arrays", source):
        with stage(engine, "write user blocks", source):  # one block (no pass) up to SINGLE_SORT_EVENTS
            blocks = _user_blocks(engine, final, user_vocab.shape[0], sum(counts.values()), by_id=(with_ids, users))
        with blocks:
            arrays, stats_cold = _write_arrays(engine, blocks, counts, cold_items, allocate, loo, popularity)
    if split.cold_item_fraction > 0:
        stats["cold_item_train_events_dropped"] = stats_cold
    for name, label in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        stats[f"n_{name}"] = int(arrays[f"{name}_user"].shape[0])
    if stats["n_train"] == 0:
        raise DataError("the training split is empty after filtering and splitting", path=source, key="data.split")
    stats.update(n_users=int(user_vocab.shape[0]), n_items=int(item_vocab.shape[0]))
    return EngineOutput(arrays, user_vocab, item_vocab, cold_items, stats,
                        {stage: counter.finish() for stage, counter in popularity.items()})


def _narrow_codes(table: Any, *columns: str, n: int, rows: int) -> Any:
    """User and item codes as int32 while they fit (``n``: the larger vocabulary), then ``columns``,
    the file position too while it fits (``rows``: every position is below it): the final sort's
    rows (and its spill and blocks) narrower (100M events: int32 codes took sort and write 16.3 ->
    14-15 s)."""
    code = "int32" if n < 2**31 else "int64"
    position = "int32" if rows < 2**31 else "int64"
    return table.select(table[USER_CODE].cast(code).name(USER_CODE), table[ITEM_CODE].cast(code).name(ITEM_CODE),
                        *[table[c].cast(position).name(c) if c == ORDER else table[c] for c in columns])


def _leave_one_out_counts(engine: Engine, users: Any) -> dict[int, int]:
    """Events per label without labelling, from the events per user (``_n``) of the user vocabulary:
    a user with >= 3 events gives one test and one valid event."""
    summary = users.aggregate(_events=users._n.sum(), _users=(users._n >= 3).sum())
    (batch,) = [b for b in engine.batches(summary) if b.num_rows]
    events, eligible = int(batch.column(0)[0].as_py() or 0), int(batch.column(1)[0].as_py() or 0)
    return {TRAIN: events - 2 * eligible, VALID: eligible, TEST: eligible}


def _label_counts(engine: Engine, final: Any) -> dict[int, int]:
    import ibis

    counts: dict[int, int] = {}
    for batch in engine.batches(final.group_by(LABEL).agg(_n=ibis._.count())):
        for label, n in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            counts[int(label)] = int(n)
    return counts


#: the most events the final sort takes in one piece: beyond it the events are first written as
#: blocks, a pass of its own (168.9 s at 1B events in `bench/scale.py`'s "write user blocks"), which
#: a log this size does not need
SINGLE_SORT_EVENTS = 250_000_000

#: events per sorted block of users beyond SINGLE_SORT_EVENTS: a block small enough to sort in
#: memory (~24 bytes an event, well inside a 3 GB cap) is cheaper per event than one that spills
#: (250M events of the 1B log, alternating: one sort 51.9 / 51.7 s, 8 blocks 37.0 / 32.8 s;
#: `bench/engine_steps.py --steps sort`), and each block bounds the sort's spill, so the disk stays
#: near the scratch table plus the arrays
SORT_BLOCK_EVENTS = 32_000_000


#: rows per batch of the sorted stream: the batches in flight (prefetched, and this one's labels,
#: masks and copies) are the write loop's memory, ~100 MB at 2^20 rows, a quarter of it at 2^18
WRITE_BATCH_ROWS = 1 << 18


def _user_blocks(engine: Engine, final: Any, n_users: int, n_events: int, by_id: tuple[Any, Any] | None = None
                 ) -> Parts:
    """``final`` split into blocks of consecutive user codes (whole users per block, blocks in code
    order): one block up to SINGLE_SORT_EVENTS events, else blocks of about SORT_BLOCK_EVENTS.

    ``by_id``: (``final``'s columns with the user id in place of its code, the user vocabulary). Integer user
    ids in a dense range are given their codes in numpy as the events stream out (one gather from
    a table indexed by id) instead of DuckDB's join with the vocabulary, a hash table of every user.
    """
    blocks = 1 if n_events <= SINGLE_SORT_EVENTS else -(-n_events // SORT_BLOCK_EVENTS)
    blocks = min(blocks, max(n_users, 1))
    lookup = _user_code_lookup(engine, by_id[1], final) if by_id is not None and blocks > 1 else None
    if lookup is None:
        key = final[USER_CODE].cast("int64") * blocks // max(n_users, 1)  # int32 codes would overflow here
        return engine.partition(final, key, blocks, dense=True)  # codes, times, labels, positions: never null
    low, codes_by_id = lookup
    columns = list(final.columns)

    def split(batch: Any) -> tuple[dict[str, Any], np.ndarray]:
        offset = batch.column(0).to_numpy().astype(np.int64) - low
        codes = codes_by_id[offset] if not offset.size or offset.min() >= 0 else np.full(1, -1)
        if codes.size and codes.min() < 0:  # not one of the vocabulary's ids: cannot happen, never silent
            raise RuntimeError("an event's user has no code in the user vocabulary")
        stored = {USER_CODE: codes, **{c: batch.column(i) for i, c in enumerate(columns) if i}}
        return stored, (codes.astype(np.int64) * blocks // max(n_users, 1)).astype(np.int32)

    return engine.partition_batches(by_id[0], split, blocks)


#: a table from user id to code serves the blocks when the ids span at most this many times their
#: number (plus 2^20): at most a few hundred MB for the 20M users of a billion events
LOOKUP_SPAN_PER_ID = 2


def _user_code_lookup(engine: Engine, users: Any, final: Any) -> tuple[int, np.ndarray] | None:
    """(lowest id, code per id - lowest; -1 for no user) for int32 user ids in a dense range on
    DuckDB; None otherwise (text ids, sparse ids, Spark: the join it is)."""
    if engine.name != "duckdb" or not users[USER].type().is_int32():  # ids scanned as int32: they fit
        return None
    pairs = [(batch.column(0).to_numpy(), batch.column(1).to_numpy())
             for batch in engine.batches(users.select(USER, USER_CODE))]
    if not pairs:
        return None
    ids, codes = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    low, high = int(ids.min()), int(ids.max())
    if high - low + 1 > LOOKUP_SPAN_PER_ID * ids.size + 2**20:
        return None
    table = np.full(high - low + 1, -1, dtype=final.schema()[USER_CODE].to_numpy())
    table[ids.astype(np.int64) - low] = codes
    return low, table


def _write_arrays(engine: Engine, parts: Parts, counts: dict[int, int], cold_items: np.ndarray,
                  allocate: Allocate, loo: bool = False, popularity: dict[str, DistinctUsersPerItem] | None = None
                  ) -> tuple[dict[str, np.ndarray], int]:
    """Stream the events of the user blocks ``parts``, ordered by (user code, time, file order) block
    by block, into one array per (split, column); cold items leave training. ``popularity``
    counters (stage -> counter) see the rows each stage conditions on (valid: train; test: train +
    valid) as they go by.

    Leave-one-out labels are read off the sorted stream (a user's last event is test, the one before
    valid), so each block is sorted once; a window would sort it a second time.
    """
    blocks = [(index, block) for index, block in enumerate(parts.tables) if block is not None]
    sizes = {"train": counts.get(TRAIN, 0), "valid": counts.get(VALID, 0), "test": counts.get(TEST, 0)}
    cold_dropped = 0
    dtypes = {"user": np.int64, "item": np.int64, "timestamp": np.float64}
    for part in sizes:
        for col, dtype in dtypes.items():  # cold items leave training as the stream goes by
            allocate.open(f"{part}_{col}", dtype, sizes[part], exact=part != "train" or not cold_items.size)
    labels_of = {"train": TRAIN, "valid": VALID, "test": TEST}
    columns = [USER_CODE, ITEM_CODE, TIMESTAMP] + ([] if loo else [LABEL])
    for index, block in blocks:
        ordered = block.select(*columns, ORDER).order_by([USER_CODE, TIMESTAMP, ORDER]).select(*columns)
        stream = (_as_arrays(batch) for batch in engine.batches(ordered, WRITE_BATCH_ROWS))
        for user, item, timestamp, *label in whole_users(stream):
            label = leave_one_out_labels(user) if loo else label[0]
            if cold_items.size:
                cold = (label == TRAIN) & np.isin(item, cold_items)
                cold_dropped += int(cold.sum())
                label = np.where(cold, -1, label)
            if popularity:
                train = label == TRAIN
                popularity["valid"].add(user[train], item[train])
                seen = train | (label == VALID)
                popularity["test"].add(user[seen], item[seen])
            for part, code in labels_of.items():
                rows = label == code
                if rows.any():
                    allocate.append(f"{part}_user", user[rows])
                    allocate.append(f"{part}_item", item[rows])
                    allocate.append(f"{part}_timestamp", timestamp[rows])
        parts.drop(index)  # its events are in the arrays now: give the disk back as they grow
    arrays = allocate.finish()  # raises if the stream and the counts disagree
    if arrays["train_user"].shape[0] != sizes["train"] - cold_dropped:  # training was sized by a bound
        raise RuntimeError(f"training holds {arrays['train_user'].shape[0]} events, counted "
                           f"{sizes['train']} less {cold_dropped} of cold items")
    return arrays, cold_dropped


def _as_arrays(batch: Any) -> tuple[np.ndarray, ...]:
    """(user, item, timestamp[, label]) of an Arrow batch as numpy arrays of the cache's dtypes."""
    dtypes = (np.int64, np.int64, np.float64, np.int8)
    return tuple(batch.column(i).to_numpy().astype(dtypes[i], copy=False) for i in range(batch.num_columns))


def whole_users(batches: Iterator[tuple[np.ndarray, ...]]) -> Iterator[tuple[np.ndarray, ...]]:
    """Re-cut column batches sorted by their first column (the user) so that no user spans two
    batches: the rows of a batch's last user wait for the next batch."""
    carry: tuple[np.ndarray, ...] | None = None
    for columns in batches:
        user = columns[0]
        if not user.size:
            continue
        if carry is not None:  # the held user's rows, with their continuation at the head of this batch
            head = int(np.searchsorted(user, carry[0][0], side="right"))
            joined = tuple(np.concatenate([held, new[:head]]) for held, new in zip(carry, columns))
            if head == user.size:  # the held user goes on past this batch too
                carry = joined
                continue
            yield joined
            columns, user = tuple(column[head:] for column in columns), user[head:]
        cut = int(np.searchsorted(user, user[-1]))  # where the last user's rows begin
        if cut:
            yield tuple(column[:cut] for column in columns)  # views: the batch itself is not copied
        carry = tuple(column[cut:] for column in columns)
    if carry is not None and carry[0].size:
        yield carry


def leave_one_out_labels(user: np.ndarray) -> np.ndarray:
    """Split labels of rows sorted by (user, time, file order), whole users only: per user with at
    least 3 events the last is test and the one before it valid; the rest is train."""
    n = user.shape[0]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])  # no rows: one empty run, no labels
    lengths = np.diff(np.r_[starts, n])
    from_end = np.repeat(starts + lengths - 1, lengths) - np.arange(n)
    eligible = np.repeat(lengths >= 3, lengths)
    label = np.full(n, TRAIN, dtype=np.int8)
    label[eligible & (from_end == 1)] = VALID
    label[eligible & (from_end == 0)] = TEST
    return label
