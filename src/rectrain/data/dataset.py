"""The prepared dataset every model trains on, and its on-disk cache.

:func:`prepare` turns a :class:`RawLog` into a :class:`PreparedData`: indexed events split into
train/valid/test, id vocabularies, item side features. :func:`load_or_prepare` caches the result
under a hash of everything that determines it (source fingerprint, preprocessing, split, format
version), so a sweep of 50 runs preprocesses once. The cache is written to a temporary directory
and renamed: an interrupted run never leaves a half-written cache that a later run would trust.
Every cache carries a manifest and is checked on load (:mod:`rectrain.data.cache`); a damaged one
is discarded and rebuilt with one warning.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from rectrain.data import cache
from rectrain.data.batching import user_shards
from rectrain.data.engine import EngineConfig, run_prepare
from rectrain.data.engine.sinks import DistinctUsersPerItem, MemorySink, NpyFileSink
from rectrain.data.preprocess import PreprocessConfig
from rectrain.data.schema import ITEM, SESSION, TIMESTAMP, USER, RawLog
from rectrain.errors import ConfigError, DataError
from rectrain.data.queries import LazyQueries, RankingQueries, concat_ranges
from rectrain.utils.io import atomic_dir, remove_stale_temporaries, stable_hash

log = logging.getLogger(__name__)

#: bump when the cached arrays change meaning, so old caches are not reused
CACHE_FORMAT_VERSION = 5  # 5: manifest.json (sizes, shapes, dtypes, sha256) in every cache
SPLIT_KINDS = ("leave_one_out", "time", "session")


@dataclass
class SplitConfig:
    """How events are split.

    Attributes:
        kind: ``leave_one_out`` (per user by time; valid = second to last), ``time`` (global cut)
            or ``session`` (whole sessions by end time; sessions cut by ``session_gap`` when the
            log has no session column).
        valid_fraction, test_fraction: for ``time`` and ``session``.
        session_gap: seconds of inactivity that end a session (``session`` on user logs).
        mask_seen: exclude already-consumed items when ranking. None means the protocol's
            convention: True for user histories, False for sessions (repeats are real next clicks).
        min_session_length: sessions shorter than this after filtering are dropped (need a prefix
            and a target).
        cold_item_fraction: hold this fraction of items (chosen with ``cold_item_seed``) out of
            training entirely: their events stay in validation/test targets and histories but never
            in training, to measure how a model ranks items it never saw (cold start).
    """

    kind: str = "leave_one_out"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    session_gap: float = 1800.0
    mask_seen: bool | None = None
    min_session_length: int = 2
    cold_item_fraction: float = 0.0
    cold_item_seed: int = 0


@dataclass
class Interactions:
    """Indexed events of one split, sorted by (user, timestamp, file order)."""

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray

    def __len__(self) -> int:
        return int(self.user.shape[0])

    @staticmethod
    def concat(a: "Interactions", b: "Interactions") -> "Interactions":
        """Merge two splits keeping (user, time) order; ``a`` precedes ``b`` on ties (it is earlier)."""
        user = np.concatenate([a.user, b.user])
        timestamp = np.concatenate([a.timestamp, b.timestamp])
        source = np.r_[np.zeros(len(a), np.int8), np.ones(len(b), np.int8)]
        perm = np.lexsort((np.arange(user.shape[0]), source, timestamp, user))
        item = np.concatenate([a.item, b.item])
        return Interactions(user[perm], item[perm], timestamp[perm])


@dataclass
class PreparedData:
    """Indexed, split interactions plus vocabularies and item side features.

    ``user`` means "whose history": a user for user logs, a session for session logs.
    Vocabularies map index -> raw id (str); they travel with every checkpoint.
    """

    train: Interactions
    valid: Interactions
    test: Interactions
    user_vocab: np.ndarray
    item_vocab: np.ndarray
    split: str
    mask_seen: bool
    item_titles: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
    category_vocab: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
    item_category_indptr: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    item_category_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    stats: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    cold_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: raw user attributes (e.g. age, gender, occupation) aligned with ``user_vocab``: numbers as
    #: float64 (NaN missing), text as str ("" missing); empty for logs without a user table
    user_attributes: dict[str, np.ndarray] = field(default_factory=dict)
    #: stage -> (n_items,) item popularity counted by the pipeline as it wrote the splits (see
    #: :meth:`item_popularity`); empty for a cache written before it was kept
    popularity: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return int(self.user_vocab.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_vocab.shape[0])

    @property
    def n_categories(self) -> int:
        return int(self.category_vocab.shape[0])

    def item_category_matrix(self) -> np.ndarray:
        """(n_items, n_categories) float32 multi-hot matrix of item categories/genres."""
        if self.n_categories == 0:  # a log without item features (e.g. session clicks): (n_items, 0)
            return np.zeros((self.n_items, 0), dtype=np.float32)
        mat = np.zeros((self.n_items, max(self.n_categories, 1)), dtype=np.float32)
        rows = np.repeat(np.arange(self.n_items), np.diff(self.item_category_indptr))
        mat[rows, self.item_category_index] = 1.0
        return mat[:, : self.n_categories]

    def history(self, stage: str) -> Interactions:
        """Events a model may condition on when predicting ``stage`` (valid: train; test: train+valid)."""
        if stage == "valid":
            return self.train
        if stage == "test":
            return Interactions.concat(self.train, self.valid)
        raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")

    def item_popularity(self, stage: str = "valid") -> np.ndarray:
        """(n_items,) number of distinct users whose history (for ``stage``) holds each item.

        Counted by the pipeline while it wrote the splits and kept in the cache; a cache from before
        that is counted here once (then kept in ``popularity``), over blocks of whole users (the
        splits are sorted by user), so the memory is that of a block, not of the log.
        """
        parts = self._history_parts(stage)
        if stage in self.popularity:
            return np.asarray(self.popularity[stage], dtype=np.int64)
        counter = DistinctUsersPerItem(self.n_items)  # the pipeline's own counter, fed a block of users at a time
        for lo, hi in _user_blocks(parts[0].user, self.n_users):
            bounds = [np.searchsorted(part.user, [lo, hi]) for part in parts]
            counter.add(np.concatenate([part.user[a:b] for part, (a, b) in zip(parts, bounds)]),
                        np.concatenate([part.item[a:b] for part, (a, b) in zip(parts, bounds)]))
        counts = counter.finish()
        self.popularity = {**self.popularity, stage: counts}  # a new dict: copies made by replace() keep theirs
        return counts

    def ranking_queries(self, stage: str) -> RankingQueries:
        """The full-catalog ranking task for ``stage`` under this dataset's protocol, built at once
        (a large log: :meth:`lazy_queries`)."""
        queries = self.lazy_queries(stage)
        return queries.subset(np.arange(len(queries)))

    def lazy_queries(self, stage: str) -> LazyQueries:
        """The ranking task for ``stage``, built a chunk of users at a time (one row per user with a
        target; sessions: one per next click). Memory follows the rows asked for, not the log."""
        events = self._eval_events(stage)
        if self.split == "session":
            full = _session_queries(events, self.n_items, self.mask_seen)
            return LazyQueries(full.users, full.subset, self.n_items, full.protocol)
        for name in ("train", "valid", "test"):
            self._check_user_sorted(name)
        user = np.asarray(events.user)
        users = user[np.flatnonzero(np.r_[True, user[1:] != user[:-1]])] if user.size else user.astype(np.int64)
        return LazyQueries(users.astype(np.int64), lambda rows: self._user_queries(stage, users[rows]),
                           self.n_items, self.protocol_label())

    def _eval_events(self, stage: str) -> Interactions:
        if stage not in ("valid", "test"):
            raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")
        return self.valid if stage == "valid" else self.test

    def _history_parts(self, stage: str) -> list[Interactions]:
        """The splits a model conditions on for ``stage``, earliest first (see :meth:`history`)."""
        self._eval_events(stage)
        return [self.train] if stage == "valid" else [self.train, self.valid]

    def _check_user_sorted(self, name: str) -> None:
        """Binary search by user needs each split sorted by user (the engine writes them so); checked
        once per split, in slices, so a large memory-mapped split is not copied."""
        checked = self.__dict__.setdefault("_user_sorted", set())
        if name in checked:
            return
        user = getattr(self, name).user
        step = 1 << 24
        for start in range(0, max(user.shape[0] - 1, 0), step):
            window = np.asarray(user[start:start + step + 1])
            if np.any(window[1:] < window[:-1]):
                raise ValueError(f"the {name} split is not sorted by user; PreparedData needs (user, time) order")
        checked.add(name)

    def _user_queries(self, stage: str, users: np.ndarray) -> RankingQueries:
        """Queries of ``users`` (sorted, each with a target): their rows found by binary search; the
        history of each ordered by (time, split, position), as :meth:`Interactions.concat` orders it."""
        events = self._eval_events(stage)
        t_indptr, t_rows = concat_ranges(np.searchsorted(events.user, users, "left"),
                                         np.searchsorted(events.user, users, "right"))
        rows, times, sources, positions, items = [], [], [], [], []
        for source, part in enumerate(self._history_parts(stage)):
            indptr, found = concat_ranges(np.searchsorted(part.user, users, "left"),
                                          np.searchsorted(part.user, users, "right"))
            rows.append(np.repeat(np.arange(users.size, dtype=np.int64), np.diff(indptr)))
            times.append(np.asarray(part.timestamp[found]))
            sources.append(np.full(found.size, source, dtype=np.int8))
            positions.append(found)
            items.append(np.asarray(part.item[found], dtype=np.int64))
        row = np.concatenate(rows)
        order = np.lexsort((np.concatenate(positions), np.concatenate(sources), np.concatenate(times), row))
        h_items = np.concatenate(items)[order]
        h_indptr = np.zeros(users.size + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=users.size), out=h_indptr[1:])
        no_exclusions = np.zeros(users.size + 1, dtype=np.int64)
        return RankingQueries(
            users=users.astype(np.int64),
            target_indptr=t_indptr,
            target_items=np.asarray(events.item[t_rows], dtype=np.int64),
            exclude_indptr=h_indptr if self.mask_seen else no_exclusions,
            exclude_items=h_items if self.mask_seen else np.zeros(0, np.int64),
            history_indptr=h_indptr,
            history_items=h_items,
            n_items=self.n_items,
            protocol=self.protocol_label(),
        )

    def protocol_label(self) -> str:
        masking = "seen items masked" if self.mask_seen else "no masking (repeats allowed)"
        names = {"leave_one_out": "leave-one-out", "time": "global time split", "session": "session next-item"}
        return f"full ranking, {names[self.split]}, {masking}"

    # --- persistence --------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write one ``.npy`` per array (no pickle) and metadata (json) into ``directory``.

        Separate ``.npy`` files, unlike one ``.npz``, can be memory-mapped on load: a dataset larger
        than memory is paged in as the batch builders touch it.
        """
        arrays = {
            f"{name}_{col}": getattr(getattr(self, name), col)
            for name in ("train", "valid", "test")
            for col in ("user", "item", "timestamp")
        }
        for name in ("user_vocab", "item_vocab", "item_titles", "category_vocab",
                     "item_category_indptr", "item_category_index", "cold_items"):
            arrays[name] = getattr(self, name)
        for stage, counts in self.popularity.items():
            arrays[f"popularity_{stage}"] = counts
        attribute_names = list(self.user_attributes)
        for i, name in enumerate(attribute_names):  # files by position: attribute names may be any text
            arrays[f"user_attribute_{i}"] = self.user_attributes[name]
        for name, value in arrays.items():
            target = directory / f"{name}.npy"
            if isinstance(value, np.memmap) and value.filename and Path(value.filename) == target.resolve():
                value.flush()  # written in place by the engine (prepare(directory=...)): no second copy
                continue
            np.save(target, np.asarray(value), allow_pickle=False)
        meta = {"split": self.split, "mask_seen": self.mask_seen, "stats": self.stats,
                "fingerprint": self.fingerprint, "format": CACHE_FORMAT_VERSION, "arrays": sorted(arrays),
                "user_attributes": attribute_names}
        (directory / "meta.json").write_text(json.dumps(meta, indent=2, default=_to_builtin))
        # the manifest last: sizes and checksums of everything above, checked by every load
        cache.write_manifest(directory, CACHE_FORMAT_VERSION)

    @classmethod
    def load(cls, directory: Path, verify: bool = False) -> "PreparedData":
        """Load a cached dataset; arrays are memory-mapped copy-on-write (``mmap_mode="c"``).

        The directory is checked against its manifest first (sizes and array headers always;
        checksums on the first load of a build and with ``verify``): damage raises
        :class:`rectrain.data.cache.CacheDamaged` instead of a numpy error.
        """
        checked = cache.verify(directory, CACHE_FORMAT_VERSION, full=verify)
        try:
            return cls._load_checked(directory, checked)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # changed under us after the checks
            raise cache.CacheDamaged(f"load failed ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _load_checked(cls, directory: Path, checked: set[str]) -> "PreparedData":
        """Memory-map the arrays of a directory that passed :func:`rectrain.data.cache.verify`."""
        meta = json.loads((directory / "meta.json").read_text())
        unchecked = sorted(f"{name}.npy" for name in meta["arrays"] if f"{name}.npy" not in checked)
        if unchecked:
            raise cache.CacheDamaged(f"{unchecked[0]}: not in {cache.MANIFEST_NAME}")
        arr = {name: np.load(directory / f"{name}.npy", mmap_mode="c", allow_pickle=False) for name in meta["arrays"]}
        parts = {
            name: Interactions(arr[f"{name}_user"], arr[f"{name}_item"], arr[f"{name}_timestamp"])
            for name in ("train", "valid", "test")
        }
        return cls(
            **parts,
            user_vocab=arr["user_vocab"], item_vocab=arr["item_vocab"], item_titles=arr["item_titles"],
            category_vocab=arr["category_vocab"], item_category_indptr=arr["item_category_indptr"],
            item_category_index=arr["item_category_index"], cold_items=arr["cold_items"], split=meta["split"],
            mask_seen=meta["mask_seen"], stats=meta["stats"], fingerprint=meta["fingerprint"],
            user_attributes={name: arr[f"user_attribute_{i}"] for i, name in enumerate(meta.get("user_attributes", []))},
            popularity={stage: arr[f"popularity_{stage}"] for stage in ("valid", "test") if f"popularity_{stage}" in arr},
        )


def _to_builtin(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


#: events per block when a statistic is computed over whole users (item popularity)
USER_BLOCK_EVENTS = 1 << 24


def _user_blocks(user: np.ndarray, n_users: int) -> list[tuple[int, int]]:
    """Consecutive user ranges ``[lo, hi)`` covering ``0..n_users``, each holding about
    USER_BLOCK_EVENTS rows of the user-sorted ``user`` (the same cuts as the training shards)."""
    bounds = user_shards(user, USER_BLOCK_EVENTS)
    edges = [0, *(int(user[b]) for b in bounds[1:-1]), n_users]
    return list(zip(edges[:-1], edges[1:]))


def _session_queries(events: Interactions, n_items: int, mask_seen: bool) -> RankingQueries:
    """One query per event after the first of each session: predict it from the session prefix."""
    n = len(events)
    starts = np.flatnonzero(np.r_[True, events.user[1:] != events.user[:-1]]) if n else np.zeros(0, np.int64)
    lengths = np.diff(np.r_[starts, n])
    pos_in_session = np.arange(n) - np.repeat(starts, lengths)
    query_rows = np.flatnonzero(pos_in_session >= 1)
    prefix_len = pos_in_session[query_rows]
    h_indptr = np.zeros(query_rows.size + 1, dtype=np.int64)
    np.cumsum(prefix_len, out=h_indptr[1:])
    # history of query at row r = items[session_start(r) : r], gathered without a Python loop
    first = query_rows - prefix_len
    offsets = np.arange(h_indptr[-1]) - np.repeat(h_indptr[:-1], prefix_len)
    h_items = events.item[np.repeat(first, prefix_len) + offsets]
    t_indptr = np.arange(query_rows.size + 1, dtype=np.int64)
    empty = np.zeros(query_rows.size + 1, dtype=np.int64)
    label = "full ranking, session next-item, " + ("seen items masked" if mask_seen else "no masking (repeats allowed)")
    return RankingQueries(
        users=events.user[query_rows],
        target_indptr=t_indptr,
        target_items=events.item[query_rows],
        exclude_indptr=h_indptr if mask_seen else empty,
        exclude_items=h_items if mask_seen else np.zeros(0, np.int64),
        history_indptr=h_indptr,
        history_items=h_items,
        n_items=n_items,
        protocol=label,
    )


# --- building ---------------------------------------------------------------------------------
def prepare(log_: RawLog, pre: PreprocessConfig, split: SplitConfig, test_log: RawLog | None = None,
            engine: EngineConfig | None = None, directory: Path | None = None, scan: Any = None,
            test_scan: Any = None) -> PreparedData:
    """Filter, index and split a raw log on the preprocessing engine (DuckDB unless ``engine`` says).

    Args:
        log_: the interaction log (for ``session`` with ``test_log``: the training period only); with
            ``scan`` only its side tables (items, users) and ``source`` are used.
        pre: filtering.
        split: how to split; see :class:`SplitConfig`.
        test_log: a predefined test period (e.g. yoochoose ``test.tsv``); only with ``kind=session``.
        engine: which engine and its resources; default DuckDB with its default memory cap.
        directory: write the split arrays there as ``.npy`` files, appended to and then
            memory-mapped (the cache's temporary directory): the arrays never need to fit in
            memory. None: in memory.
        scan / test_scan: ``engine -> ibis table`` that reads the events on the engine itself (a
            Parquet log of any size) instead of from ``log_``.
    """
    _check_split(split, test_log is not None or test_scan is not None)
    started = time.perf_counter()

    sink = MemorySink() if directory is None else NpyFileSink(directory)
    try:
        out = run_prepare(scan or log_, pre, split, log_.source, sink, engine or EngineConfig(),
                          scratch_root=directory.parent if directory is not None else None,
                          test_events=test_scan or test_log)
    finally:
        if isinstance(sink, NpyFileSink):
            sink.close()
    arrays = out.arrays
    parts = {name: Interactions(arrays[f"{name}_user"], arrays[f"{name}_item"], arrays[f"{name}_timestamp"])
             for name in ("train", "valid", "test")}
    mask_seen = split.mask_seen if split.mask_seen is not None else split.kind != "session"
    data = PreparedData(**parts, user_vocab=out.user_vocab, item_vocab=out.item_vocab, split=split.kind,
                        mask_seen=bool(mask_seen), stats=out.stats, cold_items=out.cold_items,
                        popularity=out.item_popularity)
    _attach_item_features(data, log_)
    if split.kind != "session":  # for session logs the "user" is a session: a user table does not apply
        _attach_user_attributes(data, log_)
    data.stats["prepare_seconds"] = round(time.perf_counter() - started, 3)
    return data


def _check_split(split: SplitConfig, has_test_file: bool) -> None:
    if split.kind not in SPLIT_KINDS:
        raise ConfigError("data.split.kind", f"must be one of {SPLIT_KINDS}, got {split.kind!r}")
    if has_test_file and split.kind != "session":
        raise ConfigError("data.test_path", "a separate test file is only supported with data.split.kind=session")


def _align_to_vocabulary(table: pd.DataFrame, key: str, vocab: np.ndarray) -> pd.DataFrame:
    """One row per vocabulary entry, in index order (first row per id; ids absent from ``table``: NaN)."""
    table = table.drop_duplicates(key)
    table.index = table[key].astype(str)
    return table.reindex(pd.Index(vocab))


def _attach_item_features(data: PreparedData, log_: RawLog) -> None:
    """Titles and categories aligned with the item vocabulary (missing items get none)."""
    if log_.items is None or log_.items.empty:
        return
    aligned = _align_to_vocabulary(log_.items, ITEM, data.item_vocab)
    if "title" in aligned:
        data.item_titles = aligned["title"].fillna("").astype(str).to_numpy(dtype=str)
    if "categories" in aligned:
        cats = aligned["categories"].apply(lambda c: c if isinstance(c, (list, tuple, np.ndarray)) else [])
        lengths = cats.apply(len).to_numpy()
        flat = pd.Series([c for row in cats for c in row], dtype=object)  # once per item, not per event
        codes, vocab = pd.factorize(flat, sort=True)
        data.category_vocab = np.asarray(vocab, dtype=str)
        data.item_category_indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
        data.item_category_index = codes.astype(np.int64)


def _attach_user_attributes(data: PreparedData, log_: RawLog) -> None:
    """The user table's columns aligned with the user vocabulary (users absent from it: missing)."""
    if log_.users is None or log_.users.empty:
        return
    aligned = _align_to_vocabulary(log_.users, USER, data.user_vocab)
    for name in aligned.columns:
        if name == USER:
            continue
        column = aligned[name]
        numeric = pd.api.types.is_numeric_dtype(log_.users[name]) and not pd.api.types.is_bool_dtype(log_.users[name])
        if numeric:
            data.user_attributes[str(name)] = column.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            data.user_attributes[str(name)] = column.fillna("").astype(str).to_numpy(dtype=str)


def config_dataclass(cls: type, values: Mapping[str, Any] | None, key: str) -> Any:
    """Build a config dataclass, naming the offending key on unknown fields or wrong types."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name not in fields:
            raise ConfigError(f"{key}.{name}", f"unknown key; valid keys: {sorted(fields)}")
        default = fields[name].default
        if value is None or default is None or default is dataclasses.MISSING:
            continue
        expected = type(default)
        ok = isinstance(value, expected) or (expected is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok or (expected is not bool and isinstance(value, bool)):
            raise ConfigError(f"{key}.{name}", f"expected {expected.__name__}, got {value!r}")
    return cls(**values)


@dataclass
class DataSettings:
    """Everything in a ``data`` config block that decides the prepared arrays and how they are made.

    The one way from config values to prepared data, used by the Lightning data module and by
    :mod:`rectrain.runs` (which rebuilds a trained run's data without Lightning).
    """

    preprocess: PreprocessConfig
    split: SplitConfig
    engine: EngineConfig

    @classmethod
    def from_config(cls, preprocess: Mapping[str, Any] | None, split: Mapping[str, Any] | None,
                    engine: Mapping[str, Any] | None) -> "DataSettings":
        """Typed, with unknown or mistyped keys named (``data.split.kind``, ``data.engine.name``...)."""
        return cls(config_dataclass(PreprocessConfig, preprocess, "data.preprocess"),
                   config_dataclass(SplitConfig, split, "data.split"),
                   config_dataclass(EngineConfig, engine, "data.engine"))

    def load(self, source: Any, cache_dir: str | Path | None, verify: bool = False) -> "PreparedData":
        return load_or_prepare(source, self.preprocess, self.split, cache_dir, verify=verify, engine=self.engine)


def cache_key(source_fingerprint: dict[str, Any], pre: PreprocessConfig, split: SplitConfig) -> str:
    """Hash of everything that determines the prepared arrays."""
    return stable_hash({
        "source": source_fingerprint,
        "preprocess": dataclasses.asdict(pre),
        "split": dataclasses.asdict(split),
        "format": CACHE_FORMAT_VERSION,
    })


def load_or_prepare(source: Any, pre: PreprocessConfig, split: SplitConfig, cache_dir: str | Path | None,
                    verify: bool = False, engine: EngineConfig | None = None) -> PreparedData:
    """Return the prepared dataset for ``source``, from the cache when its key matches and it is intact.

    ``source`` has ``load() -> RawLog``, optionally ``load_test() -> RawLog | None``, and
    ``fingerprint() -> dict`` (its parameters plus the size and mtime of its files). A cache that
    fails a check (see :mod:`rectrain.data.cache`; ``verify``: checksums on this load too) is
    discarded and rebuilt with one warning. Temporaries of killed writers are removed first (the
    engine's spill folders too). ``engine`` prepares the data (default DuckDB); it is not part of the
    cache key: every engine gives the same arrays (tests/test_engine.py). In a
    cache dir that cannot be written (read-only), a damaged or missing cache is left as it is and the
    data is prepared without it (one warning per process).
    """
    key = cache_key(source.fingerprint(), pre, split)
    if not cache_dir:
        return _prepare(source, pre, split, key, engine)
    root = Path(cache_dir)
    try:
        remove_stale_temporaries(root)
    except OSError as exc:  # e.g. a read-only shared cache: loading from it still works
        log.debug("could not remove stale temporaries in %s: %s", root, exc)
    target = root / key
    for _ in range(3):  # a retry only follows another process's rebuild
        found = cache.identity(target)
        if found is None:
            break
        try:
            data = PreparedData.load(target, verify=verify)
            log.info("using cached dataset %s", target)
            return data
        except cache.CacheDamaged as exc:
            reason = exc.reason
        try:
            with cache.exclusive(target):  # rebuilt under the lock: others that found the damage wait, then load it
                if not cache.discard_if_unchanged(target, found):
                    log.info("prepared-data cache %s was rebuilt by another process; checking it", target)
                    continue
                log.warning("prepared-data cache %s failed verification (%s); rebuilding", target, reason)
                return _prepare_and_cache(source, pre, split, key, target, engine)
        except cache.CacheUnwritable as exc:  # a read-only cache dir: use the data, leave the cache alone
            _warn_once(f"prepared-data cache {target} failed verification ({reason}) and cannot be rebuilt "
                       f"there ({exc}); preparing the data without the cache")
            return _prepare(source, pre, split, key, engine)
    return _prepare_and_cache(source, pre, split, key, target, engine)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """One warning per process (a run loads its data several times), later repeats at INFO level."""
    log.log(logging.INFO if message in _warned else logging.WARNING, "%s", message)
    _warned.add(message)


def _prepare(source: Any, pre: PreprocessConfig, split: SplitConfig, key: str, engine: EngineConfig | None = None,
             directory: Path | None = None) -> PreparedData:
    """Prepare from the source (no cache involved); the result carries its cache key as fingerprint.

    A log file (``engine_inputs()``: Parquet scanned by the engine, CSV/TSV streamed to it in
    validated chunks) never passes whole through memory; a source without one (the synthetic data,
    MovieLens) is loaded into a RawLog first.
    """
    inputs = source.engine_inputs() if hasattr(source, "engine_inputs") else None
    if inputs is not None:
        raw, scan, test_scan = inputs
        data = prepare(raw, pre, split, engine=engine, directory=directory, scan=scan, test_scan=test_scan)
    else:
        raw = source.load()
        test_raw = source.load_test() if hasattr(source, "load_test") else None
        data = prepare(raw, pre, split, test_raw, engine=engine, directory=directory)
    data.fingerprint = key
    data.stats["source"] = raw.source
    return data


def _prepare_and_cache(source: Any, pre: PreprocessConfig, split: SplitConfig, key: str,
                       target: Path, engine: EngineConfig | None = None) -> PreparedData:
    """Prepare straight into a temporary cache directory and rename it into place.

    The engine writes the split arrays into the temporary directory (memory-mapped), so a log
    larger than memory is never held in it. If another process wins the rename, its copy stays;
    if the cache cannot be written (read-only, full), the data is prepared in memory instead.
    """
    try:
        with atomic_dir(target) as tmp:
            data = _prepare(source, pre, split, key, engine, directory=tmp)
            data.save(tmp)
    except OSError as exc:  # a read-only or full cache dir: the run goes on without a cache
        _warn_once(f"could not write the prepared-data cache at {target} ({exc.strerror or exc}); "
                   "going on without it")
        return _prepare(source, pre, split, key, engine)
    log.info("cached dataset at %s", target)
    # memory-mapped from the cache just written; its checksums are left for the next run's first load
    meta = json.loads((target / "meta.json").read_text())
    return PreparedData._load_checked(target, {f"{name}.npy" for name in meta["arrays"]})
