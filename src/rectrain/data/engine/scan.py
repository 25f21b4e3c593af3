"""Canonical event tables on an engine: from a RawLog in memory, a streamed CSV, or Parquet files.

The pipeline reads ``user, item, timestamp`` [, ``rating``, ``session``] and ``_order`` (the event's
position in the input: file by file in name order, row by row). A log already in memory (the
synthetic data, MovieLens) is handed to the engine as Arrow. A Parquet log — one file, a directory
or a glob of files, any size — is scanned by the engine itself, so it never passes through Python
memory; its values are checked there, and a bad one is reported as file, row group and row. A
CSV/TSV log of any size is validated chunk by chunk by :mod:`rectrain.data.readers` (errors name
the exact line) and written as Parquet into the engine's scratch folder as it goes, then scanned.
"""
from __future__ import annotations

import glob as globlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from rectrain.data.engine.backends import Engine
from rectrain.data.readers import MISSING_ID_STRINGS  # the readers' rule for a missing id, shared
from rectrain.data.schema import ITEM, RATING, SESSION, TIMESTAMP, USER, RawLog
from rectrain.errors import DataError

ORDER = "_order"
log = logging.getLogger(__name__)


def narrowest_integer(low: int | None, high: int | None) -> str:
    """``int32`` when every value lies in [``low``, ``high``] and that fits, else ``int64``.

    Ids and file positions are scanned as narrow as they fit: every pass after the scan moves
    narrower rows (1B events, dedup's window: 291.1 -> 176.9 s, its spill ~20 instead of ~32 bytes
    an event; 100M: 16.8 -> 11.6 s; `bench/engine_steps.py --steps dedup`).
    """
    return "int32" if low is not None and high is not None and -2**31 <= low and high < 2**31 else "int64"


def seconds_type(low: float | None, high: float | None, whole: bool) -> str:
    """``int32`` for timestamps that are all whole seconds in [0, 2^31) (until 2038), else ``float64``:
    four bytes less in every row the engine sorts and spills (1B events, dedup's window 176.9 ->
    152.8 s); the cache's timestamps stay float64, the same values."""
    return "int32" if whole and low is not None and high is not None and 0 <= low and high < 2**31 else "float64"


def _seconds_range(values: np.ndarray) -> tuple[float | None, float | None, bool]:
    """(min, max, all whole) of timestamps in memory; NaN is not whole."""
    if not values.size:
        return None, None, True
    return float(values.min()), float(values.max()), bool(np.all(np.floor(values) == values))


def from_raw_log(engine: Engine, raw: RawLog) -> Any:
    """The interactions of an in-memory log as an engine table, ``_order`` = row position."""
    import pyarrow as pa

    frame = raw.interactions
    columns = {}
    for name in (USER, ITEM, TIMESTAMP, RATING, SESSION):
        if name not in frame:
            continue
        values = frame[name]
        if name == TIMESTAMP:
            seconds = values.to_numpy(dtype=np.float64, na_value=np.nan)
            columns[name] = pa.array(seconds.astype(seconds_type(*_seconds_range(seconds))))
        elif name == RATING:
            columns[name] = pa.array(values.to_numpy(dtype=np.float64, na_value=np.nan), type=pa.float64())
        else:
            columns[name] = pa.array(values.to_numpy(dtype=object), type=pa.string(), from_pandas=True)
    columns[ORDER] = pa.array(np.arange(len(frame), dtype=np.dtype(narrowest_integer(0, len(frame)))))
    return engine.register(pa.table(columns))


def from_chunks(engine: Engine, chunks: Iterable[pd.DataFrame]) -> Any:
    """Validated canonical chunks (:func:`rectrain.data.readers.iter_interactions`) written one by
    one as row groups of a Parquet file in the engine's scratch folder (removed with it), then
    scanned: memory holds one chunk, and ``_order`` is the row's position in the log.

    A Spark cluster's executors cannot read that file: there the chunks are joined in memory and
    handed over as one table (with a warning), as before streaming.

    Ids arrive as text. A column whose every id is a canonical integer (``0``, ``12``, ``-3``; not
    ``007`` or ``+5``) is scanned as integers, the same ids written back as the same text, which
    the engine groups and sorts ~3x faster (100M events: dedup 66 s on text, 20 s on integers).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not engine.reads_local_files():  # a Spark cluster cannot read this machine's scratch folder
        log.warning("a CSV/TSV log on a Spark cluster is read into this process's memory before Spark gets it; "
                    "beyond memory, convert it once to Parquet on storage the executors share (README, "
                    "'CSV/TSV logs of any size')")
        frame = pd.concat(list(chunks), ignore_index=True)
        return from_raw_log(engine, RawLog(interactions=frame))
    handle, temp = tempfile.mkstemp(prefix="log-", suffix=".parquet", dir=engine.workdir)  # a training and a test log
    os.close(handle)
    path, writer = Path(temp), None
    integral: dict[str, bool] = {}
    bounds: dict[str, tuple[int, int]] = {}  # column -> (min, max) of its integral ids so far
    seconds: tuple[float | None, float | None, bool] = (None, None, False)  # (min, max, all whole) so far
    try:
        for chunk in chunks:
            table = pa.table({column: _arrow_column(column, chunk[column]) for column in chunk.columns})
            for column in (USER, ITEM, SESSION):
                if column in chunk.columns and integral.get(column, True):
                    integral[column] = _canonical_integers(table[column])
                    if integral[column] and len(chunk):
                        low, high = _integer_range(table[column])
                        seen = bounds.get(column, (low, high))
                        bounds[column] = (min(low, seen[0]), max(high, seen[1]))
            if TIMESTAMP in chunk.columns and len(chunk):
                low, high, whole = _seconds_range(table[TIMESTAMP].to_numpy())
                if seconds[0] is not None:
                    low, high, whole = min(low, seconds[0]), max(high, seconds[1]), whole and seconds[2]
                seconds = (low, high, whole)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table, row_group_size=max(len(chunk), 1))
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise DataError("the log has no rows")
    raw = _scan_with_position(engine, parquet_files(path))  # checked by the readers already: no second pass
    columns = [column for column in (USER, ITEM, TIMESTAMP, RATING, SESSION) if column in raw.columns]
    types = {column: narrowest_integer(*bounds[column]) for column in integral if integral[column]}
    if TIMESTAMP in raw.columns:
        types[TIMESTAMP] = seconds_type(*seconds)
    return raw.select(*[raw[column].cast(types[column]).name(column) if column in types else raw[column]
                        for column in columns], raw[ORDER])


#: canonical decimal integers that fit int64 with room: what int -> text gives back unchanged
_CANONICAL_INTEGER = r"^(0|-?[1-9][0-9]{0,17})$"


def _canonical_integers(ids: Any) -> bool:
    import pyarrow.compute as pc

    return bool(pc.all(pc.match_substring_regex(ids, _CANONICAL_INTEGER)).as_py())


def _integer_range(ids: Any) -> tuple[int, int]:
    """(min, max) of canonical integer ids held as text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    extremes = pc.min_max(pc.cast(ids, pa.int64()))
    return int(extremes["min"].as_py()), int(extremes["max"].as_py())


def _arrow_column(name: str, values: pd.Series) -> Any:
    import pyarrow as pa

    if name in (TIMESTAMP, RATING):
        return pa.array(values.to_numpy(dtype=np.float64), type=pa.float64())
    return pa.array(values.to_numpy(dtype=object), type=pa.string())


@dataclass
class ParquetFiles:
    """The files of a Parquet log in reading order, with row and row-group offsets for messages."""

    paths: list[Path]
    rows: list[int]
    row_groups: list[list[int]]  # per file: rows in each row group

    @property
    def offsets(self) -> np.ndarray:
        return np.r_[0, np.cumsum(self.rows)].astype(np.int64)

    def locate(self, order: int) -> str:
        """``file, row group g, row r`` (1-based row within the file) of a global position."""
        index = int(np.searchsorted(self.offsets, order, side="right") - 1)
        row = order - int(self.offsets[index])
        groups = np.r_[0, np.cumsum(self.row_groups[index])]
        group = int(np.searchsorted(groups, row, side="right") - 1)
        return f"{self.paths[index]}, row group {group}, row {row + 1}"

    def integer_range(self, column: str) -> tuple[int | None, int | None, int | None]:
        """(min, max, nulls) of an integer column from the files' row-group statistics (no data
        read); None for what a row group does not say (a writer may omit statistics)."""
        import pyarrow.parquet as pq

        low = high = None
        nulls: int | None = 0
        for path in self.paths:
            meta = pq.ParquetFile(path).metadata
            names = [meta.schema.column(i).path for i in range(meta.num_columns)]
            if column not in names:
                return None, None, None
            index = names.index(column)
            for group in range(meta.num_row_groups):
                stats = meta.row_group(group).column(index).statistics
                if stats is None:
                    return None, None, None
                nulls = nulls + stats.null_count if nulls is not None and stats.has_null_count else None
                if stats.num_values == 0:  # all null (or no rows): no bounds to take
                    continue
                if not stats.has_min_max or not isinstance(stats.min, int):
                    return None, None, nulls
                low = stats.min if low is None else min(low, stats.min)
                high = stats.max if high is None else max(high, stats.max)
        return low, high, nulls


def parquet_files(path: str | Path) -> ParquetFiles:
    """A Parquet file, every ``*.parquet`` under a directory, or a glob; sorted by name."""
    import pyarrow.parquet as pq

    text = str(path)
    if any(ch in text for ch in "*?["):
        found = sorted(Path(p) for p in globlib.glob(text, recursive=True))
    elif Path(text).is_dir():
        found = sorted(p for p in Path(text).rglob("*") if p.is_file() and p.suffix in (".parquet", ".pq"))
    else:
        found = [Path(text)]
    if not found:
        raise DataError("no Parquet files found", path=text, key="data.source.path")
    rows, groups = [], []
    for p in found:
        if not p.is_file():
            raise DataError("file not found", path=str(p), key="data.source.path")
        try:
            meta = pq.ParquetFile(p).metadata
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a damaged or non-Parquet file
            raise DataError(f"not a readable Parquet file ({exc})", path=str(p), key="data.source.path") from None
        rows.append(int(meta.num_rows))
        groups.append([int(meta.row_group(i).num_rows) for i in range(meta.num_row_groups)])
    if sum(rows) == 0:
        raise DataError("the Parquet log has no rows", path=text)
    return ParquetFiles(found, rows, groups)


def from_parquet(engine: Engine, path: str | Path, columns: Mapping[str, str],
                 timestamp_format: str | None = None) -> Any:
    """Scan a Parquet log on the engine with canonical names, types and ``_order``; values checked.

    Ids: strings are trimmed, integers kept as integers (``12`` and ``"12"`` are the same id either
    way: vocabularies are written as text); timestamps: numbers (seconds, or ``ms``) or Parquet
    timestamps (taken as UTC).
    """
    files = parquet_files(path)
    raw = _scan_with_position(engine, files)
    missing = [f"{role} -> '{ref}'" for role, ref in columns.items() if str(ref) not in raw.columns]
    if missing:
        raise DataError(f"column(s) {', '.join(missing)} not in the file; it has: {', '.join(raw.columns)}",
                        path=str(files.paths[0]), key="data.source.columns")
    checked = {role: _CHECKS[role if role in _CHECKS else RATING](raw[str(ref)], str(ref), files, role,
                                                                     timestamp_format)
               for role, ref in columns.items()}
    # every column's check and the timestamps' range in one pass over the log (a billion events: one
    # read of the Parquet files, not one per column)
    value = checked[TIMESTAMP].value if TIMESTAMP in checked else None
    summary = raw.aggregate(
        **{f"_bad_{role}": raw[ORDER].min(where=check.bad) for role, check in checked.items()},
        **({} if value is None else {"_low": value.min(), "_high": value.max(),
                                     "_fractions": (value % 1.0 != 0.0).sum()})).execute()
    for role, check in checked.items():
        row = summary[f"_bad_{role}"].iloc[0]
        if not pd.isna(row):
            raise DataError(f"{files.locate(int(row))}: {check.problem}", column=str(columns[role]),
                            key=f"data.source.columns.{role}")
    selected = {role: check.value for role, check in checked.items()}
    if value is not None:
        low, high, fractions = (summary[c].iloc[0] for c in ("_low", "_high", "_fractions"))
        selected[TIMESTAMP] = value.cast(seconds_type(float(low), float(high), int(fractions) == 0))
    if USER not in selected:
        selected[USER] = selected[SESSION]
    ordered = {name: selected[name] for name in (USER, ITEM, TIMESTAMP, RATING, SESSION) if name in selected}
    return raw.select(**ordered, **{ORDER: raw[ORDER]})


def _scan_with_position(engine: Engine, files: ParquetFiles) -> Any:
    """All files in one scan with ``_order`` = file offset + row number within the file."""
    import ibis

    offsets = ibis.memtable({"_file": [str(p.resolve()) for p in files.paths],
                             "_offset": files.offsets[:-1].tolist()})
    if engine.name == "duckdb":
        listing = ", ".join("'" + str(p.resolve()).replace("'", "''") + "'" for p in files.paths)
        scan = engine.con.sql(f"SELECT * FROM read_parquet([{listing}], file_row_number=true, filename=true)")
        scan = scan.rename({"_file": "filename", "_row": "file_row_number"})
    else:
        frame = (engine.con._session.read.parquet(*[str(p.resolve()) for p in files.paths])
                 .selectExpr("*", "_metadata.file_path AS _file", "_metadata.row_index AS _row"))
        name = f"rectrain_scan_{id(frame)}"
        frame.createOrReplaceTempView(name)
        scan = engine.con.table(name)
        offsets = offsets.mutate(_file=ibis.literal("file:") + offsets._file)
    offsets = engine.register(offsets.to_pyarrow())
    joined = scan.join(offsets, "_file")
    position = (joined._offset + joined._row.cast("int64")).cast(narrowest_integer(0, int(files.offsets[-1])))
    return joined.mutate(**{ORDER: position}).drop("_offset", "_row", "_file")


@dataclass
class _Checked:
    """A column as the pipeline reads it, the rows that are bad, and what is wrong with them."""

    value: Any
    bad: Any
    problem: str


def _id_column(column: Any, ref: str, files: ParquetFiles, role: str, timestamp_format: str | None) -> _Checked:
    import ibis

    dtype = column.type()
    if dtype.is_integer():
        low, high, nulls = files.integer_range(ref)
        value = column.cast(narrowest_integer(low, high))
        # no nulls, say the statistics: nothing to check, and the check's pass does not read the column
        # (a billion int64 ids: ~5 GB of Parquet)
        bad = column.isnull() if nulls != 0 else ibis.literal(False)
    elif dtype.is_string():
        value = column.strip()
        bad = value.isnull() | value.isin(list(MISSING_ID_STRINGS))
    elif dtype.is_floating():
        value = column.cast("int64")
        bad = column.isnull() | column.isnan() | (column.floor() != column)
    else:
        raise DataError(f"cannot use a column of type {dtype} as ids; store ids as strings or integers",
                        path=str(files.paths[0]), column=ref, key=f"data.source.columns.{role}")
    return _Checked(value, bad, "empty, missing or non-integral id; every row needs an id")


def _number(column: Any, ref: str, files: ParquetFiles, role: str, timestamp_format: str | None) -> _Checked:
    if not column.type().is_numeric():
        raise DataError(f"column of type {column.type()} is not numeric", path=str(files.paths[0]), column=ref,
                        key="data.source.columns.rating")
    value = column.cast("float64")
    return _Checked(value, value.isnull() | value.isnan(), "missing value")


def _seconds(column: Any, ref: str, files: ParquetFiles, role: str, timestamp_format: str | None) -> _Checked:
    """Seconds as float64; :func:`from_parquet` narrows them to int32 once their range is known."""
    dtype = column.type()
    if dtype.is_timestamp():
        value = column.epoch_seconds().cast("float64")  # whole seconds, as the readers give datetimes
    elif dtype.is_numeric():
        value = column.cast("float64")
        if timestamp_format in ("ms", "milliseconds"):
            value = value / 1000.0
        elif timestamp_format not in (None, "s", "seconds", "unix", "epoch"):
            raise DataError(f"numeric timestamps with timestamp_format={timestamp_format!r}; use s or ms",
                            path=str(files.paths[0]), column=ref, key="data.source.timestamp_format")
    else:
        raise DataError(f"timestamps of type {dtype} in a Parquet log; store numbers (seconds) or Parquet "
                        "timestamps", path=str(files.paths[0]), column=ref, key="data.source.columns.timestamp")
    return _Checked(value, value.isnull() | value.isnan(), "missing or invalid timestamp")


_CHECKS = {USER: _id_column, ITEM: _id_column, SESSION: _id_column, TIMESTAMP: _seconds, RATING: _number}
